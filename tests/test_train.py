"""End-to-end training: train, evaluate, checkpoint, resume, across device and host counts.

In-process tests run on 4 fake CPU devices (conftest); subprocess tests run main.py and
lcseg.evaluate as a user would, with 1 device unless stated.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator

from configs import test as test_config
from lcseg import checkpoints, evaluate, parallel, train
from lcseg.class_weights import resolve_class_weights
from lcseg.data import open_split, train_class_counts
from lcseg.data.pipeline import train_iterator
from lcseg.experiment import Experiment
from lcseg.workdir import load_config, save_config
from tests.conftest import REPO_ROOT, TEST_ENV, run_python


def tiny_config(data_dir, **overrides):
    config = test_config.get_config()
    config.dataset.data_dir = data_dir
    for key, value in overrides.items():
        target = config
        *path, name = key.split(".")
        for part in path:
            target = target[part]
        target[name] = value
    return config


def read_params(workdir, step):
    """A checkpoint's parameters and BatchNorm statistics as numpy arrays."""
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    checkpointer = ocp.StandardCheckpointer()
    # Restore onto this process's first device, whatever topology wrote the checkpoint.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
        if hasattr(m, "shape") else m,
        checkpointer.metadata(path).item_metadata.tree)
    state = checkpointer.restore(path, target)
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


def assert_trees_equal(a, b, **tolerance):
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b) > 0
    for x, y in zip(flat_a, flat_b):
        if tolerance:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def logged_steps(path: str, tag: str = "train/loss") -> list[int]:
    """The steps at which ``tag`` was written, sorted, over every events file of a workdir
    (``path`` a directory) or one file: a step written by two runs appears twice."""
    accumulator = event_accumulator.EventAccumulator(
        path, size_guidance={event_accumulator.TENSORS: 0}, purge_orphaned_data=False)
    accumulator.Reload()
    return sorted(event.step for event in accumulator.Tensors(tag))


def events_files(workdir: str) -> set[str]:
    return {os.path.join(workdir, name) for name in os.listdir(workdir)
            if name.startswith("events.out.tfevents")}


@pytest.fixture(scope="module")
def trained_workdir(synthetic_data_dir, tmp_path_factory):
    """A tiny run on 4 devices: 6 steps, evaluated and checkpointed at 3 and 6."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(synthetic_data_dir), workdir)
    return workdir


def test_training_writes_config_checkpoints_and_resumes(trained_workdir, synthetic_data_dir):
    assert os.path.exists(os.path.join(trained_workdir, "config.json"))
    for step in (3, 6):  # each evaluation also saved as JSON, confusion matrix included
        with open(os.path.join(trained_workdir, "eval", f"validation-{step}.json")) as f:
            assert len(json.load(f)["confusion_matrix"]) == 6
    checkpointer = checkpoints.Checkpointer(
        os.path.join(trained_workdir, "checkpoints"), read_only=True)
    steps = checkpointer.all_steps()
    assert steps[-1] == 6 and checkpointer.best_step() in (3, 6)
    assert set(steps) == {6, checkpointer.best_step()}  # latest and best kept, nothing else

    # The same command with more steps resumes from step 6 rather than starting over:
    # it trains, logs and evaluates steps 7 and 8 only (a run that started again from
    # step 0 would log steps 2..6 and evaluate steps 3 and 6 a second time).
    before = events_files(trained_workdir)
    state = train.train_and_evaluate(tiny_config(synthetic_data_dir, num_train_steps=8),
                                     trained_workdir)
    assert int(state.step) == 8
    assert checkpointer.resolve_step("latest") == 6  # (read-only view taken before)
    (resumed_events,) = events_files(trained_workdir) - before
    assert logged_steps(resumed_events) == [8]  # log_every_steps=2, but 7 is not logged
    assert logged_steps(resumed_events, "eval/miou") == [8]
    assert logged_steps(trained_workdir, "eval/miou") == [3, 6, 8]


def test_tensorboard_reads_scalars_images_and_hparams(trained_workdir):
    accumulator = event_accumulator.EventAccumulator(
        trained_workdir, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["tensors"])
    expected = {"train/loss", "train/learning_rate", "steps_per_sec", "eval/miou",
                "eval/accuracy", "eval/panels", "eval/confusion_matrix",
                *(f"eval/iou/{name}" for name in
                  ("urban", "agriculture", "rangeland", "forest", "water", "barren"))}
    assert expected <= tags, expected - tags
    miou = [event.step for event in accumulator.Tensors("eval/miou")]
    assert 3 in miou and 6 in miou
    panel = accumulator.Tensors("eval/panels")[-1].tensor_proto
    # Image summaries store [width, height, encoded PNG...]: image | truth | prediction.
    width, height = (int(v) for v in panel.string_val[:2])
    assert (width, height) == (3 * 64, 64)
    assert "_hparams_/session_start_info" in accumulator.summary_metadata or any(
        "hparams" in tag for tag in accumulator.Tags()["tensors"])


def test_evaluate_script_restores_on_one_device_what_four_wrote(trained_workdir):
    """``python -m lcseg.evaluate`` (1 device) matches the 4-device in-process result."""
    scores, path = evaluate.evaluate_checkpoint(trained_workdir, "test", "latest")
    result = run_python(["-m", "lcseg.evaluate", "--workdir", trained_workdir,
                         "--split", "test", "--checkpoint", "latest"])
    assert "mean" in result.stdout and "urban" in result.stdout
    with open(path) as f:
        report = json.load(f)
    assert report["split"] == "test" and report["step"] == int(path.split("-")[-1][:-5])
    np.testing.assert_array_equal(report["confusion_matrix"], scores["confusion_matrix"])
    assert report["miou"] == pytest.approx(scores["miou"])
    total = np.sum(report["confusion_matrix"])
    source = open_split("synthetic", "test", load_config(trained_workdir).dataset.data_dir)
    assert total == sum(np.sum(source[i]["label"] != 255) for i in range(len(source)))


def test_saving_replicated_state_compiles_nothing_and_restores_exactly(tmp_path):
    # Orbax's default replica-parallel save sliced each replicated array with an eagerly
    # compiled XLA slice: one compilation per shape on a process's first save (52 s of
    # blocked training for 350 parameter shapes on 4 CPU devices).
    replicated = parallel.replicated(parallel.make_mesh())
    assert len(replicated.mesh.devices.flat) == 4
    rng = np.random.default_rng(0)
    # Shapes no other test uses, so nothing could be compiled (or cached) already.
    tree = {f"w{i}": jax.device_put(rng.random((3, 37 + i), np.float32), replicated)
            for i in range(5)}
    tree["rng"] = jax.device_put(jax.random.key(7), replicated)  # Must come back a key.
    compilations = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compilations.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        writer = checkpoints.Checkpointer(str(tmp_path))
        writer.save(1, tree)
        writer.wait()
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compilations == []
    restored = checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(1, tree)
    assert restored["rng"].dtype == tree["rng"].dtype
    for key, value in tree.items():
        assert restored[key].sharding == value.sharding
        if key == "rng":
            restored[key], value = jax.random.key_data(restored[key]), jax.random.key_data(value)
        np.testing.assert_array_equal(jax.device_get(restored[key]), jax.device_get(value))


def test_restored_state_has_the_types_of_a_fresh_one(synthetic_data_dir, tmp_path):
    # A weakly typed fresh step made the train step of a resumed state another program:
    # a second compilation whenever one process both starts and resumes.
    run = Experiment(tiny_config(synthetic_data_dir))
    state = run.init_state()
    writer = checkpoints.Checkpointer(str(tmp_path))
    writer.save(1, state)
    writer.wait()
    restored = checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(
        1, run.abstract_state())

    def types(tree):
        return [(jax.tree_util.keystr(path), x.shape, x.dtype, x.aval.weak_type, x.sharding)
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

    assert types(restored) == types(state)


def test_data_parallel_steps_match_single_device(synthetic_data_dir):
    config = tiny_config(synthetic_data_dir)
    source = open_split("synthetic", "train", synthetic_data_dir)
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        experiment = Experiment(config, mesh=parallel.make_mesh(devices))
        state = experiment.init_state()
        batches = train_iterator(source, batch_size=4, crop_size=32, seed=0)
        losses = []
        for _ in range(3):
            state, metrics = experiment.train_step(
                state, parallel.shard_batch(next(batches), experiment.mesh))
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get({"p": state.params, "b": state.batch_stats})))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    assert_trees_equal(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_nonfinite_loss_stops_training_and_keeps_last_good_checkpoint(synthetic_data_dir,
                                                                      tmp_path):
    workdir = str(tmp_path)
    train.train_and_evaluate(tiny_config(synthetic_data_dir, num_train_steps=3), workdir)
    good = read_params(workdir, 3)
    diverging = tiny_config(synthetic_data_dir, num_train_steps=6, learning_rate=1e30,
                            schedule="constant")
    # A resume may not change the learning rate (lcseg.workdir): record the diverging
    # config as the run's own, as if it had been trained with it from the start.
    save_config(diverging, workdir)
    with pytest.raises(FloatingPointError, match="last good checkpoint \\(step 3\\)"):
        train.train_and_evaluate(diverging, workdir)
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.all_steps() == [3]
    assert_trees_equal(read_params(workdir, 3), good)


def _main_args(workdir, data_dir, *extra):
    return ["main.py", "--config", "configs/test.py", "--workdir", workdir,
            f"--config.dataset.data_dir={data_dir}", *extra]


def test_killed_run_resumes_bit_identically(synthetic_data_dir, tmp_path):
    steps = ["--config.num_train_steps=40", "--config.checkpoint_every_steps=5",
             "--config.eval_every_steps=1000", "--config.log_every_steps=5"]
    reference = str(tmp_path / "reference")
    run_python(_main_args(reference, synthetic_data_dir, *steps))

    killed = str(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, *_main_args(killed, synthetic_data_dir, *steps)],
                               cwd=REPO_ROOT, env={**os.environ, **TEST_ENV},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    first = os.path.join(killed, "checkpoints", "5", "commit_success.txt")
    while not os.path.exists(first) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = os.path.join(killed, "checkpoints", "40")
    assert not os.path.exists(finished), "the run finished before it could be killed"

    resume_from = checkpoints.Checkpointer(os.path.join(killed, "checkpoints"),
                                                 read_only=True).latest_step()
    assert resume_from is not None and resume_from % 5 == 0
    before = events_files(killed)
    run_python(_main_args(killed, synthetic_data_dir, *steps))
    # The second run started at the checkpointed step: it logged (every 5 steps) only the
    # steps after it, which a run starting over from step 0 would not...
    (resumed_events,) = events_files(killed) - before
    assert logged_steps(resumed_events) == list(range(resume_from + 5, 41, 5))
    # ...and from the checkpointed parameters, optimizer and iterator state: it ends where
    # the uninterrupted run ends, bit for bit.
    assert_trees_equal(read_params(killed, 40), read_params(reference, 40))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(synthetic_data_dir, tmp_path):
    """Two jax.distributed processes on 127.0.0.1 (1 CPU device each) vs one process."""
    steps = ["--config.num_train_steps=4", "--config.checkpoint_every_steps=4",
             "--config.eval_every_steps=4"]
    single = str(tmp_path / "single")
    run_python(_main_args(single, synthetic_data_dir, *steps))

    multi = str(tmp_path / "multi")
    address = f"127.0.0.1:{_free_port()}"
    processes = []
    for process_id in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(TEST_ENV)
        env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(process_id))
        processes.append(subprocess.Popen(
            [sys.executable, *_main_args(multi, synthetic_data_dir, *steps)], cwd=REPO_ROOT,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    assert "process 1 of 2" in outputs[1] or "processes: 2" in outputs[0]
    assert_trees_equal(read_params(multi, 4), read_params(single, 4), rtol=1e-4, atol=1e-6)


def test_class_weights_come_from_the_configured_training_split(synthetic_data_dir):
    from lcseg.class_weights import compute_class_weights

    config = tiny_config(synthetic_data_dir, class_weights="inverse")
    config.dataset.train_split = "validation"
    source = open_split("synthetic", "validation", synthetic_data_dir)
    counts = sum(np.bincount(source[i]["label"].ravel(), minlength=256)[:6]
                 for i in range(len(source)))
    np.testing.assert_allclose(resolve_class_weights(config),
                               compute_class_weights("inverse", counts), rtol=1e-6)
    config.dataset.train_split = "train"
    recorded = train_class_counts("synthetic", synthetic_data_dir)
    np.testing.assert_allclose(resolve_class_weights(config),
                               compute_class_weights("inverse", recorded), rtol=1e-6)


def test_workdirs_of_older_versions_load_with_new_fields_defaulted(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"dataset": {"name": "synthetic", "mean": [0.5, 0.5, 0.5]},
                   "model": {"name": "unet", "channels": [4, 8]}, "learning_rate": 0.5}, f)
    config = load_config(str(tmp_path))
    assert config.learning_rate == 0.5 and config.dataset.mean == [0.5, 0.5, 0.5]
    assert config.dataset.std == (0.229, 0.224, 0.225)  # added from the defaults
    assert config.ema_decay == 0.0 and dict(config.model) == {"name": "unet",
                                                               "channels": [4, 8]}
