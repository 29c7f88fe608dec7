"""The files of a predicted scene: GeoTIFF (or PNG) classes, colour PNG, probabilities,
and optionally one class's regions as polygons (``lcseg.polygons``).

``predict_file`` predicts one scene file and writes, per input ``<stem>``, the outputs
described in ``lcseg/predict/__main__.py``, under temporary names renamed when complete.
GeoTIFF outputs are written in whole blocks of ``BLOCK_SIZE`` rows as the predictor
finishes them, so memory stays bounded by a band of rows.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from absl import logging
from affine import Affine
from PIL import Image
from rasterio.windows import Window

from lcseg.data.metadata import IGNORE_COLOUR, DatasetMetadata
from lcseg.polygons import DRIVERS, PolygonWriter
from lcseg.predict.predictor import Predictor
from lcseg.predict.scenes import Scene, open_scene
from lcseg.provenance import KEY_PREFIX

PROBABILITY_FORMATS = ("none", "uint8", "float16")
# Rows per GeoTIFF write: a multiple of the tile height, so each tile is written once.
BLOCK_SIZE = 256
# GDAL's block cache (MB): a band of tiles is all that is reused.
GDAL_CACHE_MB = 128
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


class _Outputs:
    """The files of one scene, written under temporary names and renamed when complete."""

    def __init__(self, scene: Scene, output_dir: Path, stem: str, metadata: DatasetMetadata,
                 probabilities: str, polygons: int | None = None,
                 polygon_format: str = ".gpkg", polygon_min_area: float = 0.0,
                 provenance: Mapping[str, str] | None = None):
        self.scene, self.metadata = scene, metadata
        self.tags = {f"{TAG_PREFIX}{key}": str(value)
                     for key, value in (provenance or {}).items()}
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
                   "blockysize": BLOCK_SIZE, "compress": "deflate", "BIGTIFF": "IF_SAFER",
                   **options}
        if scene.geotiff:
            profile.update(crs=scene.crs, transform=scene.transform)
        dataset = rasterio.open(self._temporary[key], "w", **profile)
        if self.tags:
            dataset.update_tags(**self.tags)
        self._datasets[key] = dataset
        return dataset

    def _write_block(self, row: int, block: dict[str, np.ndarray]) -> None:
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
        if self._polygons is not None:
            self._polygons.add_rows(start, classes)
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
        if self._polygons is not None:  # First: the rows are all in, and it may refuse.
            self._polygons.close()
            logging.info("%s: %d polygons", self._polygon_path, self._polygons.count)
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
        # The classes file last: its presence means the scene is complete (a rerun skips
        # scenes by it).
        for key in sorted(self.paths, key=lambda key: key == "classes"):
            os.replace(self._temporary[key], self.paths[key])
        if self._polygons is not None:
            return {**self.paths, "polygons": self._polygon_path}
        return dict(self.paths)

    def abort(self) -> None:
        """Closes and deletes the temporary files (after a failure)."""
        if self._polygons is not None:
            self._polygons.abort()
        for dataset in self._datasets.values():
            try:
                dataset.close()
            except Exception:  # noqa: BLE001 - cleaning up after the real error.
                pass
        self._datasets = {}
        for path in self._temporary.values():
            path.unlink(missing_ok=True)


def _gdal_env() -> rasterio.Env:
    """GDAL settings for reading and writing one scene."""
    # GDAL's block cache counts towards resident memory; an explicit GDAL_CACHEMAX in the
    # environment wins.
    options = {} if "GDAL_CACHEMAX" in os.environ else {"GDAL_CACHEMAX": GDAL_CACHE_MB}
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
        try:
            for start, rows in predictor.predict_rows(scene, progress=progress):
                if should_stop is not None and should_stop():
                    raise PredictionStopped(f"{path}: stopped before row {start}; nothing "
                                            "of it was kept.")
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
