"""A training workdir's files: the config it was trained with, its checkpoints, its summary.

Layout of ``WORKDIR`` (written by ``lcseg.train``)::

    config.json      the config (``save_config`` / ``load_config``)
    checkpoints/     Orbax checkpoints (``lcseg.checkpoints``)
    summary.txt      parameters, FLOPs and memory of the model (written at the first step)
    *.json, *.png    evaluation reports and panels; TensorBoard event files

``restore_run`` is what evaluation, prediction and comparison share: the config, the
compiled experiment and the state of one checkpoint. Nothing here imports TensorFlow, so a
bad workdir fails in a second.
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
CHECKPOINT_DIR = "checkpoints"
SUMMARY_FILE = "summary.txt"


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the config next to the checkpoints (evaluate / predict read it back)."""
    path = os.path.join(workdir, CONFIG_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(temporary, path)  # Never a half-written config.


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
