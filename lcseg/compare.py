"""The speed/accuracy table of several training runs, from what the runs wrote.

    python -m lcseg.compare runs/unet runs/unet_skinny [--split validation|test]
        [--checkpoint best|latest] [--output DIR] [--evaluate]

One row per workdir: model, parameters (trainable / total, the total adding BatchNorm
statistics), training GFLOPs per image and activation memory per device (XLA's analyses
in ``summary.txt``), the devices it trained on, train images/s and seconds per epoch, and
the chosen checkpoint's mIoU, mean F1 and IoU per class on ``--split``.

Where each number comes from (nothing is estimated that the run did not record):

* parameters: the shapes of the checkpoint's ``params`` and ``batch_stats``;
* GFLOPs, memory, devices: ``WORKDIR/summary.txt``, written by training at its first step;
* speed: the TensorBoard scalar ``timing/step_seconds`` (mean seconds per training step
  over each logging interval, input wait included, evaluation and checkpointing
  excluded), weighted by the steps of each interval: images/s = global batch / mean
  step time; seconds per epoch = training-split examples x crops per image / images/s
  (the split size is read from the prepared dataset's metadata);
* scores: ``WORKDIR/eval/<split>-<step>.json`` for the step that ``--checkpoint``
  resolves to. With ``--evaluate``, a missing report is computed first with
  ``lcseg.evaluate``; without it the cells stay empty and the command to fill them is
  printed.

Runs on different datasets go into one table per dataset (the class columns differ).
Problems with one workdir are reported in one line on stderr and the other rows are
still printed. ``--output DIR`` also writes ``comparison.md``, and per dataset
``comparison-<dataset>.csv`` and ``comparison-<dataset>.png`` (mIoU against train
images/s, one labelled point per run, the Pareto front marked: the runs that no other run
beats on both speed and accuracy).

Why one module of ~600 lines: every function serves the one table (reading a run's
files into its row, then rendering the rows); half the lines are the documented parsing
of what training wrote, which changes with training, not with the rest of lcseg.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from lcseg import checkpoints
from lcseg import evaluate as evaluate_lib
from lcseg.data import DATASETS, get_metadata
from lcseg.visualize import offscreen_figure
from lcseg.workdir import CONFIG_FILE, SUMMARY_FILE, checkpoint_dir, load_config

FLAGS = flags.FLAGS

STEP_SECONDS_TAG = "timing/step_seconds"
MISSING = "n/a"


class RunError(ValueError):
    """A workdir that cannot be shown at all (its row is left out, with this message)."""


class NotAWorkdirError(RunError):
    """The folder is not a training workdir (no config.json)."""


@dataclasses.dataclass
class Run:
    """What one workdir says about its model, speed and scores (None: not recorded).

    Attributes:
      workdir: the workdir, absolute.
      name: the row's label (the workdir's base name).
      dataset: ``config.dataset.name``.
      model: the model and its distinguishing options, e.g. ``unet (16,32,64,128)``.
      batch_size: the global training batch.
      params_trainable: parameters (``params``).
      params_total: ``params`` plus BatchNorm statistics (``batch_stats``).
      gflops_per_image: XLA's FLOPs of one training step per image, in GFLOP.
      activation_mib: XLA's temporary buffers of the training step per device, in MiB.
      devices: e.g. ``4 x cpu``, as training recorded it.
      seconds_per_step: mean training-step time.
      images_per_s: global batch / ``seconds_per_step``.
      train_examples: size of the training split.
      seconds_per_epoch: ``train_examples * crops_per_image / images_per_s``.
      step: the checkpoint step the scores belong to.
      eval_path: the evaluation report read.
      miou, mean_f1: from the report.
      iou: per-class IoU by class name (None: the class was absent, or no report).
      problems: one-line messages about what is missing and what to do.
    """

    workdir: str
    name: str
    dataset: str
    model: str
    batch_size: int
    params_trainable: int | None = None
    params_total: int | None = None
    gflops_per_image: float | None = None
    activation_mib: float | None = None
    devices: str | None = None
    seconds_per_step: float | None = None
    images_per_s: float | None = None
    train_examples: int | None = None
    seconds_per_epoch: float | None = None
    step: int | None = None
    eval_path: str | None = None
    miou: float | None = None
    mean_f1: float | None = None
    iou: dict[str, float | None] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Comparison:
    """The runs read, grouped by dataset, and the messages about the inputs.

    Attributes:
      runs: every run read, in the order given.
      messages: one line per problem (a folder skipped, a report missing, ...).
      skipped: workdirs that could not be read at all.
    """

    runs: list[Run]
    messages: list[str]
    skipped: list[str]

    def by_dataset(self) -> dict[str, list[Run]]:
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            groups.setdefault(run.dataset, []).append(run)
        return groups


# ---------------------------------------------------------------------------------------
# Reading one run.
# ---------------------------------------------------------------------------------------


def model_label(model_config: Any) -> str:
    """A short model description: the registry name plus what tells variants apart."""
    model = dict(model_config)
    label = str(model.get("name", "?"))
    if model.get("encoder"):
        label += f" ({model['encoder']})"
    elif label == "unet" and model.get("channels"):
        # Generic U-Nets differ by their widths; the presets' names already say it.
        label += " (" + ",".join(str(c) for c in model["channels"]) + ")"
    multiplier = model.get("width_multiplier")
    if multiplier not in (None, 1, 1.0):
        label += f" x{multiplier:g}"
    return label


def read_summary(workdir: str) -> dict[str, Any]:
    """The figures of ``WORKDIR/summary.txt``: parameters, GFLOPs, memory, devices.

    Returns:
      A dict with whichever of ``params``, ``gflops_per_image``, ``temp_gib`` and
      ``devices`` the file records (empty when there is no file).
    """
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read()
    found: dict[str, Any] = {}
    total = re.search(r"^total\s+([\d,]+)\s*$", text, re.MULTILINE)
    if total:
        found["params"] = int(total.group(1).replace(",", ""))
    for key in ("gflops_per_image", "temp_gib"):
        match = re.search(rf"\b{key} ([-+\w.]+)", text)
        if match:
            value = float(match.group(1))
            if math.isfinite(value):
                found[key] = value
    devices = re.search(r"^Devices: (\d+) x (.+) \(platform (\w+)\)", text, re.MULTILINE)
    if devices:
        found["devices"] = f"{devices.group(1)} x {devices.group(2)}"
    return found


def read_step_seconds(workdir: str) -> float | None:
    """Mean training-step time over the run, from the TensorBoard ``timing/step_seconds``.

    Each value is the mean step time of the interval since the previous logged step, so
    the run's mean weighs each value by its interval's steps (total time / total steps).
    clu writes scalars as tensor summaries, which the plugin accumulator reads; it also
    drops the events a resumed run replaced.

    Returns:
      Seconds per step, or None when the run logged no step time.
    """
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    # Keep every scalar (0: no sampling); other summaries (images) are sampled down to one.
    # tensor_size_guidance is keyed by plugin name, not by tag.
    accumulator = plugin_event_accumulator.EventAccumulator(
        workdir, size_guidance={plugin_event_accumulator.TENSORS: 1},
        tensor_size_guidance={"scalars": 0})
    accumulator.Reload()
    if STEP_SECONDS_TAG not in accumulator.Tags().get("tensors", []):
        return None
    events = sorted(accumulator.Tensors(STEP_SECONDS_TAG), key=lambda e: e.step)
    total_seconds, total_steps, previous = 0.0, 0, 0
    for event in events:
        steps = event.step - previous
        previous = event.step
        if steps <= 0:
            continue
        total_seconds += float(tensor_util.make_ndarray(event.tensor_proto)) * steps
        total_steps += steps
    return total_seconds / total_steps if total_steps else None


def train_split_size(config: Any) -> int | None:
    """Examples in the run's training split, from the prepared dataset's metadata.

    Returns None (never prepares anything) when the dataset is not where the run read it.
    """
    try:
        metadata = get_metadata(config.dataset.name)
        data_dir = config.dataset.data_dir
        builder = metadata.builder_class()(
            data_dir=os.path.expanduser(data_dir) if data_dir else None)
        if not builder.is_prepared():
            return None
        split = config.dataset.train_split
        expression = getattr(builder, "SPLIT_ALIASES", {}).get(split, split)
        # An alias is a union of stored splits, e.g. LoveDA's train = urban + rural.
        return sum(builder.info.splits[part].num_examples for part in expression.split("+"))
    except Exception:  # noqa: BLE001 - any failure here only means "unknown", shown as such.
        return None


def evaluate_command(workdir: str, split: str, checkpoint: str) -> str:
    """The command that writes the missing evaluation report."""
    return (f"python -m lcseg.evaluate --workdir {workdir} --split {split} "
            f"--checkpoint {checkpoint}")


def read_run(workdir: str, *, split: str = "validation", checkpoint: str = "best",
             evaluate: bool = False) -> Run:
    """Reads one workdir into a ``Run``; what it lacks is None with a message in problems.

    Args:
      workdir: a training workdir (``main.py --workdir``).
      split: the split whose scores to show.
      checkpoint: ``'best'`` or ``'latest'`` (or a step number).
      evaluate: evaluate the checkpoint on ``split`` (``lcseg.evaluate``) when its report
        is missing.

    Returns:
      The run.

    Raises:
      NotAWorkdirError: the folder has no config.json.
      RunError: its config.json is unreadable or names an unknown dataset.
    """
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir) or not os.path.exists(
            os.path.join(workdir, CONFIG_FILE)):
        what = "does not exist" if not os.path.isdir(workdir) else "has no config.json"
        raise NotAWorkdirError(
            f"{workdir} {what}: it is not a training workdir; pass folders given to "
            "`python main.py --workdir`.")
    try:
        config = load_config(workdir)
    except ValueError as error:  # json.JSONDecodeError included
        raise RunError(f"{workdir}: config.json is unreadable ({error}); it is not a "
                       "complete training workdir.") from None
    run = Run(workdir=workdir, name=os.path.basename(workdir.rstrip(os.sep)),
              dataset=str(config.dataset.name), model=model_label(config.model),
              batch_size=int(config.batch_size))
    if run.dataset not in DATASETS:
        raise RunError(f"{workdir}: unknown dataset {run.dataset!r} in config.json (lcseg "
                       f"knows {sorted(DATASETS)}); was it trained by another version?")

    # --- Model figures and speed -------------------------------------------------------
    summary = read_summary(workdir)
    run.params_trainable = summary.get("params")
    run.gflops_per_image = summary.get("gflops_per_image")
    if "temp_gib" in summary:
        run.activation_mib = summary["temp_gib"] * 1024
    run.devices = summary.get("devices")
    run.seconds_per_step = read_step_seconds(workdir)
    if run.seconds_per_step:
        run.images_per_s = run.batch_size / run.seconds_per_step
    run.train_examples = train_split_size(config)
    if run.images_per_s and run.train_examples:
        # An epoch gives every training image config.data.crops_per_image crops (one in
        # runs older than that option), each one sample of a batch.
        crops = int(config.data.get("crops_per_image", 1))
        run.seconds_per_epoch = run.train_examples * crops / run.images_per_s
    if not summary:
        run.problems.append(f"{workdir}: no {SUMMARY_FILE} (training never reached its first "
                            "step?): model figures shown as n/a.")

    # --- Checkpoint and scores ---------------------------------------------------------
    directory = checkpoint_dir(workdir)
    try:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"No checkpoint in {directory}")
        checkpointer = checkpoints.Checkpointer(directory, read_only=True)
        try:
            run.step = checkpointer.resolve_step(checkpoint)
        finally:
            checkpointer.close()
    except (FileNotFoundError, ValueError) as error:
        run.problems.append(f"{workdir}: {error}; train it (further) first.")
        return run
    try:
        # The checkpoint's shapes are the parameters the scores belong to.
        run.params_trainable, run.params_total = checkpoints.parameter_counts(
            checkpoint_dir(workdir), run.step)
    except (FileNotFoundError, KeyError, ValueError) as error:
        run.problems.append(f"{workdir}: cannot read the parameter shapes of checkpoint "
                            f"{run.step} ({error}); showing summary.txt's count.")

    path = os.path.join(workdir, "eval", f"{split}-{run.step}.json")
    if not os.path.exists(path) and evaluate:

        try:
            _, path = evaluate_lib.evaluate_checkpoint(workdir, split, run.step)
        except (FileNotFoundError, ValueError) as error:  # e.g. the dataset is not there
            run.problems.append(f"{workdir}: evaluating step {run.step} on {split} failed: "
                                f"{error}")
            return run
    if not os.path.exists(path):
        run.problems.append(
            f"{workdir}: no {split} evaluation of checkpoint {checkpoint} (step {run.step}); "
            f"run `{evaluate_command(workdir, split, checkpoint)}` or pass --evaluate.")
        return run
    with open(path) as f:
        report = json.load(f)
    run.eval_path = path
    run.miou, run.mean_f1 = report.get("miou"), report.get("mean_f1")
    run.iou = dict(report.get("iou", {}))
    return run


def compare_runs(workdirs: Sequence[str], *, split: str = "validation",
                 checkpoint: str = "best", evaluate: bool = False) -> Comparison:
    """Reads every workdir; folders that cannot be read become messages, not errors.

    Args:
      workdirs: training workdirs.
      split: the split whose scores to show.
      checkpoint: ``'best'`` or ``'latest'``.
      evaluate: evaluate checkpoints whose report for ``split`` is missing.

    Returns:
      The comparison (runs in the given order, messages, skipped folders).
    """
    runs, messages, skipped = [], [], []
    for workdir in workdirs:
        try:
            run = read_run(workdir, split=split, checkpoint=checkpoint, evaluate=evaluate)
        except RunError as error:
            messages.append(str(error))
            skipped.append(workdir)
            continue
        runs.append(run)
        messages.extend(run.problems)
    # Two workdirs with the same base name (runs/a/unet, runs/b/unet): label by path.
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = os.path.relpath(run.workdir)
    datasets = {run.dataset for run in runs}
    if len(datasets) > 1:
        groups = "; ".join(f"{name}: {', '.join(r.name for r in group)}"
                           for name, group in Comparison(runs, [], []).by_dataset().items())
        messages.append(f"The runs are on {len(datasets)} datasets ({groups}): one table per "
                        "dataset; speed and accuracy compare only within a table.")
    return Comparison(runs=runs, messages=messages, skipped=skipped)


# ---------------------------------------------------------------------------------------
# Tables, conclusion, plot.
# ---------------------------------------------------------------------------------------


def pareto_front(runs: Sequence[Run]) -> list[Run]:
    """The runs no other run beats on both train images/s and mIoU, fastest first.

    A run is dominated when another is at least as fast and as accurate and strictly
    better in one; runs missing either number take no part.
    """
    scored = [r for r in runs if r.images_per_s is not None and r.miou is not None]

    def dominated(run: Run) -> bool:
        return any(o.images_per_s >= run.images_per_s and o.miou >= run.miou
                   and (o.images_per_s > run.images_per_s or o.miou > run.miou)
                   for o in scored)

    return sorted((r for r in scored if not dominated(r)), key=lambda r: -r.images_per_s)


def class_names(dataset: str) -> list[str]:
    return list(get_metadata(dataset).class_names)


def _fmt(value: float | None, spec: str) -> str:
    return MISSING if value is None or not math.isfinite(value) else format(value, spec)


def _params(run: Run) -> str:
    if run.params_trainable is None:
        return MISSING
    total = MISSING if run.params_total is None else f"{run.params_total:,}"
    return f"{run.params_trainable:,} / {total}"


TABLE_COLUMNS = ("run", "model", "devices", "params (trainable / total)", "GFLOPs/image",
                 "act. memory MiB/device", "train images/s", "s/epoch", "step", "mIoU",
                 "mean F1")


def table_rows(runs: Sequence[Run], dataset: str) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of one dataset's table (markdown and terminal)."""
    names = class_names(dataset)
    front = {id(r) for r in pareto_front(runs)}
    header = [*TABLE_COLUMNS, *names, "Pareto"]
    rows = []
    for run in runs:
        has_scores = run.eval_path is not None
        rows.append([
            run.name, run.model, run.devices or "unknown", _params(run),
            _fmt(run.gflops_per_image, ".4g"), _fmt(run.activation_mib, ".4g"),
            _fmt(run.images_per_s, ".4g"), _fmt(run.seconds_per_epoch, ".4g"),
            MISSING if run.step is None else str(run.step),
            _fmt(run.miou, ".4f"), _fmt(run.mean_f1, ".4f"),
            # A class absent from truth and prediction has no IoU (null in the report).
            *((_fmt(run.iou.get(name), ".4f") if has_scores else MISSING) for name in names),
            "yes" if id(run) in front else "",
        ])
    return header, rows


def markdown_table(runs: Sequence[Run], dataset: str) -> str:
    """One dataset's table in markdown."""
    header, rows = table_rows(runs, dataset)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def conclusion(runs: Sequence[Run]) -> str:
    """Which runs give the best accuracy for their speed, in one or two sentences."""
    front = pareto_front(runs)
    if not front:
        return ("No run has both a train speed and an mIoU: nothing to conclude yet.")
    parts = [f"{r.name} ({r.images_per_s:.4g} images/s, mIoU {r.miou:.4f})" for r in front]
    text = ("Best accuracy for its speed (Pareto front, fastest first): " + ", ".join(parts)
            + ".")
    others = [r.name for r in runs if r.images_per_s is not None and r.miou is not None
              and r not in front]
    if others:
        text += f" Slower and no more accurate than a run on the front: {', '.join(others)}."
    devices = {r.devices or "unknown" for r in runs if r.images_per_s is not None}
    if len(devices) > 1:
        text += (f" Caution: speeds were measured on different devices "
                 f"({', '.join(sorted(devices))}).")
    return text


def format_comparison(comparison: Comparison, *, split: str, checkpoint: str) -> str:
    """Every dataset's table with its conclusion, in markdown."""
    sections = []
    for dataset, runs in comparison.by_dataset().items():
        sections.append(f"### {dataset}: {split} scores of the {checkpoint} checkpoint\n\n"
                        f"{markdown_table(runs, dataset)}\n\n{conclusion(runs)}")
    return "\n\n".join(sections)


CSV_COLUMNS = ("run", "workdir", "dataset", "model", "devices", "params_trainable",
               "params_total", "gflops_per_image", "activation_mib", "batch_size",
               "seconds_per_step", "train_images_per_s", "train_examples", "seconds_per_epoch",
               "step", "miou", "mean_f1")


def write_csv(path: str, runs: Sequence[Run], dataset: str) -> str:
    """One dataset's rows as CSV, numbers at full precision, missing cells empty."""
    names = class_names(dataset)
    front = {id(r) for r in pareto_front(runs)}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*CSV_COLUMNS, *(f"iou/{name}" for name in names), "pareto"])
        for run in runs:
            values = [run.name, run.workdir, run.dataset, run.model, run.devices,
                      run.params_trainable, run.params_total, run.gflops_per_image,
                      run.activation_mib, run.batch_size, run.seconds_per_step,
                      run.images_per_s, run.train_examples, run.seconds_per_epoch, run.step,
                      run.miou, run.mean_f1, *(run.iou.get(name) for name in names),
                      id(run) in front]
            writer.writerow(["" if v is None else repr(v) if isinstance(v, float) else v
                             for v in values])
    return path


def comparison_figure(runs: Sequence[Run], *, title: str) -> Any:
    """mIoU against train images/s, one labelled point per run, the Pareto front marked.

    Returns:
      A matplotlib ``Figure`` on an Agg canvas (no display, no global pyplot state).
    """
    figure = offscreen_figure((7, 5))
    axes = figure.add_subplot()
    scored = [r for r in runs if r.images_per_s is not None and r.miou is not None]
    front = pareto_front(runs)
    axes.scatter([r.images_per_s for r in scored], [r.miou for r in scored], color="C0",
                 zorder=2, label="run")
    if front:
        # The front as a staircase: the best mIoU reachable at each speed or faster.
        axes.step([r.images_per_s for r in front], [r.miou for r in front], where="post",
                  color="C3", linestyle="--", zorder=1)
        axes.scatter([r.images_per_s for r in front], [r.miou for r in front],
                     facecolors="none", edgecolors="C3", s=160, linewidths=2, zorder=3,
                     label="Pareto front")
    for run in scored:
        axes.annotate(run.name, (run.images_per_s, run.miou), textcoords="offset points",
                      xytext=(6, 6), fontsize=9)
    axes.set_xlabel("train images/s")
    axes.set_ylabel("mIoU")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.margins(0.15)  # Room for the labels of the outermost points.
    if scored:
        axes.legend(loc="best")
    else:
        axes.text(0.5, 0.5, "no run has both a speed and an mIoU", ha="center",
                  transform=axes.transAxes)
    figure.tight_layout()
    return figure


def plot_comparison(path: str, runs: Sequence[Run], *, title: str) -> str:
    """Writes ``comparison_figure`` as a PNG; returns ``path``."""
    comparison_figure(runs, title=title).savefig(path)
    return path


def write_outputs(comparison: Comparison, output: str, *, split: str,
                  checkpoint: str) -> list[str]:
    """Writes comparison.md and, per dataset, the CSV and the plot; returns their paths."""
    os.makedirs(output, exist_ok=True)
    written = [os.path.join(output, "comparison.md")]
    with open(written[0], "w") as f:
        f.write(format_comparison(comparison, split=split, checkpoint=checkpoint) + "\n")
    for dataset, runs in comparison.by_dataset().items():
        written.append(write_csv(os.path.join(output, f"comparison-{dataset}.csv"), runs,
                                 dataset))
        written.append(plot_comparison(
            os.path.join(output, f"comparison-{dataset}.png"), runs,
            title=f"{dataset}: {split} mIoU ({checkpoint} checkpoint) vs training speed"))
    return written


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def _define_flags() -> None:
    # Defined only when run as a program (as lcseg.evaluate does): importing this module
    # must not claim flag names other lcseg commands define too.
    flags.DEFINE_enum("split", "validation", ["validation", "test"],
                      "Split whose scores to show.")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                      "Checkpoint whose scores to show.")
    flags.DEFINE_string("output", None, "Folder for comparison.md and per dataset the CSV "
                        "and the plot; none written if unset.")
    flags.DEFINE_bool("evaluate", False, "Evaluate checkpoints whose report for --split is "
                      "missing (lcseg.evaluate) instead of leaving their cells empty.")


def run_command(workdirs: Sequence[str], *, split: str = "validation",
                checkpoint: str = "best", output: str | None = None,
                evaluate: bool = False) -> int:
    """What ``python -m lcseg.compare`` does; returns the exit status.

    Prints the tables on stdout and one line per problem on stderr. Exit status 1 when a
    folder was not a workdir or no run could be read, else 0.
    """
    if not workdirs:
        print("compare: give one or more training workdirs, e.g. `python -m lcseg.compare "
              "runs/a runs/b`.", file=sys.stderr)
        return 1
    comparison = compare_runs(workdirs, split=split, checkpoint=checkpoint, evaluate=evaluate)
    if comparison.runs:
        print(format_comparison(comparison, split=split, checkpoint=checkpoint))
    for message in comparison.messages:
        print(f"compare: {message}", file=sys.stderr)
    if output and comparison.runs:
        for path in write_outputs(comparison, output, split=split, checkpoint=checkpoint):
            print(f"Wrote {path}")
    return 1 if comparison.skipped or not comparison.runs else 0


def main(argv: Sequence[str]) -> None:
    if not FLAGS["verbosity"].present:
        # Orbax and TensorBoard log every file they open; the table is the output here.
        logging.set_verbosity(logging.ERROR)
    # Positional arguments are the workdirs.
    sys.exit(run_command(argv[1:], split=FLAGS.split, checkpoint=FLAGS.checkpoint,
                         output=FLAGS.output, evaluate=FLAGS.evaluate))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
