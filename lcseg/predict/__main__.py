"""Whole-scene inference: GeoTIFF (or JPEG / PNG) in, GeoTIFF (or PNG) out.

    python -m lcseg.predict --workdir runs/demo --input scenes/ --output predictions/ \
        [--checkpoint best|latest|STEP] [--tta none|flips|dihedral] [--overlap 0.5] \
        [--window N] [--batch N] [--probabilities none|uint8|float16] \
        [--bands 1,2,3] [--stretch none|percentile]
    python -m lcseg.predict --workdir runs/loveda --loveda_submission submission.zip \
        [--input DIR|GLOB] [--data_dir D] [--tta ...] [--overlap ...]

Everything about the model (architecture, classes, palette, normalisation) comes from
``WORKDIR/config.json`` and the checkpoint. ``--input`` is a file, a folder (its
``.tif/.tiff/.jpg/.jpeg/.png`` files) or a glob.

How a scene is predicted (``Predictor``):

* Sliding windows of a fixed size (``--window``, default ``config.eval_tile_size``) with
  stride ``window * (1 - overlap)``; the compiled function always sees the same
  ``[batch, window, window, 3]`` batch, so scenes of any size never recompile. Batches are
  sharded over all local devices.
* Scene borders are reflect-padded by half the overlap, so border pixels sit as deep
  inside a window as interior ones; windows that run past the scene see reflected pixels.
* Each window's softmax probabilities are multiplied by a smooth 2-D weight (a squared
  sine bump, highest at the centre, fading towards the edges but strictly positive), and
  summed in float32 together with the weights; a pixel's probabilities are the weighted
  sum divided by the weight sum. A window's edge (where convolutions saw padding) then
  counts little wherever another window covers the pixel, so there are no seams; a pixel
  covered by one window only (overlap 0) gets exactly that window's answer.
* Test-time augmentation (``--tta flips``: 4 flips; ``dihedral``: the 8 rotations and
  reflections) averages the probabilities after undoing each transform.
* Memory is bounded by a band of rows, not by the scene: the input is read in row bands
  (windowed reads; rows already read are reused by the next band of windows), only the
  rows that windows still cover are accumulated, and finished rows are written out in
  whole 256-row blocks. Predicting a 9000x9500 LandCover.ai-sized sheet with the demo
  model peaks at about 1.4 GB resident on a CPU, 0.7 GB of which is the loaded runtime
  and model; the COG's overviews are built from the written file, not from memory
  (``benchmarks/predict.py``).

Outputs, per input ``<stem>`` (written under temporary names, renamed when complete):

* GeoTIFF input: ``<stem>_classes.tif``, one uint8 band of class indices with the input's
  CRS and transform, nodata 255 (pixels the input marks as nodata, e.g. nodata in every
  band, an internal mask or alpha 0), a cloud-optimised GeoTIFF (COG: tiled, deflate,
  internal overviews by nearest neighbour), with the dataset palette as colour table, the
  class names in ``<stem>_classes.tif.aux.xml`` (category names and a raster attribute
  table, which gdalinfo and QGIS read) and the provenance tags ``lcseg_<key>`` (lcseg
  version, model, checkpoint step, config hash, window, overlap, TTA, ...: what a rerun
  compares to skip finished scenes); ``<stem>_colour.png``, the same classes as a
  paletted PNG in the dataset palette (nodata transparent). JPEG / PNG input:
  ``<stem>_classes.png`` (8-bit grey, the class indices) and ``<stem>_colour.png``.
* ``--probabilities uint8``: ``<stem>_probabilities.tif``, one band per class (named
  after it), ``round(255 * p)``; ``float16``: half-precision floats (GDAL's Float32 with
  NBITS=16, read back as float32), a COG with average overviews. Input nodata is carried
  as the file's mask.
* ``--polygons CLASS`` (a class name or index, e.g. ``building``): ``<stem>_<class>.gpkg``
  (``--polygon_format geojson``: ``.geojson``), the class's 4-connected regions as
  polygons with their holes, in the scene's CRS (pixel coordinates for JPEG / PNG), with
  attributes class_index, class_name and area; ``--polygon_min_area`` (CRS units
  squared) drops smaller ones. Streamed with the rows (``lcseg.polygons``): memory stays
  bounded by a band of rows plus the regions still open.

Input policy:

* 3-band 8-bit imagery is what the models are trained on. More than 3 bands: the first
  three are used as RGB (a log line says so), or choose them with ``--bands 3,2,1``
  (1-based, as GDAL counts). 1 or 2 bands (grey; a paletted GeoTIFF): an error. Paletted
  PNGs are decoded to their colours.
* 16-bit (or any non-8-bit) imagery is an error by default, naming the conversion to do;
  ``--stretch percentile`` instead maps each band's 2nd..98th percentile of the scene
  (estimated on at most ~1M decimated valid pixels) linearly to 0..255. This is a
  visual-style stretch, not the radiometry the model was trained on: check the results.
* JPEG and PNG are decoded with Pillow, as the dataset builders do (GDAL's JPEG decoder
  gives different pixels); 16-bit PNGs follow the 16-bit policy and are read with GDAL.

A region (many scenes, many processes; the user guide is docs/mapping.md):

* The same command on N processes predicts disjoint shares of the input list (about
  equal pixel counts, from the file headers), each on all its local devices. The shares
  come from jax.distributed when it runs (a multi-task SLURM or Open MPI job, or
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, as training
  starts it), else from ``--shard=I/N``, else from a SLURM job array
  (``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``) or a Kubernetes indexed Job
  (``JOB_COMPLETION_INDEX``, with ``--shard=/N`` or ``--shard_count=N``).
* Rerunning the same command skips scenes whose outputs are complete and carry the same
  provenance (lcseg version, model, config hash, checkpoint step and the options that
  change the outputs: window, overlap, TTA, probabilities, bands, stretch, polygons); a
  different checkpoint or option predicts them again.
* SIGTERM, SIGINT or the run's ``config.preemption_signal`` stop between row blocks: the
  scene in progress leaves nothing behind, finished ones stay, and the exit status is 75
  (a scheduler can requeue; the rerun goes on where it stopped).
* A scene that cannot be read or predicted (corrupt, wrong bands) is reported and skipped;
  the others are done and the exit status is 1 (``--fail_fast``: stop at the first).
* Each process writes ``lcseg-run-<I>-of-<N>.json`` into ``--output`` (scenes done,
  skipped as already done, failed with the reason; pixels; seconds), and logs one line
  per scene (i/N, Mpx/s, ETA).
* When every share is done (one process, or process 0 of a jax.distributed job), or with
  ``python -m lcseg.predict --finalize OUTPUT_DIR`` after a job array, the region is
  written as one product (``lcseg.predict.catalog``): ``mosaic_classes.vrt`` (and
  ``mosaic_probabilities.vrt``) and a STAC collection ``stac/collection.json``.

``--loveda_submission out.zip`` writes LoveDA's benchmark submission: one PNG per image of
the LoveDA test split (or of ``--input``), named exactly as the source file (``3514.png``),
1024x1024, uint8 class indices 0..6, zipped flat (no folder inside the zip).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from absl import app, flags, logging

from lcseg import cli, parallel
from lcseg.data import get_metadata
from lcseg.predict import catalog, region
from lcseg.predict.loveda import file_images, loveda_test_images, write_loveda_submission
from lcseg.predict.outputs import PROBABILITY_FORMATS, polygon_class
from lcseg.predict.predictor import Predictor
from lcseg.predict.scenes import GEOTIFF_SUFFIXES, STRETCH_MODES, open_scene, resolve_inputs
from lcseg.predict.windows import TTA_MODES
from lcseg.preemption import EXIT_STATUS, StopSignal
from lcseg.provenance import provenance
from lcseg.workdir import load_config

FLAGS = flags.FLAGS

# Defined at import: this module only ever runs as the program (``python -m
# lcseg.predict``); the library modules it imports claim no flag names.
flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints).")
flags.DEFINE_string("input", None, "A scene file, a folder of scenes, or a glob "
                    "(.tif/.tiff GeoTIFF, .jpg/.jpeg, .png).")
flags.DEFINE_string("output", None, "Folder for the predictions (created if needed).")
flags.DEFINE_string("checkpoint", "best", "'best' (validation mIoU), 'latest' or a step.")
flags.DEFINE_enum("tta", "none", TTA_MODES, "Test-time augmentation: none, flips (4) "
                  "or dihedral (8 rotations and reflections).")
flags.DEFINE_float("overlap", 0.5, "Fraction of a window shared with its neighbour, "
                   "in [0, 1).")
flags.DEFINE_integer("window", None, "Window side in pixels; default "
                     "config.eval_tile_size.")
flags.DEFINE_integer("batch", None, "Windows per batch (rounded up to a multiple of the "
                     "local devices); default config.eval_batch_size.")
flags.DEFINE_enum("probabilities", "none", PROBABILITY_FORMATS,
                  "Also write per-class probabilities as uint8 (0..255) or float16.")
flags.DEFINE_list("bands", None, "For inputs with more than 3 bands: the 1-based bands "
                  "to use as RGB, e.g. 3,2,1 (default: the first three).")
flags.DEFINE_enum("stretch", "none", STRETCH_MODES, "Non-8-bit inputs: 'none' refuses "
                  "them; 'percentile' maps each band's 2nd..98th percentile to 0..255.")
flags.DEFINE_string("polygons", None, "Also write this class's regions (a class name or "
                    "index) as polygons in the scene's CRS: <stem>_<class>.gpkg.")
flags.DEFINE_enum("polygon_format", "gpkg", ["gpkg", "geojson"],
                  "File format of --polygons: GeoPackage or GeoJSON.")
flags.DEFINE_float("polygon_min_area", 0.0, "--polygons: drop polygons smaller than this "
                   "(CRS units squared, e.g. m^2; pixels for JPEG / PNG inputs).")
flags.DEFINE_string("loveda_submission", None, "Write a LoveDA benchmark submission zip "
                    "of the test split (or of --input) instead of --output files.")
flags.DEFINE_string("data_dir", None, "TFDS data dir for --loveda_submission, if not "
                    "the one used for training.")
flags.DEFINE_string("shard", None, "Predict share I of N of the input list: I/N (0-based); "
                    "/N takes I from a job array (SLURM_ARRAY_TASK_ID or Kubernetes' "
                    "JOB_COMPLETION_INDEX). Default: from jax.distributed or a SLURM array.")
flags.DEFINE_integer("shard_count", None, "The number of shares, for a Kubernetes indexed "
                     "Job (the same as --shard=/N).")
flags.DEFINE_bool("fail_fast", False, "Stop at the first scene that cannot be predicted "
                  "(default: report it, predict the others, exit with status 1).")
flags.DEFINE_string("finalize", None, "Write the region's mosaics (VRT) and STAC catalog "
                    "from the complete scenes of this output folder, once every share of "
                    "a job array is done; nothing is predicted.")


def _check_output_names(paths: list[Path]) -> None:
    """Refuses inputs whose outputs would overwrite each other (same stem)."""
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem]} and {path} would write the same outputs "
                             f"({path.stem}_classes...): predict them into separate folders.")
        stems[path.stem] = path


def _check_options(*, workdir: str | None, checkpoint: str, overlap: float,
                   window: int | None, batch: int | None, bands: Sequence[Any] | None,
                   polygons: str | None, polygon_min_area: float) -> None:
    """Refuses bad flag values before anything is created or loaded (one line each)."""
    if not workdir:
        raise ValueError("Give --workdir (the training run to predict with).")
    if not (checkpoint in ("best", "latest") or str(checkpoint).isdigit()):
        raise ValueError(f"--checkpoint={checkpoint!r}: give best, latest or a step number.")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"--overlap={overlap}: give a fraction in [0, 1), e.g. 0.5.")
    if window is not None and window < 1:
        raise ValueError(f"--window={window}: give a positive number of pixels.")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch={batch}: give a positive number of windows.")
    if bands is not None and (len(bands) != 3
                              or not all(str(b).strip().isdigit() and int(b) >= 1
                                         for b in bands)):
        raise ValueError(f"--bands={','.join(map(str, bands))}: give three 1-based band "
                         "numbers, e.g. 3,2,1.")
    if not (math.isfinite(polygon_min_area) and polygon_min_area >= 0):
        raise ValueError(f"--polygon_min_area={polygon_min_area}: give an area >= 0 (CRS "
                         "units squared).")
    if polygon_min_area and polygons is None:
        raise ValueError("--polygon_min_area applies to --polygons: give --polygons CLASS.")


def _precheck(scenes: Sequence[Path], *, bands: Sequence[int] | None, stretch: str,
              fail_fast: bool) -> dict[Path, str]:
    """Opens each scene of the share (headers only) before the model is loaded: the reason
    each unusable one fails; with ``fail_fast`` the first one is an error at once."""
    failed = {}
    for path in scenes:
        try:
            open_scene(path, bands=bands, stretch=stretch).close()
        except region.SCENE_ERRORS as error:
            if fail_fast:
                raise ValueError(f"{error} (--fail_fast: nothing was predicted)") from None
            failed[path] = f"{type(error).__name__}: {' '.join(str(error).split())}"
            logging.error("%s cannot be predicted: %s", path, failed[path])
    return failed


def run(*, workdir: str | None, inputs: str | None, output: str | None,
        checkpoint: str = "best", tta: str = "none", overlap: float = 0.5,
        window: int | None = None, batch: int | None = None, probabilities: str = "none",
        bands: Sequence[int] | None = None, stretch: str = "none",
        polygons: str | None = None, polygon_format: str = "gpkg",
        polygon_min_area: float = 0.0, loveda_submission: str | None = None,
        data_dir: str | None = None, shard: str | None = None,
        shard_count: int | None = None, fail_fast: bool = False,
        progress: bool = True) -> region.RunSummary | list[str]:
    """What ``python -m lcseg.predict`` does (see the module docstring).

    Every flag is checked before anything is created, and the share's inputs (found,
    readable, 3 usable 8-bit bands) before the model is loaded, so a bad flag or input
    fails in seconds. Several processes: call ``parallel.initialize_multihost`` first.

    Args:
      workdir, inputs, output, checkpoint, tta, overlap, window, batch, probabilities,
        bands, stretch, polygons, polygon_format, polygon_min_area, loveda_submission,
        data_dir, shard, shard_count, fail_fast: the command's flags of the same names
        (``inputs`` is ``--input``).
      progress: show progress bars (on a terminal).

    Returns:
      The run summary (also written into ``output``), or the submission's file names.
    """
    _check_options(workdir=workdir, checkpoint=checkpoint, overlap=overlap, window=window,
                   batch=batch, bands=bands, polygons=polygons,
                   polygon_min_area=polygon_min_area)
    if loveda_submission and output:
        raise ValueError("--output and --loveda_submission are separate modes: give one.")
    if not loveda_submission and not (inputs and output):
        raise ValueError("Give --input and --output (or --loveda_submission).")
    if loveda_submission and (shard or shard_count):
        raise ValueError("--shard is for --output runs, not --loveda_submission.")
    distributed = jax.distributed.is_initialized() and jax.process_count() > 1
    this = region.resolve_shard(
        shard=shard, shard_count=shard_count,
        process=(jax.process_index(), jax.process_count()) if distributed else None)
    config = load_config(workdir)
    if polygons is not None:
        if loveda_submission:
            raise ValueError("--polygons writes files beside --output's: not with "
                             "--loveda_submission.")
        polygon_class(polygons, get_metadata(config.dataset.name))
    paths = resolve_inputs(inputs) if inputs else []
    if loveda_submission:
        for path in paths:
            open_scene(path, bands=bands, stretch=stretch).close()
        predictor = Predictor.from_workdir(workdir, checkpoint=checkpoint, window=window,
                                           batch_size=batch, overlap=overlap, tta=tta)
        if paths:
            images = file_images(paths, bands=bands, stretch=stretch)
        else:
            images = loveda_test_images(data_dir or config.dataset.data_dir,
                                        config.dataset.manual_dir)
        return write_loveda_submission(predictor, loveda_submission, images, progress=progress)

    _check_output_names(paths)
    scenes, pixels = region.share_of(paths, this)
    logging.info("Share %d of %d (%s): %d of %d scenes, %.1f of %.1f Mpx", this.index,
                 this.count, this.source, len(scenes), len(paths),
                 sum(pixels[p] for p in scenes) / 1e6, sum(pixels.values()) / 1e6)
    failed = _precheck(scenes, bands=bands, stretch=stretch, fail_fast=fail_fast)

    predictor = Predictor.from_workdir(workdir, checkpoint=checkpoint, window=window,
                                       batch_size=batch, overlap=overlap, tta=tta)
    logging.info("Checkpoint step %s, window %d, stride %d, batch %d, TTA %s, %d device(s)",
                 predictor.step, predictor.window, predictor.stride, predictor.batch_size,
                 tta, predictor.mesh.size)
    # What changes the outputs (not the batch or the device count: they change how the
    # windows are grouped, not what is computed for each).
    record = provenance(config, step=predictor.step, window=predictor.window,
                        overlap=predictor.overlap, tta=tta, probabilities=probabilities,
                        bands=",".join(map(str, bands)) if bands else "1,2,3",
                        stretch=stretch, polygons=polygons or "none",
                        polygon_format=polygon_format if polygons else "none",
                        polygon_min_area=polygon_min_area if polygons else 0.0)
    summary = region.RunSummary(this, record)
    signals = StopSignal(config.get("preemption_signal"),
                         on_stop="stopping at the next row block (the scene in progress "
                         "leaves nothing behind)")
    with signals as stop, region.StopCheck(stop, shared=distributed) as should_stop:
        try:
            region.predict_share(
                predictor, scenes, output, summary=summary, pixels=pixels, failed=failed,
                fail_fast=fail_fast, should_stop=should_stop,
                probabilities=probabilities, bands=bands, stretch=stretch,
                polygons=polygons, polygon_format=polygon_format,
                polygon_min_area=polygon_min_area, progress=progress)
        finally:
            if should_stop.reason is not None:
                summary.stopped = should_stop.reason
            summary_path = summary.write(output)
    logging.info("Run summary: %s", summary_path)
    # Every process meets here (a collective when there are several), stopped or not.
    complete = parallel.all_processes_true(summary.stopped is None)
    if this.count > 1 and not distributed:
        if summary.stopped is None:
            logging.info("Share %d of %d done. When every share is, run: python -m "
                         "lcseg.predict --finalize %s", this.index, this.count, output)
    elif complete and parallel.is_main_process() and any(
            p.suffix.lower() in GEOTIFF_SUFFIXES for p in paths):
        catalog.finalize(output)
    return summary


def finalize(output_dir: str) -> dict[str, Path]:
    """``--finalize``: the region's mosaics and catalog, once every share is done.

    Raises:
      ValueError: a share's run summary is missing or says it stopped before its end.
    """
    unfinished = region.unfinished_shares(output_dir)
    if unfinished:
        raise ValueError(f"--finalize {output_dir}: not every share is done: "
                         f"{'; '.join(unfinished)}. Run those shares again (a rerun "
                         "predicts only what is missing), then --finalize.")
    return catalog.finalize(output_dir)


def main(argv: Sequence[str]) -> None:
    """Runs the command on the parsed flags; prints what it wrote; exits 75 if stopped by a
    signal, 1 if a scene failed."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    with cli.exit_on_bad_input("lcseg.predict"):  # A user's mistake: one line, no traceback.
        if FLAGS.finalize:
            for name, path in finalize(FLAGS.finalize).items():
                print(f"Wrote {name}: {path}")
            return
        # Several processes (a SLURM / Open MPI job, JAX_* variables): each predicts a share.
        parallel.initialize_multihost()
        result = run(workdir=FLAGS.workdir, inputs=FLAGS.input, output=FLAGS.output,
                     checkpoint=FLAGS.checkpoint, tta=FLAGS.tta, overlap=FLAGS.overlap,
                     window=FLAGS.window, batch=FLAGS.batch,
                     probabilities=FLAGS.probabilities, bands=FLAGS.bands,
                     stretch=FLAGS.stretch, polygons=FLAGS.polygons,
                     polygon_format=FLAGS.polygon_format,
                     polygon_min_area=FLAGS.polygon_min_area,
                     loveda_submission=FLAGS.loveda_submission,
                     data_dir=FLAGS.data_dir, shard=FLAGS.shard,
                     shard_count=FLAGS.shard_count, fail_fast=FLAGS.fail_fast)
    if isinstance(result, list):
        print(f"Wrote {FLAGS.loveda_submission} ({len(result)} images)")
        return
    for entry in result.done:
        print("Wrote " + ", ".join(entry["outputs"]))
    print(f"{len(result.done)} scene(s) predicted, {len(result.skipped)} already done, "
          f"{len(result.failed)} failed; summary: {result.path(FLAGS.output)}")
    if result.stopped:
        print(f"Stopped by {result.stopped}: run the same command again to go on.",
              file=sys.stderr)
        sys.exit(EXIT_STATUS)
    if result.failed:
        first = result.failed[0]
        sys.exit(f"lcseg.predict: error: {len(result.failed)} scene(s) failed, e.g. "
                 f"{first['scene']}: {first['reason']} (all in {result.path(FLAGS.output)})")


if __name__ == "__main__":
    app.run(main)
