"""The compiled pieces of an experiment: train state, steps and the evaluation loop.

``Experiment(config)`` builds, for the current devices, the model, the loss and the
jitted train, eval and predict steps, and the data pipeline of a config. Training
(``lcseg.train``), evaluation, prediction, the learning-rate finder and the benchmarks
share it. Nothing here writes files or logs metrics (that is ``lcseg.train``), so this
module needs neither TensorFlow nor TFDS: the GPU check runs it on machines that have
only JAX.

``train_step`` and ``eval_step`` are pure functions of the state and a batch; under
``jax.jit`` with a sharded batch they run data-parallel on every device of every host.
"""

# No `from __future__ import annotations`: clu's Collection reads real annotations.
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax.training import train_state

from lcseg import losses, optim, parallel
from lcseg.data import pipeline
from lcseg.data.metadata import get_metadata
from lcseg.metrics import (
    ConfusionMatrix,
    PerImageConfusion,
    per_image_scores,
    scores_from_confusion,
    tile_confusion_matrices,
)
from lcseg.models import create_model
from lcseg.ops.fast_conv import fast_apply, should_use_fast_conv
from lcseg.tracker import init_tracker
from lcseg.visualize import comparison_panels


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
        state = TrainState.create(
            apply_fn=apply_fn, params=params, tx=optim.build_optimizer(config),
            batch_stats=variables.get("batch_stats", {}), rng=state_rng,
            ema_params=params if config.ema_decay > 0 else None, tracker=init_tracker())
        # flax starts the step at Python 0, a weakly typed int32 here; a restored
        # checkpoint's step is strongly typed, and the train step of a fresh state would be
        # another program than a resumed one's: compiled twice when one process has both.
        return state.replace(step=jnp.zeros((), jnp.int32))

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
               frozen: tuple[str, ...] = (), sampled_pixels: int = 0,
               ignore_label: int = 255) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a (global, sharded) batch; returns the new state and metrics.

    With ``grad_accum_steps`` k > 1 the batch is processed as k sequential micro-batches
    (k times less activation memory) whose gradients are averaged into one update: the
    same update as the whole batch when every micro-batch counts the same number of
    pixels, except that BatchNorm normalises each micro-batch by its own statistics (as
    gradient accumulation in PyTorch does).

    ``frozen`` (``config.frozen``) names parameters that get no gradient (not computed)
    and no update (the optimiser, ``optim.build_optimizer``, must be built with the same
    prefixes); ``grad_norm`` is then that of the trainable parameters' gradients.

    ``sampled_pixels`` k > 0 (``config.sampled_pixels``; stage one of the hypercolumn
    system) trains on k labelled pixels per image, drawn uniformly without replacement
    (``sample_labelled_pixels``): the model is called with ``pixels=`` and the loss sees
    those pixels' logits and labels only (class weights and the ignore label apply as
    for whole images).
    """
    images = pipeline.normalize_images(batch["image"], mean, std, dtype)
    labels = batch["label"].astype(jnp.int32)
    dropout_rng, sample_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))

    def micro_step(batch_stats, micro_batch):
        micro_images, micro_labels = micro_batch
        options = {}
        if sampled_pixels:
            pixels, micro_labels = sample_labelled_pixels(sample_rng, micro_labels,
                                                          sampled_pixels, ignore_label)
            # [n, k] pixels as an [n, k, 1] "image" for the loss.
            options, micro_labels = {"pixels": pixels}, micro_labels[:, :, None]

        def objective(params):
            params = optim.stop_frozen_gradients(params, frozen)
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": batch_stats}, micro_images, train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_rng}, **options)
            if sampled_pixels:
                logits = logits[:, :, None, :]
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
            # ema + (1 - d)(new - ema), not d ema + (1 - d) new: equal in exact arithmetic,
            # but this keeps an unchanged (frozen) parameter's average bit-identical.
            lambda ema, new: ema + (1 - ema_decay) * (new - ema),
            state.ema_params, state.params))
    metrics = {"loss": loss_values.pop("loss"), "grad_norm": optax.global_norm(grads),
               "learning_rate": learning_rate,
               **{f"loss/{name}": value for name, value in loss_values.items()}}
    return state, metrics


def sample_labelled_pixels(rng: jax.Array, labels: jax.Array, k: int, ignore_label: int
                           ) -> tuple[jax.Array, jax.Array]:
    """``k`` distinct labelled pixels per image, uniformly at random, and their labels.

    Gumbel top-k over the labelled pixels: a uniform sample without replacement, in one
    fixed-shape computation. An image with fewer than ``k`` labelled pixels fills its
    sample with unlabelled ones, whose label is ``ignore_label`` (so the loss skips them).

    Args:
      rng: a PRNG key.
      labels: int ``[N, H, W]``.
      k: pixels per image.
      ignore_label: the label that marks unlabelled pixels.

    Returns:
      ``(pixels, labels)``: int32 ``[N, k, 2]`` (row, column) and int32 ``[N, k]``.
    """
    n, height, width = labels.shape
    flat = labels.reshape(n, height * width)
    labelled = flat != ignore_label
    scores = jnp.where(labelled, jax.random.gumbel(rng, flat.shape), -jnp.inf)
    _, index = jax.lax.top_k(scores, k)
    picked = jnp.take_along_axis(flat, index, axis=1)
    pixels = jnp.stack([index // width, index % width], axis=-1).astype(jnp.int32)
    return pixels, picked.astype(jnp.int32)


def inference_variables(state: TrainState) -> dict[str, Any]:
    """The variables evaluation and prediction use: EMA parameters when kept."""
    params = state.ema_params if state.ema_params is not None else state.params
    return {"params": params, "batch_stats": state.batch_stats}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, loss_fn: Callable,
              mean: tuple, std: tuple, dtype: jnp.dtype, num_classes: int
              ) -> tuple[EvalMetrics, dict[str, jax.Array]]:
    """Loss (weighted by counted pixels) and confusion matrix of one batch.

    Returns:
      ``(metrics, tiles)``: the batch's ``EvalMetrics``, and, when the batch carries an
      ``image_index`` (int ``[B]``, which image each tile is from, -1 for padding),
      ``tiles = {'image_index': [B], 'confusion': int32 [B, C, C]}`` for per-image
      scores (``evaluate_batches``); otherwise ``{}``.
    """
    images = pipeline.normalize_images(batch["image"], mean, std, dtype)
    labels = batch["label"].astype(jnp.int32)
    logits = state.apply_fn(inference_variables(state), images,
                            train=False).astype(jnp.float32)
    loss, _ = loss_fn(logits, labels)
    counted = jnp.sum((labels >= 0) & (labels < num_classes)).astype(jnp.float32)
    predictions = jnp.argmax(logits, axis=-1)
    metrics = EvalMetrics.single_from_model_output(
        loss=loss, counted=counted, labels=labels, predictions=predictions,
        num_classes=num_classes)
    tiles = {}
    if "image_index" in batch:
        tiles = {"image_index": batch["image_index"],
                 "confusion": tile_confusion_matrices(labels, predictions,
                                                      num_classes=num_classes)}
    return metrics, tiles


def predict_step(state: TrainState, images: jax.Array, *, mean: tuple, std: tuple,
                 dtype: jnp.dtype) -> jax.Array:
    """Class indices ``[N, H, W]`` for uint8 images."""
    logits = state.apply_fn(inference_variables(state),
                            pipeline.normalize_images(images, mean, std, dtype), train=False)
    return jnp.argmax(logits, axis=-1).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------
# Evaluation loop (shared by training and lcseg.evaluate).
# ---------------------------------------------------------------------------------------


def evaluate_batches(eval_fn: Callable, state: TrainState,
                     batches: Iterable[dict[str, np.ndarray]], *, mesh,
                     empty_batch: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    """Runs ``eval_fn`` over all batches (all processes in step) and returns the scores.

    Processes may hold different numbers of batches; one that runs out feeds all-ignored
    batches until every process is done, since each step is a collective computation.

    The scores are those of one confusion matrix over the split (the benchmarks'
    protocol). When batches carry ``image_index`` (each tile's image, -1 for padding), the
    per-image scores of ``metrics.per_image_scores`` are added under their own names
    (``miou_per_image``, ``iou_per_image``, ``images_per_class``).
    """
    merged = None
    per_image = PerImageConfusion(num_classes)
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if not parallel.any_process_true(batch is not None):
            break
        # ``empty_batch`` must have the keys of real batches (``image_index`` included,
        # all -1): each step is one computation of the same structure on every process.
        step_metrics, tiles = eval_fn(state, parallel.shard_batch(
            batch if batch is not None else empty_batch, mesh))
        # Merging on host accumulates the confusion matrix in int64.
        step_metrics, tiles = jax.device_get((step_metrics, tiles))
        merged = step_metrics if merged is None else merged.merge(step_metrics)
        if tiles:  # global arrays: every process sees every process's tiles
            per_image.add(tiles["image_index"], tiles["confusion"])
    if merged is None:
        raise ValueError("The evaluation split is empty.")
    matrix = merged.confusion.compute()
    scores = {"loss": float(merged.loss.compute()), "confusion_matrix": matrix,
              **scores_from_confusion(matrix)}
    if len(per_image):
        scores.update(per_image_scores(per_image.compute()))
    return scores


# ---------------------------------------------------------------------------------------
# Wiring shared by training, evaluation and prediction.
# ---------------------------------------------------------------------------------------


def _takes_pixels(model: nn.Module) -> bool:
    """Whether the model can classify sampled pixels (``__call__(..., pixels=...)``)."""
    return "pixels" in inspect.signature(type(model).__call__).parameters


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
        if config.sampled_pixels and not _takes_pixels(self.model):
            raise ValueError(f"config.sampled_pixels={config.sampled_pixels} needs a model "
                             f"that classifies given pixels ('hypercolumn'); "
                             f"{config.model.name!r} does not. Set it to 0.")
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
                              ema_decay=config.ema_decay,
                              frozen=optim.frozen_prefixes(config),
                              sampled_pixels=config.sampled_pixels,
                              ignore_label=self.metadata.ignore_label, **normalisation),
            in_shardings=(replicated, batch), out_shardings=(replicated, replicated),
            donate_argnums=0)
        self.eval_step = jax.jit(
            functools.partial(eval_step, loss_fn=self.loss_fn,
                              num_classes=self.metadata.num_classes, **normalisation),
            in_shardings=(replicated, batch), out_shardings=replicated)
        self.predict_step = jax.jit(functools.partial(predict_step, **normalisation),
                                    in_shardings=(replicated, batch), out_shardings=replicated)
        self._eval_loaders: dict[int, pipeline.EvalBatches] = {}

    def train_iterator(self, source) -> Any:
        """The training batches of ``source`` as the config describes them."""
        config = self.config
        return pipeline.train_iterator(
            source, batch_size=config.batch_size, crop_size=config.crop_size,
            seed=config.seed, ignore_label=self.metadata.ignore_label,
            augment=config.augment, downscale=config.data.downscale,
            crops_per_image=config.data.crops_per_image,
            loader=pipeline.LoaderOptions.from_config(config.data))

    def init_state(self) -> TrainState:
        return create_train_state(self.config, self.model, self.mesh)

    def abstract_state(self) -> TrainState:
        return abstract_train_state(self.config, self.model, self.mesh)

    def lower_for_flops(self, state: TrainState, batch: dict[str, jax.Array]
                        ) -> jax.stages.Lowered:
        """The train step lowered with XLA's own convolutions, for counting its FLOPs.

        ``fast_conv``'s weight gradients loop over chunks, and XLA's cost analysis counts
        a loop body once: with them the U-Net's step reads ~30% fewer FLOPs than it does.
        """
        return self.train_step.lower(state.replace(apply_fn=self.model.apply), batch)

    def evaluate_split(self, state: TrainState, source) -> dict[str, Any]:
        config = self.config
        ignore = self.metadata.ignore_label
        # One loader per split for the whole run: its workers serve every evaluation.
        if id(source) not in self._eval_loaders:
            self._eval_loaders[id(source)] = pipeline.EvalBatches(
                source, batch_size=config.eval_batch_size, tile_size=config.eval_tile_size,
                ignore_label=ignore, downscale=config.data.downscale,
                loader=pipeline.LoaderOptions.from_config(config.data))
        return evaluate_batches(
            self.eval_step, state, self._eval_loaders[id(source)](),
            mesh=self.mesh, num_classes=self.metadata.num_classes,
            empty_batch=pipeline.empty_batch(config.eval_batch_size, config.eval_tile_size,
                                             ignore))

    def close(self) -> None:
        """Stops the evaluation loaders' worker processes (they serve every evaluation)."""
        for loader in self._eval_loaders.values():
            loader.close()
        self._eval_loaders.clear()

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
