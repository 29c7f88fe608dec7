"""The confusion-matrix metric and the scores derived from it, against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcseg import parallel
from lcseg.data.pipeline import EvalBatches, LoaderOptions, empty_batch
from lcseg.experiment import eval_step, evaluate_batches
from lcseg.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    per_image_scores,
    scores_from_confusion,
    tile_confusion_matrices,
    write_scores_json,
)


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


# ---------------------------------------------------------------------------------------
# Per-image IoU: an extra score, never the default.
# ---------------------------------------------------------------------------------------


def numpy_per_image_iou(labels, predictions, num_classes, ignore_label=255):
    """Reference in float64 from whole images, written from the definition.

    For each image and each class in its ground truth: IoU = TP / (TP + FP + FN) over the
    image's labelled pixels; per class, the mean over the images containing it; the mean
    IoU, over the classes that some image contains.
    """
    per_class = [[] for _ in range(num_classes)]
    for label, prediction in zip(labels, predictions):
        labelled = label != ignore_label
        for c in range(num_classes):
            truth = labelled & (label == c)
            if not truth.any():
                continue
            predicted = labelled & (prediction == c)
            intersection = np.sum(truth & predicted, dtype=np.float64)
            per_class[c].append(intersection / np.sum(truth | predicted, dtype=np.float64))
    iou = np.array([np.mean(v) if v else np.nan for v in per_class], np.float64)
    return iou, float(np.nanmean(iou)), np.array([len(v) for v in per_class])


def example_images(num_classes=5, seed=0):
    """Images of different sizes and contents, and predictions 70% right.

    Class 4 is never in the ground truth but is predicted (split-level IoU 0, no
    per-image IoU); class 3 is in one image only; some pixels are ignored.
    """
    rng = np.random.default_rng(seed)
    labels, predictions = [], []
    for (height, width), classes in [((40, 33), [0, 1, 2]), ((16, 16), [0, 1]),
                                     ((20, 50), [1, 2, 3]), ((7, 9), [2])]:
        label = rng.choice(classes, (height, width)).astype(np.uint8)
        label[rng.random(label.shape) < 0.1] = 255
        prediction = np.where(rng.random(label.shape) < 0.7, label,
                              rng.integers(0, num_classes, label.shape)).astype(np.uint8)
        prediction[label == 255] = rng.integers(0, num_classes)
        labels.append(label)
        predictions.append(prediction)
    return labels, predictions


def test_tile_confusion_matrices_are_each_tiles_own():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (6, 9, 7)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.2] = 255
    predictions = rng.integers(0, 4, labels.shape)
    matrices = jax.jit(tile_confusion_matrices, static_argnames="num_classes")(
        jnp.asarray(labels), jnp.asarray(predictions), num_classes=4)
    assert matrices.shape == (6, 4, 4)
    for tile in range(6):
        np.testing.assert_array_equal(matrices[tile],
                                      numpy_confusion(labels[tile], predictions[tile], 4))


def test_per_image_scores_against_a_float64_reference():
    labels, predictions = example_images()
    matrices = np.stack([numpy_confusion(label, prediction, 5)
                         for label, prediction in zip(labels, predictions)])
    scores = per_image_scores(matrices)
    iou, miou, images = numpy_per_image_iou(labels, predictions, 5)
    np.testing.assert_allclose(scores["iou_per_image"], iou, rtol=1e-12)
    assert np.isnan(scores["iou_per_image"][4])  # in no image's ground truth
    assert scores["miou_per_image"] == pytest.approx(miou, rel=1e-12)
    np.testing.assert_array_equal(scores["images_per_class"], [2, 3, 3, 1, 0])
    np.testing.assert_array_equal(images, scores["images_per_class"])
    # A different number from the split-level mIoU (which counts class 4 as 0 and weighs
    # images by their pixels), so mixing them up shows.
    assert abs(scores["miou_per_image"] - scores_from_confusion(matrices.sum(0))["miou"]) > 0.05


def fake_state(num_classes):
    """A train state whose model predicts the class written in the image's red channel."""
    import optax

    from lcseg.experiment import TrainState

    def apply_fn(variables, images, *, train):
        del variables, train
        classes = jnp.round(images[..., 0]).astype(jnp.int32)
        return 10.0 * jax.nn.one_hot(classes, num_classes)

    return TrainState.create(apply_fn=apply_fn, params={}, tx=optax.identity(),
                             batch_stats={}, rng=jax.random.key(0), ema_params=None,
                             tracker={})


def tiled_batches(labels, predictions, *, tile, batch_size, with_index=True):
    """Eval batches as ``pipeline.EvalBatches`` makes them, plus each tile's image index."""
    from lcseg.data.pipeline import image_tiles

    tiles = []
    for index, (label, prediction) in enumerate(zip(labels, predictions)):
        image = np.repeat(prediction[..., None], 3, axis=-1)  # red = the predicted class
        tiles += [(image_tile, label_tile, index)
                  for image_tile, label_tile in image_tiles(image, label, tile)]
    while len(tiles) % batch_size:  # the last batch completed with ignored tiles
        tiles.append((np.zeros_like(tiles[0][0]), np.full_like(tiles[0][1], 255), -1))
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start:start + batch_size]
        batch = {"image": np.stack([t[0] for t in chunk]),
                 "label": np.stack([t[1] for t in chunk])}
        if with_index:
            batch["image_index"] = np.array([t[2] for t in chunk], np.int32)
        yield batch


@pytest.mark.parametrize("with_index", [True, False])
def test_evaluate_adds_per_image_scores_and_keeps_the_split_scores(with_index, tmp_path):
    import functools
    import json

    from lcseg import parallel
    from lcseg.data.pipeline import empty_batch
    from lcseg.experiment import eval_step, evaluate_batches

    num_classes, tile, batch_size = 5, 16, 8
    labels, predictions = example_images(num_classes)
    mesh = parallel.make_mesh()
    step = jax.jit(functools.partial(
        eval_step, loss_fn=lambda logits, labels: (jnp.zeros(()), None),
        mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, dtype=jnp.float32,
        num_classes=num_classes))
    empty = empty_batch(batch_size, tile)
    if with_index:
        empty["image_index"] = np.full(batch_size, -1, np.int32)
    scores = evaluate_batches(step, fake_state(num_classes),
                      tiled_batches(labels, predictions, tile=tile, batch_size=batch_size,
                                    with_index=with_index),
                      mesh=mesh, empty_batch=empty, num_classes=num_classes)

    # The default scores: one confusion matrix over the split, as before.
    split = sum(numpy_confusion(label, prediction, num_classes)
                for label, prediction in zip(labels, predictions))
    np.testing.assert_array_equal(scores["confusion_matrix"], split)
    assert scores["miou"] == pytest.approx(scores_from_confusion(split)["miou"], rel=1e-12)
    write_scores_json(str(tmp_path / "scores.json"), scores, list("abcde"), split="val")
    report = json.loads((tmp_path / "scores.json").read_text())
    if not with_index:
        assert "miou_per_image" not in scores and "miou_per_image" not in report
        return
    # Tiles of each image gathered back into it (19 tiles, 9 of the first image, in three
    # batches, the second and third sharing an image), then scored per image.
    iou, miou, images = numpy_per_image_iou(labels, predictions, num_classes)
    np.testing.assert_allclose(scores["iou_per_image"], iou, rtol=1e-12)
    assert scores["miou_per_image"] == pytest.approx(miou, rel=1e-12)
    assert report["miou_per_image"] == pytest.approx(miou, rel=1e-12)
    assert report["iou_per_image"]["e"] is None  # NaN: class 4 is in no image
    assert report["images_per_class"] == dict(zip("abcde", images.tolist()))
    assert report["miou"] == pytest.approx(scores_from_confusion(split)["miou"], rel=1e-12)


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_batches_give_per_image_scores(workers):
    """The loader's tile image indices, through evaluate, give per-image IoU."""
    labels, predictions = example_images()
    source = [{"image": np.repeat(p[..., None], 3, -1), "label": label}
              for label, p in zip(labels, predictions)]
    loader = EvalBatches(source, batch_size=8, tile_size=16,
                         loader=LoaderOptions(workers=workers) if workers else None)
    step = jax.jit(functools.partial(
        eval_step, loss_fn=lambda logits, labels: (jnp.zeros(()), None),
        mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3, dtype=jnp.float32, num_classes=5))
    for _ in range(2):  # the loader serves repeated evaluations
        scores = evaluate_batches(step, fake_state(5), loader(), mesh=parallel.make_mesh(),
                          empty_batch=empty_batch(8, 16), num_classes=5)
        iou, miou, _ = numpy_per_image_iou(labels, predictions, 5)
        np.testing.assert_allclose(scores["iou_per_image"], iou, rtol=1e-12)
        assert scores["miou_per_image"] == pytest.approx(miou, rel=1e-12)
