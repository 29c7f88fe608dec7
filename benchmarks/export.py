"""Exported ONNX models on this CPU: onnxruntime vs lcseg's jitted predict step.

    flock /tmp/lcseg-bench.lock python benchmarks/export.py [--batch 4]
        [--demo_tile 128] [--unet_base_tile 128] [--steps 3 --repeats 3]

For the demo model (configs/unet_synthetic.py) and unet_base (random weights: speed does
not depend on them), at the exported tile size, in one process so both runtimes see the
same machine load, it prints:

* ``export``: seconds ``lcseg.export.export_state`` takes (trace, convert, check);
* ``file``: the model's size in MiB (float32 weights) and its node count;
* ``lcseg``: images/s of ``Experiment.predict_step`` (jitted; normalisation, model,
  argmax) on a uint8 batch;
* ``onnxruntime``: images/s of the exported model (CPU provider, default threads;
  normalisation, model, softmax) on the same pixels as float32 in [0, 1];
* ``ratio``: onnxruntime's images/s over lcseg's.

Each figure is the median of ``--repeats`` timed runs of ``--steps`` calls, after one
warm-up call (which compiles lcseg's step).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 4, "Images per call.")
flags.DEFINE_integer("demo_tile", 128, "Exported tile of the demo model (its eval tile).")
flags.DEFINE_integer("unet_base_tile", 128, "Exported tile of unet_base (0: skip it).")
flags.DEFINE_integer("steps", 3, "Calls per timed run.")
flags.DEFINE_integer("repeats", 3, "Timed runs (the median is reported).")


def _config(kind: str):
    import ml_collections

    from configs import unet_synthetic

    config = unet_synthetic.get_config()
    if kind == "unet_base":
        config.model = ml_collections.ConfigDict({"name": "unet_base"})
    return config


def measure(kind: str, tile: int) -> dict[str, float]:
    """Export time, file size and images/s of both runtimes for one model."""
    import jax
    import onnxruntime

    from benchmarks.timing import median_seconds_per_step
    from lcseg import export
    from lcseg.experiment import Experiment

    config = _config(kind)
    experiment = Experiment(config)
    state = experiment.init_state()
    start = time.perf_counter()
    model = export.export_state(config, state, step=None, tile=tile, batch=FLAGS.batch)
    export_seconds = time.perf_counter() - start
    data = model.SerializeToString()

    images = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, tile, tile, 3),
                                               dtype=np.uint8)
    device_images = jax.device_put(images)
    jax.block_until_ready(experiment.predict_step(state, device_images))  # compile
    lcseg_seconds = median_seconds_per_step(
        lambda: experiment.predict_step(state, device_images), FLAGS.steps, FLAGS.repeats)

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    inputs = {"image": (images / np.float32(255)).astype(np.float32).transpose(0, 3, 1, 2)}
    session.run(None, inputs)  # warm-up
    onnx_seconds = median_seconds_per_step(lambda: session.run(None, inputs), FLAGS.steps,
                                           FLAGS.repeats)
    return {"export_s": export_seconds, "mib": len(data) / 2**20,
            "nodes": len(model.graph.node),
            "lcseg": FLAGS.batch / lcseg_seconds, "onnxruntime": FLAGS.batch / onnx_seconds}


def main(argv: list[str]) -> None:
    del argv
    rows = [("demo", FLAGS.demo_tile)]
    if FLAGS.unet_base_tile:
        rows.append(("unet_base", FLAGS.unet_base_tile))
    print(f"batch {FLAGS.batch}, median of {FLAGS.repeats} x {FLAGS.steps} calls, "
          f"{os.cpu_count()} CPUs")
    print(f"{'model':10s} {'tile':>5s} {'export s':>9s} {'file MiB':>9s} {'nodes':>6s} "
          f"{'lcseg img/s':>12s} {'onnxrt img/s':>13s} {'ratio':>6s}")
    for kind, tile in rows:
        r = measure(kind, tile)
        print(f"{kind:10s} {tile:5d} {r['export_s']:9.1f} {r['mib']:9.1f} {r['nodes']:6d} "
              f"{r['lcseg']:12.2f} {r['onnxruntime']:13.2f} "
              f"{r['onnxruntime'] / r['lcseg']:6.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
