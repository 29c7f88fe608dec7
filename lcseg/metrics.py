"""Segmentation metrics from one dataset-level confusion matrix.

The protocol of all three benchmarks: accumulate a single confusion matrix over the whole
split (ignored pixels dropped before counting), then derive every score from it. Per-image
averaging gives different, non-comparable numbers: it is offered only as an extra,
clearly named score (``miou_per_image``, see ``per_image_scores``), never in place of these.

``ConfusionMatrix`` is a ``clu.metrics.Metric``: each step computes a small int32 matrix on
device; merging on host (after ``jax.device_get``) accumulates in int64, so long
evaluations of large scenes cannot overflow.

Absent classes: a class with no ground-truth pixel *and* no predicted pixel has an
undefined IoU (0/0). It is reported as NaN and excluded from every mean, so that it
neither rewards nor punishes a model (the convention of mmsegmentation and the LoveDA
and DeepGlobe evaluation code).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from lcseg.data.metadata import DatasetMetadata


def confusion_matrix(labels: jax.Array, predictions: jax.Array, *, num_classes: int,
                     ignore_label: int = 255) -> jax.Array:
    """Counts ``[true, predicted]`` pixel pairs, skipping ignored labels.

    Args:
      labels: int array of ground-truth classes, any shape.
      predictions: int array of predicted classes, same shape.
      num_classes: C; labels outside ``0..C-1`` (the ignore label) are not counted.
      ignore_label: documented for clarity; any out-of-range label is skipped.

    Returns:
      An int32 ``[C, C]`` matrix, rows true class, columns predicted class.
    """
    del ignore_label  # Everything outside 0..C-1 is skipped, the ignore label included.
    labels = labels.reshape(-1).astype(jnp.int32)
    predictions = predictions.reshape(-1).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    # Ignored pixels go to an extra bin that is dropped, which keeps shapes static.
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.bincount(index, length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def tile_confusion_matrices(labels: jax.Array, predictions: jax.Array, *,
                            num_classes: int) -> jax.Array:
    """One confusion matrix per tile: ``confusion_matrix`` of each ``labels[i]``.

    Args:
      labels: int ``[B, ...]`` ground truth; out-of-range labels (ignore) are skipped.
      predictions: int ``[B, ...]`` predicted classes.
      num_classes: C.

    Returns:
      int32 ``[B, C, C]``, rows true class, columns predicted class.
    """
    tiles = labels.shape[0]
    labels = labels.reshape(tiles, -1).astype(jnp.int32)
    predictions = predictions.reshape(tiles, -1).astype(jnp.int32)
    valid = (labels >= 0) & (labels < num_classes)
    bins = num_classes * num_classes + 1  # the last bin of each tile takes ignored pixels
    index = jnp.where(valid, labels * num_classes + predictions, bins - 1)
    # One bincount over all tiles, each tile offset into its own block of bins.
    index = index + bins * jnp.arange(tiles, dtype=jnp.int32)[:, None]
    counts = jnp.bincount(index.reshape(-1), length=tiles * bins).reshape(tiles, bins)
    return counts[:, :-1].reshape(tiles, num_classes, num_classes).astype(jnp.int32)


class PerImageConfusion:
    """Host accumulator of one int64 confusion matrix per image, from tiles of images.

    Evaluation tiles each image; a tile's matrix is added to its image's. Tiles with a
    negative image index (padding of the last batch, batches of a process that ran out)
    are skipped.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._matrices: dict[int, np.ndarray] = {}

    def add(self, image_index: np.ndarray, matrices: np.ndarray) -> None:
        """Adds ``matrices[i]`` (``[B, C, C]``) to image ``image_index[i]`` (``[B]``)."""
        for index, matrix in zip(np.asarray(image_index).tolist(), np.asarray(matrices)):
            if index < 0:
                continue
            if index not in self._matrices:
                self._matrices[index] = np.zeros((self.num_classes,) * 2, np.int64)
            self._matrices[index] += matrix

    def __len__(self) -> int:
        return len(self._matrices)

    def compute(self) -> np.ndarray:
        """int64 ``[images, C, C]``, in image-index order."""
        if not self._matrices:
            return np.zeros((0, self.num_classes, self.num_classes), np.int64)
        return np.stack([self._matrices[k] for k in sorted(self._matrices)])


def per_image_scores(matrices: np.ndarray) -> dict[str, Any]:
    """Per-image IoU averaged over the images that contain each class.

    The protocol of "Finding a Faster UNet" (and other per-image reports): for each image
    and each class present in its ground truth, IoU = TP / (TP + FP + FN) over that image's
    labelled pixels; a class's score is the mean over the images that contain it, and
    ``miou_per_image`` the mean over classes present in at least one image. A class
    predicted in an image whose ground truth lacks it is not scored on that image, so
    those false positives count nowhere (the split-level IoU counts them). Each image
    weighs the same whatever its size. These numbers are not comparable with the
    split-level ``miou`` of ``scores_from_confusion``, which the benchmarks use.

    Args:
      matrices: ``[images, C, C]`` confusion matrices, one per image.

    Returns:
      ``iou_per_image`` (``[C]``, NaN for a class in no image), ``miou_per_image`` and
      ``images_per_class`` (``[C]``, how many images contain each class).
    """
    matrices = np.asarray(matrices, np.float64)
    true_positive = np.diagonal(matrices, axis1=1, axis2=2)  # [N, C]
    per_true = matrices.sum(axis=2)
    union = per_true + matrices.sum(axis=1) - true_positive
    present = per_true > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(present, true_positive / np.where(union > 0, union, 1), 0.0)
        images = present.sum(axis=0)
        class_iou = np.where(images > 0, iou.sum(axis=0) / images, np.nan)
    return {
        "iou_per_image": class_iou,
        "miou_per_image": (float(np.nanmean(class_iou)) if np.any(images > 0)
                           else float("nan")),
        "images_per_class": images.astype(np.int64),
    }


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """A confusion-matrix metric; ``compute()`` returns the int64 matrix."""

    matrix: Any

    @classmethod
    def from_model_output(cls, *, labels: jax.Array, predictions: jax.Array,
                          num_classes: int, ignore_label: int = 255,
                          **_: Any) -> ConfusionMatrix:
        return cls(matrix=confusion_matrix(labels, predictions, num_classes=num_classes,
                                           ignore_label=ignore_label))

    @classmethod
    def empty(cls, num_classes: int = 0) -> ConfusionMatrix:
        return cls(matrix=np.zeros((num_classes, num_classes), np.int64))

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        # On host, numpy promotes int32 + int64 to int64: long sums cannot overflow.
        return type(self)(matrix=np.asarray(self.matrix, np.int64) + np.asarray(other.matrix))

    def compute(self) -> np.ndarray:
        return np.asarray(self.matrix, np.int64)


def scores_from_confusion(matrix: np.ndarray) -> dict[str, Any]:
    """Derives the standard segmentation scores from a ``[C, C]`` confusion matrix.

    Args:
      matrix: counts, rows true class, columns predicted class.

    Returns:
      A dict with per-class arrays ``iou``, ``precision``, ``recall``, ``f1`` (NaN where
      undefined) and scalars ``miou``, ``mean_f1``, ``accuracy`` (pixel accuracy),
      ``mean_accuracy`` (mean per-class recall) and ``fwiou`` (frequency-weighted IoU).
    """
    matrix = np.asarray(matrix, np.float64)
    true_positive = np.diag(matrix)
    per_true = matrix.sum(axis=1)  # ground-truth pixels per class
    per_pred = matrix.sum(axis=0)  # predicted pixels per class
    union = per_true + per_pred - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        recall = np.where(per_true > 0, true_positive / per_true, np.nan)
        precision = np.where(per_pred > 0, true_positive / per_pred, np.nan)
        f1 = np.where(per_true + per_pred > 0, 2 * true_positive / (per_true + per_pred), np.nan)
    total = matrix.sum()
    frequency = per_true / total if total > 0 else np.zeros_like(per_true)
    present = ~np.isnan(iou)

    def nanmean(values: np.ndarray) -> float:
        return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")

    return {
        "iou": iou,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "miou": nanmean(iou),
        "mean_f1": nanmean(f1),
        "accuracy": float(true_positive.sum() / total) if total > 0 else float("nan"),
        "mean_accuracy": nanmean(recall),
        "fwiou": float(np.sum(frequency[present] * iou[present])),
    }


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def write_scores_json(path: str, scores: dict[str, Any], class_names: Sequence[str],
                      **context: Any) -> None:
    """Writes scores (and ``context`` such as split and step) as JSON, atomically.

    Undefined scores (NaN) become ``null``; the confusion matrix is stored as nested
    lists, rows true class, columns predicted class.
    """
    report = {
        **context,
        "classes": list(class_names),
        **{key: _json_number(scores[key])
           for key in ("miou", "accuracy", "mean_accuracy", "fwiou", "mean_f1", "loss")
           if key in scores},
        **{key: {name: _json_number(v) for name, v in zip(class_names, scores[key])}
           for key in ("iou", "f1", "precision", "recall")},
        # Extra, non-benchmark scores (see per_image_scores); only when computed.
        **({"miou_per_image": _json_number(scores["miou_per_image"]),
            "iou_per_image": {name: _json_number(v)
                              for name, v in zip(class_names, scores["iou_per_image"])},
            "images_per_class": {name: int(v) for name, v in
                                 zip(class_names, scores["images_per_class"])}}
           if "miou_per_image" in scores else {}),
        "confusion_matrix": np.asarray(scores["confusion_matrix"]).tolist(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)  # Never a half-written report.


def scalar_summaries(scores: dict[str, Any], metadata: DatasetMetadata,
                     prefix: str) -> dict[str, float]:
    """Flattens scores to ``{prefix/miou, prefix/iou/<class>, ...}`` for the writer."""
    summary = {f"{prefix}/{key}": scores[key]
               for key in ("loss", "miou", "accuracy", "mean_accuracy", "fwiou", "mean_f1")}
    for key in ("iou", "f1", "precision", "recall"):
        for name, value in zip(metadata.class_names, scores[key]):
            summary[f"{prefix}/{key}/{name}"] = float(value)
    return summary


def format_scores_table(scores: dict[str, Any], metadata: DatasetMetadata) -> str:
    """A per-class table for logs and the terminal."""
    lines = [f"{'class':<20}{'IoU':>8}{'F1':>8}{'prec.':>8}{'recall':>8}"]
    for index, name in enumerate(metadata.class_names):
        lines.append(f"{name:<20}" + "".join(
            f"{scores[key][index]:>8.4f}" for key in ("iou", "f1", "precision", "recall")))
    lines.append(f"{'mean':<20}{scores['miou']:>8.4f}{scores['mean_f1']:>8.4f}")
    lines.append(f"pixel accuracy {scores['accuracy']:.4f}, mean accuracy "
                 f"{scores['mean_accuracy']:.4f}, frequency-weighted IoU {scores['fwiou']:.4f}")
    return "\n".join(lines)
