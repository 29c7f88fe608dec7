"""The grain input pipeline: training batches of random crops, evaluation batches of tiles.

Training: one global, seeded stream of examples (a shuffle that changes every epoch, then
the configured augmentation, ``lcseg.data.augment``: by default a random crop to
``crop_size``, padded with the ignore label when an image is smaller, and random flips),
of which each process reads its share in batches of ``batch_size / process_count``,
optionally prepared in ``workers`` worker processes. The iterator's state is
checkpointed, so a resumed run sees exactly the batches an uninterrupted one would.

Evaluation covers every pixel exactly once: each image is cut into non-overlapping
``tile_size`` tiles (edges padded with the ignore label, which metrics skip), and the last
batch is filled with all-ignored tiles, so every batch has the same shape and the
compiled step never recompiles.

Resolution: ``downscale`` (``config.data.downscale``, e.g. 0.25) resizes every example
(image bilinear, antialiased; label nearest) before augmentation in training and before
tiling in evaluation, so the model trains and is evaluated at that fraction of the full
resolution, and evaluation metrics are computed on the downscaled labels (not on the
full-resolution ground truth). ``downscale=1`` is full resolution.

Batches stay uint8 on the host (4x less to copy); ``normalize_images`` runs on device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lcseg.data.augment import Augment, AugmentOptions, resize_example
from lcseg.data.metadata import IGNORE_LABEL
from lcseg.data.worker_lifetime import exit_with_parent


def pad_to_at_least(image: np.ndarray, label: np.ndarray, height: int, width: int,
                    ignore_label: int = IGNORE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Pads image (zeros) and label (ignore) at the bottom/right to at least height x width."""
    pad_h, pad_w = max(height - label.shape[0], 0), max(width - label.shape[1], 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_label)
    return image, label


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How much work each loader process does ahead, and in how many processes.

    Memory: each loader process (a worker, or the main process when ``workers=0``)
    holds at most about ``read_ahead + read_threads + 2`` decoded elements (a training
    element is ``crops_per_image`` crops, ``crops_per_image * crop_size**2 * 4`` bytes;
    an evaluation element is one image's tiles) plus, per read thread, the full-size
    image being decoded (about 8 bytes per pixel with Pillow's copy). grain's own
    defaults (16 threads, 500 elements) grew each worker to 5 GB on DeepGlobe.

    Attributes:
      workers: grain worker processes; 0 reads in the main process.
      read_threads: threads per loader process decoding ahead (Pillow releases the GIL,
        so with ``workers=0`` they still overlap decoding with the device step).
      read_ahead: decoded elements buffered per loader process.
    """

    workers: int = 0
    read_threads: int = 1
    read_ahead: int = 2

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> LoaderOptions:
        """Options from ``config.data`` (fields missing in older workdirs default)."""
        options = cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)
                         if f.name in data})
        for field in dataclasses.fields(cls):
            value = getattr(options, field.name)
            minimum = 1 if field.name == "read_threads" else 0
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"config.data.{field.name}={value!r} must be an integer "
                                 f">= {minimum}.")
        return options

    def iterate(self, dataset: grain.MapDataset) -> grain.IterDataset:
        """``dataset`` read in order with this read-ahead, in workers if any."""
        read_options = grain.ReadOptions(num_threads=self.read_threads,
                                         prefetch_buffer_size=self.read_ahead)
        iter_dataset = dataset.to_iter_dataset(read_options)
        if self.workers > 0:
            iter_dataset = iter_dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.workers),
                worker_init_fn=exit_with_parent)
        return iter_dataset


class _CropsOfImage(grain.transforms.RandomMap):
    """One decoded example -> ``count`` independently augmented crops (stacked)."""

    def __init__(self, augmentation: Augment, count: int):
        self.augmentation = augmentation
        self.count = count

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        images, labels = self.augmentation.apply_several(element["image"], element["label"],
                                                         rng, count=self.count)
        return {"image": images, "label": labels}


class _RoundBatches(grain.IterDataset):
    """Rounds of ``batch_size`` images, each image giving one crop to each of ``crops`` batches."""

    def __init__(self, parent: grain.IterDataset, batch_size: int, crops: int):
        super().__init__(parent)
        self.batch_size = batch_size
        self.crops = crops

    def __iter__(self) -> _RoundBatchIterator:
        return _RoundBatchIterator(self._parent.__iter__(), self.batch_size, self.crops)


class _RoundBatchIterator(grain.DatasetIterator):
    """Iterator of ``_RoundBatches``; its state is the round's start and the crop index.

    A resumed iterator reads (decodes) its round again and continues at the same crop,
    so a checkpoint taken mid-round resumes exactly.
    """

    def __init__(self, parent: grain.DatasetIterator, batch_size: int, crops: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._crops = crops
        self._round_start = parent.get_state()
        self._round: list[dict[str, np.ndarray]] | None = None
        self._crop = 0

    def __next__(self) -> dict[str, np.ndarray]:
        if self._round is None:
            self._round = [next(self._parent) for _ in range(self._batch_size)]
        batch = {key: np.stack([element[key][self._crop] for element in self._round])
                 for key in ("image", "label")}
        self._crop += 1
        if self._crop == self._crops:
            self._round, self._crop = None, 0
            self._round_start = self._parent.get_state()
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"round_start": self._round_start, "crop": self._crop}

    def close(self) -> None:
        """Stops the loader (its workers too) and lets go of the round being batched.

        With worker processes, the round's arrays live in shared memory until dropped:
        held to the end of the process they are left to multiprocessing's resource
        tracker, which unlinks them but warns of "leaked shared_memory objects".
        """
        self._round = None
        super().close()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["round_start"])
        self._round_start = state["round_start"]
        self._round, self._crop = None, int(state["crop"])


def train_iterator(source: Sequence[dict[str, Any]], *, batch_size: int, crop_size: int,
                   seed: int, ignore_label: int = IGNORE_LABEL,
                   augment: Mapping[str, Any] | AugmentOptions | None = None,
                   downscale: float = 1.0, crops_per_image: int = 1,
                   loader: LoaderOptions | None = None) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches (``image``, ``label``, uint8).

    The global stream: images in a fresh random order every epoch; each image, once
    decoded, gives ``crops_per_image`` independently augmented crops. Images are taken
    ``batch_size`` at a time (a round); crop k of every image of a round forms batch k
    of the round. So each batch holds ``batch_size`` different images, as with one crop
    per image, every image gives exactly ``crops_per_image`` crops per epoch, and an
    image is decoded once for ``crops_per_image`` crops instead of once per crop (a
    2448x2448 JPEG takes ~80 ms to decode and ~1 ms to crop). The price: an image is
    seen in ``crops_per_image`` consecutive batches (at different positions).

    Batch slot s of every batch belongs to process ``s % process_count``, which alone
    decodes the images of that slot: global batches are the same whatever the number
    of processes.

    Args:
      source: random-access examples (``lcseg.data.open_split``).
      batch_size: the global batch size (split evenly across processes).
      crop_size: side of the square random crops.
      seed: shuffling and augmentation seed (the same on every process).
      ignore_label: label for padded pixels.
      augment: ``config.augment`` (ops and options, see ``lcseg.data.augment``); None:
        random crop and flips.
      downscale: resize factor applied to each example before augmentation.
      crops_per_image: crops taken from each decoded image (``config.data``).
      loader: workers and read-ahead (``config.data``); None: the main process alone.

    Returns:
      A grain iterator; ``get_state``/``set_state`` (and Orbax) checkpoint its position.
    """
    # Built before any data is read, so a bad config fails at once, not in a worker.
    augmentation = Augment(AugmentOptions.from_config(augment), crop_size=crop_size,
                           ignore_label=ignore_label, downscale=downscale)
    if not isinstance(crops_per_image, int) or crops_per_image < 1:
        raise ValueError(f"config.data.crops_per_image={crops_per_image!r} must be a "
                         "positive integer.")
    process_count = jax.process_count()
    if batch_size % process_count:
        raise ValueError(f"config.batch_size={batch_size} is not divisible by the "
                         f"{process_count} processes.")
    images = grain.MapDataset.source(source).seed(seed)
    # Shuffle before repeat: grain draws a new permutation for every epoch.
    images = images.shuffle().repeat()
    # Randomness is drawn per global image index, before the process split below.
    crops = images.random_map(_CropsOfImage(augmentation, crops_per_image))
    # Image i of the global stream fills batch slot i % batch_size of its round; slots
    # (hence images) go to processes round-robin. Each process reads only its own.
    crops = crops[jax.process_index()::process_count]
    loader = loader or LoaderOptions()
    return iter(_RoundBatches(loader.iterate(crops), batch_size // process_count,
                              crops_per_image))


def image_tiles(image: np.ndarray, label: np.ndarray, tile_size: int,
                ignore_label: int = IGNORE_LABEL, *,
                downscale: float = 1.0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping tiles covering the image; edge tiles padded (label: ignore).

    Args:
      image: uint8 ``[h, w, 3]``.
      label: uint8 ``[h, w]``.
      tile_size: side of the square tiles.
      ignore_label: label of padding.
      downscale: resize factor applied to the example before tiling.

    Yields:
      ``(image tile, label tile)``, row by row.
    """
    image, label = resize_example(image, label, downscale)
    height, width = label.shape
    for top in range(0, height, tile_size):
        for left in range(0, width, tile_size):
            yield pad_to_at_least(image[top:top + tile_size, left:left + tile_size],
                                  label[top:top + tile_size, left:left + tile_size],
                                  tile_size, tile_size, ignore_label)


class _ExampleTiles(grain.transforms.Map):
    """An example -> its tiles, stacked (``image_tiles``)."""

    def __init__(self, tile_size: int, ignore_label: int, downscale: float):
        self.tile_size = tile_size
        self.ignore_label = ignore_label
        self.downscale = downscale

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        images, labels = zip(*image_tiles(element["image"], element["label"], self.tile_size,
                                          self.ignore_label, downscale=self.downscale))
        return {"image": np.stack(images), "label": np.stack(labels)}


class EvalBatches:
    """This process's evaluation batches of a split, read ahead (in workers if any).

    Calling it gives one pass over the split: every pixel of this process's examples
    exactly once, in order, the last batch completed with all-ignored tiles. Decoding
    and tiling run ahead of the device in the loader's workers, which stay alive
    between passes (starting workers costs seconds; a training run evaluates often).

    Args:
      source: random-access examples.
      batch_size: global batch size (each process yields ``batch_size / process_count``).
      tile_size: side of the square tiles.
      ignore_label: label of padding (not counted by metrics).
      downscale: resize factor applied to each example before tiling; metrics are then
        computed at that resolution.
      loader: workers and read-ahead; None: the main process alone.
    """

    def __init__(self, source: Sequence[dict[str, Any]], *, batch_size: int, tile_size: int,
                 ignore_label: int = IGNORE_LABEL, downscale: float = 1.0,
                 loader: LoaderOptions | None = None):
        self._local_batch = batch_size // jax.process_count()
        self._ignore_label = ignore_label
        examples = grain.MapDataset.source(source)[jax.process_index()::jax.process_count()]
        self._count = len(examples)
        # Repeated, so that one iterator (and its workers) serves every pass.
        self._tiles = (loader or LoaderOptions()).iterate(
            examples.map(_ExampleTiles(tile_size, ignore_label, downscale)).repeat())
        self._iterator: grain.DatasetIterator | None = None

    def __call__(self) -> Iterator[dict[str, np.ndarray]]:
        """Yields batches of tiles: ``image`` uint8 [b, t, t, 3], ``label`` uint8 [b, t, t].

        ``image_index`` (int32 [b]) is each tile's example index in the split, -1 for
        padding tiles: per-image scores add up the tiles of each image.
        """
        if self._count == 0:
            return
        # A pass abandoned half-way would leave the stream mid-split: start afresh.
        iterator, self._iterator = self._iterator or iter(self._tiles), None
        images, labels, indices = [], [], []
        for local in range(self._count):
            tiles = next(iterator)
            images.extend(tiles["image"])
            labels.extend(tiles["label"])
            # This process holds examples process_index, + process_count, ... of the split.
            index = jax.process_index() + local * jax.process_count()
            indices.extend([index] * len(tiles["label"]))
            while len(images) >= self._local_batch:
                yield {"image": np.stack(images[:self._local_batch]),
                       "label": np.stack(labels[:self._local_batch]),
                       "image_index": np.asarray(indices[:self._local_batch], np.int32)}
                del images[:self._local_batch], labels[:self._local_batch]
                del indices[:self._local_batch]
        if images:
            while len(images) < self._local_batch:
                images.append(np.zeros_like(images[0]))
                labels.append(np.full_like(labels[0], self._ignore_label))
                indices.append(-1)
            yield {"image": np.stack(images), "label": np.stack(labels),
                   "image_index": np.asarray(indices, np.int32)}
        self._iterator = iterator

    def close(self) -> None:
        """Stops the loader's worker processes and frees their shared memory."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def eval_batches(source: Sequence[dict[str, Any]], *, batch_size: int, tile_size: int,
                 ignore_label: int = IGNORE_LABEL, downscale: float = 1.0,
                 loader: LoaderOptions | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One pass of ``EvalBatches`` (same arguments): for a single evaluation."""
    return EvalBatches(source, batch_size=batch_size, tile_size=tile_size,
                       ignore_label=ignore_label, downscale=downscale, loader=loader)()


def empty_batch(batch_size: int, tile_size: int,
                ignore_label: int = IGNORE_LABEL) -> dict[str, np.ndarray]:
    """An all-ignored local batch: what a process feeds when it has run out of examples."""
    local_batch = batch_size // jax.process_count()
    return {"image": np.zeros((local_batch, tile_size, tile_size, 3), np.uint8),
            "label": np.full((local_batch, tile_size, tile_size), ignore_label, np.uint8),
            "image_index": np.full((local_batch,), -1, np.int32)}


def normalize_images(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                     dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """uint8 images -> ``(x / 255 - mean) / std`` in ``dtype`` (on device)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)
