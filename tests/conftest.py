"""Shared test setup: 4 fake CPU devices, parsed absl flags, one prepared synthetic dataset."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# One persistent XLA compilation cache for the whole session, this process and every
# process the tests start (they inherit the environment): the suite compiles the same
# tiny models' steps many times over (each Experiment jits afresh, each main.py run is a
# new process), and on 2 CPU cores compilation is most of the suite's time. Executables
# are keyed by their program, compile options and devices, so a hit is the same program;
# host-callback programs are never cached. Set before jax is imported, which reads them.
# A child process that imports this module (a spawned worker) keeps its parent's cache.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _XLA_CACHE_DIR = tempfile.mkdtemp(prefix="lcseg-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE_DIR
    _CREATOR_PID = os.getpid()

    @atexit.register
    def _remove_xla_cache() -> None:
        if os.getpid() == _CREATOR_PID:  # Forked children inherit atexit handlers.
            shutil.rmtree(_XLA_CACHE_DIR, ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Four CPU devices in this process, so data-parallel code paths run for real. Subprocesses
# started by tests get their own count (one unless they say otherwise).
jax.config.update("jax_num_cpu_devices", 4)
# (In case a plugin imported jax before the environment above was set.)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
# XLA:CPU compiles threefry's parameter initialisation slowly (seconds per model); the
# 'rbg' generator compiles in a fraction of that. Tests compare runs with each other, not
# with fixed random values, so the generator does not matter to what they check.
jax.config.update("jax_default_prng_impl", "rbg")
TEST_ENV = {"JAX_DEFAULT_PRNG_IMPL": "rbg"}

# grain worker processes and absl-based code read flags; tests have none to parse.
flags.FLAGS.mark_as_parsed()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> str:
    """A TFDS data dir with the synthetic dataset prepared (once per test session)."""
    from lcseg.data import prepare_dataset

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_dataset("synthetic", data_dir)
    return data_dir


def run_python(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """Runs ``python ARGS`` from the repository root with a clean JAX device setup."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    full_env.update(TEST_ENV)
    full_env.update(env or {})
    result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=full_env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
