"""Validation history: what reduce-on-plateau and early stopping act on.

The tracker is a dict of scalars kept in the train state (so it is checkpointed and a
resumed run continues it): ``init_tracker`` makes it, ``update_tracker`` advances it after
each evaluation (PyTorch's ``ReduceLROnPlateau`` and Lightning's ``EarlyStopping`` rules),
``check_tracker_config`` validates the config fields it reads, and ``upgrade_tracker``
completes one restored from an older checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def init_tracker() -> dict[str, jax.Array]:
    """Validation history that reduce-on-plateau and early stopping act on.

    Early stopping (strict improvement, PyTorch Lightning's rule): ``best_miou``, the
    best validation mIoU so far (-1 before the first evaluation); ``evals_since_best``,
    evaluations since it improved. Reduce-on-plateau (PyTorch's ReduceLROnPlateau state):
    ``plateau_best``, the best mIoU by the plateau threshold (-inf before the first);
    ``plateau_count``, evaluations without such an improvement (its ``num_bad_epochs``);
    ``cooldown_count``, evaluations left in the cooldown after a reduction;
    ``lr_scale``, the multiplier of the learning rate. ``update_tracker``
    documents the rules. Kept in the train state, so it is checkpointed and a resumed run
    continues it.

    Checkpoints written before ``plateau_best`` and ``cooldown_count`` existed lack them:
    ``lcseg.checkpoints`` restores without them and ``upgrade_tracker`` fills them in.
    """
    return {"best_miou": jnp.asarray(-1.0, jnp.float32),
            "evals_since_best": jnp.asarray(0, jnp.int32),
            "plateau_best": jnp.asarray(-jnp.inf, jnp.float32),
            "plateau_count": jnp.asarray(0, jnp.int32),
            "cooldown_count": jnp.asarray(0, jnp.int32),
            "lr_scale": jnp.asarray(1.0, jnp.float32)}


def upgrade_tracker(saved: dict[str, Any]) -> dict[str, Any]:
    """A tracker restored from an older checkpoint, with the entries it lacks filled in.

    lcseg before ``plateau_best`` and ``cooldown_count`` counted a plateau improvement as
    a new strict best (threshold 0) and had no cooldown: ``plateau_best = best_miou`` and
    ``cooldown_count = 0`` continue that run exactly as it would have gone on.
    """
    filled = dict(jax.device_get(init_tracker()))
    filled["plateau_best"] = saved.get("best_miou", filled["plateau_best"])
    filled.update(saved)
    return filled


# Reduce-on-plateau's ``eps`` (PyTorch's default): a reduction of the scale smaller than
# this is skipped, so a scale already at (or within eps of) its floor stays put.
PLATEAU_EPS = 1e-8
PLATEAU_THRESHOLD_MODES = ("rel", "abs")


def check_tracker_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when a plateau / early-stopping value is invalid.

    Called before training starts (a bad value fails at once, not at the first
    evaluation) and by ``update_tracker``.
    """
    def integer(name: str) -> int:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"config.{name} must be an integer >= 0, got {value!r}")
        return int(value)

    integer("plateau_patience")
    integer("plateau_cooldown")
    integer("early_stopping_patience")
    if not 0.0 <= config.plateau_factor < 1.0:
        raise ValueError(f"config.plateau_factor must be in [0, 1) (the lr is multiplied by "
                         f"it), got {config.plateau_factor!r}")
    if not 0.0 <= config.plateau_min_scale <= 1.0:
        raise ValueError(f"config.plateau_min_scale must be in [0, 1], got "
                         f"{config.plateau_min_scale!r}")
    if not (np.isfinite(config.plateau_threshold) and config.plateau_threshold >= 0):
        raise ValueError(f"config.plateau_threshold must be a finite number >= 0, got "
                         f"{config.plateau_threshold!r}")
    if config.plateau_threshold_mode not in PLATEAU_THRESHOLD_MODES:
        raise ValueError(f"config.plateau_threshold_mode must be one of "
                         f"{PLATEAU_THRESHOLD_MODES}, got {config.plateau_threshold_mode!r}")


def update_tracker(tracker: dict[str, Any], miou: float,
                   config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The tracker after an evaluation with validation ``miou`` (host-side, numpy).

    Reduce-on-plateau is PyTorch's ``ReduceLROnPlateau(mode='max', factor=plateau_factor,
    patience=plateau_patience, threshold=plateau_threshold,
    threshold_mode=plateau_threshold_mode, cooldown=plateau_cooldown,
    min_lr=plateau_min_scale, eps=1e-8)`` stepped once per evaluation on an optimizer
    whose lr is ``lr_scale`` (base 1.0), step for step:

    - the evaluation improves when ``miou > plateau_best * (1 + threshold)`` ('rel') or
      ``miou > plateau_best + threshold`` ('abs'); then ``plateau_best = miou`` and the
      bad count ``plateau_count`` restarts at 0, otherwise it grows by 1;
    - during a cooldown (``cooldown_count > 0`` before this evaluation) ``cooldown_count``
      goes down by 1 and bad evaluations are ignored (``plateau_count = 0``);
    - when ``plateau_count > plateau_patience`` the scale becomes
      ``max(lr_scale * factor, plateau_min_scale)`` unless that lowers it by no more than
      eps; the cooldown starts (``cooldown_count = plateau_cooldown``) and the count
      restarts.

    With a constant schedule this is ReduceLROnPlateau on the lr itself with
    ``min_lr = plateau_min_scale * learning_rate`` (eps is then ``1e-8 * learning_rate``).
    ``plateau_patience = 0`` turns it off (PyTorch's patience 0, "reduce at every
    evaluation without improvement", is not available). The mIoU is rounded to float32
    first, the tracker's (checkpointed) dtype; comparisons are then made in float64, so
    the decisions are PyTorch's for the rounded values.

    Early stopping and ``best_miou`` follow PyTorch Lightning's
    ``EarlyStopping(mode='max', min_delta=0, patience=early_stopping_patience)``: an
    evaluation improves when strictly above the best so far (``best_miou``, -1 before the
    first), which restarts ``evals_since_best`` at 0, otherwise it grows by 1; training
    stops when ``evals_since_best >= early_stopping_patience`` (0: off). No threshold: a
    new best, however small, is a better checkpoint.
    """
    check_tracker_config(config)
    tracker = {k: np.asarray(v) for k, v in jax.device_get(tracker).items()}
    miou = float(np.float32(miou))
    if miou > float(tracker["best_miou"]):
        tracker["best_miou"] = np.asarray(miou, np.float32)
        tracker["evals_since_best"] = np.asarray(0, np.int32)
    else:
        tracker["evals_since_best"] = tracker["evals_since_best"] + 1

    best = float(tracker["plateau_best"])
    threshold = config.plateau_threshold
    if config.plateau_threshold_mode == "rel":
        improved = miou > best * (1.0 + threshold)
    else:
        improved = miou > best + threshold
    bad = 0 if improved else int(tracker["plateau_count"]) + 1
    if improved:
        tracker["plateau_best"] = np.asarray(miou, np.float32)
    cooldown = int(tracker["cooldown_count"])
    if cooldown > 0:
        cooldown, bad = cooldown - 1, 0  # Bad evaluations during a cooldown do not count.
    if config.plateau_patience > 0 and bad > config.plateau_patience:
        old = float(tracker["lr_scale"])
        new = max(old * config.plateau_factor, config.plateau_min_scale)
        if old - new > PLATEAU_EPS:
            tracker["lr_scale"] = np.asarray(new, np.float32)
        cooldown, bad = config.plateau_cooldown, 0
    tracker["plateau_count"] = np.asarray(bad, np.int32)
    tracker["cooldown_count"] = np.asarray(cooldown, np.int32)
    return tracker
