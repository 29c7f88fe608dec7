"""The shared base of lcseg's TFDS builders.

Every builder writes the same features, so that ``lcseg.data.open_split`` reads every
dataset the same way:

* ``image``: RGB uint8, stored as lossless PNG (no TensorFlow needed: TFDS encodes
  bytes we hand it and decodes with Pillow);
* ``label``: evaluated-class indices ``0..C-1``, ignore label elsewhere, PNG;
* ``id``: the example's identifier in its source dataset.

The base class also records per-class pixel counts of the training split in the
dataset info (``info.metadata['class_pixel_counts']``), which class weighting reads.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lcseg.data.metadata import DatasetMetadata

TRAIN_COUNTS_KEY = "class_pixel_counts"


def encode_png(array: np.ndarray) -> bytes:
    """Encodes an HxW or HxWx3 uint8 array as PNG bytes (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


class LandCoverBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class: common features, PNG encoding and training class statistics.

    Subclasses set ``METADATA`` and ``VERSION``, implement ``_split_generators`` returning, for
    each split, ``self._encoded(split, examples)`` where ``examples`` yields
    ``(key, example)`` pairs whose ``image`` and ``label`` are numpy arrays.
    """

    METADATA: DatasetMetadata
    # Extra features a dataset adds to the common three (e.g. LoveDA's domain).
    EXTRA_FEATURES: Mapping[str, tfds.features.FeatureConnector] = {}
    # Format of the stored image bytes: "jpeg" where a builder keeps the source's JPEG
    # bytes unchanged (re-encoding photos losslessly as PNG triples their size).
    IMAGE_ENCODING = "png"
    # Splits whose label pixels are counted for class weighting (summed).
    TRAIN_SPLITS: tuple[str, ...] = ("train",)
    # Names that stand for a union of stored splits (TFDS split expressions), so a dataset
    # need not store an example twice, e.g. {"train": "train_urban+train_rural"}.
    SPLIT_ALIASES: Mapping[str, str] = {}

    def __init__(self, **kwargs: Any):
        # Array records are what tfds data sources read without TensorFlow.
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3),
                                             encoding_format=self.IMAGE_ENCODING),
                "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                "id": tfds.features.Text(),
                **self.EXTRA_FEATURES,
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _encoded(
        self, split: str, examples: Iterator[tuple[str, dict[str, Any]]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Encodes examples' numpy image/label arrays as PNG; counts training classes.

        Every ``_split_generators`` entry goes through here (encoded bytes pass through
        unchanged). Label pixels of ``TRAIN_SPLITS`` are counted per class; the sum lands
        in the dataset info, which TFDS writes when preparation finishes.
        """
        counting = split in self.TRAIN_SPLITS
        counts = np.zeros(self.METADATA.num_classes, np.int64)
        for key, example in examples:
            if counting:
                counts += np.bincount(example["label"].ravel(), minlength=256)[: len(counts)]
            encoded = dict(example)
            for field in ("image", "label"):
                if isinstance(encoded[field], np.ndarray):
                    encoded[field] = encode_png(encoded[field])
            yield key, encoded
        if counting:
            previous = self.info.metadata.get(TRAIN_COUNTS_KEY, [0] * len(counts))
            self.info.metadata[TRAIN_COUNTS_KEY] = (counts + np.asarray(previous)).tolist()


class GeneratedBuilder(LandCoverBuilder, skip_registration=True):
    """A dataset generated from ``(split, index)``, with nothing to download.

    Subclasses set ``SPLIT_SIZES`` (examples per split) and ``generate_scene(split, index)``
    (a ``{'image', 'label'}`` dict of numpy arrays, deterministic); examples are named
    ``<split>_<index:04d>``.
    """

    SPLIT_SIZES: Mapping[str, int]
    generate_scene: Callable[[str, int], dict[str, np.ndarray]]

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        return {split: self._encoded(split, self._generate_examples(split))
                for split in self.SPLIT_SIZES}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for index in range(self.SPLIT_SIZES[split]):
            scene = type(self).generate_scene(split, index)
            example_id = f"{split}_{index:04d}"
            yield example_id, {"id": example_id, **scene}
