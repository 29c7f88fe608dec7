"""Preemption: a signal costs one step, never the work since the last checkpoint.

``main.py`` runs in subprocesses as a cluster would run it: SIGTERM mid-run -> a checkpoint
of the step reached and exit status ``preemption.EXIT_STATUS``; running the same command
again ends bit-identical to a run never stopped; with two jax.distributed processes one
signalled process stops both; a second signal mid-save leaves a restorable checkpoint; and
loader workers never outlive the process that started them.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lcseg import checkpoints, preemption
from tests.conftest import REPO_ROOT, TEST_ENV, run_python
from tests.test_train import _free_port, assert_trees_equal, read_params

STEPS = 300  # Seconds of tiny steps (about 10 ms each): a signal lands mid-run.
MULTI_STEPS = 100  # Two processes step about 8x slower (gloo collectives on CPU).
# No periodic checkpoint or evaluation before the end: a checkpoint mid-run is the signal's.
RUN_FLAGS = ["--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000",
             "--config.log_every_steps=50"]
HANDLERS_READY = "Stop signals handled"  # Logged once the loop's handlers are installed.


def _args(workdir, data_dir, *extra, steps=STEPS):
    return ["main.py", "--config", "configs/test.py", "--workdir", str(workdir),
            f"--config.dataset.data_dir={data_dir}", f"--config.num_train_steps={steps}",
            *RUN_FLAGS, *extra]


def _start(args, log_path, *, env=None, new_session=False) -> subprocess.Popen:
    """``python ARGS`` in the background, output to ``log_path`` (the tests read it)."""
    full_env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full_env.update(TEST_ENV)
    full_env.update(env or {})
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=full_env,
                                stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=new_session)


def _wait_for(condition, processes, what, timeout=180.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        for p in processes:
            if p.poll() is not None:
                raise AssertionError(f"the run ended ({p.returncode}) before {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _log_has(log_path, text) -> bool:
    with open(log_path) as f:
        return text in f.read()


def _finish(processes, logs, timeout=180.0) -> list[int]:
    """Return codes; processes still running after ``timeout`` are killed (a hang fails)."""
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in processes:
                q.kill()
            tails = "\n".join(open(log).read()[-3000:] for log in logs)
            raise AssertionError(f"a process did not exit within {timeout} s:\n{tails}") from None
    return codes


def _steps(workdir) -> list[int]:
    return checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    read_only=True).all_steps()


def _children(pid) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _running(pid) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _loader_workers(pid) -> list[int]:
    workers = []
    for child in _children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"multiprocessing.spawn" in f.read():
                    workers.append(child)
        except OSError:
            pass
    return workers


def _assert_gone_soon(pids, seconds=5.0) -> None:
    deadline = time.time() + seconds
    while any(_running(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    alive = [p for p in pids if _running(p)]
    for p in alive:  # Leave no stray process behind, then fail.
        os.kill(p, signal.SIGKILL)
    assert not alive, f"processes {alive} outlived their parent by {seconds} s"


@pytest.fixture(scope="module")
def reference(synthetic_data_dir, tmp_path_factory):
    """An uninterrupted single-process run of STEPS steps."""
    workdir = tmp_path_factory.mktemp("reference")
    run_python(_args(workdir, synthetic_data_dir))
    return str(workdir)


def test_sigterm_checkpoints_the_step_reached_and_resume_is_exact(synthetic_data_dir,
                                                                  reference, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    process = _start(_args(workdir, synthetic_data_dir), log)
    # summary.txt is written once the first step is compiled, inside the loop.
    _wait_for(lambda: os.path.exists(workdir / "summary.txt"), [process], "the first step")
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    # The status itself, as job scripts test it ("$status" -eq 75), not the constant.
    assert preemption.EXIT_STATUS == 75
    assert _finish([process], [log]) == [75], open(log).read()[-3000:]
    steps = _steps(workdir)
    assert len(steps) == 1 and 0 < steps[0] < STEPS, steps  # the step reached, committed
    stopped = steps[0]

    result = run_python(_args(workdir, synthetic_data_dir))
    assert f"Resuming from the checkpoint of step {stopped}" in result.stderr
    assert_trees_equal(read_params(str(workdir), STEPS), read_params(reference, STEPS))


@pytest.mark.slow
def test_one_signalled_process_stops_both_at_the_same_step(synthetic_data_dir, tmp_path):
    """Two jax.distributed processes on 127.0.0.1; only process 1 receives SIGTERM."""

    def start_both(workdir, tag):
        address = f"127.0.0.1:{_free_port()}"
        logs = [tmp_path / f"{tag}{i}.log" for i in range(2)]
        processes = [_start(_args(workdir, synthetic_data_dir, steps=MULTI_STEPS), logs[i],
                            env=dict(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID=str(i)))
                     for i in range(2)]
        return processes, logs

    reference = tmp_path / "reference"
    processes, logs = start_both(reference, "reference")
    assert _finish(processes, logs) == [0, 0], open(logs[0]).read()[-3000:]

    workdir = tmp_path / "run"
    processes, logs = start_both(workdir, "stopped")
    _wait_for(lambda: os.path.exists(workdir / "summary.txt")
              and _log_has(logs[1], HANDLERS_READY), processes, "the first step")
    time.sleep(0.3)
    processes[1].send_signal(signal.SIGTERM)
    codes = _finish(processes, logs)
    assert codes == [75, 75], (codes, open(logs[0]).read()[-3000:])
    steps = _steps(workdir)
    assert len(steps) == 1 and 0 < steps[0] < MULTI_STEPS, steps

    processes, logs = start_both(workdir, "resumed")
    assert _finish(processes, logs) == [0, 0], open(logs[0]).read()[-3000:]
    assert _log_has(logs[0], f"Resuming from the checkpoint of step {steps[0]}")
    assert_trees_equal(read_params(str(workdir), MULTI_STEPS),
                       read_params(str(reference), MULTI_STEPS))


def test_second_signal_during_the_save_leaves_a_restorable_checkpoint(synthetic_data_dir,
                                                                      tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    # One periodic checkpoint (step 20) before the signal: the latest complete one.
    process = _start(_args(workdir, synthetic_data_dir, "--config.checkpoint_every_steps=20"),
                     log)
    # A step's folder appears complete: Orbax renames the temporary one when done.
    _wait_for(lambda: os.path.exists(workdir / "checkpoints" / "20"), [process],
              "the checkpoint of step 20")
    process.send_signal(signal.SIGTERM)

    def saving():  # Orbax writes into <step>.orbax-checkpoint-tmp*, then renames it.
        return any(int(os.path.basename(p).split(".")[0]) > 20 for p in
                   glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*")))

    _wait_for(lambda: _log_has(log, "Received SIGTERM") and saving(), [process],
              "the save on SIGTERM", timeout=60)
    process.send_signal(signal.SIGTERM)  # The second: the process ends at once.
    assert _finish([process], [log]) == [-signal.SIGTERM], open(log).read()[-3000:]

    # The latest complete checkpoint restores: the one of step 20, or the new one if its
    # commit beat the second signal.
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
    latest = checkpointer.latest_step()
    assert latest is not None and latest >= 20
    params = read_params(str(workdir), latest)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    checkpointer.close()


def test_loader_workers_exit_when_the_training_process_is_killed(synthetic_data_dir,
                                                                 tmp_path):
    """SIGKILL of main.py (no cleanup at all): its grain workers follow within seconds."""
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    process = _start(_args(workdir, synthetic_data_dir, "--config.data.workers=2"), log)
    try:
        # Once the first step is compiled, the workers have delivered a batch: they are
        # past their start-up (a worker still importing when its parent dies only notices
        # when its worker_init_fn runs).
        _wait_for(lambda: os.path.exists(workdir / "summary.txt")
                  and len(_loader_workers(process.pid)) >= 2, [process], "the loader workers")
        children = _children(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        _assert_gone_soon(children)
    finally:
        if process.poll() is None:
            process.kill()


# A tiny grain pipeline with two workers in a child process, independent of lcseg's.
_GRAIN_CHILD = """
import sys, time
import grain
from absl import flags
from lcseg.data.worker_lifetime import exit_with_parent
flags.FLAGS.mark_as_parsed()
dataset = grain.MapDataset.range(10_000).to_iter_dataset().mp_prefetch(
    grain.MultiprocessingOptions(num_workers=2), worker_init_fn=exit_with_parent)
iterator = iter(dataset)
for _ in range(4):
    next(iterator)
print("ready", flush=True)
time.sleep(600)
"""


def test_exit_with_parent_ends_grain_workers_of_a_killed_process(tmp_path):
    log = tmp_path / "child.log"
    process = _start(["-c", _GRAIN_CHILD], log)
    try:
        _wait_for(lambda: _log_has(log, "ready"), [process], "the workers", timeout=120)
        workers = _loader_workers(process.pid)
        assert len(workers) == 2, workers
        process.send_signal(signal.SIGKILL)
        process.wait()
        _assert_gone_soon(workers)
    finally:
        if process.poll() is None:
            process.kill()
