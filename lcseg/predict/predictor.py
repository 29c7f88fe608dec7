"""The streaming sliding-window predictor.

``Predictor`` predicts a scene top to bottom in fixed-size window batches (one compiled
model function for scenes of any size, sharded over the local devices) and yields rows as
soon as every window covering them is in, so memory is bounded by a band of rows, not by
the scene. Three stages overlap:

* a read-ahead thread reads the input rows the next windows need (``_RowCache``: rows
  already read are reused), cuts the windows (reflected at the scene's borders) and
  stacks them into batches, ``READ_AHEAD_BATCHES`` ahead of the device;
* the device runs the model, weights the windows and sums them into a strip of rows
  (``windows.blend_windows``); rows no later window touches are normalised, classified
  (argmax) and shifted out there (``windows.finish_rows``), so only uint8 classes (and
  the probabilities when asked for) come back;
* the caller takes finished row bands ``FETCH_LAG`` bands behind the device (the
  outputs write them on a thread of their own: ``lcseg.predict.outputs``).

``predict_scene`` predicts a whole image held in memory.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from lcseg import parallel
from lcseg.data.metadata import DatasetMetadata
from lcseg.experiment import Experiment, TrainState, compute_dtype, inference_variables
from lcseg.predict import windows
from lcseg.predict.scenes import Scene, as_scene
from lcseg.workdir import restore_run

#: Seconds between progress log lines when stderr is not a terminal.
PROGRESS_SECONDS = 30.0
#: Window batches prepared ahead of the device.
READ_AHEAD_BATCHES = 2
#: Finished row bands left on the device before the host fetches them (the device
#: works on the next batches meanwhile).
FETCH_LAG = 2


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


class _Progress:
    """Windows done: a tqdm bar on a terminal, else a log line every ``PROGRESS_SECONDS``
    (windows done, rate, ETA), so that batch jobs' logs show how far a scene is."""

    def __init__(self, total: int, name: str, enabled: bool):
        self.total, self.name, self.done = total, name, 0
        self._terminal = enabled and sys.stderr.isatty()
        self._logging = enabled and not self._terminal
        self._bar = tqdm(total=total, unit="window", desc=name, file=sys.stderr,
                         leave=False, disable=not self._terminal)
        self._started = self._logged = time.perf_counter()

    def update(self, count: int) -> None:
        self.done += count
        self._bar.update(count)
        now = time.perf_counter()
        if self._logging and now - self._logged >= PROGRESS_SECONDS:
            self._logged = now
            rate = self.done / max(now - self._started, 1e-9)
            logging.info("%s: %d/%d windows, %.1f windows/s, ETA %.0f s", self.name,
                         self.done, self.total, rate, (self.total - self.done) / rate)

    def close(self) -> None:
        self._bar.close()


def _read_ahead(produce: Iterator[Any], depth: int) -> Iterator[Any]:
    """``produce``'s items, made on a thread of their own up to ``depth`` items ahead
    (reading and cutting windows overlaps the device; GDAL and numpy copies release the
    GIL). Errors are raised where the item would have been."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any, error: BaseException | None = None) -> bool:
        """Queues an item unless the consumer has gone; False if it has."""
        while not stop.is_set():
            try:
                items.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in produce:
                if not offer(item):
                    return
            offer(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer.
            offer(None, error)

    thread = threading.Thread(target=run, name="lcseg-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # Unblock a producer waiting on a full queue.
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


_END = object()


def _reflect_columns(rows: np.ndarray, first: int, stop: int, width: int) -> np.ndarray:
    """Columns ``first..stop-1`` of ``rows [n, width, 3]``, reflected outside the scene.

    The scene's own columns are one slice and only the padding is gathered: a gather of
    every column copies 3 bytes at a time, several times slower.
    """
    parts = []
    if first < 0:
        parts.append(np.take(rows, windows.reflect_indices(np.arange(first, 0), width), 1))
    parts.append(rows[:, max(first, 0):min(stop, width)])
    if stop > width:
        parts.append(np.take(rows, windows.reflect_indices(np.arange(width, stop), width),
                             1))
    return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


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
        # The strip accumulators live on the device, whole on each device (replicated):
        # the windows of a batch are gathered there and added in order.
        self._strip_sharding = parallel.replicated(self.mesh)
        self._blend = jax.jit(functools.partial(windows.blend_windows, weights=self.weights),
                              donate_argnums=(0, 1), out_shardings=self._strip_sharding)
        self._finishers: dict[tuple, Any] = {}
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

    def _new_strip(self, rows: int, columns: int) -> tuple[jax.Array, jax.Array]:
        """Zeroed strip accumulators ``[rows, columns, C]`` and ``[rows, columns]``."""
        key = ("zeros", rows, columns)
        if key not in self._finishers:  # Compiled once per strip shape, like finish_rows.
            self._finishers[key] = jax.jit(
                lambda: (jnp.zeros((rows, columns, self.num_classes), jnp.float32),
                         jnp.zeros((rows, columns), jnp.float32)),
                out_shardings=(self._strip_sharding, self._strip_sharding))
        return self._finishers[key]()

    def _finisher(self, rows: int, columns: int, first_column: int, width: int,
                  probabilities: str) -> Any:
        """The compiled ``finish_rows`` of a strip shape (one per scene width: cheap to
        compile, unlike the model's function, which sees every scene's windows alike)."""
        key = (rows, columns, first_column, width, probabilities)
        if key not in self._finishers:
            self._finishers[key] = jax.jit(
                functools.partial(windows.finish_rows, count=self.stride,
                                  first_column=first_column, width=width,
                                  probabilities=probabilities),
                donate_argnums=(0, 1))
        return self._finishers[key]

    def predict_rows(self, scene: Scene, *, progress: bool = False
                     ) -> Iterator[tuple[int, np.ndarray]]:
        """Predicts ``scene`` top to bottom, yielding rows as soon as they are final.

        Args:
          scene: the input.
          progress: show progress (a bar on a terminal, else a log line now and then).

        Yields:
          ``(first_row, probabilities)``: consecutive bands of rows, float32
          ``[rows, width, C]`` probabilities (the weighted mean over windows and TTA).
        """
        for start, _, probabilities in self.predict_bands(scene, probabilities="float32",
                                                          progress=progress):
            yield start, probabilities

    def _window_batches(self, scene: Scene, cache: _RowCache, tops: np.ndarray,
                        lefts: np.ndarray) -> Iterator[np.ndarray]:
        """uint8 ``[batch, w, w, 3]`` batches of the windows, row of windows by row, each
        left to right; the last batch is padded with zeros."""
        height, width, size = scene.height, scene.width, self.window
        batch = np.zeros((self.batch_size, size, size, 3), np.uint8)
        filled = 0
        for top in tops:
            rows = windows.reflect_indices(np.arange(top, top + size), height)
            low, high = int(rows.min()), int(rows.max()) + 1
            band = cache.get(low, high)
            if not np.array_equal(rows, np.arange(low, high)):  # Reflected rows.
                band = band[rows - low]
            # The whole row of windows' pixels once (reflected columns included); the
            # windows are slices of it.
            strip = _reflect_columns(band, int(lefts[0]), int(lefts[-1]) + size, width)
            for left in lefts:
                start = left - lefts[0]
                batch[filled] = strip[:, start:start + size]
                filled += 1
                if filled == self.batch_size:
                    yield batch
                    # Fresh every time: the device may still read the previous batch.
                    batch = np.zeros_like(batch)
                    filled = 0
        if filled:
            yield batch

    def predict_bands(self, scene: Scene, *, probabilities: str = "none",
                      progress: bool = False
                      ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
        """Predicts ``scene`` top to bottom; blending and the argmax happen on the device.

        Windows are summed on the device into a strip of rows as tall as a window plus the
        strides a batch can span; rows no later window touches are normalised and
        classified there, and only their classes (and probabilities, when asked for) come
        back. Input rows are read and cut into windows on a thread of their own, ahead of
        the device.

        Args:
          scene: the input.
          probabilities: ``'none'``, ``'uint8'`` (``round(255 p)``) or ``'float32'``.
          progress: show progress (a bar on a terminal, else a log line now and then).

        Yields:
          ``(first_row, classes, probabilities)``: consecutive bands of rows, uint8
          ``[rows, width]`` class indices (the argmax, whatever the input's nodata) and
          ``[rows, width, C]`` probabilities (None for ``'none'``).
        """
        if probabilities not in ("none", "uint8", "float32"):
            raise ValueError(f"probabilities must be none, uint8 or float32, got "
                             f"{probabilities!r}")
        height, width, size, stride = scene.height, scene.width, self.window, self.stride
        tops = windows.window_starts(height, size, stride, self.margin)
        lefts = windows.window_starts(width, size, stride, self.margin)
        per_row, total = len(lefts), len(tops) * len(lefts)
        batches = math.ceil(total / self.batch_size)
        # Rows of windows one batch can reach beyond the first unfinished one.
        span = max((min((b + 1) * self.batch_size, total) - 1) // per_row
                   - b * self.batch_size // per_row for b in range(batches))
        strip_rows = size + stride * span
        strip_columns = int(lefts[-1] + size - lefts[0])
        sums, weight_sums = self._new_strip(strip_rows, strip_columns)
        finish = self._finisher(strip_rows, strip_columns, -int(lefts[0]), width,
                                probabilities)
        cache = _RowCache(scene)
        status = _Progress(total, os.path.basename(scene.name), progress)
        pending: collections.deque = collections.deque()
        next_top = 0  # index into tops of the strip's first row of windows

        def fetch() -> tuple[int, np.ndarray, np.ndarray | None] | None:
            first, outputs = pending.popleft()
            arrays = [np.asarray(output) for output in outputs]  # Waits for this band.
            rows = slice(max(0, -first), min(stride, height - first))
            if rows.start >= rows.stop:
                return None
            classes = arrays[0][rows]
            return (first + rows.start, classes,
                    arrays[1][rows] if len(arrays) > 1 else None)

        try:
            produced = _read_ahead(self._window_batches(scene, cache, tops, lefts),
                                   READ_AHEAD_BATCHES)
            for index, batch in enumerate(produced):
                first = index * self.batch_size
                ids = np.arange(first, first + self.batch_size)
                valid = ids < total
                ids = np.minimum(ids, total - 1)
                rows = ((ids // per_row - next_top) * stride).astype(np.int32)
                columns = (lefts[ids % per_row] - lefts[0]).astype(np.int32)
                weighted = self._apply(self._variables,
                                       jax.device_put(batch, self._batch_sharding))
                if weighted.shape[-1] != self.num_classes:
                    raise ValueError(f"The model gives {weighted.shape[-1]} logits per pixel "
                                     f"but {self.metadata.name!r} has {self.num_classes} "
                                     "classes.")
                sums, weight_sums = self._blend(sums, weight_sums, weighted, rows, columns,
                                                valid)
                done = min(first + self.batch_size, total)
                status.update(done - first)
                # Every window of the rows of windows before ``done // per_row`` is in:
                # the rows above the next row of windows are final (after the last row of
                # windows, every row left).
                while next_top < done // per_row:
                    count = 1 if next_top < len(tops) - 1 else math.ceil(
                        (height - int(tops[next_top])) / stride)
                    for step in range(count):
                        sums, weight_sums, *outputs = finish(sums, weight_sums)
                        pending.append((int(tops[next_top]) + step * stride, outputs))
                    next_top += 1
                while len(pending) > FETCH_LAG:
                    if (rows_out := fetch()) is not None:
                        yield rows_out
            while pending:
                if (rows_out := fetch()) is not None:
                    yield rows_out
        finally:
            status.close()
        self.last_stats = {
            "windows": total, "accumulator_rows": strip_rows,
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
