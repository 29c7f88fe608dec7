"""A workdir is never damaged by a later command, and a run that cannot start leaves nothing.

A rerun with a config that changes what the checkpoints hold or mean is refused in one
line naming the fields, before anything is written (config.json and the checkpoints stay
byte-identical and evaluate still works); a resumable change (more steps) resumes and is
recorded. Every failure before training starts (bad values, unknown model or options, a
workdir below a file, a config stage the file lacks) is one ``error:`` line, exit 1, and
creates no file.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from configs import test as test_config
from lcseg import cli, evaluate, optim, train
from lcseg import workdir as workdir_lib
from tests.conftest import run_python
from tests.test_train import tiny_config


def snapshot(folder: str) -> dict[str, str]:
    """Every file under ``folder`` -> the SHA-256 of its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.fixture(scope="module")
def run_dir(synthetic_data_dir, tmp_path_factory) -> str:
    """Two steps of configs/test.py, evaluated and checkpointed at step 2."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(synthetic_data_dir, num_train_steps=2,
                                         eval_every_steps=2, checkpoint_every_steps=2),
                             workdir)
    return workdir


def _fails_cleanly(config, workdir: str, *expected: str) -> str:
    """train_and_evaluate under main.py's wrapper: one error line holding ``expected``."""
    with pytest.raises(SystemExit) as raised:
        with cli.exit_on_bad_input("main.py"):
            train.train_and_evaluate(config, workdir)
    message = str(raised.value.code)
    assert message.startswith("main.py: error: ") and "\n" not in message, message
    for text in expected:
        assert text in message, (text, message)
    return message


def test_a_changed_model_is_refused_and_the_run_stays_usable(run_dir, synthetic_data_dir):
    before = snapshot(run_dir)
    changed = tiny_config(synthetic_data_dir, num_train_steps=2, eval_every_steps=2,
                          checkpoint_every_steps=2, **{"model.channels": (8, 16),
                                                       "learning_rate": 0.5})
    message = _fails_cleanly(changed, run_dir, "model.channels [4, 8] there, [8, 16] now",
                             "learning_rate 0.001 there, 0.5 now", "new --workdir",
                             os.path.join(run_dir, "config.json"))
    assert "num_train_steps" not in message.split("(only")[0]  # Not a difference here.
    assert snapshot(run_dir) == before  # config.json and checkpoints byte-identical
    scores, _ = evaluate.evaluate_checkpoint(run_dir, "validation", "latest")
    assert 0 <= scores["miou"] <= 1


def test_resumable_and_refused_fields(run_dir, synthetic_data_dir):
    saved = workdir_lib.load_config(run_dir)
    # Every field outside the allow-list is refused, e.g. the data's worker count (the
    # iterator's saved position has one entry per worker) and the seed.
    for field, value in [("data.workers", 2), ("seed", 1), ("frozen", ("head",)),
                         ("dataset.name", "loveda"), ("model.name", "unet_base")]:
        config = tiny_config(synthetic_data_dir, **{field: value})
        with pytest.raises(ValueError, match=rf"holds a run trained with another config "
                                             rf"\({field} "):
            workdir_lib.check_config_change(config, run_dir)
    allowed = tiny_config(saved.dataset.data_dir, num_train_steps=9, checkpoint_every_steps=2, **{
        "data.read_ahead": 7, "eval_every_steps": 5})
    changes = workdir_lib.check_config_change(allowed, run_dir)
    assert changes == ["data.read_ahead: 2 -> 7", "eval_every_steps: 2 -> 5",
                       "num_train_steps: 2 -> 9"], changes
    assert all(name in workdir_lib.RESUMABLE_FIELDS for name in
               ("num_train_steps", "eval_every_steps", "data.read_ahead"))


def test_a_workdir_without_checkpoints_accepts_any_config(tmp_path, synthetic_data_dir):
    workdir_lib.save_config(tiny_config(synthetic_data_dir), str(tmp_path))
    other = tiny_config(synthetic_data_dir, **{"model.channels": (8, 16)})
    assert workdir_lib.check_config_change(other, str(tmp_path)) == []  # No error.
    assert os.listdir(tmp_path) == ["config.json"]  # (Written whole: no temporary left.)


def test_more_steps_resume_and_are_recorded(run_dir, synthetic_data_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(run_dir, workdir)
    state = train.train_and_evaluate(
        tiny_config(synthetic_data_dir, num_train_steps=3, eval_every_steps=2,
                    checkpoint_every_steps=2), workdir)
    assert int(state.step) == 3
    assert workdir_lib.load_config(workdir).num_train_steps == 3


@pytest.mark.parametrize("overrides, expected", [
    ({"model.name": "unet_typo"}, "Unknown model 'unet_typo' (config.model.name)"),
    ({"model.name": "swin_fpn"}, "Unknown option(s) ['channels'"),
    ({"learning_rate": -1.0}, "config.learning_rate=-1.0 must be a number >= 0"),
    ({"eval_every_steps": 0}, "config.eval_every_steps=0 must be a positive integer"),
    ({"optimizer": "adamm"}, "Unknown config.optimizer 'adamm'"),
    ({"preemption_signal": "SIGFOO"}, "config.preemption_signal='SIGFOO'"),
])
def test_failures_before_the_start_create_nothing(overrides, expected, synthetic_data_dir,
                                                  tmp_path):
    workdir = tmp_path / "run"
    _fails_cleanly(tiny_config(synthetic_data_dir, **overrides), str(workdir), expected)
    assert not workdir.exists()


def test_a_workdir_below_a_file_is_one_line_and_creates_nothing(synthetic_data_dir, tmp_path):
    a_file = tmp_path / "README.md"
    a_file.write_text("")
    _fails_cleanly(tiny_config(synthetic_data_dir), str(a_file / "x"),
                   f"--workdir {a_file / 'x'}: {a_file} is a file, not a folder")
    assert os.listdir(tmp_path) == ["README.md"]


def test_learning_rate_zero_is_a_valid_run_for_every_schedule():
    config = test_config.get_config()
    config.learning_rate = 0.0
    optim.check_optimizer_config(config)  # Accepted.
    for schedule in optim.SCHEDULES:
        config.schedule = schedule
        rates = [float(optim.learning_rate_schedule(config)(step)) for step in (0, 3, 6)]
        assert rates == [0.0, 0.0, 0.0], (schedule, rates)


def test_a_config_stage_the_file_lacks_is_one_line(tmp_path):
    result = run_python(["main.py", "--config", "configs/test_hypercolumn.py:3",
                         "--workdir", str(tmp_path / "run")], check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in lines if line.startswith("main.py: error: ")]
    assert len(errors) == 1 and "Unknown hypercolumn stage '3'" in errors[0], lines
    assert not (tmp_path / "run").exists()
