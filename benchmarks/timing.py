"""The benchmarks' step timer: median seconds per call over repeated timed runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def median_seconds_per_step(step_fn: Callable[[], Any], steps: int, repeats: int) -> float:
    """Median over ``repeats`` runs of ``steps`` calls of ``step_fn`` (blocking at the end).

    ``step_fn`` is called with no arguments (a closure carries any state from one call to
    the next) and returns what to block on; compile and warm it up before timing.
    """
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            result = step_fn()
        jax.block_until_ready(result)
        timings.append((time.perf_counter() - start) / steps)
    return statistics.median(timings)
