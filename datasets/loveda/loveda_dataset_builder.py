"""LoveDA (NeurIPS 2021) as the TFDS dataset ``lcseg_loveda``.

Reads ``Train.zip``, ``Val.zip`` and ``Test.zip`` from Zenodo as they are (members read
one at a time, nothing extracted), or their extracted folders ``Train/``, ``Val/``,
``Test/``, from ``manual_dir``. See ``datasets/loveda/README.md``.

* Labels: raw mask value ``v`` becomes ``v - 1``; raw 0 (no-data) becomes the ignore
  label 255, as the official code does. Test masks are hidden: test labels are all 255.
* Splits: six are stored, one per archive and domain (``train_urban``, ``train_rural``,
  ``validation_urban``, ...), each example once; ``train``, ``validation`` and ``test``
  (both domains) are their unions (``SPLIT_ALIASES``, read through TFDS split
  expressions such as ``train_urban+train_rural``). Class counts sum both train domains.
* Ids are ``<domain>/<n>`` (e.g. ``urban/3514``): unique even where Urban and Rural
  hold the same file name; ``<n>.png`` is the original (and the test server's) file name.
* Images are stored as their original PNG bytes when they are 8-bit RGB PNGs (decoded
  once to check them): the same pixels, no re-encoding time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lcseg.data.archives import Archive, manual_dir_of, numeric_order, open_image, read_image
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


def list_items(archive: Archive, *, labelled: bool) -> tuple[str, dict[str, list[str]]]:
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
            for lack, have, unmatched in (("mask", "image", images - masks),
                                          ("image", "mask", masks - images)):
                if unmatched:
                    raise FileNotFoundError(
                        f"{archive.where(f'{root}{folder}/{lack}s_png/')}: no {lack} for "
                        f"{have}(s) {[n + '.png' for n in sorted(unmatched)[:5]]}; the "
                        "download is incomplete.")
        # The names are integers: order them as numbers, not strings.
        items[domain] = sorted(images, key=numeric_order)
    return root, items


def decode_mask(data: bytes, where: str) -> np.ndarray:
    """Reads a raw LoveDA mask PNG and returns HxW labels (v - 1; 0 -> 255).

    Raises:
      ValueError: if the file is no single-channel image or holds values above 7.
    """
    with open_image(data, where) as mask:
        if mask.mode not in ("L", "P"):
            raise ValueError(f"{where}: mask has mode {mask.mode!r}; LoveDA masks are "
                             "single-channel 8-bit images of values 0..7.")
        raw = np.asarray(mask)
    if raw.max(initial=0) > MAX_RAW_VALUE:
        bad = np.unique(raw[raw > MAX_RAW_VALUE])[:5].tolist()
        raise ValueError(f"{where}: mask value(s) {bad} out of range: LoveDA masks hold 0 "
                         "(no-data) and 1..7 (classes). The file is corrupt or not a LoveDA "
                         "mask; download the dataset again.")
    return _LABEL_TABLE[raw]


class Builder(LandCoverBuilder):
    """LoveDA (7 classes, urban and rural domains; no-data ignored), from Zenodo's zips."""

    name = "lcseg_loveda"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "First release: official splits, per-domain splits, ids '<domain>/<n>', "
                 "original PNG bytes.",
        "1.1.0": "Each example is stored once: only the six per-domain splits are written; "
                 "train, validation and test are their unions (split aliases), half the "
                 "size on disk. Same examples, ids and labels as 1.0.0.",
    }
    METADATA = get_metadata("loveda")
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    EXTRA_FEATURES = {"domain": tfds.features.Text()}
    TRAIN_SPLITS = tuple(f"train_{domain}" for domain in DOMAINS)
    SPLIT_ALIASES = {split: "+".join(f"{split}_{domain}" for domain in DOMAINS)
                     for split in SOURCES}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        sources = _find_sources(manual_dir_of(dl_manager))
        # List (and check) every archive before anything is written.
        listings = {}
        for split, path in sources.items():
            with Archive(path) as archive:
                listings[split] = list_items(archive, labelled=split in LABELLED)
        return {
            f"{split}_{domain}": self._encoded(f"{split}_{domain}", self._generate_examples(
                sources[split], split, root, domain, items[domain]))
            for split, (root, items) in listings.items() for domain in DOMAINS
        }

    def _generate_examples(self, source: Path, split: str, root: str, domain: str,
                           stems: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        folder = f"{root}{DOMAINS[domain]}"
        with Archive(source) as archive:
            for stem in stems:
                image_name = f"{folder}/images_png/{stem}.png"
                image, (height, width) = read_image(
                    archive.read(image_name), archive.where(image_name), "PNG")
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
