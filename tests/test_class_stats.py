"""Tests for lcseg.class_stats (pixel counting, report, CLI) and visualize.confusion_heatmap."""

import os
import subprocess
import sys

import numpy as np
import pytest

from lcseg import class_stats, visualize
from lcseg.data import count_class_pixels, get_metadata

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference_counts(labels, num_classes, ignore_label):
    flat = np.concatenate([np.ravel(label) for label in labels])
    counts = np.array([(flat == c).sum() for c in range(num_classes)], np.int64)
    return counts, int((flat == ignore_label).sum())


def test_count_class_pixels_matches_numpy_reference():
    rng = np.random.default_rng(0)
    labels = []
    for shape in [(5, 7), (3, 4), (6, 6)]:
        label = rng.integers(0, 3, shape).astype(np.uint8)  # class 3 of 4 never occurs
        label[rng.random(shape) < 0.2] = 255
        labels.append(label)
    source = [{"label": label, "id": f"ex{i}"} for i, label in enumerate(labels)]
    calls = []
    counts, ignored = count_class_pixels(
        source, 4, 255, progress=lambda done, total: calls.append((done, total)))
    expected_counts, expected_ignored = _reference_counts(labels, 4, 255)
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, expected_counts)
    assert counts[3] == 0
    assert ignored == expected_ignored > 0
    assert counts.sum() + ignored == sum(label.size for label in labels)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_count_class_pixels_rejects_stray_labels():
    source = [{"label": np.array([[0, 1], [7, 255]], np.uint8), "id": "bad"}]
    with pytest.raises(ValueError, match=r"'bad'.*\[7\]"):
        count_class_pixels(source, 4, 255)


def test_format_report_lists_counts_and_weights():
    counts = np.array([10, 30, 60, 0])
    weights = class_stats.scheme_weights(counts)
    report = class_stats.format_report(["a", "bb", "ccc", "dddd"], counts, 25, weights)
    assert "60.0000%" in report and "ignored" in report and "20.0000%" in report  # 25/125
    for scheme in weights:
        assert scheme in report
    assert "n/a" in class_stats.format_report(["a", "b", "c", "d"], counts, None, {})


# synthetic_data_dir: the session-wide prepared synthetic dataset (tests/conftest.py).
def test_cli_recount_end_to_end(synthetic_data_dir, tmp_path):
    output = tmp_path / "charts" / "stats.png"
    result = subprocess.run(
        [sys.executable, "-m", "lcseg.class_stats", "--dataset=synthetic",
         f"--data_dir={synthetic_data_dir}", "--split=train", f"--output={output}", "--recount"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "recount matches the counts recorded at preparation" in result.stdout
    for name in get_metadata("synthetic").class_names:
        assert name in result.stdout
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_uses_recorded_counts_and_default_output(synthetic_data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = class_stats.run("synthetic", "train", synthetic_data_dir)
    assert "recorded at preparation (fast path" in report
    assert (tmp_path / "class_stats_synthetic_train.png").exists()
    with pytest.raises(ValueError, match="no split 'bogus'"):
        class_stats.run("synthetic", "bogus", synthetic_data_dir)


def test_row_normalize_hand_values():
    normalised = visualize.row_normalize(np.array([[3, 1], [0, 0]]))
    np.testing.assert_allclose(normalised, [[0.75, 0.25], [0.0, 0.0]])
    with pytest.raises(ValueError, match="square"):
        visualize.row_normalize(np.zeros((2, 3)))


def test_confusion_heatmap_renders_distinct_images():
    names = ["water", "forest", "urban"]
    first = visualize.confusion_heatmap(np.diag([5, 6, 7]), names, title="diagonal")
    second = visualize.confusion_heatmap(np.ones((3, 3)), names)
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    assert min(first.shape[:2]) >= 200
    assert first.shape == second.shape
    assert not np.array_equal(first, second)
    with pytest.raises(ValueError, match="3 class names"):
        visualize.confusion_heatmap(np.eye(2), names)
