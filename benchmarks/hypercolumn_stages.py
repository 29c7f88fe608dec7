"""Training speed of the two hypercolumn stages: sampled pixels (one) vs dense (two).

    python benchmarks/hypercolumn_stages.py [--size 256] [--batch 4] [--layers all]
        [--hidden 1024] [--steps 3] [--half_precision] [--stages one,two]

Builds ``configs/hypercolumn_xview2_stage1.py`` and ``..._stage2.py`` as they are (frozen
VGG16, Adam, inverse class weights, dropout 0.5), with the image size, batch, layers and
precision of the flags, and times each stage's compiled ``Experiment.train_step`` on one
random batch of xView2-like tiles (~5% building pixels; no input pipeline, no weights
file: random VGG16 weights cost the same). The step is compiled once ahead of time, so the
same program gives XLA's temporary memory and the timings. Prints steps/s, images/s and
the stage-two/stage-one time ratio, all from the one run (the ratio is the robust figure
on a shared machine).

The configs' batch is 16; the default here is 4 because stage two's dense head at
256x256, batch 16, float32 needs ~30 GB of temporaries on XLA:CPU
(``benchmarks/hypercolumn_memory.py``), more than a 24 GiB machine holds. Per-image cost
is what the batch scales, so images/s carries over.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import median_seconds_per_step  # noqa: E402

from configs import hypercolumn_xview2_stage1, hypercolumn_xview2_stage2  # noqa: E402
from lcseg import parallel  # noqa: E402
from lcseg.experiment import Experiment  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 256, "Square crop size (the configs': 256).")
flags.DEFINE_integer("batch", 4, "Crops per step (the configs': 16; see the docstring).")
flags.DEFINE_enum("layers", "all", ["all", "pool"], "Hypercolumn layers (configs': all).")
flags.DEFINE_integer("hidden", 1024, "Hidden layer width (the configs': 1024).")
flags.DEFINE_integer("steps", 3, "Timed steps per repeat.")
flags.DEFINE_integer("repeats", 2, "Repeats; the median is reported.")
flags.DEFINE_bool("half_precision", False,
                  "bfloat16 compute, as the configs (for GPUs); XLA:CPU runs float32 faster.")
flags.DEFINE_list("stages", ["one", "two"], "Stages to time: one, two or both.")

BUILDING_FRACTION = 0.05  # xView2's pre-disaster footprints (datasets/xview2/README.md)
STAGES = {"one": ("one (sampled pixels)", hypercolumn_xview2_stage1),
          "two": ("two (dense)", hypercolumn_xview2_stage2)}


def xview2_like_batch(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random uint8 images with a ~5% building mask, the sizes of the flags."""
    shape = (FLAGS.batch, FLAGS.size, FLAGS.size)
    return {"image": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
            "label": (rng.random(shape) < BUILDING_FRACTION).astype(np.uint8)}


def stage_config(module):
    config = module.get_config()
    config.batch_size = FLAGS.batch
    config.crop_size = FLAGS.size
    config.model.layers = FLAGS.layers
    config.model.hidden = FLAGS.hidden
    config.model.pretrained = None  # random VGG16 weights: the same cost, no file needed
    config.half_precision = FLAGS.half_precision
    return config


def measure(config) -> dict[str, float]:
    """Seconds per train step (median) and XLA temporary bytes of ``config``'s step."""
    # Inverse class weights of a 95/5 split: the values do not change the cost.
    class_weights = np.array([1 / (1 - BUILDING_FRACTION), 1 / BUILDING_FRACTION]) / 2
    experiment = Experiment(config, class_weights=class_weights)
    batch = parallel.shard_batch(xview2_like_batch(np.random.default_rng(0)), experiment.mesh)
    state = experiment.init_state()
    start = time.perf_counter()
    step = experiment.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    temp_bytes = step.memory_analysis().temp_size_in_bytes

    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    jax.block_until_ready(one_step())  # Warm-up.
    seconds = median_seconds_per_step(one_step, FLAGS.steps, FLAGS.repeats)
    return {"seconds": seconds, "temp_gib": temp_bytes / 2**30,
            "compile": compile_seconds}


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(FLAGS.stages) - set(STAGES))
    if unknown:
        raise app.UsageError(f"--stages: unknown {unknown}; valid: {list(STAGES)}")
    rows = {name: measure(stage_config(STAGES[name][1])) for name in FLAGS.stages}
    devices = jax.devices()
    print(f"Hypercolumn stages, layers={FLAGS.layers}, hidden {FLAGS.hidden}, frozen VGG16, "
          f"batch {FLAGS.batch} of {FLAGS.size}x{FLAGS.size}, "
          f"{'bfloat16' if FLAGS.half_precision else 'float32'} compute, "
          f"{len(devices)} x {devices[0].platform}; median of {FLAGS.repeats} x "
          f"{FLAGS.steps} steps")
    print()
    print("| stage | steps/s | img/s | s/step | XLA temp GiB | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        seconds = row["seconds"]
        print(f"| {STAGES[name][0]} | {1 / seconds:.3g} | {FLAGS.batch / seconds:.3g} | "
              f"{seconds:.3g} | {row['temp_gib']:.2f} | {row['compile']:.0f} |")
    if len(rows) == 2:
        print()
        print(f"stage two / stage one time per step: "
              f"{rows['two']['seconds'] / rows['one']['seconds']:.2f}x")


if __name__ == "__main__":
    app.run(main)
