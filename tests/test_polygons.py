"""lcseg.polygons: class regions streamed in row blocks come out as exact polygons.

Every test builds a small synthetic class map, streams it in blocks of a few rows with
a georeferenced transform in a projected CRS, reads the file back with pyogrio and
rasterises the polygons back onto the grid: the pixels must be exactly the class's, one
polygon per 4-connected region.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import numpy as np
import pyogrio
import pyogrio.raw
import pytest
import rasterio.features
import rasterio.warp
import shapely
import shapely.geometry
from affine import Affine
from rasterio.crs import CRS

from lcseg.polygons import PolygonWriter, write_polygons

try:
    from scipy import ndimage
except ImportError:  # scipy is not a dependency of lcseg.
    ndimage = None

CLASS_NAMES = ("water", "trees", "building", "road")
BUILDING = 2
CRS_UTM = CRS.from_epsg(32633)
PIXEL = 10.0  # metres; a pixel is 100 m².
TRANSFORM = Affine(PIXEL, 0.0, 500_000.0, 0.0, -PIXEL, 4_600_000.0)
HEIGHT, WIDTH = 40, 48


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of ``mask``: (labels, count)."""
    if ndimage is not None:
        return ndimage.label(mask)  # The default structure is 4-connectivity in 2-D.
    labels = np.zeros(mask.shape, np.int32)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        stack = [start]
        labels[start] = count
        while stack:
            r, c = stack.pop()
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if (0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc]
                        and not labels[nr, nc]):
                    labels[nr, nc] = count
                    stack.append((nr, nc))
    return labels, count


def _scene_mask() -> np.ndarray:
    """The building mask: every shape the merge must get right, across 4-row blocks."""
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[1:3, 1:5] = True            # A rectangle inside one block.
    mask[2:11, 8:12] = True          # A rectangle crossing two block edges.
    mask[5:18, 14:26] = True         # A ring: square with a hole, both crossing edges.
    mask[9:14, 18:22] = False
    mask[3:20, 28:30] = True         # A U: two arms in different open groups...
    mask[3:20, 34:36] = True
    mask[17:20, 28:36] = True        # ...joined at the bottom, blocks later.
    mask[22:24, 28:36] = True        # An upside-down U: one region splitting below.
    mask[24:30, 28:30] = True
    mask[24:30, 34:36] = True
    for i in range(14):              # A 4-connected staircase over four block edges.
        mask[20 + i, 2 + i:4 + i] = True
    mask[7, 40] = True               # Pixels meeting only at a corner, on a block edge
    mask[8, 41] = True               # (rows 7 | 8): two regions, not one.
    mask[11, 44:46] = True           # The same with two-pixel regions.
    mask[12, 46:48] = True
    mask[36:40, 40:48] = True        # A rectangle on the scene's bottom-right corner.
    mask[0:4, 46:48] = True          # ...and one on the top edge, the last column.
    mask[32, 20] = mask[34, 24] = True  # Single pixels (100 m²), for min_area.
    return mask


def _labels(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """A class map with ``mask`` as buildings, other classes random elsewhere."""
    others = np.array([c for c in range(len(CLASS_NAMES)) if c != BUILDING], np.uint8)
    labels = np.random.default_rng(seed).choice(others, size=mask.shape).astype(np.uint8)
    labels[mask] = BUILDING
    return labels


def _blocks(labels: np.ndarray, rows: int):
    for row0 in range(0, labels.shape[0], rows):
        yield row0, labels[row0:row0 + rows]


def _write(path, labels, rows, **kwargs) -> int:
    args = dict(class_index=BUILDING, class_names=CLASS_NAMES, transform=TRANSFORM,
                crs=CRS_UTM, width=labels.shape[1], height=labels.shape[0])
    args.update(kwargs)
    return write_polygons(_blocks(labels, rows), path, **args)


def _read(path, scene_crs=CRS_UTM):
    """(metadata, polygons, {field: values}) of the file's one layer.

    GeoJSON holds WGS 84 lon/lat (RFC 7946): its polygons are projected back to the
    scene's CRS with PROJ (rasterio.warp) and its metadata reports that CRS, so the
    checks below compare both formats in the scene's pixel grid.
    """
    meta, _, wkb, field_data = pyogrio.raw.read(path)
    polygons = shapely.from_wkb(wkb)
    if str(path).endswith(".geojson") and scene_crs is not None:
        assert CRS.from_user_input(meta["crs"]) == CRS.from_epsg(4326)
        polygons = np.array([shapely.geometry.shape(rasterio.warp.transform_geom(
            "EPSG:4326", scene_crs, shapely.geometry.mapping(p))) for p in polygons],
            dtype=object)
        meta = {**meta, "crs": scene_crs.to_wkt()}
    return meta, polygons, dict(zip(meta["fields"], field_data))


def _check_partition(polygons: np.ndarray, mask: np.ndarray,
                     transform: Affine = TRANSFORM) -> None:
    """The polygons rasterise to ``mask`` exactly, one polygon per 4-connected region."""
    components, count = _components(mask)
    painted = rasterio.features.rasterize(
        [(p, i + 1) for i, p in enumerate(polygons)], out_shape=mask.shape,
        transform=transform, fill=0, dtype="int32") if len(polygons) else np.zeros(
            mask.shape, np.int32)
    union = np.logical_or(painted > 0, mask).sum()
    iou = np.logical_and(painted > 0, mask).sum() / max(union, 1)
    assert iou > 0.99, f"IoU {iou}"
    np.testing.assert_array_equal(painted > 0, mask)  # Exact, in fact.
    assert len(polygons) == count, f"{len(polygons)} polygons for {count} regions"
    # Each polygon paints exactly one region: (region, polygon) pairs are a bijection.
    pairs = set(zip(components[mask].tolist(), painted[mask].tolist()))
    assert len(pairs) == count
    # Exteriors counter-clockwise (RFC 7946), whichever way the transform turns rings.
    assert all(p.exterior.is_ccw for p in polygons)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_shapes_stream_exactly(tmp_path, suffix):
    """Rectangles, a ring, U shapes, a staircase and corner contacts, in 4-row blocks."""
    mask = _scene_mask()
    path = tmp_path / f"buildings{suffix}"
    written = _write(path, _labels(mask), rows=4)
    meta, polygons, fields = _read(path)
    assert CRS.from_user_input(meta["crs"]) == CRS_UTM
    assert meta["geometry_type"] == "Polygon" and written == len(polygons)
    _check_partition(polygons, mask)
    # The ring's hole survives, both in the file and as a hole in the painted mask.
    ring = [p for p in polygons if shapely.contains(p, shapely.Point(
        TRANSFORM @ (15.5, 5.5)))]
    assert len(ring) == 1 and len(ring[0].interiors) == 1
    # So does the hole the U and the upside-down U do not have (they are open).
    assert sum(len(p.interiors) for p in polygons) == 1
    # No collinear vertices left where pieces were unioned along block edges.
    assert (shapely.get_num_coordinates(polygons)
            == shapely.get_num_coordinates(shapely.simplify(polygons, 0))).all()
    # World coordinates exactly: the first rectangle (rows 1-2, columns 1-4); GeoJSON's
    # 7 decimals of a degree (RFC 7946's precision in GDAL) are about a centimetre.
    tolerance = 0.02 if suffix == ".geojson" else 1e-6
    first = shapely.box(500_010, 4_599_970, 500_050, 4_599_990)
    assert sum(shapely.hausdorff_distance(p, first) < tolerance for p in polygons) == 1
    assert set(fields["class_name"]) == {"building"}
    assert set(fields["class_index"].tolist()) == {BUILDING}
    # (GeoJSON: the area attribute is exact, the centimetre-rounded ring a little off.)
    np.testing.assert_allclose(fields["area"], shapely.area(polygons),
                               rtol=2e-3 if suffix == ".geojson" else 1e-9)
    assert fields["area"].sum() == pytest.approx(mask.sum() * PIXEL ** 2)
    assert list(tmp_path.iterdir()) == [path]  # No temporary file left behind.


def test_geojson_is_rfc7946_wgs84_lon_lat(tmp_path):
    """GeoJSON: lon/lat in WGS 84 (PROJ's transform of the UTM corners), no crs member."""
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[1:3, 1:5] = True
    path = tmp_path / "b.geojson"
    _write(path, _labels(mask), rows=4)
    with open(path) as f:
        document = json.load(f)
    assert "crs" not in document  # The 2008 draft's member; RFC 7946 has none.
    (feature,) = document["features"]
    ring = np.array(feature["geometry"]["coordinates"][0])
    # Reference: the rectangle's UTM corners (500010..500050 E, 4599970..4599990 N)
    # transformed by PROJ (rasterio.warp), as lon, lat.
    lon, lat = rasterio.warp.transform(CRS_UTM, "EPSG:4326", [500_010, 500_050],
                                       [4_599_970, 4_599_990])
    np.testing.assert_allclose(ring[:, 0].min(), lon[0], atol=1e-7)
    np.testing.assert_allclose(ring[:, 0].max(), lon[1], atol=2e-7)
    np.testing.assert_allclose(ring[:, 1].min(), min(lat), atol=2e-7)
    assert 14 < ring[:, 0].min() < 16 and 41 < ring[:, 1].min() < 42  # UTM 33N, 4600 km.
    assert shapely.Polygon(ring).exterior.is_ccw  # RFC 7946's winding.
    assert feature["properties"]["area"] == pytest.approx(800.0)  # m², the scene's CRS


def test_geopackage_is_version_1_2_and_gdal_3_6_reads_it_cleanly(tmp_path):
    path = tmp_path / "b.gpkg"
    _write(path, _labels(_scene_mask()), rows=4)
    with sqlite3.connect(path) as database:  # GeoPackage's header: SQLite's pragmas.
        assert database.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # GPKG
        assert database.execute("PRAGMA user_version").fetchone()[0] == 10200  # 1.2.0
    ogrinfo = shutil.which("ogrinfo")  # Debian's GDAL 3.6 where installed (not in CI).
    if ogrinfo:
        result = subprocess.run([ogrinfo, "-so", "-al", str(path)], capture_output=True,
                                text=True, check=True)
        assert "partially supported" not in result.stdout + result.stderr
        assert "Feature Count: " in result.stdout


@pytest.mark.parametrize("rows", [1, 3, 7, HEIGHT])
def test_block_size_does_not_matter(tmp_path, rows):
    """One-row blocks, uneven blocks and a single block give the same regions."""
    mask = _scene_mask()
    _write(tmp_path / "b.gpkg", _labels(mask), rows=rows)
    _check_partition(_read(tmp_path / "b.gpkg")[1], mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_blobs_with_holes(tmp_path, seed):
    """Random blobs: many regions with holes, joins and corner contacts across edges."""
    rng = np.random.default_rng(seed)
    mask = rng.random((HEIGHT, WIDTH)) < 0.55
    # One 3x3 majority pass: blobs with holes instead of salt and pepper.
    padded = np.pad(mask, 1).astype(int)
    mask = sum(padded[i:i + HEIGHT, j:j + WIDTH] for i in range(3) for j in range(3)) >= 5
    path = tmp_path / "blobs.geojson"
    _write(path, _labels(mask, seed), rows=5)
    polygons = _read(path)[1]
    _check_partition(polygons, mask)
    assert sum(len(p.interiors) for p in polygons) > 0  # The scene does have holes.


@pytest.mark.parametrize("transform, crs, suffix", [
    # Rotated and sheared, in a geographic CRS.
    (Affine.translation(13.4, 52.5) @ Affine.rotation(30) @ Affine.shear(10, 0)
     @ Affine.scale(1e-4, -2e-4), CRS.from_epsg(4326), ".geojson"),
    # A plain image without georeferencing: pixel coordinates, y down, no CRS (GeoJSON
    # would imply WGS 84, a GeoPackage stores "none").
    (Affine.identity(), None, ".gpkg"),
])
@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_other_transforms(tmp_path, transform, crs, suffix):
    mask = _scene_mask()
    path = tmp_path / f"b{suffix}"
    _write(path, _labels(mask), rows=4, transform=transform, crs=crs)
    meta, polygons, fields = _read(path, crs)
    _check_partition(polygons, mask, transform)
    assert (meta["crs"] is None if crs is None else CRS.from_user_input(meta["crs"]) == crs)
    assert fields["area"].sum() == pytest.approx(mask.sum() * abs(transform.determinant))


def test_min_area_drops_small_polygons(tmp_path):
    mask = _scene_mask()
    components, count = _components(mask)
    sizes = np.bincount(components.ravel())[1:]
    path = tmp_path / "b.gpkg"
    _write(path, _labels(mask), rows=4, min_area=2.5 * PIXEL ** 2)
    _, polygons, fields = _read(path)
    assert len(polygons) == (sizes >= 2.5).sum() < count
    assert fields["area"].min() >= 2.5 * PIXEL ** 2
    # The kept polygons are exactly the large regions.
    large = np.isin(components, np.flatnonzero(sizes >= 2.5) + 1)
    _check_partition(polygons, large)


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_no_pixels_of_the_class_gives_an_empty_layer(tmp_path, suffix):
    path = tmp_path / f"none{suffix}"
    assert _write(path, _labels(np.zeros((HEIGHT, WIDTH), bool)), rows=4) == 0
    info = pyogrio.read_info(path)
    expected = CRS.from_epsg(4326) if suffix == ".geojson" else CRS_UTM  # RFC 7946
    assert info["features"] == 0 and CRS.from_user_input(info["crs"]) == expected
    assert info["layer_name"] == "building"  # The class name, by default.
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("suffix", [".gpkg", ".geojson"])
def test_error_mid_way_leaves_the_target_untouched(tmp_path, suffix):
    """An existing file is replaced only on success; a failure leaves no partial file."""
    path = tmp_path / f"b{suffix}"
    path.write_text("previous result")
    labels = _labels(_scene_mask())
    with pytest.raises(RuntimeError, match="prediction failed"):
        # batch_size=2: polygons have been written to the temporary file by then.
        with PolygonWriter(path, class_index=BUILDING, class_names=CLASS_NAMES,
                           transform=TRANSFORM, crs=CRS_UTM, width=WIDTH,
                           batch_size=2) as writer:
            for row0, block in _blocks(labels[:24], 4):
                writer.add_rows(row0, block)
            assert writer.count > 0
            raise RuntimeError("prediction failed")
    assert path.read_text() == "previous result"
    assert list(tmp_path.iterdir()) == [path]
    # Rows missing at close (height known): refused, nothing published either.
    writer = PolygonWriter(path, class_index=BUILDING, class_names=CLASS_NAMES,
                           transform=TRANSFORM, crs=CRS_UTM, width=WIDTH, height=HEIGHT,
                           batch_size=2)
    for row0, block in _blocks(labels[:24], 4):
        writer.add_rows(row0, block)
    with pytest.raises(ValueError, match="rows 24..39"):
        writer.close()
    assert path.read_text() == "previous result"
    assert list(tmp_path.iterdir()) == [path]
    # Success replaces it.
    _write(path, labels, rows=4)
    _check_partition(_read(path)[1], _scene_mask())
    assert list(tmp_path.iterdir()) == [path]


def _writer(path="out.gpkg", **kwargs) -> PolygonWriter:
    args = dict(class_index=BUILDING, class_names=CLASS_NAMES, transform=TRANSFORM,
                crs=CRS_UTM, width=WIDTH)
    args.update(kwargs)
    return PolygonWriter(path, **args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(path="out.shp"), r"'\.shp'.*\.gpkg, \.geojson"),
    (dict(path="out"), r"suffix ''.*\.gpkg"),
    (dict(class_index=4), r"class_index 4 .*4 classes.*0\.\.3"),
    (dict(class_index=-1), r"class_index -1 "),
    (dict(width=0), r"width 0 must be a positive"),
    (dict(height=0), r"height 0 must be a positive"),
    (dict(min_area=-1.0), r"min_area -1.0 must be >= 0"),
    (dict(batch_size=0), r"batch_size 0 must be >= 1"),
])
def test_bad_arguments(tmp_path, kwargs, match):
    kwargs["path"] = tmp_path / kwargs.get("path", "out.gpkg")
    with pytest.raises(ValueError, match=match):
        _writer(**kwargs)
    assert list(tmp_path.iterdir()) == []


def test_blocks_out_of_order(tmp_path):
    labels = _labels(_scene_mask())
    writer = _writer(tmp_path / "out.gpkg", height=HEIGHT)
    with pytest.raises(ValueError, match=r"row0=4 but the next row is 0.*consecutive"):
        writer.add_rows(4, labels[4:8])          # Not starting at row 0.
    writer.add_rows(0, labels[0:4])
    with pytest.raises(ValueError, match=r"row0=8 but the next row is 4"):
        writer.add_rows(8, labels[8:12])         # A block skipped.
    with pytest.raises(ValueError, match=r"row0=0 but the next row is 4"):
        writer.add_rows(0, labels[0:4])          # A block repeated.
    with pytest.raises(ValueError, match=r"shape \(4, 47\).*\[rows >= 1, 48\]"):
        writer.add_rows(4, labels[4:8, :-1])     # The wrong width.
    with pytest.raises(ValueError, match=r"dtype float32.*integer"):
        writer.add_rows(4, labels[4:8].astype(np.float32))
    with pytest.raises(ValueError, match=r"rows 4\.\.43 run past the scene's height 40"):
        writer.add_rows(4, np.vstack([labels[4:], labels[:4]]))
    # The refused blocks changed nothing: the rest of the scene still comes out right.
    for row0, block in _blocks(labels, 4):
        if row0 >= 4:
            writer.add_rows(row0, block)
    writer.close()
    _check_partition(_read(tmp_path / "out.gpkg")[1], _scene_mask())
    with pytest.raises(ValueError, match=r"is closed; create a new writer"):
        writer.add_rows(HEIGHT, labels[:4])
