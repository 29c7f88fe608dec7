"""Scenes: 3-band uint8 images that the predictor reads in bands of rows.

``open_scene`` opens an input file with the band and bit-depth policy of
``python -m lcseg.predict`` (see ``lcseg/predict/__main__.py``): GeoTIFFs (and 16-bit
PNGs) are read with rasterio in row bands (``RasterScene``), JPEG / PNG are decoded with
Pillow as the dataset builders do (``ImageScene``); ``ArrayScene`` wraps an image held in
memory. ``resolve_inputs`` lists the files that ``--input`` names.
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from absl import logging
from PIL import Image
from rasterio.enums import Resampling
from rasterio.windows import Window

STRETCH_MODES = ("none", "percentile")
GEOTIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
INPUT_SUFFIXES = GEOTIFF_SUFFIXES + IMAGE_SUFFIXES
# What lcseg.predict.outputs names its files: skipped when a folder is the input.
OUTPUT_SUFFIXES = ("_classes", "_colour", "_probabilities")
STRETCH_PERCENTILES = (2.0, 98.0)
STRETCH_SAMPLE_PIXELS = 1 << 20


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


def as_scene(image: np.ndarray | Scene, valid: np.ndarray | None = None, *,
             name: str = "<array>") -> Scene:
    """``image`` itself if it is a scene, else an ``ArrayScene`` of it.

    Args:
      image: a scene, or a uint8 ``[H, W, 3]`` image.
      valid: for an image, an optional bool ``[H, W]``, False where it has no data.
      name: for an image, what messages call it.

    Returns:
      The scene.
    """
    return image if isinstance(image, Scene) else ArrayScene(image, valid, name=name)


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
        # Masks are read through a handle of their own: the predictor reads pixels on one
        # thread while the outputs read masks on another (a GDAL dataset is not
        # thread-safe).
        self._mask_dataset: Any = None

    def _percentile_limits(self) -> np.ndarray:
        """Per band (low, high) percentiles of the valid pixels of a decimated read."""
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
        window = Window(0, start, self.width, stop - start)
        if not self._stretch:
            # Read straight into pixel-interleaved rows (GDAL follows the view's strides):
            # no band-by-band copy to transpose afterwards.
            rows = np.empty((stop - start, self.width, 3), np.uint8)
            self._dataset.read(self.bands, window=window, out=rows.transpose(2, 0, 1))
            return rows
        data = self._dataset.read(self.bands, window=window)
        if self._limits is None:
            self._limits = self._percentile_limits()
        low, high = self._limits[:, 0, None, None], self._limits[:, 1, None, None]
        scaled = (data.astype(np.float32) - low) / np.maximum(high - low, 1e-12) * 255.0
        data = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.transpose(data, (1, 2, 0)))

    def valid_rows(self, start: int, stop: int) -> np.ndarray | None:
        if not self._masked:
            return None
        if self._mask_dataset is None:
            self._mask_dataset = rasterio.open(self._dataset.name)
        # Invalid where every band is nodata, or where an internal mask / alpha says so.
        window = Window(0, start, self.width, stop - start)
        return self._mask_dataset.dataset_mask(window=window) > 0

    def close(self) -> None:
        self._dataset.close()
        if self._mask_dataset is not None:
            self._mask_dataset.close()


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
