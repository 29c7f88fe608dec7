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
  model peaks at about 1.2 GB resident, 0.7 GB of which is the loaded runtime and model
  (``benchmarks/predict.py``).

Outputs, per input ``<stem>`` (written under temporary names, renamed when complete):

* GeoTIFF input: ``<stem>_classes.tif``, one uint8 band of class indices with the input's
  CRS and transform, nodata 255 (pixels the input marks as nodata, e.g. nodata in every
  band, an internal mask or alpha 0), tiled, deflate, with the dataset palette as colour
  table; ``<stem>_colour.png``, the same classes as a paletted PNG in the dataset palette
  (nodata transparent). JPEG / PNG input: ``<stem>_classes.png`` (8-bit grey, the class
  indices) and ``<stem>_colour.png``.
* ``--probabilities uint8``: ``<stem>_probabilities.tif``, one band per class (named
  after it), ``round(255 * p)``; ``float16``: half-precision floats (GDAL's Float32 with
  NBITS=16, read back as float32). Input nodata is carried as the file's mask.
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

``--loveda_submission out.zip`` writes LoveDA's benchmark submission: one PNG per image of
the LoveDA test split (or of ``--input``), named exactly as the source file (``3514.png``),
1024x1024, uint8 class indices 0..6, zipped flat (no folder inside the zip).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from absl import app, flags, logging

from lcseg import cli
from lcseg.data import get_metadata
from lcseg.predict.loveda import file_images, loveda_test_images, write_loveda_submission
from lcseg.predict.outputs import PROBABILITY_FORMATS, polygon_class, predict_file
from lcseg.predict.predictor import Predictor
from lcseg.predict.scenes import STRETCH_MODES, open_scene, resolve_inputs
from lcseg.predict.windows import TTA_MODES
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
flags.mark_flags_as_required(["workdir"])


def _check_output_names(paths: list[Path]) -> None:
    """Refuses inputs whose outputs would overwrite each other (same stem)."""
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise ValueError(f"{stems[path.stem]} and {path} would write the same outputs "
                             f"({path.stem}_classes...): predict them into separate folders.")
        stems[path.stem] = path


def run(*, workdir: str, inputs: str | None, output: str | None, checkpoint: str = "best",
        tta: str = "none", overlap: float = 0.5, window: int | None = None,
        batch: int | None = None, probabilities: str = "none",
        bands: Sequence[int] | None = None, stretch: str = "none",
        polygons: str | None = None, polygon_format: str = "gpkg",
        polygon_min_area: float = 0.0, loveda_submission: str | None = None,
        data_dir: str | None = None, progress: bool = True) -> list[Any]:
    """What ``python -m lcseg.predict`` does (see the module docstring).

    Inputs are checked (found, readable, 3 usable 8-bit bands) before the model is loaded,
    so a bad input fails in seconds.

    Args:
      workdir, inputs, output, checkpoint, tta, overlap, window, batch, probabilities,
        bands, stretch, polygons, polygon_format, polygon_min_area, loveda_submission,
        data_dir: the command's flags of the same names (``inputs`` is ``--input``).
      progress: show progress bars (on a terminal).

    Returns:
      The per-file output dicts, or the submission's file names.
    """
    if loveda_submission and output:
        raise ValueError("--output and --loveda_submission are separate modes: give one.")
    if not loveda_submission and not (inputs and output):
        raise ValueError("Give --input and --output (or --loveda_submission).")
    if polygons is not None:
        if loveda_submission:
            raise ValueError("--polygons writes files beside --output's: not with "
                             "--loveda_submission.")
        polygon_class(polygons, get_metadata(load_config(workdir).dataset.name))
    paths = resolve_inputs(inputs) if inputs else []
    if not loveda_submission:
        _check_output_names(paths)
    for path in paths:
        open_scene(path, bands=bands, stretch=stretch).close()
    predictor = Predictor.from_workdir(workdir, checkpoint=checkpoint, window=window,
                                       batch_size=batch, overlap=overlap, tta=tta)
    logging.info("Checkpoint step %s, window %d, stride %d, batch %d, TTA %s, %d device(s)",
                 predictor.step, predictor.window, predictor.stride, predictor.batch_size,
                 tta, predictor.mesh.size)
    if loveda_submission:
        if paths:
            images = file_images(paths, bands=bands, stretch=stretch)
        else:
            config = load_config(workdir)
            images = loveda_test_images(data_dir or config.dataset.data_dir,
                                        config.dataset.manual_dir)
        return write_loveda_submission(predictor, loveda_submission, images, progress=progress)
    return [predict_file(predictor, path, output, probabilities=probabilities, bands=bands,
                         stretch=stretch, polygons=polygons, polygon_format=polygon_format,
                         polygon_min_area=polygon_min_area, progress=progress)
            for path in paths]


def main(argv: Sequence[str]) -> None:
    """Runs the command on the parsed flags; prints the files it wrote."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    with cli.exit_on_bad_input("lcseg.predict"):  # A user's mistake: one line, no traceback.
        results = run(workdir=FLAGS.workdir, inputs=FLAGS.input, output=FLAGS.output,
                      checkpoint=FLAGS.checkpoint, tta=FLAGS.tta, overlap=FLAGS.overlap,
                      window=FLAGS.window, batch=FLAGS.batch,
                      probabilities=FLAGS.probabilities, bands=FLAGS.bands,
                      stretch=FLAGS.stretch, polygons=FLAGS.polygons,
                      polygon_format=FLAGS.polygon_format,
                      polygon_min_area=FLAGS.polygon_min_area,
                      loveda_submission=FLAGS.loveda_submission,
                      data_dir=FLAGS.data_dir)
    if FLAGS.loveda_submission:
        print(f"Wrote {FLAGS.loveda_submission} ({len(results)} images)")
    else:
        for written in results:
            print("Wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    app.run(main)
