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

import collections
import functools
import glob
import io
import math
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image

from lcseg import cli, parallel
from lcseg.data import open_split
from lcseg.data.metadata import IGNORE_COLOUR, DatasetMetadata
from lcseg.data.pipeline import normalize_images
from lcseg.experiment import Experiment, TrainState, compute_dtype, inference_variables

FLAGS = flags.FLAGS

TTA_MODES = ("none", "flips", "dihedral")
PROBABILITY_FORMATS = ("none", "uint8", "float16")
STRETCH_MODES = ("none", "percentile")
GEOTIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
INPUT_SUFFIXES = GEOTIFF_SUFFIXES + IMAGE_SUFFIXES
OUTPUT_SUFFIXES = ("_classes", "_colour", "_probabilities")
# Rows per GeoTIFF write: a multiple of the tile height, so each tile is written once.
BLOCK_SIZE = 256
# GDAL's block cache (MB): a band of tiles is all that is reused.
GDAL_CACHE_MB = 128
# Weight of a window's outermost pixels relative to its centre (see window_weights).
WEIGHT_FLOOR = 1e-3
STRETCH_PERCENTILES = (2.0, 98.0)
STRETCH_SAMPLE_PIXELS = 1 << 20
LOVEDA_SUBMISSION_SIZE = (1024, 1024)


def _define_flags() -> None:
    # Defined only when run as a program: importing this module (tests, lcseg.evaluate)
    # must not claim flag names that other lcseg commands define too.
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
    flags.DEFINE_string("loveda_submission", None, "Write a LoveDA benchmark submission zip "
                        "of the test split (or of --input) instead of --output files.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir for --loveda_submission, if not "
                        "the one used for training.")
    flags.mark_flags_as_required(["workdir"])


# ---------------------------------------------------------------------------------------
# Window geometry.
# ---------------------------------------------------------------------------------------


def window_weights(size: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """A smooth 2-D weight for a ``size x size`` window, strictly positive everywhere.

    The outer product of a squared-sine bump ``sin^2(pi (i + 1/2) / size)``, lifted so
    that its smallest value is ``floor``: 1 at the centre, falling smoothly to about
    ``floor`` at the edges. The floor keeps pixels that only a window's edge covers (a
    scene border at overlap 0) well defined; elsewhere edges count next to nothing.

    Args:
      size: window side in pixels.
      floor: weight of the outermost pixels, relative to the centre.

    Returns:
      float32 ``[size, size]``.
    """
    bump = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    one_d = floor + (1.0 - floor) * bump
    return np.outer(one_d, one_d).astype(np.float32)


def window_starts(length: int, window: int, stride: int, margin: int) -> np.ndarray:
    """First pixel of each window along an axis, in scene coordinates (may be negative).

    Windows start at ``-margin`` (the reflect padding) and step by ``stride`` until they
    cover ``length + margin`` pixels; the last may run further into the padding.
    """
    span = length + 2 * margin
    count = 1 + max(0, math.ceil((span - window) / stride))
    return -margin + stride * np.arange(count)


def reflect_indices(indices: np.ndarray, length: int) -> np.ndarray:
    """Maps coordinates outside ``[0, length)`` back inside by reflection (numpy 'reflect':
    the edge pixel is not repeated), repeatedly if a scene is smaller than the padding."""
    indices = np.asarray(indices)
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    folded = np.abs(indices) % period
    return np.where(folded >= length, period - folded, folded)


def _tta_transforms(mode: str) -> list[tuple[Callable, Callable]]:
    """(forward, inverse) pairs on NHWC arrays; inverse undoes forward on the output."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    if mode == "none":
        return [(lambda x: x, lambda x: x)]
    if mode == "flips":  # Flips are their own inverses.
        def flip(axes):
            return (lambda x: jnp.flip(x, axes)) if axes else (lambda x: x)
        return [(flip(axes), flip(axes)) for axes in ((), (2,), (1,), (1, 2))]
    pairs = []
    for turns in range(4):
        for mirrored in (False, True):
            def forward(x, turns=turns, mirrored=mirrored):
                return jnp.rot90(jnp.flip(x, 2) if mirrored else x, turns, axes=(1, 2))

            def inverse(x, turns=turns, mirrored=mirrored):
                x = jnp.rot90(x, -turns, axes=(1, 2))
                return jnp.flip(x, 2) if mirrored else x
            pairs.append((forward, inverse))
    return pairs


def _weighted_window_probabilities(variables: Any, images: jax.Array, *, model: Any,
                                   mean: tuple, std: tuple, dtype: jnp.dtype,
                                   transforms: list[tuple[Callable, Callable]],
                                   weights: np.ndarray) -> jax.Array:
    """uint8 windows ``[B, w, w, 3]`` -> weighted softmax probabilities ``[B, w, w, C]``."""
    inputs = normalize_images(images, mean, std, dtype)
    total = None
    for forward, inverse in transforms:
        logits = model.apply(variables, forward(inputs), train=False)
        probabilities = inverse(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        total = probabilities if total is None else total + probabilities
    # Weighting on device keeps the host's work to one add per window.
    return total * jnp.asarray(weights / len(transforms))[None, :, :, None]


# ---------------------------------------------------------------------------------------
# Scenes: 3-band uint8 images read in bands of rows.
# ---------------------------------------------------------------------------------------


class Scene:
    """A 3-band uint8 image that the predictor reads in bands of rows.

    Attributes:
      name: for messages (usually the file).
      height, width: size in pixels.
      geotiff: whether outputs are GeoTIFFs (with ``crs`` and ``transform``) or plain PNGs.
    """

    name: str = "<array>"
    height: int
    width: int
    geotiff: bool = False
    crs: Any = None
    transform: Any = None

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """uint8 ``[stop - start, width, 3]``: rows ``start..stop-1`` of the scene."""
        raise NotImplementedError

    def valid_rows(self, start: int, stop: int) -> np.ndarray | None:
        """bool ``[stop - start, width]``, False where the input has no data; None if the
        input has no nodata mask (every pixel valid)."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ArrayScene(Scene):
    """A scene held in memory (``predict_scene``: dataset examples, arrays)."""

    def __init__(self, image: np.ndarray, valid: np.ndarray | None = None, *,
                 name: str = "<array>"):
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{name}: expected a uint8 HxWx3 image, got {image.dtype} "
                             f"{image.shape}")
        if valid is not None and np.shape(valid) != image.shape[:2]:
            raise ValueError(f"{name}: valid mask {np.shape(valid)} does not match the image "
                             f"{image.shape[:2]}")
        self.image = image
        self.valid = None if valid is None else np.asarray(valid, bool)
        self.name = name
        self.height, self.width = image.shape[:2]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self.image[start:stop]

    def valid_rows(self, start: int, stop: int) -> np.ndarray | None:
        return None if self.valid is None else self.valid[start:stop]


def _resolve_bands(bands: Sequence[int] | None, count: int, name: str) -> tuple[int, ...]:
    """The three 1-based bands to use as RGB (clear errors for unusable inputs)."""
    if bands is None:
        if count < 3:
            raise ValueError(
                f"{name} has {count} band{'s' if count > 1 else ''}; lcseg models take "
                "3-band RGB imagery. Convert it to RGB (a grey or single-band paletted raster "
                "cannot be predicted as is).")
        if count > 3:
            logging.info("%s has %d bands: using bands 1, 2, 3 as RGB (choose others with "
                         "--bands).", name, count)
        return (1, 2, 3)
    message = (f"--bands {','.join(map(str, bands))} for {name}: give three 1-based band "
               f"numbers between 1 and {count}.")
    try:
        bands = tuple(int(b) for b in bands)
    except ValueError:
        raise ValueError(message) from None
    if len(bands) != 3 or not all(1 <= b <= count for b in bands):
        raise ValueError(message)
    return bands


def _not_8_bit_error(name: str, dtype: str) -> ValueError:
    return ValueError(
        f"{name} is {dtype}, not 8-bit: lcseg models are trained on 8-bit RGB imagery. "
        "Convert it to 8 bits with the scaling your data needs (e.g. `gdal_translate -ot "
        "Byte -scale MIN MAX 0 255 in.tif out.tif`), or pass --stretch percentile to map "
        "each band's 2nd..98th percentile of the scene to 0..255.")


class RasterScene(Scene):
    """A raster file read with rasterio in row bands (windowed reads, never whole)."""

    def __init__(self, path: str | os.PathLike, *, bands: Sequence[int] | None = None,
                 stretch: str = "none", geotiff: bool = True):
        import rasterio  # Imported here: the library stays importable without GDAL work.

        if stretch not in STRETCH_MODES:
            raise ValueError(f"stretch must be one of {STRETCH_MODES}, got {stretch!r}")
        self.name = str(path)
        try:
            with warnings.catch_warnings():  # Plain images are not georeferenced: fine.
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                self._dataset = rasterio.open(path)
        except rasterio.errors.RasterioIOError as error:
            raise ValueError(f"{path} is not a readable raster: {error}") from error
        dataset = self._dataset
        try:
            self.bands = _resolve_bands(bands, dataset.count, self.name)
            dtypes = {dataset.dtypes[b - 1] for b in self.bands}
            if dtypes != {"uint8"} and stretch == "none":
                raise _not_8_bit_error(self.name, "/".join(sorted(dtypes)))
        except Exception:
            dataset.close()
            raise
        self.height, self.width = dataset.height, dataset.width
        self.geotiff = geotiff
        self.crs, self.transform = dataset.crs, dataset.transform
        self._masked = any(rasterio.enums.MaskFlags.all_valid not in dataset.mask_flag_enums[b - 1]
                           for b in self.bands)
        # Computed on the first read, so that opening a scene to check it stays cheap.
        self._stretch = dtypes != {"uint8"}
        self._limits = None

    def _percentile_limits(self) -> np.ndarray:
        """Per band (low, high) percentiles of the valid pixels of a decimated read."""
        from rasterio.enums import Resampling

        dataset = self._dataset
        step = max(1, math.ceil(math.sqrt(dataset.height * dataset.width
                                          / STRETCH_SAMPLE_PIXELS)))
        shape = (math.ceil(dataset.height / step), math.ceil(dataset.width / step))
        sample = dataset.read(self.bands, out_shape=(3, *shape),
                              resampling=Resampling.nearest).astype(np.float64)
        valid = dataset.dataset_mask(out_shape=shape) > 0
        if not valid.any():
            raise ValueError(f"{self.name} has no valid pixel to compute a stretch from.")
        limits = np.array([np.percentile(band[valid], STRETCH_PERCENTILES) for band in sample])
        logging.info("%s: stretching bands %s from %s to 0..255", self.name, self.bands,
                     limits.round(3).tolist())
        return limits

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        from rasterio.windows import Window

        data = self._dataset.read(self.bands, window=Window(0, start, self.width, stop - start))
        if self._stretch:
            if self._limits is None:
                self._limits = self._percentile_limits()
            low, high = self._limits[:, 0, None, None], self._limits[:, 1, None, None]
            scaled = (data.astype(np.float32) - low) / np.maximum(high - low, 1e-12) * 255.0
            data = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.transpose(data, (1, 2, 0)))

    def valid_rows(self, start: int, stop: int) -> np.ndarray | None:
        if not self._masked:
            return None
        from rasterio.windows import Window

        # Invalid where every band is nodata, or where an internal mask / alpha says so.
        return self._dataset.dataset_mask(window=Window(0, start, self.width, stop - start)) > 0

    def close(self) -> None:
        self._dataset.close()


def _png_bit_depth(path: str | os.PathLike) -> int:
    with open(path, "rb") as f:
        header = f.read(26)
    return header[24] if len(header) == 26 and header[:8] == b"\x89PNG\r\n\x1a\n" else 8


# Pillow modes converted to RGB when decoded (colour, but not stored as RGB).
_CONVERTED_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")


class ImageScene(Scene):
    """A JPEG / PNG decoded with Pillow, the decoder the dataset builders use, on first
    read (opening one only reads its header). Alpha 0 (or a palette's transparent
    colour) means no data."""

    def __init__(self, path: Path, *, bands: Sequence[int] | None = None):
        self.path, self.name = path, str(path)
        try:
            with Image.open(path) as image:
                mode, (self.width, self.height) = image.mode, image.size
                transparent = "transparency" in image.info
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise ValueError(f"{path} is not a readable image ({error}).") from error
        if mode == "P":  # Paletted: decoded to its colours.
            self._mode = "RGBA" if transparent else "RGB"
        elif mode in _CONVERTED_TO_RGB:
            self._mode = "RGB"
        else:
            self._mode = mode
        count = Image.getmodebands(self._mode)
        if count < 3:
            raise ValueError(f"{path} has {count} band{'s' if count > 1 else ''} (mode "
                             f"{mode}); lcseg models take 3-band RGB imagery. Convert it to "
                             "RGB.")
        self.bands = _resolve_bands(bands, count, self.name)
        self._image: np.ndarray | None = None
        self._valid: np.ndarray | None = None

    def _load(self) -> np.ndarray:
        if self._image is None:
            try:
                with Image.open(self.path) as image:
                    image.load()
                    if image.mode != self._mode:
                        image = image.convert(self._mode)
                    channels = np.asarray(image)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise ValueError(f"{self.path} is not a readable image ({error}).") from error
            if channels.dtype != np.uint8:
                raise _not_8_bit_error(self.name, str(channels.dtype))
            if self._mode == "RGBA":
                self._valid = channels[..., 3] > 0
            self._image = np.ascontiguousarray(channels[..., [b - 1 for b in self.bands]])
        return self._image

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self._load()[start:stop]

    def valid_rows(self, start: int, stop: int) -> np.ndarray | None:
        self._load()
        return None if self._valid is None else self._valid[start:stop]

    def close(self) -> None:
        self._image = self._valid = None


def _open_image(path: Path, *, bands: Sequence[int] | None, stretch: str) -> Scene:
    if path.suffix.lower() == ".png" and _png_bit_depth(path) == 16:
        # Pillow silently keeps the high byte of 16-bit RGB PNGs; GDAL reads them whole
        # (and the 16-bit policy applies).
        return RasterScene(path, bands=bands, stretch=stretch, geotiff=False)
    return ImageScene(path, bands=bands)


def open_scene(path: str | os.PathLike, *, bands: Sequence[int] | None = None,
               stretch: str = "none") -> Scene:
    """Opens an input scene, checking that it can be predicted (clear errors otherwise).

    Args:
      path: a ``.tif``/``.tiff`` (read in row bands with rasterio) or ``.jpg``/``.jpeg``/
        ``.png`` (decoded with Pillow on the first read).
      bands: 1-based bands to use as RGB; default the first three.
      stretch: ``'none'`` (non-8-bit inputs are an error) or ``'percentile'``.

    Returns:
      The scene (a context manager; close it when done). Opening reads headers only, so
      checking many inputs is cheap.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    suffix = path.suffix.lower()
    if suffix in GEOTIFF_SUFFIXES:
        return RasterScene(path, bands=bands, stretch=stretch)
    if suffix in IMAGE_SUFFIXES:
        return _open_image(path, bands=bands, stretch=stretch)
    raise ValueError(f"{path}: unsupported format {path.suffix!r}; supported: "
                     f"{', '.join(INPUT_SUFFIXES)}")


def resolve_inputs(spec: str) -> list[Path]:
    """The files that ``--input`` names: a file, a folder's images, or a glob's matches.

    Folders are not searched recursively; files that look like lcseg outputs
    (``*_classes``, ``*_colour``, ``*_probabilities``) are skipped in folders.

    Raises:
      FileNotFoundError: if nothing matches.
    """
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        paths = sorted(p for p in Path(spec).iterdir()
                       if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES
                       and not p.stem.endswith(OUTPUT_SUFFIXES))
        if not paths:
            raise FileNotFoundError(f"--input {spec}: the folder holds no "
                                    f"{'/'.join(INPUT_SUFFIXES)} file.")
        return paths
    if any(char in spec for char in "*?["):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                       if os.path.isfile(p))
        if not paths:
            raise FileNotFoundError(f"--input {spec}: the pattern matches no file.")
        return paths
    if os.path.isfile(spec):
        return [Path(spec)]
    raise FileNotFoundError(f"--input {spec}: no such file or folder.")


# ---------------------------------------------------------------------------------------
# The predictor.
# ---------------------------------------------------------------------------------------


class _RowCache:
    """The scene rows the current band of windows needs; reuses rows already read."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self.start = 0
        self.rows = np.zeros((0, scene.width, 3), np.uint8)
        self.reads: list[tuple[int, int]] = []

    def get(self, start: int, stop: int) -> np.ndarray:
        cached_stop = self.start + len(self.rows)
        if self.start <= start <= cached_stop:
            kept, read_from = self.rows[start - self.start:], cached_stop
        else:
            kept, read_from = self.rows[:0], start
        if stop > read_from:
            new = np.asarray(self.scene.read_rows(read_from, stop))
            if new.shape != (stop - read_from, self.scene.width, 3) or new.dtype != np.uint8:
                raise ValueError(f"{self.scene.name}: read_rows({read_from}, {stop}) gave "
                                 f"{new.dtype} {new.shape}")
            self.reads.append((read_from, stop))
            kept = np.concatenate([kept, new]) if len(kept) else new
        self.rows, self.start = kept, start
        return self.rows[:stop - start]


class _RowAccumulator:
    """Weighted probability sums (float32) for the scene rows windows still cover.

    Holds rows ``start..`` only: ``pop(until)`` normalises and hands out the rows that no
    later window touches, and drops them.
    """

    def __init__(self, height: int, width: int, num_classes: int, weights: np.ndarray):
        self.height, self.width = height, width
        self.weights = weights
        self.start = 0  # first scene row held
        self.stop = 0  # one past the last row a window has touched
        self._sums = np.zeros((0, width, num_classes), np.float32)
        self._weight_sums = np.zeros((0, width), np.float32)
        self.peak_rows = 0

    def _ensure(self, rows: int) -> None:
        if rows > len(self._sums):
            sums = np.zeros((rows, *self._sums.shape[1:]), np.float32)
            weight_sums = np.zeros((rows, self.width), np.float32)
            sums[:len(self._sums)] = self._sums
            weight_sums[:len(self._sums)] = self._weight_sums
            self._sums, self._weight_sums = sums, weight_sums
            self.peak_rows = rows

    def add(self, top: int, left: int, weighted: np.ndarray) -> None:
        size = weighted.shape[0]
        y0, y1 = max(top, 0), min(top + size, self.height)
        x0, x1 = max(left, 0), min(left + size, self.width)
        if y0 < self.start:
            raise AssertionError(f"window at row {top} touches finished rows (< {self.start})")
        self._ensure(y1 - self.start)
        rows = slice(y0 - self.start, y1 - self.start)
        inside = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        self._sums[rows, x0:x1] += weighted[inside]
        self._weight_sums[rows, x0:x1] += self.weights[inside]
        self.stop = max(self.stop, y1)

    def pop(self, until: int) -> tuple[int, np.ndarray] | None:
        """``(first_row, probabilities)`` of the rows before ``until``, or None if none."""
        start, count = self.start, until - self.start
        if count <= 0:
            return None
        probabilities = self._sums[:count] / self._weight_sums[:count, :, None]
        held = self.stop - start
        keep = max(held - count, 0)
        # Shift the rows still being accumulated to the front (numpy handles the overlap).
        self._sums[:keep] = self._sums[count:count + keep]
        self._weight_sums[:keep] = self._weight_sums[count:count + keep]
        self._sums[keep:held] = 0
        self._weight_sums[keep:held] = 0
        self.start = until
        self.stop = max(self.stop, until)
        return start, probabilities


class Predictor:
    """Sliding-window prediction of whole scenes with a fixed compiled window batch.

    Any Flax linen module works that is called as ``model.apply(variables, images,
    train=False)`` on float ``[N, H, W, 3]`` images and returns logits ``[N, H, W, C]``;
    ``Predictor.from_workdir`` builds one from a training run.

    Attributes:
      metadata: the dataset the model predicts (classes, palette, ignore label).
      window, stride, margin: window side, step between windows, reflect padding.
      batch_size: windows per compiled call (a multiple of the local devices).
      last_stats: figures of the last scene (windows, reads, accumulator rows).
    """

    def __init__(self, model: Any, variables: Any, *, metadata: DatasetMetadata,
                 mean: Sequence[float], std: Sequence[float], window: int,
                 overlap: float = 0.5, batch_size: int = 8, tta: str = "none",
                 dtype: jnp.dtype = jnp.float32, mesh: jax.sharding.Mesh | None = None):
        """Compiles nothing yet; the first batch compiles the window function once.

        Args:
          model: a Flax linen module (see the class docstring).
          variables: its variables (``{'params': ..., 'batch_stats': ...}``).
          metadata: dataset metadata; ``num_classes`` must match the model's logits.
          mean, std: per-channel normalisation of ``[0, 1]`` pixels (as in training).
          window: window side in pixels.
          overlap: fraction of a window shared with the next one, in ``[0, 1)``.
          batch_size: windows per call; rounded up to a multiple of the mesh size.
          tta: ``'none'``, ``'flips'`` or ``'dihedral'``.
          dtype: compute dtype of the normalised images.
          mesh: devices to shard window batches over; default all local devices.
        """
        if window < 1:
            raise ValueError(f"window must be a positive number of pixels, got {window}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.metadata = metadata
        self.num_classes = metadata.num_classes
        self.window = int(window)
        self.overlap = float(overlap)
        self.stride = max(1, round(self.window * (1.0 - self.overlap)))
        # Half the overlap of padding: border pixels sit as deep in a window as others.
        self.margin = (self.window - self.stride) // 2
        self.tta = tta
        self.mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
        self.batch_size = math.ceil(max(1, batch_size) / self.mesh.size) * self.mesh.size
        self.weights = window_weights(self.window)
        self._batch_sharding = parallel.batch_sharding(self.mesh)
        self._variables = jax.device_put(variables, parallel.replicated(self.mesh))
        function = functools.partial(
            _weighted_window_probabilities, model=model, mean=tuple(mean), std=tuple(std),
            dtype=dtype, transforms=_tta_transforms(tta), weights=self.weights)
        self._apply = jax.jit(function,
                              in_shardings=(parallel.replicated(self.mesh), self._batch_sharding),
                              out_shardings=self._batch_sharding)
        self.step: int | None = None
        self.last_stats: dict[str, int] = {}

    @classmethod
    def from_experiment(cls, experiment: Experiment, state: TrainState, *,
                        window: int | None = None, batch_size: int | None = None,
                        overlap: float = 0.5, tta: str = "none") -> Predictor:
        """A predictor for a restored train state of ``experiment`` (on its mesh).

        Args:
          experiment: the run's model, config and mesh.
          state: its train state (the variables evaluation uses: EMA parameters when the
            run keeps them, and BatchNorm statistics).
          window: window side; default ``config.eval_tile_size``.
          batch_size: windows per call; default ``config.eval_batch_size``.
          overlap: see ``Predictor``.
          tta: see ``Predictor``.

        Returns:
          The predictor.
        """
        config = experiment.config
        if config.data.downscale != 1:
            # Predicting full-resolution windows with a model trained on downscaled ones
            # would silently change the ground sampling distance it sees.
            raise ValueError(
                f"This model was trained with config.data.downscale={config.data.downscale}; "
                "whole-scene prediction runs at full resolution only. Resample the scene "
                f"by {config.data.downscale} first (e.g. gdalwarp -tr), then predict.")
        return cls(experiment.model, inference_variables(state),
                   metadata=experiment.metadata, mean=config.dataset.mean,
                   std=config.dataset.std, dtype=compute_dtype(config),
                   window=window or config.eval_tile_size,
                   batch_size=batch_size or config.eval_batch_size, overlap=overlap, tta=tta,
                   mesh=experiment.mesh)

    @classmethod
    def from_workdir(cls, workdir: str, *, checkpoint: str | int = "best",
                     window: int | None = None, batch_size: int | None = None,
                     overlap: float = 0.5, tta: str = "none") -> Predictor:
        """Restores ``checkpoint`` of a training workdir onto this process's devices.

        Args:
          workdir: a training workdir (``config.json`` and ``checkpoints/``).
          checkpoint: ``'best'``, ``'latest'`` or a step number.
          window, batch_size, overlap, tta: see ``from_experiment``.

        Returns:
          The predictor; ``predictor.step`` is the restored step.
        """
        # Imported here: training's modules (TensorFlow for summaries, among others) take
        # seconds to import, and a bad input should fail before that.
        from lcseg import checkpoints, train

        config = train.load_config(workdir)
        checkpointer = checkpoints.Checkpointer(
            os.path.join(workdir, train.CHECKPOINT_DIR), read_only=True)
        try:
            step = checkpointer.resolve_step(checkpoint)
            # This process's devices only: each process predicts its own scenes.
            experiment = train.Experiment(config, mesh=parallel.make_mesh(jax.local_devices()))
            state = checkpointer.restore(step, experiment.abstract_state())
        finally:
            checkpointer.close()
        predictor = cls.from_experiment(experiment, state, window=window,
                                        batch_size=batch_size, overlap=overlap, tta=tta)
        predictor.step = step
        return predictor

    def predict_rows(self, scene: Scene, *, progress: bool = False
                     ) -> Iterator[tuple[int, np.ndarray]]:
        """Predicts ``scene`` top to bottom, yielding rows as soon as they are final.

        Args:
          scene: the input.
          progress: show a progress bar (on a terminal).

        Yields:
          ``(first_row, probabilities)``: consecutive bands of rows, float32
          ``[rows, width, C]`` probabilities (the weighted mean over windows and TTA).
        """
        from tqdm import tqdm  # A dependency of tensorflow-datasets.

        height, width, size = scene.height, scene.width, self.window
        tops = window_starts(height, size, self.stride, self.margin)
        lefts = window_starts(width, size, self.stride, self.margin)
        columns = reflect_indices(np.arange(lefts[0], lefts[-1] + size), width)
        cache = _RowCache(scene)
        accumulator = _RowAccumulator(height, width, self.num_classes, self.weights)
        total = len(tops) * len(lefts)

        def windows() -> Iterator[tuple[int, int, np.ndarray]]:
            for top in tops:
                rows = reflect_indices(np.arange(top, top + size), height)
                low, high = int(rows.min()), int(rows.max()) + 1
                strip = cache.get(low, high)[rows - low][:, columns]
                for left in lefts:
                    start = left - lefts[0]
                    yield int(top), int(left), strip[:, start:start + size]

        in_flight: collections.deque = collections.deque()
        done = 0
        bar = tqdm(total=total, unit="window", desc=os.path.basename(scene.name),
                   disable=None if progress else True, file=sys.stderr, leave=False)

        def collect() -> tuple[int, np.ndarray] | None:
            nonlocal done
            positions, result = in_flight.popleft()
            weighted = np.asarray(result)  # Waits for this batch only.
            if weighted.shape[-1] != self.num_classes:
                raise ValueError(f"The model gives {weighted.shape[-1]} logits per pixel but "
                                 f"{self.metadata.name!r} has {self.num_classes} classes.")
            for (top, left), window_probabilities in zip(positions, weighted):
                accumulator.add(top, left, window_probabilities)
            done += len(positions)
            bar.update(len(positions))
            # Every window of the rows before the next window's row is in: those rows
            # are final.
            next_row = done // len(lefts)
            final = (height if next_row >= len(tops)
                     else min(max(int(tops[next_row]), 0), height))
            return accumulator.pop(final)

        positions, images = [], []
        try:
            for index, (top, left, image) in enumerate(windows()):
                positions.append((top, left))
                images.append(image)
                if len(images) < self.batch_size and index < total - 1:
                    continue
                # Fresh every time: the device may still read the previous batch's memory.
                batch = np.zeros((self.batch_size, size, size, 3), np.uint8)
                batch[:len(images)] = np.stack(images)
                in_flight.append((positions, self._apply(
                    self._variables, jax.device_put(batch, self._batch_sharding))))
                positions, images = [], []
                # One batch computes while the host accumulates the previous one.
                while len(in_flight) > 1:
                    if (rows := collect()) is not None:
                        yield rows
            while in_flight:
                if (rows := collect()) is not None:
                    yield rows
        finally:
            bar.close()
        self.last_stats = {
            "windows": total, "accumulator_rows": accumulator.peak_rows,
            "read_calls": len(cache.reads),
            "rows_read": sum(stop - start for start, stop in cache.reads),
            "max_rows_per_read": max((stop - start for start, stop in cache.reads), default=0)}


def predict_scene(predictor: Predictor, image: np.ndarray | Scene, *,
                  valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predicts a whole image held in memory (or a ``Scene``).

    Args:
      predictor: the predictor.
      image: uint8 ``[H, W, 3]``, or a scene.
      valid: optional bool ``[H, W]``, False where the image has no data.

    Returns:
      ``(classes, probabilities)``: uint8 ``[H, W]`` class indices (the ignore label where
      not valid) and float32 ``[H, W, C]`` probabilities (as predicted, everywhere).
    """
    scene = image if isinstance(image, Scene) else ArrayScene(image, valid)
    probabilities = np.empty((scene.height, scene.width, predictor.num_classes), np.float32)
    for start, rows in predictor.predict_rows(scene):
        probabilities[start:start + len(rows)] = rows
    classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
    mask = scene.valid_rows(0, scene.height)
    if mask is not None:
        classes[~mask] = predictor.metadata.ignore_label
    return classes, probabilities


# ---------------------------------------------------------------------------------------
# Writing predictions.
# ---------------------------------------------------------------------------------------


class _BlockWriter:
    """Buffers consecutive rows and hands them out in whole blocks of ``BLOCK_SIZE`` rows,
    so that each compressed GeoTIFF tile is written once (a tile written in parts is
    rewritten, and the file grows)."""

    def __init__(self, write: Callable[[int, dict[str, np.ndarray]], None]):
        self._write = write
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_rows = 0
        self._next_row = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self._pending.append(rows)
        self._pending_rows += len(next(iter(rows.values())))
        if self._pending_rows >= BLOCK_SIZE:
            self._flush(self._pending_rows // BLOCK_SIZE * BLOCK_SIZE)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)

    def _flush(self, count: int) -> None:
        data = {key: np.concatenate([rows[key] for rows in self._pending])
                for key in self._pending[0]}
        self._write(self._next_row, {key: value[:count] for key, value in data.items()})
        self._next_row += count
        self._pending_rows -= count
        self._pending = [{key: value[count:] for key, value in data.items()}]
        if not self._pending_rows:
            self._pending = []


def _colour_table(metadata: DatasetMetadata) -> dict[int, tuple[int, int, int, int]]:
    table = {index: (*colour, 255) for index, colour in enumerate(metadata.palette)}
    table[metadata.ignore_label] = (*IGNORE_COLOUR, 255)
    return table


class _Outputs:
    """The files of one scene, written under temporary names and renamed when complete."""

    def __init__(self, scene: Scene, output_dir: Path, stem: str, metadata: DatasetMetadata,
                 probabilities: str):
        self.scene, self.metadata = scene, metadata
        self.probabilities = probabilities
        suffix = ".tif" if scene.geotiff else ".png"
        self.paths = {"classes": output_dir / f"{stem}_classes{suffix}",
                      "colour": output_dir / f"{stem}_colour.png"}
        if probabilities != "none":
            self.paths["probabilities"] = output_dir / f"{stem}_probabilities.tif"
        self._temporary = {key: path.with_name(f".{path.name}.partial")
                           for key, path in self.paths.items()}
        self._datasets: dict[str, Any] = {}
        self._classes: list[np.ndarray] = []  # PNG outputs: the rows, written at the end.
        self._writer = _BlockWriter(self._write_block)

    def _open(self, key: str, count: int, dtype: str, **options: Any):
        import rasterio

        scene = self.scene
        profile = {"driver": "GTiff", "height": scene.height, "width": scene.width,
                   "count": count, "dtype": dtype, "tiled": True, "blockxsize": BLOCK_SIZE,
                   "blockysize": BLOCK_SIZE, "compress": "deflate", "BIGTIFF": "IF_SAFER",
                   **options}
        if scene.geotiff:
            profile.update(crs=scene.crs, transform=scene.transform)
        dataset = rasterio.open(self._temporary[key], "w", **profile)
        self._datasets[key] = dataset
        return dataset

    def _write_block(self, row: int, block: dict[str, np.ndarray]) -> None:
        from rasterio.windows import Window

        if not self._datasets:  # Opened lazily: nothing is created before the first block.
            if self.scene.geotiff:
                classes = self._open("classes", 1, "uint8", nodata=self.metadata.ignore_label)
                classes.write_colormap(1, _colour_table(self.metadata))
            if self.probabilities != "none":
                # GDAL 3.10 has no Float16 type; Float32 with NBITS=16 stores half floats.
                options = {"NBITS": 16} if self.probabilities == "float16" else {}
                dataset = self._open("probabilities", self.metadata.num_classes,
                                     "float32" if self.probabilities == "float16" else "uint8",
                                     **options)
                for index, name in enumerate(self.metadata.class_names):
                    dataset.set_band_description(index + 1, name)
        window = Window(0, row, self.scene.width, len(block["classes"]))
        if "classes" in self._datasets:
            self._datasets["classes"].write(block["classes"], 1, window=window)
        if "probabilities" in self._datasets:
            dataset = self._datasets["probabilities"]
            dataset.write(np.transpose(block["probabilities"], (2, 0, 1)), window=window)
            if "valid" in block:  # The input's nodata, as the file's own mask.
                dataset.write_mask(block["valid"], window=window)

    def add(self, start: int, probabilities: np.ndarray) -> None:
        """Takes the final rows ``start..`` given their probabilities ``[rows, W, C]``."""
        classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
        valid = self.scene.valid_rows(start, start + len(probabilities))
        if valid is not None:
            classes[~valid] = self.metadata.ignore_label
        if not self.scene.geotiff:
            self._classes.append(classes)
        block = {"classes": classes}
        if self.probabilities == "uint8":
            block["probabilities"] = np.round(probabilities * 255.0).astype(np.uint8)
        elif self.probabilities == "float16":
            block["probabilities"] = probabilities
        if valid is not None:
            block["valid"] = valid
        self._writer.add(block)

    def finish(self) -> dict[str, Path]:
        """Completes every file and renames it to its final name; returns the paths."""
        import rasterio
        import rasterio.shutil

        self._writer.close()
        for dataset in self._datasets.values():
            dataset.close()
        self._datasets = {}
        if self.scene.geotiff:
            # GDAL's PNG driver streams the copy row by row: bounded memory for any size.
            # PAM off: no .aux.xml next to the PNG.
            with rasterio.Env(GDAL_PAM_ENABLED="NO"):
                rasterio.shutil.copy(self._temporary["classes"], self._temporary["colour"],
                                     driver="PNG")
        else:
            classes = np.concatenate(self._classes)
            Image.fromarray(classes, mode="L").save(self._temporary["classes"], format="PNG")
            colour = Image.fromarray(classes, mode="P")
            colour.putpalette(self.metadata.palette_array().reshape(-1).tolist())
            colour.save(self._temporary["colour"], format="PNG",
                        transparency=self.metadata.ignore_label)
        for key, path in self.paths.items():
            os.replace(self._temporary[key], path)
        return dict(self.paths)

    def abort(self) -> None:
        """Closes and deletes the temporary files (after a failure)."""
        for dataset in self._datasets.values():
            try:
                dataset.close()
            except Exception:  # noqa: BLE001 - cleaning up after the real error.
                pass
        self._datasets = {}
        for path in self._temporary.values():
            path.unlink(missing_ok=True)


def _gdal_env():
    import rasterio

    # GDAL's block cache counts towards resident memory; an explicit GDAL_CACHEMAX in the
    # environment wins.
    options = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    return rasterio.Env(**options)


def predict_file(predictor: Predictor, path: str | os.PathLike, output_dir: str | os.PathLike,
                 *, probabilities: str = "none", bands: Sequence[int] | None = None,
                 stretch: str = "none", progress: bool = False) -> dict[str, Path]:
    """Predicts one scene file and writes its outputs (see the module docstring).

    Args:
      predictor: the predictor.
      path: the input (GeoTIFF, JPEG or PNG).
      output_dir: where ``<stem>_classes.*``, ``<stem>_colour.png`` (and
        ``<stem>_probabilities.tif``) go; created if needed.
      probabilities: ``'none'``, ``'uint8'`` or ``'float16'``.
      bands: 1-based input bands to use as RGB.
      stretch: ``'none'`` or ``'percentile'`` (non-8-bit inputs).
      progress: show a progress bar (on a terminal).

    Returns:
      ``{'classes': path, 'colour': path[, 'probabilities': path]}``.
    """
    if probabilities not in PROBABILITY_FORMATS:
        raise ValueError(f"probabilities must be one of {PROBABILITY_FORMATS}, "
                         f"got {probabilities!r}")
    path = Path(path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    import rasterio

    with (_gdal_env(), warnings.catch_warnings(),
          open_scene(path, bands=bands, stretch=stretch) as scene):
        # Outputs of JPEG / PNG inputs are not georeferenced, as expected.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        outputs = _Outputs(scene, output_dir, path.stem, predictor.metadata, probabilities)
        try:
            for start, rows in predictor.predict_rows(scene, progress=progress):
                outputs.add(start, rows)
            written = outputs.finish()
        except BaseException:
            outputs.abort()
            raise
    seconds = time.perf_counter() - started
    logging.info("%s: %dx%d px in %.1f s (%.2f Mpx/s) -> %s", path, scene.width, scene.height,
                 seconds, scene.width * scene.height / seconds / 1e6,
                 ", ".join(str(p) for p in written.values()))
    return written


# ---------------------------------------------------------------------------------------
# LoveDA benchmark submission.
# ---------------------------------------------------------------------------------------


def loveda_test_images(data_dir: str | None = None, manual_dir: str | None = None
                       ) -> Iterator[tuple[str, str, np.ndarray]]:
    """LoveDA's test images as ``(where, submission file name, image)``.

    Ids look like ``urban/3514``; the server wants the source file name, ``3514.png``.
    """
    source = open_split("loveda", "test", data_dir, manual_dir=manual_dir)
    for index in range(len(source)):
        example = source[index]
        yield (f"LoveDA test image {example['id']}",
               example["id"].rsplit("/", 1)[-1] + ".png", example["image"])


def file_images(paths: Iterable[str | os.PathLike], *, bands: Sequence[int] | None = None,
                stretch: str = "none") -> Iterator[tuple[str, str, Scene]]:
    """Input files as ``(where, submission file name, scene)``; each scene is closed when
    the next is requested."""
    for path in paths:
        with open_scene(path, bands=bands, stretch=stretch) as scene:
            yield str(path), Path(path).stem + ".png", scene


def write_loveda_submission(predictor: Predictor, output_zip: str | os.PathLike,
                            images: Iterable[tuple[str, str, np.ndarray | Scene]], *,
                            progress: bool = False) -> list[str]:
    """Writes a LoveDA benchmark submission: a flat zip of one class PNG per test image.

    Args:
      predictor: a predictor of a model trained on LoveDA (7 classes).
      output_zip: the zip to write (replaced only once complete).
      images: ``(where, file name, image)`` triples, e.g. ``loveda_test_images()`` or
        ``file_images(paths)``; ``where`` names the image in errors.
      progress: show a progress bar per image (on a terminal).

    Returns:
      The file names in the zip, in the order written.

    Raises:
      ValueError: a model not trained on LoveDA, an image that is not 1024x1024, two
        images with the same file name (the server identifies images by name), or none.
    """
    if predictor.metadata.name != "loveda":
        raise ValueError(f"A LoveDA submission needs a model trained on loveda; this one "
                         f"predicts {predictor.metadata.name!r} ({predictor.num_classes} "
                         "classes).")
    output_zip = Path(output_zip)
    output_zip.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_zip.with_name(f".{output_zip.name}.partial")
    sources: dict[str, str] = {}
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            for where, name, image in images:
                if name in sources:
                    raise ValueError(
                        f"{where} and {sources[name]} would both be {name} in the "
                        "submission, which identifies images by file name only: predict "
                        "them into separate submissions.")
                sources[name] = where
                scene = image if isinstance(image, Scene) else ArrayScene(image, name=where)
                if (scene.height, scene.width) != LOVEDA_SUBMISSION_SIZE:
                    raise ValueError(f"{where} is {scene.width}x{scene.height} px; LoveDA "
                                     "test images (and submissions) are 1024x1024.")
                probabilities = np.empty((scene.height, scene.width, predictor.num_classes),
                                         np.float32)
                for start, rows in predictor.predict_rows(scene, progress=progress):
                    probabilities[start:start + len(rows)] = rows
                # The server wants a class (0..6) for every pixel: no ignore label here.
                classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(classes, mode="L").save(buffer, format="PNG")
                archive.writestr(name, buffer.getvalue())  # At the root: a flat zip.
        if not sources:
            raise ValueError("No image to predict for the submission.")
        os.replace(temporary, output_zip)
    finally:
        temporary.unlink(missing_ok=True)
    logging.info("Wrote %s (%d images)", output_zip, len(sources))
    return list(sources)


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def _check_output_names(paths: list[Path]) -> None:
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
        loveda_submission: str | None = None, data_dir: str | None = None,
        progress: bool = True) -> list[Any]:
    """What ``python -m lcseg.predict`` does (see the module docstring).

    Inputs are checked (found, readable, 3 usable 8-bit bands) before the model is loaded,
    so a bad input fails in seconds.

    Returns:
      The per-file output dicts, or the submission's file names.
    """
    if loveda_submission and output:
        raise ValueError("--output and --loveda_submission are separate modes: give one.")
    if not loveda_submission and not (inputs and output):
        raise ValueError("Give --input and --output (or --loveda_submission).")
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
            from lcseg import train

            config = train.load_config(workdir)
            images = loveda_test_images(data_dir or config.dataset.data_dir,
                                        config.dataset.manual_dir)
        return write_loveda_submission(predictor, loveda_submission, images, progress=progress)
    return [predict_file(predictor, path, output, probabilities=probabilities, bands=bands,
                         stretch=stretch, progress=progress) for path in paths]


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    with cli.exit_on_bad_input("lcseg.predict"):  # A user's mistake: one line, no traceback.
        results = run(workdir=FLAGS.workdir, inputs=FLAGS.input, output=FLAGS.output,
                      checkpoint=FLAGS.checkpoint, tta=FLAGS.tta, overlap=FLAGS.overlap,
                      window=FLAGS.window, batch=FLAGS.batch,
                      probabilities=FLAGS.probabilities, bands=FLAGS.bands,
                      stretch=FLAGS.stretch, loveda_submission=FLAGS.loveda_submission,
                      data_dir=FLAGS.data_dir)
    if FLAGS.loveda_submission:
        print(f"Wrote {FLAGS.loveda_submission} ({len(results)} images)")
    else:
        for written in results:
            print("Wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
