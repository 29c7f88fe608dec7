"""Small fake downloads of DeepGlobe, LoveDA, LandCover.ai and xView2, in their real layouts.

Each ``write_*`` function writes, into a ``manual_dir``, the archive(s) exactly as users
download them (file names, folders, formats; see datasets/<name>/README.md), only with
tiny images, or the folder they extract to. It returns a ``FakeDataset`` saying what a
correct builder must produce: the ids of each split and each example's decoded image
and label. Tests of the builders use them; so can an end-to-end training test:

    from tests import fake_archives

    fake = fake_archives.write_loveda(tmp_path / "manual")
    lcseg.data.prepare_dataset("loveda", str(tmp_path / "data"), str(fake.manual_dir))
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from lcseg.data.metadata import IGNORE_LABEL


@dataclasses.dataclass
class FakeDataset:
    """A fake download and what preparing it must give.

    Attributes:
      manual_dir: the folder to pass as ``manual_dir``.
      source: the zip written (or, for LoveDA, the Train zip), or the extracted folder.
      splits: for each split ``open_split`` serves (stored splits and split aliases),
        the expected ids (in any order).
      images: expected decoded image (HxWx3 uint8) per id.
      labels: expected label (HxW uint8, 255 ignored) per id.
    """

    manual_dir: Path
    source: Path
    splits: dict[str, list[str]]
    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def zip_folder(folder: Path, zip_path: Path, *, top_folder: bool = False) -> Path:
    """Zips ``folder`` (deflated, as the real archives) and deletes it; returns ``zip_path``.

    Args:
      folder: what to zip.
      zip_path: the zip to write.
      top_folder: whether members start with the folder's own name (LoveDA's do).
    """
    base = folder.parent if top_folder else folder
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(base).as_posix())
    shutil.rmtree(folder)
    return zip_path


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like RGB image: smooth colour gradients plus noise."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([yy * 200 // max(height, 1), xx * 200 // max(width, 1),
                     (yy + xx) * 100 // max(height + width, 1)], axis=-1)
    return np.clip(base + rng.integers(0, 50, (height, width, 3)), 0, 255).astype(np.uint8)


def _blocks(rng: np.random.Generator, height: int, width: int, values, block: int = 8
            ) -> np.ndarray:
    """An HxW map of ``block``-pixel squares, each one of ``values``."""
    grid = rng.choice(np.asarray(values), (-(-height // block), -(-width // block)))
    return np.repeat(np.repeat(grid, block, 0), block, 1)[:height, :width]


# ----------------------------------------------------------------------------------------
# DeepGlobe
# ----------------------------------------------------------------------------------------

DEEPGLOBE_CLASS_DICT = [
    ("urban_land", (0, 255, 255)), ("agriculture_land", (255, 255, 0)),
    ("rangeland", (255, 0, 255)), ("forest_land", (0, 255, 0)), ("water", (0, 0, 255)),
    ("barren_land", (255, 255, 255)), ("unknown", (0, 0, 0)),
]
# Ids as in the real download: integers of varying length. Their hash-split covers
# train, validation and test (checked by the tests).
DEEPGLOBE_LABELLED_IDS = ["100694", "6399", "119", "21717", "207743", "3234", "55", "91",
                          "104113", "10452", "12", "998002"]
DEEPGLOBE_VALID_IDS = ["171", "8842"]
DEEPGLOBE_TEST_IDS = ["2001", "77"]
_RED = 7  # Code in the fake class maps for pure red (no class).


def write_deepglobe(manual_dir: Path, *, as_zip: bool = True, zip_name: str = "archive.zip",
                    size: int = 64, seed: int = 0,
                    labelled_ids: Sequence[str] | None = None) -> FakeDataset:
    """Writes a fake Kaggle DeepGlobe download: zip (members at its root) or extracted folder.

    Masks are colour-coded RGB PNGs whose colours are perturbed by up to 40 per channel
    (as JPEG-damaged masks are), with some unknown (black) and pure red pixels.

    Args:
      manual_dir: where to write.
      as_zip: write the zip (True) or the folder it extracts to.
      zip_name: the zip's name.
      size: image side in pixels.
      seed: of the random images and masks.
      labelled_ids: the ``train/`` (labelled) image ids, e.g. a part of a download;
        None for ``DEEPGLOBE_LABELLED_IDS``. Must not repeat the valid/test ids.

    Returns:
      The fake; ``splits`` holds ``'labelled'`` (the 803-like train/ ids) and
      ``'unlabelled'`` (valid/ + test/); the builder's train/validation/test division of
      the labelled ids is for the test to check.
    """
    rng = np.random.default_rng(seed)
    manual_dir.mkdir(parents=True, exist_ok=True)
    folder = manual_dir / "deepglobe-land-cover-classification-dataset"
    for sub in ("train", "valid", "test"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    with open(folder / "class_dict.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "r", "g", "b"])
        writer.writerows([name, *colour] for name, colour in DEEPGLOBE_CLASS_DICT)

    colours = np.array([colour for _, colour in DEEPGLOBE_CLASS_DICT] + [(255, 0, 0)],
                       np.int16)
    labelled_ids = list(DEEPGLOBE_LABELLED_IDS if labelled_ids is None else labelled_ids)
    images, labels, rows = {}, {}, []
    for image_id in labelled_ids + DEEPGLOBE_VALID_IDS + DEEPGLOBE_TEST_IDS:
        sub = ("train" if image_id in labelled_ids
               else "valid" if image_id in DEEPGLOBE_VALID_IDS else "test")
        buffer = io.BytesIO()
        Image.fromarray(_texture(rng, size, size)).save(buffer, "JPEG", quality=95)
        (folder / sub / f"{image_id}_sat.jpg").write_bytes(buffer.getvalue())
        images[image_id] = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        mask_path = ""
        if sub == "train":
            # Class indices 0..5, 6 unknown, 7 pure red.
            classes = _blocks(rng, size, size, range(8))
            colour = colours[classes]
            noise = rng.integers(0, 41, colour.shape)
            noisy = np.where(colour >= 128, colour - noise, colour + noise).astype(np.uint8)
            Image.fromarray(noisy).save(folder / sub / f"{image_id}_mask.png")
            labels[image_id] = np.where(classes < 6, classes, IGNORE_LABEL).astype(np.uint8)
            mask_path = f"train/{image_id}_mask.png"
        else:
            labels[image_id] = np.full((size, size), IGNORE_LABEL, np.uint8)
        rows.append([image_id, sub, f"{sub}/{image_id}_sat.jpg", mask_path])
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_id", "split", "sat_image_path", "mask_path"])
        writer.writerows(rows)

    source = zip_folder(folder, manual_dir / zip_name) if as_zip else folder
    return FakeDataset(manual_dir, source,
                       {"labelled": labelled_ids,
                        "unlabelled": DEEPGLOBE_VALID_IDS + DEEPGLOBE_TEST_IDS},
                       images, labels)


# ----------------------------------------------------------------------------------------
# LoveDA
# ----------------------------------------------------------------------------------------

# Zenodo archive -> domain folder -> file numbers. The same numbers exist in Urban and
# Rural, so ids must carry the domain.
LOVEDA_FILES = {
    "Train": {"Urban": [1, 2], "Rural": [1, 3]},
    "Val": {"Urban": [4], "Rural": [4, 5]},
    "Test": {"Urban": [6], "Rural": [6]},
}
_LOVEDA_SPLITS = {"Train": "train", "Val": "validation", "Test": "test"}


def write_loveda(manual_dir: Path, *, as_zip: bool = True, size: int = 32, seed: int = 0
                 ) -> FakeDataset:
    """Writes fake LoveDA ``Train.zip``, ``Val.zip``, ``Test.zip`` (or extracted folders).

    Masks are single-channel PNGs of raw values 0 (no-data) .. 7; Test has no masks.

    Returns:
      The fake, with ids ``<domain>/<n>`` and all nine splits: the six per-domain ones
      the builder stores (train_urban, ...) and the unions train, validation, test.
    """
    rng = np.random.default_rng(seed)
    manual_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    images, labels = {}, {}
    for archive_name, domains in LOVEDA_FILES.items():
        split = _LOVEDA_SPLITS[archive_name]
        splits[split] = []
        for folder_name, numbers in domains.items():
            domain = folder_name.lower()
            splits[f"{split}_{domain}"] = []
            folder = manual_dir / archive_name / folder_name
            (folder / "images_png").mkdir(parents=True, exist_ok=True)
            if archive_name != "Test":
                (folder / "masks_png").mkdir(parents=True, exist_ok=True)
            for number in numbers:
                example_id = f"{domain}/{number}"
                image = _texture(rng, size, size)
                Image.fromarray(image).save(folder / "images_png" / f"{number}.png")
                images[example_id] = image
                if archive_name == "Test":
                    labels[example_id] = np.full((size, size), IGNORE_LABEL, np.uint8)
                else:
                    raw = _blocks(rng, size, size, range(8), block=4).astype(np.uint8)
                    Image.fromarray(raw, mode="L").save(folder / "masks_png" / f"{number}.png")
                    labels[example_id] = np.where(raw == 0, IGNORE_LABEL, raw - 1).astype(np.uint8)
                splits[split].append(example_id)
                splits[f"{split}_{domain}"].append(example_id)
        if as_zip:
            zip_folder(manual_dir / archive_name, manual_dir / f"{archive_name}.zip",
                       top_folder=True)
    source = manual_dir / ("Train.zip" if as_zip else "Train")
    return FakeDataset(manual_dir, source, splits, images, labels)


def write_loveda_mask(path_or_zip: Path, member: str, raw: np.ndarray) -> None:
    """Replaces one LoveDA mask (``member`` like ``Train/Urban/masks_png/1.png``) by ``raw``."""
    buffer = io.BytesIO()
    Image.fromarray(raw.astype(np.uint8), mode="L").save(buffer, "PNG")
    if path_or_zip.suffix != ".zip":
        (path_or_zip.parent / member).write_bytes(buffer.getvalue())
        return
    replace_zip_member(path_or_zip, member, buffer.getvalue())


def replace_zip_member(zip_path: Path, member: str, data: bytes | None) -> None:
    """Rewrites ``zip_path`` with ``member`` replaced by ``data`` (removed if None)."""
    with zipfile.ZipFile(zip_path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    if data is None:
        del contents[member]
    else:
        contents[member] = data
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in contents.items():
            archive.writestr(name, content)


# ----------------------------------------------------------------------------------------
# LandCover.ai
# ----------------------------------------------------------------------------------------

# Sheet -> (height, width). Not multiples of 512, so split.py's numbering has gaps:
# M-33 has windows k = 0..8 (3x3) of which 0, 1, 3, 4 are whole; N-34 has k = 0..5
# (2x3) of which 0, 1 are whole.
LANDCOVERAI_SHEETS = {"M-33-20-D-c-4-2": (1100, 1300), "N-34-140-A-b-3-2": (600, 1100)}
LANDCOVERAI_LISTS = {
    "train": ["M-33-20-D-c-4-2_0", "M-33-20-D-c-4-2_4", "N-34-140-A-b-3-2_1"],
    "validation": ["M-33-20-D-c-4-2_1"],
    "test": ["M-33-20-D-c-4-2_3"],
}  # N-34-140-A-b-3-2_0 is whole but in no list: the builder must skip it.
_LIST_FILES = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}


def write_geotiff(path: Path, array: np.ndarray, *, compress: str | None = "deflate") -> None:
    """Writes an HxW or HxWx3 uint8 array as a GeoTIFF in EPSG:2180 (25 cm pixels)."""
    import rasterio  # Imported here: only LandCover.ai needs it.

    bands = array[None] if array.ndim == 2 else np.transpose(array, (2, 0, 1))
    profile = {"driver": "GTiff", "height": bands.shape[1], "width": bands.shape[2],
               "count": bands.shape[0], "dtype": "uint8", "crs": "EPSG:2180",
               # 25 cm pixels from a corner in Poland.
               "transform": rasterio.Affine(0.25, 0.0, 500000.0, 0.0, -0.25, 300000.0)}
    if compress:
        profile["compress"] = compress
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(bands)


def write_landcoverai(manual_dir: Path, *, as_zip: bool = True, seed: int = 0) -> FakeDataset:
    """Writes a fake ``landcover.ai.v1.zip`` (members at its root) or its extracted folder.

    Returns:
      The fake; expected tiles are the 512x512 windows of the written rasters.
    """
    rng = np.random.default_rng(seed)
    manual_dir.mkdir(parents=True, exist_ok=True)
    folder = manual_dir / "landcover.ai.v1"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    images, labels = {}, {}
    for sheet, (height, width) in LANDCOVERAI_SHEETS.items():
        image = _texture(rng, height, width)
        mask = _blocks(rng, height, width, range(5), block=32).astype(np.uint8)
        write_geotiff(folder / "images" / f"{sheet}.tif", image)
        write_geotiff(folder / "masks" / f"{sheet}.tif", mask, compress="lzw")
        columns = -(-width // 512)
        for tile_ids in LANDCOVERAI_LISTS.values():
            for tile_id in tile_ids:
                if tile_id.startswith(sheet + "_"):
                    row, column = divmod(int(tile_id.rsplit("_", 1)[1]), columns)
                    window = np.s_[row * 512:(row + 1) * 512, column * 512:(column + 1) * 512]
                    images[tile_id], labels[tile_id] = image[window], mask[window]
    for split, tile_ids in LANDCOVERAI_LISTS.items():
        # Trailing spaces, CRLF and blank lines: the lists must be read leniently.
        (folder / _LIST_FILES[split]).write_bytes(
            "".join(f"{tile_id} \r\n\r\n" for tile_id in tile_ids).encode())
    # A script that must never run (builders cut tiles themselves).
    (folder / "split.py").write_text("raise SystemExit('split.py must never be executed')\n")
    source = zip_folder(folder, manual_dir / "landcover.ai.v1.zip") if as_zip else folder
    return FakeDataset(manual_dir, source, {k: list(v) for k, v in LANDCOVERAI_LISTS.items()},
                       images, labels)


# ----------------------------------------------------------------------------------------
# xView2
# ----------------------------------------------------------------------------------------

# Top folder -> archive name, as downloaded from xview2.org.
XVIEW2_ARCHIVES = {
    "train": "train_images_labels_targets.tar.gz",
    "test": "test_images_labels_targets.tar.gz",
    "tier3": "tier3.tar.gz",
    "hold": "hold_images_labels_targets.tar.gz",
}
# Top folder -> image ids <disaster>_<8-digit number>, as in the real file names. The
# same number under two disasters, so ids must carry the disaster.
XVIEW2_IDS = {
    "train": ["hurricane-harvey_00000000", "hurricane-harvey_00000012",
              "santa-rosa-wildfire_00000089", "palu-tsunami_00000105",
              "mexico-earthquake_00000003", "socal-fire_00001226", "hurricane-florence_00000410",
              "guatemala-volcano_00000017", "midwest-flooding_00000012",
              "hurricane-michael_00000500"],
    "test": ["hurricane-harvey_00000004", "palu-tsunami_00000001"],
    # More than train/ holds, as in the real download (6369 vs 2799): ranking tier3 with
    # train/ would move the validation cut, which the tests must be able to see.
    "tier3": ["joplin-tornado_00000000", "lower-puna-volcano_00000037", "moore-tornado_00000074",
              "nepal-flooding_00000111", "pinery-bushfire_00000148",
              "portugal-wildfire_00000185", "sunda-tsunami_00000222"],
    "hold": ["santa-rosa-wildfire_00000300", "socal-fire_00000002"],
}


def tar_members(tar_path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The members of a tar.gz in order, with their bytes (None for folders and links)."""
    with tarfile.open(tar_path, "r:gz") as archive:
        return [(member, archive.extractfile(member).read() if member.isfile() else None)
                for member in archive.getmembers()]


def write_tar_members(tar_path: Path, members: Sequence[tuple[tarfile.TarInfo, bytes | None]]
                      ) -> Path:
    """Writes ``members`` (as ``tar_members`` gives them) into a new tar.gz; returns it."""
    with tarfile.open(tar_path, "w:gz") as archive:
        for member, data in members:
            if data is not None:
                member.size = len(data)
            archive.addfile(member, io.BytesIO(data) if data is not None else None)
    return tar_path


def tar_folder(folder: Path, tar_path: Path, *, seed: int = 0) -> Path:
    """Tars and gzips ``folder`` (members start with its name) and deletes it.

    Folders come first, files in a shuffled order (images and targets interleaved, as a
    builder must not rely on an order the real archives do not promise).
    """
    paths = sorted(folder.rglob("*"))
    files = [path for path in paths if path.is_file()]
    order = np.random.default_rng(seed).permutation(len(files))
    with tarfile.open(tar_path, "w:gz") as archive:
        archive.add(folder, folder.name, recursive=False)
        for path in [p for p in paths if p.is_dir()] + [files[i] for i in order]:
            archive.add(path, path.relative_to(folder.parent).as_posix(), recursive=False)
    shutil.rmtree(folder)
    return tar_path


def _png(array: np.ndarray, path: Path) -> None:
    # Not Pillow's default compression, so that bytes re-encoded by a builder differ.
    Image.fromarray(array).save(path, "PNG", compress_level=1)


def write_xview2(manual_dir: Path, *, as_tar: bool = True, size: int = 64, seed: int = 0,
                 folders: Sequence[str] = ("train", "test"),
                 ids: dict[str, Sequence[str]] | None = None) -> FakeDataset:
    """Writes fake xView2 archives (``<name>.tar.gz`` with top folder ``<folder>/``) or folders.

    Each folder holds ``images/<id>_{pre,post}_disaster.png`` (RGB), ``targets/<id>_{pre,
    post}_disaster_target.png`` (single-channel) and ``labels/<id>_{pre,post}_disaster.json``.
    Pre-disaster targets hold every value 0..5 (a builder must make all of 1..5 building);
    post-disaster images and targets differ from the pre-disaster ones (a builder reading
    them would fail the comparison).

    Args:
      manual_dir: where to write.
      as_tar: write the tar.gz archives (True) or the folders they extract to.
      size: image side in pixels.
      seed: of the random images and targets (and of the member order in the tars).
      folders: which of train, test, tier3, hold to write.
      ids: folder -> image ids; None for ``XVIEW2_IDS``.

    Returns:
      The fake; ``splits`` holds, per folder written, its pre-disaster ids under
      ``'<folder>_archive'`` (the builder divides train/ into train and validation).
    """
    rng = np.random.default_rng(seed)
    manual_dir.mkdir(parents=True, exist_ok=True)
    ids = XVIEW2_IDS if ids is None else ids
    splits, images, labels = {}, {}, {}
    for folder_name in folders:
        folder = manual_dir / folder_name
        for sub in ("images", "targets", "labels"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for image_id in ids[folder_name]:
            for phase in ("pre", "post"):
                stem = f"{image_id}_{phase}_disaster"
                image = _texture(rng, size, size)
                raw = _blocks(rng, size, size, [0, 0, 0, 1, 2, 3, 4, 5], block=8)
                _png(image, folder / "images" / f"{stem}.png")
                _png(raw.astype(np.uint8), folder / "targets" / f"{stem}_target.png")
                (folder / "labels" / f"{stem}.json").write_text(json.dumps(
                    {"features": {"xy": []}, "metadata": {"img_name": f"{stem}.png"}}))
                if phase == "pre":
                    images[image_id] = image
                    labels[image_id] = (raw > 0).astype(np.uint8)
        splits[f"{folder_name}_archive"] = list(ids[folder_name])
        if as_tar:
            tar_folder(folder, manual_dir / XVIEW2_ARCHIVES[folder_name], seed=seed)
    source = manual_dir / (XVIEW2_ARCHIVES["train"] if as_tar else "train")
    return FakeDataset(manual_dir, source, splits, images, labels)
