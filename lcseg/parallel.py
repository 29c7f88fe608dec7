"""Data parallelism: the device mesh, batch sharding and multi-host start-up.

Training is single-device code under ``jax.jit``; the batch is sharded along a 1-D mesh
axis ``'data'`` that spans every device of every host, parameters are replicated, and XLA
inserts the gradient all-reduce. The same code runs on one CPU, eight GPUs or many hosts.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def _cluster_job_detected() -> bool:
    """Whether SLURM, Open MPI or an explicit launcher announce several processes.

    ``jax.distributed.initialize()`` reads the same variables to find its coordinator.
    """
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def initialize_multihost(enabled: bool | None = None) -> None:
    """Starts JAX's multi-process runtime when asked to or when a cluster job is detected.

    Args:
      enabled: True to always initialise (``config.multihost``), False never, None to
        initialise only inside a multi-process SLURM / Open MPI job or when
        ``JAX_COORDINATOR_ADDRESS`` is set.
    """
    if enabled is None:
        enabled = _cluster_job_detected()
    if enabled and not jax.distributed.is_initialized():
        env = os.environ
        # SLURM and Open MPI are detected by JAX itself; a plain launcher sets
        # JAX_COORDINATOR_ADDRESS (read by JAX) plus these two (read here).
        jax.distributed.initialize(
            num_processes=int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None,
            process_id=int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None)
        logging.info("Multi-host: process %d of %d, %d local / %d global devices",
                     jax.process_index(), jax.process_count(), jax.local_device_count(),
                     jax.device_count())


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D ``('data',)`` mesh over ``devices`` (default: all devices of all processes).

    Auto axis types: under the Explicit default, ``jnp.bincount`` (the confusion matrix)
    on a sharded batch raises a ShardingTypeError.
    """
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``'data'``, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of the global batch; errors if it does not divide evenly."""
    if global_batch_size % jax.device_count():
        raise ValueError(f"config.batch_size={global_batch_size} must be a multiple of the "
                         f"number of devices ({jax.device_count()}).")
    return global_batch_size // jax.process_count()


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's numpy batch into one global array sharded on ``'data'``."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in batch.items()}


def is_main_process() -> bool:
    return jax.process_index() == 0


def all_processes_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a host-level all-gather when multi-host)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def any_process_true(flag: bool) -> bool:
    """Whether ``flag`` holds on at least one process."""
    return not all_processes_true(not flag)


def sync(name: str) -> None:
    """A barrier across processes (no-op on one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)

