"""File formats of the predicted maps: cloud-optimised GeoTIFFs, their class names, and a
paletted PNG written row by row.

* ``cloud_optimise``: a tiled GeoTIFF written in row blocks gets internal overviews and is
  copied into GDAL's COG layout (``rasterio.shutil.copy(driver='COG')``); GDAL streams
  both steps block by block, so memory stays bounded on scenes of any size (the COG
  driver alone would build the file from a whole temporary copy when it closes).
* ``write_class_names``: category names and a raster attribute table in the PAM
  ``<file>.aux.xml`` GDAL keeps beside a raster (rasterio has no API for either);
  gdalinfo and QGIS read them.
* ``PalettePNG``: an 8-bit paletted PNG encoded with zlib as rows arrive (bounded memory;
  much faster than GDAL's PNG copy of a whole GeoTIFF).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling

#: Tile side of the COGs (GDAL's COG default is 512; 256 keeps small scenes small).
COG_BLOCK_SIZE = 256
#: Deflate level of the COGs. Measured on a 4096x4096 class map (2-core CPU): level 1
#: copies in 0.08 s to 2.2 MB, the default 6 in 0.44 s to 1.9 MB.
COG_DEFLATE_LEVEL = 1
#: Overview resampling of class maps: nearest keeps real classes (no averaging) and is
#: cheap; GDAL's 'mode' took 0.32 s instead of 0.03 s on a 4096x4096 map (2-core CPU),
#: a fifth of the whole prediction at the host's pace.
CLASS_OVERVIEW_RESAMPLING = Resampling.nearest
#: GDAL's raster attribute table field types and usages (gdal.h: GDALRATFieldType,
#: GDALRATFieldUsage).
_RAT_INTEGER, _RAT_STRING = 0, 2
_RAT_USAGE = {"generic": 0, "name": 2, "min_max": 5, "red": 6, "green": 7, "blue": 8}


def overview_factors(height: int, width: int, block: int = COG_BLOCK_SIZE) -> list[int]:
    """Powers of two until the overview fits in one tile, as GDAL's COG driver picks."""
    factors, factor = [], 2
    while max(height, width) / (factor // 2) > block:
        factors.append(factor)
        factor *= 2
    return factors


def cloud_optimise(source: str | os.PathLike, target: str | os.PathLike, *,
                   resampling: Resampling, **options: str | int) -> None:
    """Builds ``source``'s overviews (in place) and copies it to ``target`` as a COG.

    Args:
      source: a tiled GeoTIFF (deleted by the caller afterwards).
      target: the COG to write.
      resampling: overview resampling (``CLASS_OVERVIEW_RESAMPLING`` for classes,
        ``average`` for probabilities).
      **options: more COG creation options (e.g. ``NBITS=16``).
    """
    with rasterio.open(source, "r+") as dataset:
        factors = overview_factors(dataset.height, dataset.width)
        if factors:
            dataset.build_overviews(factors, resampling)
    rasterio.shutil.copy(source, target, driver="COG", COMPRESS="DEFLATE",
                         LEVEL=COG_DEFLATE_LEVEL, BLOCKSIZE=COG_BLOCK_SIZE,
                         OVERVIEWS="FORCE_USE_EXISTING", NUM_THREADS="ALL_CPUS",
                         BIGTIFF="IF_SAFER", **options)


def write_class_names(path: str | os.PathLike, names: Sequence[str],
                      colours: Mapping[int, Sequence[int]]) -> Path:
    """Writes a PAM file with band 1's category names and raster attribute table.

    Args:
      path: where to write it: ``<raster>.aux.xml`` (GDAL's name for it), or a temporary
        name renamed to that.
      names: class names; value ``i`` is ``names[i]``.
      colours: RGB(A) per value (at least every class).

    Returns:
      ``path``.
    """
    categories = "".join(f"      <Category>{escape(name)}</Category>\n" for name in names)
    fields = [("Value", _RAT_INTEGER, "min_max"), ("Class", _RAT_STRING, "name"),
              ("Red", _RAT_INTEGER, "red"), ("Green", _RAT_INTEGER, "green"),
              ("Blue", _RAT_INTEGER, "blue")]
    definitions = "".join(
        f'      <FieldDefn index="{index}"><Name>{name}</Name><Type>{kind}</Type>'
        f"<Usage>{_RAT_USAGE[usage]}</Usage></FieldDefn>\n"
        for index, (name, kind, usage) in enumerate(fields))
    rows = "".join(
        f'      <Row index="{value}"><F>{value}</F><F>{escape(name)}</F>'
        + "".join(f"<F>{int(c)}</F>" for c in colours[value][:3]) + "</Row>\n"
        for value, name in enumerate(names))
    text = ("<PAMDataset>\n  <PAMRasterBand band=\"1\">\n    <CategoryNames>\n"
            f"{categories}    </CategoryNames>\n"
            '    <GDALRasterAttributeTable tableType="thematic">\n'
            f"{definitions}{rows}    </GDALRasterAttributeTable>\n"
            "  </PAMRasterBand>\n</PAMDataset>\n")
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


class PalettePNG:
    """An 8-bit paletted PNG written as rows arrive (zlib-compressed on the fly).

    Args:
      path: the file to write.
      width, height: its size.
      palette: RGB per index, ``[n <= 256, 3]`` uint8.
      transparent: indices drawn transparent (e.g. nodata).
      level: zlib compression level.
    """

    def __init__(self, path: str | os.PathLike, *, width: int, height: int,
                 palette: np.ndarray, transparent: Sequence[int] = (), level: int = 6):
        self.width, self.height, self.rows = width, height, 0
        self._file = open(path, "wb")
        self._file.write(b"\x89PNG\r\n\x1a\n")
        # 8-bit depth, colour type 3 (palette), deflate, adaptive filters, no interlace.
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
        self._chunk(b"PLTE", np.asarray(palette, np.uint8).reshape(-1, 3).tobytes())
        if transparent:
            alpha = np.full(max(transparent) + 1, 255, np.uint8)
            alpha[list(transparent)] = 0
            self._chunk(b"tRNS", alpha.tobytes())
        # Z_RLE suits class maps (long runs) and is several times faster than the default.
        self._compressor = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_RLE)

    def _chunk(self, kind: bytes, data: bytes) -> None:
        self._file.write(struct.pack(">I", len(data)) + kind + data
                         + struct.pack(">I", zlib.crc32(kind + data)))

    def add_rows(self, rows: np.ndarray) -> None:
        """Appends uint8 ``[n, width]`` palette indices."""
        if rows.shape[1:] != (self.width,):
            raise ValueError(f"rows of {rows.shape[1:]} for a PNG {self.width} wide")
        filtered = np.zeros((len(rows), self.width + 1), np.uint8)  # filter 0: none
        filtered[:, 1:] = rows
        data = self._compressor.compress(filtered.tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self.rows += len(rows)

    def close(self) -> None:
        """Ends the image (all ``height`` rows must have been added)."""
        if self.rows != self.height:
            raise ValueError(f"PNG of {self.height} rows got {self.rows}")
        self._chunk(b"IDAT", self._compressor.flush())
        self._chunk(b"IEND", b"")
        self._file.close()

    def abort(self) -> None:
        """Closes the file, unfinished (the caller deletes it)."""
        self._file.close()
