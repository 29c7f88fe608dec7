"""Prepared datasets as random-access sequences of examples, without TensorFlow.

Two steps, each named for what it does:

* ``prepare_dataset(name, data_dir, manual_dir)`` builds the TFDS dataset unless it is
  already there (the synthetic one always can; the real ones need their downloaded
  archives in ``manual_dir``). Commands call it first (``python -m lcseg.prepare`` does
  nothing else).
* ``open_split(name, split, data_dir)`` opens a split of a prepared dataset (never
  building one) as a sequence whose items are

    {'image': uint8 HxWx3, 'label': uint8 HxW, 'id': str, ...dataset extras}

backed by a TFDS ArrayRecord data source (random access, picklable for grain workers).
Images and labels are decoded here with Pillow rather than by TFDS, whose decoding copies
the image again and repeats a label's channel (on a 2448x2448 example: 94 ms per example
instead of 80, all of it loader time).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lcseg.data.metadata import DatasetMetadata, get_metadata


def dataset_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of dataset ``name`` in ``data_dir`` (prepared or not)."""
    meta = get_metadata(name)
    # None means the TFDS default: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    return meta.builder_class()(data_dir=os.path.expanduser(data_dir) if data_dir else None)


def prepare_dataset(name: str, data_dir: str | None = None, manual_dir: str | None = None
                    ) -> tfds.core.DatasetBuilder:
    """Prepares dataset ``name`` in ``data_dir`` unless it is already there.

    Args:
      name: dataset registry name (``lcseg.data.DATASETS``).
      data_dir: TFDS data directory; None for the TFDS default.
      manual_dir: folder holding the downloaded archives (real datasets only).

    Returns:
      The prepared builder.
    """
    meta = get_metadata(name)
    builder = dataset_builder(name, data_dir)
    if builder.is_prepared():
        return builder
    if meta.needs_manual_dir and not manual_dir:
        raise FileNotFoundError(
            f"Dataset {name!r} is not prepared in {builder.data_dir!s}. Download its archives "
            f"(see datasets/{name}/README.md), then run `python -m lcseg.prepare {name} "
            f"--manual_dir DOWNLOADS --data_dir DATA_DIR` or set config.dataset.manual_dir.")
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)
    if not sys.stderr.isatty():
        # TFDS's progress bars redraw a line in place: in a log file (nohup, SLURM) each
        # redraw is a line of its own. Its start and end lines still say what happens.
        tfds.disable_progress_bar()
    # TFDS writes into a temporary folder and renames it when complete, so an
    # interrupted preparation never leaves a half-written dataset behind.
    builder.download_and_prepare(download_config=download_config)
    return builder


# Features stored as encoded images, decoded by ``ExampleSource``.
_IMAGE_FEATURES = ("image", "label")


def _decode(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        if image.mode != mode:  # Builders store RGB images and 8-bit labels.
            image = image.convert(mode)
        return np.asarray(image)


class ExampleSource(Sequence):
    """Random-access examples of one split, decoded to numpy (``image``, ``label``, ``id``).

    Args:
      data_source: a TFDS data source read with ``SKIP_DECODING`` for ``image`` and
        ``label`` (``open_split`` makes one): their encoded bytes.
      metadata: the dataset's metadata.
      split: the split's name.
    """

    def __init__(self, data_source: Sequence, metadata: DatasetMetadata, split: str):
        self._data_source = data_source
        self.metadata = metadata
        self.split = split

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            # array_record raises ValueError; Python's iteration protocol needs IndexError.
            raise IndexError(f"index {index} out of range for {self!r}")
        record = self._data_source[index % len(self)]
        example = {key: (value.decode() if isinstance(value, bytes) else value)
                   for key, value in record.items() if key not in _IMAGE_FEATURES}
        example["image"] = _decode(record["image"], "RGB")
        example["label"] = _decode(record["label"], "L")
        return example

    def __repr__(self) -> str:
        return f"ExampleSource({self.metadata.name}/{self.split}, {len(self)} examples)"


def open_split(name: str, split: str, data_dir: str | None = None) -> ExampleSource:
    """Returns the examples of ``split`` of the prepared dataset ``name``.

    Args:
      name: dataset registry name, e.g. ``'synthetic'``.
      split: split name, e.g. ``'train'``, ``'validation'``, ``'test'``.
      data_dir: TFDS data directory; None for the TFDS default.

    Returns:
      A sequence of ``{'image': uint8 HxWx3, 'label': uint8 HxW, 'id': str, ...}``.

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_dir`` (``prepare_dataset``).
      ValueError: no such dataset or split.
    """
    builder = dataset_builder(name, data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"Dataset {name!r} is not prepared in {builder.data_dir!s}: run `python -m "
            f"lcseg.prepare {name} --data_dir DATA_DIR` (with --manual_dir DOWNLOADS for a "
            f"real dataset) first.")
    aliases = getattr(builder, "SPLIT_ALIASES", {})
    available = sorted({*builder.info.splits.keys(), *aliases})
    if split not in available:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; available: {available}")
    data_source = builder.as_data_source(
        split=aliases.get(split, split),
        decoders={name: tfds.decode.SkipDecoding() for name in _IMAGE_FEATURES})
    return ExampleSource(data_source, get_metadata(name), split)
