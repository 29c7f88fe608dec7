"""The confusion-matrix metric and the scores derived from it, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcseg.metrics import ConfusionMatrix, confusion_matrix, scores_from_confusion


def numpy_confusion(labels, predictions, num_classes, ignore_label=255):
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for true, pred in zip(labels.ravel(), predictions.ravel()):
        if true != ignore_label:
            matrix[true, pred] += 1
    return matrix


def test_confusion_matrix_matches_numpy_and_skips_ignored_pixels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 17, 13)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255
    predictions = rng.integers(0, 5, labels.shape)
    matrix = jax.jit(confusion_matrix, static_argnames="num_classes")(
        jnp.asarray(labels), jnp.asarray(predictions), num_classes=5)
    np.testing.assert_array_equal(np.asarray(matrix), numpy_confusion(labels, predictions, 5))
    assert int(np.asarray(matrix).sum()) == int(np.sum(labels != 255))


def test_confusion_metric_merges_in_int64_on_host():
    big = ConfusionMatrix(matrix=np.full((2, 2), 2**31 - 1, np.int32))
    merged = ConfusionMatrix.empty(2).merge(big).merge(big)
    assert merged.compute().dtype == np.int64
    assert merged.compute()[0, 0] == 2 * (2**31 - 1)


def test_scores_against_hand_computed_values():
    # Rows: true class; columns: predicted class. Class 2 absent from truth and prediction.
    matrix = np.array([[8, 2, 0],
                       [1, 4, 0],
                       [0, 0, 0]])
    scores = scores_from_confusion(matrix)
    np.testing.assert_allclose(scores["iou"][:2], [8 / 11, 4 / 7])
    assert np.isnan(scores["iou"][2])  # 0/0: reported as NaN, excluded from the mean
    assert scores["miou"] == pytest.approx((8 / 11 + 4 / 7) / 2)
    np.testing.assert_allclose(scores["precision"][:2], [8 / 9, 4 / 6])
    np.testing.assert_allclose(scores["recall"][:2], [8 / 10, 4 / 5])
    np.testing.assert_allclose(scores["f1"][:2], [16 / 19, 8 / 11])
    assert scores["accuracy"] == pytest.approx(12 / 15)
    assert scores["mean_accuracy"] == pytest.approx((0.8 + 0.8) / 2)
    assert scores["fwiou"] == pytest.approx(10 / 15 * 8 / 11 + 5 / 15 * 4 / 7)


def test_class_missing_from_truth_but_predicted_scores_zero():
    matrix = np.array([[5, 5], [0, 0]])
    scores = scores_from_confusion(matrix)
    assert scores["iou"][1] == 0.0  # false positives only: IoU 0, counted in the mean
    assert scores["miou"] == pytest.approx(0.25)
