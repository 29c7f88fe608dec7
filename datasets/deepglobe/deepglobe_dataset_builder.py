"""DeepGlobe Land Cover Classification (CVPR 2018) as the TFDS dataset ``lcseg_deepglobe``.

Reads the Kaggle download as it is (``deepglobe-land-cover-classification-dataset.zip``
or ``archive.zip``, members read one at a time, nothing extracted) or its extracted
folder, from ``manual_dir``. See ``datasets/deepglobe/README.md``.

* Labels follow the challenge's rule: each mask channel is binarised at 128 and the
  3-bit colour names the class; ``unknown`` (black) and pure red (no class) become the
  ignore label 255.
* Only the 803 ``train/`` images have masks. ``assign_splits`` divides them into
  ``train`` / ``validation`` / ``test``: the ids are ordered by a hash of the id, and the
  order is cut at GLNet's published proportions 454/207/142 (rounded), each split getting
  at least one image. The full download gives exactly 454/207/142; a part of it (any
  3 or more labelled images) gives every split some images. The same ids give the same
  split on every machine and Python version. Fewer than 3 labelled images is an error.
  The unlabelled ``valid/`` and ``test/`` images form the ``unlabelled`` split
  (labels 255).
* Satellite images are stored as their original JPEG bytes (decoded once to check them):
  lossless with respect to the download, and about 3.4x smaller than re-encoding the
  decoded pixels as PNG.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lcseg.data.archives import (
    Archive,
    find_download,
    manual_dir_of,
    numeric_order,
    open_image,
    read_image,
)
from lcseg.data.metadata import IGNORE_LABEL, get_metadata
from lcseg.data.tfds_builder import LandCoverBuilder

ARCHIVE_NAMES = ("deepglobe-land-cover-classification-dataset.zip", "archive.zip")
METADATA_CSV = "metadata.csv"
CLASS_DICT_CSV = "class_dict.csv"
UNKNOWN_CLASS = ("unknown", (0, 0, 0))

# The split of the labelled images, fixed by VERSION 2.x (changing it changes the data).
# GLNet's published protocol: 454 / 207 / 142 of the 803 labelled images.
SPLIT_SIZES = (("train", 454), ("validation", 207), ("test", 142))
SPLIT_TOTAL = sum(size for _, size in SPLIT_SIZES)  # 803, the full download.
# VERSION 1.0.0's bucket count. Ordering ids by their 1.0.0 bucket first means that on
# the full download only the images near the cut points change split relative to 1.0.0.
SPLIT_MODULUS = 803
LABELLED_SPLITS = tuple(name for name, _ in SPLIT_SIZES)
UNLABELLED_SPLIT = "unlabelled"

MANUAL_INSTRUCTIONS = f"""\
Download the DeepGlobe Land Cover Classification dataset from Kaggle
(kaggle datasets download balraj98/deepglobe-land-cover-classification-dataset) and put
{ARCHIVE_NAMES[0]} (or archive.zip, its name when downloaded with the web button),
or the folder it extracts to ({METADATA_CSV}, {CLASS_DICT_CSV}, train/, valid/, test/),
into manual_dir. See datasets/deepglobe/README.md.
"""


def _hash_key(image_id: str) -> tuple[int, int, str]:
    """Where ``image_id`` goes in the split order: (1.0.0 bucket, 64-bit hash, id).

    The hash is sha256 of the id's UTF-8 bytes (the same on every machine, unlike
    Python's ``hash``); its first 8 bytes, big-endian, are the 64-bit hash. The id itself
    breaks (astronomically unlikely) ties, so the order is total.
    """
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    value = int.from_bytes(digest[:8], "big")
    return value % SPLIT_MODULUS, value, image_id


def split_counts(num_labelled: int) -> dict[str, int]:
    """How many of ``num_labelled`` labelled images go to train, validation and test.

    The cut points are GLNet's cumulative proportions (454 and 454 + 207 of 803) of
    ``num_labelled``, rounded half up in integers (no float rounding differences), then
    moved just enough that every split keeps at least one image: 803 images give exactly
    454/207/142, 20 give 11/5/4, 8 give 5/2/1, 3 give 1/1/1.

    Args:
      num_labelled: the number of labelled images, at least 3.

    Returns:
      ``{'train': n_train, 'validation': n_validation, 'test': n_test}``, summing to
      ``num_labelled``.

    Raises:
      ValueError: if ``num_labelled`` is below 3 (a split would be empty).
    """
    if num_labelled < len(SPLIT_SIZES):
        raise ValueError(f"{num_labelled} labelled images cannot fill the "
                         f"{len(SPLIT_SIZES)} splits {', '.join(LABELLED_SPLITS)}.")
    cuts, cumulative = [], 0
    for _, size in SPLIT_SIZES[:-1]:
        cumulative += size
        cuts.append((2 * num_labelled * cumulative + SPLIT_TOTAL) // (2 * SPLIT_TOTAL))
    # Each cut at least one past the previous one, and leaving one image per later split.
    for index in range(len(cuts)):
        lowest = (cuts[index - 1] if index else 0) + 1
        highest = num_labelled - (len(cuts) - index)
        cuts[index] = min(max(cuts[index], lowest), highest)
    bounds = [0, *cuts, num_labelled]
    return {name: bounds[index + 1] - bounds[index]
            for index, (name, _) in enumerate(SPLIT_SIZES)}


def assign_splits(image_ids: Iterable[str]) -> dict[str, str]:
    """Divides labelled images into train, validation and test (the rule of VERSION 2.x).

    The ids are ordered by ``_hash_key`` (a sha256 of the id: random-looking, unrelated to
    the id's value or file order, the same everywhere) and the order is cut into
    ``split_counts(len(ids))``. An image's split depends on which other images are present
    only through the cut points: preparing a part of the download gives every split some
    images, and the full 803 give GLNet's 454/207/142 exactly.

    Args:
      image_ids: the labelled image ids, as in metadata.csv and the file names
        (``'100694'``, ``'6399'``; no padding); distinct.

    Returns:
      The split (``'train'``, ``'validation'`` or ``'test'``) of each id.

    Raises:
      ValueError: if there are fewer than 3 ids (some split would be empty).
    """
    ordered = sorted(image_ids, key=_hash_key)
    splits, start = {}, 0
    for name, count in split_counts(len(ordered)).items():
        splits.update(dict.fromkeys(ordered[start:start + count], name))
        start += count
    return splits


def _colour_code(rgb: np.ndarray) -> np.ndarray:
    """The challenge's 3-bit code of each colour: channels binarised at 128, R is the high bit."""
    bits = (np.asarray(rgb) >= 128).astype(np.uint8)
    return 4 * bits[..., 0] + 2 * bits[..., 1] + bits[..., 2]


def _code_table() -> np.ndarray:
    """Lookup from 3-bit colour code to label: class index, or 255 (unknown, red)."""
    meta = get_metadata("deepglobe")
    table = np.full(8, IGNORE_LABEL, np.uint8)
    for index, colour in enumerate(meta.palette):
        table[_colour_code(np.array(colour))] = index
    return table


_CODE_TABLE = _code_table()


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """Decodes an HxWx3 colour-coded DeepGlobe mask into HxW uint8 labels (255 ignored)."""
    return _CODE_TABLE[_colour_code(rgb)]


# The shallowest folder holding a csv or the train/ images is the dataset's root.
_ROOT_MARKER = re.compile(r"^((?:[^/]+/)*?)(?:metadata\.csv|class_dict\.csv|train/[^/]+)$")


def _find_source(manual_dir: Path) -> tuple[Path, str]:
    """Returns (zip or folder, root prefix inside it) holding the dataset in ``manual_dir``."""
    found = find_download(manual_dir, ARCHIVE_NAMES, _ROOT_MARKER,
                          (METADATA_CSV, CLASS_DICT_CSV, "train"))
    if found is None:
        present = sorted(p.name for p in manual_dir.iterdir())[:20]
        raise FileNotFoundError(
            f"No DeepGlobe data in {manual_dir} (it holds {present}). Expected one of "
            f"{list(ARCHIVE_NAMES)} or the extracted folder. " + MANUAL_INSTRUCTIONS)
    source, root = found
    if root is None:
        raise ValueError(
            f"{source} holds no {METADATA_CSV}, {CLASS_DICT_CSV} or train/ folder: it is not "
            "the DeepGlobe Land Cover archive. " + MANUAL_INSTRUCTIONS)
    return source, root


def check_class_dict(text: str, where: str) -> None:
    """Checks class_dict.csv against lcseg's DeepGlobe classes and palette.

    Args:
      text: the csv's content (``name,r,g,b``).
      where: the file, as errors should name it.

    Raises:
      ValueError: naming the file and row of the first disagreement.
    """
    meta = get_metadata("deepglobe")
    expected = dict(zip(meta.class_names, meta.palette, strict=True))
    expected[UNKNOWN_CLASS[0]] = UNKNOWN_CLASS[1]
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"name", "r", "g", "b"} <= set(reader.fieldnames):
        raise ValueError(f"{where}: expected columns name,r,g,b; found {reader.fieldnames}.")
    seen = set()
    for row_number, row in enumerate(reader, start=2):  # Row 1 is the header.
        name = (row["name"] or "").strip()
        try:
            colour = tuple(int(row[channel]) for channel in "rgb")
        except (TypeError, ValueError):
            raise ValueError(f"{where} row {row_number}: colour {row['r']},{row['g']},"
                             f"{row['b']} of {name!r} is not three integers.") from None
        if name not in expected:
            raise ValueError(f"{where} row {row_number}: class {name!r} is not a DeepGlobe "
                             f"class lcseg knows ({sorted(expected)}); is this the right file?")
        if colour != expected[name]:
            raise ValueError(
                f"{where} row {row_number}: class {name!r} has colour {colour} but lcseg "
                f"decodes {name!r} from {expected[name]} (lcseg/data/metadata.py); labels "
                "would be wrong. Check that this is the original DeepGlobe download.")
        seen.add(name)
    if missing := sorted(set(expected) - seen):
        raise ValueError(f"{where}: no row for class(es) {missing}.")


@dataclasses.dataclass(frozen=True)
class _Item:
    image_id: str
    image_path: str
    mask_path: str | None


def read_metadata(text: str, where: str, names: set[str], root: str
                  ) -> tuple[list[_Item], list[_Item]]:
    """Parses metadata.csv into (labelled, unlabelled) items, checking that files exist."""
    reader = csv.DictReader(io.StringIO(text))
    columns = ("image_id", "split", "sat_image_path", "mask_path")
    if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
        raise ValueError(f"{where}: expected columns {','.join(columns)}; "
                         f"found {reader.fieldnames}.")
    labelled, unlabelled, ids = [], [], set()
    for row_number, row in enumerate(reader, start=2):
        image_id = (row["image_id"] or "").strip()
        split = (row["split"] or "").strip()
        image_path = (row["sat_image_path"] or "").strip()
        mask_path = (row["mask_path"] or "").strip()
        if mask_path.lower() == "nan":  # How pandas writes an empty cell.
            mask_path = ""
        if not image_path:
            raise ValueError(f"{where} row {row_number}: image {image_id!r} has no "
                             "sat_image_path.")
        if not image_id or image_id in ids:
            raise ValueError(f"{where} row {row_number}: image_id {image_id!r} is empty or "
                             "repeated.")
        ids.add(image_id)
        if split == "train":
            if not mask_path:
                raise ValueError(f"{where} row {row_number}: train image {image_id} has no "
                                 "mask_path.")
            labelled.append(_Item(image_id, image_path, mask_path))
        elif split in ("valid", "test"):
            unlabelled.append(_Item(image_id, image_path, None))
        else:
            raise ValueError(f"{where} row {row_number}: split {split!r} is not one of "
                             "train, valid, test.")
        for path in (image_path, mask_path) if split == "train" else (image_path,):
            if root + path not in names:
                raise FileNotFoundError(f"{where} row {row_number}: {path} is not in the "
                                        "download; it is incomplete: download it again.")
    # Ids are integers of varying length: order them as numbers, not strings.
    return (sorted(labelled, key=lambda item: numeric_order(item.image_id)),
            sorted(unlabelled, key=lambda item: numeric_order(item.image_id)))


def _read_mask(data: bytes, where: str) -> np.ndarray:
    """Reads a colour-coded mask as HxWx3 uint8."""
    with open_image(data, where) as mask:
        if mask.mode not in ("RGB", "RGBA", "P"):
            raise ValueError(f"{where}: mask has mode {mask.mode!r}; DeepGlobe masks are "
                             "colour-coded RGB images.")
        return np.asarray(mask.convert("RGB"))


class Builder(LandCoverBuilder):
    """DeepGlobe Land Cover (6 classes; unknown ignored), from the Kaggle download."""

    name = "lcseg_deepglobe"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "2.0.0": "Split by rank: labelled ids ordered by their hash and cut at 454/207/142 "
                 "of the number present (exactly 454/207/142 for all 803; every split "
                 "non-empty for a part of the download of 3 or more labelled images). "
                 "1.0.0's hash-modulo rule gave only approximately 454/207/142 and could "
                 "leave a split empty on a part of the download.",
        "1.0.0": "First release: sha256 split of train/ into 454/207/142-like proportions, "
                 "unlabelled split of valid/ + test/, original JPEG bytes.",
    }
    METADATA = get_metadata("deepglobe")
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    # The stored image bytes are the download's JPEGs (see the module docstring).
    IMAGE_ENCODING = "jpeg"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source, root = _find_source(manual_dir_of(dl_manager))
        # Everything is checked before anything is written: csv files, listed files.
        with Archive(source) as archive:
            names = set(archive.names())
            texts = {}
            for csv_name in (CLASS_DICT_CSV, METADATA_CSV):
                if root + csv_name not in names:
                    raise FileNotFoundError(
                        f"{archive.where(root + csv_name)} is missing: the download is "
                        "incomplete or not the Kaggle DeepGlobe Land Cover dataset. "
                        + MANUAL_INSTRUCTIONS)
                texts[csv_name] = archive.read(root + csv_name).decode("utf-8-sig")
            check_class_dict(texts[CLASS_DICT_CSV], archive.where(root + CLASS_DICT_CSV))
            labelled, unlabelled = read_metadata(
                texts[METADATA_CSV], archive.where(root + METADATA_CSV), names, root)

        if len(labelled) < len(LABELLED_SPLITS):
            # Checked here, before TFDS opens any file: nothing is written.
            raise ValueError(
                f"{archive.where(root + METADATA_CSV)} lists {len(labelled)} labelled (train/) "
                f"image(s); lcseg needs at least {len(LABELLED_SPLITS)} to give each of "
                f"{', '.join(LABELLED_SPLITS)} one. Put the full download (803 labelled "
                "images) or a larger part of it into manual_dir.")
        split_of = assign_splits(item.image_id for item in labelled)
        items = {split: [item for item in labelled if split_of[item.image_id] == split]
                 for split in LABELLED_SPLITS}
        items[UNLABELLED_SPLIT] = unlabelled
        return {split: self._encoded(split, self._generate_examples(source, root, split_items))
                for split, split_items in items.items()}

    def _generate_examples(self, source: Path, root: str, items: list[_Item]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        with Archive(source) as archive:
            for item in items:
                where = archive.where(root + item.image_path)
                image, (height, width) = read_image(archive.read(root + item.image_path), where,
                                                    "JPEG")
                if item.mask_path is None:
                    label = np.full((height, width), IGNORE_LABEL, np.uint8)
                else:
                    mask_where = archive.where(root + item.mask_path)
                    mask = _read_mask(archive.read(root + item.mask_path), mask_where)
                    if mask.shape[:2] != (height, width):
                        raise ValueError(
                            f"{mask_where} is {mask.shape[1]}x{mask.shape[0]} px but its image "
                            f"{os.path.basename(item.image_path)} is {width}x{height}: the "
                            "download is damaged; download it again.")
                    label = decode_mask(mask)
                yield item.image_id, {"image": image, "label": label, "id": item.image_id}
