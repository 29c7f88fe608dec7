"""Predicting a region: shares across processes, resuming, skipping, failures, exit codes.

``python -m lcseg.predict`` runs in subprocesses as a cluster runs it: two jax.distributed
processes on 127.0.0.1 share five scenes of mixed sizes; a run stopped by SIGTERM, then one
SIGKILLed in the middle of a scene, are resumed; a corrupt scene sits among good ones.
Their outputs are compared, pixel for pixel, with one uninterrupted single-process run.
The share and skip decisions are also tested in-process with a per-pixel model.
"""

import json
import os
import shutil
import signal
import warnings

import numpy as np
import pytest
import rasterio

from lcseg import preemption, train
from lcseg.predict import region
from lcseg.provenance import provenance
from tests.conftest import run_python
from tests.test_predict import make_predictor, random_image, write_geotiff
from tests.test_preemption import _finish, _start, _wait_for
from tests.test_train import _free_port, tiny_config

# Five scenes of mixed sizes, at different places of one grid. The large one, in the
# middle of the (sorted) list, takes seconds: signals land while it is being predicted.
SCENES = {"a": (300, 200), "b": (90, 100), "c_large": (1100, 1000), "d": (180, 180),
          "e": (40, 40)}
LARGE = "c_large"


def write_scenes(folder, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names or SCENES):
        height, width = SCENES[name]
        bands = np.transpose(random_image(height, width, seed=10 + i), (2, 0, 1))
        write_geotiff(folder / f"{name}.tif", bands)
    return folder


def predict_args(workdir, inputs, output, *extra):
    return ["-m", "lcseg.predict", "--workdir", str(workdir), "--input", str(inputs),
            "--output", str(output), "--probabilities", "uint8", *extra]


def read_outputs(folder, names=SCENES):
    """Every pixel of every output of ``names`` in ``folder``."""
    arrays = {}
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)  # the PNGs
    for name in names:
        for kind in ("classes.tif", "probabilities.tif", "colour.png"):
            with rasterio.open(folder / f"{name}_{kind}") as dataset:
                arrays[f"{name}_{kind}"] = dataset.read()
    return arrays


def assert_same_outputs(folder, reference, names=SCENES):
    found, expected = read_outputs(folder, names), read_outputs(reference, names)
    for key in expected:
        np.testing.assert_array_equal(found[key], expected[key], err_msg=key)


def leftovers(folder):
    """Temporary or partial files (hidden names) anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def summaries(folder):
    return {s["shard"]: s for s in region.read_summaries(folder)}


def scene_names(entries):
    return sorted(os.path.basename(entry["scene"])[:-4] for entry in entries)


@pytest.fixture(scope="module")
def workdir(synthetic_data_dir, tmp_path_factory):
    """A tiny run (configs/test.py, 6 steps): its latest checkpoint is step 6."""
    path = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(synthetic_data_dir), path)
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scenes(tmp_path_factory.mktemp("scenes"))


@pytest.fixture(scope="module")
def reference(workdir, scenes, tmp_path_factory):
    """One uninterrupted single-process run over the five scenes."""
    output = tmp_path_factory.mktemp("reference")
    run_python(predict_args(workdir, scenes, output))
    return output


# ---------------------------------------------------------------------------------------
# Shares.
# ---------------------------------------------------------------------------------------


def test_shares_come_from_flags_job_arrays_and_jax_distributed():
    resolve = region.resolve_shard
    assert resolve(environ={}) == region.Shard(0, 1, "one process")
    assert resolve(shard="2/5", environ={}) == region.Shard(2, 5, "--shard")
    # A SLURM array --array=1-9:2 (ids 1, 3, 5, 7, 9): id 5 is the third task.
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "5",
             "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}
    assert resolve(environ=slurm) == region.Shard(2, 5, "SLURM job array")
    # An explicit --shard wins over the environment.
    assert resolve(shard="0/2", environ=slurm) == region.Shard(0, 2, "--shard")
    kubernetes = {"JOB_COMPLETION_INDEX": "3"}
    assert resolve(shard="/4", environ=kubernetes) == region.Shard(
        3, 4, "Kubernetes indexed Job")
    assert resolve(shard_count=4, environ=kubernetes).index == 3
    assert resolve(process=(1, 2), environ=slurm) == region.Shard(1, 2, "jax.distributed")
    for kwargs, message in [
            (dict(shard="5/5"), "0 <= I < N"), (dict(shard="x"), "give I/N"),
            (dict(shard="/3"), "no JOB_COMPLETION_INDEX"),
            (dict(environ=kubernetes), "give --shard=/N"),
            (dict(shard="/2", environ=kubernetes), "not below the count"),
            (dict(shard="0/2", process=(0, 2)), "give no --shard"),
            (dict(environ={**slurm, "SLURM_ARRAY_TASK_ID": "4"}), "evenly spaced")]:
        with pytest.raises(ValueError, match=message):
            resolve(**{"environ": {}, **kwargs})


def test_shares_balance_pixels_and_hold_every_scene_once():
    rng = np.random.default_rng(0)
    paths = [f"scene{i:03d}.tif" for i in range(40)]
    # Sizes from 1 to 400 Mpx: ten scenes per share would be far off.
    pixels = [int(x) for x in rng.integers(1, 400, 40) * 1_000_000]
    shares = region.assign_shares(paths, pixels, 4)
    assert sorted(p for share in shares for p in share) == paths
    size = dict(zip(paths, pixels))
    totals = [sum(size[p] for p in share) for share in shares]
    # Largest first to the lightest share: within 1% here (equal counts: 50% apart).
    assert max(totals) - min(totals) < 0.01 * np.mean(totals), totals
    by_count = [sum(pixels[i::4]) for i in range(4)]
    assert max(totals) - min(totals) < (max(by_count) - min(by_count)) / 10
    assert all(share == sorted(share) for share in shares)  # input order within a share
    assert region.assign_shares(paths, pixels, 4) == shares  # the same on every process


# ---------------------------------------------------------------------------------------
# Skipping and failures, in-process (a per-pixel model).
# ---------------------------------------------------------------------------------------


def _predict(predictor, inputs, output, record, **kwargs):
    paths = sorted(inputs.glob("*.tif"))
    summary = region.RunSummary(region.Shard(0, 1, "one process"), record)
    pixels = {p: region.scene_pixels(p) for p in paths}
    return region.predict_share(predictor, paths, output, summary=summary, pixels=pixels,
                                **kwargs)


def test_rerun_skips_scenes_made_the_same_way_and_redoes_the_others(tmp_path):
    inputs = write_scenes(tmp_path / "in", ["b", "e"])
    output = tmp_path / "out"
    predictor = make_predictor(window=32)
    record = {"model": "pixel", "config_hash": "0123", "checkpoint_step": "6", "tta": "none"}
    first = _predict(predictor, inputs, output, record)
    assert scene_names(first.done) == ["b", "e"] and not first.skipped
    written = {p.name: p.stat().st_mtime_ns for p in output.iterdir()}
    again = _predict(predictor, inputs, output, record)
    assert scene_names(again.skipped) == ["b", "e"] and not again.done
    assert {p.name: p.stat().st_mtime_ns for p in output.iterdir()} == written
    for changed in ({"checkpoint_step": "9"}, {"config_hash": "4567"}, {"tta": "flips"}):
        redone = _predict(predictor, inputs, output, {**record, **changed})
        assert scene_names(redone.done) == ["b", "e"], changed
    # A scene whose classes file is gone (never finished) is predicted again.
    (output / "e_classes.tif").unlink()
    last = _predict(predictor, inputs, output, {**record, "tta": "flips"})
    assert scene_names(last.done) == ["e"] and scene_names(last.skipped) == ["b"]


def test_unreadable_scenes_are_reported_and_the_others_done(tmp_path):
    inputs = write_scenes(tmp_path / "in", ["b", "e"])
    # A GeoTIFF cut short (its tiles are missing) and a single-band one.
    data = (inputs / "b.tif").read_bytes()
    (inputs / "c_truncated.tif").write_bytes(data[:len(data) // 3])
    write_geotiff(inputs / "d_grey.tif", random_image(50, 60)[None, :, :, 0])
    predictor = make_predictor(window=32)
    summary = _predict(predictor, inputs, tmp_path / "out", {"model": "pixel"})
    assert scene_names(summary.done) == ["b", "e"]
    assert [os.path.basename(f["scene"]) for f in summary.failed] == ["c_truncated.tif",
                                                                      "d_grey.tif"]
    assert "1 band" in summary.failed[1]["reason"]
    assert not summary.as_dict()["complete"]
    assert leftovers(tmp_path / "out") == []
    # --fail_fast: nothing after the first failure.
    fast = _predict(predictor, inputs, tmp_path / "fast", {"model": "pixel"}, fail_fast=True)
    assert scene_names(fast.done) == ["b"] and len(fast.failed) == 1


# ---------------------------------------------------------------------------------------
# The command, in subprocesses.
# ---------------------------------------------------------------------------------------


def _start_two_processes(args, tmp_path):
    """The same predict command as processes 0 and 1 of a jax.distributed job on localhost."""
    address = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    processes = [_start(args, logs[i], env=dict(JAX_COORDINATOR_ADDRESS=address,
                                                JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
                 for i in range(2)]
    return processes, logs


@pytest.mark.slow
def test_two_processes_predict_each_scene_once_like_one(workdir, scenes, reference,
                                                        tmp_path):
    output = tmp_path / "out"
    processes, logs = _start_two_processes(predict_args(workdir, scenes, output), tmp_path)
    assert _finish(processes, logs, timeout=300) == [0, 0], logs[0].read_text()[-3000:]
    shares = summaries(output)
    assert sorted(shares) == [0, 1]
    assert all(s["shard_count"] == 2 and s["shard_source"] == "jax.distributed"
               for s in shares.values())
    done = [scene_names(s["done"]) for s in shares.values()]
    assert done[0] and done[1] and not set(done[0]) & set(done[1])  # disjoint, both busy
    assert sorted(done[0] + done[1]) == sorted(SCENES)  # every scene exactly once
    assert_same_outputs(output, reference)
    assert (output / "mosaic_classes.vrt").is_file()  # process 0 finalized the region


@pytest.mark.slow
def test_a_job_array_predicts_its_shares_then_finalizes(workdir, scenes, reference,
                                                        tmp_path):
    output = tmp_path / "out"
    # Task 1 of a SLURM array --array=0-1, then share 0 given on the command line.
    run_python(predict_args(workdir, scenes, output),
               env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                    "SLURM_ARRAY_TASK_MIN": "0"})
    assert not (output / "mosaic_classes.vrt").exists()  # not before every share is done
    run_python(predict_args(workdir, scenes, output, "--shard=0/2"))
    paths = sorted(scenes.glob("*.tif"))
    expected = region.assign_shares(paths, [region.scene_pixels(p) for p in paths], 2)
    shares = summaries(output)
    for index in (0, 1):
        assert shares[index]["shard_count"] == 2
        assert scene_names(shares[index]["done"]) == sorted(p.stem for p in expected[index])
    assert_same_outputs(output, reference)
    result = run_python(["-m", "lcseg.predict", "--finalize", str(output)])
    assert "mosaic_classes" in result.stdout
    with rasterio.open(output / "mosaic_classes.vrt") as mosaic, rasterio.open(
            reference / "mosaic_classes.vrt") as expected_mosaic:
        np.testing.assert_array_equal(mosaic.read(), expected_mosaic.read())


@pytest.mark.slow
def test_stopped_and_killed_runs_resume_to_the_uninterrupted_result(workdir, scenes,
                                                                    reference, tmp_path):
    output = tmp_path / "out"

    def start(tag):
        log = tmp_path / f"{tag}.log"
        process = _start(predict_args(workdir, scenes, output), log)
        # Once the large scene's temporary files exist, it is being predicted.
        _wait_for(lambda: any(LARGE in p.name for p in output.glob(".*")), [process],
                  f"the {LARGE} scene", timeout=240)
        return process, log

    process, log = start("stopped")
    process.send_signal(signal.SIGTERM)
    assert _finish([process], [log]) == [75], log.read_text()[-3000:]
    assert preemption.EXIT_STATUS == 75
    assert leftovers(output) == []  # nothing partial, nothing temporary
    assert not (output / f"{LARGE}_classes.tif").exists()
    (stopped,) = summaries(output).values()
    assert stopped["stopped"] == "SIGTERM" and scene_names(stopped["done"]) == ["a", "b"]

    process, log = start("killed")
    process.kill()
    assert _finish([process], [log]) == [-signal.SIGKILL]
    assert not (output / f"{LARGE}_classes.tif").exists()

    result = run_python(predict_args(workdir, scenes, output))
    (resumed,) = summaries(output).values()
    assert scene_names(resumed["skipped"]) == ["a", "b"]
    assert scene_names(resumed["done"]) == [LARGE, "d", "e"]
    assert resumed["complete"] and "3 scene(s) predicted, 2 already done" in result.stdout
    assert leftovers(output) == []
    assert_same_outputs(output, reference)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both(workdir, tmp_path):
    # Two scenes of the same size: each process is in the middle of one.
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, name in enumerate(["large0", "large1"]):
        write_geotiff(inputs / f"{name}.tif",
                      np.transpose(random_image(1600, 1500, seed=i), (2, 0, 1)))
    output = tmp_path / "out"
    processes, logs = _start_two_processes(predict_args(workdir, inputs, output), tmp_path)
    _wait_for(lambda: sum(p.name.startswith(".large") for p in output.glob(".*")) >= 2,
              processes, "both scenes", timeout=240)
    processes[1].send_signal(signal.SIGTERM)
    assert _finish(processes, logs) == [75, 75], logs[0].read_text()[-3000:]
    shares = summaries(output)
    assert shares[1]["stopped"] == "SIGTERM"
    assert shares[0]["stopped"] == "SIGTERM (another process)"
    assert not list(output.glob("*_classes.tif")) and leftovers(output) == []


@pytest.fixture(scope="module")
def later_checkpoint(workdir, synthetic_data_dir, tmp_path_factory):
    """A copy of ``workdir`` trained 3 steps further (latest checkpoint: step 9), with the
    same config.json (so only the checkpoint differs)."""
    path = tmp_path_factory.mktemp("later")
    shutil.copytree(workdir, path, dirs_exist_ok=True)
    config_json = (path / "config.json").read_text()
    train.train_and_evaluate(tiny_config(synthetic_data_dir, num_train_steps=9), str(path))
    (path / "config.json").write_text(config_json)
    return path


@pytest.mark.slow
def test_another_checkpoint_or_tta_predicts_again(workdir, later_checkpoint, scenes,
                                                 reference, tmp_path):
    inputs, output = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    output.mkdir()
    for name in ("b", "e"):
        shutil.copy(scenes / f"{name}.tif", inputs)
        for file in reference.glob(f"{name}_*"):
            shutil.copy(file, output)
    run_python(predict_args(workdir, inputs, output, "--checkpoint", "latest"))
    assert scene_names(summaries(output)[0]["skipped"]) == ["b", "e"]
    run_python(predict_args(workdir, inputs, output, "--checkpoint", "latest", "--tta",
                            "flips"))
    assert scene_names(summaries(output)[0]["done"]) == ["b", "e"]
    run_python(predict_args(later_checkpoint, inputs, output, "--checkpoint", "latest",
                            "--tta", "flips"))
    (summary,) = summaries(output).values()
    assert summary["provenance"]["checkpoint_step"] == "9"
    assert scene_names(summary["done"]) == ["b", "e"]


@pytest.mark.slow
def test_a_corrupt_scene_among_good_ones_fails_the_run_after_the_others(workdir, tmp_path):
    inputs = write_scenes(tmp_path / "in", ["b", "e"])
    data = (inputs / "b.tif").read_bytes()
    (inputs / "c_corrupt.tif").write_bytes(data[:len(data) // 3])  # tiles missing
    write_geotiff(inputs / "d_grey.tif", random_image(50, 60)[None, :, :, 0])  # 1 band
    output = tmp_path / "out"
    result = run_python(predict_args(workdir, inputs, output), check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "2 scene(s) failed" in result.stderr and "c_corrupt.tif" in result.stderr
    (summary,) = summaries(output).values()
    assert scene_names(summary["done"]) == ["b", "e"]
    assert [os.path.basename(f["scene"]) for f in summary["failed"]] == ["c_corrupt.tif",
                                                                         "d_grey.tif"]
    assert "RasterioIOError" in summary["failed"][0]["reason"]
    assert "has 1 band" in summary["failed"][1]["reason"]
    assert (output / "b_classes.tif").is_file() and (output / "e_classes.tif").is_file()
    assert leftovers(output) == []
    # --fail_fast: the grey scene's header already fails it, before the model is loaded.
    fast = run_python(predict_args(workdir, inputs, tmp_path / "fast", "--fail_fast"),
                      check=False)
    assert fast.returncode == 1 and "d_grey.tif has 1 band" in fast.stderr
    assert "Traceback" not in fast.stderr and not (tmp_path / "fast").exists()


def test_bad_flags_are_refused_before_the_output_folder_exists(tmp_path):
    output = tmp_path / "out"
    # (Each is a new process: three of the checks in _check_options.)
    for flag, message in [("--polygon_min_area=-1", "polygon_min_area=-1"),
                          ("--overlap=1", "overlap=1"), ("--shard=3/2", "shard='3/2'")]:
        result = run_python(["-m", "lcseg.predict", "--workdir", str(tmp_path), "--input",
                             str(tmp_path), "--output", str(output), flag], check=False)
        assert result.returncode == 1 and message in result.stderr, (flag, result.stderr)
        assert "Traceback" not in result.stderr
        assert not output.exists(), flag


def test_summary_is_written_whole_and_names_the_share(tmp_path):
    summary = region.RunSummary(region.Shard(3, 10, "--shard"),
                                provenance(tiny_config("unused"), step=6, tta="none"))
    path = summary.write(tmp_path)
    assert path.name == "lcseg-run-00003-of-00010.json"
    with open(path) as f:
        data = json.load(f)
    assert data["shard"] == 3 and data["shard_count"] == 10 and data["complete"]
    assert data["provenance"]["checkpoint_step"] == "6"
    assert leftovers(tmp_path) == []


def test_job_array_finalize_waits_for_every_share(tmp_path):
    for index in (0, 2):
        region.RunSummary(region.Shard(index, 3, "--shard"), {}).write(tmp_path)
    stopped = region.RunSummary(region.Shard(1, 3, "--shard"), {}, stopped="SIGTERM")
    stopped.write(tmp_path)
    assert region.unfinished_shares(tmp_path) == ["share 1 of 3 stopped (SIGTERM) before "
                                                  "its end"]
    (tmp_path / "lcseg-run-00002-of-00003.json").unlink()
    result = run_python(["-m", "lcseg.predict", "--finalize", str(tmp_path)], check=False)
    assert result.returncode == 1
    assert "share 2 of 3 has no run summary" in result.stderr
    assert "share 1 of 3 stopped" in result.stderr

