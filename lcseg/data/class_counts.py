"""Per-class label pixel counts of a split: recorded at preparation, or counted.

Class weights (``lcseg.class_weights``) and the statistics command
(``python -m lcseg.class_stats``) start from these counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from lcseg.data.metadata import get_metadata
from lcseg.data.sources import dataset_builder, open_split
from lcseg.data.tfds_builder import TRAIN_COUNTS_KEY


def train_class_counts(name: str, data_dir: str | None = None) -> np.ndarray:
    """Per-class label pixel counts of the training split, recorded at preparation."""
    builder = dataset_builder(name, data_dir)
    counts = builder.info.metadata.get(TRAIN_COUNTS_KEY) if builder.info.metadata else None
    if counts is None:
        raise ValueError(f"Dataset {name!r} in {builder.data_dir!s} records no class counts; "
                         "prepare it again with this version of lcseg.")
    return np.asarray(counts, np.int64)


def count_class_pixels(
    source: Sequence[Mapping[str, Any]],
    num_classes: int,
    ignore_label: int,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, int]:
    """Counts label pixels per class over a split, one example at a time.

    Args:
      source: random-access examples, each with a ``'label'`` array of class indices.
      num_classes: C; labels ``0..C-1`` are counted per class.
      ignore_label: label counted separately, as ignored.
      progress: called as ``progress(done, total)`` after each example.

    Returns:
      ``(counts, ignored)``: int64 ``[C]`` per-class pixel counts and the ignored pixel count.

    Raises:
      ValueError: a label that is neither a class nor the ignore label (a corrupt
        preparation; silently dropping it would misstate the statistics).
    """
    counts = np.zeros(num_classes, np.int64)
    ignored = 0
    total = len(source)
    # Index rather than iterate: sequences backed by data sources signal their end by
    # length, not necessarily by IndexError.
    for index in range(total):
        example = source[index]
        label = np.asarray(example["label"]).ravel()
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"example {example.get('id', index)!r}: labels outside 0..255")
        # uint8-range bincount: cheap, and it also shows stray values, not just classes.
        histogram = np.bincount(label.astype(np.int64), minlength=256)
        stray = np.flatnonzero(histogram)
        stray = stray[(stray >= num_classes) & (stray != ignore_label)]
        if stray.size:
            raise ValueError(
                f"example {example.get('id', index)!r} has label values {stray.tolist()}, "
                f"neither a class (0..{num_classes - 1}) nor the ignore label {ignore_label}")
        counts += histogram[:num_classes]
        ignored += int(histogram[ignore_label])
        if progress is not None:
            progress(index + 1, total)
    return counts, ignored


def split_class_counts(name: str, split: str, data_dir: str | None = None) -> np.ndarray:
    """Per-class pixel counts of ``split``: recorded at preparation for ``train``, else counted.

    Counting reads the whole split once, one example at a time (LoveDA's ``train_rural``,
    say, when a run trains on it).
    """
    if split == "train":
        return train_class_counts(name, data_dir)
    metadata = get_metadata(name)
    logging.info("Counting class pixels of %s/%s", name, split)
    counts, _ = count_class_pixels(open_split(name, split, data_dir), metadata.num_classes,
                                   metadata.ignore_label)
    return counts
