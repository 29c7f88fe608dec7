"""Every model of the zoo: parameters, training and inference speed at 512x512, memory.

    python benchmarks/models.py [--size 512] [--batch 2] [--steps 3] [--models a,b]

One row per registered model at its defaults (``unet`` is the milesial U-Net; the Cai &
Zhang presets; ``unetpp`` on ResNet-34; ``deeplabv3plus`` on ResNet-50 at output stride
16) plus ``deeplabv3plus_smp`` (segmentation_models_pytorch's layout on ResNet-34, the
22,438,485-parameter model of Cai & Zhang), ``swin_fpn`` on SwinV2-T and -B (the
LandCover.ai hackathon system) and ``hypercolumn`` (VGG16, all 13 layers). Each row runs
in its own subprocess, so that its peak memory is its own. There the model is built by
``lcseg.experiment.Experiment`` exactly as training builds it (configs/default.py with
``config.model`` replaced), and the compiled train step (forward, loss, backward,
optimizer) and inference step (forward and argmax) are timed on random batches after a
compiling call: the median of ``--steps`` calls, each waited for.

Columns: images/s of training and of inference, XLA's own analysis of the train step
(GFLOP per image, temporary buffers i.e. activations kept for the backward pass plus
workspace, per device) and the measured peak: the device's ``peak_bytes_in_use`` where
the backend reports it (GPU), otherwise the process's peak resident memory (CPU; it
includes the ~1 GiB of the Python process itself). bfloat16 compute on accelerators,
float32 on CPU (where XLA's bfloat16 convolutions are slower), as the configs choose.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from model_child import RESULT_PREFIX, measure  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("models", None, "Comma-separated rows of ROWS (default: all).")
flags.DEFINE_integer("size", 512, "Square image size for training and inference.")
flags.DEFINE_integer("batch", 2, "Global batch size of both steps.")
flags.DEFINE_integer("steps", 3, "Timed calls of each step (the median is reported).")
flags.DEFINE_enum("half_precision", "auto", ["auto", "true", "false"],
                  "bfloat16 compute; auto: on accelerators only.")
flags.DEFINE_string("dataset", "synthetic", "Dataset whose class count the heads get.")
flags.DEFINE_string("child", None, "Internal: benchmark this row and print its JSON.")
flags.DEFINE_bool("tiny", False, "The tests' tiny widths of each model "
                  "(configs/test_models.py), for smoke runs.")

# Row name -> config.model.
ROWS = {
    "unet": dict(name="unet"),
    "unet_base": dict(name="unet_base"),
    "unet_short": dict(name="unet_short"),
    "unet_skinny": dict(name="unet_skinny"),
    "unet_less_conv": dict(name="unet_less_conv"),
    "unetpp": dict(name="unetpp"),
    "deeplabv3plus": dict(name="deeplabv3plus"),
    "deeplabv3plus_smp": dict(name="deeplabv3plus", layout="smp", encoder="resnet34"),
    # The LandCover.ai hackathon system (SwinV2-B) and its small sibling.
    "swin_fpn_t": dict(name="swin_fpn", backbone="swin_v2_t"),
    "swin_fpn_b": dict(name="swin_fpn", backbone="swin_v2_b"),
    "hypercolumn": dict(name="hypercolumn"),
}


def median_seconds(step, steps: int) -> float:
    """Median wall time of ``steps`` calls of ``step``, each waited for."""
    import jax

    timings = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(step())
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def peak_memory_gib() -> tuple[float, str]:
    """The device's peak allocation if reported (GPU), else the process's peak RSS."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30, "device"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS"


def benchmark_row(row: str) -> dict:
    """Builds ``row`` as training does and measures it (runs in the child process)."""
    import jax
    import ml_collections
    import numpy as np

    from configs import default
    from lcseg import parallel
    from lcseg.experiment import Experiment
    from lcseg.models import count_parameters
    from lcseg.models.summary import step_summary

    config = default.get_config()
    config.dataset.name = FLAGS.dataset
    if FLAGS.tiny:
        from configs.test_models import TINY_MODELS

        # A row without a tiny entry of its own takes its model's.
        config.model = ml_collections.ConfigDict(
            TINY_MODELS.get(row, TINY_MODELS.get(ROWS[row]["name"])))
    else:
        config.model = ml_collections.ConfigDict(ROWS[row])
    config.batch_size = config.eval_batch_size = FLAGS.batch
    config.crop_size = config.eval_tile_size = FLAGS.size
    accelerator = jax.devices()[0].platform != "cpu"
    config.half_precision = (accelerator if FLAGS.half_precision == "auto"
                             else FLAGS.half_precision == "true")

    experiment = Experiment(config)
    state = experiment.init_state()
    rng = np.random.default_rng(0)
    shape = (FLAGS.batch, FLAGS.size, FLAGS.size)
    batch = parallel.shard_batch(
        {"image": rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
         "label": rng.integers(0, experiment.metadata.num_classes, shape, dtype=np.uint8)},
        experiment.mesh)

    start = time.perf_counter()
    predict_lowered = experiment.predict_step.lower(state, batch["image"])
    train_step = experiment.train_step.lower(state, batch).compile()
    predict_step = predict_lowered.compile()
    analysis = step_summary(experiment.lower_for_flops(state, batch), train_step,
                            batch_size=FLAGS.batch)
    predict_analysis = step_summary(predict_lowered, predict_step, batch_size=FLAGS.batch)
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def one_train_step():
        holder["state"], metrics = train_step(holder["state"], batch)
        return metrics

    jax.block_until_ready(one_train_step())  # First calls allocate; not timed.
    jax.block_until_ready(predict_step(holder["state"], batch["image"]))
    train_seconds = median_seconds(one_train_step, FLAGS.steps)
    predict_seconds = median_seconds(lambda: predict_step(holder["state"], batch["image"]),
                                     FLAGS.steps)
    peak, peak_kind = peak_memory_gib()
    return {"row": row, "parameters": count_parameters(holder["state"].params),
            "train_images_per_s": FLAGS.batch / train_seconds,
            "inference_images_per_s": FLAGS.batch / predict_seconds,
            "gflops_per_image": analysis["gflops_per_image"],
            "predict_gflops_per_image": predict_analysis["gflops_per_image"],
            "temp_gib": analysis.get("temp_gib", float("nan")), "peak_gib": peak,
            "peak_kind": peak_kind, "compile_s": compile_seconds,
            "dtype": "bfloat16" if config.half_precision else "float32",
            "num_classes": experiment.metadata.num_classes,
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.child:
        print(RESULT_PREFIX + json.dumps(benchmark_row(FLAGS.child)), flush=True)
        return
    rows = FLAGS.models.split(",") if FLAGS.models else list(ROWS)
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise app.UsageError(f"Unknown --models {unknown}; valid: {sorted(ROWS)}")
    results = []
    for row in rows:
        result = measure(row, size=FLAGS.size, batch=FLAGS.batch, steps=FLAGS.steps,
                         half_precision=FLAGS.half_precision, dataset=FLAGS.dataset,
                         tiny=FLAGS.tiny)
        if "error" in result:
            print(f"{row}: failed: {result['error']}", file=sys.stderr)
            continue
        results.append(result)
        print(f"{row}: done", file=sys.stderr, flush=True)
    if not results:
        return
    first = results[0]
    print(f"{first['devices']}, {first['dtype']} compute, batch {FLAGS.batch} of "
          f"{FLAGS.size}x{FLAGS.size}, {first['num_classes']} classes ({FLAGS.dataset}), "
          f"median of {FLAGS.steps} steps; peak memory: {first['peak_kind']}\n")
    print("| model | parameters | train img/s | inference img/s | GFLOP/img (train) "
          "| XLA temp GiB | peak GiB | compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['row']} | {r['parameters']:,} | {r['train_images_per_s']:.3g} | "
              f"{r['inference_images_per_s']:.3g} | {r['gflops_per_image']:.4g} | "
              f"{r['temp_gib']:.2f} | {r['peak_gib']:.2f} | {r['compile_s']:.0f} |")


if __name__ == "__main__":
    app.run(main)
