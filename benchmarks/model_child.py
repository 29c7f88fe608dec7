"""Runs one row of ``benchmarks/models.py`` in a child process and returns its figures.

A child per model keeps each model's peak memory its own (and a crash of one row from
ending the others). Used by ``models.py`` itself, ``gpu_check.py`` and
``input_pipeline.py`` (the step demand a loader must meet).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS)
RESULT_PREFIX = "@@"


def measure(row: str, *, size: int, batch: int, steps: int, half_precision: str = "auto",
            dataset: str = "synthetic", tiny: bool = False,
            timeout: float | None = None) -> dict[str, Any]:
    """``models.py --child=row``'s JSON, or ``{'row': row, 'error': why}``.

    Args:
      row: a row of ``models.ROWS``.
      size, batch, steps: image side, global batch and timed steps (median).
      half_precision: 'auto' (bfloat16 on accelerators), 'true' or 'false'.
      dataset: the dataset whose class count the head gets.
      tiny: the tests' tiny widths (smoke runs).
      timeout: seconds before the child is stopped.
    """
    args = [sys.executable, os.path.join(BENCHMARKS, "models.py"), f"--child={row}",
            f"--size={size}", f"--batch={batch}", f"--steps={steps}",
            f"--half_precision={half_precision}", f"--dataset={dataset}",
            f"--tiny={str(tiny).lower()}"]
    try:
        child = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"row": row, "error": f"over its {timeout:.0f} s time limit"}
    lines = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode or not lines:
        last = child.stderr.strip().splitlines()[-1:] or [f"exit {child.returncode}"]
        return {"row": row, "error": last[0][:300]}
    return json.loads(lines[-1][len(RESULT_PREFIX):])
