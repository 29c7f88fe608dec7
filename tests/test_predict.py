"""Whole-scene prediction: geometry, blending, TTA, streaming, outputs, LoveDA zip, CLI.

Most tests use a model whose output depends only on the pixel (a 1x1 convolution with
fixed weights), so the exact answer is known everywhere: sliding windows, padding,
blending and TTA must reproduce it at every pixel, borders included. One module-scoped
tiny training run serves the end-to-end command-line and full-scene evaluation tests.
"""

import io
import json
import os
import warnings
import zipfile

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pyogrio.raw
import pytest
import rasterio
import rasterio.features
import rasterio.warp
import scipy.ndimage
import shapely
import shapely.geometry
from PIL import Image

from lcseg import evaluate, predict, train
from lcseg.data import get_metadata
from tests import fake_archives
from tests.conftest import run_python
from tests.test_train import tiny_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRANSFORM = rasterio.Affine(0.25, 0.0, 500000.0, 0.0, -0.25, 300000.0)


class PixelModel(nn.Module):
    """Logits from each pixel alone: a 1x1 convolution (invariant to every flip/rotation)."""

    num_classes: int

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        return nn.Conv(self.num_classes, (1, 1), name="head")(images)


def pixel_weights(num_classes, seed=0):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(0, 3, (1, 1, 3, num_classes)).astype(np.float32)
    bias = rng.normal(0, 1, num_classes).astype(np.float32)
    return {"params": {"head": {"kernel": kernel, "bias": bias}}}


def expected_probabilities(image, num_classes=6):
    """The per-pixel answer of ``make_predictor``'s model, computed in numpy."""
    head = pixel_weights(num_classes)["params"]["head"]
    x = (image.astype(np.float64) / 255.0 - MEAN) / STD
    logits = x @ head["kernel"][0, 0] + head["bias"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_predictor(dataset="synthetic", *, window=48, overlap=0.5, tta="none", batch=4):
    metadata = get_metadata(dataset)
    return predict.Predictor(PixelModel(metadata.num_classes),
                             pixel_weights(metadata.num_classes), metadata=metadata,
                             mean=MEAN, std=STD, window=window, overlap=overlap,
                             batch_size=batch, tta=tta)


def random_image(height, width, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_geotiff(path, bands, *, dtype="uint8", nodata=None, tiled=True):
    """Writes ``bands`` [count, H, W] as a GeoTIFF in EPSG:2180 (tiled like a real sheet)."""
    profile = {"driver": "GTiff", "count": bands.shape[0], "height": bands.shape[1],
               "width": bands.shape[2], "dtype": dtype, "crs": "EPSG:2180",
               "transform": TRANSFORM, "nodata": nodata}
    if tiled:
        profile.update(tiled=True, blockxsize=64, blockysize=64, compress="deflate")
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(bands)
    return path


# ---------------------------------------------------------------------------------------
# Exactness, blending and TTA.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_pixelwise_model_gives_the_per_pixel_answer_everywhere(overlap):
    # 150x230 with 48-pixel windows: the window divides neither side.
    image = random_image(150, 230)
    predictor = make_predictor(window=48, overlap=overlap)
    classes, probabilities = predict.predict_scene(predictor, image)
    expected = expected_probabilities(image)
    assert classes.shape == (150, 230) and probabilities.shape == (150, 230, 6)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(classes, expected.argmax(-1))


def test_window_weights_are_smooth_positive_and_windows_cover_the_scene():
    weights = predict.window_weights(64)
    assert weights.min() > 0 and weights.max() <= 1
    # Edges count next to nothing (about the floor, squared in the corners).
    assert predict.WEIGHT_FLOOR**2 <= weights.min() < 10 * predict.WEIGHT_FLOOR**2
    assert weights[32, 32] > 0.99
    np.testing.assert_allclose(weights, weights.T)  # symmetric
    np.testing.assert_allclose(weights, weights[::-1, ::-1])
    for length, window, stride in [(150, 48, 24), (230, 48, 36), (20, 48, 24), (1, 8, 8)]:
        margin = (window - stride) // 2
        starts = predict.window_starts(length, window, stride, margin)
        assert starts[0] == -margin and starts[-1] + window >= length + margin
        assert np.all(np.diff(starts) == stride)
    np.testing.assert_array_equal(predict.reflect_indices(np.arange(-3, 8), 5),
                                  [3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1])


@pytest.mark.parametrize("tta", ["flips", "dihedral"])
def test_tta_of_a_dihedral_invariant_model_changes_nothing(tta):
    # A wrong inverse transform would leave the probabilities flipped or rotated.
    image = random_image(70, 90, seed=2)
    _, plain = predict.predict_scene(make_predictor(window=32), image)
    _, augmented = predict.predict_scene(make_predictor(window=32, tta=tta), image)
    np.testing.assert_allclose(augmented, plain, rtol=1e-5, atol=1e-6)


class PositionModel(nn.Module):
    """Logits = a 1x1 convolution of the pixel + a learned field over the window position.

    The field makes the model neither invariant nor equivariant under flips and
    rotations: the answer for a pixel depends on where the window puts it and which way
    up the window is, so a TTA transform left out, or an inverse that does not undo its
    transform, changes the prediction.
    """

    num_classes: int
    window: int

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        field = self.param("field", nn.initializers.zeros,
                           (self.window, self.window, self.num_classes))
        return nn.Conv(self.num_classes, (1, 1), name="head")(images) + field


def position_weights(num_classes, window, seed=0):
    variables = pixel_weights(num_classes, seed)
    field = np.random.default_rng(seed + 1).normal(0, 3, (window, window, num_classes))
    variables["params"]["field"] = field.astype(np.float32)
    return variables


def numpy_position_model(variables, normalised):
    """``PositionModel``'s softmax in float64 numpy, for one ``[w, w, 3]`` window."""
    params = variables["params"]
    logits = (normalised @ params["head"]["kernel"][0, 0].astype(np.float64)
              + params["head"]["bias"] + params["field"])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_tta_reference(variables, image, mode):
    """Mean over the group of ``g^-1(model(g(x)))``, written independently of lcseg.predict.

    The groups are enumerated differently from ``lcseg.predict.windows.tta_transforms``
    on purpose (transposes instead of left-right mirrors, axis-0/1 flips instead of NHWC
    axes): only the set of transforms matters, and each inverse is checked by construction
    (``undo(do(x)) == x``) rather than trusted.
    """
    x = (image.astype(np.float64) / 255.0 - MEAN) / STD
    if mode == "flips":  # the identity, up-down, left-right and both: self-inverse
        pairs = [(lambda a, axes=axes: np.flip(a, axes) if axes else a,) * 2
                 for axes in ((), (0,), (1,), (0, 1))]
    else:  # the 8 symmetries of the square: 4 rotations, each with and without transpose
        def transpose(a):
            return np.swapaxes(a, 0, 1)

        pairs = []
        for k in range(4):
            pairs.append((lambda a, k=k: np.rot90(a, k), lambda a, k=k: np.rot90(a, -k)))
            pairs.append((lambda a, k=k: np.rot90(transpose(a), k),
                          lambda a, k=k: transpose(np.rot90(a, -k))))
    for do, undo in pairs:
        assert np.array_equal(undo(do(x)), x)
    # Eight (or four) distinct transforms of a generic image: the whole group is there.
    assert len({do(x).tobytes() for do, _ in pairs}) == len(pairs)
    return np.mean([undo(numpy_position_model(variables, do(x))) for do, undo in pairs], 0)


@pytest.mark.parametrize("tta", ["flips", "dihedral"])
def test_tta_averages_the_model_over_transformed_inputs_mapped_back(tta):
    # One window covering the whole scene (overlap 0): the prediction is that window's
    # TTA average itself, with no blending, so it can be computed exactly in numpy.
    window, num_classes = 16, 6
    image = random_image(window, window, seed=7)
    variables = position_weights(num_classes, window)
    predictor = predict.Predictor(PositionModel(num_classes, window), variables,
                                  metadata=get_metadata("synthetic"), mean=MEAN, std=STD,
                                  window=window, overlap=0.0, batch_size=1, tta=tta)
    _, probabilities = predict.predict_scene(predictor, image)
    expected = numpy_tta_reference(variables, image, tta)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5, atol=1e-6)
    # The model is far from equivariant, so the test could tell a wrong TTA apart: the
    # plain prediction is far from the TTA average.
    plain = numpy_position_model(variables, (image / 255.0 - MEAN) / STD)
    assert np.abs(plain - expected).max() > 0.3


class FieldModel(nn.Module):
    """Logits from the pixel's position in the window alone (the image is ignored)."""

    num_classes: int
    window: int

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        field = self.param("field", nn.initializers.zeros,
                           (self.window, self.window, self.num_classes))
        return jnp.broadcast_to(field, (*images.shape[:3], self.num_classes))


def linear_field(num_classes, window, seed=0):
    """Logits that ramp linearly across the window, each class its own slope."""
    rng = np.random.default_rng(seed)
    down, across = rng.normal(0, 3, (2, num_classes))
    i = (np.arange(window) + 0.5) / window
    return (down * i[:, None, None] + across * i[None, :, None]).astype(np.float32)


def seam_ratio(overlap, *, window=32, num_classes=6, height=100, width=120):
    """Largest jump across a window border / the model's largest within-window step.

    The model's answer changes with the position in the window, so the windows
    overlapping a pixel disagree about it; a blend that gives a window full say up to
    its edge jumps where a window begins or ends. The within-window step is measured on
    the model's own output (numpy, float64), per axis: a seamless blend changes no more
    from one pixel to the next across a border than the model does inside a window.
    """
    field = linear_field(num_classes, window)
    predictor = predict.Predictor(
        FieldModel(num_classes, window), {"params": {"field": field}},
        metadata=get_metadata("synthetic"), mean=MEAN, std=STD, window=window,
        overlap=overlap, batch_size=4)
    _, probabilities = predict.predict_scene(predictor, random_image(height, width))
    logits = field.astype(np.float64)
    model = np.exp(logits - logits.max(-1, keepdims=True))
    model /= model.sum(-1, keepdims=True)
    ratios = []
    for axis, length in ((0, height), (1, width)):
        within = np.abs(np.diff(model, axis=axis)).max()
        steps = np.abs(np.diff(probabilities, axis=axis)).max(axis=(1 - axis, 2))
        starts = predict.window_starts(length, window, predictor.stride, predictor.margin)
        # steps[e - 1] is the change from pixel e - 1 to e, where a window starts (e = top)
        # or has just ended (e = top + window).
        borders = sorted({edge - 1 for top in starts for edge in (top, top + window)
                          if 1 <= edge < length})
        assert len(borders) >= 4  # the scene spans several windows along each axis
        ratios.append(steps[borders].max() / within)
    return max(ratios)


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_blending_leaves_no_seam_at_window_borders(overlap):
    assert seam_ratio(overlap) <= 1.0


def test_seam_measure_detects_seams_of_uniform_weights(monkeypatch):
    # Averaging overlapping windows with equal weights is what leaves seams; the measure
    # above must see them, or the test before proves nothing.
    monkeypatch.setattr("lcseg.predict.windows.window_weights",
                        lambda size, floor=predict.WEIGHT_FLOOR: np.ones((size, size),
                                                                          np.float32))
    assert seam_ratio(0.5) > 3.0


def test_scenes_smaller_than_the_window_and_bad_settings():
    image = random_image(5, 3, seed=3)
    predictor = make_predictor(window=32)
    classes, probabilities = predict.predict_scene(predictor, image)
    np.testing.assert_allclose(probabilities, expected_probabilities(image),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="overlap must be in"):
        make_predictor(overlap=1.0)
    with pytest.raises(ValueError, match="tta must be one of"):
        make_predictor(tta="rot")


# ---------------------------------------------------------------------------------------
# Streaming: bounded memory.
# ---------------------------------------------------------------------------------------


class RecordingScene(predict.ArrayScene):
    """Records every read, so a test can see how the scene is consumed."""

    def __init__(self, image, events):
        super().__init__(image)
        self.events = events

    def read_rows(self, start, stop):
        self.events.append(("read", start, stop))
        return super().read_rows(start, stop)


def test_scene_is_read_and_finished_in_bands_of_rows():
    image = random_image(600, 70, seed=4)
    predictor = make_predictor(window=32, overlap=0.5)
    events = []
    probabilities = np.zeros((600, 70, 6), np.float32)
    for start, rows in predictor.predict_rows(RecordingScene(image, events)):
        events.append(("rows", start, start + len(rows)))
        probabilities[start:start + len(rows)] = rows
    np.testing.assert_allclose(probabilities, expected_probabilities(image),
                               rtol=1e-5, atol=1e-6)
    reads = [e for e in events if e[0] == "read"]
    finished = [e for e in events if e[0] == "rows"]
    # Each input row is read once, in bands no taller than a window.
    assert sum(stop - start for _, start, stop in reads) == 600
    assert max(stop - start for _, start, stop in reads) <= 32
    # Finished rows come out in order, the first long before the input is read.
    assert [e[1] for e in finished] == [0] + [e[2] for e in finished[:-1]]
    assert finished[-1][2] == 600
    first = events.index(finished[0])
    # (Reading runs a few batches ahead of the device, and the host fetches finished rows
    # a few bands behind it: a bounded lead, not the scene.)
    assert max(stop for _, _, stop in reads[:first + 1]) < 600 // 4
    # The accumulator holds a few windows' rows, not the scene.
    stats = predictor.last_stats
    assert stats["accumulator_rows"] <= 32 + 2 * predictor.stride < 600 // 4
    assert stats["rows_read"] == 600 and stats["max_rows_per_read"] <= 32


# ---------------------------------------------------------------------------------------
# Files: GeoTIFF and plain images.
# ---------------------------------------------------------------------------------------


def test_geotiff_in_geotiff_out_with_crs_transform_nodata_and_probabilities(tmp_path):
    image = random_image(150, 230, seed=5)
    image[image.sum(-1) == 0] = 1  # Only the no-data block below is all zeros.
    image[10:30, 40:90] = 0
    bands = np.transpose(image, (2, 0, 1))
    path = write_geotiff(tmp_path / "sheet.tif", bands, nodata=0)
    predictor = make_predictor(window=48, overlap=0.25)
    written = predict.predict_file(predictor, path, tmp_path / "out", probabilities="uint8")
    assert sorted(os.listdir(tmp_path / "out")) == [
        "sheet_classes.tif", "sheet_classes.tif.aux.xml", "sheet_colour.png",
        "sheet_probabilities.tif"]
    expected = expected_probabilities(image)
    truth = expected.argmax(-1).astype(np.uint8)
    truth[10:30, 40:90] = 255

    with rasterio.open(written["classes"]) as classes:
        assert (classes.height, classes.width, classes.count) == (150, 230, 1)
        assert classes.crs.to_epsg() == 2180 and classes.transform == TRANSFORM
        assert classes.nodata == 255 and classes.dtypes[0] == "uint8"
        assert classes.compression.name.lower() == "deflate" and classes.profile["tiled"]
        assert classes.colormap(1)[2][:3] == get_metadata("synthetic").palette[2]
        np.testing.assert_array_equal(classes.read(1), truth)
    # The last read band of the input was no taller than a window.
    assert predictor.last_stats["max_rows_per_read"] <= 48

    colour = Image.open(written["colour"])
    assert colour.size == (230, 150)
    palette = get_metadata("synthetic").palette_array()
    np.testing.assert_array_equal(np.asarray(colour.convert("RGB")), palette[truth])

    with rasterio.open(written["probabilities"]) as probabilities:
        assert probabilities.count == 6 and probabilities.crs.to_epsg() == 2180
        assert probabilities.descriptions[0] == "urban"
        values = np.transpose(probabilities.read(), (1, 2, 0)).astype(np.float64)
        assert np.abs(values - expected * 255).max() <= 0.51
        assert not probabilities.dataset_mask()[10:30, 40:90].any()
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind


def read_polygons(path, to_crs=None):
    """``(crs, [shapely geometries], {field: values})`` of a polygon file, via GDAL/OGR;
    with ``to_crs``, the geometries reprojected there by GDAL (rasterio.warp)."""
    meta, _, geometries, fields = pyogrio.raw.read(path)
    shapes = list(shapely.from_wkb(geometries))
    if to_crs is not None:
        shapes = [shapely.geometry.shape(rasterio.warp.transform_geom(
            meta["crs"], to_crs, shapely.geometry.mapping(shape))) for shape in shapes]
    return meta["crs"], shapes, dict(zip(meta["fields"], fields))


@pytest.mark.parametrize("polygon_format", ["gpkg", "geojson"])
def test_polygons_of_a_class_rasterise_back_to_its_predicted_mask(tmp_path, polygon_format):
    image = random_image(150, 230, seed=5)
    image[image.sum(-1) == 0] = 1
    image[10:30, 40:90] = 0  # No data: neither class nor polygon there.
    path = write_geotiff(tmp_path / "sheet.tif", np.transpose(image, (2, 0, 1)), nodata=0)
    predictor = make_predictor(window=48, overlap=0.25)
    # The class the model gives a black pixel: the no-data block would be one of its regions.
    names = get_metadata("synthetic").class_names
    index = int(expected_probabilities(np.zeros((1, 1, 3), np.uint8)).argmax())
    written = predict.predict_file(predictor, path, tmp_path / "out", polygons=names[index],
                                   polygon_format=polygon_format)
    assert written["polygons"] == tmp_path / "out" / f"sheet_{names[index]}.{polygon_format}"
    mask = expected_probabilities(image).argmax(-1) == index
    mask[10:30, 40:90] = False
    assert mask.sum() > 100
    crs, geometries, fields = read_polygons(written["polygons"], to_crs="EPSG:2180")
    # GeoJSON is WGS 84 longitude/latitude (RFC 7946); GeoPackage keeps the scene's CRS.
    epsg = 4326 if polygon_format == "geojson" else 2180
    assert rasterio.crs.CRS.from_user_input(crs).to_epsg() == epsg
    assert set(fields["class_name"]) == {names[index]}
    drawn = rasterio.features.rasterize(geometries, out_shape=mask.shape, transform=TRANSFORM,
                                        fill=0, default_value=1).astype(bool)
    assert (drawn & mask).sum() / (drawn | mask).sum() > 0.99
    # One polygon per 4-connected region of the class.
    assert len(geometries) == scipy.ndimage.label(mask)[1]

    # A minimum area (m^2; pixels are 0.25 m) drops the small regions only.
    written = predict.predict_file(predictor, path, tmp_path / "big", polygons=str(index),
                                   polygon_format=polygon_format, polygon_min_area=0.5)
    _, large, _ = read_polygons(written["polygons"], to_crs="EPSG:2180")
    assert 0 < len(large) < len(geometries)
    # (GeoJSON: coordinates rounded to ~1 cm in degrees, then reprojected back.)
    assert min(g.area for g in large) >= (0.5 if polygon_format == "gpkg" else 0.45)
    with pytest.raises(ValueError, match="'glacier' is not a class of synthetic"):
        predict.predict_file(predictor, path, tmp_path / "bad", polygons="glacier")


def test_float16_probabilities_and_plain_image_inputs(tmp_path):
    image = random_image(40, 50, seed=6)
    alpha = np.full((40, 50), 255, np.uint8)
    alpha[:5, :5] = 0  # transparent: no data
    Image.fromarray(np.dstack([image, alpha]), "RGBA").save(tmp_path / "photo.png")
    predictor = make_predictor(window=32, overlap=0.5)
    written = predict.predict_file(predictor, tmp_path / "photo.png", tmp_path / "out",
                                   probabilities="float16")
    expected = expected_probabilities(image)
    classes = np.asarray(Image.open(written["classes"]))
    assert written["classes"].name == "photo_classes.png" and classes.shape == (40, 50)
    truth = expected.argmax(-1)
    truth[:5, :5] = 255
    np.testing.assert_array_equal(classes, truth)
    assert Image.open(written["colour"]).mode == "P"
    with warnings.catch_warnings():  # A PNG's outputs are not georeferenced.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(written["probabilities"]) as probabilities:
            values = np.transpose(probabilities.read(), (1, 2, 0))
    # Half precision: about 3 significant digits.
    np.testing.assert_allclose(values, expected, atol=1e-3)

    Image.fromarray(image).save(tmp_path / "photo2.jpg", quality=95)
    written = predict.predict_file(predictor, tmp_path / "photo2.jpg", tmp_path / "out")
    decoded = np.asarray(Image.open(tmp_path / "photo2.jpg"))  # Pillow, as training
    np.testing.assert_array_equal(
        np.asarray(Image.open(written["classes"])),
        expected_probabilities(decoded).argmax(-1))


def test_band_policy_and_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tif: no such file"):
        predict.open_scene(tmp_path / "missing.tif")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        predict.resolve_inputs(str(tmp_path / "missing.tif"))
    grey = write_geotiff(tmp_path / "grey.tif", random_image(20, 30)[None, ..., 0])
    with pytest.raises(ValueError, match="grey.tif has 1 band; lcseg models take 3-band RGB"):
        predict.open_scene(grey)
    Image.fromarray(random_image(20, 30)[..., 0]).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="grey.png has 1 band"):
        predict.open_scene(tmp_path / "grey.png")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported format"):
        predict.open_scene(tmp_path / "notes.txt")

    # More than 3 bands: the first three, or the ones --bands names.
    five = np.transpose(random_image(20, 30), (2, 0, 1))
    five = np.concatenate([five, five[:2] // 2])
    path = write_geotiff(tmp_path / "five.tif", five)
    with predict.open_scene(path) as scene:
        np.testing.assert_array_equal(scene.read_rows(0, 20), np.transpose(five[:3], (1, 2, 0)))
    with predict.open_scene(path, bands=["5", "3", "1"]) as scene:
        np.testing.assert_array_equal(scene.read_rows(2, 4),
                                      np.transpose(five[[4, 2, 0], 2:4], (1, 2, 0)))
    for bands in ([1, 2, 6], ["1", "x", "2"], [1, 2]):
        with pytest.raises(ValueError, match="give three 1-based band numbers between 1 and 5"):
            predict.open_scene(path, bands=bands)

    # 16-bit: an error naming the fix, unless a percentile stretch is asked for.
    deep = np.random.default_rng(7).integers(1000, 3000, (3, 40, 30)).astype(np.uint16)
    path = write_geotiff(tmp_path / "deep.tif", deep, dtype="uint16")
    with pytest.raises(ValueError, match="deep.tif is uint16, not 8-bit.*--stretch percentile"):
        predict.open_scene(path)
    with warnings.catch_warnings():  # A PNG has no georeferencing.
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "deep.png", "w", driver="PNG", height=40, width=30,
                           count=3, dtype="uint16") as dataset:
            dataset.write(deep)  # (Pillow would silently keep only the high bytes.)
    with pytest.raises(ValueError, match="deep.png is uint16, not 8-bit"):
        predict.open_scene(tmp_path / "deep.png")
    with predict.open_scene(path, stretch="percentile") as scene:
        stretched = scene.read_rows(0, 40).astype(int)
    low, high = np.percentile(deep[0], [2, 98])
    manual = np.clip(np.round((deep[0] - low) / (high - low) * 255), 0, 255)
    assert np.abs(stretched[..., 0] - manual).max() <= 1
    assert stretched.min() == 0 and stretched.max() == 255


# ---------------------------------------------------------------------------------------
# LoveDA submission.
# ---------------------------------------------------------------------------------------


def _write_loveda_pngs(root, names):
    paths = []
    for index, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth images: quick to encode.
        y, x = np.mgrid[0:1024, 0:1024]
        image = np.stack([(x + 40 * index) % 256, (y // 4) % 256, (x + y) // 8 % 256], -1)
        Image.fromarray(image.astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_loveda_submission_zip_is_flat_named_sized_and_valued(tmp_path):
    predictor = make_predictor("loveda", window=512, overlap=0.0, batch=4)
    paths = _write_loveda_pngs(tmp_path / "Test", ["Urban/images_png/3514.png",
                                                   "Rural/images_png/4277.png"])
    output = tmp_path / "submission.zip"
    names = predict.write_loveda_submission(predictor, output, predict.file_images(paths))
    assert names == ["3514.png", "4277.png"]
    with zipfile.ZipFile(output) as archive:
        assert archive.namelist() == ["3514.png", "4277.png"]  # flat: no folder
        for name, path in zip(names, paths):
            mask = Image.open(io.BytesIO(archive.read(name)))
            assert mask.mode == "L" and mask.size == (1024, 1024)
            values = np.asarray(mask)
            assert values.max() <= 6
            expected = expected_probabilities(np.asarray(Image.open(path)), 7).argmax(-1)
            np.testing.assert_array_equal(values, expected)

    # The same number in Urban and Rural would collide in a flat zip: a clear error, and
    # no zip (not even a partial one) is left behind.
    clash = _write_loveda_pngs(tmp_path / "Other", ["Rural/3514.png"])
    with pytest.raises(ValueError, match="would both be 3514.png in the submission"):
        predict.write_loveda_submission(predictor, tmp_path / "clash.zip",
                                        predict.file_images([paths[0], *clash]))
    assert not list(tmp_path.glob("*clash.zip*"))
    small = tmp_path / "small.png"
    Image.fromarray(random_image(64, 64)).save(small)
    with pytest.raises(ValueError, match="is 64x64 px; LoveDA test images"):
        predict.write_loveda_submission(predictor, tmp_path / "s.zip",
                                        predict.file_images([small]))
    with pytest.raises(ValueError, match="needs a model trained on loveda"):
        predict.write_loveda_submission(make_predictor(), tmp_path / "s.zip", [])


def test_loveda_test_split_images_are_named_by_file_number(tmp_path):
    fake = fake_archives.write_loveda(tmp_path / "manual")
    items = list(predict.loveda_test_images(str(tmp_path / "data"), str(fake.manual_dir)))
    assert sorted((where.split()[-1], name) for where, name, _ in items) == [
        ("rural/6", "6.png"), ("urban/6", "6.png")]
    # Test images are 1024x1024; the fake's are 32x32 (nearest upscaling keeps them exact).
    images = [(where, name, np.repeat(np.repeat(image, 32, 0), 32, 1))
              for where, name, image in items]
    predictor = make_predictor("loveda", window=512, overlap=0.0)
    assert predict.write_loveda_submission(predictor, tmp_path / "one.zip",
                                           images[:1]) == ["6.png"]
    # Unlike the real dataset, the fake's Urban and Rural test images share a number.
    with pytest.raises(ValueError, match="LoveDA test image (urban|rural)/6 and LoveDA test "
                                         "image (urban|rural)/6 would both be 6.png"):
        predict.write_loveda_submission(predictor, tmp_path / "two.zip", images)


# ---------------------------------------------------------------------------------------
# End to end, from a trained workdir.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_workdir(synthetic_data_dir, tmp_path_factory):
    """A tiny run (configs/test.py, 3 steps: evaluated and checkpointed once)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(synthetic_data_dir, num_train_steps=3), workdir)
    return workdir


def test_command_line_predicts_a_geotiff_folder(trained_workdir, tmp_path):
    inputs = tmp_path / "scenes"
    inputs.mkdir()
    bands = np.transpose(random_image(150, 230, seed=8), (2, 0, 1))
    write_geotiff(inputs / "sheet.tif", bands)
    output = tmp_path / "predictions"
    result = run_python(["-m", "lcseg.predict", "--workdir", trained_workdir, "--input",
                         str(inputs), "--output", str(output), "--overlap", "0.25",
                         "--tta", "flips", "--probabilities", "uint8", "--polygons", "urban",
                         "--polygon_format", "geojson"])
    assert "Wrote" in result.stdout
    with rasterio.open(output / "sheet_classes.tif") as classes:
        assert (classes.height, classes.width) == (150, 230)
        assert classes.crs.to_epsg() == 2180 and classes.transform == TRANSFORM
        assert classes.read(1).max() < 6
    assert Image.open(output / "sheet_colour.png").size == (230, 150)
    with rasterio.open(output / "sheet_probabilities.tif") as probabilities:
        assert probabilities.count == 6
    crs, geometries, _ = read_polygons(output / "sheet_urban.geojson")
    assert rasterio.crs.CRS.from_user_input(crs).to_epsg() == 4326  # GeoJSON: RFC 7946

    # The same model in-process (4 devices, another batch split) gives the same classes.
    predictor = predict.Predictor.from_workdir(trained_workdir, overlap=0.25, tta="flips")
    classes, _ = predict.predict_scene(predictor, np.transpose(bands, (1, 2, 0)))
    with rasterio.open(output / "sheet_classes.tif") as written:
        assert np.mean(written.read(1) == classes) > 0.999

    # A bad input fails fast, before the model is loaded, with the reason.
    failed = run_python(["-m", "lcseg.predict", "--workdir", trained_workdir, "--input",
                         str(tmp_path / "nope.tif"), "--output", str(output)], check=False)
    assert failed.returncode != 0
    assert "nope.tif: no such file or folder" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_full_scene_evaluation_counts_every_labelled_pixel(trained_workdir):
    scores, path = evaluate.evaluate_checkpoint(trained_workdir, "validation", "latest",
                                                full_scene=True)
    assert path.endswith("-full_scene.json")
    with open(path) as f:
        report = json.load(f)
    assert report["full_scene"] is True and 0 <= report["miou"] <= 1
    tiled, _ = evaluate.evaluate_checkpoint(trained_workdir, "validation", "latest")
    # Same pixels counted; whole-scene context may change some predictions.
    assert np.sum(report["confusion_matrix"]) == np.sum(tiled["confusion_matrix"])
    np.testing.assert_array_equal(np.sum(report["confusion_matrix"], axis=1),
                                  np.sum(tiled["confusion_matrix"], axis=1))
    assert abs(scores["accuracy"] - tiled["accuracy"]) < 0.2


def test_models_trained_downscaled_are_refused_with_a_clear_message(synthetic_data_dir):
    config = tiny_config(synthetic_data_dir)
    config.data.downscale = 0.5
    experiment = train.Experiment(config)
    with pytest.raises(ValueError, match="downscale=0.5.*full resolution"):
        predict.Predictor.from_experiment(experiment, experiment.init_state())
