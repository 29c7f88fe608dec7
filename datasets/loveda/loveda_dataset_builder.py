"""LoveDA (NeurIPS 2021) as the TFDS dataset ``lcseg_loveda``.

Reads ``Train.zip``, ``Val.zip`` and ``Test.zip`` from Zenodo as they are (members read
one at a time, nothing extracted), or their extracted folders ``Train/``, ``Val/``,
``Test/``, from ``manual_dir``. See ``datasets/loveda/README.md``.

* Labels: raw mask value ``v`` becomes ``v - 1``; raw 0 (no-data) becomes the ignore
  label 255, as the official code does. Test masks are hidden: test labels are all 255.
* Splits: ``train``, ``validation``, ``test`` (both domains), and the same per domain
  (``train_urban``, ``train_rural``, ...) for the domain-adaptation protocol.
* Ids are ``<domain>/<n>`` (e.g. ``urban/3514``): unique even where Urban and Rural
  hold the same file name; ``<n>.png`` is the original (and the test server's) file name.
* Images are stored as their original PNG bytes when they are 8-bit RGB PNGs (decoded
  once to check them): the same pixels, no re-encoding time.
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lcseg.data.metadata import IGNORE_LABEL, get_metadata
from lcseg.data.tfds_builder import LandCoverBuilder

# lcseg split -> the Zenodo archive (and its top folder) it comes from.
SOURCES = {"train": "Train", "validation": "Val", "test": "Test"}
DOMAINS = {"urban": "Urban", "rural": "Rural"}
LABELLED = ("train", "validation")
MAX_RAW_VALUE = 7  # 0 no-data, 1..7 classes.

MANUAL_INSTRUCTIONS = """\
Download Train.zip, Val.zip and Test.zip of LoveDA from Zenodo record 5706578
(https://zenodo.org/records/5706578) and put them, or the folders Train/, Val/, Test/ they
extract to, into manual_dir. See datasets/loveda/README.md.
"""

# raw mask value -> label: v -> v - 1, 0 (no-data) -> ignore.
_LABEL_TABLE = np.full(256, IGNORE_LABEL, np.uint8)
_LABEL_TABLE[1: MAX_RAW_VALUE + 1] = np.arange(MAX_RAW_VALUE)


class _Archive:
    """The files of a download: a zip as downloaded, or the folder it was extracted to.

    Names are '/'-separated paths relative to the zip root or the folder. Zip members are
    read one at a time, so nothing is extracted to disk and memory holds one file.
    """

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as error:
                raise ValueError(
                    f"{path} is not a readable zip archive ({error}): the download is "
                    "probably incomplete or corrupt; download it again.") from error

    def names(self) -> list[str]:
        """All file names (no folders; macOS resource forks skipped)."""
        if self._zip is not None:
            names = [n for n in self._zip.namelist() if not n.endswith("/")]
        else:
            names = [p.relative_to(self.path).as_posix()
                     for p in self.path.rglob("*") if p.is_file()]
        return [n for n in names if not n.startswith("__MACOSX/")]

    def where(self, name: str) -> str:
        """How errors name a file: ``archive.zip!member`` or the file's path."""
        return f"{self.path}!{name}" if self._zip is not None else str(self.path / name)

    def read(self, name: str) -> bytes:
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except KeyError:
            raise FileNotFoundError(f"{self.where(name)} does not exist.") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise ValueError(f"{self.where(name)} cannot be read ({error}): the archive is "
                             "corrupt; download it again.") from error

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def manual_dir_of(dl_manager: tfds.download.DownloadManager) -> Path:
    """``dl_manager.manual_dir``, failing with a FileNotFoundError that says what to put there."""
    try:
        return Path(dl_manager.manual_dir)
    except AssertionError as error:  # TFDS signals a missing/empty manual_dir this way.
        raise FileNotFoundError(str(error)) from None


def _find_sources(manual_dir: Path) -> dict[str, Path]:
    """Returns, per lcseg split, the zip or extracted folder holding it."""
    found, missing = {}, []
    for split, archive_name in SOURCES.items():
        candidates = [manual_dir / f"{archive_name}.zip", manual_dir / archive_name]
        found_path = next((path for path in candidates if path.exists()), None)
        if found_path is None:
            missing.append(f"{archive_name}.zip (or its folder {archive_name}/)")
        else:
            found[split] = found_path
    if missing:
        present = sorted(p.name for p in manual_dir.iterdir())[:20]
        raise FileNotFoundError(
            f"LoveDA download incomplete in {manual_dir}: missing {', '.join(missing)}; it "
            f"holds {present}. " + MANUAL_INSTRUCTIONS)
    return found


# <anything>/<Urban|Rural>/<images_png|masks_png>/<name>.png
_MEMBER = re.compile(r"^(?P<root>(?:[^/]+/)*?)(?P<domain>Urban|Rural)/"
                     r"(?P<kind>images_png|masks_png)/(?P<stem>[^/]+)\.png$")


def list_items(archive: _Archive, *, labelled: bool) -> tuple[str, dict[str, list[str]]]:
    """Lists, per domain, the file names (without .png) of images, checking their masks.

    Args:
      archive: one of Train/Val/Test, zip or folder.
      labelled: whether every image must have a mask of the same name.

    Returns:
      The root inside the archive (e.g. ``'Train/'``) and ``{'urban': [...], 'rural':
      [...]}``, names in numeric order.
    """
    files: dict[tuple[str, str, str], set[str]] = {}
    for name in archive.names():
        if match := _MEMBER.match(name):
            key = (match["root"], match["domain"], match["kind"])
            files.setdefault(key, set()).add(match["stem"])
    roots = sorted({root for root, _, _ in files}, key=len)
    if not roots:
        raise ValueError(f"{archive.path} holds no Urban/images_png or Rural/images_png: it is "
                         "not a LoveDA archive. " + MANUAL_INSTRUCTIONS)
    root = roots[0]
    items = {}
    for domain, folder in DOMAINS.items():
        images = files.get((root, folder, "images_png"), set())
        if not images:
            raise ValueError(f"{archive.where(root + folder + '/images_png/')} is missing or "
                             "empty: the download is incomplete; download it again.")
        if labelled:
            masks = files.get((root, folder, "masks_png"), set())
            if unmatched := sorted(images - masks)[:5]:
                raise FileNotFoundError(
                    f"{archive.where(root + folder + '/masks_png/')}: no mask for image(s) "
                    f"{[n + '.png' for n in unmatched]}; the download is incomplete.")
            if unmatched := sorted(masks - images)[:5]:
                raise FileNotFoundError(
                    f"{archive.where(root + folder + '/images_png/')}: no image for mask(s) "
                    f"{[n + '.png' for n in unmatched]}; the download is incomplete.")
        # The names are integers: order them as numbers, not strings.
        items[domain] = sorted(images, key=lambda n: (int(n) if n.isdigit() else -1, n))
    return root, items


def _read_image(data: bytes, where: str) -> tuple[bytes | np.ndarray, tuple[int, int]]:
    """Checks an image; returns (what to store, (height, width)).

    An 8-bit RGB PNG is returned as its own bytes; anything else is decoded to an RGB
    array, which the base class encodes as PNG.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Decode fully: a truncated file fails here, not in training.
            size = (image.height, image.width)
            if image.format == "PNG" and image.mode == "RGB":
                return data, size
            return np.asarray(image.convert("RGB")), size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where} is not a readable image ({error}): download the dataset "
                         "again.") from error


def decode_mask(data: bytes, where: str) -> np.ndarray:
    """Reads a raw LoveDA mask PNG and returns HxW labels (v - 1; 0 -> 255).

    Raises:
      ValueError: if the file is no single-channel image or holds values above 7.
    """
    try:
        with Image.open(io.BytesIO(data)) as mask:
            if mask.mode not in ("L", "P"):
                raise ValueError(f"{where}: mask has mode {mask.mode!r}; LoveDA masks are "
                                 "single-channel 8-bit images of values 0..7.")
            raw = np.asarray(mask)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where} is not a readable image ({error}): download the dataset "
                         "again.") from error
    if raw.max(initial=0) > MAX_RAW_VALUE:
        bad = np.unique(raw[raw > MAX_RAW_VALUE])[:5].tolist()
        raise ValueError(f"{where}: mask value(s) {bad} out of range: LoveDA masks hold 0 "
                         "(no-data) and 1..7 (classes). The file is corrupt or not a LoveDA "
                         "mask; download the dataset again.")
    return _LABEL_TABLE[raw]


class Builder(LandCoverBuilder):
    """LoveDA (7 classes, urban and rural domains; no-data ignored), from Zenodo's zips."""

    name = "lcseg_loveda"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: official splits, per-domain splits, ids "
                              "'<domain>/<n>', original PNG bytes."}
    METADATA = get_metadata("loveda")
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    EXTRA_FEATURES = {"domain": tfds.features.Text()}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        sources = _find_sources(manual_dir_of(dl_manager))
        # List (and check) every archive before anything is written.
        listings = {}
        for split, path in sources.items():
            archive = _Archive(path)
            try:
                listings[split] = list_items(archive, labelled=split in LABELLED)
            finally:
                archive.close()
        generators = {}
        for split, (root, items) in listings.items():
            generators[split] = self._generate_examples(
                sources[split], split, root, items, tuple(DOMAINS))
            for domain in DOMAINS:
                generators[f"{split}_{domain}"] = self._generate_examples(
                    sources[split], split, root, items, (domain,))
        return {split: self._encoded(split, examples) for split, examples in generators.items()}

    def _generate_examples(self, source: Path, split: str, root: str,
                           items: dict[str, list[str]], domains: tuple[str, ...]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        archive = _Archive(source)
        try:
            for domain in domains:
                folder = f"{root}{DOMAINS[domain]}"
                for stem in items[domain]:
                    image_name = f"{folder}/images_png/{stem}.png"
                    image, (height, width) = _read_image(
                        archive.read(image_name), archive.where(image_name))
                    if split in LABELLED:
                        mask_name = f"{folder}/masks_png/{stem}.png"
                        label = decode_mask(archive.read(mask_name), archive.where(mask_name))
                        if label.shape != (height, width):
                            raise ValueError(
                                f"{archive.where(mask_name)} is {label.shape[1]}x"
                                f"{label.shape[0]} px but its image is {width}x{height}: the "
                                "download is damaged; download it again.")
                    else:  # Test labels are hidden.
                        label = np.full((height, width), IGNORE_LABEL, np.uint8)
                    example_id = f"{domain}/{stem}"
                    yield example_id, {"image": image, "label": label, "id": example_id,
                                       "domain": domain}
        finally:
            archive.close()
