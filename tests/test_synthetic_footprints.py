"""The synthetic_footprints dataset: deterministic, binary, imbalanced like xView2, learnable."""

import numpy as np
import pytest

from datasets.synthetic_footprints import synthetic_footprints_dataset_builder as footprints
from lcseg.data import get_metadata, open_split, prepare_dataset
from lcseg.data.tfds_builder import TRAIN_COUNTS_KEY

BUILDING = 1


@pytest.fixture(scope="module")
def scenes() -> dict[str, list[dict[str, np.ndarray]]]:
    """Every scene of every split, generated once (about a second)."""
    return {split: [footprints.generate_scene(split, i) for i in range(size)]
            for split, size in footprints.SPLIT_SIZES.items()}


def test_scenes_are_deterministic_and_distinct():
    for split in footprints.SPLIT_SIZES:
        for index in (0, 7):
            first = footprints.generate_scene(split, index)
            second = footprints.generate_scene(split, index)
            for field in ("image", "label"):
                assert first[field].tobytes() == second[field].tobytes(), (split, index)
    # Different (split, index) pairs are different scenes, not one scene repeated.
    images = {footprints.generate_scene(split, index)["image"].tobytes()
              for split in footprints.SPLIT_SIZES for index in range(3)}
    assert len(images) == 3 * len(footprints.SPLIT_SIZES)


def test_labels_are_binary_and_buildings_are_a_small_minority(scenes):
    for split, split_scenes in scenes.items():
        for scene in split_scenes:
            assert scene["image"].shape == (64, 64, 3) and scene["image"].dtype == np.uint8
            assert scene["label"].shape == (64, 64) and scene["label"].dtype == np.uint8
            assert set(np.unique(scene["label"])) <= {0, 1}, split
        fractions = [(scene["label"] == BUILDING).mean() for scene in split_scenes]
        # xView2's imbalance (~5% buildings): 5-10% of each split's pixels, never most of
        # a scene, and some scenes without any building, as in the real dataset.
        assert 0.05 <= np.mean(fractions) <= 0.10, (split, np.mean(fractions))
        assert max(fractions) < 0.25, split
        assert min(fractions) == 0.0, split


def _colour_cells(scene: dict[str, np.ndarray]) -> np.ndarray:
    """Each pixel's cell in an 8x8x8 grid of RGB colours."""
    q = (scene["image"] // 32).astype(np.int64)
    return (q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel()


def test_buildings_are_where_the_roofs_are(scenes):
    # A colour lookup table fitted on the training scenes (a cell is "building" where most
    # of its training pixels are) finds the validation buildings: the labels sit on the
    # painted roofs and roofs contrast with the ground, so a tiny model can learn them.
    cells = np.concatenate([_colour_cells(s) for s in scenes["train"]])
    labels = np.concatenate([s["label"].ravel() for s in scenes["train"]])
    counts = [np.bincount(cells[labels == k], minlength=512) for k in (0, 1)]
    is_building = counts[1] > counts[0]
    predicted = is_building[np.concatenate([_colour_cells(s) for s in scenes["validation"]])]
    truth = np.concatenate([s["label"].ravel() for s in scenes["validation"]]) == BUILDING
    iou = (predicted & truth).sum() / (predicted | truth).sum()
    assert iou > 0.6, iou


def test_prepares_through_lcseg_and_reads_back_the_generated_scenes(tmp_path, scenes):
    meta = get_metadata("synthetic_footprints")
    assert meta.class_names == ("background", "building") and not meta.needs_manual_dir
    # No manual_dir: the registry says nothing needs downloading.
    builder = prepare_dataset("synthetic_footprints", str(tmp_path))
    for split, split_scenes in scenes.items():
        examples = open_split("synthetic_footprints", split, str(tmp_path))
        assert len(examples) == len(split_scenes) == footprints.SPLIT_SIZES[split]
        for position in (0, len(examples) - 1):
            example = examples[position]
            index = int(example["id"].rsplit("_", 1)[1])
            assert example["id"].startswith(split)
            # Lossless PNG: exactly the generated arrays come back.
            np.testing.assert_array_equal(example["image"], split_scenes[index]["image"])
            np.testing.assert_array_equal(example["label"], split_scenes[index]["label"])
    # Class weighting reads the training split's pixel counts from the dataset info.
    expected = np.bincount(np.concatenate([s["label"].ravel() for s in scenes["train"]]),
                           minlength=2)
    assert builder.info.metadata[TRAIN_COUNTS_KEY] == expected.tolist()
