"""Whole-scene prediction speed: scene megapixels/s, the device's busy share, peak memory.

    flock /tmp/lcseg-bench.lock python benchmarks/predict.py [--old /tmp/old]
        [--size 4096] [--windows 256,512] [--overlap 0.5] [--batch 8]
        [--demo_size 2048] [--unet_base_size 384 --unet_base_window 128]
        [--memory_height 0 --memory_width 0 --memory_window 512]

Writes a 3-band uint8 deflate GeoTIFF (tiled, smooth patterns plus noise, written 256 rows
at a time) and predicts it with ``lcseg.predict.predict_file`` (COG classes + colour PNG),
each measured run in a fresh process (its own compilation and peak resident memory).
With ``--old DIR`` (e.g. ``git worktree add /tmp/old <commit>``) every setting runs with
that copy of lcseg too, in the same invocation, so that the two are compared on the same
machine load. Per setting it prints:

* ``null model``: a 1x1 convolution (3 -> 6 classes) with the whole predictor around it
  (normalisation, softmax, window weights, blending): end-to-end Mpx/s on this machine,
  whose CPU is also the "device".
* ``host ceiling``: the same run with the device's work replayed at no cost (the model
  call returns a result computed beforehand; in the new code the on-device blending and
  classification too, replaying the class rows of a real run): what the host (reading,
  cutting windows, transfers, writing the COG and the PNG) sustains with an infinitely
  fast device. The old code's model call replays the real output of the scene's first
  batch for every batch (its host blends and classifies them as usual).
* ``demo`` (configs/unet_synthetic.py) and ``unet_base`` (random weights: speed does not
  depend on them): end-to-end Mpx/s. On CPU unet_base runs on a small scene with small
  windows (``--unet_base_size/_window``): it costs ~20 GFLOP per 128x128 window here.

``busy`` is the device's share of the run: the compiled model call's time on as many
batches as the scene has, called alone back to back (the faster of two tries), divided by
the whole run's time (COG and PNG writing included). On a shared CPU the two times are
taken seconds apart under whatever load the machine has: expect a few percent of noise.
``peak`` is the child's peak resident memory.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BLOCK_ROWS = 256


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def write_scene(path: str, height: int, width: int, *, seed: int = 0) -> None:
    """A smooth-patterned, noisy 3-band uint8 GeoTIFF, generated 256 rows at a time."""
    import rasterio

    rng = np.random.default_rng(seed)
    # Sums of a few separable sinusoids: large smooth "fields" that continue across blocks.
    frequencies = rng.uniform(1 / 3000, 1 / 150, (3, 4, 2))
    phases = rng.uniform(0, 2 * np.pi, (3, 4, 2))
    x = np.arange(width, dtype=np.float32)
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 3,
               "dtype": "uint8", "crs": "EPSG:2180",
               "transform": rasterio.Affine(0.25, 0, 500000, 0, -0.25, 300000),
               "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
               "BIGTIFF": "IF_SAFER"}
    with rasterio.open(path, "w", **profile) as dataset:
        for top in range(0, height, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, height - top)
            y = np.arange(top, top + rows, dtype=np.float32)[:, None]
            block = np.empty((3, rows, width), np.uint8)
            for band in range(3):
                value = 120.0 + np.zeros((rows, width), np.float32)
                for k in range(4):
                    fy, fx = frequencies[band, k]
                    py, px = phases[band, k]
                    value += 25 * np.sin(2 * np.pi * fy * y + py) * np.sin(
                        2 * np.pi * fx * x + px)
                value += rng.normal(0, 6, (rows, width)).astype(np.float32)
                block[band] = np.clip(value, 0, 255).astype(np.uint8)
            dataset.write(block, window=rasterio.windows.Window(0, top, width, rows))


# ---------------------------------------------------------------------------------------
# One measured run (a child process; imports lcseg from the code root it is given).
# ---------------------------------------------------------------------------------------


def _predictor(predict, kind: str, window: int, overlap: float, batch: int):
    """The predictor of a model kind: 'null' (1x1 convolution), 'demo' or 'unet_base'."""
    if kind == "null":
        import flax.linen as nn

        from lcseg.data import get_metadata

        class PixelModel(nn.Module):
            @nn.compact
            def __call__(self, images, *, train=False):
                return nn.Conv(6, (1, 1), name="head")(images)

        rng = np.random.default_rng(0)
        variables = {"params": {"head": {
            "kernel": rng.normal(0, 3, (1, 1, 3, 6)).astype(np.float32),
            "bias": rng.normal(0, 1, 6).astype(np.float32)}}}
        return predict.Predictor(PixelModel(), variables, metadata=get_metadata("synthetic"),
                                 mean=MEAN, std=STD, window=window, overlap=overlap,
                                 batch_size=batch)
    from configs import default, unet_synthetic
    from lcseg.experiment import Experiment

    config = unet_synthetic.get_config()
    if kind == "unet_base":
        config.model = default.get_config().model
        config.model.name = "unet_base"
        for fixed in ("channels", "conv_bias", "convs_per_level", "upsampling"):
            del config.model[fixed]  # The preset's own.
    experiment = Experiment(config)
    return predict.Predictor.from_experiment(experiment, experiment.init_state(),
                                             window=window, batch_size=batch,
                                             overlap=overlap)


def _replay_device(predictor, scene_path: str, predict) -> None:
    """Makes the predictor's device calls free: they return results computed beforehand."""
    import jax

    first = {}
    real_apply = predictor._apply

    def record_apply(variables, batch):
        if "weighted" not in first:
            first["weighted"] = real_apply(variables, batch)
        return first["weighted"]

    if not hasattr(predictor, "predict_bands"):  # The old code: host blending.
        predictor._apply = record_apply
        return
    bands, real_finisher = [], predictor._finisher

    def recording_finisher(*key):
        finish = real_finisher(*key)

        def run(sums, weight_sums):
            sums, weight_sums, *outputs = finish(sums, weight_sums)
            bands.append([np.asarray(output).copy() for output in outputs])
            return sums, weight_sums, *outputs
        return run

    predictor._finisher = recording_finisher
    with tempfile.TemporaryDirectory() as scratch:  # The recording run.
        predict.predict_file(predictor, scene_path, scratch)
    replay = [[jax.device_put(output) for output in outputs] for outputs in bands]
    position = iter(range(len(replay)))

    def replay_finisher(*key):
        def run(sums, weight_sums):
            return sums, weight_sums, *replay[next(position)]
        return run

    predictor._apply = record_apply
    predictor._blend = lambda sums, weight_sums, *args: (sums, weight_sums)
    predictor._finisher = replay_finisher


def child_run(options: dict) -> dict:
    """One measured prediction in this process; returns its figures."""
    sys.path.insert(0, options["code_root"])
    import jax

    from lcseg import predict

    window, overlap, batch = options["window"], options["overlap"], options["batch"]
    predictor = _predictor(predict, options["model"], window, overlap, batch)
    import rasterio
    with rasterio.open(options["scene"]) as dataset:
        height, width = dataset.height, dataset.width
    # Compile (and warm) everything on a few rows of windows of the scene's width.
    warm = np.zeros((min(height, 2 * window), width, 3), np.uint8)
    predict.predict_scene(predictor, warm)
    if options["replay"]:
        _replay_device(predictor, options["scene"], predict)
    loaded_rss = _rss_mb()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        predict.predict_file(predictor, options["scene"], scratch)
        seconds = time.perf_counter() - started
    windows = predictor.last_stats["windows"]
    busy = None
    if not options["replay"]:
        # The compiled model call alone, on as many batches as the scene has.
        batches = math.ceil(windows / predictor.batch_size)
        images = jax.device_put(np.random.default_rng(0).integers(
            0, 256, (predictor.batch_size, window, window, 3), dtype=np.uint8),
            predictor._batch_sharding)
        predictor._apply(predictor._variables, images).block_until_ready()
        alone = []
        for _ in range(2):  # The faster of two: a load spike elsewhere is not the model.
            started = time.perf_counter()
            for _ in range(batches):
                result = predictor._apply(predictor._variables, images)
            result.block_until_ready()
            alone.append(time.perf_counter() - started)
        busy = min(alone) / seconds
    return {"seconds": seconds, "mpx_s": height * width / seconds / 1e6, "busy": busy,
            "windows": windows, "loaded_rss_mb": loaded_rss, "peak_rss_mb": _rss_mb()}


def measure(**options) -> dict:
    """Runs ``child_run(options)`` in a fresh process."""
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(options)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            cwd=options["code_root"])
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        raise RuntimeError(f"Run {options} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    from absl import flags

    flags.DEFINE_string("old", None, "A copy of another lcseg version to compare with "
                        "(e.g. a git worktree of an older commit).")
    flags.DEFINE_integer("size", 4096, "Side of the scene of the null-model runs.")
    flags.DEFINE_list("windows", ["256", "512"], "Window sides of the null-model runs.")
    flags.DEFINE_float("overlap", 0.5, "Overlap of every run.")
    flags.DEFINE_integer("batch", 8, "Windows per batch.")
    flags.DEFINE_integer("demo_size", 2048, "Scene side of the demo-model run (0: skip).")
    flags.DEFINE_integer("demo_window", 256, "Window of the demo-model run.")
    flags.DEFINE_integer("unet_base_size", 384, "Scene side of the unet_base run (0: skip).")
    flags.DEFINE_integer("unet_base_window", 128, "Window of the unet_base run.")
    flags.DEFINE_integer("memory_height", 0, "Also predict a scene this tall with the "
                         "null model to report peak memory.")
    flags.DEFINE_integer("memory_window", 512, "Window of the --memory_height run.")
    flags.DEFINE_integer("memory_width", 0, "... and this wide.")
    FLAGS = flags.FLAGS
    FLAGS(sys.argv)
    codes = [("new", REPO_ROOT)] + ([("old", os.path.abspath(FLAGS.old))] if FLAGS.old else [])
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scenes = {}

        def scene(height, width):
            if (height, width) not in scenes:
                path = os.path.join(scratch, f"scene{height}x{width}.tif")
                write_scene(path, height, width)
                scenes[height, width] = path
            return scenes[height, width]

        settings = []
        for window in (int(w) for w in FLAGS.windows if w):
            for label, model, replay in (("host ceiling", "null", True),
                                         ("null model", "null", False)):
                settings.append((label, model, replay, FLAGS.size, FLAGS.size, window))
        if FLAGS.demo_size:
            settings.append(("demo", "demo", False, FLAGS.demo_size, FLAGS.demo_size,
                             FLAGS.demo_window))
        if FLAGS.unet_base_size:
            settings.append(("unet_base", "unet_base", False, FLAGS.unet_base_size,
                             FLAGS.unet_base_size, FLAGS.unet_base_window))
        if FLAGS.memory_height:  # The real null model: no replayed scene held in memory.
            settings.append(("null model", "null", False, FLAGS.memory_height,
                             FLAGS.memory_width, FLAGS.memory_window))
        print(f"{'setting':<14} {'scene':>10} {'window':>6} {'code':>4} {'Mpx/s':>7} "
              f"{'busy':>5} {'s':>6} {'peak MB':>8}", flush=True)
        for label, model, replay, height, width, window in settings:
            for code, root in codes:
                figures = measure(code_root=root, model=model, replay=replay,
                                  scene=scene(height, width), window=window,
                                  overlap=FLAGS.overlap, batch=FLAGS.batch)
                busy = "" if figures["busy"] is None else f"{figures['busy']:.2f}"
                print(f"{label:<14} {width:>5}x{height:<4} {window:>6} {code:>4} "
                      f"{figures['mpx_s']:>7.2f} {busy:>5} {figures['seconds']:>6.1f} "
                      f"{figures['peak_rss_mb']:>8.0f}", flush=True)
                rows.append({"setting": label, "height": height, "width": width,
                             "window": window, "code": code, **figures})
    print(json.dumps(rows))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_run(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
