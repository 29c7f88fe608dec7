"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

Reads top-down: checks (nothing is written before they pass: a run that cannot start,
or a config that would change what an existing workdir's checkpoints mean, fails in one
error line and leaves no file), data, model and state, restore, the run's files
(``config.json``, TensorBoard), then the loop with its periodic actions (lcseg's own
progress line, evaluation, checkpointing) and a summary line. The state, the steps and
the evaluation loop are ``lcseg.experiment``'s.
"""

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from flax import traverse_util

from lcseg import checkpoints, cli, optim, parallel, preemption
from lcseg.class_weights import resolve_class_weights
from lcseg.data import open_split, prepare_dataset
from lcseg.data.metadata import DatasetMetadata
from lcseg.experiment import Experiment, TrainState
from lcseg.metrics import format_scores_table, scalar_summaries, write_scores_json
from lcseg.models import load_pretrained, pretrained_normalisation
from lcseg.models import summary as model_summary
from lcseg.models.summary import step_summary
from lcseg.tracker import check_tracker_config, update_tracker
from lcseg.visualize import confusion_heatmap
from lcseg.workdir import (
    SUMMARY_FILE,
    check_config_change,
    check_folder,
    checkpoint_dir,
    restore_run,
    save_config,
)


def _check_finite(metrics: dict[str, float], step: int, last_saved: int | None,
                  workdir: str) -> None:
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        where = (f"the last good checkpoint (step {last_saved}) is intact in "
                 f"{checkpoint_dir(workdir)}" if last_saved is not None
                 else "no checkpoint was written")
        raise FloatingPointError(
            f"Training diverged: loss={metrics['loss']}, grad_norm={metrics['grad_norm']} "
            f"around step {step}; {where}. Lower config.learning_rate, add warmup, or check "
            f"the data.")


def _report_evaluation(writer: metric_writers.MetricWriter, step: int, scores: dict[str, Any],
                       panels: np.ndarray, metadata: DatasetMetadata, *, workdir: str,
                       split: str) -> None:
    """Scalars, panels and confusion heat map to TensorBoard; JSON report; log table."""
    writer.write_scalars(step, scalar_summaries(scores, metadata, "eval"))
    heatmap = confusion_heatmap(scores["confusion_matrix"], metadata.class_names,
                                title=f"{split}, step {step}")
    writer.write_images(step, {"eval/panels": panels, "eval/confusion_matrix": heatmap[None]})
    if parallel.is_main_process():
        write_scores_json(os.path.join(workdir, "eval", f"{split}-{step}.json"), scores,
                          metadata.class_names, split=split, step=step)
    logging.info("Step %d, %s:\n%s", step, split, format_scores_table(scores, metadata))


def with_pretrained_weights(state: TrainState, path: str, mesh) -> TrainState:
    """The state with the pretrained encoder weights of ``path`` copied in."""
    host = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    variables, _ = load_pretrained(host, path)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    logging.info("Loaded pretrained weights from %s", path)
    return state.replace(
        params=variables["params"], batch_stats=variables["batch_stats"],
        ema_params=variables["params"] if state.ema_params is not None else None)


def with_workdir_weights(state: TrainState, workdir: str) -> TrainState:
    """The state with the parameters (and BatchNorm statistics) of ``workdir``'s best
    checkpoint: a run of the same model, e.g. stage one of the hypercolumn system.

    Raises:
      ValueError: the run's model has other parameters (names and shapes listed).
    """
    _, source, step = restore_run(workdir, "best")
    problems = []
    for collection in ("params", "batch_stats"):
        expected = traverse_util.flatten_dict(getattr(state, collection), sep="/")
        found = traverse_util.flatten_dict(getattr(source, collection), sep="/")
        problems += [f"{collection}/{key}: {'missing' if key not in found else found[key].shape}"
                     f" in {workdir}, {value.shape} here" for key, value in expected.items()
                     if key not in found or found[key].shape != value.shape]
        problems += [f"{collection}/{key}: only in {workdir}" for key in found
                     if key not in expected]
    if problems:
        raise ValueError(f"config.model.init_from={workdir}: its model does not have this "
                         f"model's parameters ({len(problems)} differences: "
                         f"{'; '.join(problems[:8])}). Use the workdir of a run of the same "
                         f"model.")
    logging.info("Initialised from %s (step %d)", workdir, step)
    return state.replace(
        params=source.params, batch_stats=source.batch_stats,
        ema_params=source.params if state.ema_params is not None else None)


def write_model_summary(workdir: str, config: ml_collections.ConfigDict, state: TrainState,
                        lowered: jax.stages.Lowered, compiled: jax.stages.Compiled) -> None:
    """Parameters per module, FLOPs and memory per step: WORKDIR/summary.txt, and one line
    of it to the log."""
    figures = step_summary(lowered, compiled, batch_size=config.batch_size)
    lines = [f"Model {config.model.name}", model_summary(state.params, config.frozen),
             f"Train step (batch {config.batch_size} x {config.crop_size}^2): "
             + ", ".join(f"{k} {v:.6g}" for k, v in figures.items())]
    # lcseg.compare reads this line: a speed is only comparable on the same hardware.
    device = jax.devices()[0]
    lines.append(f"Devices: {jax.device_count()} x {device.device_kind} "
                 f"(platform {device.platform}), processes {jax.process_count()}")
    path = os.path.join(workdir, SUMMARY_FILE)
    if parallel.is_main_process():
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logging.info("Model %s: %s parameters, %.3g GFLOP per training image; per module: %s",
                 config.model.name, f"{parameters:,}",
                 figures.get("gflops_per_image", float("nan")), path)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for config values that cannot train, before anything is built.

    The checks that need no data, no model and no compilation: they cost milliseconds.
    """
    parallel.local_batch_size(config.batch_size)  # An indivisible batch.
    check_tracker_config(config)  # Fail now, not at the first evaluation.
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                         f"config.grad_accum_steps={config.grad_accum_steps}.")
    optim.check_optimizer_config(config)
    preemption.parse_signal(config.preemption_signal)
    for name in ("num_train_steps", "log_every_steps", "eval_every_steps",
                 "checkpoint_every_steps"):
        value = config[name]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.{name}={value!r} must be a positive integer.")


def _summary_line(state: TrainState, checkpointer: checkpoints.Checkpointer, workdir: str,
                  *, split: str) -> str:
    """Its best score and where its checkpoints are: 'best validation mIoU 0.98 at step
    1000; checkpoints in runs/demo/checkpoints'."""
    best = checkpointer.best_step()
    scores = (f"best {split} mIoU {float(state.tracker['best_miou']):.4f} at step {best}"
              if best is not None else "not evaluated yet")
    return f"{scores}; checkpoints in {checkpoint_dir(workdir)}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Everything that can be checked before training starts is checked before anything
    is written: the config's values, that ``workdir`` can be a folder, that its earlier
    run (if any) was trained with a config this one may resume (``lcseg.workdir``), the
    dataset, the model and its options. A failure there leaves no file behind (a
    ValueError or FileNotFoundError naming what to fix). ``config.json`` is written
    once the run starts.

    Args:
      config: an experiment config (configs/default.py documents every field).
      workdir: where TensorBoard events, checkpoints and the config go.

    Returns:
      The final train state.
    """
    # --- Checks: nothing is written until they pass ------------------------------------
    parallel.initialize_multihost(config.multihost)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    main_process = parallel.is_main_process()
    check_folder(workdir)
    check_config(config)
    pretrained = config.model.get("pretrained")
    if pretrained:
        # Pretrained weights expect their own input statistics; recording them in the
        # config makes evaluation and prediction use them too.
        normalisation = pretrained_normalisation(pretrained)
        config.dataset.mean = tuple(normalisation["mean"])
        config.dataset.std = tuple(normalisation["std"])
    changes = check_config_change(config, workdir)

    # --- Data -------------------------------------------------------------------------
    dataset = config.dataset
    if main_process:  # One process prepares; the others wait and then read.
        prepare_dataset(dataset.name, dataset.data_dir, dataset.manual_dir)
    parallel.sync("dataset_prepared")
    train_source = open_split(dataset.name, dataset.train_split, dataset.data_dir)
    eval_source = open_split(dataset.name, dataset.eval_split, dataset.data_dir)
    panel_examples = [eval_source[i] for i in range(min(config.num_panel_images,
                                                        len(eval_source)))]

    # --- Model and state ---------------------------------------------------------------
    class_weights = resolve_class_weights(config)
    experiment = Experiment(config, class_weights=class_weights)
    if class_weights is not None:
        logging.info("Class weights (%s): %s", config.class_weights,
                     {name: round(float(weight), 4) for name, weight in
                      zip(experiment.metadata.class_names, class_weights)})
    train_iter = experiment.train_iterator(train_source)
    state = experiment.init_state()  # Wrong model options fail here, in a second.

    # A workdir with checkpoints exists already: opening its manager creates nothing.
    checkpointer = None
    last_saved = None
    if os.path.isdir(checkpoint_dir(workdir)):
        checkpointer = checkpoints.Checkpointer(checkpoint_dir(workdir))
        last_saved = checkpointer.latest_step()
    if last_saved is not None:
        state = checkpointer.restore(last_saved, state, train_iter)
        if int(state.step) >= config.num_train_steps:
            logging.info("Already finished at step %d, %s", int(state.step), _summary_line(
                state, checkpointer, workdir, split=dataset.eval_split))
            logging.info("To train longer, raise --config.num_train_steps (now %d).",
                         config.num_train_steps)
            checkpointer.close()
            train_iter.close()
            return state
        logging.info("Resuming from the checkpoint of step %d", last_saved)
    else:
        if pretrained:
            state = with_pretrained_weights(state, pretrained, experiment.mesh)
        if config.model.get("init_from"):  # Every parameter, the pretrained ones included.
            state = with_workdir_weights(state, config.model.init_from)

    # --- The run starts: its files ---------------------------------------------------------
    if main_process:
        os.makedirs(workdir, exist_ok=True)
        for change in changes:
            logging.info("Config changed since the last run (allowed on resume): %s", change)
        save_config(config, workdir)
    parallel.sync("workdir_ready")
    if checkpointer is None:
        checkpointer = checkpoints.Checkpointer(checkpoint_dir(workdir))
    # TensorBoard only: lcseg's own progress line replaces CLU's logging writer.
    writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(workdir)])
              if main_process else metric_writers.MultiWriter([]))
    initial_step = int(state.step)
    if initial_step == 0 and main_process:
        hparams = {k: str(v) if isinstance(v, (list, tuple)) else v
                   for k, v in traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                   if v is not None}
        writer.write_hparams(hparams)
    normalisation = {"mean": list(config.dataset.mean), "std": list(config.dataset.std)}
    logging.info("Training %s on %s in %s: steps %d to %d on %d %s device(s), %d process(es)",
                 config.model.name, dataset.name, workdir, initial_step + 1,
                 config.num_train_steps, jax.device_count(), jax.devices()[0].platform,
                 jax.process_count())

    # --- Loop ---------------------------------------------------------------------------
    progress = cli.Progress(config.num_train_steps, unit="step")
    compiled_step = None
    step_metrics, input_wait, interval_start = [], 0.0, time.perf_counter()
    step = initial_step
    # However the loop ends (a divergence included), pending saves finish first: the last
    # good checkpoint is always complete on disk.
    try:
        # A stop signal (SIGTERM, SIGINT, config.preemption_signal) on any process makes
        # every process checkpoint the current step and exit (lcseg/preemption.py).
        with metric_writers.ensure_flushes(writer), \
                preemption.StopSignal(config.preemption_signal) as stop_signal:
            for step in range(initial_step + 1, config.num_train_steps + 1):
                is_last = step == config.num_train_steps
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    wait_start = time.perf_counter()
                    batch = parallel.shard_batch(next(train_iter), experiment.mesh)
                    input_wait += time.perf_counter() - wait_start
                    if compiled_step is None:
                        # Compile once, ahead of time, and read XLA's cost analysis from it.
                        compiled_step = experiment.train_step.lower(state, batch).compile()
                        write_model_summary(workdir, config, state,
                                            experiment.lower_for_flops(state, batch),
                                            compiled_step)
                        interval_start = time.perf_counter()
                    state, metrics = compiled_step(state, batch)
                    step_metrics.append(metrics)
                # At most one step queued behind the running one (the device stays busy): a
                # stop signal waits for those two, not for every step dispatched ahead.
                if len(step_metrics) > 1:
                    jax.block_until_ready(step_metrics[-2])
                preempted = stop_signal.requested() and not is_last  # All processes agree.

                do_eval = step % config.eval_every_steps == 0 or is_last
                do_save = do_eval or step % config.checkpoint_every_steps == 0 or preempted
                if step % config.log_every_steps == 0 or do_save:
                    averaged = {k: float(np.mean(v)) for k, v in
                                jax.device_get(jax.tree.map(lambda *x: jnp.stack(x),
                                                            *step_metrics)).items()}
                    _check_finite(averaged, step, last_saved, workdir)
                    now = time.perf_counter()
                    summary = {f"train/{k}": v for k, v in averaged.items()}
                    summary["timing/step_seconds"] = (now - interval_start) / len(step_metrics)
                    summary["steps_per_sec"] = len(step_metrics) / max(now - interval_start,
                                                                       1e-9)
                    # When the input wait nears the step time, the loader is the bottleneck.
                    summary["timing/input_wait_seconds"] = input_wait / len(step_metrics)
                    writer.write_scalars(step, summary)
                    step_metrics, input_wait, interval_start = [], 0.0, now
                    progress.report(step, loss=averaged["loss"])
                elif step == initial_step + 1 or progress.due():
                    # The first step (compilation included) and then at least every
                    # progress.every_seconds, whatever log_every_steps says.
                    progress.report(step, loss=float(metrics["loss"]))

                eval_scores, stop_early = None, False
                if do_eval:
                    eval_start = time.perf_counter()
                    eval_scores = experiment.evaluate_split(state, eval_source)
                    panels = experiment.predict_panels(state, panel_examples)
                    writer.write_scalars(step, {
                        "timing/eval_seconds": time.perf_counter() - eval_start})
                    _report_evaluation(writer, step, eval_scores, panels, experiment.metadata,
                                       workdir=workdir, split=dataset.eval_split)
                    tracker = update_tracker(state.tracker, eval_scores["miou"], config)
                    state = state.replace(tracker=jax.device_put(
                        tracker, parallel.replicated(experiment.mesh)))
                    writer.write_scalars(step, {"train/lr_scale": float(tracker["lr_scale"])})
                    patience = config.early_stopping_patience
                    stop_early = patience > 0 and tracker["evals_since_best"] >= patience
                if do_save or stop_early:
                    ranking = ({checkpoints.BEST_METRIC: eval_scores["miou"]}
                               if eval_scores else None)
                    checkpointer.save(step, state, train_iter, metrics=ranking,
                                      normalisation=normalisation)
                    last_saved = step
                if do_eval or do_save:  # Keep evaluation out of the step timing.
                    interval_start = time.perf_counter()
                    progress.pause_ended()
                if stop_early:
                    logging.info("Early stopping at step %d: no better validation mIoU in %d "
                                 "evaluations (best %.4f).", step, patience,
                                 float(state.tracker["best_miou"]))
                    break
                if preempted:
                    checkpointer.wait()  # Committed before the process goes.
                    logging.warning("Stopped on a signal at step %d, checkpointed; exiting with "
                                    "status %d (run again to resume).", step,
                                    preemption.EXIT_STATUS)
                    raise preemption.Preempted(step)
        checkpointer.wait()
        logging.info("Finished at step %d, %s", step, _summary_line(
            state, checkpointer, workdir, split=dataset.eval_split))
    finally:
        checkpointer.wait()
        checkpointer.close()
        # Loader workers stop and free their shared memory now, not at interpreter exit
        # (where multiprocessing's resource tracker would warn of "leaked" objects).
        train_iter.close()
        experiment.close()
    return state
