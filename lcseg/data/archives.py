"""Reading downloads as they are: what the real-dataset builders share.

Users put the archives they downloaded (or the folders those extract to) into a TFDS
``manual_dir``; the builders in ``datasets/`` read them in place through ``Archive``,
member by member, so nothing is extracted to disk. Everything here fails with an error
that names the file (``archive.zip!member`` or its path) and says what to do:

* ``manual_dir_of``: the manual dir of a download manager, or a FileNotFoundError;
* ``Archive``: the files of a zip or folder (``names``, ``read``, ``where``,
  ``gdal_path``), usable as a context manager;
* ``find_download`` / ``archive_root``: where in ``manual_dir`` a dataset is, and the
  folder inside its zip where it starts;
* ``open_image`` / ``read_image``: decode (and check) image bytes, keeping the source's
  own bytes where they are already in the format to store;
* ``numeric_order``: the sort key of integer-named files (``'9'`` before ``'10'``).
"""

from __future__ import annotations

import io
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def manual_dir_of(dl_manager: tfds.download.DownloadManager) -> Path:
    """``dl_manager.manual_dir``, failing with a FileNotFoundError that says what to put there."""
    try:
        return Path(dl_manager.manual_dir)
    except AssertionError as error:  # TFDS signals a missing/empty manual_dir this way.
        raise FileNotFoundError(str(error)) from None


class Archive:
    """The files of a download: a zip as downloaded, or the folder it was extracted to.

    Names are '/'-separated paths relative to the zip root or the folder. Zip members are
    read one at a time, so nothing is extracted to disk and memory holds one file.
    ``with Archive(path) as archive:`` closes the zip at the end.
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

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

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
        """The bytes of file ``name``; FileNotFoundError or ValueError (corrupt) naming it."""
        try:
            if self._zip is not None:
                return self._zip.read(name)
            return (self.path / name).read_bytes()
        except KeyError:
            raise FileNotFoundError(f"{self.where(name)} does not exist.") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as error:
            raise ValueError(f"{self.where(name)} cannot be read ({error}): the archive is "
                             "corrupt; download it again.") from error

    def gdal_path(self, name: str) -> str:
        """A path GDAL (rasterio) opens; /vsizip/ reads a zip member without extracting it."""
        if self._zip is not None:
            return f"/vsizip/{self.path.resolve()}/{name}"
        return str(self.path / name)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def archive_root(path: Path, marker: re.Pattern[str]) -> str | None:
    """The shallowest folder prefix inside zip or folder ``path`` where a dataset starts.

    Args:
      path: the zip (or folder).
      marker: matches a file name that only the dataset's top folder holds; its group 1
        is that folder's prefix (``''`` at the root, else ending in ``'/'``).

    Returns:
      The prefix, or None if no file name matches.
    """
    with Archive(path) as archive:
        names = archive.names()
    roots = sorted({match.group(1) for match in map(marker.match, names) if match}, key=len)
    return roots[0] if roots else None


def find_download(manual_dir: Path, archive_names: Sequence[str], marker: re.Pattern[str],
                  folder_markers: Sequence[str]) -> tuple[Path, str | None] | None:
    """Where a single-archive dataset is in ``manual_dir``: its zip, else its extracted folder.

    Args:
      manual_dir: the folder the user put the download into.
      archive_names: the zip's possible names, the preferred first.
      marker: as for ``archive_root``.
      folder_markers: files or folders of which the extracted folder holds at least one.

    Returns:
      ``(zip, root inside it)`` for the first of ``archive_names`` present (root None where
      no member matches ``marker``: not the right archive); else ``(folder, '')`` for
      ``manual_dir`` itself or the first sub-folder holding a ``folder_markers`` entry;
      else None.
    """
    for archive_name in archive_names:
        if (manual_dir / archive_name).is_file():
            return manual_dir / archive_name, archive_root(manual_dir / archive_name, marker)
    for folder in [manual_dir, *sorted(p for p in manual_dir.iterdir() if p.is_dir())]:
        if any((folder / name).exists() for name in folder_markers):
            return folder, ""
    return None


def numeric_order(name: str) -> tuple[int, str]:
    """Sort key putting integer names (file numbers, image ids) in numeric order, not text order."""
    return (int(name) if name.isdigit() else -1, name)


def open_image(data: bytes, where: str) -> Image.Image:
    """Decodes image bytes fully (a truncated file fails here, not in training).

    Raises:
      ValueError: naming ``where``, if the bytes are not a readable image.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{where} is not a readable image ({error}): download the dataset "
                         "again.") from error


def read_image(data: bytes, where: str, keep_format: str
               ) -> tuple[bytes | np.ndarray, tuple[int, int]]:
    """Checks an image; returns (what to store, (height, width)).

    Args:
      data: the file's bytes.
      where: the file, as errors should name it.
      keep_format: the PIL format (``'JPEG'``, ``'PNG'``) whose 8-bit RGB files are stored
        as their own bytes (lossless with respect to the download, no re-encoding time).

    Returns:
      The bytes themselves for an 8-bit RGB ``keep_format`` file; otherwise the pixels as
      an RGB uint8 array, which the base builder encodes as PNG.
    """
    with open_image(data, where) as image:
        size = (image.height, image.width)
        if image.format == keep_format and image.mode == "RGB":
            return data, size
        return np.asarray(image.convert("RGB")), size
