"""Segmentation metrics from one dataset-level confusion matrix.

The protocol of all three benchmarks: accumulate a single confusion matrix over the whole
split (ignored pixels dropped before counting), then derive every score from it. Per-image
averaging gives different, non-comparable numbers and is not offered.

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
        "confusion_matrix": np.asarray(scores["confusion_matrix"]).tolist(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)  # Never a half-written report.
