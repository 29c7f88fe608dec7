"""Streams one class of a predicted class map out as polygons (GeoPackage or GeoJSON).

Whole-scene prediction produces the class map top to bottom in row blocks, for scenes
far larger than memory. :class:`PolygonWriter` turns the regions of one class into
polygons in the scene's CRS while the blocks arrive, holding only the current block, the
polygons that may still grow into the next block, and one batch of finished polygons::

    with PolygonWriter("buildings.gpkg", class_index=3, class_names=metadata.class_names,
                       transform=scene_transform, crs=scene_crs, width=width) as writer:
        for row0, probabilities in predictor.predict_rows(scene):
            writer.add_rows(row0, probabilities.argmax(-1).astype(np.uint8))

Regions are 4-connected (pixels sharing an edge; rasterio's default): two pixels that
touch only at a corner belong to different polygons. Holes are kept.

How blocks are merged: each block is polygonised on its own (``rasterio.features.shapes``)
in whole-scene pixel coordinates, where every vertex is an integer and unions are exact.
A polygon touching the block's bottom edge stays *open*; the next block's polygons join
it where a pixel above the block edge and the pixel below it are both in the class (one
point-in-polygon look-up per run of such columns), with union-find grouping chains of
joins (a U shape closing below, for example). A group that no longer touches the bottom
edge of the newest block cannot grow any more: its pieces are unioned, moved into the
scene's CRS with the affine transform, and written. Memory is thus one block plus the open
polygons; a region as large as the scene is held whole until it closes, which is
inherent in writing it as one polygon.

Formats. GeoJSON follows RFC 7946: coordinates in WGS 84 longitude/latitude (GDAL's
``RFC7946=YES`` reprojects from the scene's CRS at the conversion below), no ``crs``
member (the 2008 draft's), exteriors counter-clockwise; a scene without a CRS has
nothing to reproject from, so its GeoJSON holds pixel coordinates (use ``.gpkg``). The
GeoPackage keeps the scene's CRS and is written as version ``GPKG_VERSION`` (1.2), which
every GDAL since 2.2 reads without a warning (GDAL before 3.7, still in QGIS LTR
installs, reads pyogrio's default 1.4 as "partially supported"); lcseg uses nothing of
1.3 or 1.4. The ``area`` attribute is in the scene's CRS units squared in both.

Polygons are written in batches (pyogrio, append) to a temporary GeoPackage beside the
target, renamed over the target only when :meth:`PolygonWriter.close` succeeds; on an
error the temporary files are removed and an existing target is left as it was. GeoJSON
output is staged the same way and converted in one streaming pass at close (GDAL's Arrow
stream, batch by batch): appending to a GeoJSON file makes GDAL re-read all of it, which
would make writing quadratic in the output's size.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyogrio.raw
import rasterio.features
import shapely
from affine import Affine
from rasterio.crs import CRS

# Output suffix -> OGR driver.
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON"}
# Features per batch when converting the staged GeoPackage to GeoJSON.
_CONVERT_BATCH = 16384
# Polygons written per pyogrio call: large enough that per-call overhead (GDAL opens the
# file each time) is small, small enough that the batch never dominates memory.
DEFAULT_BATCH_SIZE = 4096
FIELDS = ["class_index", "class_name", "area"]
# GeoPackage version written (GPKG driver's VERSION creation option).
GPKG_VERSION = "1.2"
# SQLite files that a GeoPackage may leave beside itself if writing is interrupted.
_SQLITE_SIDECARS = ("-journal", "-wal", "-shm")


class _Group:
    """Pieces (one polygon per block, pixel coordinates) of one region still open.

    Attributes:
      pieces: every piece of the region so far; unioned only when the region is written,
        so a region spanning many blocks costs one union, not one per block.
      bottom: the pieces touching the bottom edge of the newest block, the only ones the
        next block can join.
    """

    __slots__ = ("pieces", "bottom")

    def __init__(self, pieces: list[shapely.Polygon], bottom: list[shapely.Polygon]):
        self.pieces = pieces
        self.bottom = bottom


class PolygonWriter:
    """Writes the regions of one class, streamed in row blocks, as polygons.

    Call :meth:`add_rows` with consecutive row blocks from row 0 down, then
    :meth:`close` (or use the writer as a context manager: an exception inside the
    ``with`` block discards the output instead). Features have the attributes
    ``class_index`` (int), ``class_name`` (str) and ``area`` (float, CRS units squared).
    """

    def __init__(self, path: str | os.PathLike, *, class_index: int,
                 class_names: Sequence[str], transform: Affine, crs: Any, width: int,
                 height: int | None = None, min_area: float = 0.0,
                 layer: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        """Checks the arguments and prepares the temporary output; writes nothing yet.

        Args:
          path: the output file; ``.gpkg`` (GeoPackage) or ``.geojson`` (GeoJSON).
          class_index: the class whose regions become polygons (a label value).
          class_names: every class's name, index ``i`` naming label value ``i``.
          transform: the scene's affine transform, pixel (col, row) -> CRS (x, y).
          crs: the scene's CRS (``rasterio.crs.CRS``, ``"EPSG:32633"``, WKT, ...), or
            None for a scene without one (the file then has no CRS; use ``.gpkg``, as
            readers take a GeoJSON file to be WGS 84). GeoJSON is reprojected from it
            to WGS 84 longitude/latitude (RFC 7946); a GeoPackage keeps it.
          width: the scene's width in pixels; every block must have it.
          height: the scene's height in pixels, if known: blocks past it are refused and
            :meth:`close` refuses to publish a scene with rows missing.
          min_area: polygons smaller than this (CRS units squared) are dropped.
          layer: the layer name; defaults to the class name.
          batch_size: polygons per write.

        Raises:
          ValueError: an unknown suffix, a class index outside ``class_names``, or a
            width, height, min_area or batch size that cannot be right.
        """
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in DRIVERS:
            raise ValueError(f"PolygonWriter: unknown output suffix {self.path.suffix!r} in "
                             f"{str(self.path)!r}; name the file with one of "
                             f"{', '.join(DRIVERS)}.")
        self.class_names = tuple(class_names)
        if not 0 <= class_index < len(self.class_names):
            raise ValueError(f"PolygonWriter: class_index {class_index} is out of range for "
                             f"{len(self.class_names)} classes; pass an index in "
                             f"0..{len(self.class_names) - 1} ({', '.join(self.class_names)}).")
        if width < 1:
            raise ValueError(f"PolygonWriter: width {width} must be a positive pixel count.")
        if height is not None and height < 1:
            raise ValueError(f"PolygonWriter: height {height} must be a positive pixel count "
                             "or None.")
        if not min_area >= 0:
            raise ValueError(f"PolygonWriter: min_area {min_area} must be >= 0.")
        if batch_size < 1:
            raise ValueError(f"PolygonWriter: batch_size {batch_size} must be >= 1.")
        self.driver = DRIVERS[suffix]
        self.class_index = int(class_index)
        self.transform = Affine(*tuple(transform)[:6])
        # pyogrio takes the CRS as text; WKT keeps a custom (non-EPSG) CRS intact.
        self.crs = None if crs is None else CRS.from_user_input(crs).to_wkt()
        self.width, self.height = int(width), height
        self.min_area = float(min_area)
        self.layer = layer or self.class_names[self.class_index]
        self.batch_size = batch_size
        # Hidden, unique, beside the target (same file system: the rename is atomic), and
        # ending in .gpkg: GDAL warns about a GeoPackage named otherwise.
        partial = f".{self.path.stem}.{uuid.uuid4().hex[:8]}.partial"
        self._staging = self.path.with_name(f"{partial}.gpkg")
        # GeoJSON is converted from the staged GeoPackage at close, into this file.
        self._temporary = (self._staging if self.driver == "GPKG"
                           else self.path.with_name(f"{partial}{self.path.suffix}"))
        self._next_row = 0
        self._last_row: np.ndarray | None = None  # The previous block's bottom row, masked.
        self._open: list[_Group] = []
        self._batch: list[shapely.Polygon] = []  # Finished, pixel coordinates.
        self._started = False  # Whether the staged GeoPackage exists.
        self._closed = False
        self.count = 0  # Polygons written.

    # -- streaming -------------------------------------------------------------------

    def add_rows(self, row0: int, labels: np.ndarray) -> None:
        """Adds the next row block of the class map.

        Args:
          row0: the block's first row in the scene; 0 for the first block, then the row
            after the previous block's last.
          labels: integer class indices, ``[rows, width]``.

        Raises:
          ValueError: a block out of order, of the wrong shape, or past ``height``. The
            writer is unchanged, so a corrected block may follow.
        """
        self._check_open()
        labels = np.asarray(labels)
        if row0 != self._next_row:
            raise ValueError(f"PolygonWriter.add_rows: got row0={row0} but the next row is "
                             f"{self._next_row}; pass consecutive row blocks from row 0, "
                             "top to bottom (as Predictor.predict_rows yields them).")
        if labels.ndim != 2 or labels.shape[1] != self.width or labels.shape[0] == 0:
            raise ValueError(f"PolygonWriter.add_rows: labels of shape {labels.shape}; "
                             f"expected [rows >= 1, {self.width}] (class indices, the "
                             "scene's width).")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"PolygonWriter.add_rows: labels of dtype {labels.dtype}; pass "
                             "integer class indices (e.g. probabilities.argmax(-1)).")
        rows = labels.shape[0]
        if self.height is not None and row0 + rows > self.height:
            raise ValueError(f"PolygonWriter.add_rows: rows {row0}..{row0 + rows - 1} run "
                             f"past the scene's height {self.height}; pass blocks within "
                             "the scene or the right height.")
        mask = labels == self.class_index
        pieces = _polygonise(mask, row0)
        bottom_edge = row0 + rows
        # Integer coordinates: == is exact.
        touches_bottom = (shapely.bounds(pieces)[:, 3] == bottom_edge if pieces
                          else np.zeros(0, bool))
        joins = self._joins(mask[0], row0, pieces)

        # Union-find over the open groups (nodes 0..G-1) and the new pieces (G..G+N-1).
        opened = len(self._open)
        parent = list(range(opened + len(pieces)))

        def find(node: int) -> int:
            while parent[node] != node:
                parent[node] = parent[parent[node]]
                node = parent[node]
            return node

        for group, piece in joins:
            a, b = find(group), find(opened + piece)
            if a != b:
                parent[a] = b
        members: dict[int, list[int]] = {}
        for node in range(len(parent)):
            members.setdefault(find(node), []).append(node)

        still_open: list[_Group] = []
        for nodes in members.values():
            region: list[shapely.Polygon] = []
            bottom: list[shapely.Polygon] = []
            for node in nodes:
                if node < opened:
                    region.extend(self._open[node].pieces)
                else:
                    piece = pieces[node - opened]
                    region.append(piece)
                    if touches_bottom[node - opened]:
                        bottom.append(piece)
            if bottom:
                still_open.append(_Group(region, bottom))
            else:
                # Nothing touches the newest bottom edge: the region is complete.
                self._finish(region)
        self._open = still_open
        self._last_row = mask[-1].copy()
        self._next_row = bottom_edge
        if len(self._batch) >= self.batch_size:
            self._flush()

    def _joins(self, first_row: np.ndarray, row0: int,
               pieces: list[shapely.Polygon]) -> list[tuple[int, int]]:
        """Which open groups the new pieces join: ``(group, piece)`` index pairs.

        Two pixels across the block edge, one above and one below, both in the class,
        join their regions. Along a run of such columns the pixels above are 4-connected
        to each other, as are those below, so one column per run is enough; each is
        located by a point-in-polygon look-up at the pixel centres. Pixels meeting only
        at a corner never join (4-connectivity).
        """
        if not self._open or not pieces or self._last_row is None:
            return []
        both = self._last_row & first_row
        starts = np.flatnonzero(both & ~np.concatenate([[False], both[:-1]]))
        if starts.size == 0:
            return []
        x = starts + 0.5
        above = shapely.points(x, np.full_like(x, row0 - 0.5))
        below = shapely.points(x, np.full_like(x, row0 + 0.5))
        bottoms = [(g, piece) for g, group in enumerate(self._open) for piece in group.bottom]
        group_of = np.array([g for g, _ in bottoms])
        # A pixel centre lies strictly inside the one polygon holding that pixel.
        run_a, hit_a = shapely.STRtree([p for _, p in bottoms]).query(
            above, predicate="intersects")
        run_b, hit_b = shapely.STRtree(pieces).query(below, predicate="intersects")
        group_at = np.full(starts.size, -1)
        group_at[run_a] = group_of[hit_a]
        piece_at = np.full(starts.size, -1)
        piece_at[run_b] = hit_b
        if (group_at < 0).any() or (piece_at < 0).any():
            # The masks say the pixel is in the class, so a polygon must hold it.
            raise RuntimeError(f"PolygonWriter: a pixel at row {row0} has no polygon; "
                               "this is a bug in lcseg.polygons.")
        return list(zip(group_at.tolist(), piece_at.tolist()))

    # -- output ----------------------------------------------------------------------

    def _finish(self, region: list[shapely.Polygon]) -> None:
        """Queues a complete region (its pieces) for writing."""
        if len(region) == 1:
            self._batch.append(region[0])
            return
        merged = shapely.union_all(region)
        # Pieces of one region share edges, so the union is one polygon; get_parts only
        # guarantees the layer's Polygon type should floating point ever split it.
        self._batch.extend(shapely.get_parts(merged).tolist())

    def _flush(self) -> None:
        """Writes the queued polygons: pixel -> CRS coordinates, min_area, append."""
        if not self._batch:
            return
        geometries = np.asarray(self._batch, dtype=object)
        self._batch = []
        t = self.transform
        matrix = np.array([[t.a, t.d], [t.b, t.e]])
        offset = np.array([t.c, t.f])
        # simplify(0) drops the collinear vertices that unions leave on block edges.
        geometries = shapely.simplify(geometries, 0.0)
        geometries = shapely.transform(geometries, lambda xy: xy @ matrix + offset)
        # A north-up transform (negative y scale) mirrors the rings; re-orient them to the
        # usual convention (exterior counter-clockwise, RFC 7946 for GeoJSON).
        geometries = shapely.orient_polygons(geometries)
        areas = shapely.area(geometries)
        keep = areas >= self.min_area
        geometries, areas = geometries[keep], areas[keep]
        if not geometries.size:
            return
        self._write(geometries, areas)

    def _write(self, geometries: np.ndarray, areas: np.ndarray) -> None:
        count = len(geometries)
        field_data = [np.full(count, self.class_index, np.int32),
                      np.full(count, self.class_names[self.class_index], object),
                      areas.astype(np.float64)]
        # The version is the file's (a creation option): given when it is created.
        options = {} if self._started else {"dataset_options": {"VERSION": GPKG_VERSION}}
        pyogrio.raw.write(self._staging, shapely.to_wkb(geometries), field_data,
                          fields=FIELDS, layer=self.layer, driver="GPKG",
                          geometry_type="Polygon", crs=self.crs, append=self._started,
                          **options)
        self._started = True
        self.count += count

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Writes the remaining polygons and publishes the file at ``path``.

        Raises:
          ValueError: ``height`` was given and rows are missing; nothing is published.
        """
        if self._closed:
            return
        try:
            if self.height is not None and self._next_row != self.height:
                raise ValueError(f"PolygonWriter.close: rows {self._next_row}.."
                                 f"{self.height - 1} of the scene's {self.height} were "
                                 "never added; add every row block before closing.")
            for group in self._open:
                self._finish(group.pieces)
            self._open = []
            self._flush()
            if not self._started:
                # No polygon at all: still publish a valid, empty layer with the CRS.
                self._write(np.zeros(0, object), np.zeros(0))
            if self._temporary != self._staging:
                self._convert()
                os.unlink(self._staging)
            os.replace(self._temporary, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _convert(self) -> None:
        """Copies the staged GeoPackage into the output format, streaming batches.

        GeoJSON: RFC 7946 (GDAL reprojects to WGS 84 lon/lat, writes no ``crs`` member).
        """
        options = ({"layer_options": {"RFC7946": "YES"}}
                   if self.driver == "GeoJSON" and self.crs is not None else {})
        with pyogrio.raw.open_arrow(self._staging, batch_size=_CONVERT_BATCH) as (meta,
                                                                                 stream):
            pyogrio.raw.write_arrow(stream, self._temporary, driver=self.driver,
                                    layer=self.layer, geometry_name=meta["geometry_name"],
                                    geometry_type="Polygon", crs=self.crs, **options)

    def abort(self) -> None:
        """Discards the output: removes the temporary file, leaves ``path`` untouched."""
        self._closed = True
        self._open, self._batch = [], []
        for name in {self._temporary, self._staging,
                     *(Path(f"{self._staging}{s}") for s in _SQLITE_SIDECARS)}:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"PolygonWriter for {str(self.path)!r} is closed; create a new "
                             "writer to write again.")

    def __enter__(self) -> PolygonWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _polygonise(mask: np.ndarray, row0: int) -> list[shapely.Polygon]:
    """The 4-connected regions of ``mask`` as polygons, in whole-scene pixel coordinates.

    x is the column and y the row (both pixel edges, so integers): rasterio's shapes with
    a translation by ``row0``.
    """
    if not mask.any():
        return []
    shapes = rasterio.features.shapes(mask.view(np.uint8), mask=mask, connectivity=4,
                                      transform=Affine.translation(0, row0))
    # Built in three vectorised calls (all vertices, then rings, then polygons) rather
    # than one shapely.Polygon per region: a third of the time on building-dense blocks.
    rings = []
    polygon_of_ring = []
    for index, (geometry, _) in enumerate(shapes):
        rings.extend(geometry["coordinates"])
        polygon_of_ring.extend([index] * len(geometry["coordinates"]))
    vertices = np.array(list(itertools.chain.from_iterable(rings)), dtype=np.float64)
    ring_of_vertex = np.repeat(np.arange(len(rings)), [len(ring) for ring in rings])
    # A polygon's first ring is its shell, the rest its holes (GeoJSON order).
    linear_rings = shapely.linearrings(vertices, indices=ring_of_vertex)
    return shapely.polygons(linear_rings, indices=polygon_of_ring).tolist()


def write_polygons(blocks: Iterable[tuple[int, np.ndarray]], path: str | os.PathLike,
                   **writer_args: Any) -> int:
    """Streams ``(row0, labels)`` blocks through a :class:`PolygonWriter`.

    Args:
      blocks: consecutive ``(first_row, class indices [rows, width])`` blocks.
      path: the output file (``.gpkg`` or ``.geojson``).
      **writer_args: :class:`PolygonWriter`'s keyword arguments.

    Returns:
      The number of polygons written.
    """
    with PolygonWriter(path, **writer_args) as writer:
        for row0, labels in blocks:
            writer.add_rows(row0, labels)
    return writer.count
