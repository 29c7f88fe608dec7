"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

Reads top-down: writers, data, model and state, restore, compiled steps, then the loop
with its periodic actions (logging, evaluation, checkpointing). ``train_step`` and
``eval_step`` are pure functions of the state and a batch; under ``jax.jit`` with a
sharded batch they run data-parallel on every device of every host.
"""

# No `from __future__ import annotations`: clu's Collection reads real annotations.
import functools
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from clu import metrics as clu_metrics
from flax.training import train_state

from lcseg import checkpoints, losses, optim, parallel
from lcseg.class_weights import compute_class_weights
from lcseg.data import get_metadata, open_split, pipeline, prepare, train_class_counts
from lcseg.data.metadata import DatasetMetadata
from lcseg.metrics import ConfusionMatrix, scores_from_confusion, write_scores_json
from lcseg.models import create_model, load_pretrained, pretrained_normalisation
from lcseg.models import summary as model_summary
from lcseg.ops.fast_conv import fast_apply, should_use_fast_conv
from lcseg.visualize import comparison_panels, confusion_heatmap

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class TrainState(train_state.TrainState):
    """Flax's TrainState plus what else a run must resume exactly.

    Attributes:
      batch_stats: BatchNorm running statistics (float32).
      rng: the run's base random key (folded with the step for per-step randomness).
      ema_params: exponential moving average of ``params``, or None when off.
      tracker: validation-driven state, see ``init_tracker``.
    """

    batch_stats: Any
    rng: jax.Array
    ema_params: Any
    tracker: dict[str, jax.Array]


def init_tracker() -> dict[str, jax.Array]:
    """Validation history that reduce-on-plateau and early stopping act on.

    ``best_miou``: best validation mIoU so far; ``evals_since_best``: evaluations since
    it improved (early stopping); ``plateau_count``: evaluations without improvement since
    the last learning-rate reduction; ``lr_scale``: the reduce-on-plateau multiplier.
    Kept in the train state, so it is checkpointed and a resumed run continues it.
    """
    return {"best_miou": jnp.asarray(-1.0, jnp.float32),
            "evals_since_best": jnp.asarray(0, jnp.int32),
            "plateau_count": jnp.asarray(0, jnp.int32),
            "lr_scale": jnp.asarray(1.0, jnp.float32)}


def update_tracker(tracker: dict[str, Any], miou: float,
                   config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The tracker after an evaluation with validation ``miou`` (host-side, numpy).

    Reduce-on-plateau follows PyTorch's ReduceLROnPlateau (mode 'max', threshold 0): after
    ``plateau_patience`` evaluations without a new best, the scale is multiplied by
    ``plateau_factor`` (not below ``plateau_min_scale``) and the count restarts.
    """
    tracker = {k: np.asarray(v) for k, v in jax.device_get(tracker).items()}
    if miou > tracker["best_miou"]:
        tracker["best_miou"] = np.asarray(miou, np.float32)
        tracker["evals_since_best"] = np.asarray(0, np.int32)
        tracker["plateau_count"] = np.asarray(0, np.int32)
    else:
        tracker["evals_since_best"] = tracker["evals_since_best"] + 1
        tracker["plateau_count"] = tracker["plateau_count"] + 1
    if config.plateau_patience > 0 and tracker["plateau_count"] >= config.plateau_patience:
        tracker["lr_scale"] = np.asarray(
            max(float(tracker["lr_scale"]) * config.plateau_factor, config.plateau_min_scale),
            np.float32)
        tracker["plateau_count"] = np.asarray(0, np.int32)
    return tracker


@flax.struct.dataclass
class PixelWeightedLoss(clu_metrics.Average):
    """Mean loss over counted pixels: batches weigh by their number of labelled pixels."""

    @classmethod
    def from_model_output(cls, *, loss: jax.Array, counted: jax.Array,
                          **_: Any) -> "PixelWeightedLoss":
        return cls(total=loss * counted, count=counted)


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
    loss: PixelWeightedLoss
    confusion: ConfusionMatrix


# ---------------------------------------------------------------------------------------
# Building blocks: model, optimizer, state.
# ---------------------------------------------------------------------------------------


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
    return jnp.bfloat16 if config.half_precision else jnp.float32


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    return create_model(**config.model, num_classes=num_classes, dtype=compute_dtype(config))


def create_train_state(config: ml_collections.ConfigDict, model, mesh) -> TrainState:
    """Initialises parameters directly into their (replicated) shardings."""
    rng = jax.random.key(config.seed)
    size = config.crop_size

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32),
                               train=False)
        params = variables["params"]
        apply_fn = model.apply
        if should_use_fast_conv(config.fast_conv):
            apply_fn = fast_apply(apply_fn)  # Same parameters and results, faster backward.
        return TrainState.create(
            apply_fn=apply_fn, params=params, tx=optim.build_optimizer(config),
            batch_stats=variables.get("batch_stats", {}), rng=state_rng,
            ema_params=params if config.ema_decay > 0 else None, tracker=init_tracker())

    return jax.jit(init, out_shardings=parallel.replicated(mesh))(rng)


def abstract_train_state(config: ml_collections.ConfigDict, model, mesh) -> TrainState:
    """Shapes, dtypes and shardings of the state, without computing it (for restoring)."""
    state = jax.eval_shape(functools.partial(create_train_state, config, model, mesh))
    replicated = parallel.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        state)


# ---------------------------------------------------------------------------------------
# Steps (pure functions, jitted in train_and_evaluate).
# ---------------------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict[str, jax.Array], *, loss_fn: Callable,
               schedule: optax.Schedule, mean: tuple, std: tuple, dtype: jnp.dtype,
               grad_accum_steps: int = 1, ema_decay: float = 0.0,
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a (global, sharded) batch; returns the new state and metrics.

    With ``grad_accum_steps`` k > 1 the batch is processed as k sequential micro-batches
    (k times less activation memory) whose gradients are averaged into one update: the
    same update as the whole batch when every micro-batch counts the same number of
    pixels, except that BatchNorm normalises each micro-batch by its own statistics (as
    gradient accumulation in PyTorch does).
    """
    images = pipeline.normalize_images(batch["image"], mean, std, dtype)
    labels = batch["label"].astype(jnp.int32)
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def micro_step(batch_stats, micro_batch):
        micro_images, micro_labels = micro_batch

        def objective(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": batch_stats}, micro_images, train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_rng})
            total, components = loss_fn(logits.astype(jnp.float32), micro_labels)
            return total, (components, updates["batch_stats"])

        (loss, (components, batch_stats)), grads = jax.value_and_grad(
            objective, has_aux=True)(state.params)
        return batch_stats, (grads, {"loss": loss, **components})

    if grad_accum_steps == 1:
        batch_stats, (grads, loss_values) = micro_step(state.batch_stats, (images, labels))
    else:
        # Micro-batch i takes rows i, i+k, i+2k, ...: every device keeps its own rows, so
        # splitting the sharded batch needs no communication.
        def split(x):
            x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
            return jnp.moveaxis(x, 1, 0)

        batch_stats, (grads, loss_values) = jax.lax.scan(
            micro_step, state.batch_stats, (split(images), split(labels)))
        grads, loss_values = jax.tree.map(lambda x: jnp.mean(x, axis=0), (grads, loss_values))

    learning_rate = schedule(state.step) * state.tracker["lr_scale"]
    state.opt_state.hyperparams["learning_rate"] = learning_rate
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if ema_decay > 0:
        state = state.replace(ema_params=jax.tree.map(
            lambda ema, new: ema_decay * ema + (1 - ema_decay) * new,
            state.ema_params, state.params))
    metrics = {"loss": loss_values.pop("loss"), "grad_norm": optax.global_norm(grads),
               "learning_rate": learning_rate,
               **{f"loss/{name}": value for name, value in loss_values.items()}}
    return state, metrics


def inference_variables(state: TrainState) -> dict[str, Any]:
    """The variables evaluation and prediction use: EMA parameters when kept."""
    params = state.ema_params if state.ema_params is not None else state.params
    return {"params": params, "batch_stats": state.batch_stats}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, loss_fn: Callable,
              mean: tuple, std: tuple, dtype: jnp.dtype, num_classes: int) -> EvalMetrics:
    """Loss (weighted by counted pixels) and confusion matrix of one batch."""
    images = pipeline.normalize_images(batch["image"], mean, std, dtype)
    labels = batch["label"].astype(jnp.int32)
    logits = state.apply_fn(inference_variables(state), images,
                            train=False).astype(jnp.float32)
    loss, _ = loss_fn(logits, labels)
    counted = jnp.sum((labels >= 0) & (labels < num_classes)).astype(jnp.float32)
    return EvalMetrics.single_from_model_output(
        loss=loss, counted=counted, labels=labels, predictions=jnp.argmax(logits, axis=-1),
        num_classes=num_classes)


def predict_step(state: TrainState, images: jax.Array, *, mean: tuple, std: tuple,
                 dtype: jnp.dtype) -> jax.Array:
    """Class indices ``[N, H, W]`` for uint8 images."""
    logits = state.apply_fn(inference_variables(state),
                            pipeline.normalize_images(images, mean, std, dtype), train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------
# Evaluation loop (shared by training and lcseg.evaluate).
# ---------------------------------------------------------------------------------------


def evaluate(eval_fn: Callable, state: TrainState, batches: Iterable[dict[str, np.ndarray]],
             *, mesh, empty_batch: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    """Runs ``eval_fn`` over all batches (all processes in step) and returns the scores.

    Processes may hold different numbers of batches; one that runs out feeds all-ignored
    batches until every process is done, since each step is a collective computation.
    """
    merged = None
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not parallel.any_process_true(batch is not None):
            break
        step_metrics = eval_fn(state, parallel.shard_batch(
            batch if batch is not None else empty_batch, mesh))
        # Merging on host accumulates the confusion matrix in int64.
        step_metrics = jax.device_get(step_metrics)
        merged = step_metrics if merged is None else merged.merge(step_metrics)
    if merged is None:
        raise ValueError("The evaluation split is empty.")
    matrix = merged.confusion.compute()
    return {"loss": float(merged.loss.compute()), "confusion_matrix": matrix,
            **scores_from_confusion(matrix)}


def scalar_summaries(scores: dict[str, Any], metadata: DatasetMetadata,
                     prefix: str) -> dict[str, float]:
    """Flattens scores to ``{prefix/miou, prefix/iou/<class>, ...}`` for the writer."""
    summary = {f"{prefix}/{key}": scores[key]
               for key in ("loss", "miou", "accuracy", "mean_accuracy", "fwiou", "mean_f1")}
    for key in ("iou", "f1", "precision", "recall"):
        for name, value in zip(metadata.class_names, scores[key]):
            summary[f"{prefix}/{key}/{name}"] = float(value)
    return summary


def format_scores_table(scores: dict[str, Any], metadata: DatasetMetadata) -> str:
    """A per-class table for logs and the terminal."""
    lines = [f"{'class':<20}{'IoU':>8}{'F1':>8}{'prec.':>8}{'recall':>8}"]
    for index, name in enumerate(metadata.class_names):
        lines.append(f"{name:<20}" + "".join(
            f"{scores[key][index]:>8.4f}" for key in ("iou", "f1", "precision", "recall")))
    lines.append(f"{'mean':<20}{scores['miou']:>8.4f}{scores['mean_f1']:>8.4f}")
    lines.append(f"pixel accuracy {scores['accuracy']:.4f}, mean accuracy "
                 f"{scores['mean_accuracy']:.4f}, frequency-weighted IoU {scores['fwiou']:.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Wiring shared by training, evaluation and prediction.
# ---------------------------------------------------------------------------------------


class Experiment:
    """Model, loss and compiled steps of a config, on the current devices."""

    def __init__(self, config: ml_collections.ConfigDict, *, class_weights=None, mesh=None,
                 schedule: optax.Schedule | None = None):
        self.config = config
        # The learning-rate finder passes its own sweep; training uses the config's.
        self.schedule = schedule or optim.learning_rate_schedule(config)
        self.metadata = get_metadata(config.dataset.name)
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.model = build_model(config, self.metadata.num_classes)
        self.loss_fn = losses.make_loss_fn(
            config.loss, num_classes=self.metadata.num_classes,
            ignore_label=self.metadata.ignore_label, class_weights=class_weights)
        normalisation = dict(mean=tuple(config.dataset.mean), std=tuple(config.dataset.std),
                             dtype=compute_dtype(config))
        replicated = parallel.replicated(self.mesh)
        batch = parallel.batch_sharding(self.mesh)
        # Donating the old state lets XLA update parameters in place (half the memory).
        self.train_step = jax.jit(
            functools.partial(train_step, loss_fn=self.loss_fn, schedule=self.schedule,
                              grad_accum_steps=config.grad_accum_steps,
                              ema_decay=config.ema_decay, **normalisation),
            in_shardings=(replicated, batch), out_shardings=(replicated, replicated),
            donate_argnums=0)
        self.eval_step = jax.jit(
            functools.partial(eval_step, loss_fn=self.loss_fn,
                              num_classes=self.metadata.num_classes, **normalisation),
            in_shardings=(replicated, batch), out_shardings=replicated)
        self.predict_step = jax.jit(functools.partial(predict_step, **normalisation),
                                    in_shardings=(replicated, batch), out_shardings=replicated)

    def train_iterator(self, source) -> Any:
        """The training batches of ``source`` as the config describes them."""
        config = self.config
        return pipeline.train_iterator(
            source, batch_size=config.batch_size, crop_size=config.crop_size,
            seed=config.seed, workers=config.data.workers,
            ignore_label=self.metadata.ignore_label, augment=config.augment,
            downscale=config.data.downscale)

    def init_state(self) -> TrainState:
        return create_train_state(self.config, self.model, self.mesh)

    def abstract_state(self) -> TrainState:
        return abstract_train_state(self.config, self.model, self.mesh)

    def evaluate_split(self, state: TrainState, source) -> dict[str, Any]:
        config = self.config
        ignore = self.metadata.ignore_label
        return evaluate(
            self.eval_step, state,
            pipeline.eval_batches(source, batch_size=config.eval_batch_size,
                                  tile_size=config.eval_tile_size, ignore_label=ignore,
                                  downscale=config.data.downscale),
            mesh=self.mesh, num_classes=self.metadata.num_classes,
            empty_batch=pipeline.empty_batch(config.eval_batch_size, config.eval_tile_size,
                                             ignore))

    def predict_panels(self, state: TrainState, examples: list[dict[str, Any]]) -> np.ndarray:
        """``image | truth | prediction`` panels of examples' top-left eval tiles."""
        tile = self.config.eval_tile_size
        tiles = [next(pipeline.image_tiles(e["image"], e["label"], tile,
                                           self.metadata.ignore_label,
                                           downscale=self.config.data.downscale))
                 for e in examples]
        images = np.stack([t[0] for t in tiles])
        labels = np.stack([t[1] for t in tiles])
        # Every process holds the same panel batch; pad it to a multiple of the devices.
        padded = -len(images) % self.mesh.size
        batch = np.concatenate([images, np.zeros((padded, *images.shape[1:]), np.uint8)])
        predictions = np.asarray(self.predict_step(
            state, jax.device_put(batch, parallel.batch_sharding(self.mesh))))[:len(images)]
        return comparison_panels(images, labels, predictions, self.metadata)


def resolve_class_weights(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """Class weights from the config's scheme and the training split's class counts.

    The counts recorded at preparation describe the dataset's "train" split; training on
    another split (e.g. LoveDA's ``train_rural``) counts that split's pixels instead.
    """
    scheme = config.class_weights
    if isinstance(scheme, str) and scheme == "none":
        return None
    dataset = config.dataset
    if dataset.train_split == "train":
        counts = train_class_counts(dataset.name, dataset.data_dir)
    else:
        from lcseg.class_stats import count_class_pixels  # Only needed here.

        logging.info("Counting class pixels of %s/%s for class weights", dataset.name,
                     dataset.train_split)
        metadata = get_metadata(dataset.name)
        counts, _ = count_class_pixels(open_split(dataset.name, dataset.train_split,
                                                  dataset.data_dir),
                                       metadata.num_classes, metadata.ignore_label)
    return compute_class_weights(scheme if isinstance(scheme, str) else list(scheme), counts)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the config next to the checkpoints (evaluate / predict read it back)."""
    path = os.path.join(workdir, CONFIG_FILE)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.write(config.to_json(indent=2))
    os.replace(temporary, path)  # Never a half-written config.


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with; fields added to lcseg since take defaults."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
    with open(path) as f:
        saved = json.load(f)
    from configs import default  # The defaults live with the configs.

    def merge(defaults: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        merged = dict(defaults)
        for key, value in values.items():
            # config.model holds the chosen model's own options: take it as saved.
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "model":
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value
        return merged

    return ml_collections.ConfigDict(merge(default.get_config().to_dict(), saved))


# ---------------------------------------------------------------------------------------
# The training loop.
# ---------------------------------------------------------------------------------------


def _check_finite(metrics: dict[str, float], step: int, last_saved: int | None,
                  workdir: str) -> None:
    if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        where = (f"the last good checkpoint (step {last_saved}) is intact in "
                 f"{os.path.join(workdir, CHECKPOINT_DIR)}" if last_saved is not None
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


def step_summary(compiled: jax.stages.Compiled, *, batch_size: int) -> dict[str, float]:
    """FLOPs and memory of one compiled train step, from XLA's own analyses.

    ``temp_gib`` is XLA's temporary buffer size: activations kept for the backward pass
    plus workspace, i.e. the activation memory estimate (per device).
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    summary = {"gflops_per_step": float(cost.get("flops", float("nan"))) / 1e9}
    summary["gflops_per_image"] = summary["gflops_per_step"] / batch_size
    memory = compiled.memory_analysis()
    if memory is not None:
        summary["temp_gib"] = memory.temp_size_in_bytes / 2**30
        summary["argument_gib"] = memory.argument_size_in_bytes / 2**30
    return summary


def write_model_summary(workdir: str, config: ml_collections.ConfigDict, state: TrainState,
                        compiled: jax.stages.Compiled) -> None:
    """Parameters per module, FLOPs and memory per step: to the log and WORKDIR/summary.txt."""
    lines = [f"Model {config.model.name}", model_summary(state.params)]
    figures = step_summary(compiled, batch_size=config.batch_size)
    # XLA's cost analysis counts one device's share of the data-parallel step (the step
    # runs on every device of the mesh, i.e. all of them): per image is per device batch.
    figures["gflops_per_image"] *= jax.device_count()
    lines.append(f"Train step (batch {config.batch_size} x {config.crop_size}^2): "
                 + ", ".join(f"{k} {v:.6g}" for k, v in figures.items()))
    # lcseg.compare reads this line: a speed is only comparable on the same hardware.
    device = jax.devices()[0]
    lines.append(f"Devices: {jax.device_count()} x {device.device_kind} "
                 f"(platform {device.platform}), processes {jax.process_count()}")
    text = "\n".join(lines)
    logging.info("%s", text)
    if parallel.is_main_process():
        with open(os.path.join(workdir, "summary.txt"), "w") as f:
            f.write(text + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Args:
      config: an experiment config (configs/default.py documents every field).
      workdir: where TensorBoard events, checkpoints and the config go.

    Returns:
      The final train state.
    """
    parallel.initialize_multihost(config.multihost)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    main_process = parallel.is_main_process()
    pretrained = config.model.get("pretrained")
    if pretrained:
        # Pretrained weights expect their own input statistics; recording them in the
        # config makes evaluation and prediction use them too.
        normalisation = pretrained_normalisation(pretrained)
        config.dataset.mean = tuple(normalisation["mean"])
        config.dataset.std = tuple(normalisation["std"])
    if main_process:
        os.makedirs(workdir, exist_ok=True)
        save_config(config, workdir)
    writer = metric_writers.create_default_writer(workdir, just_logging=not main_process)
    logging.info("Devices: %d (%s), processes: %d", jax.device_count(),
                 jax.devices()[0].platform, jax.process_count())
    parallel.local_batch_size(config.batch_size)  # Fail early on an indivisible batch.
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by "
                         f"config.grad_accum_steps={config.grad_accum_steps}.")

    # --- Data -------------------------------------------------------------------------
    dataset = config.dataset
    if main_process:  # One process prepares; the others wait and then read.
        prepare(dataset.name, dataset.data_dir, dataset.manual_dir)
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
    state = experiment.init_state()

    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, CHECKPOINT_DIR))
    last_saved = checkpointer.latest_step()
    if last_saved is not None:
        logging.info("Resuming from the checkpoint of step %d", last_saved)
        state = checkpointer.restore(last_saved, state, train_iter)
    elif pretrained:
        state = with_pretrained_weights(state, pretrained, experiment.mesh)
    initial_step = int(state.step)
    if initial_step == 0 and main_process:
        hparams = {k: str(v) if isinstance(v, (list, tuple)) else v
                   for k, v in _flatten(config.to_dict()).items() if v is not None}
        writer.write_hparams(hparams)
    normalisation = {"mean": list(config.dataset.mean), "std": list(config.dataset.std)}

    # --- Loop ---------------------------------------------------------------------------
    report_progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                                      writer=writer)
    compiled_step = None
    step_metrics, input_wait, interval_start = [], 0.0, time.perf_counter()
    # However the loop ends (a divergence included), pending saves finish first: the last
    # good checkpoint is always complete on disk.
    try:
        with metric_writers.ensure_flushes(writer):
            for step in range(initial_step + 1, config.num_train_steps + 1):
                is_last = step == config.num_train_steps
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    wait_start = time.perf_counter()
                    batch = parallel.shard_batch(next(train_iter), experiment.mesh)
                    input_wait += time.perf_counter() - wait_start
                    if compiled_step is None:
                        # Compile once, ahead of time, and read XLA's cost analysis from it.
                        compiled_step = experiment.train_step.lower(state, batch).compile()
                        write_model_summary(workdir, config, state, compiled_step)
                        interval_start = time.perf_counter()
                    state, metrics = compiled_step(state, batch)
                    step_metrics.append(metrics)
                report_progress(step, time.perf_counter())

                do_eval = step % config.eval_every_steps == 0 or is_last
                do_save = do_eval or step % config.checkpoint_every_steps == 0
                if step % config.log_every_steps == 0 or do_save:
                    averaged = {k: float(np.mean(v)) for k, v in
                                jax.device_get(jax.tree.map(lambda *x: jnp.stack(x),
                                                            *step_metrics)).items()}
                    _check_finite(averaged, step, last_saved, workdir)
                    now = time.perf_counter()
                    summary = {f"train/{k}": v for k, v in averaged.items()}
                    summary["timing/step_seconds"] = (now - interval_start) / len(step_metrics)
                    # When the input wait nears the step time, the loader is the bottleneck.
                    summary["timing/input_wait_seconds"] = input_wait / len(step_metrics)
                    writer.write_scalars(step, summary)
                    step_metrics, input_wait, interval_start = [], 0.0, now

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
                    with report_progress.timed("checkpoint"):
                        checkpointer.save(step, state, train_iter, metrics=ranking,
                                          normalisation=normalisation)
                    last_saved = step
                if do_eval or do_save:  # Keep evaluation out of the step timing.
                    interval_start = time.perf_counter()
                if stop_early:
                    logging.info("Early stopping at step %d: no better validation mIoU in %d "
                                 "evaluations (best %.4f).", step, patience,
                                 float(state.tracker["best_miou"]))
                    break
    finally:
        checkpointer.wait()
        checkpointer.close()
    return state


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
