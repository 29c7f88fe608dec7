"""Training end to end on each real dataset's fake download, as a user runs it.

For DeepGlobe, LoveDA and LandCover.ai: write the fake archives (tests/fake_archives.py)
into a ``manual_dir``, then run ``main.py`` with the dataset's own config
(configs/unet_<name>.py) shrunk by command-line overrides. Training must prepare the
dataset itself from ``config.dataset.manual_dir``, train, evaluate and checkpoint.
LoveDA's run is also evaluated with ``python -m lcseg.evaluate`` on its ``validation``
alias.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from lcseg.data import get_metadata
from tests import fake_archives
from tests.conftest import run_python

WRITERS = {
    "deepglobe": fake_archives.write_deepglobe,
    "loveda": fake_archives.write_loveda,
    "landcoverai": fake_archives.write_landcoverai,
}

# The real configs' model, batches and schedule shrunk to seconds on a CPU. Fake images
# are 32 px (LoveDA) or more: a 32 px crop fits; 64 px eval tiles are padded.
TINY = ["--config.model.channels=(4,8)", "--config.model.convs_per_level=1",
        "--config.batch_size=2", "--config.eval_batch_size=2", "--config.crop_size=32",
        "--config.eval_tile_size=64", "--config.num_train_steps=2",
        "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
        "--config.log_every_steps=1", "--config.warmup_steps=1", "--config.num_panel_images=1",
        "--config.data.workers=0", "--config.half_precision=False"]


def _train(name: str, tmp_path: Path) -> tuple[Path, fake_archives.FakeDataset]:
    """Writes ``name``'s fake download and trains on it via main.py: (workdir, fake)."""
    fake = WRITERS[name](tmp_path / "manual")
    workdir = tmp_path / "run"
    run_python(["main.py", "--config", f"configs/unet_{name}.py", "--workdir", str(workdir),
                f"--config.dataset.manual_dir={fake.manual_dir}",
                f"--config.dataset.data_dir={tmp_path / 'data'}", *TINY])
    return workdir, fake


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_training_prepares_and_trains_each_dataset(name, tmp_path):
    workdir, fake = _train(name, tmp_path)
    # Training prepared the dataset from the manual dir.
    assert list((tmp_path / "data").glob(f"lcseg_{name}/*/dataset_info.json"))
    with open(workdir / "config.json") as f:
        config = json.load(f)
    assert config["dataset"]["name"] == name and config["model"]["channels"] == [4, 8]
    assert (workdir / "checkpoints" / "2").is_dir()
    # The step-2 evaluation on the validation split wrote per-class scores.
    accumulator = event_accumulator.EventAccumulator(
        str(workdir), size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["tensors"])
    expected = {"eval/miou", "eval/panels",
                *(f"eval/iou/{c}" for c in get_metadata(name).class_names)}
    assert expected <= tags, expected - tags
    assert [event.step for event in accumulator.Tensors("eval/miou")] == [2]

    if name == "loveda":  # The evaluate command, on a split alias (both domains).
        result = run_python(["-m", "lcseg.evaluate", "--workdir", str(workdir),
                             "--split", "validation", "--checkpoint", "latest"])
        assert "mean" in result.stdout and "agriculture" in result.stdout
        with open(workdir / "eval" / "validation-2.json") as f:
            report = json.load(f)
        assert report["split"] == "validation" and report["step"] == 2
        labelled = sum(int((fake.labels[i] != 255).sum()) for i in fake.splits["validation"])
        assert sum(map(sum, report["confusion_matrix"])) == labelled
