"""Streamed polygon output (lcseg.polygons) vs polygonising the whole class map at once.

A synthetic scene of many rectangular "buildings" (some larger blocks, some with
courtyards, many crossing row-block edges) is made into polygons two ways, each in a
fresh process so that peak memory is its own:

* ``stream``: :class:`lcseg.polygons.PolygonWriter`, fed 256-row blocks rendered on the
  fly (as whole-scene prediction yields them): the class map is never whole in memory.
  Both output formats (GeoJSON is staged as a GeoPackage and converted at close).
* ``whole``: the class map rendered whole, ``rasterio.features.shapes`` over it, every
  polygon held, then one write.

Peak memory is the process's peak resident set size (ru_maxrss, which counts GDAL's and
GEOS's C allocations that tracemalloc cannot see) minus the resident size after imports.

    python benchmarks/polygons.py                 # 8192 x 8192, 256-row blocks
    python benchmarks/polygons.py --size 2048     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BUILDING = 1
CLASS_NAMES = ("background", "building")


def _rectangles(size: int, count: int, seed: int = 0) -> np.ndarray:
    """``[count, 4]`` (row0, row1, col0, col1) buildings; a tenth have a courtyard."""
    rng = np.random.default_rng(seed)
    heights = rng.integers(4, 24, count)
    widths = rng.integers(4, 24, count)
    big = rng.random(count) < 0.02  # Some blocks of flats, spanning several blocks.
    heights[big] *= 8
    widths[big] *= 3
    rows = rng.integers(0, size - heights)
    cols = rng.integers(0, size - widths)
    return np.stack([rows, rows + heights, cols, cols + widths], axis=1)


def _render(rectangles: np.ndarray, row0: int, row1: int, width: int) -> np.ndarray:
    """Class indices of rows row0..row1-1; courtyards punched in every tenth building."""
    labels = np.zeros((row1 - row0, width), np.uint8)
    hit = (rectangles[:, 0] < row1) & (rectangles[:, 1] > row0)
    for index in np.flatnonzero(hit):
        r0, r1, c0, c1 = rectangles[index]
        labels[max(r0, row0) - row0:min(r1, row1) - row0, c0:c1] = BUILDING
        if index % 10 == 0 and r1 - r0 >= 8 and c1 - c0 >= 8:
            cr0, cr1 = r0 + 3, r1 - 3
            labels[max(cr0, row0) - row0:max(min(cr1, row1) - row0, 0), c0 + 3:c1 - 3] = 0
    return labels


def _peak_mib(base_kib: int) -> float:
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib) / 1024


def _run(mode: str, size: int, rows: int, count: int, output: Path) -> dict:
    """One measurement, in this process."""
    import pyogrio.raw
    import rasterio.features
    import shapely
    from affine import Affine
    from rasterio.crs import CRS

    from lcseg.polygons import PolygonWriter

    transform = Affine(0.5, 0, 500_000, 0, -0.5, 4_600_000)
    crs = CRS.from_epsg(32633)
    rectangles = _rectangles(size, count)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "stream":
        with PolygonWriter(output, class_index=BUILDING, class_names=CLASS_NAMES,
                           transform=transform, crs=crs, width=size, height=size) as writer:
            for row0 in range(0, size, rows):
                writer.add_rows(row0, _render(rectangles, row0, min(row0 + rows, size), size))
        polygons = writer.count
    else:
        labels = _render(rectangles, 0, size, size)
        mask = labels == BUILDING
        geometries = [shapely.Polygon(g["coordinates"][0], g["coordinates"][1:])
                      for g, _ in rasterio.features.shapes(labels, mask=mask, connectivity=4,
                                                           transform=transform)]
        polygons = len(geometries)
        geometries = shapely.orient_polygons(np.asarray(geometries, dtype=object))
        areas = shapely.area(geometries)
        pyogrio.raw.write(output, shapely.to_wkb(geometries),
                          [np.full(polygons, BUILDING, np.int32),
                           np.full(polygons, CLASS_NAMES[BUILDING], object), areas],
                          fields=["class_index", "class_name", "area"],
                          geometry_type="Polygon", crs=crs.to_wkt(), driver="GPKG")
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "peak_mib": _peak_mib(base),
            "polygons": polygons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="scene height and width")
    parser.add_argument("--rows", type=int, default=256, help="rows per streamed block")
    parser.add_argument("--buildings", type=int, default=None,
                        help="rectangles drawn (default: one per 1000 pixels)")
    parser.add_argument("--mode", choices=["stream", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = args.buildings or args.size * args.size // 1000
    if args.mode:  # A child: one measurement, as JSON.
        print(json.dumps(_run(args.mode, args.size, args.rows, count, args.output)))
        return
    repo = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as folder:
        print(f"{args.size} x {args.size} scene, {count} rectangles drawn, "
              f"{args.rows}-row blocks")
        results = {}
        for mode, suffix in (("stream", ".gpkg"), ("stream", ".geojson"), ("whole", ".gpkg")):
            output = Path(folder, f"{mode}{suffix}")
            line = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--size", str(args.size),
                 "--rows", str(args.rows), "--buildings", str(count), "--output",
                 str(output)], check=True, capture_output=True, text=True, cwd=repo,
                env={**os.environ, "PYTHONPATH": repo}).stdout.strip().splitlines()[-1]
            results[mode] = result = json.loads(line)
            print(f"{mode:>6} {suffix:8}: {result['polygons']:7d} polygons  "
                  f"{result['seconds']:7.1f} s  peak +{result['peak_mib']:7.1f} MiB  file "
                  f"{output.stat().st_size / 2**20:.1f} MiB")
        if results["stream"]["polygons"] != results["whole"]["polygons"]:
            print("MISMATCH: the two ways found different numbers of polygons")


if __name__ == "__main__":
    main()
