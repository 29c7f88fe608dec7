"""Cloud-optimised, self-describing, traceable outputs of ``predict_file``.

Checked with readers that are not lcseg's own: rio-cogeo's ``cog_validate`` (strict) for
the COG layout, rasterio for colour table, nodata, tags and overviews, and GDAL's
``gdalinfo -json`` (when installed: Debian's gdal-bin) for the class names and the raster
attribute table that GDAL and QGIS read from the PAM ``.aux.xml``.
"""

import datetime
import json
import logging
import os
import shutil
import subprocess
import threading

import flax.linen as nn
import numpy as np
import pytest
import rasterio
from rio_cogeo.cogeo import cog_validate

from lcseg import predict
from lcseg.data import get_metadata
from tests.test_predict import (
    MEAN,
    STD,
    expected_probabilities,
    make_predictor,
    pixel_weights,
    random_image,
    write_geotiff,
)

PROVENANCE = {"model": "unet", "checkpoint_step": "7", "tta": "none", "overlap": "0.5"}


@pytest.fixture(scope="module")
def scene_and_outputs(tmp_path_factory):
    """A 600x700 sheet with a nodata block, predicted with uint8 probabilities."""
    root = tmp_path_factory.mktemp("cog")
    image = random_image(600, 700, seed=11)
    image[image.sum(-1) == 0] = 1
    image[100:140, 200:260] = 0
    path = write_geotiff(root / "sheet.tif", np.transpose(image, (2, 0, 1)), nodata=0)
    written = predict.predict_file(make_predictor(window=64, overlap=0.5), path, root / "out",
                                   probabilities="uint8", provenance=PROVENANCE)
    return image, written


def test_classes_and_probabilities_are_valid_cogs_with_overviews(scene_and_outputs):
    image, written = scene_and_outputs
    for key in ("classes", "probabilities"):
        valid, errors, warnings = cog_validate(written[key], strict=True)
        assert valid, (key, errors, warnings)
        with rasterio.open(written[key]) as dataset:
            # 700 px wide in 256-px tiles: overviews down to one tile.
            assert dataset.overviews(1) == [2, 4]
            assert dataset.compression.name.lower() == "deflate"
            assert dataset.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    truth = expected_probabilities(image).argmax(-1).astype(np.uint8)
    truth[100:140, 200:260] = 255
    with rasterio.open(written["classes"]) as classes:
        np.testing.assert_array_equal(classes.read(1), truth)
        # Overviews pick pixels of the map (nearest: no averaged, invented classes).
        np.testing.assert_array_equal(classes.read(1, out_shape=(300, 350)), truth[::2, ::2])
    with rasterio.open(written["probabilities"]) as probabilities:
        values = np.transpose(probabilities.read(), (1, 2, 0)).astype(np.float64)
        assert np.abs(values - expected_probabilities(image) * 255).max() <= 0.51
        assert not probabilities.dataset_mask()[100:140, 200:260].any()
        assert probabilities.dataset_mask()[:100].all()


def test_colour_table_nodata_and_provenance_tags_read_back(scene_and_outputs):
    _, written = scene_and_outputs
    metadata = get_metadata("synthetic")
    with rasterio.open(written["classes"]) as classes:
        assert classes.nodata == 255
        colormap = classes.colormap(1)
        for index, colour in enumerate(metadata.palette):
            assert colormap[index][:3] == tuple(colour)
        tags = classes.tags()
    for key, value in PROVENANCE.items():
        assert tags[f"lcseg_{key}"] == value
    with rasterio.open(written["probabilities"]) as probabilities:
        assert probabilities.tags()["lcseg_checkpoint_step"] == "7"
        assert probabilities.descriptions == tuple(metadata.class_names)
    found = predict.read_provenance(written["classes"])
    made = datetime.datetime.fromisoformat(found.pop("time"))  # When the map was made.
    assert abs(datetime.datetime.now(datetime.UTC) - made) < datetime.timedelta(hours=1)
    assert found == PROVENANCE
    assert predict.read_provenance(written["classes"].with_name("absent.tif")) is None


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="needs GDAL's gdalinfo")
def test_gdal_reads_class_names_and_attribute_table(scene_and_outputs):
    _, written = scene_and_outputs
    metadata = get_metadata("synthetic")
    info = json.loads(subprocess.run(["gdalinfo", "-json", str(written["classes"])],
                                     capture_output=True, text=True, check=True).stdout)
    band = info["bands"][0]
    assert band["categories"] == list(metadata.class_names)
    assert band["noDataValue"] == 255
    assert info["metadata"][""]["lcseg_model"] == "unet"
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    fields = [field["name"] for field in info["rat"]["fieldDefn"]]
    assert fields == ["Value", "Class", "Red", "Green", "Blue"]
    rows = {row["f"][0]: row["f"][1:] for row in info["rat"]["row"]}
    for index, name in enumerate(metadata.class_names):
        assert rows[index] == [name, *metadata.palette[index]]


def test_float16_probabilities_cog(tmp_path):
    image = random_image(300, 520, seed=12)
    path = write_geotiff(tmp_path / "sheet.tif", np.transpose(image, (2, 0, 1)))
    written = predict.predict_file(make_predictor(window=64), path, tmp_path / "out",
                                   probabilities="float16")
    valid, errors, warnings = cog_validate(written["probabilities"], strict=True)
    assert valid, (errors, warnings)
    with rasterio.open(written["probabilities"]) as probabilities:
        assert probabilities.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16"
        assert probabilities.overviews(1) == [2, 4]
        values = np.transpose(probabilities.read(), (1, 2, 0))
    np.testing.assert_allclose(values, expected_probabilities(image), atol=1e-3)


def test_a_stop_between_row_blocks_leaves_nothing_and_classes_are_renamed_last(
        tmp_path, monkeypatch):
    image = random_image(400, 120, seed=13)
    path = write_geotiff(tmp_path / "sheet.tif", np.transpose(image, (2, 0, 1)))
    predictor = make_predictor(window=32)
    asked = []

    def should_stop():
        asked.append(True)
        return len(asked) > 3

    with pytest.raises(predict.PredictionStopped) as stopped:
        predict.predict_file(predictor, path, tmp_path / "stopped", probabilities="uint8",
                             should_stop=should_stop)
    assert len(asked) == 4 and os.listdir(tmp_path / "stopped") == []
    # The reading and writing threads are gone, not waiting for the next rows, while the
    # caller still holds the exception (and so predict_file's frame).
    assert [t.name for t in threading.enumerate() if t.name.startswith("lcseg-")] == []
    assert stopped.traceback

    renamed = []
    real_replace = os.replace

    def recording_replace(source, target):
        renamed.append(os.path.basename(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    predict.predict_file(predictor, path, tmp_path / "done", probabilities="uint8",
                         should_stop=lambda: False)
    assert renamed[-1] == "sheet_classes.tif"
    assert sorted(renamed) == sorted(os.listdir(tmp_path / "done"))


class NeighbourModel(nn.Module):
    """Logits of the pixel one down and one right (a 3x3 convolution that copies it)."""

    num_classes: int

    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        return nn.Conv(self.num_classes, (3, 3), padding="SAME", name="head")(images)


def neighbour_predictor():
    variables = pixel_weights(6)
    kernel = np.zeros((3, 3, 3, 6), np.float32)
    kernel[2, 2] = variables["params"]["head"]["kernel"][0, 0]  # tap (+1, +1)
    variables["params"]["head"]["kernel"] = kernel
    # 20x20 scene, 32-px windows, stride 16, 8 px of reflect padding: every scene pixel's
    # neighbour lies inside every window that covers it (no convolution padding involved).
    return predict.Predictor(NeighbourModel(6), variables, metadata=get_metadata("synthetic"),
                             mean=MEAN, std=STD, window=32, overlap=0.5, batch_size=4)


def neighbour_mismatch() -> float:
    """Largest difference from a numpy reflect-padded reference, at the scene's borders."""
    image = random_image(20, 20, seed=14)
    _, probabilities = predict.predict_scene(neighbour_predictor(), image)
    padded = np.pad(image, ((0, 1), (0, 1), (0, 0)), mode="reflect")
    expected = expected_probabilities(padded[1:, 1:])
    np.testing.assert_allclose(probabilities[:-1, :-1], expected[:-1, :-1], rtol=1e-5,
                               atol=1e-6)  # the interior: no padding needed
    border = np.zeros((20, 20), bool)
    border[-1], border[:, -1] = True, True
    return float(np.abs(probabilities[border] - expected[border]).max())


def test_scene_borders_are_fed_reflected_pixels():
    assert neighbour_mismatch() < 1e-5


def test_border_check_sees_zero_padding(monkeypatch):
    # Zeros instead of reflected columns must be caught by the check above.
    def zero_columns(rows, first, stop, width):
        out = np.zeros((len(rows), stop - first, 3), np.uint8)
        inside = slice(max(first, 0), min(stop, width))
        out[:, inside.start - first:inside.stop - first] = rows[:, inside]
        return out

    monkeypatch.setattr("lcseg.predict.predictor._reflect_columns", zero_columns)
    assert neighbour_mismatch() > 0.05


def test_progress_is_logged_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setattr("lcseg.predict.predictor.PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    predictor = make_predictor(window=32)
    with caplog.at_level(logging.INFO):
        predict.predict_scene(predictor, random_image(100, 60, seed=15))
        quiet = len(caplog.records)
        for _ in predictor.predict_rows(predict.ArrayScene(random_image(100, 60)),
                                        progress=True):
            pass
    lines = [r.getMessage() for r in caplog.records[quiet:] if "windows/s" in r.getMessage()]
    assert lines, "no progress line"
    total = predictor.last_stats["windows"]
    assert f"/{total} windows" in lines[-1] and "ETA" in lines[-1]
    assert len([r for r in caplog.records[:quiet] if "windows/s" in r.getMessage()]) == 0


def test_a_read_error_midway_leaves_nothing_and_no_thread(tmp_path, monkeypatch):
    image = random_image(400, 120, seed=16)
    path = write_geotiff(tmp_path / "sheet.tif", np.transpose(image, (2, 0, 1)))
    real_read = predict.RasterScene.read_rows

    def failing_read(self, start, stop):
        if start > 150:  # A corrupt block, after some rows were written.
            raise ValueError(f"{self.name}: corrupt block at row {start}")
        return real_read(self, start, stop)

    monkeypatch.setattr(predict.RasterScene, "read_rows", failing_read)
    with pytest.raises(ValueError, match="corrupt block"):
        predict.predict_file(make_predictor(window=32), path, tmp_path / "out",
                             probabilities="uint8")
    assert os.listdir(tmp_path / "out") == []
    alive = [t.name for t in threading.enumerate() if t.name.startswith("lcseg-")]
    assert alive == []
