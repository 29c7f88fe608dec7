"""Evaluates a training checkpoint on a dataset split.

    python -m lcseg.evaluate --workdir runs/demo --split test [--checkpoint best|latest|STEP]

Restores onto whatever devices exist (one CPU included), whatever device count the model
was trained on; prints a per-class table and writes ``WORKDIR/eval/<split>-<step>.json``
with per-class IoU (and F1, precision, recall), mIoU, accuracy and the confusion matrix.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from absl import app, flags, logging

from lcseg import checkpoints, parallel, train
from lcseg.data import open_split

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (holds config.json and checkpoints).")
flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
flags.DEFINE_string("checkpoint", "best", "'best' (validation mIoU), 'latest' or a step.")
flags.DEFINE_string("data_dir", None, "TFDS data dir, if not the one used for training.")


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def scores_to_json(scores: dict[str, Any], class_names: tuple[str, ...], *, split: str,
                   step: int) -> dict[str, Any]:
    """A JSON-ready report (NaN, an undefined score, becomes null)."""
    return {
        "split": split,
        "step": step,
        "classes": list(class_names),
        **{key: _json_number(scores[key])
           for key in ("miou", "accuracy", "mean_accuracy", "fwiou", "mean_f1", "loss")},
        **{key: {name: _json_number(v) for name, v in zip(class_names, scores[key])}
           for key in ("iou", "f1", "precision", "recall")},
        "confusion_matrix": np.asarray(scores["confusion_matrix"]).tolist(),
    }


def evaluate_checkpoint(workdir: str, split: str, checkpoint: str | int = "best",
                        data_dir: str | None = None) -> tuple[dict[str, Any], str]:
    """Restores ``checkpoint`` of ``workdir``, evaluates ``split`` and writes the JSON report.

    Returns:
      The scores and the path of the JSON report.
    """
    config = train.load_config(workdir)
    if data_dir:
        config.dataset.data_dir = data_dir
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, train.CHECKPOINT_DIR),
                                            read_only=True)
    step = checkpointer.resolve_step(checkpoint)
    experiment = train.Experiment(config)
    state = checkpointer.restore(step, experiment.abstract_state())
    source = open_split(config.dataset.name, split, config.dataset.data_dir,
                        manual_dir=config.dataset.manual_dir)
    logging.info("Evaluating step %d on %s (%d examples)", step, split, len(source))
    scores = experiment.evaluate_split(state, source)
    report = scores_to_json(scores, experiment.metadata.class_names, split=split, step=step)
    path = os.path.join(workdir, "eval", f"{split}-{step}.json")
    if parallel.is_main_process():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)
    return scores, path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    scores, path = evaluate_checkpoint(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint,
                                       FLAGS.data_dir)
    config = train.load_config(FLAGS.workdir)
    from lcseg.data import get_metadata
    print(train.format_scores_table(scores, get_metadata(config.dataset.name)))
    print(f"Wrote {path}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
