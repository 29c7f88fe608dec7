"""Pictures of labels and predictions in a dataset's palette."""

from __future__ import annotations

import numpy as np

from lcseg.data.metadata import DatasetMetadata


def colorize(labels: np.ndarray, metadata: DatasetMetadata) -> np.ndarray:
    """Class indices ``[..., H, W]`` -> RGB uint8 ``[..., H, W, 3]``; ignored pixels grey."""
    return metadata.palette_array()[np.asarray(labels, np.uint8)]


def comparison_panels(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                      metadata: DatasetMetadata) -> np.ndarray:
    """``image | ground truth | prediction`` side by side, one panel per example.

    Args:
      images: uint8 ``[N, H, W, 3]``.
      labels: ``[N, H, W]`` class indices (ignore label drawn grey).
      predictions: ``[N, H, W]`` class indices.
      metadata: the dataset whose palette to use.

    Returns:
      uint8 ``[N, H, 3W, 3]``.
    """
    return np.concatenate([np.asarray(images, np.uint8), colorize(labels, metadata),
                           colorize(predictions, metadata)], axis=2)
