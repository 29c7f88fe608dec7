"""Predicting a region: shares of the input list, skipping finished scenes, run summaries.

The same ``python -m lcseg.predict`` command runs on N processes (one host or many, a
job array or one multi-process job); each predicts its own share of the input list:

* ``resolve_shard`` decides which share this process is: jax.distributed's process index
  and count when it runs, else ``--shard=I/N``, else a SLURM job array
  (``SLURM_ARRAY_TASK_ID`` / ``SLURM_ARRAY_TASK_COUNT``) or a Kubernetes indexed Job
  (``JOB_COMPLETION_INDEX``, with the count given as ``--shard=/N``), else the whole list.
* ``assign_shares`` splits the sorted input list into N shares of about equal pixel
  counts (sizes from the file headers), the same on every process: every scene is
  predicted by exactly one of them, whatever order they start in.
* ``predict_share`` predicts a share scene by scene, skipping scenes whose outputs are
  complete and were made by the same model, checkpoint and options (their provenance
  tags, ``lcseg.provenance``), recording scenes that cannot be read instead of stopping
  (unless ``fail_fast``), and stopping between row blocks when asked (``StopCheck``: a
  stop signal to this process or, under jax.distributed, to any of them);
  ``RunSummary`` is what it did, written as JSON beside the outputs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import heapq
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import rasterio
from absl import logging
from jax._src import distributed as jax_distributed
from PIL import Image

from lcseg.predict.outputs import PredictionStopped, predict_file, read_provenance
from lcseg.predict.predictor import Predictor
from lcseg.predict.scenes import GEOTIFF_SUFFIXES
from lcseg.preemption import StopSignal
from lcseg.provenance import utc_now

# Run summaries: ``lcseg-run-<index>-of-<count>.json`` in the output folder.
SUMMARY_PREFIX = "lcseg-run-"
# Header reads of the input list: I/O bound (a network file system), so threads.
HEADER_THREADS = 16
# Errors that mean a scene cannot be read or predicted as given (corrupt file, wrong
# bands or bit depth, unreadable tile): the scene is recorded as failed and the run goes
# on. Anything else (a bug, a device failure) ends the run.
SCENE_ERRORS = (ValueError, OSError, rasterio.errors.RasterioError)
# With jax.distributed, a stop signal to one process stops them all: it leaves this key in
# the coordinator's key-value store, which the others read every STOP_POLL_SECONDS (a
# collective between row blocks would tie the processes' unequal shares together).
STOP_KEY = "lcseg_predict_stop"
STOP_POLL_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's share of the input list: share ``index`` of ``count``.

    Attributes:
      index, count: 0 <= index < count.
      source: where they came from (for messages): 'jax.distributed', '--shard',
        'SLURM job array', 'Kubernetes indexed Job' or 'one process'.
    """

    index: int
    count: int
    source: str

    @property
    def name(self) -> str:
        """``'00003-of-00010'``: sorts in index order in file listings."""
        return f"{self.index:05d}-of-{self.count:05d}"


def _parse_shard(text: str) -> tuple[int | None, int]:
    """``'I/N'`` -> (I, N); ``'/N'`` -> (None, N)."""
    message = (f"--shard={text!r}: give I/N (this process predicts share I of N, "
               "0 <= I < N), or /N to take I from the job array's environment.")
    index, slash, count = text.strip().partition("/")
    if not slash or not count.strip().isdigit() or (index.strip()
                                                    and not index.strip().isdigit()):
        raise ValueError(message)
    parsed_count = int(count)
    parsed_index = int(index) if index.strip() else None
    if parsed_count < 1 or (parsed_index is not None and parsed_index >= parsed_count):
        raise ValueError(message)
    return parsed_index, parsed_count


def _slurm_array_index(environ: Mapping[str, str]) -> tuple[int, int] | None:
    """(index, count) of a SLURM array task, counted from 0 whatever the array's ids."""
    if "SLURM_ARRAY_TASK_ID" not in environ or "SLURM_ARRAY_TASK_COUNT" not in environ:
        return None
    task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
    # --array=1-10 or --array=0-20:2: ids need not start at 0 nor be consecutive.
    first = int(environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    step = int(environ.get("SLURM_ARRAY_TASK_STEP", "1")) or 1
    index, rest = divmod(task - first, step)
    if rest or not 0 <= index < count:
        raise ValueError(
            f"SLURM_ARRAY_TASK_ID={task} is not one of {count} evenly spaced ids from "
            f"{first} (step {step}): use a plain range (#SBATCH --array=0-{count - 1}) or "
            "give --shard=I/N.")
    return index, count


def resolve_shard(*, shard: str | None = None, shard_count: int | None = None,
                  process: tuple[int, int] | None = None,
                  environ: Mapping[str, str] | None = None) -> Shard:
    """Which share of the input list this process predicts.

    Args:
      shard: ``--shard``: ``'I/N'``, or ``'/N'`` (the count of a Kubernetes indexed Job,
        whose index comes from ``JOB_COMPLETION_INDEX``).
      shard_count: ``--shard_count`` (the same as ``--shard=/N``).
      process: ``(process_index, process_count)`` when jax.distributed runs with several
        processes (then neither ``shard`` nor a count may be given).
      environ: the environment (default ``os.environ``).

    Returns:
      The shard.

    Raises:
      ValueError: conflicting or malformed settings, naming them.
    """
    environ = os.environ if environ is None else environ
    index, count = _parse_shard(shard) if shard else (None, None)
    if shard_count is not None:
        if shard_count < 1 or (count is not None and count != shard_count):
            raise ValueError(f"--shard_count={shard_count} must be a positive count (and "
                             f"agree with --shard={shard}).")
        count = shard_count
    if process is not None and process[1] > 1:
        if count is not None:
            raise ValueError(f"--shard/--shard_count with jax.distributed ({process[1]} "
                             "processes): the processes share the input list by themselves; "
                             "give no --shard.")
        return Shard(process[0], process[1], "jax.distributed")
    if index is not None:
        return Shard(index, count, "--shard")
    if count is not None:
        if "JOB_COMPLETION_INDEX" in environ:
            index = int(environ["JOB_COMPLETION_INDEX"])
            if not 0 <= index < count:
                raise ValueError(f"JOB_COMPLETION_INDEX={index} is not below the count "
                                 f"{count} (--shard=/{count}): give the Job's completions.")
            return Shard(index, count, "Kubernetes indexed Job")
        array = _slurm_array_index(environ)
        if array is not None:
            if array[1] != count:
                raise ValueError(f"--shard=/{count} but the SLURM array has {array[1]} tasks.")
            return Shard(*array, "SLURM job array")
        raise ValueError(f"--shard=/{count} gives the count only, and no JOB_COMPLETION_INDEX "
                         "or SLURM_ARRAY_TASK_ID is set: give --shard=I/N.")
    array = _slurm_array_index(environ)
    if array is not None:
        return Shard(*array, "SLURM job array")
    if "JOB_COMPLETION_INDEX" in environ:
        raise ValueError("JOB_COMPLETION_INDEX is set (a Kubernetes indexed Job) but not the "
                         "Job's size: give --shard=/N with N its completions.")
    return Shard(0, 1, "one process")


def scene_pixels(path: str | os.PathLike) -> int:
    """Width x height of a scene from its header (rasterio for GeoTIFF, Pillow otherwise).

    Returns:
      The pixel count; 0 if the header cannot be read (the scene still goes to a share,
      whose process reports why it cannot be predicted).
    """
    try:
        if Path(path).suffix.lower() in GEOTIFF_SUFFIXES:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(path) as dataset:
                    return dataset.width * dataset.height
        with Image.open(path) as image:
            return image.width * image.height
    except (*SCENE_ERRORS, SyntaxError, Image.DecompressionBombError):
        return 0


def assign_shares(paths: Sequence[Path], pixels: Sequence[int], count: int
                  ) -> list[list[Path]]:
    """Splits scenes into ``count`` shares of about equal pixel counts.

    Largest scene first, each to the share with the fewest pixels so far (ties: the
    lowest share), within a share in input order. Deterministic given the inputs, so
    every process computes the same split.

    Args:
      paths: the scenes, sorted (``resolve_inputs`` sorts).
      pixels: their sizes (``scene_pixels``).
      count: the number of shares.

    Returns:
      ``count`` lists of paths; together every path exactly once.
    """
    order = sorted(range(len(paths)), key=lambda i: (-pixels[i], str(paths[i])))
    heap = [(0, share) for share in range(count)]
    members: list[list[int]] = [[] for _ in range(count)]
    for i in order:
        total, share = heapq.heappop(heap)
        members[share].append(i)
        heapq.heappush(heap, (total + max(pixels[i], 1), share))
    return [[paths[i] for i in sorted(share)] for share in members]


def share_of(paths: Sequence[Path], shard: Shard) -> tuple[list[Path], dict[Path, int]]:
    """This shard's scenes and their pixel counts (headers read on several threads).

    Returns:
      ``(scenes, pixels)``: the share in input order, and every input's pixel count.
    """
    if shard.count == 1:
        with concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
            return list(paths), dict(zip(paths, pool.map(scene_pixels, paths)))
    with concurrent.futures.ThreadPoolExecutor(HEADER_THREADS) as pool:
        sizes = list(pool.map(scene_pixels, paths))
    shares = assign_shares(paths, sizes, shard.count)
    return shares[shard.index], dict(zip(paths, sizes))


def classes_output(path: Path, output_dir: Path) -> Path:
    """The classes file ``predict_file`` writes for scene ``path`` (renamed into place last,
    so its presence means the scene is complete)."""
    suffix = ".tif" if path.suffix.lower() in GEOTIFF_SUFFIXES else ".png"
    return output_dir / f"{path.stem}_classes{suffix}"


def is_complete(path: Path, output_dir: Path, record: Mapping[str, str]) -> bool:
    """Whether scene ``path``'s outputs are complete and were made as ``record`` says.

    Every key of ``record`` (lcseg version, model, config hash, checkpoint step, the
    prediction options) must match the classes file's provenance tags; keys only in the
    file (e.g. when it was made) do not matter. Plain-image outputs (PNG) carry no tags:
    they are never taken as complete.
    """
    found = read_provenance(classes_output(path, output_dir))
    return found is not None and all(found.get(key) == str(value)
                                     for key, value in record.items())


class StopCheck:
    """``should_stop`` of a share: True once this process received a stop signal or, with
    jax.distributed running, once any process did.

    Shared (a context manager): a watcher thread announces this process's signal in the
    coordinator's key-value store at once (not only at the next row block, which may be
    seconds away) and reads the others' every ``STOP_POLL_SECONDS``; calling the check
    costs no network round trip.

    Attributes:
      reason: why it says stop (``'SIGTERM'``, ``'SIGUSR1 (another process)'``), or None.
    """

    def __init__(self, stop: StopSignal, *, shared: bool = False):
        """Args:
          stop: this process's stop signal handlers (entered).
          shared: share stop requests with the other jax.distributed processes.
        """
        self.stop = stop
        # JAX has no public API for its key-value store; training's per-step collectives
        # do not fit processes that run unequal shares.
        self._client = jax_distributed.global_state.client if shared else None
        self._remote: str | None = None
        self._done = threading.Event()
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopCheck:
        if self._client is not None:
            self._watcher = threading.Thread(target=self._watch, name="lcseg-stop-watcher",
                                             daemon=True)
            self._watcher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        if self._watcher is not None:
            self._watcher.join()

    def _watch(self) -> None:
        polled = -math.inf
        while not self._done.wait(0.05):
            if self.stop.received is not None:
                try:
                    self._client.key_value_set(STOP_KEY, self.stop.received.name)
                except Exception as error:  # noqa: BLE001 - this process stops anyway.
                    logging.warning("Could not tell the other processes to stop: %s", error)
                return
            if time.monotonic() - polled >= STOP_POLL_SECONDS:
                polled = time.monotonic()
                try:
                    remote = self._client.key_value_try_get(STOP_KEY)
                except Exception:  # noqa: BLE001 - NOT_FOUND: nobody asked to stop.
                    continue
                logging.warning("Another process received %s: stopping at the next row "
                                "block.", remote)
                self._remote = remote
                return

    @property
    def reason(self) -> str | None:
        if self.stop.received is not None:
            return self.stop.received.name
        return f"{self._remote} (another process)" if self._remote else None

    def __call__(self) -> bool:
        return self.reason is not None


@dataclasses.dataclass
class RunSummary:
    """What one process did with its share (``write`` saves it as JSON).

    Attributes:
      shard: the share.
      provenance: the record the outputs were made with.
      scenes: the share's scene count.
      done: ``{'scene', 'pixels', 'seconds', 'outputs'}`` per scene predicted.
      skipped: ``{'scene', 'pixels'}`` per scene already complete with this provenance.
      failed: ``{'scene', 'reason'}`` per scene that could not be predicted.
      stopped: the reason the run stopped early (a signal), else None.
    """

    shard: Shard
    provenance: Mapping[str, str]
    scenes: int = 0
    done: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    failed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: str | None = None
    started: str = dataclasses.field(default_factory=utc_now)
    _start_time: float = dataclasses.field(default_factory=time.perf_counter, repr=False)

    def as_dict(self) -> dict[str, Any]:
        seconds = time.perf_counter() - self._start_time
        predicted = sum(entry["pixels"] for entry in self.done)
        predicting = sum(entry["seconds"] for entry in self.done)
        return {
            "shard": self.shard.index, "shard_count": self.shard.count,
            "shard_source": self.shard.source, "host": socket.gethostname(),
            "pid": os.getpid(), "started": self.started, "finished": utc_now(),
            "seconds": round(seconds, 3), "scenes": self.scenes,
            "complete": self.stopped is None and not self.failed,
            "stopped": self.stopped,
            "counts": {"done": len(self.done), "skipped": len(self.skipped),
                       "failed": len(self.failed)},
            "pixels": {"done": predicted,
                       "skipped": sum(entry["pixels"] for entry in self.skipped)},
            "megapixels_per_second": round(predicted / predicting / 1e6, 4)
            if predicting else None,
            "provenance": dict(self.provenance),
            "done": self.done, "skipped": self.skipped, "failed": self.failed,
        }

    def path(self, output_dir: str | os.PathLike) -> Path:
        return Path(output_dir) / f"{SUMMARY_PREFIX}{self.shard.name}.json"

    def write(self, output_dir: str | os.PathLike) -> Path:
        """Writes ``lcseg-run-<index>-of-<count>.json`` atomically (temporary name, then
        rename); returns its path."""
        path = self.path(output_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.partial")
        with open(temporary, "w") as f:
            json.dump(self.as_dict(), f, indent=1)
            f.write("\n")
        os.replace(temporary, path)
        return path


class _Progress:
    """One log line per scene (works in logs, where progress bars do not): scene i/N,
    its rate, the share's rate and the time left (from the pixels left)."""

    def __init__(self, pixels: Sequence[int]):
        self.total = len(pixels)
        self.pixels_left = sum(pixels)
        self.count = 0
        self.predicted = 0
        self.seconds = 0.0
        self.skipped = 0  # consecutive skipped scenes not logged yet

    def skip(self, pixels: int) -> None:
        """A scene already done: counted, logged with its neighbours (a rerun of a large
        region would otherwise log a line per finished scene)."""
        self.count += 1
        self.pixels_left -= pixels
        self.skipped += 1

    def flush(self) -> None:
        if self.skipped:
            logging.info("scenes %d-%d/%d: %d already done (same model and options), "
                         "skipped", self.count - self.skipped + 1, self.count, self.total,
                         self.skipped)
            self.skipped = 0

    def scene(self, name: str, pixels: int, seconds: float | None, what: str) -> None:
        self.flush()
        self.count += 1
        self.pixels_left -= pixels
        if seconds is None:  # failed
            logging.info("scene %d/%d %s: %s", self.count, self.total, name, what)
            return
        self.predicted += pixels
        self.seconds += seconds
        rate = self.predicted / max(self.seconds, 1e-9)
        eta = self.pixels_left / rate if rate else 0.0
        logging.info("scene %d/%d %s: %s, %.2f Mpx in %.1f s (%.2f Mpx/s; share %.2f Mpx/s, "
                     "ETA %s)", self.count, self.total, name, what, pixels / 1e6, seconds,
                     pixels / max(seconds, 1e-9) / 1e6, rate / 1e6,
                     datetime.timedelta(seconds=round(eta)))


def predict_share(predictor: Predictor, scenes: Sequence[Path], output_dir: str | os.PathLike,
                  *, summary: RunSummary, pixels: Mapping[Path, int],
                  failed: Mapping[Path, str] | None = None, fail_fast: bool = False,
                  should_stop: Callable[[], bool] | None = None,
                  **options: Any) -> RunSummary:
    """Predicts the scenes of a share that are not complete yet; fills ``summary``.

    Args:
      predictor: the predictor.
      scenes: the share, in order.
      output_dir: where the outputs go.
      summary: what the run did (its ``provenance`` is written into the outputs and
        decides which scenes are already complete).
      pixels: each scene's pixel count (progress and the summary).
      failed: scenes already known not to be predictable, with the reason (from a check
        before the model was loaded): recorded, not tried.
      fail_fast: stop at the first failed scene.
      should_stop: checked between row blocks; True stops the run (``summary.stopped``)
        with the scene in progress left out entirely.
      **options: ``predict_file``'s output options (probabilities, bands, stretch,
        polygons, polygon_format, polygon_min_area).

    Returns:
      ``summary``.
    """
    output_dir = Path(output_dir)
    failed = failed or {}
    summary.scenes = len(scenes)
    progress = _Progress([pixels.get(path, 0) for path in scenes])
    for path in scenes:
        if should_stop is not None and should_stop():  # (a signal between two scenes)
            summary.stopped = "stop signal"
            break
        size = pixels.get(path, 0)
        if path in failed:
            summary.failed.append({"scene": str(path), "reason": failed[path]})
            progress.scene(str(path), size, None, f"failed: {failed[path]}")
        elif is_complete(path, output_dir, summary.provenance):
            summary.skipped.append({"scene": str(path), "pixels": size})
            progress.skip(size)
            continue
        else:
            started = time.perf_counter()
            try:
                written = predict_file(predictor, path, output_dir,
                                       provenance=summary.provenance,
                                       should_stop=should_stop, **options)
            except PredictionStopped:
                summary.stopped = "stop signal"
                logging.warning("%s: stopped on a signal; nothing of it was kept.", path)
                break
            except SCENE_ERRORS as error:
                reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
                summary.failed.append({"scene": str(path), "reason": reason})
                logging.error("%s could not be predicted (%s); going on with the others.",
                              path, reason)
                progress.scene(str(path), size, None, "failed")
            else:
                seconds = time.perf_counter() - started
                summary.done.append({"scene": str(path), "pixels": size,
                                     "seconds": round(seconds, 3),
                                     "outputs": [str(p) for p in written.values()]})
                progress.scene(str(path), size, seconds, "done")
                continue
        if fail_fast and summary.failed:
            logging.error("--fail_fast: stopping at the first failed scene.")
            break
    progress.flush()
    return summary


def read_summaries(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The run summaries in ``output_dir`` (unreadable ones skipped), in name order."""
    summaries = []
    for path in sorted(Path(output_dir).glob(f"{SUMMARY_PREFIX}*.json")):
        try:
            with open(path) as f:
                summaries.append(json.load(f))
        except (OSError, ValueError):
            logging.warning("%s is not a readable run summary: ignored.", path)
    return summaries


def unfinished_shares(output_dir: str | os.PathLike) -> list[str]:
    """What keeps a region from being finalized: shares without a run summary, or whose
    last run stopped before the end of its share (each as a sentence).

    The share count is the newest summary's (an older run with another count left its
    summaries too). No summary at all: nothing to check (outputs made another way).
    """
    summaries = read_summaries(output_dir)
    if not summaries:
        return []
    count = max(summaries, key=lambda s: s.get("finished", ""))["shard_count"]
    by_index = {s["shard"]: s for s in summaries if s.get("shard_count") == count}
    problems = [f"share {i} of {count} has no run summary (not run yet, or still running)"
                for i in range(count) if i not in by_index]
    problems += [f"share {i} of {count} stopped ({by_index[i]['stopped']}) before its end"
                 for i in sorted(by_index) if by_index[i].get("stopped")]
    return problems
