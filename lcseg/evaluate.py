"""Evaluates a training checkpoint on a dataset split.

    python -m lcseg.evaluate --workdir runs/demo --split test [--checkpoint best|latest|STEP]

Restores onto whatever devices exist (one CPU included), whatever device count the model
was trained on; prints a per-class table and writes ``WORKDIR/eval/<split>-<step>.json``
with per-class IoU (and F1, precision, recall), mIoU, accuracy and the confusion matrix.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags, logging

from lcseg import checkpoints, parallel, train
from lcseg.data import get_metadata, open_split
from lcseg.metrics import write_scores_json

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program: importing this module (tests, other tools)
    # must not claim flag names that other lcseg commands define too.
    flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints).")
    flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
    flags.DEFINE_string("checkpoint", "best", "'best' (validation mIoU), 'latest' or a step.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir, if not the one used for training.")
    flags.mark_flags_as_required(["workdir"])


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
    path = os.path.join(workdir, "eval", f"{split}-{step}.json")
    if parallel.is_main_process():
        write_scores_json(path, scores, experiment.metadata.class_names, split=split, step=step)
    return scores, path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    scores, path = evaluate_checkpoint(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint,
                                       FLAGS.data_dir)
    config = train.load_config(FLAGS.workdir)
    print(train.format_scores_table(scores, get_metadata(config.dataset.name)))
    print(f"Wrote {path}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
