"""The streaming sliding-window predictor.

``Predictor`` predicts a scene top to bottom in fixed-size window batches (one compiled
function for scenes of any size, sharded over the local devices) and yields rows as soon
as every window covering them is in, so memory is bounded by a band of rows, not by the
scene: ``_RowCache`` keeps the input rows the current band of windows needs and
``_RowAccumulator`` the weighted probability sums of the rows windows still cover.
``predict_scene`` predicts a whole image held in memory.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lcseg import parallel
from lcseg.data.metadata import DatasetMetadata
from lcseg.experiment import Experiment, TrainState, compute_dtype, inference_variables
from lcseg.predict import windows
from lcseg.predict.scenes import Scene, as_scene
from lcseg.workdir import restore_run


class _RowCache:
    """The scene rows the current band of windows needs; reuses rows already read."""

    def __init__(self, scene: Scene):
        self.scene = scene
        self.start = 0
        self.rows = np.zeros((0, scene.width, 3), np.uint8)
        self.reads: list[tuple[int, int]] = []

    def get(self, start: int, stop: int) -> np.ndarray:
        cached_stop = self.start + len(self.rows)
        if self.start <= start <= cached_stop:
            kept, read_from = self.rows[start - self.start:], cached_stop
        else:
            kept, read_from = self.rows[:0], start
        if stop > read_from:
            new = np.asarray(self.scene.read_rows(read_from, stop))
            if new.shape != (stop - read_from, self.scene.width, 3) or new.dtype != np.uint8:
                raise ValueError(f"{self.scene.name}: read_rows({read_from}, {stop}) gave "
                                 f"{new.dtype} {new.shape}")
            self.reads.append((read_from, stop))
            kept = np.concatenate([kept, new]) if len(kept) else new
        self.rows, self.start = kept, start
        return self.rows[:stop - start]


class _RowAccumulator:
    """Weighted probability sums (float32) for the scene rows windows still cover.

    Holds rows ``start..`` only: ``pop(until)`` normalises and hands out the rows that no
    later window touches, and drops them.
    """

    def __init__(self, height: int, width: int, num_classes: int, weights: np.ndarray):
        self.height, self.width = height, width
        self.weights = weights
        self.start = 0  # first scene row held
        self.stop = 0  # one past the last row a window has touched
        self._sums = np.zeros((0, width, num_classes), np.float32)
        self._weight_sums = np.zeros((0, width), np.float32)
        self.peak_rows = 0

    def _ensure(self, rows: int) -> None:
        if rows > len(self._sums):
            sums = np.zeros((rows, *self._sums.shape[1:]), np.float32)
            weight_sums = np.zeros((rows, self.width), np.float32)
            sums[:len(self._sums)] = self._sums
            weight_sums[:len(self._sums)] = self._weight_sums
            self._sums, self._weight_sums = sums, weight_sums
            self.peak_rows = rows

    def add(self, top: int, left: int, weighted: np.ndarray) -> None:
        size = weighted.shape[0]
        y0, y1 = max(top, 0), min(top + size, self.height)
        x0, x1 = max(left, 0), min(left + size, self.width)
        if y0 < self.start:
            raise AssertionError(f"window at row {top} touches finished rows (< {self.start})")
        self._ensure(y1 - self.start)
        rows = slice(y0 - self.start, y1 - self.start)
        inside = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        self._sums[rows, x0:x1] += weighted[inside]
        self._weight_sums[rows, x0:x1] += self.weights[inside]
        self.stop = max(self.stop, y1)

    def pop(self, until: int) -> tuple[int, np.ndarray] | None:
        """``(first_row, probabilities)`` of the rows before ``until``, or None if none."""
        start, count = self.start, until - self.start
        if count <= 0:
            return None
        probabilities = self._sums[:count] / self._weight_sums[:count, :, None]
        held = self.stop - start
        keep = max(held - count, 0)
        # Shift the rows still being accumulated to the front (numpy handles the overlap).
        self._sums[:keep] = self._sums[count:count + keep]
        self._weight_sums[:keep] = self._weight_sums[count:count + keep]
        self._sums[keep:held] = 0
        self._weight_sums[keep:held] = 0
        self.start = until
        self.stop = max(self.stop, until)
        return start, probabilities


class Predictor:
    """Sliding-window prediction of whole scenes with a fixed compiled window batch.

    Any Flax linen module works that is called as ``model.apply(variables, images,
    train=False)`` on float ``[N, H, W, 3]`` images and returns logits ``[N, H, W, C]``;
    ``Predictor.from_workdir`` builds one from a training run.

    Attributes:
      metadata: the dataset the model predicts (classes, palette, ignore label).
      window, stride, margin: window side, step between windows, reflect padding.
      batch_size: windows per compiled call (a multiple of the local devices).
      last_stats: figures of the last scene (windows, reads, accumulator rows).
    """

    def __init__(self, model: Any, variables: Any, *, metadata: DatasetMetadata,
                 mean: Sequence[float], std: Sequence[float], window: int,
                 overlap: float = 0.5, batch_size: int = 8, tta: str = "none",
                 dtype: jnp.dtype = jnp.float32, mesh: jax.sharding.Mesh | None = None):
        """Compiles nothing yet; the first batch compiles the window function once.

        Args:
          model: a Flax linen module (see the class docstring).
          variables: its variables (``{'params': ..., 'batch_stats': ...}``).
          metadata: dataset metadata; ``num_classes`` must match the model's logits.
          mean, std: per-channel normalisation of ``[0, 1]`` pixels (as in training).
          window: window side in pixels.
          overlap: fraction of a window shared with the next one, in ``[0, 1)``.
          batch_size: windows per call; rounded up to a multiple of the mesh size.
          tta: ``'none'``, ``'flips'`` or ``'dihedral'``.
          dtype: compute dtype of the normalised images.
          mesh: devices to shard window batches over; default all local devices.
        """
        if window < 1:
            raise ValueError(f"window must be a positive number of pixels, got {window}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        self.metadata = metadata
        self.num_classes = metadata.num_classes
        self.window = int(window)
        self.overlap = float(overlap)
        self.stride = max(1, round(self.window * (1.0 - self.overlap)))
        # Half the overlap of padding: border pixels sit as deep in a window as others.
        self.margin = (self.window - self.stride) // 2
        self.tta = tta
        self.mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
        self.batch_size = math.ceil(max(1, batch_size) / self.mesh.size) * self.mesh.size
        # Looked up on the module, so that a test can swap the weights for uniform ones.
        self.weights = windows.window_weights(self.window)
        self._batch_sharding = parallel.batch_sharding(self.mesh)
        self._variables = jax.device_put(variables, parallel.replicated(self.mesh))
        function = functools.partial(
            windows.weighted_window_probabilities, model=model, mean=tuple(mean),
            std=tuple(std), dtype=dtype, transforms=windows.tta_transforms(tta),
            weights=self.weights)
        self._apply = jax.jit(function,
                              in_shardings=(parallel.replicated(self.mesh), self._batch_sharding),
                              out_shardings=self._batch_sharding)
        self.step: int | None = None
        self.last_stats: dict[str, int] = {}

    @classmethod
    def from_experiment(cls, experiment: Experiment, state: TrainState, *,
                        window: int | None = None, batch_size: int | None = None,
                        overlap: float = 0.5, tta: str = "none") -> Predictor:
        """A predictor for a restored train state of ``experiment`` (on its mesh).

        Args:
          experiment: the run's model, config and mesh.
          state: its train state (the variables evaluation uses: EMA parameters when the
            run keeps them, and BatchNorm statistics).
          window: window side; default ``config.eval_tile_size``.
          batch_size: windows per call; default ``config.eval_batch_size``.
          overlap: see ``Predictor``.
          tta: see ``Predictor``.

        Returns:
          The predictor.
        """
        config = experiment.config
        if config.data.downscale != 1:
            # Predicting full-resolution windows with a model trained on downscaled ones
            # would silently change the ground sampling distance it sees.
            raise ValueError(
                f"This model was trained with config.data.downscale={config.data.downscale}; "
                "whole-scene prediction runs at full resolution only. Resample the scene "
                f"by {config.data.downscale} first (e.g. gdalwarp -tr), then predict.")
        return cls(experiment.model, inference_variables(state),
                   metadata=experiment.metadata, mean=config.dataset.mean,
                   std=config.dataset.std, dtype=compute_dtype(config),
                   window=window or config.eval_tile_size,
                   batch_size=batch_size or config.eval_batch_size, overlap=overlap, tta=tta,
                   mesh=experiment.mesh)

    @classmethod
    def from_workdir(cls, workdir: str, *, checkpoint: str | int = "best",
                     window: int | None = None, batch_size: int | None = None,
                     overlap: float = 0.5, tta: str = "none") -> Predictor:
        """Restores ``checkpoint`` of a training workdir onto this process's devices.

        Args:
          workdir: a training workdir (``config.json`` and ``checkpoints/``).
          checkpoint: ``'best'``, ``'latest'`` or a step number.
          window, batch_size, overlap, tta: see ``from_experiment``.

        Returns:
          The predictor; ``predictor.step`` is the restored step.
        """
        # This process's devices only: each process predicts its own scenes.
        experiment, state, step = restore_run(workdir, checkpoint, local_devices=True)
        predictor = cls.from_experiment(experiment, state, window=window,
                                        batch_size=batch_size, overlap=overlap, tta=tta)
        predictor.step = step
        return predictor

    def predict_rows(self, scene: Scene, *, progress: bool = False
                     ) -> Iterator[tuple[int, np.ndarray]]:
        """Predicts ``scene`` top to bottom, yielding rows as soon as they are final.

        Args:
          scene: the input.
          progress: show a progress bar (on a terminal).

        Yields:
          ``(first_row, probabilities)``: consecutive bands of rows, float32
          ``[rows, width, C]`` probabilities (the weighted mean over windows and TTA).
        """
        height, width, size = scene.height, scene.width, self.window
        tops = windows.window_starts(height, size, self.stride, self.margin)
        lefts = windows.window_starts(width, size, self.stride, self.margin)
        columns = windows.reflect_indices(np.arange(lefts[0], lefts[-1] + size), width)
        cache = _RowCache(scene)
        accumulator = _RowAccumulator(height, width, self.num_classes, self.weights)
        total = len(tops) * len(lefts)

        def window_images() -> Iterator[tuple[int, int, np.ndarray]]:
            for top in tops:
                rows = windows.reflect_indices(np.arange(top, top + size), height)
                low, high = int(rows.min()), int(rows.max()) + 1
                strip = cache.get(low, high)[rows - low][:, columns]
                for left in lefts:
                    start = left - lefts[0]
                    yield int(top), int(left), strip[:, start:start + size]

        in_flight: collections.deque = collections.deque()
        done = 0
        bar = tqdm(total=total, unit="window", desc=os.path.basename(scene.name),
                   disable=None if progress else True, file=sys.stderr, leave=False)

        def collect() -> tuple[int, np.ndarray] | None:
            nonlocal done
            positions, result = in_flight.popleft()
            weighted = np.asarray(result)  # Waits for this batch only.
            if weighted.shape[-1] != self.num_classes:
                raise ValueError(f"The model gives {weighted.shape[-1]} logits per pixel but "
                                 f"{self.metadata.name!r} has {self.num_classes} classes.")
            for (top, left), window_probabilities in zip(positions, weighted):
                accumulator.add(top, left, window_probabilities)
            done += len(positions)
            bar.update(len(positions))
            # Every window of the rows before the next window's row is in: those rows
            # are final.
            next_row = done // len(lefts)
            final = (height if next_row >= len(tops)
                     else min(max(int(tops[next_row]), 0), height))
            return accumulator.pop(final)

        positions, images = [], []
        try:
            for index, (top, left, image) in enumerate(window_images()):
                positions.append((top, left))
                images.append(image)
                if len(images) < self.batch_size and index < total - 1:
                    continue
                # Fresh every time: the device may still read the previous batch's memory.
                batch = np.zeros((self.batch_size, size, size, 3), np.uint8)
                batch[:len(images)] = np.stack(images)
                in_flight.append((positions, self._apply(
                    self._variables, jax.device_put(batch, self._batch_sharding))))
                positions, images = [], []
                # One batch computes while the host accumulates the previous one.
                while len(in_flight) > 1:
                    if (rows := collect()) is not None:
                        yield rows
            while in_flight:
                if (rows := collect()) is not None:
                    yield rows
        finally:
            bar.close()
        self.last_stats = {
            "windows": total, "accumulator_rows": accumulator.peak_rows,
            "read_calls": len(cache.reads),
            "rows_read": sum(stop - start for start, stop in cache.reads),
            "max_rows_per_read": max((stop - start for start, stop in cache.reads), default=0)}

    def predict_probabilities(self, scene: Scene, *, progress: bool = False) -> np.ndarray:
        """Predicts ``scene`` whole: ``predict_rows`` collected into one array.

        For scenes held in memory anyway (evaluation, LoveDA's 1024x1024 images); files
        of any size go through ``predict_rows`` and are written as rows finish.

        Args:
          scene: the input.
          progress: show a progress bar (on a terminal).

        Returns:
          float32 ``[height, width, C]`` probabilities.
        """
        probabilities = np.empty((scene.height, scene.width, self.num_classes), np.float32)
        for start, rows in self.predict_rows(scene, progress=progress):
            probabilities[start:start + len(rows)] = rows
        return probabilities


def predict_scene(predictor: Predictor, image: np.ndarray | Scene, *,
                  valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Predicts a whole image held in memory (or a ``Scene``).

    Args:
      predictor: the predictor.
      image: uint8 ``[H, W, 3]``, or a scene.
      valid: optional bool ``[H, W]``, False where the image has no data.

    Returns:
      ``(classes, probabilities)``: uint8 ``[H, W]`` class indices (the ignore label where
      not valid) and float32 ``[H, W, C]`` probabilities (as predicted, everywhere).
    """
    scene = as_scene(image, valid)
    probabilities = predictor.predict_probabilities(scene)
    classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
    mask = scene.valid_rows(0, scene.height)
    if mask is not None:
        classes[~mask] = predictor.metadata.ignore_label
    return classes, probabilities
