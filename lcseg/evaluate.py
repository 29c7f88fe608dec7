"""Evaluates a training checkpoint on a dataset split.

    python -m lcseg.evaluate --workdir runs/demo --split test [--checkpoint best|latest|STEP]
        [--full_scene]

Restores onto whatever devices exist (one CPU included), whatever device count the model
was trained on; prints a per-class table and writes ``WORKDIR/eval/<split>-<step>.json``
with per-class IoU (and F1, precision, recall), mIoU, accuracy and the confusion matrix.

``--full_scene`` predicts each example's whole image with the sliding-window predictor of
``lcseg.predict`` (overlapping windows of ``config.eval_tile_size``, blended; what
``python -m lcseg.predict`` writes) instead of non-overlapping tiles, and reports the same
scores from one confusion matrix (no loss) in ``<split>-<step>-full_scene.json``.

Bad input (no such workdir, checkpoint or split) prints one ``lcseg.evaluate: error:``
line and exits with status 1; ``--verbosity=0`` shows the traceback and library logs.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

from lcseg import cli, parallel
from lcseg.data import get_metadata, open_split, prepare_dataset
from lcseg.experiment import Experiment, TrainState
from lcseg.metrics import (
    confusion_matrix,
    format_scores_table,
    scores_from_confusion,
    write_scores_json,
)
from lcseg.predict import Predictor, predict_scene
from lcseg.workdir import load_config, restore_run

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program: importing this module (tests, other tools)
    # must not claim flag names that other lcseg commands define too.
    flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints).")
    flags.DEFINE_string("split", "test", "Dataset split to evaluate.")
    flags.DEFINE_string("checkpoint", "best", "'best' (validation mIoU), 'latest' or a step.")
    flags.DEFINE_string("data_dir", None, "TFDS data dir, if not the one used for training.")
    flags.DEFINE_bool("full_scene", False, "Predict each example's whole image with the "
                      "sliding-window predictor (lcseg.predict) instead of tiles.")
    flags.mark_flags_as_required(["workdir"])


def evaluate_full_scenes(experiment: Experiment, state: TrainState,
                         source) -> dict[str, Any]:
    """Scores of whole-scene predictions (``lcseg.predict.predict_scene``) over a split.

    Each process predicts its share of the examples on its own devices; the confusion
    matrices are summed over processes.
    """
    if len(source) == 0:
        raise ValueError("The evaluation split is empty.")
    num_classes = experiment.metadata.num_classes
    predictor = Predictor.from_experiment(experiment, state)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    for index in range(jax.process_index(), len(source), jax.process_count()):
        example = source[index]
        classes, _ = predict_scene(predictor, example["image"])
        matrix += np.asarray(confusion_matrix(example["label"], classes,
                                              num_classes=num_classes))
    if jax.process_count() > 1:
        matrix = np.asarray(multihost_utils.process_allgather(matrix)).sum(axis=0)
    return {"confusion_matrix": matrix, **scores_from_confusion(matrix)}


def evaluate_checkpoint(workdir: str, split: str, checkpoint: str | int = "best",
                        data_dir: str | None = None, *, full_scene: bool = False
                        ) -> tuple[dict[str, Any], str]:
    """Restores ``checkpoint`` of ``workdir``, evaluates ``split`` and writes the JSON report.

    With ``full_scene``, whole images are predicted with ``lcseg.predict`` instead of tiles.

    Returns:
      The scores and the path of the JSON report.
    """
    config = load_config(workdir)
    if data_dir:
        config.dataset.data_dir = data_dir
    # Opened before the model is built and restored: a wrong --split fails in a second.
    dataset = config.dataset
    prepare_dataset(dataset.name, dataset.data_dir, dataset.manual_dir)
    source = open_split(dataset.name, split, dataset.data_dir)
    # Full scenes: each process predicts its own examples on its own devices.
    experiment, state, step = restore_run(workdir, checkpoint, config=config,
                                          local_devices=full_scene)
    logging.info("Evaluating step %d on %s (%d examples%s)", step, split, len(source),
                 ", whole scenes" if full_scene else "")
    if full_scene:
        scores = evaluate_full_scenes(experiment, state, source)
    else:
        scores = experiment.evaluate_split(state, source)
    name = f"{split}-{step}-full_scene" if full_scene else f"{split}-{step}"
    path = os.path.join(workdir, "eval", f"{name}.json")
    if parallel.is_main_process():
        context = {"full_scene": True} if full_scene else {}
        write_scores_json(path, scores, experiment.metadata.class_names, split=split, step=step,
                          **context)
    return scores, path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    with cli.exit_on_bad_input("lcseg.evaluate"):
        scores, path = evaluate_checkpoint(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint,
                                           FLAGS.data_dir, full_scene=FLAGS.full_scene)
    config = load_config(FLAGS.workdir)
    print(format_scores_table(scores, get_metadata(config.dataset.name)))
    print(f"Wrote {path}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
