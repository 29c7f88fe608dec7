"""lcseg.compare: every cell of the speed/accuracy table checked against the runs' own files.

Two tiny runs of different widths (and batch sizes) are trained once for the module; the
tests read them with the library and with ``python -m lcseg.compare``, and recompute each
number independently: parameters from the model, scores from the eval JSON, speed from
the TensorBoard events (through TensorBoard's other reader).
"""

import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from lcseg import checkpoints, compare, parallel, train
from lcseg.data import get_metadata, open_split
from lcseg.experiment import Experiment
from lcseg.models import create_model
from lcseg.models.summary import step_summary
from lcseg.ops import fast_conv
from lcseg.workdir import load_config
from tests.conftest import run_python
from tests.test_train import tiny_config

SYNTHETIC_CLASSES = list(get_metadata("synthetic").class_names)
LOVEDA_CLASSES = list(get_metadata("loveda").class_names)


@pytest.fixture(scope="module")
def runs(synthetic_data_dir, tmp_path_factory):
    """Two tiny runs on 4 devices: 'narrow' (channels 4,8; batch 4), 'wide' (8,16; batch 8).

    Each trains 6 steps, evaluating and checkpointing at 3 and 6.
    """
    base = tmp_path_factory.mktemp("compare")
    workdirs = {}
    for name, overrides in (("narrow", {}),
                            ("wide", {"model.channels": (8, 16), "batch_size": 8})):
        workdirs[name] = str(base / name)
        train.train_and_evaluate(tiny_config(synthetic_data_dir, **overrides), workdirs[name])
    return workdirs


def copy_run(workdir, destination):
    shutil.copytree(workdir, destination)
    return str(destination)


def eval_report(workdir, split, step):
    with open(os.path.join(workdir, "eval", f"{split}-{step}.json")) as f:
        return json.load(f)


def expected_parameters(workdir):
    """Trainable and total (with BatchNorm statistics) parameters of the config's model."""
    config = load_config(workdir)
    model = create_model(**config.model, num_classes=get_metadata(config.dataset.name).num_classes)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    params, batch_stats = (sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
                           for tree in (shapes["params"], shapes["batch_stats"]))
    return params, params + batch_stats


def expected_images_per_s(workdir, batch_size):
    """Global batch / mean step time, the step times read with the plain accumulator."""
    accumulator = event_accumulator.EventAccumulator(
        workdir, size_guidance={event_accumulator.TENSORS: 0})
    accumulator.Reload()
    events = accumulator.Tensors("timing/step_seconds")
    steps = [e.step for e in events]
    seconds = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    # Each value is the mean over the steps since the previous logged step.
    interval_steps = np.diff([0, *steps])
    assert len(steps) >= 3 and np.all(interval_steps > 0)
    mean_step = np.sum(np.multiply(seconds, interval_steps)) / steps[-1]
    return batch_size / mean_step


def parse_markdown(text):
    """{dataset: (header, rows)} of every markdown table in ``text``."""
    tables, dataset = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            dataset = line[4:].split(":")[0]
        elif line.startswith("|") and dataset and not line.startswith("| --- |"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if dataset not in tables:
                tables[dataset] = (cells, [])
            else:
                tables[dataset][1].append(cells)
    return tables


# ---------------------------------------------------------------------------------------


def test_every_cell_matches_the_runs_own_files(runs, synthetic_data_dir):
    comparison = compare.compare_runs([runs["narrow"], runs["wide"]])
    assert comparison.messages == [] and comparison.skipped == []
    assert [r.name for r in comparison.runs] == ["narrow", "wide"]
    train_examples = len(open_split("synthetic", "train", synthetic_data_dir))
    text = compare.format_comparison(comparison, split="validation", checkpoint="best")
    header, rows = parse_markdown(text)["synthetic"]
    column = {name: index for index, name in enumerate(header)}
    assert header[-len(SYNTHETIC_CLASSES) - 1:-1] == SYNTHETIC_CLASSES

    for run, row, batch_size in zip(comparison.runs, rows, (4, 8)):
        workdir = run.workdir
        assert row[column["run"]] == run.name
        assert run.dataset == "synthetic" and run.batch_size == batch_size
        assert run.model == {"narrow": "unet (4,8)", "wide": "unet (8,16)"}[run.name]
        # Parameters: counted from the model the config builds.
        trainable, total = expected_parameters(workdir)
        assert (run.params_trainable, run.params_total) == (trainable, total)
        assert row[column["params (trainable / total)"]] == f"{trainable:,} / {total:,}"
        # The device the run recorded (conftest: 4 fake CPU devices).
        assert run.devices == f"4 x {jax.devices()[0].device_kind}"
        assert row[column["devices"]] == run.devices
        # GFLOPs and memory: as summary.txt records them.
        with open(os.path.join(workdir, "summary.txt")) as f:
            figures = dict(pair.split(" ") for pair in
                           f.read().split("): ")[1].splitlines()[0].split(", "))
        assert run.gflops_per_image == pytest.approx(float(figures["gflops_per_image"]))
        assert run.activation_mib == pytest.approx(float(figures["temp_gib"]) * 1024)
        # Speed: from the TensorBoard step times, the batch and the training split.
        images_per_s = expected_images_per_s(workdir, batch_size)
        assert run.images_per_s == pytest.approx(images_per_s, rel=1e-6)
        assert row[column["train images/s"]] == f"{images_per_s:.4g}"
        # An epoch: every training image, config.data.crops_per_image crops of each.
        with open(os.path.join(workdir, "config.json")) as f:
            crops = json.load(f)["data"].get("crops_per_image", 1)
        epoch_seconds = train_examples * crops / images_per_s
        assert run.seconds_per_epoch == pytest.approx(epoch_seconds, rel=1e-6)
        assert row[column["s/epoch"]] == f"{epoch_seconds:.4g}"
        # Scores: the validation report of the best checkpoint, class by class.
        checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                                read_only=True)
        assert run.step == checkpointer.best_step()
        report = eval_report(workdir, "validation", run.step)
        assert report["split"] == "validation" and report["step"] == run.step
        assert run.miou == report["miou"] and run.mean_f1 == report["mean_f1"]
        assert row[column["mIoU"]] == f"{report['miou']:.4f}"
        assert row[column["mean F1"]] == f"{report['mean_f1']:.4f}"
        for name in SYNTHETIC_CLASSES:
            value = report["iou"][name]
            assert run.iou[name] == value
            assert row[column[name]] == ("n/a" if value is None else f"{value:.4f}")


def test_gflops_per_image_do_not_depend_on_the_device_count(runs):
    """The run's figure (4 devices) matches the same step compiled for one device.

    FLOPs are counted on the whole (lowered) step: a figure counted per device would
    be 4x too small for the run.
    """
    run, = compare.compare_runs([runs["narrow"]]).runs
    config = load_config(runs["narrow"])
    experiment = Experiment(config, mesh=parallel.make_mesh(jax.devices()[:1]))
    size = config.crop_size
    batch = parallel.shard_batch({"image": np.zeros((4, size, size, 3), np.uint8),
                                  "label": np.zeros((4, size, size), np.uint8)},
                                 experiment.mesh)
    state = experiment.init_state()
    one_device = step_summary(experiment.lower_for_flops(state, batch),
                                    experiment.train_step.lower(state, batch).compile(),
                                    batch_size=4)["gflops_per_image"]
    assert run.gflops_per_image == pytest.approx(one_device, rel=0.05)


def test_flops_are_those_of_xla_convolutions_whatever_fast_conv_does(synthetic_data_dir,
                                                                      monkeypatch):
    """fast_conv's chunk loops would be counted once by XLA: summaries count plain convs.

    The plain-convolution step's count is the reference (XLA counts a convolution as
    2 * output pixels * kernel area * input * output channels). Small chunks make the
    tiny model's weight gradients loop, as a real model's do at 512x512.
    """
    monkeypatch.setattr(fast_conv, "_WHOLE_BYTES", 0)
    monkeypatch.setattr(fast_conv, "_CHUNK_BYTES", 1 << 12)
    monkeypatch.setattr(fast_conv, "_MIN_CHUNK_PIXELS", 64)
    def flops(fast_conv, lower):
        config = tiny_config(synthetic_data_dir, fast_conv=fast_conv, crop_size=64)
        experiment = Experiment(config, mesh=parallel.make_mesh(jax.devices()[:1]))
        batch = parallel.shard_batch({"image": np.zeros((2, 64, 64, 3), np.uint8),
                                      "label": np.zeros((2, 64, 64), np.uint8)},
                                     experiment.mesh)
        state = experiment.init_state()
        lowered = lower(experiment)(state, batch)
        return step_summary(lowered, lowered.compile(), batch_size=2)["gflops_per_step"]

    plain = flops("off", lambda e: e.train_step.lower)
    # The premise: at this size the fast step's loops hide FLOPs from the analysis.
    assert flops("on", lambda e: e.train_step.lower) < 0.95 * plain
    assert flops("on", lambda e: e.lower_for_flops) == pytest.approx(plain, rel=1e-6)


def test_latest_checkpoint_and_split_pick_their_own_report(runs, tmp_path):
    """``--checkpoint latest`` reads the latest step's report, ``best`` the best one's.

    The copy gets a later, worse checkpoint (step 9, its validation report made up), so
    latest and best differ whatever the tiny run's scores were.
    """
    workdir = copy_run(runs["narrow"], tmp_path / "narrow")
    best = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    read_only=True).best_step()
    shutil.copytree(os.path.join(workdir, "checkpoints", "6"),
                    os.path.join(workdir, "checkpoints", "9"))
    with open(os.path.join(workdir, "checkpoints", "9", "metrics", "metrics"), "w") as f:
        json.dump({"miou": -1.0}, f)
    report = eval_report(workdir, "validation", 6)
    report.update(step=9, miou=0.125, iou={name: 0.125 for name in SYNTHETIC_CLASSES})
    with open(os.path.join(workdir, "eval", "validation-9.json"), "w") as f:
        json.dump(report, f)

    latest, = compare.compare_runs([workdir], checkpoint="latest").runs
    assert latest.step == 9 and latest.miou == 0.125 and latest.iou["water"] == 0.125
    best_run, = compare.compare_runs([workdir], checkpoint="best").runs
    assert best_run.step == best != 9
    assert best_run.miou == eval_report(workdir, "validation", best)["miou"] != 0.125
    # A split the run never evaluated: no scores, whatever the validation reports say.
    test_run, = compare.compare_runs([workdir], split="test").runs
    assert test_run.miou is None and test_run.iou == {} and test_run.step == best


def test_evaluate_fills_a_missing_report_and_says_how_otherwise(runs, tmp_path):
    workdir = copy_run(runs["wide"], tmp_path / "wide")
    comparison = compare.compare_runs([workdir], split="test")
    run, = comparison.runs
    assert run.miou is None and run.eval_path is None
    assert comparison.messages == [
        f"{workdir}: no test evaluation of checkpoint best (step {run.step}); run "
        f"`python -m lcseg.evaluate --workdir {workdir} --split test --checkpoint best` or "
        "pass --evaluate."]
    _, rows = parse_markdown(compare.format_comparison(
        comparison, split="test", checkpoint="best"))["synthetic"]
    assert rows[0][-len(SYNTHETIC_CLASSES) - 3:-1] == ["n/a"] * (len(SYNTHETIC_CLASSES) + 2)

    comparison = compare.compare_runs([workdir], split="test", evaluate=True)
    run, = comparison.runs
    assert comparison.messages == []
    report = eval_report(workdir, "test", run.step)
    assert run.eval_path == os.path.join(workdir, "eval", f"test-{run.step}.json")
    assert report["split"] == "test" and run.miou == report["miou"]
    assert run.iou == report["iou"]


def test_runs_on_two_datasets_get_a_table_each(runs, tmp_path):
    """A run of another dataset (a copy relabelled as LoveDA) gets its own table."""
    workdir = copy_run(runs["narrow"], tmp_path / "loveda_run")
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    config["dataset"]["name"] = "loveda"
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    for name in os.listdir(os.path.join(workdir, "eval")):
        path = os.path.join(workdir, "eval", name)
        with open(path) as f:
            report = json.load(f)
        # LoveDA has one class more: the report names its classes, the last one absent.
        values = [*report["iou"].values(), None]
        report["iou"] = dict(zip(LOVEDA_CLASSES, values))
        with open(path, "w") as f:
            json.dump(report, f)

    comparison = compare.compare_runs([runs["narrow"], workdir, runs["wide"]])
    assert comparison.messages == [
        "The runs are on 2 datasets (synthetic: narrow, wide; loveda: loveda_run): one table "
        "per dataset; speed and accuracy compare only within a table."]
    tables = parse_markdown(compare.format_comparison(comparison, split="validation",
                                                      checkpoint="best"))
    assert list(tables) == ["synthetic", "loveda"]
    assert [row[0] for row in tables["synthetic"][1]] == ["narrow", "wide"]
    header, (row,) = tables["loveda"]
    assert header[-len(LOVEDA_CLASSES) - 1:-1] == LOVEDA_CLASSES
    loveda, = [r for r in comparison.runs if r.dataset == "loveda"]
    for name in LOVEDA_CLASSES:
        value = loveda.iou[name]
        assert row[header.index(name)] == ("n/a" if value is None else f"{value:.4f}")
    assert row[header.index("agriculture")] == "n/a"  # absent: null in the report
    # No LoveDA data here: the epoch time is unknown, not made up.
    assert loveda.train_examples is None and row[header.index("s/epoch")] == "n/a"


def test_pareto_front_table_and_plot():
    def run(name, images_per_s, miou):
        return compare.Run(workdir=f"/runs/{name}", name=name, dataset="synthetic",
                           model="unet", batch_size=4, images_per_s=images_per_s, miou=miou,
                           eval_path=None if miou is None else "x.json")

    runs = [run("fast", 100.0, 0.5), run("accurate", 50.0, 0.7), run("slow", 40.0, 0.6),
            run("fast_worse", 100.0, 0.4), run("fastest", 200.0, 0.1),
            run("unscored", 300.0, None)]
    front = compare.pareto_front(runs)
    assert [r.name for r in front] == ["fastest", "fast", "accurate"]
    header, rows = compare.table_rows(runs, "synthetic")
    assert [row[header.index("Pareto")] for row in rows] == ["yes", "yes", "", "", "yes", ""]
    assert "fastest (200 images/s, mIoU 0.1000), fast (100 images/s" in compare.conclusion(runs)

    figure = compare.comparison_figure(runs, title="t")
    axes, = figure.axes
    labels = {text.get_text() for text in axes.texts}
    assert labels == {"fast", "accurate", "slow", "fast_worse", "fastest"}
    collections = {c.get_label(): c.get_offsets() for c in axes.collections}
    np.testing.assert_array_equal(collections["Pareto front"],
                                  [[200.0, 0.1], [100.0, 0.5], [50.0, 0.7]])
    assert len(collections["run"]) == 5
    assert "Pareto front" in [t.get_text() for t in axes.get_legend().get_texts()]


def test_command_line_prints_tables_writes_files_and_reports_bad_input(runs, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README").write_text("not a run")
    unevaluated = copy_run(runs["narrow"], tmp_path / "unevaluated")
    shutil.rmtree(os.path.join(unevaluated, "eval"))
    best = checkpoints.Checkpointer(os.path.join(unevaluated, "checkpoints"),
                                    read_only=True).best_step()
    output = tmp_path / "out"
    result = run_python(["-m", "lcseg.compare", runs["narrow"], str(notes), unevaluated,
                         runs["wide"], "--output", str(output)], check=False)
    # One folder was not a run: exit status 1, but every other row is printed.
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    messages = [line for line in result.stderr.splitlines() if line.startswith("compare: ")]
    assert messages == [
        f"compare: {notes} has no config.json: it is not a training workdir; pass folders "
        "given to `python main.py --workdir`.",
        f"compare: {unevaluated}: no validation evaluation of checkpoint best (step {best}); run "
        f"`python -m lcseg.evaluate --workdir {unevaluated} --split validation "
        "--checkpoint best` or pass --evaluate."]
    header, rows = parse_markdown(result.stdout)["synthetic"]
    assert [row[0] for row in rows] == ["narrow", "unevaluated", "wide"]
    assert rows[1][header.index("mIoU")] == "n/a"

    # The library gives the same rows; the CSV holds them at full precision.
    expected = compare.compare_runs([runs["narrow"], unevaluated, runs["wide"]]).runs
    with open(output / "comparison-synthetic.csv") as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == ["narrow", "unevaluated", "wide"]
    for record, run in zip(records, expected):
        for key, value in (("params_trainable", run.params_trainable),
                           ("params_total", run.params_total), ("step", run.step),
                           ("batch_size", run.batch_size)):
            assert int(record[key]) == value
        for key, value in (("train_images_per_s", run.images_per_s),
                           ("seconds_per_epoch", run.seconds_per_epoch),
                           ("gflops_per_image", run.gflops_per_image),
                           ("miou", run.miou), ("mean_f1", run.mean_f1),
                           *((f"iou/{name}", run.iou.get(name)) for name in SYNTHETIC_CLASSES)):
            assert (record[key] == "") if value is None else (float(record[key]) == value), key
        assert record["devices"] == run.devices
    front = {r.name for r in compare.pareto_front(expected)}
    assert {r["run"] for r in records if r["pareto"] == "True"} == front != set()
    with open(output / "comparison-synthetic.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(output / "comparison.md") as f:
        assert f.read().strip() in result.stdout
