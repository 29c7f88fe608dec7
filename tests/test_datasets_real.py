"""The DeepGlobe, LoveDA and LandCover.ai builders, on small fake downloads.

The fakes (tests/fake_archives.py) have the real archives' names, folders and formats,
with tiny images. Every prepared example is compared with what the fake says it must
be: decoded labels, images, split membership; bad downloads must fail with a message
that names the file and what to do, and leave nothing prepared behind.
"""

from __future__ import annotations

import collections
import hashlib
import random
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from datasets.deepglobe import deepglobe_dataset_builder as deepglobe
from datasets.landcoverai import landcoverai_dataset_builder as landcoverai
from lcseg import prepare as prepare_cli
from lcseg.data import IGNORE_LABEL, get_metadata, open_split, prepare_dataset, train_class_counts
from tests import fake_archives
from tests.conftest import run_python


def _examples(name: str, split: str, data_dir: Path) -> list[dict]:
    source = open_split(name, split, str(data_dir))
    return [source[index] for index in range(len(source))]


def _check_prepared(name: str, data_dir: Path, fake: fake_archives.FakeDataset,
                    splits: dict[str, list[str]], extra_keys: tuple[str, ...] = ()) -> None:
    """Every split holds exactly its ids, each with the expected image and label."""
    builder = prepare_dataset(name, str(data_dir))
    assert set(builder.info.splits) | set(builder.SPLIT_ALIASES) == set(splits)
    for split, ids in splits.items():
        examples = _examples(name, split, data_dir)
        assert sorted(example["id"] for example in examples) == sorted(ids), split
        for example in examples:
            assert set(example) == {"image", "label", "id", *extra_keys}
            assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
            assert example["label"].dtype == np.uint8 and example["label"].ndim == 2
            np.testing.assert_array_equal(example["image"], fake.images[example["id"]])
            np.testing.assert_array_equal(example["label"], fake.labels[example["id"]])
    # Class statistics of the training split(s), for class weighting.
    expected_counts = sum(np.bincount(fake.labels[i].ravel(), minlength=256)
                          for split in builder.TRAIN_SPLITS
                          for i in splits[split])[: get_metadata(name).num_classes]
    np.testing.assert_array_equal(train_class_counts(name, str(data_dir)), expected_counts)


def _stored_image_bytes(name: str, split: str, data_dir: Path) -> dict[str, bytes]:
    """The encoded image bytes of each example of ``split``, by id."""
    builder = prepare_dataset(name, str(data_dir))
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return {source[i]["id"].decode(): source[i]["image"] for i in range(len(source))}


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


# ----------------------------------------------------------------------------------------
# DeepGlobe
# ----------------------------------------------------------------------------------------

def test_deepglobe_split_rule_is_stable():
    # Pinned: changing the rule silently would move images between train and test.
    pinned = {"100694": "test", "207743": "test", "6399": "validation", "91": "validation",
              "998002": "validation", "55": "train", "12": "train"}
    splits = deepglobe.assign_splits(fake_archives.DEEPGLOBE_LABELLED_IDS)
    assert {image_id: splits[image_id] for image_id in pinned} == pinned
    # The order the ids come in (file order, metadata.csv order) does not matter.
    assert deepglobe.assign_splits(reversed(fake_archives.DEEPGLOBE_LABELLED_IDS)) == splits


def _old_modulo_split(image_id: str) -> str:
    """VERSION 1.0.0's rule: sha256 bucket modulo 803, cut at 454 and 661."""
    bucket = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big") % 803
    return "train" if bucket < 454 else "validation" if bucket < 661 else "test"


def test_deepglobe_full_download_gives_glnet_counts():
    # 803 ids like the real ones (integers of varying length); no images needed.
    ids = [str(number) for number in random.Random(3).sample(range(1, 1_000_000), 803)]
    splits = deepglobe.assign_splits(ids)
    assert collections.Counter(splits.values()) == {"train": 454, "validation": 207,
                                                    "test": 142}
    # Ordering by 1.0.0's bucket first: only the images between 1.0.0's cut points and
    # the new ones change split (the minimum to reach 454/207/142).
    old = {image_id: _old_modulo_split(image_id) for image_id in ids}
    old_counts = collections.Counter(old.values())
    assert old_counts != {"train": 454, "validation": 207, "test": 142}
    old_cuts = (old_counts["train"], old_counts["train"] + old_counts["validation"])
    moved = sum(splits[image_id] != old[image_id] for image_id in ids)
    assert moved == abs(old_cuts[0] - 454) + abs(old_cuts[1] - 661) > 0


@pytest.mark.parametrize("num_labelled", range(3, 40))
def test_deepglobe_split_counts_fill_every_split(num_labelled):
    counts = deepglobe.split_counts(num_labelled)
    assert sum(counts.values()) == num_labelled and min(counts.values()) >= 1
    assert counts["train"] >= counts["validation"] >= counts["test"]


# Parts of a download (realistic ids) where 1.0.0's hash-modulo rule left test empty.
DEEPGLOBE_SUBSETS = {
    8: ["792618", "99537", "648506", "838334", "262774", "954038", "558533", "739526"],
    20: ["354006", "828079", "385138", "753501", "98359", "354787", "817377", "650781",
         "37497", "43304", "282819", "171920", "156774", "611892", "303695", "378538",
         "414069", "575227", "136038", "307759"],
}


@pytest.mark.parametrize("num_labelled", sorted(DEEPGLOBE_SUBSETS))
def test_deepglobe_part_of_the_download_fills_every_split(tmp_path, num_labelled):
    ids = DEEPGLOBE_SUBSETS[num_labelled]
    fake = fake_archives.write_deepglobe(tmp_path / "manual", size=16, labelled_ids=ids)
    builder = prepare_dataset("deepglobe", str(tmp_path / "data"), str(fake.manual_dir))
    expected = deepglobe.split_counts(num_labelled)
    assert {split: builder.info.splits[split].num_examples
            for split in deepglobe.LABELLED_SPLITS} == expected
    assert min(expected.values()) >= 1
    prepared = {split: sorted(example["id"] for example in
                              _examples("deepglobe", split, tmp_path / "data"))
                for split in deepglobe.LABELLED_SPLITS}
    assert sorted(sum(prepared.values(), [])) == sorted(ids)


def test_deepglobe_too_few_labelled_images(tmp_path):
    fake = fake_archives.write_deepglobe(tmp_path / "manual", size=16,
                                         labelled_ids=["6399", "55"])
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match=r"archive\.zip!metadata\.csv lists 2 labelled .*"
                                         r"at least 3 .*full download"):
        prepare_dataset("deepglobe", str(data_dir), str(fake.manual_dir))
    assert _files(data_dir) == []
    with pytest.raises(ValueError, match="cannot fill"):
        deepglobe.assign_splits(["6399", "55"])
    # The command prints it as one line, no traceback.
    argv = ["deepglobe", "--manual_dir", str(fake.manual_dir), "--data_dir", str(data_dir)]
    result = run_python(["-m", "lcseg.prepare", *argv], check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("lcseg.prepare: error:")]
    assert len(errors) == 1 and "lists 2 labelled" in errors[0], result.stderr
    assert _files(data_dir) == []


def test_deepglobe_mask_decoding_binarises_at_128():
    colours = np.array([[[0, 255, 255], [127, 128, 200], [255, 255, 0], [255, 0, 0],
                         [0, 0, 0], [128, 127, 127], [255, 255, 255], [40, 40, 215]]],
                       np.uint8)
    # cyan, cyan (noisy), yellow, red -> ignore, black -> ignore, red (noisy), white, blue.
    expected = [[0, 0, 1, IGNORE_LABEL, IGNORE_LABEL, IGNORE_LABEL, 5, 4]]
    np.testing.assert_array_equal(deepglobe.decode_mask(colours), expected)


@pytest.mark.parametrize("as_zip, zip_name", [
    (True, "archive.zip"),
    (True, "deepglobe-land-cover-classification-dataset.zip"),
    (False, None),
])
def test_deepglobe_prepares_zip_or_folder(tmp_path, as_zip, zip_name):
    fake = fake_archives.write_deepglobe(tmp_path / "manual", as_zip=as_zip,
                                         zip_name=zip_name or "unused.zip")
    prepare_dataset("deepglobe", str(tmp_path / "data"), str(fake.manual_dir))
    labelled = fake.splits["labelled"]
    split_of = deepglobe.assign_splits(labelled)
    splits = {split: [i for i in labelled if split_of[i] == split]
              for split in deepglobe.LABELLED_SPLITS}
    assert all(splits.values()), "the fake ids must reach every split"
    splits["unlabelled"] = fake.splits["unlabelled"]
    _check_prepared("deepglobe", tmp_path / "data", fake, splits)
    # Noisy colours decode to their class, pure red and black to ignore.
    all_labels = np.concatenate([fake.labels[i].ravel() for i in labelled])
    assert (all_labels == IGNORE_LABEL).any() and (all_labels < 6).any()
    # Images are kept as the download's JPEG bytes (PNG would be ~3.4x larger).
    stored = _stored_image_bytes("deepglobe", "unlabelled", tmp_path / "data")
    member = f"test/{fake_archives.DEEPGLOBE_TEST_IDS[0]}_sat.jpg"
    if as_zip:
        with zipfile.ZipFile(fake.source) as archive:
            original = archive.read(member)
    else:
        original = (fake.source / member).read_bytes()
    assert stored[fake_archives.DEEPGLOBE_TEST_IDS[0]] == original


def _deepglobe_folder(tmp_path: Path) -> Path:
    return fake_archives.write_deepglobe(tmp_path / "manual", as_zip=False).source


def test_deepglobe_missing_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
        prepare_dataset("deepglobe", str(tmp_path / "data"), str(tmp_path / "nowhere"))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match=r"No DeepGlobe data in .*manual.*archive\.zip"):
        prepare_dataset("deepglobe", str(tmp_path / "data"), str(tmp_path / "manual"))


def test_deepglobe_corrupt_zip(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "archive.zip").write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(ValueError, match=r"archive\.zip is not a readable zip.*download it "):
        prepare_dataset("deepglobe", str(tmp_path / "data"), str(manual))


def test_deepglobe_class_dict_mismatch(tmp_path):
    folder = _deepglobe_folder(tmp_path)
    text = (folder / "class_dict.csv").read_text().replace("water,0,0,255", "water,0,0,254")
    (folder / "class_dict.csv").write_text(text)
    with pytest.raises(ValueError, match=r"class_dict\.csv row 6: class 'water' has colour "
                                         r"\(0, 0, 254\)"):
        prepare_dataset("deepglobe", str(tmp_path / "data"), str(tmp_path / "manual"))


@pytest.mark.parametrize("missing", ["metadata.csv", "class_dict.csv"])
def test_deepglobe_missing_csv(tmp_path, missing):
    folder = _deepglobe_folder(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{missing} is missing"):
        prepare_dataset("deepglobe", str(tmp_path / "data"), str(tmp_path / "manual"))


def test_deepglobe_listed_file_missing(tmp_path):
    folder = _deepglobe_folder(tmp_path)
    (folder / "train" / "6399_mask.png").unlink()
    with pytest.raises(FileNotFoundError,
                       match=r"metadata\.csv row 3: train/6399_mask\.png is not in the download"):
        prepare_dataset("deepglobe", str(tmp_path / "data"), str(tmp_path / "manual"))


def test_deepglobe_bad_mask_fails_cleanly_and_rerun_works(tmp_path):
    folder = _deepglobe_folder(tmp_path)
    mask_path = folder / "train" / "6399_mask.png"
    good = mask_path.read_bytes()
    Image.new("RGB", (32, 32)).save(mask_path)
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match=r"6399_mask\.png is 32x32 px but its image "
                                         r"6399_sat\.jpg is 64x64"):
        prepare_dataset("deepglobe", str(data_dir), str(tmp_path / "manual"))
    Image.new("L", (64, 64)).save(mask_path)
    with pytest.raises(ValueError, match=r"6399_mask\.png: mask has mode 'L'"):
        prepare_dataset("deepglobe", str(data_dir), str(tmp_path / "manual"))
    # The failures happened while writing examples: nothing of them may remain.
    assert _files(data_dir) == []
    mask_path.write_bytes(good)
    builder = prepare_dataset("deepglobe", str(data_dir), str(tmp_path / "manual"))
    assert builder.is_prepared()


# ----------------------------------------------------------------------------------------
# LoveDA
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_zip", [True, False])
def test_loveda_prepares_zips_or_folders(tmp_path, as_zip, capsys):
    fake = fake_archives.write_loveda(tmp_path / "manual", as_zip=as_zip)
    data_dir = tmp_path / "data"
    prepare_dataset("loveda", str(data_dir), str(fake.manual_dir))
    _check_prepared("loveda", data_dir, fake, fake.splits, extra_keys=("domain",))
    # Each example is stored once, in its per-domain split; train/validation/test are
    # unions read through split aliases.
    builder = prepare_dataset("loveda", str(data_dir))
    stored = {"train_urban", "train_rural", "validation_urban", "validation_rural",
              "test_urban", "test_rural"}
    assert set(builder.info.splits) == stored
    assert sum(info.num_examples for info in builder.info.splits.values()) == len(fake.images)
    for split in ("train", "validation", "test"):
        assert len(open_split("loveda", split, str(data_dir))) == sum(
            len(fake.splits[f"{split}_{domain}"]) for domain in ("urban", "rural"))
    # Class counts sum both train domains.
    expected = sum(np.bincount(fake.labels[i].ravel(), minlength=256)[:7]
                   for i in fake.splits["train_urban"] + fake.splits["train_rural"])
    np.testing.assert_array_equal(train_class_counts("loveda", str(data_dir)), expected)
    prepare_cli.run("loveda", str(data_dir))
    assert "4 examples (train_urban+train_rural)" in capsys.readouterr().out
    # Same file number in both domains, two examples; the domain feature says which.
    train = {example["id"]: example for example in _examples("loveda", "train", data_dir)}
    assert {"urban/1", "rural/1"} <= set(train)
    assert all(example["domain"] == example["id"].split("/")[0] for example in train.values())
    assert all((example["label"] == IGNORE_LABEL).all()
               for example in _examples("loveda", "test", data_dir))
    # 8-bit RGB PNGs are kept as they are.
    stored = _stored_image_bytes("loveda", "validation_rural", data_dir)
    if as_zip:
        with zipfile.ZipFile(fake.manual_dir / "Val.zip") as archive:
            original = archive.read("Val/Rural/images_png/5.png")
    else:
        original = (fake.manual_dir / "Val/Rural/images_png/5.png").read_bytes()
    assert stored["rural/5"] == original


def test_loveda_missing_and_corrupt_archives(tmp_path):
    fake = fake_archives.write_loveda(tmp_path / "manual")
    (fake.manual_dir / "Val.zip").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing Val\.zip \(or its folder Val/\)"):
        prepare_dataset("loveda", str(tmp_path / "data"), str(fake.manual_dir))
    (fake.manual_dir / "Val.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"Val\.zip is not a readable zip"):
        prepare_dataset("loveda", str(tmp_path / "data"), str(fake.manual_dir))
    # Damaged bytes inside a member (a bad download that still opens as a zip).
    fake_archives.write_loveda(fake.manual_dir)
    with zipfile.ZipFile(fake.source) as archive:
        info = archive.getinfo("Train/Urban/images_png/2.png")
    data = bytearray(fake.source.read_bytes())
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle: middle + 8] = bytes(8) if data[middle: middle + 8] != bytes(8) else b"x" * 8
    fake.source.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"Train\.zip!Train/Urban/images_png/2\.png cannot be "
                                         r"read .*corrupt"):
        prepare_dataset("loveda", str(tmp_path / "data"), str(fake.manual_dir))


def test_loveda_image_without_mask(tmp_path):
    fake = fake_archives.write_loveda(tmp_path / "manual")
    fake_archives.replace_zip_member(fake.source, "Train/Urban/masks_png/2.png", None)
    with pytest.raises(FileNotFoundError, match=r"Urban/masks_png/: no mask for image\(s\) "
                                                r"\['2\.png'\]"):
        prepare_dataset("loveda", str(tmp_path / "data"), str(fake.manual_dir))


def test_loveda_bad_mask_fails_cleanly_and_rerun_works(tmp_path):
    fake = fake_archives.write_loveda(tmp_path / "manual")
    member = "Rural/masks_png/3.png"
    raw = np.full((32, 32), 9, np.uint8)
    fake_archives.write_loveda_mask(fake.source, "Train/" + member, raw)
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match=r"Train\.zip!Train/Rural/masks_png/3\.png: mask "
                                         r"value\(s\) \[9\] out of range"):
        prepare_dataset("loveda", str(data_dir), str(fake.manual_dir))
    fake_archives.write_loveda_mask(fake.source, "Train/" + member, np.ones((16, 32)))
    with pytest.raises(ValueError, match=r"3\.png is 32x16 px but its image is 32x32"):
        prepare_dataset("loveda", str(data_dir), str(fake.manual_dir))
    assert _files(data_dir) == []
    fake_archives.write_loveda_mask(fake.source, "Train/" + member, np.ones((32, 32)))
    assert prepare_dataset("loveda", str(data_dir), str(fake.manual_dir)).is_prepared()


# ----------------------------------------------------------------------------------------
# LandCover.ai
# ----------------------------------------------------------------------------------------

def test_landcoverai_tile_numbering_matches_split_py():
    # split.py: row-major 512 px windows, partial ones skipped but counted.
    assert landcoverai.tile_numbers(1100, 1300) == [0, 1, 3, 4]
    assert landcoverai.tile_numbers(600, 1100) == [0, 1]
    assert landcoverai.tile_numbers(1024, 1024) == [0, 1, 2, 3]
    assert landcoverai.tile_numbers(511, 4000) == []


@pytest.mark.parametrize("as_zip", [True, False])
def test_landcoverai_prepares_lossless_tiles(tmp_path, as_zip, monkeypatch):
    import rasterio.io

    fake = fake_archives.write_landcoverai(tmp_path / "manual", as_zip=as_zip)
    # Memory stays bounded: rasters are read in windows of at most 512 rows.
    windows = []
    original_read = rasterio.io.DatasetReader.read

    def read(self, *args, window=None, **kwargs):
        windows.append(window)
        return original_read(self, *args, window=window, **kwargs)

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", read)
    prepare_dataset("landcoverai", str(tmp_path / "data"), str(fake.manual_dir))
    assert windows and all(w is not None and w.height <= 512 for w in windows)
    # Tiles equal the sources' windows exactly; the unlisted whole tile is not kept.
    _check_prepared("landcoverai", tmp_path / "data", fake, fake.splits)


def _landcoverai_folder(tmp_path: Path) -> Path:
    return fake_archives.write_landcoverai(tmp_path / "manual", as_zip=False).source


def test_landcoverai_listed_tile_must_exist(tmp_path):
    folder = _landcoverai_folder(tmp_path)
    with open(folder / "val.txt", "a") as f:
        f.write("M-33-20-D-c-4-2_2\n")  # Crosses the right edge: split.py never wrote it.
    with pytest.raises(ValueError, match=r"val\.txt: tile M-33-20-D-c-4-2_2 does not exist: "
                                         r"sheet M-33-20-D-c-4-2 is 1300x1100 px"):
        prepare_dataset("landcoverai", str(tmp_path / "data"), str(tmp_path / "manual"))
    (folder / "val.txt").write_text("Q-99-1-A-a-1-1_0\n")
    with pytest.raises(ValueError, match=r"tile Q-99-1-A-a-1-1_0 names sheet 'Q-99-1-A-a-1-1', "
                                         r"but images/Q-99-1-A-a-1-1\.tif is not in"):
        prepare_dataset("landcoverai", str(tmp_path / "data"), str(tmp_path / "manual"))
    (folder / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.txt is missing"):
        prepare_dataset("landcoverai", str(tmp_path / "data"), str(tmp_path / "manual"))


def test_landcoverai_size_mismatch(tmp_path):
    folder = _landcoverai_folder(tmp_path)
    fake_archives.write_geotiff(folder / "masks" / "N-34-140-A-b-3-2.tif",
                                np.zeros((600, 1000), np.uint8))
    with pytest.raises(ValueError, match=r"masks/N-34-140-A-b-3-2\.tif is 1000x600 px but "
                                         r".*images/N-34-140-A-b-3-2\.tif is 1100x600"):
        prepare_dataset("landcoverai", str(tmp_path / "data"), str(tmp_path / "manual"))


def test_landcoverai_bad_mask_fails_cleanly_and_rerun_works(tmp_path):
    fake = fake_archives.write_landcoverai(tmp_path / "manual")
    mask = np.zeros((600, 1100), np.uint8)
    mask[100, 600] = 7  # Inside tile 1 (x 512..1023, y 0..511), which train.txt lists.
    bad_tif = tmp_path / "bad.tif"
    fake_archives.write_geotiff(bad_tif, mask)
    member = "masks/N-34-140-A-b-3-2.tif"
    fake_archives.replace_zip_member(fake.source, member, bad_tif.read_bytes())
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match=r"landcover\.ai\.v1\.zip!masks/N-34-140-A-b-3-2\.tif: "
                                         r"value 7 in tile N-34-140-A-b-3-2_1"):
        prepare_dataset("landcoverai", str(data_dir), str(fake.manual_dir))
    assert _files(data_dir) == []
    mask[100, 600] = 4
    fake_archives.write_geotiff(bad_tif, mask)
    fake_archives.replace_zip_member(fake.source, member, bad_tif.read_bytes())
    assert prepare_dataset("landcoverai", str(data_dir), str(fake.manual_dir)).is_prepared()


# ----------------------------------------------------------------------------------------
# The prepare command, and TensorFlow staying out
# ----------------------------------------------------------------------------------------

def test_prepare_command(tmp_path, capsys):
    fake = fake_archives.write_landcoverai(tmp_path / "manual")
    data_dir = tmp_path / "data"
    prepare_cli.run("landcoverai", str(data_dir), str(fake.manual_dir))
    out = capsys.readouterr().out
    assert f"is in {data_dir / 'lcseg_landcoverai' / '1.0.0'}" in out
    assert "train" in out and "3 examples" in out and "took" in out and "on disk" in out
    prepare_cli.run("landcoverai", str(data_dir), str(fake.manual_dir))
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="LoveDA download incomplete"):
        prepare_cli.run("loveda", str(data_dir), str(fake.manual_dir))


def test_prepare_command_synthetic_needs_no_manual_dir(synthetic_data_dir, capsys):
    prepare_cli.run("synthetic", synthetic_data_dir)
    assert "480 examples" in capsys.readouterr().out


def test_no_tensorflow_needed(tmp_path):
    fake_archives.write_loveda(tmp_path / "manual")
    code = textwrap.dedent(f"""
        import sys
        from lcseg.data import open_split, prepare_dataset
        prepare_dataset("loveda", {str(tmp_path / 'data')!r}, {str(tmp_path / 'manual')!r})
        # "train" is an alias: TFDS reads train_urban+train_rural.
        source = open_split("loveda", "train", {str(tmp_path / 'data')!r})
        assert len(source) == 4 and source[3]["image"].shape == (32, 32, 3)
        print("tensorflow" in sys.modules)
    """)
    result = run_python(["-c", code])
    assert result.stdout.strip().splitlines()[-1] == "False"
