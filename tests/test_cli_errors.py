"""What the command-line tools print: one clear line for bad input, quiet library logs.

Bad input to ``lcseg.evaluate``, ``lcseg.lr_finder`` and ``main.py`` (a wrong --workdir,
--split, --checkpoint, a config lacking fields or naming one that does not exist) must
print one ``PROGRAM: error:`` line naming the file, field or value and what to do, exit
non-zero, and show no traceback. A training run must print lcseg's own lines (progress,
per-class tables, where checkpoints went) but not Orbax's, TFDS's or JAX's internals,
unless ``--verbosity`` asks for them.
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
from pathlib import Path

import pytest
from absl import flags

from lcseg import checkpoints, cli, lr_finder
from tests.conftest import run_python
from tests.test_train import tiny_config
from tests.test_workdir_safety import snapshot

# Library lines a training run printed before lcseg.cli (each checked absent): Orbax's
# checkpoint internals, TFDS, JAX's backend probe; TensorFlow's oneDNN notice and C++
# absl's warning (in the training process and every loader worker), Orbax's type-handler
# override and missing-metadata warnings, CLU's hyperparameter dump and metric lines,
# multiprocessing's shared-memory warning.
NOISE = ("CheckpointManagerOptions", "checkpoint_manager.py", "Load dataset info",
         "Unable to initialize backend", "has no dataset_info.json", "async_checkpointer",
         "atomicity.py", "oneDNN", "InitializeLog", "Type handler registry",
         "Metadata file does not exist", "tracked_metric", "[Hyperparameters]",
         "logging_writer.py", "Setting work unit notes", "leaked shared_memory")
MAX_LINE = 160  # Characters of a console line (paths of pytest's folders included).


@pytest.fixture(scope="module")
def trained_run(synthetic_data_dir, tmp_path_factory) -> tuple[str, str]:
    """main.py with configs/test.py for 3 steps (evaluated and checkpointed at 3), with a
    loader worker process (whose start-up printed library lines of its own).

    Returns:
      (workdir, everything the run printed).
    """
    workdir = str(tmp_path_factory.mktemp("run"))
    result = run_python(_train_args(workdir, synthetic_data_dir))
    return workdir, result.stdout + result.stderr


def _train_args(workdir: str, data_dir: str) -> list[str]:
    return ["main.py", "--config", "configs/test.py", "--workdir", workdir,
            f"--config.dataset.data_dir={data_dir}", "--config.num_train_steps=3",
            "--config.eval_every_steps=3", "--config.checkpoint_every_steps=3",
            "--config.data.workers=1"]


def _fails_in_one_line(args: list[str], program: str, *expected: str) -> str:
    """Runs ``python ARGS``; checks exit 1, no traceback, one error line holding ``expected``."""
    result = run_python(args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines()
              if line.startswith(f"{program}: error: ")]
    assert len(errors) == 1, output[-3000:]
    for text in expected:
        assert text in errors[0], (text, errors[0])
    return errors[0]


# ----------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------

def test_training_prints_lcseg_lines_not_library_internals(trained_run):
    workdir, output = trained_run
    for noise in NOISE:
        assert noise not in output, noise
    lines = output.strip().splitlines()
    # The workdir's own path is the user's to make long: counted as a short one.
    lengths = {line: len(line.replace(workdir, "runs/demo")) for line in lines}
    assert max(lengths.values()) <= MAX_LINE, max(lengths, key=lengths.get)
    # lcseg's own lines: progress from the first step, the per-class table, where the
    # checkpoint went, and a summary line last.
    assert " step 1/3 (33%), loss " in output
    assert re.search(r" step 3/3 \(100%\), [0-9.]+ steps/s, ETA \w+, loss [0-9.]+", output)
    assert "Step 3, validation:" in output and "frequency-weighted IoU" in output
    assert f"Saving the checkpoint of step 3 to {workdir}" in output
    assert re.search(r" Finished at step 3, best validation mIoU [0-9.]+ at step 3; "
                     rf"checkpoints in {re.escape(workdir)}/checkpoints$", lines[-1]), lines[-1]


def test_rerunning_a_finished_run_says_so_and_changes_nothing(trained_run,
                                                              synthetic_data_dir):
    workdir, _ = trained_run
    before = snapshot(workdir)
    result = run_python(_train_args(workdir, synthetic_data_dir))
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 2, lines
    assert " Already finished at step 3, best validation mIoU" in lines[0]
    assert lines[1].endswith(" To train longer, raise --config.num_train_steps (now 3).")
    assert all(len(line.replace(workdir, "runs/demo")) <= MAX_LINE for line in lines), lines
    assert snapshot(workdir) == before


def test_a_changed_config_is_refused_in_one_line(trained_run, synthetic_data_dir):
    workdir, _ = trained_run
    before = snapshot(workdir)
    _fails_in_one_line([*_train_args(workdir, synthetic_data_dir),
                        "--config.model.channels=(8,16)"], "main.py",
                       f"{workdir} holds a run trained with another config",
                       "model.channels [4, 8] there, [8, 16] now", "new --workdir")
    assert snapshot(workdir) == before  # (the evaluate tests below use it as it was)


def test_lr_finder_reports_progress_and_frees_its_workers_shared_memory(synthetic_data_dir,
                                                                       tmp_path):
    result = run_python(["-m", "lcseg.lr_finder", "--config", "configs/test.py",
                         "--workdir", str(tmp_path / "lr"), "--steps=3",
                         f"--config.dataset.data_dir={synthetic_data_dir}",
                         "--config.data.workers=1"])
    output = result.stdout + result.stderr
    # Not a terminal, and lines all the same. 3 steps end mid-round (2 crops per image):
    # the round's images were still held, in the worker's shared memory.
    assert " step 1/3 (33%), lr 1e-06, loss " in output
    assert " step 3/3 (100%), " in output and "Suggested learning rate" in output
    for noise in NOISE:
        assert noise not in output, noise


def test_library_noise_filter():
    quiet = cli.LibraryNoiseFilter()

    def record(path: str, level: int, msg: str = "something") -> logging.LogRecord:
        return logging.LogRecord("absl", level, path, 1, msg, (), None)

    site = "/venv/lib/python3.11/site-packages"
    assert not quiet.filter(record(f"{site}/orbax/checkpoint/checkpoint_manager.py",
                                   logging.INFO))
    assert not quiet.filter(record(f"{site}/jax/_src/xla_bridge.py", logging.INFO))
    assert not quiet.filter(record(f"{site}/tensorflow_datasets/core/utils/file_utils.py",
                                   logging.WARNING, "Variant folder %s has no %s"))
    # Other library warnings and errors, and everything of lcseg's, pass.
    assert quiet.filter(record(f"{site}/tensorflow_datasets/core/dataset_builder.py",
                               logging.WARNING))
    assert quiet.filter(record(f"{site}/orbax/checkpoint/checkpoint_manager.py", logging.ERROR))
    assert quiet.filter(record("/work/lcseg/train.py", logging.INFO))
    assert quiet.filter(record("/work/lcseg/checkpoints.py", logging.DEBUG))


# ----------------------------------------------------------------------------------------
# lcseg.evaluate
# ----------------------------------------------------------------------------------------

def test_evaluate_workdir_without_a_run(tmp_path):
    _fails_in_one_line(["-m", "lcseg.evaluate", "--workdir", str(tmp_path / "nowhere")],
                       "lcseg.evaluate", f"{tmp_path / 'nowhere' / 'config.json'} not found",
                       "training workdir")


def test_evaluate_unknown_split(trained_run):
    workdir, _ = trained_run
    _fails_in_one_line(["-m", "lcseg.evaluate", "--workdir", workdir, "--split", "tset"],
                       "lcseg.evaluate", "no split 'tset'", "'test'", "'validation'")


def test_evaluate_missing_checkpoint_step(trained_run):
    workdir, _ = trained_run
    _fails_in_one_line(["-m", "lcseg.evaluate", "--workdir", workdir, "--checkpoint", "99"],
                       "lcseg.evaluate", "No checkpoint for step 99",
                       os.path.join(workdir, "checkpoints"), "available: [3]")


def test_verbosity_asks_for_tracebacks_and_library_logs(monkeypatch):
    monkeypatch.setattr(flags.FLAGS["verbosity"], "present", 1)
    assert cli.quiet_library_logs() is False
    with pytest.raises(ValueError, match="bad"):  # Propagates, traceback and all.
        with cli.exit_on_bad_input("lcseg.evaluate"):
            raise ValueError("bad")


def test_evaluate_bad_checkpoint_or_no_checkpoints(trained_run, tmp_path):
    workdir, _ = trained_run
    # In-process: the same wrapper evaluate's main uses (a subprocess per case is slow).
    reader = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    with pytest.raises(SystemExit, match=r"^lcseg.evaluate: error: --checkpoint must be "
                                         r"'best', 'latest' or a step number, got 'lastest'"):
        with cli.exit_on_bad_input("lcseg.evaluate"):
            reader.resolve_step("lastest")
    empty = checkpoints.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    with pytest.raises(SystemExit, match=r"No checkpoint in .*checkpoints: train first"):
        with cli.exit_on_bad_input("lcseg.evaluate"):
            empty.resolve_step("best")


# ----------------------------------------------------------------------------------------
# lcseg.lr_finder (and main.py, which loads --config the same way)
# ----------------------------------------------------------------------------------------

def test_lr_finder_config_lacking_fields(tmp_path):
    partial = tmp_path / "partial.py"
    partial.write_text(textwrap.dedent("""
        from configs import test

        def get_config():
            config = test.get_config()
            del config["dataset"]["train_split"]
            del config["learning_rate"]
            return config
    """))
    _fails_in_one_line(["-m", "lcseg.lr_finder", "--config", str(partial),
                        "--workdir", str(tmp_path / "lr")],
                       "lcseg.lr_finder", str(partial), "learning_rate",
                       "dataset.train_split", "configs.default.get_config()")
    assert not (tmp_path / "lr").exists()  # Checked before anything was made.


def test_lr_finder_unknown_config_override(tmp_path):
    _fails_in_one_line(["-m", "lcseg.lr_finder", "--config", "configs/test.py",
                        "--workdir", str(tmp_path / "lr"), "--config.dataset.nmae=loveda"],
                       "lcseg.lr_finder", "--config.dataset.nmae", "no field 'nmae'",
                       "configs/default.py")


def test_main_missing_config_file(tmp_path):
    _fails_in_one_line(["main.py", "--config", str(tmp_path / "unet.py"),
                        "--workdir", str(tmp_path / "run")],
                       "main.py", f"--config {tmp_path / 'unet.py'}: no such file")


def test_lr_finder_bad_options(synthetic_data_dir, tmp_path):
    config = tiny_config(synthetic_data_dir)
    options = dict(min_lr=1e-5, max_lr=1.0, steps=10, divergence=4.0)
    lr_finder.check_arguments(config, str(tmp_path / "ok"), where="c.py", **options)
    for bad, message in [(dict(min_lr=1.0, max_lr=0.1), "--min_lr=1 and --max_lr=0.1"),
                         (dict(steps=1), "--steps=1"), (dict(divergence=0.5), "--divergence")]:
        with pytest.raises(ValueError, match=message):
            lr_finder.check_arguments(config, str(tmp_path / "ok"), where="c.py",
                                      **{**options, **bad})
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(ValueError, match=rf"--workdir {a_file}: {a_file} is a file, not a folder"):
        lr_finder.check_arguments(config, str(a_file), where="c.py", **options)
    unknown = tiny_config(synthetic_data_dir, **{"dataset.name": "deepglob"})
    with pytest.raises(SystemExit, match=r"lcseg.lr_finder: error: Unknown dataset "
                                         r"'deepglob' \(config.dataset.name\)"):
        with cli.exit_on_bad_input("lcseg.lr_finder"):
            lr_finder.run(unknown, str(tmp_path / "lr"), steps=2)
    assert not (tmp_path / "lr").exists()  # Made only once the sweep can run.


def test_every_shipped_config_has_every_field():
    configs_dir = Path(__file__).parent.parent / "configs"
    import importlib

    for path in sorted(configs_dir.glob("*.py")):
        module = importlib.import_module(f"configs.{path.stem}")
        if hasattr(module, "get_config") and path.stem not in ("test_models",):
            assert lr_finder.missing_fields(module.get_config()) == [], path
