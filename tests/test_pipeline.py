"""Dataset reading and the grain input pipeline."""

import os
import time

import jax
import numpy as np
import pytest

from lcseg.data import open_split, prepare_dataset, train_class_counts
from lcseg.data.augment import resize_example
from lcseg.data.pipeline import EvalBatches, LoaderOptions, eval_batches, train_iterator


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
        prepare_dataset("deepglobe", str(tmp_path))


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


def coordinate_source(num: int, height: int, width: int) -> list[dict]:
    """Examples whose pixels name their image (channel 0) and position (channels 1, 2)."""
    rows, columns = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return [{"image": np.stack([np.full((height, width), i), rows, columns], -1).astype(np.uint8),
             "label": np.full((height, width), i % 6, np.uint8), "id": str(i)}
            for i in range(num)]


def test_each_image_gives_its_crops_every_epoch_to_batches_of_different_images():
    num, batch_size, crops = 6, 3, 4
    source = coordinate_source(num, 20, 30)
    iterator = train_iterator(source, batch_size=batch_size, crop_size=8, seed=0,
                              crops_per_image=crops)
    for _ in range(3):  # epochs
        batches = [next(iterator) for _ in range(num * crops // batch_size)]
        ids = np.stack([b["image"][:, 0, 0, 0] for b in batches])  # [batch, slot]
        np.testing.assert_array_equal(np.bincount(ids.ravel(), minlength=num), crops)
        for b in batches:  # every batch: different images, labels aligned
            assert len(set(b["image"][:, 0, 0, 0].tolist())) == batch_size
            np.testing.assert_array_equal(b["label"], b["image"][..., 0] % 6)
        # The crops an image gives are independent draws: not all at one position.
        positions = {(int(b["image"][0, 0, 0, 1]), int(b["image"][0, 0, 0, 2]))
                     for b in batches[:crops]}
        assert len(positions) > 1


@pytest.mark.parametrize("ops", [("random_crop",), ("random_crop", "flips")])
def test_the_crops_of_one_image_are_at_different_positions(ops):
    # Each crop's position is read from its pixels (channels 1, 2 hold the row and column:
    # their minimum is the crop's top-left corner whatever the flips), and the crop must
    # be the image's window there, up to a flip (numpy slicing as the reference). 8 crops
    # of 8x8 from a 40x40 image: 33^2 positions, so 8 draws at one position (or in one
    # row, or one column) happen with probability below 1e-10 if positions are random.
    crops, size = 8, 8
    source = coordinate_source(4, 40, 40)
    iterator = train_iterator(source, batch_size=4, crop_size=size, seed=0,
                              crops_per_image=crops, augment={"ops": ops})
    for _ in range(2):  # rounds
        batches = [next(iterator) for _ in range(crops)]
        for slot in range(4):
            image = source[int(batches[0]["image"][slot, 0, 0, 0])]["image"]
            corners = []
            for batch in batches:
                crop = batch["image"][slot]
                top, left = int(crop[..., 1].min()), int(crop[..., 2].min())
                window = image[top:top + size, left:left + size]
                assert any(np.array_equal(crop, flipped) for flipped in
                           (window, window[::-1], window[:, ::-1], window[::-1, ::-1]))
                corners.append((top, left))
            assert len({top for top, _ in corners}) > 1, corners
            assert len({left for _, left in corners}) > 1, corners


def test_crops_cover_every_pixel_of_every_image_over_epochs():
    # 3 x 5 crop positions per image, 200 crops each: a corner (one position) is missed
    # with probability (14/15)**200 ~ 1e-6.
    num, height, width = 3, 18, 20
    source = coordinate_source(num, height, width)
    iterator = train_iterator(source, batch_size=3, crop_size=16, seed=1, crops_per_image=4)
    covered = np.zeros((num, height, width), bool)
    for _ in range(200):
        images = next(iterator)["image"].reshape(-1, 3)
        covered[images[:, 0], images[:, 1], images[:, 2]] = True
    assert covered.all()


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_multi_crop_stream_resumes_exactly_at_any_point_of_a_round(position):
    source = aligned_source(5, 30, 30)
    options = dict(batch_size=2, crop_size=12, seed=7, crops_per_image=3)
    batches = [next(it) for it in [train_iterator(source, **options)] for _ in range(9)]
    interrupted = train_iterator(source, **options)
    for _ in range(position):
        next(interrupted)
    resumed = train_iterator(source, **options)
    resumed.set_state(interrupted.get_state())
    for expected in batches[position:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])


def test_global_batches_do_not_depend_on_the_number_of_processes(monkeypatch):
    source = aligned_source(7, 20, 20)
    options = dict(batch_size=4, crop_size=8, seed=2, crops_per_image=2)

    def global_batches(process_count: int) -> list[np.ndarray]:
        local = []
        for index in range(process_count):
            monkeypatch.setattr(jax, "process_count", lambda: process_count)
            monkeypatch.setattr(jax, "process_index", lambda index=index: index)
            iterator = train_iterator(source, **options)
            local.append([next(iterator)["image"] for _ in range(6)])
        # Slot s of a global batch is slot s // P of process s % P.
        return [np.stack([local[s % process_count][step][s // process_count]
                          for s in range(4)]) for step in range(6)]

    single = global_batches(1)
    for process_count in (2, 4):
        for one, many in zip(single, global_batches(process_count)):
            np.testing.assert_array_equal(one, many)


def test_workers_give_the_same_stream_and_resume_mid_round():
    source = aligned_source(6, 24, 24)
    options = dict(batch_size=2, crop_size=8, seed=5, crops_per_image=2,
                   loader=LoaderOptions(workers=2))
    in_process = train_iterator(source, **{**options, "loader": None})
    expected = [next(in_process) for _ in range(7)]
    with_workers = train_iterator(source, **options)
    for batch in expected[:3]:
        np.testing.assert_array_equal(next(with_workers)["image"], batch["image"])
    resumed = train_iterator(source, **options)
    resumed.set_state(with_workers.get_state())
    for batch in expected[3:]:
        np.testing.assert_array_equal(next(resumed)["image"], batch["image"])


def test_eval_batches_with_workers_are_the_same_and_the_loader_is_reusable():
    source = aligned_source(5, 45, 70)
    expected = list(eval_batches(source, batch_size=4, tile_size=32))
    loader = EvalBatches(source, batch_size=4, tile_size=32, loader=LoaderOptions(workers=2))
    for _ in range(2):  # two evaluations through the same workers
        got = list(loader())
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    next(loader())  # an abandoned pass...
    assert len(list(loader())) == len(expected)  # ...does not shift the next one


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_loader_memory_stays_bounded_with_a_slow_consumer():
    # 1 MiB per element (4 crops of 256x256 RGB + label); grain's defaults would read
    # up to 500 elements ahead per loader process.
    source = aligned_source(8, 300, 300)
    iterator = train_iterator(source, batch_size=2, crop_size=256, seed=0, crops_per_image=4,
                              loader=LoaderOptions(read_threads=2, read_ahead=2))
    next(iterator)
    before = _resident_bytes()
    time.sleep(3)  # a slow consumer: the loader may only read its bounded amount ahead
    next(iterator)
    grown = _resident_bytes() - before
    # The bound of LoaderOptions' docstring: (read_ahead + read_threads + 2) elements,
    # plus a full image per thread; 24 MiB leaves room for allocator slack.
    assert grown < 24 * 2**20, f"loader grew by {grown / 2**20:.0f} MiB"
