"""A training workdir's files: the config it was trained with, its checkpoints, its summary.

Layout of ``WORKDIR`` (written by ``lcseg.train``)::

    config.json      the config (``save_config`` / ``load_config``)
    checkpoints/     Orbax checkpoints (``lcseg.checkpoints``)
    summary.txt      parameters, FLOPs and memory of the model (written at the first step)
    *.json, *.png    evaluation reports and panels; TensorBoard event files

``restore_run`` is what evaluation, prediction and comparison share: the config, the
compiled experiment and the state of one checkpoint. Nothing here imports TensorFlow, so a
bad workdir fails in a second.

A workdir is never damaged by a later command. ``check_folder`` refuses a path that can
never be a folder before anything is made; ``check_config_change`` compares the config a
run was trained with (``config.json``) with the one a new command brings, before anything
is written: a difference in a field outside ``RESUMABLE_FIELDS`` (the model, dataset,
loss, optimiser, schedule, frozen set, augmentation, seed, ...) would make the saved
checkpoints unreadable or mean something else, so it is refused in one line naming the
fields. The allow-list is explicit on purpose: a field added to lcseg later is refused
until someone decides it is harmless.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from configs import default as default_config
from lcseg import checkpoints, parallel
from lcseg.experiment import Experiment, TrainState

CONFIG_FILE = "config.json"

# Fields a resumed run may change: they decide how long training goes and how it is
# watched, read and run, never what the checkpoints hold or what the best one means.
RESUMABLE_FIELDS = (
    "num_train_steps",  # Train longer (or stop sooner); the schedule spans the new total.
    "log_every_steps", "eval_every_steps", "checkpoint_every_steps",  # Cadence.
    "num_panel_images",  # TensorBoard pictures only.
    "eval_batch_size",  # Same tiles, same scores, other batches (padding is ignored).
    "early_stopping_patience",  # When to give up, not what is trained.
    "data.read_threads", "data.read_ahead",  # The same batches, decoded further ahead.
    # Not data.workers: the data iterator's saved position holds one entry per worker
    # process, and grain cannot restore it onto another count.
    "dataset.data_dir", "dataset.manual_dir",  # Where the same dataset is read from.
    "fast_conv",  # The same convolution gradients, computed another way (CPU speed).
    "preemption_signal", "multihost",  # How the job is run.
)
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "summary.txt"


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the config next to the checkpoints (evaluate / predict read it back).

    Written to a temporary name and renamed: a crash never leaves a half-written file.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            f.write(config.to_json(indent=2))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def check_folder(path: str, *, flag: str = "--workdir") -> None:
    """Raises ValueError if ``path`` cannot be (or become) a folder this process writes in.

    Nothing is created: the check walks up to the nearest existing path.

    Args:
      path: a folder that may not exist yet.
      flag: how the user gave it, for the message.
    """
    existing = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder; give a folder "
                         "path (a new one is created).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable; give a folder you can "
                         "write to.")


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = object()  # A field only one of two configs has.


def _short(value: Any, limit: int = 40) -> str:
    text = "(absent)" if value is _ABSENT else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def config_differences(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                       ) -> list[tuple[str, Any, Any]]:
    """The fields whose values differ: ``(dotted name, saved value, new value)``, sorted.

    Values are compared as ``config.json`` holds them (tuples as lists); a field only one
    of the two has differs (its other value is a marker that prints as ``(absent)``).
    """
    old = _flat(json.loads(saved.to_json()))
    new = _flat(json.loads(config.to_json()))
    return [(name, old.get(name, _ABSENT), new.get(name, _ABSENT))
            for name in sorted(set(old) | set(new))
            if old.get(name, _ABSENT) != new.get(name, _ABSENT)]


def check_config_change(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Refuses a config that would change what ``workdir``'s checkpoints mean.

    Call it before anything is written to ``workdir``. A workdir without
    ``config.json``, or without a checkpoint (a run that stopped before its first one:
    nothing depends on its config), accepts any config.

    Args:
      config: the config the new command brings.
      workdir: the run's folder.

    Returns:
      The (resumable) fields that changed, as ``'field: old -> new'`` lines to log.

    Raises:
      ValueError: one line naming the fields that may not change, their values there
        and now, and what to do.
    """
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)) or not _has_checkpoints(workdir):
        return []
    differences = config_differences(load_config(workdir), config)
    refused = [d for d in differences if d[0] not in RESUMABLE_FIELDS]
    if refused:
        listed = "; ".join(f"{name} {_short(old)} there, {_short(new)} now"
                           for name, old, new in refused[:6])
        more = f"; and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ValueError(
            f"{workdir} holds a run trained with another config ({listed}{more}): its "
            "checkpoints would not fit or would mean something else. Use a new --workdir, "
            f"or the config in {os.path.join(workdir, CONFIG_FILE)} (only "
            "num_train_steps, the log/eval/checkpoint cadence, read-ahead and data paths "
            "may change; see RESUMABLE_FIELDS in lcseg/workdir.py).")
    return [f"{name}: {_short(old)} -> {_short(new)}" for name, old, new in differences]


def _has_checkpoints(workdir: str) -> bool:
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with; fields added to lcseg since take defaults."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): restore it from a copy, "
                             "or start the run in a new workdir.") from error

    def merge(defaults: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        merged = dict(defaults)
        for key, value in values.items():
            # config.model holds the chosen model's own options: take it as saved.
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "model":
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value
        return merged

    return ml_collections.ConfigDict(merge(default_config.get_config().to_dict(), saved))


def checkpoint_dir(workdir: str) -> str:
    """Where ``workdir``'s Orbax checkpoints are."""
    return os.path.join(workdir, CHECKPOINT_DIR)


def restore_run(workdir: str, checkpoint: str | int = "best", *,
                config: ml_collections.ConfigDict | None = None, local_devices: bool = False
                ) -> tuple[Experiment, TrainState, int]:
    """The experiment of a workdir and the state of one of its checkpoints.

    Args:
      workdir: a training workdir (``config.json`` and ``checkpoints/``).
      checkpoint: ``'best'``, ``'latest'`` or a step number.
      config: the config to build the experiment from (default: the workdir's own;
        pass a modified ``load_config(workdir)`` to change e.g. the data directory).
      local_devices: build the experiment on this process's devices only (each process
        predicts its own scenes) instead of on every device of every process.

    Returns:
      ``(experiment, state, step)``.

    Raises:
      FileNotFoundError, ValueError: no such workdir or checkpoint.
    """
    config = config if config is not None else load_config(workdir)
    checkpointer = checkpoints.Checkpointer(checkpoint_dir(workdir), read_only=True)
    try:
        step = checkpointer.resolve_step(checkpoint)
        mesh = parallel.make_mesh(jax.local_devices()) if local_devices else None
        experiment = Experiment(config, mesh=mesh)
        state = checkpointer.restore(step, experiment.abstract_state())
    finally:
        checkpointer.close()
    return experiment, state, step
