"""Optimisers and learning-rate schedules, all pure functions of the step.

The learning rate at step ``s`` is ``schedule(s) * lr_scale``: ``schedule`` comes from the
config (constant, step, cosine, linear, one-cycle; warmup included) and ``lr_scale`` is
the reduce-on-plateau multiplier, which lives in the train state and is checkpointed.
Both are read inside the compiled step, so a resumed run continues the very same
learning-rate sequence.

The optimiser is wrapped in ``optax.inject_hyperparams`` so that the step can set the
learning rate it computed: weight decay (AdamW) and momentum then see the same value a
plain optax schedule would give.

Freezing (``config.frozen``): parameters under the listed path prefixes get no updates and
no optimiser state. The optimiser is then ``optax.multi_transform`` of the configured one
on the trainable parameters and ``optax.set_to_zero()`` on the frozen ones; the configured
one only ever sees the trainable parameters, so its moments, weight decay and gradient
clipping (a global norm over trainable gradients only) leave the frozen ones out, and its
state holds ``optax.MaskedNode()`` (no array) in their place.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
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
        # alpha is the end as a fraction of the peak: the factor itself (end / peak would
        # divide by zero for learning_rate=0, a valid debugging run that trains nothing).
        main = optax.cosine_decay_schedule(peak, max(total - warmup, 1),
                                           alpha=config.end_learning_rate_factor)
    elif config.schedule == "linear":
        main = optax.linear_schedule(peak, end, max(total - warmup, 1))
    else:
        raise ValueError(f"Unknown config.schedule {config.schedule!r}; valid: {SCHEDULES}")
    if warmup == 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), main], boundaries=[warmup])


def check_optimizer_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field when the optimiser or schedule cannot be built.

    Called before training starts, so that a typo fails before anything is written.
    ``learning_rate=0`` is allowed: a debugging run whose parameters never change.
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown config.optimizer {config.optimizer!r}; valid: {OPTIMIZERS}")
    if config.schedule not in SCHEDULES:
        raise ValueError(f"Unknown config.schedule {config.schedule!r}; valid: {SCHEDULES}")
    for name in ("learning_rate", "weight_decay", "warmup_steps", "end_learning_rate_factor",
                 "grad_clip_norm"):
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"config.{name}={value!r} must be a number >= 0.")


def parameter_path(key_path: Sequence[Any]) -> str:
    """The '/'-joined name of a parameter from its JAX key path (``encoder/conv1/kernel``)."""
    names = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        else:
            names.append(str(key))
    return "/".join(names)


def frozen_prefixes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.frozen`` as a tuple (configs saved before the field existed: none)."""
    frozen = config.get("frozen") or ()
    return (frozen,) if isinstance(frozen, str) else tuple(frozen)


def frozen_mask(params: Any, frozen: Sequence[str]) -> Any:
    """Which parameters ``frozen`` names: a tree like ``params`` of bools (True: frozen).

    A prefix matches on whole path components: ``encoder/layer1`` names
    ``encoder/layer1/conv1/kernel`` (and a parameter of exactly that path) but not
    ``encoder/layer10/...`` or ``encoder/layer1_extra/...``. Leading and trailing '/' are
    ignored.

    Args:
      params: the parameter tree (arrays or shape structs).
      frozen: '/'-joined path prefixes, e.g. ``('encoder',)``.

    Returns:
      The mask; all False when ``frozen`` is empty.

    Raises:
      ValueError: a prefix is empty or matches no parameter (a typo in config.frozen);
        the message lists the top-level paths, and the names under the part of the
        prefix that does exist.
    """
    prefixes = [tuple(prefix.strip("/").split("/")) for prefix in frozen]
    paths = [tuple(parameter_path(path).split("/"))
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for prefix, components in zip(frozen, prefixes):
        if components == ("",):
            raise ValueError(f"config.frozen has an empty prefix {prefix!r}: name a module, "
                             "e.g. 'encoder'.")
        if not any(path[:len(components)] == components for path in paths):
            raise _no_match_error(prefix, components, paths)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(
            tuple(parameter_path(path).split("/"))[:len(components)] == components
            for components in prefixes),
        params)


def _no_match_error(prefix: str, components: tuple[str, ...],
                    paths: list[tuple[str, ...]]) -> ValueError:
    """The error for a prefix that matches no parameter path: what exists, and where."""
    top_level = sorted({path[0] for path in paths})
    message = (f"config.frozen prefix {prefix!r} matches no parameter (prefixes match whole "
               f"'/'-separated path components); top-level paths: {top_level}")

    def common_length(path):
        return next((i for i, (a, b) in enumerate(zip(path, components)) if a != b),
                    min(len(path), len(components)))

    # Where the prefix goes astray, list what does exist there: a typo deep in a
    # backbone is then visible without printing the whole tree.
    depth = max(map(common_length, paths), default=0)
    if depth == 0:
        return ValueError(message)
    known = components[:depth]
    children = sorted({path[depth] for path in paths
                       if path[:depth] == known and len(path) > depth})
    if children:
        return ValueError(f"{message}; under {'/'.join(known)!r}: {children}")
    return ValueError(f"{message}; {'/'.join(known)!r} is a parameter, with nothing under it")


def stop_frozen_gradients(params: Any, frozen: Sequence[str]) -> Any:
    """``params`` with ``jax.lax.stop_gradient`` on the frozen ones (no-op when none).

    Differentiating through this, the frozen parameters' gradients are zeros that are
    never computed: backpropagation skips their weight gradients, and the activation
    gradients only they needed (a whole frozen backbone's).
    """
    if not frozen:
        return params
    return jax.tree.map(lambda p, is_frozen: jax.lax.stop_gradient(p) if is_frozen else p,
                        params, frozen_mask(params, frozen))


def check_saved_optimizer_state(saved: Any, target: Any) -> None:
    """Raises a clear error when a checkpoint's optimiser state does not fit ``target``.

    Which parameters have optimiser state depends on ``config.frozen`` (and on the
    optimiser and clipping): a run resumed with another ``config.frozen`` would otherwise
    fail deep in Orbax, or restore with no moments for newly trainable parameters.
    Comparing the paths of the arrays each tree holds catches both. Resuming with another
    ``config.frozen`` is not supported: unfreeze in a new run that starts from the
    weights instead.

    Args:
      saved: the checkpoint's ``opt_state`` as its metadata tree (nested dicts and
        lists, None where nothing is stored), or any pytree of it.
      target: the ``opt_state`` (arrays or shape structs) the config builds.

    Raises:
      ValueError: the two hold arrays at different paths; the message names a few.
    """
    def paths(tree):
        return {parameter_path(path) for path, _ in
                jax.tree_util.tree_flatten_with_path(tree)[0]}

    saved_paths, target_paths = paths(saved), paths(target)
    if saved_paths == target_paths:
        return
    only_saved = sorted(saved_paths - target_paths)
    only_target = sorted(target_paths - saved_paths)
    raise ValueError(
        "The checkpoint's optimiser state does not fit this config's: config.frozen (or "
        "config.optimizer, config.grad_clip_norm) differs from the run that saved it. "
        "Resume with that run's config, or start a new run from its weights. "
        f"State only in the checkpoint ({len(only_saved)}): {only_saved[:3]}; only in "
        f"this config's ({len(only_target)}): {only_target[:3]}")


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The configured optimiser, with gradient clipping, and an injectable learning rate.

    With ``config.frozen`` the frozen parameters' updates are zeros and the configured
    optimiser (clipping and weight decay included) sees only the trainable ones, so that
    it keeps no state for the frozen ones (see the module docstring). Without, the
    optimiser and its state's structure are those of lcseg before freezing existed, so
    older checkpoints still restore.

    Args:
      config: reads ``optimizer``, ``learning_rate``, ``weight_decay``, ``momentum``,
        ``nesterov``, ``grad_clip_norm`` and ``frozen``.

    Returns:
      A transformation whose state has ``hyperparams['learning_rate']`` (set each step).
    """
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown config.optimizer {config.optimizer!r}; valid: {OPTIMIZERS}")
    frozen = frozen_prefixes(config)

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
            base = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), base)
        if frozen:
            return optax.multi_transform(
                {"trainable": base, "frozen": optax.set_to_zero()}, labels)
        return base

    def labels(tree):
        # A function of the tree, not a fixed tree: the parameters do not exist yet when
        # the optimiser is built. Called at init, it rejects prefixes that match nothing.
        return jax.tree.map(lambda is_frozen: "frozen" if is_frozen else "trainable",
                            frozen_mask(tree, frozen))

    return optax.inject_hyperparams(make)(learning_rate=config.learning_rate)
