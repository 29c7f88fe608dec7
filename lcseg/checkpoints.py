"""Everything Orbax, behind one small interface.

A checkpoint holds the train state (params, batch_stats, optimizer state, step, rng)
and, for training, the grain iterator's position. Two are kept: the latest (so a run
resumes where it stopped) and the best by validation mIoU. Orbax's ``max_to_keep`` with
``best_fn`` would delete the *newest* checkpoint whenever its metric is worse, breaking
resume; the preservation policy below keeps both instead.

Saving is asynchronous; ``wait()`` blocks until the last save is on disk and re-raises
any failure of a background save, so a failed save is never silent. Orbax writes each
checkpoint into a temporary folder and renames it when complete: a crash mid-save
leaves the previous checkpoints intact.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from lcseg import optim
from lcseg.tracker import upgrade_tracker

BEST_METRIC = "miou"

# Orbax's default "replica-parallel" save (on every platform but JAX_PLATFORMS=gpu/cuda)
# cuts each replicated array into one slice per replica with an eagerly dispatched
# ``jax.lax.slice_in_dim``: one XLA compilation per distinct array shape, on each
# process's first save, blocking the training loop (52 s for 350 parameter shapes on 4
# CPU devices; ``python benchmarks/checkpoint_save.py``). It pays off for huge sharded
# models; lcseg's parameters are replicated and at most a few hundred MB, so each array
# is written whole from its first replica instead (by the process that holds it).
# Otherwise Orbax's default handler: its array metadata store is what restores PRNG keys
# as keys (Orbax exports no public name for it, nor for the registry below).
# Registered on the registry itself to pass ignore_warnings: register_type_handler would log
# 'Type handler registry type ... overriding jax.Array' at every import, in every loader
# worker too, before any log filter exists there.
type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(
    jax.Array,
    ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                   array_metadata_store=array_metadata_store.Store()),
    override=True, ignore_warnings=True)


class Checkpointer:
    """Saves and restores lcseg checkpoints in ``directory``."""

    def __init__(self, directory: str, *, read_only: bool = False):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=1),
            checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                                      n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn makes Orbax write the metrics with each checkpoint and rank by them.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda metrics: metrics[BEST_METRIC],
            best_mode="max", create=not read_only, read_only=read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest saved validation mIoU, or None if none has metrics."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def resolve_step(self, which: str | int) -> int:
        """``'latest'``, ``'best'`` or a step number -> an existing step (clear errors)."""
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {self.directory}: train first, or check "
                                    "--workdir.")
        if which == "latest":
            return self.latest_step()
        if which == "best":
            step = self.best_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint in {self.directory} has validation "
                                        f"metrics; available steps: {steps}")
            return step
        try:
            step = int(which)
        except ValueError:
            raise ValueError(f"--checkpoint must be 'best', 'latest' or a step number, got "
                             f"{which!r}") from None
        if step not in steps:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; "
                                    f"available: {steps}")
        return step

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None,
             *, metrics: dict[str, float] | None = None,
             normalisation: dict[str, list[float]] | None = None) -> None:
        """Starts saving ``state`` (and the iterator position) at ``step`` in the background.

        Args:
          step: training step the state has reached.
          state: the train state pytree.
          data_iterator: training iterator whose position to save with it.
          metrics: validation metrics of this state (``miou`` ranks the best checkpoint).
          normalisation: the input ``mean``/``std`` the model was trained with, stored in
            the checkpoint's metadata so that it travels with the weights.
        """
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True,
                           custom_metadata={"normalisation": normalisation or {}})
        # Orbax's own lines are hidden by default (lcseg.cli): say where it goes, once.
        logging.info("Saving the checkpoint of step %d to %s", step,
                     os.path.join(self.directory, str(step)))

    def normalisation(self, step: int) -> dict[str, list[float]]:
        """The input normalisation saved with ``step`` (empty if none was saved)."""
        metadata = self._manager.metadata(step)
        return dict((metadata.custom_metadata or {}).get("normalisation", {}))

    def restore(self, step: int, target: Any,
                data_iterator: grain.DatasetIterator | None = None) -> Any:
        """Restores the state of ``step`` onto ``target``'s shapes, dtypes and shardings.

        ``target`` may be abstract (``jax.ShapeDtypeStruct`` leaves with shardings), which
        is how a checkpoint written on N devices is restored on M. If ``data_iterator`` is
        given, its position is restored in place.
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if hasattr(x, "shape") else x, target)
        # Checkpoints of older lcseg versions lack tracker entries added since: restore
        # without them, then fill them in.
        saved = ocp.StandardCheckpointer().metadata(
            os.path.join(self.directory, str(step), "state")).item_metadata.tree
        if isinstance(saved, dict) and "opt_state" in saved and hasattr(abstract, "opt_state"):
            # A clear error when config.frozen (or the optimiser) changed since the save.
            optim.check_saved_optimizer_state(saved["opt_state"], abstract.opt_state)
        tracker = getattr(abstract, "tracker", None)
        missing = ([key for key in tracker if key not in saved.get("tracker", {})]
                   if isinstance(tracker, dict) and isinstance(saved, dict) else [])
        if missing:
            abstract = abstract.replace(tracker={key: value for key, value in tracker.items()
                                                 if key not in missing})
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iterator is not None:
            items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = restored["state"]
        if missing:
            logging.info("Checkpoint %d predates tracker entries %s: filled in.", step, missing)
            filled = upgrade_tracker(jax.device_get(state.tracker))
            state = state.replace(tracker={
                key: jax.device_put(filled[key], tracker[key].sharding) for key in tracker})
        return state

    def wait(self) -> None:
        """Blocks until pending saves finish; raises if a background save failed."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()

    def close(self) -> None:
        self._manager.close()


def parameter_counts(directory: str, step: int) -> tuple[int, int]:
    """Trainable and total (+ BatchNorm statistics) parameters of a saved train state.

    Reads only the checkpoint's metadata (shapes), not the arrays.
    """
    path = os.path.join(directory, str(step), "state")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree

    def count(subtree: Any) -> int:
        leaves = [leaf for leaf in jax.tree.leaves(subtree) if hasattr(leaf, "shape")]
        return int(sum(math.prod(leaf.shape) for leaf in leaves))

    trainable = count(tree["params"])
    return trainable, trainable + count(tree.get("batch_stats") or {})
