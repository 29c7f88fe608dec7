"""The files of a predicted scene: COG (or PNG) classes, colour PNG, probabilities,
and optionally one class's regions as polygons (``lcseg.polygons``).

``predict_file`` predicts one scene file and writes, per input ``<stem>``, the outputs
described in ``lcseg/predict/__main__.py``, under temporary names renamed when complete
(the classes file last). GeoTIFF outputs are written in whole blocks of ``BLOCK_SIZE``
rows as the predictor finishes them, on a thread of their own, then made cloud-optimised
(``lcseg.predict.formats``), so memory stays bounded by a band of rows. They carry the
run's provenance as tags (``read_provenance``).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from absl import logging
from affine import Affine
from PIL import Image
from rasterio.enums import Resampling
from rasterio.windows import Window

from lcseg.data.metadata import IGNORE_COLOUR, DatasetMetadata
from lcseg.polygons import DRIVERS, PolygonWriter
from lcseg.predict import formats
from lcseg.predict.formats import PalettePNG
from lcseg.predict.predictor import Predictor
from lcseg.predict.scenes import Scene, open_scene
from lcseg.provenance import KEY_PREFIX, utc_now

PROBABILITY_FORMATS = ("none", "uint8", "float16")
# Rows per GeoTIFF write: a multiple of the tile height, so each tile is written once.
BLOCK_SIZE = 256
# GDAL's block cache (MB): a band of tiles is all that is reused.
GDAL_CACHE_MB = 128
# Row bands queued for the writing thread (bounded: memory stays a few bands).
WRITE_BEHIND_BANDS = 3
# Provenance tags of the GeoTIFF outputs: ``lcseg_<key>`` (lcseg.provenance's KEY_PREFIX
# with '_' for ':'): GDAL keeps metadata as NAME=VALUE strings and splits NAME at the first
# ':' as well as '=', so rasterio (and gdalinfo's consumers) would misread 'lcseg:model'.
TAG_PREFIX = KEY_PREFIX.replace(":", "_")


class PredictionStopped(Exception):
    """``predict_file`` stopped between row blocks because ``should_stop()`` said so;
    nothing of the scene was left behind (no partial or temporary file)."""


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


def polygon_class(name_or_index: str, metadata: DatasetMetadata) -> int:
    """The class index of ``--polygons`` (a class name or index)."""
    if name_or_index in metadata.class_names:
        return list(metadata.class_names).index(name_or_index)
    if name_or_index.isdigit() and int(name_or_index) < metadata.num_classes:
        return int(name_or_index)
    raise ValueError(f"--polygons {name_or_index!r} is not a class of {metadata.name}: give "
                     f"one of {list(metadata.class_names)} or an index 0.."
                     f"{metadata.num_classes - 1}")


class _WriteBehind:
    """Runs a scene's writes in order on a thread of its own, behind the device (GDAL's
    compression and zlib release the GIL). An error stops the writes and is raised by
    the next ``submit`` or by ``join``."""

    def __init__(self, depth: int = WRITE_BEHIND_BANDS):
        self._tasks: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lcseg-write-behind",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with _gdal_env():
            while (task := self._tasks.get()) is not None:
                if self._error is None:
                    try:
                        task()
                    except BaseException as error:  # noqa: BLE001 - raised by the caller.
                        self._error = error

    def submit(self, task: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._tasks.put(task)

    def join(self, *, check: bool = True) -> None:
        """Waits for every write; raises the first error unless ``check`` is False."""
        if self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join()
        if check and self._error is not None:
            raise self._error


class _Outputs:
    """The files of one scene, written under temporary names and renamed when complete.

    GeoTIFF outputs are written as tiled GeoTIFFs in row blocks, then given overviews and
    copied into COGs (``formats.cloud_optimise``) when the scene is complete.
    """

    def __init__(self, scene: Scene, output_dir: Path, stem: str, metadata: DatasetMetadata,
                 probabilities: str, polygons: int | None = None,
                 polygon_format: str = ".gpkg", polygon_min_area: float = 0.0,
                 provenance: Mapping[str, str] | None = None):
        self.scene, self.metadata = scene, metadata
        self.tags = {f"{TAG_PREFIX}{key}": str(value)
                     for key, value in (provenance or {}).items()}
        if provenance is not None:
            # When the map was made (UTC). Not part of the record a rerun compares
            # (lcseg.predict.region.is_complete): the same model and options made it.
            self.tags[f"{TAG_PREFIX}time"] = utc_now()
        self.probabilities = probabilities
        suffix = ".tif" if scene.geotiff else ".png"
        self.paths = {"classes": output_dir / f"{stem}_classes{suffix}",
                      "colour": output_dir / f"{stem}_colour.png"}
        if probabilities != "none":
            self.paths["probabilities"] = output_dir / f"{stem}_probabilities.tif"
        if scene.geotiff:  # Category names and attribute table, where GDAL and QGIS look.
            self.paths["class_names"] = Path(f"{self.paths['classes']}.aux.xml")
        self._temporary = {key: path.with_name(f".{path.name}.partial")
                           for key, path in self.paths.items()}
        # The tiled GeoTIFFs written in row blocks, before they become COGs.
        self._tiled = {key: path.with_name(f".{path.name}.tiled.partial")
                       for key, path in self.paths.items() if path.suffix == ".tif"}
        self._datasets: dict[str, Any] = {}
        self._classes: list[np.ndarray] = []  # PNG outputs: the rows, written at the end.
        self._writer = _BlockWriter(self._write_block)
        self._colour = PalettePNG(self._temporary["colour"], width=scene.width,
                                  height=scene.height, palette=metadata.palette_array(),
                                  transparent=(metadata.ignore_label,))
        self._behind = _WriteBehind()
        self._polygons = None
        if polygons is not None:
            # The polygon writer stages and renames its own file (see lcseg.polygons).
            path = output_dir / f"{stem}_{metadata.class_names[polygons]}{polygon_format}"
            self._polygons = PolygonWriter(
                path, class_index=polygons, class_names=metadata.class_names,
                # Plain images: pixel coordinates (column, row), no CRS.
                transform=scene.transform if scene.geotiff else Affine.identity(),
                crs=scene.crs if scene.geotiff else None, width=scene.width,
                height=scene.height, min_area=polygon_min_area)
            self._polygon_path = path

    def _open(self, key: str, count: int, dtype: str, **options: Any):
        scene = self.scene
        profile = {"driver": "GTiff", "height": scene.height, "width": scene.width,
                   "count": count, "dtype": dtype, "tiled": True, "blockxsize": BLOCK_SIZE,
                   "blockysize": BLOCK_SIZE, "BIGTIFF": "IF_SAFER", **options}
        if scene.geotiff:
            profile.update(crs=scene.crs, transform=scene.transform)
        dataset = rasterio.open(self._tiled[key], "w", **profile)
        if self.tags:
            dataset.update_tags(**self.tags)
        self._datasets[key] = dataset
        return dataset

    def _write_block(self, row: int, block: dict[str, np.ndarray]) -> None:
        if not self._datasets:  # Opened lazily: nothing is created before the first block.
            if self.scene.geotiff:
                # Not compressed: the COG copy compresses it (a byte per pixel on disk
                # meanwhile; compressing twice took longer than the rest of the writing).
                classes = self._open("classes", 1, "uint8", nodata=self.metadata.ignore_label)
                classes.write_colormap(1, _colour_table(self.metadata))
            if self.probabilities != "none":
                # GDAL 3.10 has no Float16 type; Float32 with NBITS=16 stores half floats.
                options = {"NBITS": 16} if self.probabilities == "float16" else {}
                # Quickly compressed meanwhile: C bytes (or half floats) per pixel.
                options.update(compress="deflate", zlevel=1)
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

    def add(self, start: int, classes: np.ndarray, probabilities: np.ndarray | None) -> None:
        """Takes the final rows ``start..``: uint8 classes ``[rows, W]`` and, when the
        probabilities are written, ``[rows, W, C]`` (uint8, or float32 for float16)."""
        self._behind.submit(lambda: self._add(start, classes, probabilities))

    def _add(self, start: int, classes: np.ndarray, probabilities: np.ndarray | None) -> None:
        valid = self.scene.valid_rows(start, start + len(classes))
        if valid is not None:
            classes = np.where(valid, classes, np.uint8(self.metadata.ignore_label))
        if not self.scene.geotiff:
            self._classes.append(classes)
        if self._polygons is not None:
            self._polygons.add_rows(start, classes)
        self._colour.add_rows(classes)
        block = {"classes": classes}
        if probabilities is not None:
            block["probabilities"] = probabilities
        if valid is not None:
            block["valid"] = valid
        self._writer.add(block)

    def finish(self) -> dict[str, Path]:
        """Completes every file and renames it to its final name; returns the paths."""
        self._behind.join()
        if self._polygons is not None:  # First: the rows are all in, and it may refuse.
            self._polygons.close()
            logging.info("%s: %d polygons", self._polygon_path, self._polygons.count)
        self._writer.close()
        for dataset in self._datasets.values():
            dataset.close()
        self._datasets = {}
        self._colour.close()
        if "probabilities" in self._tiled:
            options = {"NBITS": 16} if self.probabilities == "float16" else {}
            formats.cloud_optimise(self._tiled["probabilities"],
                                   self._temporary["probabilities"],
                                   resampling=Resampling.average, **options)
        if self.scene.geotiff:
            formats.cloud_optimise(self._tiled["classes"], self._temporary["classes"],
                                   resampling=formats.CLASS_OVERVIEW_RESAMPLING)
            formats.write_class_names(self._temporary["class_names"],
                                      self.metadata.class_names, _colour_table(self.metadata))
        else:
            classes = np.concatenate(self._classes)
            Image.fromarray(classes, mode="L").save(self._temporary["classes"], format="PNG")
        self._remove(self._tiled.values())
        # The classes file last: its presence means the scene is complete (a rerun skips
        # scenes by it).
        for key in sorted(self.paths, key=lambda key: key == "classes"):
            os.replace(self._temporary[key], self.paths[key])
        written = {key: path for key, path in self.paths.items() if key != "class_names"}
        if self._polygons is not None:
            return {**written, "polygons": self._polygon_path}
        return written

    @staticmethod
    def _remove(paths: Any) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
            Path(f"{path}.aux.xml").unlink(missing_ok=True)  # GDAL's PAM, if it wrote one.

    def abort(self) -> None:
        """Closes and deletes the temporary files (after a failure or a stop)."""
        self._behind.join(check=False)
        if self._polygons is not None:
            self._polygons.abort()
        self._colour.abort()
        for dataset in self._datasets.values():
            try:
                dataset.close()
            except Exception:  # noqa: BLE001 - cleaning up after the real error.
                pass
        self._datasets = {}
        self._remove([*self._temporary.values(), *self._tiled.values()])


def _gdal_env() -> rasterio.Env:
    """GDAL settings for reading and writing one scene."""
    # GDAL's block cache counts towards resident memory; an explicit GDAL_CACHEMAX in the
    # environment wins.
    options = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB}
    if "GDAL_NUM_THREADS" not in os.environ:
        # Tiles decompressed (input) and compressed (COGs) on every core.
        options["GDAL_NUM_THREADS"] = "ALL_CPUS"
    return rasterio.Env(**options)


def predict_file(predictor: Predictor, path: str | os.PathLike, output_dir: str | os.PathLike,
                 *, probabilities: str = "none", bands: Sequence[int] | None = None,
                 stretch: str = "none", polygons: str | None = None,
                 polygon_format: str = "gpkg", polygon_min_area: float = 0.0,
                 progress: bool = False, provenance: Mapping[str, str] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, Path]:
    """Predicts one scene file and writes its outputs (see ``lcseg/predict/__main__.py``).

    Args:
      predictor: the predictor.
      path: the input (GeoTIFF, JPEG or PNG).
      output_dir: where ``<stem>_classes.*``, ``<stem>_colour.png`` (and
        ``<stem>_probabilities.tif``) go; created if needed.
      probabilities: ``'none'``, ``'uint8'`` or ``'float16'``.
      bands: 1-based input bands to use as RGB.
      stretch: ``'none'`` or ``'percentile'`` (non-8-bit inputs).
      polygons: a class name or index: also write that class's regions as polygons in
        ``<stem>_<class>.gpkg`` (or ``.geojson``), in the scene's CRS.
      polygon_format: ``'gpkg'`` or ``'geojson'``.
      polygon_min_area: drop polygons smaller than this (CRS units squared; pixels for
        plain images).
      progress: show a progress bar (on a terminal).
      provenance: what made the outputs (``lcseg.provenance.provenance``): written as
        GeoTIFF tags ``lcseg_<key>`` (``TAG_PREFIX``) on the classes and probabilities GeoTIFFs.
      should_stop: called between row blocks; when it returns True the scene is
        abandoned (its temporary files deleted) and ``PredictionStopped`` raised.

    Returns:
      ``{'classes': path, 'colour': path[, 'probabilities': path][, 'polygons': path]}``.
      The classes file is renamed into place last: its presence means the scene is
      complete.

    Raises:
      PredictionStopped: ``should_stop()`` returned True.
    """
    if probabilities not in PROBABILITY_FORMATS:
        raise ValueError(f"probabilities must be one of {PROBABILITY_FORMATS}, "
                         f"got {probabilities!r}")
    if f".{polygon_format}" not in DRIVERS:
        raise ValueError(f"polygon_format must be one of {[d[1:] for d in DRIVERS]}, "
                         f"got {polygon_format!r}")
    polygon_index = (polygon_class(polygons, predictor.metadata) if polygons is not None
                     else None)
    path = Path(path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (_gdal_env(), warnings.catch_warnings(),
          open_scene(path, bands=bands, stretch=stretch) as scene):
        # Outputs of JPEG / PNG inputs are not georeferenced, as expected.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        outputs = _Outputs(scene, output_dir, path.stem, predictor.metadata, probabilities,
                           polygon_index, f".{polygon_format}", polygon_min_area,
                           provenance)
        # float16 files are written from float32 (GDAL's NBITS=16 rounds them).
        returned = "float32" if probabilities == "float16" else probabilities
        bands = predictor.predict_bands(scene, probabilities=returned, progress=progress)
        try:
            for start, classes, rows in bands:
                if should_stop is not None and should_stop():
                    raise PredictionStopped(f"{path}: stopped before row {start}; nothing "
                                            "of it was kept.")
                outputs.add(start, classes, rows)
            written = outputs.finish()
        except BaseException:
            bands.close()  # Now, not when the traceback goes: stops the reading thread.
            outputs.abort()
            raise
    seconds = time.perf_counter() - started
    logging.info("%s: %dx%d px in %.1f s (%.2f Mpx/s) -> %s", path, scene.width, scene.height,
                 seconds, scene.width * scene.height / seconds / 1e6,
                 ", ".join(str(p) for p in written.values()))
    return written


def read_provenance(path: str | os.PathLike) -> dict[str, str] | None:
    """The provenance tags (``lcseg_<key>``, prefix removed) of a complete output.

    Args:
      path: a ``<stem>_classes.tif`` (or probabilities GeoTIFF) written by ``predict_file``.

    Returns:
      ``{key: value}``; None if the file is absent, unreadable or has no lcseg tag.
    """
    if not os.path.isfile(path):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as dataset:
                tags = dataset.tags()
    except rasterio.errors.RasterioError:
        return None
    record = {key[len(TAG_PREFIX):]: value for key, value in tags.items()
              if key.startswith(TAG_PREFIX)}
    return record or None
