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

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from lcseg.data.augment import Augment, AugmentOptions, resize_example
from lcseg.data.metadata import IGNORE_LABEL


def pad_to_at_least(image: np.ndarray, label: np.ndarray, height: int, width: int,
                    ignore_label: int = IGNORE_LABEL) -> tuple[np.ndarray, np.ndarray]:
    """Pads image (zeros) and label (ignore) at the bottom/right to at least height x width."""
    pad_h, pad_w = max(height - label.shape[0], 0), max(width - label.shape[1], 0)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_label)
    return image, label


def train_iterator(source: Sequence[dict[str, Any]], *, batch_size: int, crop_size: int,
                   seed: int, workers: int = 0, ignore_label: int = IGNORE_LABEL,
                   augment: Mapping[str, Any] | AugmentOptions | None = None,
                   downscale: float = 1.0) -> grain.DatasetIterator:
    """An endless iterator of this process's training batches (``image``, ``label``, uint8).

    Args:
      source: random-access examples (``lcseg.data.open_split``).
      batch_size: the global batch size (split evenly across processes).
      crop_size: side of the square random crops.
      seed: shuffling and augmentation seed (the same on every process).
      workers: grain worker processes; 0 prepares batches in the main process.
      ignore_label: label for padded pixels.
      augment: ``config.augment`` (ops and options, see ``lcseg.data.augment``); None:
        random crop and flips.
      downscale: resize factor applied to each example before augmentation.

    Returns:
      A grain iterator; ``get_state``/``set_state`` (and Orbax) checkpoint its position.
    """
    # Built before any data is read, so a bad config fails at once, not in a worker.
    augmentation = Augment(AugmentOptions.from_config(augment), crop_size=crop_size,
                           ignore_label=ignore_label, downscale=downscale)
    process_count = jax.process_count()
    if batch_size % process_count:
        raise ValueError(f"config.batch_size={batch_size} is not divisible by the "
                         f"{process_count} processes.")
    dataset = grain.MapDataset.source(source).seed(seed)
    # Shuffle before repeat: grain draws a new permutation for every epoch.
    dataset = dataset.shuffle().repeat()
    dataset = dataset.random_map(augmentation)
    # Each process takes every process_count-th element of the one global stream (lazily:
    # it reads only its own). Global batch k then holds the same examples, with the same
    # crops, whatever the number of processes, so results do not depend on the cluster.
    dataset = dataset[jax.process_index()::process_count]
    dataset = dataset.batch(batch_size // process_count, drop_remainder=True)
    iter_dataset = dataset.to_iter_dataset()
    if workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(iter_dataset)


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


def eval_batches(source: Sequence[dict[str, Any]], *, batch_size: int, tile_size: int,
                 ignore_label: int = IGNORE_LABEL,
                 downscale: float = 1.0) -> Iterator[dict[str, np.ndarray]]:
    """This process's evaluation batches: every pixel of its examples exactly once.

    Args:
      source: random-access examples.
      batch_size: global batch size (each process yields ``batch_size / process_count``).
      tile_size: side of the square tiles.
      ignore_label: label of padding (not counted by metrics).
      downscale: resize factor applied to each example before tiling; metrics are then
        computed at that resolution.

    Yields:
      ``{'image': uint8 [b, t, t, 3], 'label': uint8 [b, t, t]}``; the last batch is
      completed with all-ignored tiles.
    """
    local_batch = batch_size // jax.process_count()
    images, labels = [], []
    for index in range(jax.process_index(), len(source), jax.process_count()):
        example = source[index]
        for image, label in image_tiles(example["image"], example["label"], tile_size,
                                        ignore_label, downscale=downscale):
            images.append(image)
            labels.append(label)
            if len(images) == local_batch:
                yield {"image": np.stack(images), "label": np.stack(labels)}
                images, labels = [], []
    if images:
        while len(images) < local_batch:
            images.append(np.zeros_like(images[0]))
            labels.append(np.full_like(labels[0], ignore_label))
        yield {"image": np.stack(images), "label": np.stack(labels)}


def empty_batch(batch_size: int, tile_size: int,
                ignore_label: int = IGNORE_LABEL) -> dict[str, np.ndarray]:
    """An all-ignored local batch: what a process feeds when it has run out of examples."""
    local_batch = batch_size // jax.process_count()
    return {"image": np.zeros((local_batch, tile_size, tile_size, 3), np.uint8),
            "label": np.full((local_batch, tile_size, tile_size), ignore_label, np.uint8)}


def normalize_images(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                     dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """uint8 images -> ``(x / 255 - mean) / std`` in ``dtype`` (on device)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)
