"""Whole-scene prediction speed and peak memory on a LandCover.ai-sized GeoTIFF.

    python benchmarks/predict.py [--workdir runs/demo] [--height 9000 --width 9500]
        [--overlaps 0,0.5] [--window N] [--batch N] [--time_limit 480]

Writes a 3-band uint8 GeoTIFF of ``height x width`` pixels (tiled, deflate; smooth
patterns plus noise, generated and written 256 rows at a time, never whole), then predicts
it with ``lcseg.predict`` once per overlap, each run in a fresh subprocess so that its
peak resident memory (``ru_maxrss``) is its own. Without ``--workdir`` the demo model
(configs/unet_synthetic.py) is trained for 30 steps into a temporary workdir first: the
figures are about the model's size, not its quality.

Prints, per overlap: windows, seconds, megapixels of scene per second, the resident
memory after the model is loaded (JAX, TensorFlow and the parameters) and the peak during
prediction. A run that passes ``--time_limit`` seconds is stopped; its rate so far and the
extrapolated full time are printed instead.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Trained workdir; default: train the demo model for "
                    "30 steps into a temporary one.")
flags.DEFINE_string("checkpoint", "latest", "Checkpoint of --workdir to use.")
flags.DEFINE_integer("height", 9000, "Scene height in pixels.")
flags.DEFINE_integer("width", 9500, "Scene width in pixels.")
flags.DEFINE_list("overlaps", ["0", "0.5"], "Overlaps to measure, one fresh process each.")
flags.DEFINE_integer("window", None, "Window side; default the config's eval_tile_size.")
flags.DEFINE_integer("batch", None, "Windows per batch; default the config's eval_batch_size.")
flags.DEFINE_integer("time_limit", 480, "Seconds after which a run is stopped and its "
                     "time extrapolated.")
flags.DEFINE_string("scratch", None, "Folder for the scene and outputs; default a temporary "
                    "one (deleted at the end).")
# Internal: one measured run (what the subprocesses execute).
flags.DEFINE_string("child_scene", None, "(internal) scene to predict in this process.")
flags.DEFINE_float("child_overlap", 0.5, "(internal) overlap of the child run.")
flags.DEFINE_string("child_output", None, "(internal) output folder of the child run.")

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


def train_demo(workdir: str) -> None:
    """30 steps of the demo config (evaluated and checkpointed at the end)."""
    command = [sys.executable, os.path.join(REPO_ROOT, "main.py"),
               "--config", os.path.join(REPO_ROOT, "configs/unet_synthetic.py"),
               "--workdir", workdir, "--config.num_train_steps=30",
               "--config.warmup_steps=5", "--config.eval_every_steps=30",
               "--config.checkpoint_every_steps=30", "--config.log_every_steps=10",
               "--config.data.workers=0"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"Training the demo model failed:\n{result.stderr[-3000:]}")


def child_run() -> None:
    """One measured prediction; prints progress lines and a final JSON line."""
    from lcseg import predict

    class ReportingPredictor(predict.Predictor):
        """Reports rows done as they finish (so a stopped run can be extrapolated)."""

        def predict_rows(self, scene, *, progress=False):
            begin = time.perf_counter()
            for start, rows in super().predict_rows(scene, progress=progress):
                yield start, rows
                print(json.dumps({"rows": start + len(rows), "peak_rss_mb": _rss_mb(),
                                  "seconds": time.perf_counter() - begin}), flush=True)

    started = time.perf_counter()
    predictor = ReportingPredictor.from_workdir(
        FLAGS.workdir, checkpoint=FLAGS.checkpoint, window=FLAGS.window,
        batch_size=FLAGS.batch, overlap=FLAGS.child_overlap)
    load_seconds = time.perf_counter() - started
    loaded_rss = _rss_mb()
    started = time.perf_counter()
    predict.predict_file(predictor, FLAGS.child_scene, FLAGS.child_output)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "done": True, "seconds": seconds, "load_seconds": load_seconds,
        "loaded_rss_mb": loaded_rss, "peak_rss_mb": _rss_mb(),
        "windows": predictor.last_stats["windows"],
        "accumulator_rows": predictor.last_stats["accumulator_rows"],
        "window": predictor.window, "stride": predictor.stride,
        "batch": predictor.batch_size}), flush=True)


def measure(workdir: str, scene: str, overlap: float, output: str) -> dict:
    """Runs one prediction in a fresh process; returns its figures (or its progress)."""
    command = [sys.executable, os.path.abspath(__file__), "--workdir", workdir,
               "--checkpoint", FLAGS.checkpoint, "--child_scene", scene,
               "--child_overlap", str(overlap), "--child_output", output]
    if FLAGS.window:
        command += ["--window", str(FLAGS.window)]
    if FLAGS.batch:
        command += ["--batch", str(FLAGS.batch)]
    log_path = os.path.join(output + ".log")
    with open(log_path, "w") as log:  # The child's (verbose) logs, shown if it fails.
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                   cwd=REPO_ROOT)
        last, deadline = {}, time.perf_counter() + FLAGS.time_limit
        for line in process.stdout:
            if line.startswith("{"):
                last = json.loads(line)
            if time.perf_counter() > deadline and not last.get("done"):
                process.kill()
                break
        process.wait()
    if not last.get("done"):
        if "rows" not in last:
            with open(log_path) as log:
                raise RuntimeError(f"The overlap {overlap} run failed:\n{log.read()[-3000:]}")
        last["stopped"] = True
    return last


def main(argv):
    del argv
    if FLAGS.child_scene:
        child_run()
        return
    with tempfile.TemporaryDirectory() as temporary:
        scratch = FLAGS.scratch or temporary
        os.makedirs(scratch, exist_ok=True)
        workdir = FLAGS.workdir
        if workdir is None:
            workdir = os.path.join(scratch, "demo")
            print("Training the demo model for 30 steps...", flush=True)
            started = time.perf_counter()
            train_demo(workdir)
            print(f"Trained in {time.perf_counter() - started:.0f} s", flush=True)
        scene = os.path.join(scratch, "scene.tif")
        started = time.perf_counter()
        write_scene(scene, FLAGS.height, FLAGS.width)
        megapixels = FLAGS.height * FLAGS.width / 1e6
        print(f"Scene {FLAGS.width}x{FLAGS.height} ({megapixels:.1f} Mpx, "
              f"{os.path.getsize(scene) / 2**20:.0f} MB on disk) written in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        for overlap in (float(o) for o in FLAGS.overlaps):
            figures = measure(workdir, scene, overlap, os.path.join(scratch, f"out{overlap}"))
            if figures.get("stopped"):
                rate = figures["rows"] * FLAGS.width / figures["seconds"] / 1e6
                print(f"overlap {overlap}: stopped after {figures['seconds']:.0f} s at row "
                      f"{figures['rows']}/{FLAGS.height}: {rate:.2f} Mpx/s, full scene "
                      f"~{megapixels / rate:.0f} s; peak RSS so far "
                      f"{figures['peak_rss_mb']:.0f} MB", flush=True)
                continue
            print(f"overlap {overlap}: window {figures['window']}, stride {figures['stride']}, "
                  f"batch {figures['batch']}, {figures['windows']} windows: "
                  f"{figures['seconds']:.1f} s, {megapixels / figures['seconds']:.2f} Mpx/s; "
                  f"RSS after loading the model {figures['loaded_rss_mb']:.0f} MB, peak "
                  f"{figures['peak_rss_mb']:.0f} MB (accumulator "
                  f"{figures['accumulator_rows']} rows); model load "
                  f"{figures['load_seconds']:.1f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
