"""Optimisers and learning-rate schedules, all pure functions of the step.

The learning rate at step ``s`` is ``schedule(s) * lr_scale``: ``schedule`` comes from the
config (constant, step, cosine, linear, one-cycle; warmup included) and ``lr_scale`` is
the reduce-on-plateau multiplier, which lives in the train state and is checkpointed.
Both are read inside the compiled step, so a resumed run continues the very same
learning-rate sequence.

The optimiser is wrapped in ``optax.inject_hyperparams`` so that the step can set the
learning rate it computed: weight decay (AdamW) and momentum then see the same value a
plain optax schedule would give.
"""

from __future__ import annotations

import ml_collections
import optax

SCHEDULES = ("constant", "step", "cosine", "linear", "onecycle")
OPTIMIZERS = ("adam", "adamw", "sgd")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The configured learning rate as a function of the (0-based) update step.

    Args:
      config: reads ``schedule``, ``learning_rate`` (the peak), ``warmup_steps``,
        ``num_train_steps``, ``end_learning_rate_factor``, ``step_boundaries`` (fractions
        of the run) and ``step_factor``.

    Returns:
      An optax schedule (step -> learning rate).
    """
    peak = config.learning_rate
    total = max(config.num_train_steps, 1)
    warmup = min(config.warmup_steps, total)
    end = peak * config.end_learning_rate_factor
    if config.schedule == "onecycle":
        # Warmup is the one-cycle's first phase; its length sets pct_start.
        return optax.cosine_onecycle_schedule(
            transition_steps=total, peak_value=peak,
            pct_start=max(warmup, 1) / total, div_factor=25.0, final_div_factor=1e4)
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "step":
        boundaries = {int(fraction * total) - warmup: config.step_factor
                      for fraction in config.step_boundaries}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=end / peak)
    elif config.schedule == "linear":
        main = optax.linear_schedule(peak, end, max(total - warmup, 1))
    else:
        raise ValueError(f"Unknown config.schedule {config.schedule!r}; valid: {SCHEDULES}")
    if warmup == 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), main], boundaries=[warmup])


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The configured optimiser, with gradient clipping, and an injectable learning rate.

    Args:
      config: reads ``optimizer``, ``learning_rate``, ``weight_decay``, ``momentum``,
        ``nesterov`` and ``grad_clip_norm``.

    Returns:
      A transformation whose state has ``hyperparams['learning_rate']`` (set each step).
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown config.optimizer {config.optimizer!r}; valid: {OPTIMIZERS}")

    def make(learning_rate):
        if config.optimizer == "adam":
            base = optax.adam(learning_rate)
        elif config.optimizer == "adamw":
            base = optax.adamw(learning_rate, weight_decay=config.weight_decay)
        else:  # SGD: L2 weight decay added to the gradient, as torch.optim.SGD does.
            base = optax.chain(
                optax.add_decayed_weights(config.weight_decay),
                optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov))
        if config.grad_clip_norm > 0:
            return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), base)
        return base

    return optax.inject_hyperparams(make)(learning_rate=config.learning_rate)
