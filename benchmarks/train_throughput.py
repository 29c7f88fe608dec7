"""Training and evaluation throughput of a config on the current devices.

    python benchmarks/train_throughput.py --config configs/unet_synthetic.py [--steps 30]

Times the compiled train step and eval step on random uint8 batches of the config's crop
and tile size (no input pipeline: this measures the model and the step), after a warm-up
that includes compilation. Prints images/s and pixels/s, with the median of repeated
timings; device placement and sharding are exactly as in training.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import median_seconds_per_step  # noqa: E402

from lcseg import parallel  # noqa: E402
from lcseg.experiment import Experiment  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps per repeat.")
flags.DEFINE_integer("repeats", 3, "Repeats (the median is reported).")
flags.mark_flags_as_required(["config"])


def random_batch(rng: np.random.Generator, batch: int, size: int, num_classes: int):
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, (batch, size, size), dtype=np.uint8)}


def main(argv):
    del argv
    config = FLAGS.config
    experiment = Experiment(config)
    num_classes = experiment.metadata.num_classes
    rng = np.random.default_rng(0)
    state = experiment.init_state()
    params = sum(x.size for x in jax.tree.leaves(state.params))

    train_batch = parallel.shard_batch(
        random_batch(rng, config.batch_size, config.crop_size, num_classes), experiment.mesh)
    eval_batch = parallel.shard_batch(
        random_batch(rng, config.eval_batch_size, config.eval_tile_size, num_classes),
        experiment.mesh)

    holder = {"state": state}

    def one_train_step():
        holder["state"], metrics = experiment.train_step(holder["state"], train_batch)
        return metrics

    def one_eval_step():
        return experiment.eval_step(holder["state"], eval_batch)

    for fn in (one_train_step, one_eval_step):  # compile and warm up
        jax.block_until_ready(fn())
    train_seconds = median_seconds_per_step(one_train_step, FLAGS.steps, FLAGS.repeats)
    eval_seconds = median_seconds_per_step(one_eval_step, FLAGS.steps, FLAGS.repeats)

    dtype = "bfloat16" if config.half_precision else "float32"
    print(f"model {config.model.name} {tuple(config.model.channels)}: {params:,} parameters, "
          f"{dtype} compute")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"train: batch {config.batch_size} x {config.crop_size}^2: "
          f"{train_seconds * 1e3:.1f} ms/step, {config.batch_size / train_seconds:.1f} images/s, "
          f"{config.batch_size * config.crop_size**2 / train_seconds / 1e6:.2f} Mpx/s")
    print(f"eval:  batch {config.eval_batch_size} x {config.eval_tile_size}^2: "
          f"{eval_seconds * 1e3:.1f} ms/step, {config.eval_batch_size / eval_seconds:.1f} "
          f"images/s, {config.eval_batch_size * config.eval_tile_size**2 / eval_seconds / 1e6:.2f}"
          " Mpx/s")


if __name__ == "__main__":
    app.run(main)
