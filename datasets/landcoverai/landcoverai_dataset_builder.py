"""LandCover.ai v1 as the TFDS dataset ``lcseg_landcoverai``.

Reads ``landcover.ai.v1.zip`` as downloaded (GeoTIFFs read inside the zip through
GDAL's /vsizip/, nothing extracted) or its extracted folder, from ``manual_dir``. See
``datasets/landcoverai/README.md``.

The official split is per 512x512 tile. This builder cuts the tiles from the GeoTIFFs
itself, numbered exactly as the archive's ``split.py`` numbers them, so ids match
``train.txt`` / ``val.txt`` / ``test.txt``; pixels stay lossless (``split.py`` writes
JPEG) and no script from the archive is ever run. Rasters are read one 512-row band at a
time, so a 9000x9500 sheet is never held in memory whole.

Mask values: 0 background, 1 building, 2 woodland, 3 water, 4 road; no ignore label.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.errors
import tensorflow_datasets as tfds
from absl import logging
from rasterio.windows import Window

from lcseg.data.archives import Archive, find_download, manual_dir_of
from lcseg.data.metadata import get_metadata
from lcseg.data.tfds_builder import LandCoverBuilder

ARCHIVE_NAME = "landcover.ai.v1.zip"
TILE = 512
# lcseg split -> the list naming its tiles.
SPLIT_LISTS = {"train": "train.txt", "validation": "val.txt", "test": "test.txt"}
MAX_VALUE = 4

MANUAL_INSTRUCTIONS = f"""\
Download {ARCHIVE_NAME} from https://landcover.ai.linuxpolska.com/ and put it, or the
folder it extracts to (images/, masks/, train.txt, val.txt, test.txt), into manual_dir.
See datasets/landcoverai/README.md.
"""


# The shallowest folder holding train.txt or the images/ sheets is the dataset's root.
_ROOT_MARKER = re.compile(r"^((?:[^/]+/)*?)(?:train\.txt|images/[^/]+\.tif)$")


def _find_source(manual_dir: Path) -> tuple[Path, str]:
    """Returns (zip or folder, root prefix inside it) holding the dataset in ``manual_dir``."""
    found = find_download(manual_dir, (ARCHIVE_NAME,), _ROOT_MARKER, ("train.txt", "images"))
    if found is None:
        present = sorted(p.name for p in manual_dir.iterdir())[:20]
        raise FileNotFoundError(f"No LandCover.ai data in {manual_dir} (it holds {present}). "
                                f"Expected {ARCHIVE_NAME} or its extracted folder. "
                                + MANUAL_INSTRUCTIONS)
    source, root = found
    if root is None:
        raise ValueError(f"{source} holds no train.txt or images/*.tif: it is not the "
                         "LandCover.ai v1 archive. " + MANUAL_INSTRUCTIONS)
    return source, root


def tile_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of split.py's 512 px windows, partial ones included (they get numbers)."""
    return -(-height // TILE), -(-width // TILE)


def tile_numbers(height: int, width: int) -> list[int]:
    """The numbers ``k`` of the whole 512x512 tiles of a height x width sheet, as split.py.

    split.py walks ``for y in range(0, H, 512): for x in range(0, W, 512)`` numbering every
    window, and skips (but still counts) those crossing the right or bottom edge.
    """
    rows, columns = tile_grid(height, width)
    return [row * columns + column
            for row in range(rows) for column in range(columns)
            if (row + 1) * TILE <= height and (column + 1) * TILE <= width]


def _open(path: str, where: str):
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as error:
        raise ValueError(f"{where} cannot be read as a GeoTIFF ({error}): download the "
                         "dataset again.") from error


def read_split_list(text: str, where: str) -> list[tuple[str, int]]:
    """Parses a split list (one ``<sheet>_<k>`` per line) into (sheet, k) pairs."""
    tiles = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        tile_id = line.strip()
        if not tile_id:
            continue
        sheet, _, number = tile_id.rpartition("_")
        if not sheet or not number.isdigit():
            raise ValueError(f"{where} line {line_number}: {tile_id!r} is not a tile id "
                             "'<sheet>_<k>'.")
        tiles.append((sheet, int(number)))
    return tiles


class Builder(LandCoverBuilder):
    """LandCover.ai v1 (5 classes), 512x512 tiles of the official split, lossless."""

    name = "lcseg_landcoverai"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: official train/val/test tiles cut from the "
                              "GeoTIFFs (lossless), ids '<sheet>_<k>' as split.py."}
    METADATA = get_metadata("landcoverai")
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        source, root = _find_source(manual_dir_of(dl_manager))
        # Everything is checked before anything is written: sheets, sizes, split lists.
        with Archive(source) as archive:
            sizes = self._check_sheets(archive, root)
            tiles = self._read_lists(archive, root, sizes)
        listed = sum(len(split_tiles) for split_tiles in tiles.values())
        total = sum(len(tile_numbers(*size)) for size in sizes.values())
        if listed < total:
            logging.info("LandCover.ai: %d of %d whole tiles are in no split list (skipped).",
                         total - listed, total)
        return {split: self._encoded(split, self._generate_examples(source, root, split_tiles))
                for split, split_tiles in tiles.items()}

    def _check_sheets(self, archive: Archive, root: str) -> dict[str, tuple[int, int]]:
        """Pairs images/ and masks/ sheets and checks their sizes; returns (H, W) per sheet."""
        sheets: dict[str, set[str]] = {"images": set(), "masks": set()}
        pattern = re.compile(rf"^{re.escape(root)}(images|masks)/([^/]+)\.tif$")
        for name in archive.names():
            if match := pattern.match(name):
                sheets[match[1]].add(match[2])
        if not sheets["images"]:
            raise FileNotFoundError(f"{archive.where(root + 'images/')} holds no .tif sheets: "
                                    "the download is incomplete. " + MANUAL_INSTRUCTIONS)
        for have, lack in (("images", "masks"), ("masks", "images")):
            if unmatched := sorted(sheets[have] - sheets[lack])[:5]:
                raise FileNotFoundError(
                    f"{archive.where(root + lack + '/')}: no {lack[:-1]} for "
                    f"{[f'{have}/{s}.tif' for s in unmatched]}; the download is incomplete.")
        sizes = {}
        for sheet in sorted(sheets["images"]):
            image_name, mask_name = f"{root}images/{sheet}.tif", f"{root}masks/{sheet}.tif"
            image_where, mask_where = archive.where(image_name), archive.where(mask_name)
            with _open(archive.gdal_path(image_name), image_where) as image, \
                    _open(archive.gdal_path(mask_name), mask_where) as mask:
                if image.count < 3 or image.dtypes[0] != "uint8":
                    raise ValueError(f"{image_where}: {image.count} band(s) of "
                                     f"{image.dtypes[0]}; expected RGB uint8.")
                if mask.dtypes[0] != "uint8":
                    raise ValueError(f"{mask_where}: values are {mask.dtypes[0]}; expected "
                                     "uint8 classes 0..4.")
                if (image.height, image.width) != (mask.height, mask.width):
                    raise ValueError(
                        f"{mask_where} is {mask.width}x{mask.height} px but {image_where} is "
                        f"{image.width}x{image.height}: the download is damaged; download it "
                        "again.")
                sizes[sheet] = (image.height, image.width)
        return sizes

    def _read_lists(self, archive: Archive, root: str, sizes: dict[str, tuple[int, int]]
                    ) -> dict[str, list[tuple[str, int]]]:
        """Reads the split lists; every listed tile must be a whole tile of a present sheet."""
        tiles, listed_in = {}, {}
        names = set(archive.names())
        valid = {sheet: set(tile_numbers(*size)) for sheet, size in sizes.items()}
        for split, list_name in SPLIT_LISTS.items():
            where = archive.where(root + list_name)
            if root + list_name not in names:
                raise FileNotFoundError(f"{where} is missing: the download is incomplete. "
                                        + MANUAL_INSTRUCTIONS)
            split_tiles = read_split_list(archive.read(root + list_name).decode("utf-8-sig"),
                                          where)
            for sheet, number in split_tiles:
                tile_id = f"{sheet}_{number}"
                if sheet not in sizes:
                    raise ValueError(f"{where}: tile {tile_id} names sheet {sheet!r}, but "
                                     f"images/{sheet}.tif is not in the download.")
                if number not in valid[sheet]:
                    height, width = sizes[sheet]
                    raise ValueError(
                        f"{where}: tile {tile_id} does not exist: sheet {sheet} is {width}x"
                        f"{height} px, and tile {number} of its row-major 512 px windows is "
                        "not a whole tile. The list and the images come from different "
                        "downloads?")
                if tile_id in listed_in:
                    raise ValueError(f"{where}: tile {tile_id} is also listed in "
                                     f"{listed_in[tile_id]}.")
                listed_in[tile_id] = list_name
            tiles[split] = split_tiles
        return tiles

    def _generate_examples(self, source: Path, root: str, tiles: list[tuple[str, int]]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        # Group by sheet and tile row, so each sheet is opened once and read band by band.
        by_sheet: dict[str, set[int]] = {}
        for sheet, number in tiles:
            by_sheet.setdefault(sheet, set()).add(number)
        with Archive(source) as archive:
            for sheet in sorted(by_sheet):
                image_name, mask_name = f"{root}images/{sheet}.tif", f"{root}masks/{sheet}.tif"
                mask_where = archive.where(mask_name)
                with _open(archive.gdal_path(image_name), archive.where(image_name)) as image, \
                        _open(archive.gdal_path(mask_name), mask_where) as mask:
                    _, columns = tile_grid(image.height, image.width)
                    rows: dict[int, list[int]] = {}
                    for number in sorted(by_sheet[sheet]):
                        rows.setdefault(number // columns, []).append(number % columns)
                    for row, row_columns in sorted(rows.items()):
                        # One band: 512 rows, spanning only the columns needed.
                        first, last = min(row_columns), max(row_columns)
                        window = Window(first * TILE, row * TILE, (last - first + 1) * TILE, TILE)
                        try:
                            image_band = image.read((1, 2, 3), window=window)
                            mask_band = mask.read(1, window=window)
                        except rasterio.errors.RasterioIOError as error:
                            raise ValueError(
                                f"{archive.where(image_name)} or its mask cannot be read at "
                                f"rows {row * TILE}..{(row + 1) * TILE - 1} ({error}): the "
                                "download is corrupt; download it again.") from error
                        for column in row_columns:
                            x = (column - first) * TILE
                            tile_id = f"{sheet}_{row * columns + column}"
                            label = mask_band[:, x: x + TILE]
                            if label.max() > MAX_VALUE:
                                raise ValueError(
                                    f"{mask_where}: value {int(label.max())} in tile {tile_id} "
                                    f"(x {column * TILE}, y {row * TILE}) is not a LandCover.ai "
                                    "class (0..4): the mask is corrupt; download it again.")
                            yield tile_id, {
                                "image": np.transpose(image_band[:, :, x: x + TILE], (1, 2, 0)),
                                "label": label,
                                "id": tile_id,
                            }
