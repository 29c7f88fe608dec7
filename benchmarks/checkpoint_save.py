"""Blocking time of a process's first checkpoint save: Orbax's replica-parallel default vs lcseg's.

    python benchmarks/checkpoint_save.py [--devices 4] [--arrays 350]

Saves a pytree of ``--arrays`` small float32 arrays of distinct shapes (as a model's
parameters are), replicated over ``--devices`` CPU devices (as lcseg's data-parallel
state is), with ``lcseg.checkpoints.Checkpointer``, three times each in two fresh child
processes: Orbax's default ``ArrayHandler`` (replica-parallel: every array is sliced per
replica by an eagerly compiled XLA slice) and the handler lcseg registers
(``use_replica_parallel=False``). Prints the blocking time of ``save`` (what the training
loop waits for) and the time until the save is on disk, first and later saves apart:
the slices are compiled once per shape and process, so the first save is the one that
stalls, after every start or resume.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_integer("devices", 4, "CPU devices the state is replicated over.")
flags.DEFINE_integer("arrays", 350, "Arrays in the pytree, each of its own shape.")
flags.DEFINE_integer("saves", 3, "Saves per handler (the first one compiles).")

CHILD = """
import json, sys, tempfile, time
import jax, numpy as np
jax.config.update("jax_num_cpu_devices", {devices})
import orbax.checkpoint as ocp
from lcseg import parallel
from lcseg.checkpoints import Checkpointer
if {orbax_default}:  # Undo lcseg's registration: Orbax's own default handler.
    from orbax.checkpoint._src.metadata import array_metadata_store
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            array_metadata_store=array_metadata_store.Store()), override=True)
replicated = parallel.replicated(parallel.make_mesh())
rng = np.random.default_rng(0)
tree = {{f"a{{i}}": jax.device_put(rng.random((8, i + 1), np.float32), replicated)
        for i in range({arrays})}}
rows = []
for _ in range({saves}):
    checkpointer = Checkpointer(tempfile.mkdtemp())
    start = time.perf_counter()
    checkpointer.save(1, tree)
    blocking = time.perf_counter() - start
    checkpointer.wait()
    rows.append((blocking, time.perf_counter() - start))
print(json.dumps(rows))
"""


def run_child(orbax_default: bool) -> list[tuple[float, float]]:
    code = CHILD.format(devices=FLAGS.devices, arrays=FLAGS.arrays, saves=FLAGS.saves,
                        orbax_default=orbax_default)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = REPO_ROOT
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, check=True, cwd=tempfile.gettempdir())
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    rows = {"Orbax default (replica-parallel)": run_child(True),
            "lcseg (use_replica_parallel=False)": run_child(False)}
    print(f"{FLAGS.arrays} replicated float32 arrays of distinct shapes on {FLAGS.devices} "
          f"CPU devices; seconds ({time.perf_counter() - start:.0f} s in all)")
    print()
    print("| handler | first save: blocking | first: on disk | later saves: blocking |")
    print("|---|---:|---:|---:|")
    for name, saves in rows.items():
        later = max(blocking for blocking, _ in saves[1:]) if len(saves) > 1 else float("nan")
        print(f"| {name} | {saves[0][0]:.2f} | {saves[0][1]:.2f} | {later:.2f} |")


if __name__ == "__main__":
    app.run(main)
