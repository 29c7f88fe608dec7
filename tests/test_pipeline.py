"""Dataset reading and the grain input pipeline."""

import numpy as np
import pytest

from lcseg.data import open_split, prepare, train_class_counts
from lcseg.data.augment import resize_example
from lcseg.data.pipeline import eval_batches, train_iterator


def aligned_source(num: int, height: int, width: int) -> list[dict]:
    """Examples whose label is a function of the image, so misalignment is detectable."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(num):
        image = rng.integers(0, 250, (height, width, 3), dtype=np.uint8)
        examples.append({"image": image, "label": (image[..., 0] % 6).astype(np.uint8),
                         "id": str(i)})
    return examples


def test_open_split_returns_decoded_examples(synthetic_data_dir):
    source = open_split("synthetic", "validation", synthetic_data_dir)
    example = source[0]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (128, 128, 3)
    assert example["label"].dtype == np.uint8 and example["label"].shape == (128, 128)
    assert isinstance(example["id"], str) and example["id"].startswith("validation_")
    assert set(np.unique(example["label"])) <= {0, 1, 2, 3, 4, 5, 255}
    assert len(source) == 48


def test_synthetic_dataset_has_all_classes_some_clouds_and_records_counts(synthetic_data_dir):
    source = open_split("synthetic", "train", synthetic_data_dir)
    labels = np.stack([source[i]["label"] for i in range(40)])
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5, 255}
    counts = train_class_counts("synthetic", synthetic_data_dir)
    assert counts.shape == (6,) and np.all(counts > 0)
    assert counts.sum() < 480 * 128 * 128  # clouds are not counted


def test_unknown_split_and_dataset_errors(synthetic_data_dir, tmp_path):
    with pytest.raises(ValueError, match="no split 'val'.*validation"):
        open_split("synthetic", "val", synthetic_data_dir)
    with pytest.raises(ValueError, match="Unknown dataset 'synthtic'.*synthetic"):
        open_split("synthtic", "train", synthetic_data_dir)
    with pytest.raises(FileNotFoundError, match="deepglobe.*manual_dir"):
        prepare("deepglobe", str(tmp_path))


def test_train_batches_keep_image_and_label_aligned():
    source = aligned_source(5, 40, 50)
    iterator = train_iterator(source, batch_size=4, crop_size=24, seed=1)
    for _ in range(6):
        batch = next(iterator)
        assert batch["image"].shape == (4, 24, 24, 3) and batch["label"].shape == (4, 24, 24)
        np.testing.assert_array_equal(batch["label"], batch["image"][..., 0] % 6)


def test_small_images_are_padded_with_ignore_label():
    source = aligned_source(2, 10, 12)
    batch = next(train_iterator(source, batch_size=2, crop_size=16, seed=0))
    padded = batch["label"] == 255
    assert padded.sum() == 2 * (16 * 16 - 10 * 12)
    assert np.all(batch["image"][padded] == 0)


def test_train_iterator_is_deterministic_and_resumes_exactly():
    source = aligned_source(7, 32, 32)
    first = train_iterator(source, batch_size=2, crop_size=16, seed=3)
    batches = [next(first) for _ in range(8)]
    again = train_iterator(source, batch_size=2, crop_size=16, seed=3)
    for _ in range(3):
        next(again)
    state = again.get_state()
    resumed = train_iterator(source, batch_size=2, crop_size=16, seed=3)
    resumed.set_state(state)
    for expected in batches[3:]:
        np.testing.assert_array_equal(next(resumed)["image"], expected["image"])
    other_seed = next(train_iterator(source, batch_size=2, crop_size=16, seed=4))
    assert not np.array_equal(other_seed["image"], batches[0]["image"])


def test_epochs_visit_every_example_once_and_reshuffle():
    source = [{"image": np.full((4, 4, 3), i, np.uint8), "label": np.zeros((4, 4), np.uint8)}
              for i in range(6)]
    iterator = train_iterator(source, batch_size=6, crop_size=4, seed=0)
    epoch1 = sorted(next(iterator)["image"][:, 0, 0, 0].tolist())
    epoch2 = next(iterator)["image"][:, 0, 0, 0].tolist()
    assert epoch1 == list(range(6)) and sorted(epoch2) == list(range(6))


def test_eval_batches_cover_every_pixel_exactly_once():
    source = aligned_source(3, 45, 70)  # not multiples of the tile size
    batches = list(eval_batches(source, batch_size=4, tile_size=32))
    labels = np.concatenate([b["label"] for b in batches])
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
    assert np.sum(labels != 255) == 3 * 45 * 70
    expected = np.concatenate([np.bincount(e["label"].ravel(), minlength=6) for e in source])
    got = np.bincount(labels[labels != 255].ravel(), minlength=6)
    np.testing.assert_array_equal(got, expected.reshape(3, -1).sum(0))



def test_downscale_resizes_examples_before_tiling_and_cropping():
    source = aligned_source(3, 45, 70)
    batches = list(eval_batches(source, batch_size=4, tile_size=16, downscale=0.5))
    labels = np.concatenate([b["label"] for b in batches])
    assert np.sum(labels != 255) == 3 * 23 * 35  # metrics count the downscaled pixels
    image, label = resize_example(source[0]["image"], source[0]["label"], 0.5)
    np.testing.assert_array_equal(batches[0]["image"][0], image[:16, :16])
    np.testing.assert_array_equal(batches[0]["label"][0], label[:16, :16])
    assert set(np.unique(labels)) <= set(range(6)) | {255}  # labels resampled nearest
    batch = next(train_iterator(source, batch_size=3, crop_size=16, seed=0, downscale=0.25))
    assert batch["label"].shape == (3, 16, 16)
    assert np.sum(batch["label"] != 255) == 3 * 11 * 16  # 45 x 70 -> 11 x 18
