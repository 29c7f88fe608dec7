"""The GPU check and the input-pipeline benchmark run end to end (small sizes, CPU)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

BENCHMARKS = os.path.join(REPO_ROOT, "benchmarks")


def _run(script, *args, timeout=300):
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_check_smoke_measures_every_section(tmp_path):
    stdout = _run("gpu_check.py", "--smoke", "--models=unet", "--notorch",
                  f"--output={tmp_path}")
    with open(tmp_path / "gpu_check.json") as f:
        results = json.load(f)
    peak = results["device"]["peak_tflops"]
    assert peak > 0
    model, = results["models"]
    assert "error" not in model, model
    assert model["row"] == "unet" and model["parameters"] > 0
    for kind, flops in (("train", "gflops_per_image"),
                        ("inference", "predict_gflops_per_image")):
        assert model[f"{kind}_images_per_s"] > 0 and model[flops] > 0
        assert model[f"{kind}_mfu"] == pytest.approx(
            model[flops] * model[f"{kind}_images_per_s"] / 1e3 / peak)
    # Training does more work per image than inference (backward pass).
    assert model["gflops_per_image"] > 2 * model["predict_gflops_per_image"]
    loaders = {r["dataset"]: r for r in results["loader"]}
    assert set(loaders) == {"deepglobe", "loveda", "landcoverai"}
    for dataset, crops in (("deepglobe", 8), ("loveda", 4), ("landcoverai", 1)):
        row = loaders[dataset]
        assert "error" not in row, row
        assert row["crops_per_image"] == crops and row["crops_per_s"] > 0
        assert row["loader_over_step"] == pytest.approx(
            row["crops_per_s"] / model["train_images_per_s"])
    assert "| unet | 878 |" in stdout
    with open(tmp_path / "gpu_check.md") as f:
        assert f.read().strip() in stdout


def test_input_pipeline_reads_prepared_fake_downloads_in_both_schemes():
    stdout = _run("input_pipeline.py", "--small", "--datasets=deepglobe", "--workers=0",
                  "--seconds=0.5", "--step_model=")
    rows = [line.split("|")[1:-1] for line in stdout.splitlines()
            if line.startswith("| deepglobe |")]
    # The config's 8 crops per image, then one crop per image (the old scheme).
    assert [int(row[2]) for row in rows] == [8, 1]
    for row in rows:
        crops_per_s, decodes_per_s, ratio = (float(row[i]) for i in (4, 5, 6))
        assert crops_per_s > 0 and decodes_per_s > 0
        assert ratio == pytest.approx(crops_per_s / decodes_per_s, rel=0.05, abs=0.01)
