"""Pictures of labels and predictions in a dataset's palette, and lcseg's figures.

Every figure lcseg draws (here, and the class statistics, the learning-rate finder and the
comparison plots) starts from ``offscreen_figure``: a matplotlib ``Figure`` on its own Agg
canvas, without pyplot, so neither the global backend nor a user's open interactive
figures are touched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lcseg.data.metadata import DatasetMetadata


def offscreen_figure(figsize: tuple[float, float], dpi: int = 100) -> Figure:
    """A matplotlib figure drawn on its own Agg canvas (``figure.canvas``), without pyplot."""
    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


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


def row_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows of a ``[C, C]`` confusion matrix scaled to sum to one (a row of zeros stays zero).

    Row ``i`` then reads "of the pixels whose true class is ``i``, the fraction predicted as
    each class"; its diagonal entry is the class's recall.
    """
    matrix = np.asarray(matrix, np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square [C, C], got shape {matrix.shape}")
    totals = matrix.sum(axis=1, keepdims=True)
    # A class absent from the ground truth has no row to normalise: show zeros, not NaN.
    return np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)


def confusion_heatmap(matrix: np.ndarray, class_names: Sequence[str], *,
                      title: str = "") -> np.ndarray:
    """Draws the row-normalised confusion matrix as an annotated heatmap.

    Args:
      matrix: ``[C, C]`` pixel counts, rows true class, columns predicted class.
      class_names: the C class names, used on both axes.
      title: drawn above the heatmap.

    Returns:
      The picture as RGB uint8 ``[H, W, 3]`` (e.g. for TensorBoard or PNG files).
    """
    normalised = row_normalize(matrix)
    num_classes = len(class_names)
    if normalised.shape[0] != num_classes:
        raise ValueError(f"confusion matrix is {normalised.shape[0]}x{normalised.shape[1]} but "
                         f"{num_classes} class names were given")
    # Grow the figure with the class count so that annotations stay legible.
    side = max(4.0, 1.8 + 0.6 * num_classes)
    figure = offscreen_figure((side + 1.0, side))
    canvas = figure.canvas
    try:
        axes = figure.add_subplot()
        image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        ticks = np.arange(num_classes)
        axes.set_xticks(ticks, labels=list(class_names), rotation=45, ha="right",
                        rotation_mode="anchor")
        axes.set_yticks(ticks, labels=list(class_names))
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        if title:
            axes.set_title(title)
        for row in range(num_classes):
            for column in range(num_classes):
                value = normalised[row, column]
                # White text on dark cells, black on light ones.
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if value > 0.5 else "black")
        figure.tight_layout()
        canvas.draw()
        # Copy: the buffer belongs to the canvas, which is released below.
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()
    finally:
        # Without pyplot there is no figure registry to close; clearing frees the artists.
        figure.clear()
