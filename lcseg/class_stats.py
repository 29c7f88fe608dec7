"""Per-class pixel statistics of a dataset split, and the loss weights they imply.

    python -m lcseg.class_stats --dataset synthetic [--data_dir D] [--split train]
        [--output stats.png] [--beta 0.999] [--recount]

Counts the label pixels of every evaluated class (ignored pixels separately), prints a
table of counts and frequencies and a table of the weights each class-weight scheme
(``lcseg.class_weights``) would give, and saves a bar chart: pixel frequency per class
(log scale, in the dataset's palette) and the weights per scheme, grouped by class.

Examples are read one at a time, so memory does not grow with the split. For ``train``
the counts recorded at preparation (the ones training uses for class weights) are used
directly unless ``--recount``, which counts again and cross-checks against them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from absl import app, flags

from lcseg.class_weights import CLASS_WEIGHT_SCHEMES, compute_class_weights
from lcseg.data import (
    DatasetMetadata,
    count_class_pixels,
    get_metadata,
    open_split,
    prepare_dataset,
    train_class_counts,
)
from lcseg.visualize import offscreen_figure

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program: lcseg.evaluate (and others) define --split and
    # --data_dir at import, and absl refuses the same flag from two modules, so merely
    # importing this module (tests, notebooks) must not define any.
    flags.DEFINE_string("dataset", None, "Dataset registry name, e.g. 'synthetic'.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir; the TFDS default if unset.")
    flags.DEFINE_string("manual_dir", None,
                        "Downloaded archives, needed only if the dataset is not prepared.")
    flags.DEFINE_string("split", "train", "Split to count.")
    flags.DEFINE_string("output", None,
                        "Bar chart PNG; default class_stats_<dataset>_<split>.png in the cwd.")
    flags.DEFINE_float("beta", 0.999, "beta of the 'effective_number' scheme.")
    flags.DEFINE_bool("recount", False,
                      "Count the train split even though preparation recorded its counts.")


def scheme_weights(counts: np.ndarray, *, beta: float = 0.999) -> dict[str, np.ndarray]:
    """Normalised class weights of every named scheme for these counts (training's view)."""
    return {scheme: compute_class_weights(scheme, counts, beta=beta)
            for scheme in CLASS_WEIGHT_SCHEMES}


def format_report(
    class_names: Sequence[str],
    counts: np.ndarray,
    ignored: int | None,
    weights: Mapping[str, np.ndarray],
    *,
    title: str = "",
) -> str:
    """The counts/frequency table followed by the weights-per-scheme table.

    Args:
      class_names: C class names.
      counts: int ``[C]`` pixel counts.
      ignored: ignored pixel count, or None when unknown (recorded counts omit it).
      weights: scheme name -> ``[C]`` weights; empty to omit the weights table.
      title: first line of the report.

    Returns:
      Multi-line text ready to print.
    """
    counts = np.asarray(counts, np.int64)
    labelled = int(counts.sum())
    width = max(len("ignored"), len("total"), *(len(name) for name in class_names)) + 2
    lines = [title] if title else []
    lines.append(f"{'class':<{width}}{'pixels':>14}{'frequency':>12}")
    for name, count in zip(class_names, counts):
        frequency = count / labelled if labelled else 0.0
        lines.append(f"{name:<{width}}{int(count):>14,}{frequency:>12.4%}")
    lines.append(f"{'total':<{width}}{labelled:>14,}  (labelled pixels; frequencies over these)")
    if ignored is None:
        lines.append(f"{'ignored':<{width}}{'n/a':>14}  (not recorded at preparation; "
                     "--recount to count)")
    else:
        share = ignored / (labelled + ignored) if labelled + ignored else 0.0
        lines.append(f"{'ignored':<{width}}{ignored:>14,}{share:>12.4%}  of all pixels")
    if weights:
        column = max(len(scheme) for scheme in weights) + 2
        lines.append("")
        lines.append("class weights (normalised: pixel-frequency-weighted mean 1)")
        lines.append(f"{'class':<{width}}" + "".join(f"{s:>{column}}" for s in weights))
        for index, name in enumerate(class_names):
            lines.append(f"{name:<{width}}" + "".join(
                f"{float(w[index]):>{column}.4f}" for w in weights.values()))
    return "\n".join(lines)


def plot_class_stats(path: str, metadata: DatasetMetadata, counts: np.ndarray,
                     weights: Mapping[str, np.ndarray], *, title: str = "") -> None:
    """Saves the bar chart: log-scale frequency per class, then weights per scheme."""
    counts = np.asarray(counts, np.int64)
    labelled = counts.sum()
    frequency = counts / labelled if labelled else np.zeros(len(counts))
    x = np.arange(metadata.num_classes)
    names = list(metadata.class_names)
    figure = offscreen_figure((max(8.0, 1.3 * metadata.num_classes + 3.0), 8.0))
    top, bottom = figure.subplots(2, 1)

    colours = np.asarray(metadata.palette, np.float64) / 255.0
    # Black edges: some palette colours (white, yellow) vanish on a white background.
    top.bar(x, frequency, color=colours, edgecolor="black")
    if np.any(frequency > 0):
        top.set_yscale("log")
        top.set_ylim(frequency[frequency > 0].min() / 3.0, 1.5)
    for xi, (f, n) in enumerate(zip(frequency, counts)):
        if f > 0:
            top.text(xi, f, f"{f:.2%}\n{int(n):,}", ha="center", va="bottom", fontsize=8)
    top.set_xticks(x, labels=names)
    top.set_ylabel("pixel frequency (log)")
    top.set_title(title or "class pixel frequency")

    if weights:
        bar_width = 0.8 / len(weights)
        for offset, (scheme, values) in enumerate(weights.items()):
            bottom.bar(x - 0.4 + (offset + 0.5) * bar_width, values, bar_width, label=scheme)
        # Headroom above the tallest bar keeps the legend off the bars.
        bottom.set_ylim(0.0, 1.3 * max(float(np.max(v)) for v in weights.values()))
        bottom.legend(fontsize=8, ncols=min(3, len(weights)), loc="upper left")
    bottom.set_xticks(x, labels=names)
    bottom.set_ylabel("class weight (normalised)")
    bottom.set_title("class weights per scheme")
    figure.tight_layout()
    figure.savefig(path)
    figure.clear()


def _progress_printer(label: str) -> Callable[[int, int], None]:
    """A progress line on stderr, redrawn at most a few times a second."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] > 0.25:
            last[0] = now
            end = "\n" if done == total else ""
            print(f"\r{label}: {done}/{total} examples", end=end, file=sys.stderr, flush=True)

    return report


def run(dataset: str, split: str = "train", data_dir: str | None = None, *,
        output: str | None = None, beta: float = 0.999, recount: bool = False,
        manual_dir: str | None = None) -> str:
    """Counts, prints the report, writes the chart; returns the report text."""
    metadata = get_metadata(dataset)
    # open_split raises clear errors for unknown datasets and splits; let them through.
    prepare_dataset(dataset, data_dir, manual_dir)
    source = open_split(dataset, split, data_dir)
    notes = []
    recorded = None
    if split == "train":
        try:
            recorded = train_class_counts(dataset, data_dir)
        except ValueError as error:  # prepared by an older lcseg: count instead
            notes.append(f"no recorded counts ({error}); counting")
    if recorded is not None and not recount:
        counts, ignored = recorded, None
        notes.append("using the class counts recorded at preparation (fast path; --recount "
                     "to count again)")
    else:
        counts, ignored = count_class_pixels(
            source, metadata.num_classes, metadata.ignore_label,
            progress=_progress_printer(f"counting {dataset}/{split}"))
        if recorded is not None:
            if np.array_equal(counts, recorded):
                notes.append("recount matches the counts recorded at preparation")
            else:
                notes.append("WARNING: recount differs from the counts recorded at preparation "
                             f"{recorded.tolist()}; training's class weights use the recorded "
                             "ones, prepare the dataset again")

    labelled = int(np.sum(counts))
    if labelled > 0:
        weights = scheme_weights(counts, beta=beta)
    else:
        weights = {}
        notes.append("no labelled pixels: no class weights")
    title = f"{dataset}/{split}: {len(source)} examples"
    report = format_report(metadata.class_names, counts, ignored, weights, title=title)
    if notes:
        report = "\n".join(notes) + "\n\n" + report

    path = output or f"class_stats_{dataset}_{split}.png"
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    plot_class_stats(path, metadata, counts, weights, title=title)
    report += f"\n\nWrote {path}"
    print(report)
    return report


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(FLAGS.dataset, FLAGS.split, FLAGS.data_dir, output=FLAGS.output, beta=FLAGS.beta,
        recount=FLAGS.recount, manual_dir=FLAGS.manual_dir)


if __name__ == "__main__":
    _define_flags()
    flags.mark_flags_as_required(["dataset"])
    app.run(main)
