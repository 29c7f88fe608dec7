"""xView2 building footprints as the TFDS dataset ``lcseg_xview2``.

Reads the xview2.org downloads as they are (``train_images_labels_targets.tar.gz``,
``test_images_labels_targets.tar.gz`` and, optionally, ``tier3.tar.gz`` and
``hold_images_labels_targets.tar.gz``; streamed, nothing extracted) or the folders they
extract to (``train/``, ``test/``, ``tier3/``, ``hold/``), from ``manual_dir``. See
``datasets/xview2/README.md``.

* The footprint task: pre-disaster images only
  (``images/<disaster>_<number>_pre_disaster.png``; the download's numbers have 8
  digits, any count is read, as torchgeo's reader does) with their targets
  (``targets/<same stem>_target.png``);
  label 1 (building) where the target is above 0 (pre-disaster 1, or a damage level
  1..4, or 5 unclassified), 0 (background) elsewhere. Post-disaster files and the
  ``labels/*.json`` are not read. A target value above 5 is an error naming the file.
* Ids are ``<disaster>_<number>`` (e.g. ``hurricane-harvey_00000123``); every example
  also has a ``disaster`` feature (``hurricane-harvey``).
* Splits (the rule of VERSION 1.x): ``test`` is ``test/``; ``hold`` is ``hold/`` when
  that archive is present. ``assign_splits`` divides ``train/``: its ids are ordered by a
  sha256 of the id and the first ``VALIDATION_PERCENT`` (10) percent of the order,
  rounded half up and at least one, form ``validation``; the rest, plus all of
  ``tier3/`` when present, form ``train``. Only ``train/`` ids are ranked, so adding
  (or leaving out) tier3 or hold never moves a ``train/`` image between train and
  validation; the same ids give the same split on every machine.
* A tar.gz cannot be read at random without decompressing it again and again, so each
  archive is streamed start to end: once in ``_split_generators`` to list and check it
  (names, pairs, no member escaping its folder, and every byte against the gzip CRC;
  the small pre-disaster targets are kept in memory, about 10 KB each), then once per
  split it feeds, yielding images in archive order (TFDS orders examples by key anyway).
* Images are stored as their original PNG bytes (decoded once to check them).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from lcseg.data.archives import manual_dir_of, open_image
from lcseg.data.metadata import get_metadata
from lcseg.data.tfds_builder import LandCoverBuilder

# Top folder inside each archive -> the archive's name as downloaded.
ARCHIVES = {
    "train": "train_images_labels_targets.tar.gz",
    "test": "test_images_labels_targets.tar.gz",
    "tier3": "tier3.tar.gz",
    "hold": "hold_images_labels_targets.tar.gz",
}
REQUIRED = ("train", "test")
# Top folder -> the split its images go to (train/ is divided by assign_splits).
FOLDER_SPLITS = {"train": "train", "tier3": "train", "test": "test", "hold": "hold"}
# The share of train/ that forms validation, fixed by VERSION 1.x.
VALIDATION_PERCENT = 10
# Target values: 0 background, 1 building / no damage, 2..4 damage levels, 5 unclassified.
MAX_TARGET_VALUE = 5
_READ_CHUNK = 1 << 20

MANUAL_INSTRUCTIONS = f"""\
Register at https://xview2.org, download {ARCHIVES['train']} and {ARCHIVES['test']}
(optionally {ARCHIVES['tier3']}, more training data, and {ARCHIVES['hold']}, the holdout
set) and put them, or the folders train/, test/, tier3/, hold/ they extract to, into
manual_dir. See datasets/xview2/README.md.
"""

# <root>images/<disaster>_<number>_pre_disaster.png and its target; <root> is the
# archive's top folder ('train/') or '' in an extracted folder. The download's numbers
# have 8 digits; any count is accepted (as torchgeo does), so a renumbered or
# hand-assembled copy loses no image without a word.
_PRE_FILE = re.compile(
    r"^(?P<root>(?:[^/]+/)*?)(?P<kind>images|targets)/"
    r"(?P<id>(?P<disaster>[^/]+)_(?P<number>\d+))_pre_disaster(?P<target>_target)?\.png$")


def _hash_key(image_id: str) -> tuple[int, str]:
    """Where ``image_id`` goes in the split order: (64-bit sha256 prefix, id).

    sha256 of the id's UTF-8 bytes is the same on every machine (Python's ``hash`` is
    not); the id itself breaks (astronomically unlikely) ties, so the order is total.
    """
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big"), image_id


def validation_count(num_images: int) -> int:
    """How many of ``num_images`` train/ images go to validation.

    ``VALIDATION_PERCENT`` of them, rounded half up in integers (no float rounding
    differences), and at least one in each of train and validation: the full train/
    archive (2799 images) gives 280, 10 give 1, 2 give 1.

    Args:
      num_images: the number of train/ images, at least 2.

    Returns:
      The validation count, in ``[1, num_images - 1]``.

    Raises:
      ValueError: if ``num_images`` is below 2 (a split would be empty).
    """
    if num_images < 2:
        raise ValueError(f"{num_images} train/ image(s) cannot fill both train and "
                         "validation.")
    count = (2 * num_images * VALIDATION_PERCENT + 100) // 200
    return min(max(count, 1), num_images - 1)


def assign_splits(image_ids: Iterable[str]) -> dict[str, str]:
    """Divides the train/ archive's images into train and validation (VERSION 1.x's rule).

    The ids are ordered by ``_hash_key`` (a sha256 of the id: random-looking, unrelated to
    disaster, number or file order, the same everywhere) and the first
    ``validation_count(len(ids))`` form validation. Only train/ ids may be passed: tier3/
    images are always train and take no part, so adding tier3 moves no train/ image.

    Args:
      image_ids: distinct ids ``<disaster>_<number>`` of train/'s pre-disaster
        images, e.g. ``'hurricane-harvey_00000123'``.

    Returns:
      ``'train'`` or ``'validation'`` for each id.

    Raises:
      ValueError: if there are fewer than 2 ids.
    """
    ordered = sorted(image_ids, key=_hash_key)
    cut = validation_count(len(ordered))
    return {image_id: "validation" if index < cut else "train"
            for index, image_id in enumerate(ordered)}


# ----------------------------------------------------------------------------------------
# Reading a download: a tar.gz streamed, or the folder it extracts to.
# ----------------------------------------------------------------------------------------

def _unreadable(path: Path, error: BaseException) -> ValueError:
    return ValueError(f"{path} is not a readable tar.gz archive ({type(error).__name__}: "
                      f"{error}): the download is probably incomplete (truncated) or corrupt; "
                      "download it again.")


def _escapes(name: str) -> bool:
    """Whether a '/'-separated path is absolute or climbs out of its folder with '..'."""
    return name.startswith("/") or posixpath.normpath(name).split("/")[0] == ".."


def _tar_files(path: Path) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """Streams a tar.gz: yields (member, reader) for each member, in order.

    ``reader()`` returns the member's bytes; it must be called before the next member is
    taken (the stream does not go back). Names are used as stored: a ``./train/`` prefix
    (tar given ``.``) simply becomes part of the dataset's root. After the last member the
    gzip stream is read to its end, so its CRC and length check every byte: a truncated
    or damaged download fails here, naming the archive.

    Raises:
      ValueError: an unreadable archive, or a member whose path or link leaves the
        archive's folder (absolute, or through '..').
    """

    def reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
        def read() -> bytes:
            try:
                return tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
                raise _unreadable(path, error) from error
        return read

    try:
        with gzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                # A symbolic link's target is relative to its folder, a hard link's to
                # the archive's root.
                link = (posixpath.join(posixpath.dirname(member.name), member.linkname)
                        if member.issym() else member.linkname if member.islnk() else "")
                if _escapes(member.name) or (link and _escapes(link)):
                    what = f"link to {member.linkname!r}" if link else "absolute or '..' path"
                    raise ValueError(
                        f"{path}!{member.name} points outside the archive's folder ({what}): "
                        "this is not the xView2 download as published; do not extract it, "
                        "download it again from xview2.org.")
                yield member, reader(tar, member)
            # The tar's end marker can come before the gzip trailer: read on to check it.
            while stream.read(_READ_CHUNK):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise _unreadable(path, error) from error


@dataclasses.dataclass
class Download:
    """One archive (or its extracted folder) of xView2, listed and checked.

    Attributes:
      folder: its top folder's name, a key of ``ARCHIVES`` (``'train'``, ``'tier3'``...).
      path: the tar.gz or the extracted folder.
      root: the prefix of its files (``'train/'`` in the tar.gz, ``''`` in a folder).
      disasters: the disaster of each pre-disaster image id.
      targets: a tar.gz's target bytes per id (read while listing; a folder's are read
        from disk when needed).
    """

    folder: str
    path: Path
    root: str
    disasters: dict[str, str]
    targets: dict[str, bytes]

    @property
    def is_tar(self) -> bool:
        """Whether this is the tar.gz (streamed) rather than an extracted folder."""
        return self.path.is_file()

    def where(self, name: str) -> str:
        """How errors name a file: ``archive.tar.gz!member`` or the file's path."""
        return f"{self.path}!{name}" if self.is_tar else str(self.path / name)

    def image_name(self, image_id: str) -> str:
        """The pre-disaster image's name (relative to the tar.gz or folder)."""
        return f"{self.root}images/{image_id}_pre_disaster.png"

    def target_name(self, image_id: str) -> str:
        """The pre-disaster target's name (relative to the tar.gz or folder)."""
        return f"{self.root}targets/{image_id}_pre_disaster_target.png"


def _pair(folder: str, path: Path, files: dict[str, dict[str, dict[str, str]]],
          where: Callable[[str], str]) -> tuple[str, dict[str, str]]:
    """Picks the dataset's root and checks that images and targets pair up.

    Args:
      folder: the expected top folder.
      path: the archive or folder, for messages.
      files: root -> kind ('images'/'targets') -> id -> disaster.
      where: name -> how errors name that file.

    Returns:
      (root, disaster of each image id).
    """
    if not files:
        raise ValueError(
            f"{path} holds no images/<disaster>_<number>_pre_disaster.png: it is not the "
            f"xView2 {folder}/ download. " + MANUAL_INSTRUCTIONS)
    root = min(files, key=len)
    if root and posixpath.basename(root.rstrip("/")) != folder:
        raise ValueError(
            f"{path} holds {root}images/, not {folder}/images/: it is not the xView2 "
            f"{folder}/ download (archives renamed or swapped?). " + MANUAL_INSTRUCTIONS)
    images, targets = files[root].get("images", {}), files[root].get("targets", {})
    if not images:
        raise ValueError(f"{where(root + 'images/')} holds no <disaster>_<number>_"
                         "pre_disaster.png: the download is incomplete; download it again.")
    for lack, have, unmatched, stem in (
            ("target", "image", images.keys() - targets.keys(), "{}_pre_disaster.png"),
            ("image", "target", targets.keys() - images.keys(), "{}_pre_disaster_target.png")):
        if unmatched:
            names = [stem.format(image_id) for image_id in sorted(unmatched)[:5]]
            raise FileNotFoundError(
                f"{where(root + lack + 's/')}: no {lack} for {have}(s) {names} "
                f"({len(unmatched)} in all); the download is incomplete: download it again.")
    return root, images


def list_tar(folder: str, path: Path) -> Download:
    """Streams a tar.gz once: lists its pre-disaster pairs and keeps their targets' bytes.

    Raises:
      ValueError / FileNotFoundError: naming the archive (or member) and what to do.
    """
    files: dict[str, dict[str, dict[str, str]]] = {}
    target_bytes: dict[tuple[str, str], bytes] = {}
    for member, read in _tar_files(path):
        if not (match := _PRE_FILE.match(member.name)):
            continue
        if not member.isfile():
            raise ValueError(f"{path}!{member.name} is not a regular file (a link or "
                             "device): the xView2 download holds plain PNG files; download it "
                             "again.")
        files.setdefault(match["root"], {}).setdefault(match["kind"], {})[
            match["id"]] = match["disaster"]
        if match["target"]:
            target_bytes[match["root"], match["id"]] = read()
    root, disasters = _pair(folder, path, files, lambda name: f"{path}!{name}")
    targets = {image_id: data for (where, image_id), data in target_bytes.items()
               if where == root}
    return Download(folder, path, root, disasters, targets)


def list_folder(folder: str, path: Path) -> Download:
    """Lists an extracted folder's pre-disaster pairs (``images/``, ``targets/``).

    Raises:
      ValueError / FileNotFoundError: naming the folder (or file) and what to do.
    """
    files: dict[str, dict[str, str]] = {}
    for kind in ("images", "targets"):
        if not (path / kind).is_dir():
            raise FileNotFoundError(f"{path / kind} is missing: {path} is not (all of) the "
                                    f"extracted xView2 {folder}/ folder. " + MANUAL_INSTRUCTIONS)
        for file in sorted((path / kind).iterdir()):
            match = _PRE_FILE.match(f"{kind}/{file.name}")
            if not match:
                continue
            # A link out of the folder would read files that are not the download.
            if not file.resolve().is_relative_to(path.resolve()) or not file.is_file():
                raise ValueError(f"{file} is not a file inside {path} (a link out of it, or "
                                 "a folder): extract the download again.")
            files.setdefault(kind, {})[match["id"]] = match["disaster"]
    root, disasters = _pair(folder, path, {"": files} if files else {},
                            lambda name: str(path / name))
    return Download(folder, path, root, disasters, {})


def find_downloads(manual_dir: Path) -> dict[str, Path]:
    """Returns, per top folder present, its tar.gz or extracted folder in ``manual_dir``.

    An archive wins over a folder. A folder is ``manual_dir/<folder>`` or
    ``manual_dir/<archive name without .tar.gz>/<folder>`` (archive managers extract into
    a folder named after the archive).

    Raises:
      FileNotFoundError: if train or test is missing, naming what is there.
    """
    found, missing = {}, []
    for folder, archive_name in ARCHIVES.items():
        stem = archive_name.removesuffix(".tar.gz")
        folders = [path for path in (manual_dir / folder, manual_dir / stem / folder)
                   if path.is_dir()]
        # A folder holding images/ first: tier3.tar.gz extracted into a folder named after
        # it gives tier3/tier3/images. Else a folder without it, for the error to name.
        candidates = ([manual_dir / archive_name] if (manual_dir / archive_name).is_file()
                      else []) + [p for p in folders if (p / "images").is_dir()] + folders
        path = candidates[0] if candidates else None
        if path is not None:
            found[folder] = path
        elif folder in REQUIRED:
            missing.append(f"{archive_name} (or its folder {folder}/)")
    if missing:
        present = sorted(p.name for p in manual_dir.iterdir())[:20]
        raise FileNotFoundError(
            f"xView2 download incomplete in {manual_dir}: missing {', '.join(missing)}; it "
            f"holds {present}. " + MANUAL_INSTRUCTIONS)
    return found


def decode_target(data: bytes, where: str) -> np.ndarray:
    """Reads a target PNG and returns HxW labels: 1 (building) where it is > 0, else 0.

    Raises:
      ValueError: if the file is not a single-channel 8-bit image or holds a value above 5.
    """
    with open_image(data, where) as target:
        if target.mode != "L":
            raise ValueError(f"{where}: target has mode {target.mode!r}; xView2 targets are "
                             "single-channel 8-bit PNGs (mode 'L'). Is this the right file? "
                             "Download the dataset again.")
        raw = np.asarray(target)
    if raw.max(initial=0) > MAX_TARGET_VALUE:
        bad = np.unique(raw[raw > MAX_TARGET_VALUE])[:5].tolist()
        raise ValueError(f"{where}: target value(s) {bad} out of range: xView2 targets hold "
                         f"0 (background) and 1..{MAX_TARGET_VALUE} (building, damage levels). "
                         "The file is corrupt or not an xView2 target; download it again.")
    return (raw > 0).astype(np.uint8)


def read_example(image: bytes, image_where: str, target: bytes, target_where: str
                 ) -> tuple[bytes, np.ndarray]:
    """Checks one pre-disaster pair; returns (image bytes to store, HxW label).

    Raises:
      ValueError: naming the file, for an unreadable or non-RGB image, a bad target or a
        target whose size differs from its image's.
    """
    with open_image(image, image_where) as decoded:
        if decoded.mode != "RGB" or decoded.format != "PNG":
            raise ValueError(f"{image_where}: image is a {decoded.format} of mode "
                             f"{decoded.mode!r}; xView2 images are 8-bit RGB PNGs. Download "
                             "the dataset again.")
        height, width = decoded.height, decoded.width
    label = decode_target(target, target_where)
    if label.shape != (height, width):
        raise ValueError(f"{target_where} is {label.shape[1]}x{label.shape[0]} px but its "
                         f"image is {width}x{height}: the download is damaged; download it "
                         "again.")
    return image, label


class Builder(LandCoverBuilder):
    """xView2 building footprints (background, building) from pre-disaster images."""

    name = "lcseg_xview2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "First release: pre-disaster images, building = target > 0; validation = "
                 "10% of train/ by a sha256 rank of the id; train/ rest + tier3/; test/; "
                 "hold/ as 'hold' when present; original PNG bytes.",
    }
    METADATA = get_metadata("xview2")
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    EXTRA_FEATURES = {"disaster": tfds.features.Text()}

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        paths = find_downloads(manual_dir_of(dl_manager))
        # List and check every archive (every byte of a tar.gz) before anything is written.
        downloads = {folder: (list_tar if path.is_file() else list_folder)(folder, path)
                     for folder, path in paths.items()}
        train_ids = downloads["train"].disasters
        if len(train_ids) < 2:
            raise ValueError(
                f"{paths['train']} holds {len(train_ids)} pre-disaster image(s); lcseg needs "
                "at least 2 to give train and validation one each. Put the full download "
                "into manual_dir.")
        if "tier3" in downloads and (twice := sorted(
                downloads["tier3"].disasters.keys() & train_ids.keys())):
            raise ValueError(
                f"{paths['tier3']} and {paths['train']} both hold image(s) {twice[:5]}: an id "
                "must be in one of them (the train split would hold it twice). Are both the "
                "original downloads?")
        split_of = assign_splits(train_ids)
        # split -> [(download, ids)]; train/ feeds train and validation.
        parts: dict[str, list[tuple[Download, set[str]]]] = {"train": [], "validation": []}
        for folder, download in downloads.items():
            if folder == "train":
                for split in ("train", "validation"):
                    parts[split].append(
                        (download, {i for i in train_ids if split_of[i] == split}))
            else:
                parts.setdefault(FOLDER_SPLITS[folder], []).append(
                    (download, set(download.disasters)))
        # Which archives went in (e.g. whether tier3 did), for whoever reads the data later.
        self.info.metadata["archives"] = sorted(downloads)
        return {split: self._encoded(split, self._generate_examples(split_parts))
                for split, split_parts in parts.items()}

    def _generate_examples(self, parts: list[tuple[Download, set[str]]]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        for download, ids in parts:
            for image_id, image, image_where in self._images(download, ids):
                target_name = download.target_name(image_id)
                if download.is_tar:
                    target = download.targets[image_id]
                else:
                    target = (download.path / target_name).read_bytes()
                image, label = read_example(image, image_where, target,
                                            download.where(target_name))
                yield image_id, {"image": image, "label": label, "id": image_id,
                                 "disaster": download.disasters[image_id]}

    @staticmethod
    def _images(download: Download, ids: set[str]) -> Iterator[tuple[str, bytes, str]]:
        """Yields (id, image bytes, where) for ``ids``: a tar.gz in archive order (one pass)."""
        if not download.is_tar:
            for image_id in sorted(ids):
                name = download.image_name(image_id)
                yield image_id, (download.path / name).read_bytes(), download.where(name)
            return
        left = set(ids)
        for member, read in _tar_files(download.path):
            match = _PRE_FILE.match(member.name)
            if (match and match["kind"] == "images" and match["root"] == download.root
                    and match["id"] in left):
                left.discard(match["id"])
                yield match["id"], read(), download.where(member.name)
        if left:  # Listed a moment ago: the file changed since.
            raise ValueError(f"{download.path} no longer holds {sorted(left)[:5]}: it changed "
                             "during preparation; prepare again.")
