"""lcseg's CPU training and inference speed against PyTorch eager, interleaved in one run.

    python benchmarks/cpu_vs_torch.py [--workloads train256,train512,infer256]
        [--repeats 5] [--skip_slow] [--bf16] [--torch_reference ../shared/bench]

The same network on both sides: the milesial U-Net (64..1024 channels, 3x3 convolutions
without bias + BatchNorm + ReLU, 2x2 stride-2 transposed-convolution up-sampling, 7
classes, 31,038,023 parameters), class-weighted cross-entropy and Adam (lr 1e-4), float32.
PyTorch runs ``torch_unet_reference.py`` (from ``--torch_reference``, the shared bench
folder by default) in a server subprocess with 2 threads; lcseg runs its own training
step (``lcseg.experiment.Experiment``: the jitted, donated step training uses) with the fast
convolutions on (``fast``) and off (``xla``; slow, skipped with ``--skip_slow``).

Workloads (as the reference names them): ``train256`` (batch 4), ``train512`` (batch 2),
``infer256`` (batch 8, logits only). Every runner is built and warmed up (compiled)
first; then each repeat times one block of steps of every runner in turn, so that load
from other processes on a shared machine falls on all of them alike. Prints images/s
(median over repeats, with the range) and the ratio to PyTorch eager, and the 1-minute
load average at each repeat: on a shared machine other processes slow PyTorch's OpenMP
threads more than XLA's, so compare ratios measured at a load below the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import default  # noqa: E402
from lcseg import experiment as experiment_lib  # noqa: E402
from lcseg import parallel  # noqa: E402
from lcseg.data import pipeline  # noqa: E402
from lcseg.ops import fast_apply  # noqa: E402

# As torch_unet_reference.py: non-uniform weights, class 6 weighted 0; Adam lr 1e-4.
CLASS_WEIGHTS = (1.0, 0.8, 1.2, 1.5, 0.9, 2.0, 0.0)
WORKLOADS = {"train256": (True, 4, 256), "train512": (True, 2, 512),
             "infer256": (False, 8, 256)}


def benchmark_config(*, size: int, batch: int, bf16: bool = False):
    """The reference's model, loss and optimizer as an lcseg config (7-class LoveDA)."""
    config = default.get_config()
    config.dataset.name = "loveda"  # Only its metadata: 7 classes.
    config.model.name = "unet"
    config.model.channels = (64, 128, 256, 512, 1024)
    config.model.conv_bias = False
    config.model.upsampling = "transpose"
    config.optimizer = "adam"
    config.learning_rate = 1e-4
    config.schedule = "constant"
    config.warmup_steps = 0
    config.half_precision = bf16
    config.batch_size = batch
    config.eval_batch_size = batch
    config.crop_size = size
    return config


def build_lcseg_step(*, size: int, batch: int, fast: bool, bf16: bool = False,
                     train_mode: bool = True, seed: int = 0):
    """(jitted step, state, device batch) of lcseg's own training or inference step.

    ``fast`` selects the fast convolutions: through ``config.fast_conv`` where the config
    has that switch, otherwise by wrapping the state's ``apply_fn`` in ``fast_apply``.
    """
    config = benchmark_config(size=size, batch=batch, bf16=bf16)
    if "fast_conv" in config:
        config.fast_conv = "on" if fast else "off"
    experiment = experiment_lib.Experiment(
        config, class_weights=np.asarray(CLASS_WEIGHTS, np.float32))
    state = experiment.init_state()
    if fast and "fast_conv" not in config:
        state = state.replace(apply_fn=fast_apply(state.apply_fn))
    rng = np.random.default_rng(seed)
    host_batch = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                  "label": rng.integers(0, len(CLASS_WEIGHTS), (batch, size, size),
                                        dtype=np.uint8)}
    device_batch = parallel.shard_batch(host_batch, experiment.mesh)
    if train_mode:
        return experiment.train_step, state, device_batch
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)

    @jax.jit
    def logits_step(state, batch):
        images = pipeline.normalize_images(batch["image"], mean, std, dtype)
        logits = state.apply_fn(experiment_lib.inference_variables(state), images, train=False)
        return state, {"logits": logits}

    return logits_step, state, device_batch


class LcsegRunner:
    """One lcseg workload: ``step()`` runs and waits for one step."""

    def __init__(self, workload: str, *, fast: bool, bf16: bool = False):
        train_mode, self.batch, size = WORKLOADS[workload]
        self.name = f"lcseg {'bf16' if bf16 else 'f32'} {'fast' if fast else 'xla'}"
        self.fn, self.state, self.data = build_lcseg_step(
            size=size, batch=self.batch, fast=fast, bf16=bf16, train_mode=train_mode)
        self.params = sum(x.size for x in jax.tree.leaves(self.state.params))

    def step(self) -> None:
        self.state, metrics = self.fn(self.state, self.data)
        jax.block_until_ready(metrics)

    def block(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return self.batch * steps / (time.perf_counter() - start)

    def close(self) -> None:
        pass


class TorchRunner:
    """The PyTorch reference in a ``--serve`` subprocess (its own threads and allocator)."""

    def __init__(self, workload: str, *, reference_dir: str, python: str, threads: int,
                 variant: str = "eager"):
        script = os.path.join(reference_dir, "torch_unet_reference.py")
        if not os.path.exists(script):
            raise FileNotFoundError(f"{script} not found: pass --torch_reference, the folder "
                                    "holding torch_unet_reference.py")
        self.name = f"torch {variant}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.process = subprocess.Popen(
            [python, script, "--serve", "--workload", workload, "--variant", variant,
             "--threads", str(threads), "--warmup", "1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._read()
        self.batch = self.ready["batch"]
        self.params = self.ready["param_count"]

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"{self.name} exited (code {self.process.wait()})")

    def block(self, steps: int) -> float:
        self.process.stdin.write(f"run {steps}\n")
        self.process.stdin.flush()
        return self._read()["imgs_per_s"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)


def run_workload(workload: str, runners: list[Callable[[], object]], *, repeats: int,
                 steps: int) -> list[tuple[str, list[float]]]:
    """Builds the runners, then times ``repeats`` rounds of one block of each in turn."""
    built = []
    try:
        for make in runners:
            start = time.perf_counter()
            runner = make()
            if isinstance(runner, LcsegRunner):
                runner.step()  # Compile and warm up.
            print(f"  built {runner.name} ({runner.params:,} parameters) in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            built.append(runner)
        rates = {runner.name: [] for runner in built}
        for index in range(repeats):
            for runner in built if index % 2 == 0 else reversed(built):
                rates[runner.name].append(runner.block(steps))
            # Other processes' load moves both frameworks, PyTorch's OpenMP threads more.
            print(f"  repeat {index + 1} (load {os.getloadavg()[0]:.1f}): " + ", ".join(
                f"{name} {values[-1]:.3f}" for name, values in rates.items()), flush=True)
        return list(rates.items())
    finally:
        for runner in built:
            runner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="train256,train512,infer256")
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved rounds.")
    parser.add_argument("--steps", type=int, default=1, help="Steps per timed block.")
    parser.add_argument("--skip_slow", action="store_true",
                        help="Leave out lcseg with the fast convolutions off.")
    parser.add_argument("--bf16", action="store_true",
                        help="Also run lcseg in bfloat16 (fast path) and torch eager_cl_bf16.")
    parser.add_argument("--torch_reference",
                        default=os.path.join(REPO_ROOT, "..", "shared", "bench"),
                        help="Folder holding torch_unet_reference.py.")
    parser.add_argument("--torch_python", default=sys.executable,
                        help="Python with torch installed (default: this one).")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads.")
    args = parser.parse_args()

    print(f"jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); "
          f"torch reference {os.path.abspath(args.torch_reference)}", flush=True)
    table = []
    for workload in args.workloads.split(","):
        print(f"{workload}:", flush=True)
        runners = [
            lambda w=workload: TorchRunner(w, reference_dir=args.torch_reference,
                                           python=args.torch_python, threads=args.threads),
            lambda w=workload: LcsegRunner(w, fast=True)]
        if not args.skip_slow:
            runners.append(lambda w=workload: LcsegRunner(w, fast=False))
        if args.bf16:
            runners.append(lambda w=workload: LcsegRunner(w, fast=True, bf16=True))
            runners.append(lambda w=workload: TorchRunner(
                w, reference_dir=args.torch_reference, python=args.torch_python,
                threads=args.threads, variant="eager_cl_bf16"))
        results = run_workload(workload, runners, repeats=args.repeats, steps=args.steps)
        torch_rate = statistics.median(results[0][1])
        for name, values in results:
            table.append((workload, name, statistics.median(values), min(values), max(values),
                          statistics.median(values) / torch_rate))

    print(f"\n{'workload':<10}{'runner':<22}{'img/s':>8}{'min':>8}{'max':>8}"
          f"{'vs torch eager':>16}")
    for workload, name, rate, low, high, ratio in table:
        print(f"{workload:<10}{name:<22}{rate:8.3f}{low:8.3f}{high:8.3f}{ratio:15.2f}x")


if __name__ == "__main__":
    main()
