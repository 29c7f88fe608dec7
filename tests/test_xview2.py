"""The xView2 builder, on small fake downloads in the real layout.

The fakes (``tests/fake_archives.write_xview2``) are tar.gz archives with the real names
and top folders (``train_images_labels_targets.tar.gz`` holding ``train/images``,
``train/targets``, ``train/labels``), members in a shuffled order, 64x64 images, or the
folders they extract to. Every prepared example is compared with the fake's pre-disaster
image and label; bad downloads must fail naming the file and what to do, before or
without leaving anything prepared.
"""

from __future__ import annotations

import collections
import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from datasets.xview2 import xview2_dataset_builder as xview2
from lcseg import prepare as prepare_cli
from lcseg.data import get_metadata, open_split, prepare_dataset, train_class_counts
from tests import fake_archives

TRAIN_TAR = fake_archives.XVIEW2_ARCHIVES["train"]
ALL_FOLDERS = ("train", "test", "tier3", "hold")


def _files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def _examples(split: str, data_dir: Path) -> dict[str, dict]:
    source = open_split("xview2", split, str(data_dir))
    return {example["id"]: example for example in (source[i] for i in range(len(source)))}


def _expected_splits(fake: fake_archives.FakeDataset) -> dict[str, list[str]]:
    """The splits the builder must make of a fake: the rule of the builder's docstring."""
    train_ids = fake.splits["train_archive"]
    split_of = xview2.assign_splits(train_ids)
    splits = {split: [i for i in train_ids if split_of[i] == split]
              for split in ("train", "validation")}
    splits["train"] += fake.splits.get("tier3_archive", [])
    splits["test"] = fake.splits["test_archive"]
    if "hold_archive" in fake.splits:
        splits["hold"] = fake.splits["hold_archive"]
    return splits


def _prepare(manual_dir: Path, data_dir: Path):
    return prepare_dataset("xview2", str(data_dir), str(manual_dir))


def _raw_member(fake: fake_archives.FakeDataset, folder: str, name: str) -> bytes:
    """A file's bytes as the download holds them (tar member or extracted file)."""
    tar_path = fake.manual_dir / fake_archives.XVIEW2_ARCHIVES[folder]
    if tar_path.is_file():
        with tarfile.open(tar_path) as archive:
            return archive.extractfile(f"{folder}/{name}").read()
    stem = fake_archives.XVIEW2_ARCHIVES[folder].removesuffix(".tar.gz")
    nested = fake.manual_dir / stem / folder / name
    return (nested if nested.is_file() else fake.manual_dir / folder / name).read_bytes()


# ----------------------------------------------------------------------------------------
# The split rule
# ----------------------------------------------------------------------------------------

def test_split_rule_is_pinned_and_order_free():
    # Pinned: changing the rule silently would move images between train and validation.
    splits = xview2.assign_splits(fake_archives.XVIEW2_IDS["train"])
    assert [i for i, split in splits.items() if split == "validation"] == [
        "socal-fire_00001226"]
    harvey = [f"hurricane-harvey_{number:08d}" for number in range(20)]
    assert sorted(i for i, s in xview2.assign_splits(harvey).items() if s == "validation") == [
        "hurricane-harvey_00000008", "hurricane-harvey_00000016"]
    # The order the ids come in (archive order, file order) does not matter.
    assert xview2.assign_splits(reversed(fake_archives.XVIEW2_IDS["train"])) == splits


def test_validation_is_ten_percent_of_train_archive():
    # The full train/ archive: 2799 pre-disaster images.
    ids = [f"disaster-{i % 11}_{i:08d}" for i in range(2799)]
    assert collections.Counter(xview2.assign_splits(ids).values()) == {
        "train": 2519, "validation": 280}
    # Rounded half up, never empty on either side.
    assert [xview2.validation_count(n) for n in (2, 3, 14, 15, 25, 2799)] == [
        1, 1, 1, 2, 3, 280]
    with pytest.raises(ValueError, match="cannot fill both"):
        xview2.assign_splits(["hurricane-harvey_00000000"])


# ----------------------------------------------------------------------------------------
# Preparing
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["tar", "folder", "folder_in_archive_folder"])
def test_prepares_archives_or_folders(tmp_path, layout):
    manual = tmp_path / "manual"
    fake = fake_archives.write_xview2(manual, as_tar=layout == "tar", folders=ALL_FOLDERS)
    if layout == "folder_in_archive_folder":  # How archive managers extract.
        for folder in ALL_FOLDERS:
            stem = fake_archives.XVIEW2_ARCHIVES[folder].removesuffix(".tar.gz")
            # tier3.tar.gz extracts to tier3/: that one becomes tier3/tier3/.
            (manual / folder).rename(tmp_path / folder)
            (manual / stem).mkdir()
            (tmp_path / folder).rename(manual / stem / folder)
    data_dir = tmp_path / "data"
    builder = _prepare(manual, data_dir)
    expected = _expected_splits(fake)
    assert set(builder.info.splits) == {"train", "validation", "test", "hold"}
    for split, ids in expected.items():
        examples = _examples(split, data_dir)
        assert sorted(examples) == sorted(ids), split
        for image_id, example in examples.items():
            assert set(example) == {"image", "label", "id", "disaster"}
            assert example["disaster"] == image_id.rsplit("_", 1)[0]
            # The pre-disaster image, and building = pre-disaster target > 0.
            np.testing.assert_array_equal(example["image"], fake.images[image_id])
            np.testing.assert_array_equal(example["label"], fake.labels[image_id])
    # Class counts: train/'s train part plus tier3, for class weighting.
    counts = sum(np.bincount(fake.labels[i].ravel(), minlength=2) for i in expected["train"])
    np.testing.assert_array_equal(train_class_counts("xview2", str(data_dir)), counts)
    # A fresh builder reads which archives went in.
    assert prepare_dataset("xview2", str(data_dir)).info.metadata["archives"] == sorted(
        ALL_FOLDERS)
    # Images are stored as the download's PNG bytes.
    source = builder.as_data_source("test", decoders={"image": tfds.decode.SkipDecoding()})
    stored = {source[i]["id"].decode(): source[i]["image"] for i in range(len(source))}
    image_id = fake.splits["test_archive"][0]
    assert stored[image_id] == _raw_member(fake, "test", f"images/{image_id}_pre_disaster.png")


def test_ids_of_any_digit_count_are_read(tmp_path):
    # The download's numbers have 8 digits; a copy renumbered with 7 or 9 (or 1) digits
    # must not lose its images without a word (torchgeo reads them too).
    ids = {"train": ["hurricane-harvey_0000012", "palu-tsunami_123456789",
                     "socal-fire_00001226", "santa-rosa-wildfire_1"],
           "test": ["mexico-earthquake_0000003"]}
    fake = fake_archives.write_xview2(tmp_path / "manual", as_tar=False, ids=ids)
    _prepare(tmp_path / "manual", tmp_path / "data")
    for split, expected in _expected_splits(fake).items():
        assert sorted(_examples(split, tmp_path / "data")) == sorted(expected), split
    assert sorted(sum(_expected_splits(fake).values(), [])) == sorted(sum(ids.values(), []))


def test_labels_ignore_post_disaster_and_make_every_damage_level_building(tmp_path):
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train", "test"))
    image_id = fake.splits["test_archive"][0]
    pre = np.asarray(Image.open(io.BytesIO(_raw_member(
        fake, "test", f"targets/{image_id}_pre_disaster_target.png"))))
    post = _raw_member(fake, "test", f"images/{image_id}_post_disaster.png")
    # The fake's pre-disaster target holds every value 0..5, its post image other pixels.
    assert set(np.unique(pre)) == {0, 1, 2, 3, 4, 5}
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(post))), fake.images[image_id])
    _prepare(fake.manual_dir, tmp_path / "data")
    example = _examples("test", tmp_path / "data")[image_id]
    np.testing.assert_array_equal(example["label"], (pre > 0).astype(np.uint8))
    np.testing.assert_array_equal(example["image"], fake.images[image_id])
    # The decoding rule itself, value by value.
    raw = np.arange(6, dtype=np.uint8)[None]
    data = io.BytesIO()
    Image.fromarray(raw, mode="L").save(data, "PNG")
    np.testing.assert_array_equal(xview2.decode_target(data.getvalue(), "t.png"),
                                  [[0, 1, 1, 1, 1, 1]])
    meta = get_metadata("xview2")
    assert meta.class_names == ("background", "building") and meta.num_classes == 2


def test_tier3_and_hold_move_no_train_archive_image(tmp_path):
    manual = tmp_path / "manual"
    fake = fake_archives.write_xview2(manual, folders=("train", "test"))
    _prepare(manual, tmp_path / "without")
    fake_archives.write_xview2(manual, folders=("tier3", "hold"))
    _prepare(manual, tmp_path / "with")
    without = {split: set(_examples(split, tmp_path / "without"))
               for split in ("train", "validation")}
    with_tier3 = {split: set(_examples(split, tmp_path / "with"))
                  for split in ("train", "validation")}
    tier3 = set(fake_archives.XVIEW2_IDS["tier3"])
    # The fake is big enough that ranking tier3 together with train/ would move the cut.
    num_train = len(fake.splits["train_archive"])
    assert xview2.validation_count(num_train + len(tier3)) != xview2.validation_count(num_train)
    assert with_tier3["validation"] == without["validation"] != set()
    assert with_tier3["train"] == without["train"] | tier3
    assert without["train"] | without["validation"] == set(fake.splits["train_archive"])
    # Without hold/ there is no hold split.
    with pytest.raises(ValueError, match="no split 'hold'"):
        open_split("xview2", "hold", str(tmp_path / "without"))


def test_prepare_command(tmp_path, capsys):
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train", "test"))
    data_dir = tmp_path / "data"
    prepare_cli.run("xview2", str(data_dir), str(fake.manual_dir))
    out = capsys.readouterr().out
    assert f"is in {data_dir / 'lcseg_xview2' / '1.0.0'}" in out
    assert "train" in out and "9 examples" in out and "validation" in out
    prepare_cli.run("xview2", str(data_dir), str(fake.manual_dir))
    assert "already prepared" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------
# Bad downloads
# ----------------------------------------------------------------------------------------

def test_missing_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
        _prepare(tmp_path / "nowhere", tmp_path / "data")
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train",))
    with pytest.raises(FileNotFoundError, match=r"xView2 download incomplete in .*manual: "
                                                r"missing test_images_labels_targets\.tar\.gz "
                                                r"\(or its folder test/\).*xview2\.org"):
        _prepare(fake.manual_dir, tmp_path / "data")
    # An extracted folder lacking targets/.
    fake_archives.write_xview2(fake.manual_dir, as_tar=False, folders=("test",))
    for path in (fake.manual_dir / "test" / "targets").iterdir():
        path.unlink()
    (fake.manual_dir / "test" / "targets").rmdir()
    with pytest.raises(FileNotFoundError, match=r"test/targets is missing"):
        _prepare(fake.manual_dir, tmp_path / "data")
    assert _files(tmp_path / "data") == []


def _damage(tar_path: Path, how: str) -> None:
    data = bytearray(tar_path.read_bytes())
    if how == "truncated":
        del data[len(data) // 2:]
    elif how == "crc":  # Every byte decompresses; only the gzip trailer's CRC differs.
        data[-8] ^= 0xFF
    elif how == "middle":
        middle = len(data) // 2
        data[middle: middle + 64] = bytes(64)
    else:  # Not a gzip at all.
        data = bytearray(b"<html>Please log in</html>")
    tar_path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "crc", "middle", "html"])
def test_damaged_archive(tmp_path, how):
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train", "test"))
    _damage(fake.source, how)
    with pytest.raises(ValueError, match=rf"{TRAIN_TAR} is not a readable tar\.gz archive .*"
                                         r"incomplete \(truncated\) or corrupt; download it"):
        _prepare(fake.manual_dir, tmp_path / "data")
    assert _files(tmp_path / "data") == []


def _edit_tar(tar_path: Path, edit) -> None:
    members = fake_archives.tar_members(tar_path)
    fake_archives.write_tar_members(tar_path, edit(members))


def _without(members, name: str):
    kept = [(m, d) for m, d in members if m.name != name]
    assert len(kept) == len(members) - 1, name
    return kept


@pytest.mark.parametrize("as_tar", [True, False])
def test_image_without_target_and_target_without_image(tmp_path, as_tar):
    image_id = "palu-tsunami_00000105"
    target = f"train/targets/{image_id}_pre_disaster_target.png"
    image = f"train/images/{image_id}_pre_disaster.png"
    for missing, message in ((target, r"train/targets/?: no target for image\(s\) "
                                      rf"\['{image_id}_pre_disaster\.png'\]"),
                             (image, r"train/images/?: no image for target\(s\) "
                                     rf"\['{image_id}_pre_disaster_target\.png'\]")):
        manual = tmp_path / f"manual-{missing.split('/')[1]}"
        fake = fake_archives.write_xview2(manual, as_tar=as_tar)
        if as_tar:
            _edit_tar(fake.source, lambda members, name=missing: _without(members, name))
        else:
            (manual / missing).unlink()
        with pytest.raises(FileNotFoundError, match=message + r" \(1 in all\).*download it"):
            _prepare(manual, tmp_path / "data")
    assert _files(tmp_path / "data") == []


def _member(name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE,
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info, data


ESCAPES = {
    "dotdot": (_member("train/../../evil.txt", b"x"), r"train/\.\./\.\./evil\.txt points "
                                                      r"outside .*absolute or '\.\.' path"),
    "absolute": (_member("/etc/cron.d/evil", b"x"), r"!/etc/cron\.d/evil points outside"),
    "symlink": (_member("train/images/x_00000001_pre_disaster.png", kind=tarfile.SYMTYPE,
                        link="../../../etc/passwd"), r"link to '\.\./\.\./\.\./etc/passwd'"),
    "hardlink": (_member("train/notes", kind=tarfile.LNKTYPE, link="/etc/shadow"),
                 r"train/notes points outside .*link to '/etc/shadow'"),
    "inner_link": (_member("train/targets/x_00000001_pre_disaster_target.png",
                           kind=tarfile.SYMTYPE, link="../images/a.png"),
                   r"x_00000001_pre_disaster_target\.png is not a regular file"),
}


@pytest.mark.parametrize("kind", sorted(ESCAPES))
def test_member_escaping_the_folder(tmp_path, kind):
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train", "test"))
    member, message = ESCAPES[kind]
    _edit_tar(fake.source, lambda members: [*members, member])
    with pytest.raises(ValueError, match=message):
        _prepare(fake.manual_dir, tmp_path / "data")
    assert _files(tmp_path / "data") == []


def test_folder_link_out_of_the_download(tmp_path):
    fake = fake_archives.write_xview2(tmp_path / "manual", as_tar=False,
                                      folders=("train", "test"))
    outside = tmp_path / "outside.png"
    outside.write_bytes((fake.manual_dir / "train/images/palu-tsunami_00000105_pre_disaster"
                                           ".png").read_bytes())
    link = fake.manual_dir / "train/images/palu-tsunami_00000105_pre_disaster.png"
    link.unlink()
    os.symlink(outside, link)
    with pytest.raises(ValueError, match=r"palu-tsunami_00000105_pre_disaster\.png is not a "
                                         r"file inside .*train \(a link out of it"):
        _prepare(fake.manual_dir, tmp_path / "data")


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8), mode=mode).save(buffer, "PNG")
    return buffer.getvalue()


BAD_FILES = {
    "target_size": ("targets", _png(np.ones((32, 64))),
                    r"socal-fire_00001226_pre_disaster_target\.png is 64x32 px but its image "
                    r"is 64x64"),
    "target_rgb": ("targets", _png(np.ones((64, 64, 3))),
                   r"_target\.png: target has mode 'RGB'; xView2 targets are single-channel"),
    "target_value": ("targets", _png(np.full((64, 64), 9)),
                     r"_target\.png: target value\(s\) \[9\] out of range"),
    "image_grey": ("images", _png(np.ones((64, 64)), "L"),
                   r"socal-fire_00001226_pre_disaster\.png: image is a PNG of mode 'L'"),
    "image_truncated": ("images", _png(np.ones((64, 64, 3)))[:40],
                        r"socal-fire_00001226_pre_disaster\.png is not a readable image"),
}


@pytest.mark.parametrize("bad", sorted(BAD_FILES))
def test_bad_file_fails_cleanly_and_rerun_works(tmp_path, bad):
    # socal-fire_00001226 is the validation image: the train split was written before it.
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train", "test"))
    kind, data, message = BAD_FILES[bad]
    suffix = "_target" if kind == "targets" else ""
    name = f"train/{kind}/socal-fire_00001226_pre_disaster{suffix}.png"
    good = {}

    def replace(members, new):
        good.update({m.name: d for m, d in members if m.name == name})
        return [(m, new if m.name == name else d) for m, d in members]

    _edit_tar(fake.source, lambda members: replace(members, data))
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError, match=rf"{TRAIN_TAR}!.*{message}"):
        _prepare(fake.manual_dir, data_dir)
    # The failure happened while writing examples: nothing of them may remain.
    assert _files(data_dir) == []
    _edit_tar(fake.source, lambda members: replace(members, good[name]))
    assert _prepare(fake.manual_dir, data_dir).is_prepared()


def test_not_the_right_archives(tmp_path):
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train", "test"))
    test_tar = fake.manual_dir / fake_archives.XVIEW2_ARCHIVES["test"]
    # The archives swapped under each other's names.
    train_bytes = fake.source.read_bytes()
    fake.source.write_bytes(test_tar.read_bytes())
    test_tar.write_bytes(train_bytes)
    with pytest.raises(ValueError, match=rf"{TRAIN_TAR} holds test/images/, not "
                                         r"train/images/.*swapped"):
        _prepare(fake.manual_dir, tmp_path / "data")
    # Some other tar.gz under the right name.
    with tarfile.open(fake.source, "w:gz") as archive:
        info = tarfile.TarInfo("photos/cat.png")
        info.size = 3
        archive.addfile(info, io.BytesIO(b"cat"))
    with pytest.raises(ValueError, match=rf"{TRAIN_TAR} holds no images/<disaster>_<number>_"
                                         r"pre_disaster\.png: it is not the xView2 train/"):
        _prepare(fake.manual_dir, tmp_path / "data")
    assert _files(tmp_path / "data") == []


def test_too_few_images_and_ids_in_two_archives(tmp_path):
    ids = {**fake_archives.XVIEW2_IDS, "train": ["hurricane-harvey_00000000"]}
    fake = fake_archives.write_xview2(tmp_path / "few", folders=("train", "test"), ids=ids)
    with pytest.raises(ValueError, match=rf"{TRAIN_TAR} holds 1 pre-disaster image\(s\); "
                                         r"lcseg needs at least 2"):
        _prepare(fake.manual_dir, tmp_path / "data")
    ids = {**fake_archives.XVIEW2_IDS,
           "tier3": ["joplin-tornado_00000000", "hurricane-harvey_00000012"]}
    fake = fake_archives.write_xview2(tmp_path / "twice", folders=ALL_FOLDERS, ids=ids)
    with pytest.raises(ValueError, match=r"tier3\.tar\.gz and .*both hold image\(s\) "
                                         r"\['hurricane-harvey_00000012'\]"):
        _prepare(fake.manual_dir, tmp_path / "data")
    assert _files(tmp_path / "data") == []


def test_gzip_reader_checks_the_trailer_directly(tmp_path):
    # The tar's end marker comes before the gzip trailer: a reader stopping there would
    # never see a damaged CRC. Guarded here without TFDS.
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train",))
    with gzip.open(fake.source) as stream:
        assert stream.read()  # Intact.
    _damage(fake.source, "crc")
    with pytest.raises(ValueError, match="not a readable tar.gz"):
        xview2.list_tar("train", fake.source)


def test_member_names_starting_with_dot_slash(tmp_path):
    # Some tar writers store './train/images/...': the same files.
    fake = fake_archives.write_xview2(tmp_path / "manual", folders=("train", "test"))

    def dot_slash(members):
        for member, _ in members:
            member.name = "./" + member.name
        return members

    _edit_tar(fake.source, dot_slash)
    builder = _prepare(fake.manual_dir, tmp_path / "data")
    assert builder.info.splits["train"].num_examples + builder.info.splits[
        "validation"].num_examples == len(fake.splits["train_archive"])
