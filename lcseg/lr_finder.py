"""Learning-rate range test (Smith 2017): which learning rate to train a config with.

    python -m lcseg.lr_finder --config configs/unet_synthetic.py --workdir runs/lr_find

Trains from the config's initialisation while the learning rate grows exponentially from
``--min_lr`` to ``--max_lr`` over ``--steps`` steps, smooths the loss with a
bias-corrected exponential moving average, stops once the smoothed loss exceeds
``--divergence`` times its minimum, and suggests the learning rate where the smoothed
loss falls fastest (steepest negative slope against log learning rate), capped at a tenth
of the rate with the lowest loss. Writes ``WORKDIR/lr_finder.png`` (loss against learning
rate, suggestion marked) and ``WORKDIR/lr_finder.json``, and prints the suggestion.

Bad input (a config lacking fields of configs/default.py, an unknown dataset, data not
found, a sweep that cannot run, a --workdir that cannot be a folder) prints one
``lcseg.lr_finder: error:`` line and exits with status 1, before anything is compiled.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from configs import default as default_config
from lcseg import cli, parallel
from lcseg.class_weights import resolve_class_weights
from lcseg.data import open_split, prepare_dataset
from lcseg.experiment import Experiment
from lcseg.visualize import offscreen_figure
from lcseg.workdir import check_folder

FLAGS = flags.FLAGS


def smooth(losses: np.ndarray, beta: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential moving average (fastai's smoothing)."""
    average, smoothed = 0.0, []
    for index, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta**index))
    return np.asarray(smoothed)


def suggest(learning_rates: np.ndarray, smoothed: np.ndarray) -> float:
    """The learning rate of steepest descent of the smoothed loss (vs log lr).

    Capped at a tenth of the rate of minimum loss (past the minimum, training diverges,
    and the steepest point of a short sweep can sit right before it), and never below the
    sweep's first rate.
    """
    slopes = np.gradient(smoothed, np.log(learning_rates))
    steepest = float(learning_rates[int(np.argmin(slopes))])
    capped = min(steepest, float(learning_rates[int(np.argmin(smoothed))]) / 10)
    # Never below the sweep: a loss lowest at the very start says "lower min_lr".
    return max(capped, float(learning_rates[0]))


def missing_fields(config: ml_collections.ConfigDict,
                   defaults: ml_collections.ConfigDict | None = None, prefix: str = ""
                   ) -> list[str]:
    """The fields of configs/default.py that ``config`` lacks, as dotted names.

    ``config.model`` is not compared: it holds the chosen model's own options.

    Args:
      config: an experiment config.
      defaults: what to compare with; None for ``configs.default.get_config()``.
      prefix: the dotted path of ``config`` (for recursion).
    """
    if defaults is None:
        defaults = default_config.get_config()
    missing = []
    for key, value in defaults.items():
        name = f"{prefix}{key}"
        if name == "model":
            continue
        if key not in config:
            missing.append(name)
        elif (isinstance(value, ml_collections.ConfigDict)
              and isinstance(config[key], ml_collections.ConfigDict)):
            missing += missing_fields(config[key], value, f"{name}.")
    return missing


def check_arguments(config: ml_collections.ConfigDict, workdir: str, *, where: str,
                    min_lr: float, max_lr: float, steps: int, divergence: float) -> None:
    """Raises ValueError naming the first bad argument or missing config field.

    Checked before anything is built, so that a typo costs a second, not a compile.
    """
    if missing := missing_fields(config):
        raise ValueError(
            f"{where}: the config has no field(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; build it on configs.default.get_config() "
            "(as configs/unet_synthetic.py does), which defines every field.")
    if not 0 < min_lr < max_lr:
        raise ValueError(f"--min_lr={min_lr:g} and --max_lr={max_lr:g}: need "
                         "0 < min_lr < max_lr.")
    if steps < 2:
        raise ValueError(f"--steps={steps}: the sweep needs at least 2 steps.")
    if divergence <= 1:
        raise ValueError(f"--divergence={divergence:g}: must be above 1 (the loss's "
                         "multiple of its minimum at which the sweep stops).")
    check_folder(workdir)  # Created only when the sweep starts.


def run(config: ml_collections.ConfigDict, workdir: str, *, min_lr: float = 1e-6,
        max_lr: float = 1.0, steps: int = 100, divergence: float = 4.0) -> dict[str, Any]:
    """Runs the range test and writes the plot; returns the sweep and the suggestion.

    ``workdir`` is created only once the data and the model are ready: a run that cannot
    start leaves nothing behind.
    """
    check_folder(workdir)
    dataset = config.dataset
    prepare_dataset(dataset.name, dataset.data_dir, dataset.manual_dir)
    source = open_split(dataset.name, dataset.train_split, dataset.data_dir)
    ratio = max_lr / min_lr

    def sweep(step):
        return min_lr * ratio ** (jnp.asarray(step, jnp.float32) / max(steps - 1, 1))

    experiment = Experiment(config, class_weights=resolve_class_weights(config),
                            schedule=sweep)
    batches = experiment.train_iterator(source)
    state = experiment.init_state()
    os.makedirs(workdir, exist_ok=True)  # The sweep can run: its folder may exist now.
    progress = cli.Progress(steps, unit="step")
    learning_rates, losses = [], []
    try:
        for step in range(steps):
            state, metrics = experiment.train_step(
                state, parallel.shard_batch(next(batches), experiment.mesh))
            loss = float(metrics["loss"])
            learning_rates.append(float(sweep(step)))
            losses.append(loss)
            smoothed = smooth(np.asarray(losses))
            # On a terminal or not (logs, nohup, SLURM): a line every 10% or 30 s.
            if step == 0 or (step + 1) % max(steps // 10, 1) == 0 or progress.due():
                progress.report(step + 1, lr=learning_rates[-1], loss=loss)
            if not np.isfinite(loss) or smoothed[-1] > divergence * smoothed.min():
                logging.info("Loss diverged at lr %.3g (step %d): stopping.",
                             learning_rates[-1], step)
                break
    finally:
        # Stops the loader's worker processes and frees their shared-memory buffers
        # (left to exit, they leave them to multiprocessing's resource tracker, which
        # warns of "leaked shared_memory objects").
        batches.close()
    learning_rates = np.asarray(learning_rates)
    losses = np.asarray(losses)
    finite = np.isfinite(losses)
    smoothed = smooth(losses[finite])
    suggestion = suggest(learning_rates[finite], smoothed)
    result = {"suggested_learning_rate": suggestion, "learning_rates": learning_rates.tolist(),
              "losses": [float(x) for x in losses], "smoothed": smoothed.tolist()}
    with open(os.path.join(workdir, "lr_finder.json"), "w") as f:
        json.dump(result, f, indent=2)
    result["plot"] = plot(os.path.join(workdir, "lr_finder.png"), learning_rates[finite],
                          losses[finite], smoothed, suggestion)
    return result


def plot(path: str, learning_rates: np.ndarray, losses: np.ndarray, smoothed: np.ndarray,
         suggestion: float) -> str:
    """Loss against learning rate (log scale) with the suggestion marked; returns path."""
    figure = offscreen_figure((7, 4.5))
    axes = figure.add_subplot()
    axes.plot(learning_rates, losses, color="0.75", linewidth=1, label="loss")
    axes.plot(learning_rates, smoothed, color="C0", linewidth=2, label="smoothed")
    axes.axvline(suggestion, color="C3", linestyle="--",
                 label=f"suggested lr = {suggestion:.2g}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_ylim(top=min(float(np.max(losses)), 4 * float(np.min(smoothed))) * 1.05)
    axes.set_title("Learning-rate range test")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the plot and JSON go.")
    flags.DEFINE_float("min_lr", 1e-6, "Start of the sweep.")
    flags.DEFINE_float("max_lr", 1.0, "End of the sweep.")
    flags.DEFINE_integer("steps", 100, "Steps of the sweep (at most).")
    flags.DEFINE_float("divergence", 4.0, "Stop when the loss exceeds this x its minimum.")
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()
    options = dict(min_lr=FLAGS.min_lr, max_lr=FLAGS.max_lr, steps=FLAGS.steps,
                   divergence=FLAGS.divergence)
    with cli.exit_on_bad_input("lcseg.lr_finder"):
        config = cli.config_from_flag("config")
        check_arguments(config, FLAGS.workdir,
                        where=config_flags.get_config_filename(FLAGS["config"]), **options)
        result = run(config, FLAGS.workdir, **options)
    print(f"Suggested learning rate: {result['suggested_learning_rate']:.3g}")
    print(f"Plot: {result['plot']}")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.config_flags_parser("lcseg.lr_finder"))
