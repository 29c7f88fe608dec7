"""A predicted region as one product: the VRT mosaics and the STAC collection.

Scenes are predicted in-process with a per-pixel model (overlapping, one with nodata
over its neighbour, one at a coarser resolution, one in another CRS), then
``catalog.finalize`` writes the region. The mosaics are read with rasterio (GDAL) and
compared with a numpy painter's composite of the scene files; the STAC Items are read
back with pystac and compared with the files and with rasterio's own reprojection.
"""

import warnings

import numpy as np
import pystac
import pytest
import rasterio
import rasterio.warp
import shapely.geometry
from pystac.extensions.classification import ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from rio_cogeo.cogeo import cog_validate

from lcseg.data import get_metadata
from lcseg.predict import catalog, outputs
from tests.test_predict import make_predictor, random_image

METRE = 0.25
# name: (height, width, x offset m, y offset m, pixel size m, CRS)
SCENES = {"p": (60, 80, 0.0, 0.0, METRE, "EPSG:2180"),
          "q": (50, 70, 10.0, 5.0, METRE, "EPSG:2180"),  # overlaps p; nodata over p
          "r": (40, 40, 30.0, 20.0, 2 * METRE, "EPSG:2180"),  # coarser, apart
          "s": (30, 30, 0.0, 0.0, METRE, "EPSG:32634")}  # another CRS
RECORD = {"version": "test", "model": "pixel", "dataset": "synthetic",
          "config_hash": "0123456789abcdef", "checkpoint_step": "6", "tta": "none"}


def transform_of(name):
    _, _, x, y, size, _ = SCENES[name]
    return rasterio.Affine(size, 0.0, 500000.0 + x, 0.0, -size, 300000.0 - y)


@pytest.fixture(scope="module")
def region(tmp_path_factory):
    root = tmp_path_factory.mktemp("region")
    inputs, output = root / "in", root / "out"
    inputs.mkdir()
    predictor = make_predictor(window=32)
    for i, (name, (height, width, _, _, _, crs)) in enumerate(SCENES.items()):
        bands = np.transpose(random_image(height, width, seed=20 + i), (2, 0, 1)).copy()
        bands[bands == 0] = 1  # 0 only where q has no data
        if name == "q":
            bands[:, :12, :30] = 0  # nodata in every band: over p in the mosaic
        with rasterio.open(inputs / f"{name}.tif", "w", driver="GTiff", count=3,
                           height=height, width=width, dtype="uint8", crs=crs,
                           transform=transform_of(name),
                           nodata=0 if name == "q" else None) as dataset:
            dataset.write(bands)
        outputs.predict_file(predictor, inputs / f"{name}.tif", output,
                             probabilities="uint8", provenance=RECORD)
    written = catalog.finalize(output)
    return output, written


def painted(output, names, kind):
    """The mosaic of ``names`` painted in numpy: later scenes over earlier ones where they
    have data, at the finest pixel size (coarser scenes' pixels repeated)."""
    bounds = {}
    for name in names:
        height, width = SCENES[name][:2]
        bounds[name] = rasterio.transform.array_bounds(height, width, transform_of(name))
    left = min(b[0] for b in bounds.values())
    top = max(b[3] for b in bounds.values())
    right = max(b[2] for b in bounds.values())
    bottom = min(b[1] for b in bounds.values())
    shape = (round((top - bottom) / METRE), round((right - left) / METRE))
    count = 1 if kind == "classes" else 6
    canvas = np.full((count, *shape), 255 if kind == "classes" else 0, np.uint8)
    mask = np.zeros(shape, bool)
    for name in names:
        with rasterio.open(output / f"{name}_{kind}.tif") as dataset:
            data = dataset.read()
            valid = (data[0] != 255) if kind == "classes" else dataset.read_masks(1) > 0
        factor = round(SCENES[name][4] / METRE)
        data = data.repeat(factor, 1).repeat(factor, 2)
        valid = valid.repeat(factor, 0).repeat(factor, 1)
        row, col = round((top - bounds[name][3]) / METRE), round((bounds[name][0] - left)
                                                               / METRE)
        window = canvas[:, row:row + valid.shape[0], col:col + valid.shape[1]]
        window[:, valid] = data[:, valid]
        mask[row:row + valid.shape[0], col:col + valid.shape[1]] |= valid
    return canvas, mask, rasterio.Affine(METRE, 0.0, left, 0.0, -METRE, top)


def test_vrt_mosaics_open_with_rasterio_and_cover_the_union_of_the_scenes(region):
    output, written = region
    classes_vrt = written["mosaic_classes_EPSG-2180"]
    expected, _, transform = painted(output, ["p", "q", "r"], "classes")
    with rasterio.open(classes_vrt) as mosaic, rasterio.open(output / "p_classes.tif") as p:
        assert mosaic.crs == p.crs and mosaic.transform == transform
        assert (mosaic.height, mosaic.width) == expected.shape[1:]
        assert mosaic.nodata == 255 and mosaic.colormap(1) == p.colormap(1)
        data = mosaic.read()
    np.testing.assert_array_equal(data, expected)
    # q's nodata corner shows p underneath: class values where q alone would have none.
    with rasterio.open(output / "q_classes.tif") as q:
        assert (q.read(1)[:12, :30] == 255).all()
    assert (data[0, 20:32, 40:70] != 255).all()

    expected, mask, _ = painted(output, ["p", "q", "r"], "probabilities")
    with rasterio.open(written["mosaic_probabilities_EPSG-2180"]) as mosaic:
        assert mosaic.count == 6 and mosaic.descriptions == get_metadata(
            "synthetic").class_names
        np.testing.assert_array_equal(mosaic.read_masks(1) > 0, mask)
        np.testing.assert_array_equal(mosaic.read()[:, mask], expected[:, mask])

    # The scene in another CRS has a mosaic of its own.
    with rasterio.open(written["mosaic_classes_EPSG-32634"]) as mosaic, rasterio.open(
            output / "s_classes.tif") as s:
        assert mosaic.crs == s.crs and mosaic.bounds == s.bounds
        np.testing.assert_array_equal(mosaic.read(), s.read())


def test_stac_items_carry_footprint_projection_assets_classes_and_provenance(region):
    output, written = region
    collection = pystac.Collection.from_file(str(written["collection"]))
    items = {item.id: item for item in collection.get_items()}
    assert sorted(items) == sorted(SCENES)
    metadata = get_metadata("synthetic")
    for name, item in items.items():
        path = output / f"{name}_classes.tif"
        with warnings.catch_warnings(), rasterio.open(path) as dataset:
            crs, transform, shape = dataset.crs, dataset.transform, dataset.shape
            expected_bbox = rasterio.warp.transform_bounds(crs, "EPSG:4326",
                                                           *dataset.bounds, densify_pts=21)
        np.testing.assert_allclose(item.bbox, expected_bbox, rtol=0, atol=1e-9)
        footprint = shapely.geometry.shape(item.geometry)
        assert footprint.is_valid and footprint.area > 0
        np.testing.assert_allclose(footprint.bounds, item.bbox, rtol=0, atol=1e-12)
        projection = ProjectionExtension.ext(item)
        assert projection.code == f"EPSG:{crs.to_epsg()}"
        assert rasterio.crs.CRS.from_wkt(projection.wkt2) == crs
        assert projection.transform == list(transform)[:6]
        assert projection.shape == list(shape)

        classes = item.assets["classes"]
        assert classes.get_absolute_href() == str(path.resolve())
        # The COG media type exactly when rio-cogeo finds a valid COG.
        cog = cog_validate(str(path), quiet=True)[0]
        assert classes.roles == ["data"] and classes.media_type == (
            pystac.MediaType.COG if cog else pystac.MediaType.GEOTIFF)
        listed = ClassificationExtension.ext(classes).classes
        assert [(c.value, c.name, c.color_hint) for c in listed if not c.nodata] == [
            (i, n, "{:02X}{:02X}{:02X}".format(*metadata.palette[i]))
            for i, n in enumerate(metadata.class_names)]
        assert [c.value for c in listed if c.nodata] == [255]
        assert item.assets["colour"].media_type == pystac.MediaType.PNG
        assert item.assets["colour"].roles == ["visual"]
        assert item.assets["probabilities"].get_absolute_href() == str(
            (output / f"{name}_probabilities.tif").resolve())
        assert {key: item.properties[f"lcseg:{key}"] for key in RECORD} == RECORD
        assert outputs.read_provenance(path) == {
            key[len("lcseg:"):]: value for key, value in item.properties.items()
            if key.startswith("lcseg:")}
    assert ProjectionExtension.has_extension(items["p"])
    assert ClassificationExtension.get_schema_uri() in items["p"].stac_extensions
    # The collection holds the mosaics and spans its items.
    assert {key for key in collection.assets} == {
        "mosaic_classes_EPSG-2180", "mosaic_probabilities_EPSG-2180",
        "mosaic_classes_EPSG-32634", "mosaic_probabilities_EPSG-32634"}
    assert collection.assets["mosaic_classes_EPSG-2180"].get_absolute_href() == str(
        written["mosaic_classes_EPSG-2180"].resolve())
    box = collection.extent.spatial.bboxes[0]
    assert all(box[0] <= item.bbox[0] and item.bbox[2] <= box[2] for item in items.values())


def test_finalize_again_replaces_the_product_whole(region):
    output, written = region
    again = catalog.finalize(output)
    assert again == written
    assert sorted(p.name for p in output.glob(".*")) == []  # no temporary left
    assert len(list((output / "stac" / "items").glob("*.json"))) == len(SCENES)
