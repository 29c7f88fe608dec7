"""Full-size fake examples of the real datasets, and the loader measurements on them.

Shared by ``benchmarks/input_pipeline.py`` (which also runs them through the real TFDS
builders) and ``benchmarks/gpu_check.py`` (which runs where TFDS may be missing, so it
feeds the loader ``EncodedSource``: the same Pillow decoding of the same formats, held in
memory). Images are photo-like (smooth fields plus sensor noise), so JPEG and PNG
decoding costs are those of aerial imagery, not of flat colours.

This module must be importable by grain's worker processes (``EncodedSource`` travels
to them), so it holds no ``__main__`` code.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class DatasetShape:
    """What the loader sees of a real dataset: stored example side and format, and size.

    Attributes:
      side: side of a stored example (LandCover.ai's 9000x9500 sheets are cut into 512
        tiles when prepared: the loader reads tiles).
      image_format: how the builder stores the image (DeepGlobe keeps its JPEGs).
      train_examples: examples in the training split (datasets/*/README.md).
      config: the configs/ file of the dataset's U-Net.
    """

    side: int
    image_format: str
    train_examples: int
    config: str


DATASETS = {
    "deepglobe": DatasetShape(2448, "JPEG", 454, "unet_deepglobe"),
    "loveda": DatasetShape(1024, "PNG", 2522, "unet_loveda"),
    "landcoverai": DatasetShape(512, "PNG", 7470, "unet_landcoverai"),
}


@dataclasses.dataclass
class Repeated(Sequence):
    """``examples`` presented as ``length`` examples (index i is example i mod count).

    Fake data holds a few examples; the loader must still shuffle a real split's number
    of them: grain's index shuffle costs ~7 ms per element over 3 elements but 14 us
    over 7,470, which would otherwise dominate a small fake's figures.
    """

    examples: Sequence
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.examples[index % len(self.examples)]


def photo_like(rng: np.random.Generator, side: int) -> np.ndarray:
    """An RGB aerial-photo-like image: fields of smooth colour plus per-pixel noise."""
    coarse = rng.integers(0, 256, (side // 48 + 2, side // 48 + 2, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR),
                       np.int16)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def label_map(rng: np.random.Generator, side: int, classes: int = 6) -> np.ndarray:
    """A label map of blocky regions (land-cover parcels)."""
    coarse = rng.integers(0, classes, (side // 96 + 1, side // 96 + 1), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((side, side), Image.NEAREST))


def encode(array: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if image_format == "JPEG" else {"compress_level": 6}
    Image.fromarray(array).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


@dataclasses.dataclass
class EncodedSource(Sequence):
    """Examples held encoded (image JPEG/PNG, label PNG), decoded with Pillow on access."""

    images: list[bytes]
    labels: list[bytes]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": decode(self.images[index]), "label": decode(self.labels[index]),
                "id": str(index)}


def fake_source(dataset: str, count: int, *, side: int | None = None,
                seed: int = 0) -> EncodedSource:
    """``count`` full-size (or ``side``) examples of ``dataset`` in its stored formats."""
    shape = DATASETS[dataset]
    side = side or shape.side
    rng = np.random.default_rng(seed)
    return EncodedSource([encode(photo_like(rng, side), shape.image_format)
                          for _ in range(count)],
                         [encode(label_map(rng, side), "PNG") for _ in range(count)])


def pillow_decode_rate(encoded: Sequence[bytes], seconds: float = 2.0) -> float:
    """Full images decoded per second by Pillow in this process (one core)."""
    decode(encoded[0])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        decode(encoded[count % len(encoded)])
        count += 1
    return count / (time.perf_counter() - start)


def _resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid``, started by any of its threads (Linux /proc)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                children.extend(int(child) for child in listing.read().split())
        except OSError:
            pass
    return children


class PeakMemory:
    """Samples the peak resident memory of this process and of its children."""

    def __init__(self, interval: float = 0.05):
        self.main = 0
        self.workers: dict[int, int] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            self.main = max(self.main, _resident_bytes(pid))
            for child in _children(pid):
                try:
                    self.workers[child] = max(self.workers.get(child, 0),
                                              _resident_bytes(child))
                except OSError:
                    pass
            time.sleep(self._interval)


def loader_rate(iterator, batch_size: int, *, seconds: float, min_batches: int = 3
                ) -> dict[str, float]:
    """Crops/s of a training iterator after its first batch, and peak memory.

    Args:
      iterator: a started ``lcseg.data.pipeline.train_iterator``.
      batch_size: crops per batch.
      seconds: how long to draw batches (at least ``min_batches``).
      min_batches: batches drawn however long they take.

    Returns:
      ``crops_per_s``, ``first_batch_s`` and the peak resident GiB of the main process
      and of the most-grown worker (0 without workers).
    """
    with PeakMemory() as peak:
        start = time.perf_counter()
        next(iterator)
        first = time.perf_counter() - start
        count, start = 0, time.perf_counter()
        while count < min_batches or time.perf_counter() - start < seconds:
            next(iterator)
            count += 1
        elapsed = time.perf_counter() - start
    return {"crops_per_s": count * batch_size / elapsed, "first_batch_s": first,
            "main_peak_gib": peak.main / 2**30,
            "worker_peak_gib": max(peak.workers.values(), default=0) / 2**30}
