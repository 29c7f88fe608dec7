"""Segmentation losses.

Every loss is a pure function ``loss(logits, labels, *, **options) -> float32 scalar`` with

* ``logits``: ``[N, H, W, C]`` (any float dtype; computed in float32, so bf16 logits are fine),
* ``labels``: ``[N, H, W]`` integer class ids; pixels equal to ``ignore_label`` (and, because
  nothing can be raised inside ``jit``, any id outside ``[0, C)``) are *ignored*: they contribute
  nothing to any numerator, denominator or gradient. A batch with no counted pixel gives 0.0
  with an all-zero, finite gradient.

The region losses (dice, jaccard, tversky, focal_tversky, jdt, lovasz_softmax) are computed over
all counted pixels of the batch at once (one statistic per class, not per image), then averaged
over classes with ``class_weights`` (default uniform). ``smooth`` defaults to 1e-6: the per-class
sums are pixel counts of a whole batch, so ``smooth`` only has to make empty classes well defined,
not regularise; a class whose denominator is exactly 0 (possible with ``smooth=0``) scores 1.

Use :func:`make_loss_fn` to build a weighted combination from a config mapping.

Why one module of ~590 lines: the ten losses share one set of conventions (ignored
pixels, class weights, empty classes, float32) implemented once in the helpers at the
top; side by side, each loss is a few lines over them and the menu reads as one table.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
ClassWeights = ArrayLike | None

DEFAULT_SMOOTH = 1e-6


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _pixels_of(logits: Array, labels: Array, ignore_label: int) -> tuple[Array, Array, Array]:
    """Returns ``(log_probs [P, C] f32, one_hot [P, C] f32, valid [P] bool)``, P = N*H*W.

    ``one_hot`` is all-zero on ignored pixels, so sums over it only see counted pixels.
    """
    num_classes = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} does not match logits shape {logits.shape} "
            "(expected logits [..., C] and labels [...])"
        )
    logits = logits.astype(jnp.float32).reshape(-1, num_classes)
    # int32 first: comparing e.g. uint8 labels with ignore_label=-1 would overflow.
    labels = jnp.asarray(labels).astype(jnp.int32).reshape(-1)
    valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    # Replace ignored logits by constants *before* the softmax: their gradient is then exactly
    # zero and even inf/NaN logits at ignored pixels cannot leak NaN into the backward pass.
    logits = jnp.where(valid[:, None], logits, 0.0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    one_hot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=jnp.float32)
    return log_probs, one_hot * valid[:, None], valid


def _weight_vector(class_weights: ClassWeights, num_classes: int) -> Array:
    if class_weights is None:
        return jnp.ones((num_classes,), jnp.float32)
    weights = jnp.asarray(class_weights, jnp.float32)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights must have shape ({num_classes},), got {weights.shape}"
        )
    return weights


def _safe_div(num: Array, den: Array, empty: float) -> Array:
    """``num / den`` where ``den > 0``, else ``empty``; NaN-free in value and gradient."""
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), empty)


def _safe_pow(x: Array, gamma: float | Array) -> Array:
    """``max(x, 0) ** gamma`` with a finite gradient at 0 even for ``gamma < 1``."""
    if isinstance(gamma, (int, float)) and gamma == 1:
        return x
    x = jnp.maximum(x, 0.0)  # rounding can push 1 - score a hair below 0
    positive = x > 0
    # 0 ** gamma is taken from a constant so that no inf derivative meets a zero cotangent.
    return jnp.where(positive, jnp.where(positive, x, 1.0) ** gamma, jnp.float32(0.0) ** gamma)


def _probs_and_targets(
    logits: Array, labels: Array, ignore_label: int, label_smoothing: float | Array = 0.0
) -> tuple[Array, Array, Array]:
    """Returns masked ``(probs [P, C], targets [P, C], present [C] bool)``.

    Both are zero on ignored pixels. ``targets`` is the one-hot label, smoothed towards
    uniform by ``label_smoothing``; ``present`` says which classes have a counted pixel.
    """
    log_probs, one_hot, valid = _pixels_of(logits, labels, ignore_label)
    probs = jnp.where(valid[:, None], jnp.exp(log_probs), 0.0)
    num_classes = one_hot.shape[-1]
    eps = label_smoothing
    targets = jnp.where(valid[:, None], (1.0 - eps) * one_hot + eps / num_classes, 0.0)
    return probs, targets, jnp.sum(one_hot, axis=0) > 0


def _overlap_stats(
    logits: Array,
    labels: Array,
    ignore_label: int,
    *,
    label_smoothing: float | Array = 0.0,
    l1_overlap: bool = False,
) -> tuple[Array, Array, Array, Array]:
    """Per-class soft ``(tp, fp, fn, present)`` over all counted pixels of the batch.

    ``tp = sum(p * g)`` by default; with ``l1_overlap`` it is the JDT form
    ``(|p|_1 + |g|_1 - |p - g|_1) / 2``, which equals ``sum(p * g)`` for hard labels.
    ``fp = |p|_1 - tp`` and ``fn = |g|_1 - tp``.
    """
    probs, targets, present = _probs_and_targets(logits, labels, ignore_label, label_smoothing)
    p_sum, g_sum = jnp.sum(probs, axis=0), jnp.sum(targets, axis=0)
    if l1_overlap:
        tp = 0.5 * (p_sum + g_sum - jnp.sum(jnp.abs(probs - targets), axis=0))
    else:
        tp = jnp.sum(probs * targets, axis=0)
    return tp, p_sum - tp, g_sum - tp, present


def _class_mean(
    per_class: Array, present: Array, class_weights: ClassWeights, skip_absent_classes: bool
) -> Array:
    """Weighted mean over classes; 0 when no class (with non-zero weight) remains."""
    weights = _weight_vector(class_weights, per_class.shape[0])
    if skip_absent_classes:
        weights = jnp.where(present, weights, 0.0)
    return _safe_div(jnp.sum(weights * per_class), jnp.sum(weights), empty=0.0)


def _tversky_index(
    tp: Array, fp: Array, fn: Array, alpha: float, beta: float, smooth: float
) -> Array:
    return _safe_div(tp + smooth, tp + alpha * fp + beta * fn + smooth, empty=1.0)


# ----------------------------------------------------------------------------------------------
# Pixel-wise losses
# ----------------------------------------------------------------------------------------------


def cross_entropy(
    logits: Array,
    labels: Array,
    *,
    class_weights: ClassWeights = None,
    ignore_label: int = 255,
    label_smoothing: float = 0.0,
) -> Array:
    """Softmax cross-entropy with PyTorch ``F.cross_entropy(reduction='mean')`` semantics.

    With weights ``w`` (default 1), smoothing ``eps`` and ``C`` classes, each counted pixel
    with label ``y`` contributes ``(1 - eps) * w[y] * (-log p_y) + eps / C * sum_c w[c] *
    (-log p_c)``, and the sum is divided by ``sum(w[y])`` over counted pixels (PyTorch divides
    the smoothing term by that same weight sum). Unlike PyTorch, which returns NaN, a batch
    without counted pixels (or with zero total weight) gives 0.

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      class_weights: None or a length-C array of per-class weights.
      ignore_label: label id excluded from the loss.
      label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
      Float32 scalar loss.
    """
    log_probs, one_hot, valid = _pixels_of(logits, labels, ignore_label)
    num_classes = one_hot.shape[-1]
    weights = _weight_vector(class_weights, num_classes)
    pixel_weight = one_hot @ weights  # w[y], 0 on ignored pixels
    nll = -jnp.sum(one_hot * log_probs, axis=-1)
    smooth_term = jnp.where(valid, -(log_probs @ weights), 0.0)
    total = (1.0 - label_smoothing) * jnp.sum(pixel_weight * nll)
    total += label_smoothing / num_classes * jnp.sum(smooth_term)
    return _safe_div(total, jnp.sum(pixel_weight), empty=0.0)


def focal(
    logits: Array,
    labels: Array,
    *,
    gamma: float = 2.0,
    class_weights: ClassWeights = None,
    ignore_label: int = 255,
) -> Array:
    """Softmax focal loss (Lin et al. 2017).

    Per counted pixel ``-w[y] * (1 - p_y) ** gamma * log p_y``, summed and divided by
    ``sum(w[y])`` over counted pixels exactly like :func:`cross_entropy`, so that
    ``gamma = 0`` reproduces the (unsmoothed) cross-entropy.

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      gamma: focusing exponent ``>= 0``.
      class_weights: None or a length-C array of per-class weights (the alpha_t of the paper).
      ignore_label: label id excluded from the loss.

    Returns:
      Float32 scalar loss.
    """
    log_probs, one_hot, _ = _pixels_of(logits, labels, ignore_label)
    pixel_weight = one_hot @ _weight_vector(class_weights, one_hot.shape[-1])
    log_p_y = jnp.sum(one_hot * log_probs, axis=-1)  # 0 on ignored pixels
    modulator = _safe_pow(-jnp.expm1(log_p_y), gamma)  # (1 - p_y) ** gamma, accurate near p=1
    total = -jnp.sum(pixel_weight * modulator * log_p_y)
    return _safe_div(total, jnp.sum(pixel_weight), empty=0.0)


# ----------------------------------------------------------------------------------------------
# Region losses
# ----------------------------------------------------------------------------------------------


def dice(
    logits: Array,
    labels: Array,
    *,
    smooth: float = DEFAULT_SMOOTH,
    class_weights: ClassWeights = None,
    ignore_label: int = 255,
    skip_absent_classes: bool = False,
) -> Array:
    """Soft multi-class Dice loss.

    With ``p = softmax(logits)`` and one-hot ``g`` over the counted pixels of the batch,
    ``I_c = sum p_c g_c`` and ``Dice_c = (2 I_c + smooth) / (sum p_c + sum g_c + smooth)``;
    the loss is ``1 - sum_c w_c Dice_c / sum_c w_c``.

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      smooth: additive smoothing of numerator and denominator.
      class_weights: None (uniform) or a length-C array weighting the class mean.
      ignore_label: label id excluded from the loss.
      skip_absent_classes: drop classes without a counted ground-truth pixel from the mean
        (the loss is 0 when none remains). Otherwise an absent class scores ~0 unless no
        probability mass is put on it, i.e. it penalises false positives.

    Returns:
      Float32 scalar loss.
    """
    tp, fp, fn, present = _overlap_stats(logits, labels, ignore_label)
    # sum p + sum g = 2 tp + fp + fn.
    score = _safe_div(2.0 * tp + smooth, 2.0 * tp + fp + fn + smooth, empty=1.0)
    return _class_mean(1.0 - score, present, class_weights, skip_absent_classes)


def jaccard(
    logits: Array,
    labels: Array,
    *,
    smooth: float = DEFAULT_SMOOTH,
    class_weights: ClassWeights = None,
    ignore_label: int = 255,
    skip_absent_classes: bool = False,
) -> Array:
    """Soft multi-class Jaccard (IoU) loss.

    ``Jaccard_c = (I_c + smooth) / (sum p_c + sum g_c - I_c + smooth)`` with the notation of
    :func:`dice`; the loss is ``1 - sum_c w_c Jaccard_c / sum_c w_c``.

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      smooth: additive smoothing of numerator and denominator.
      class_weights: None (uniform) or a length-C array weighting the class mean.
      ignore_label: label id excluded from the loss.
      skip_absent_classes: drop classes without a counted ground-truth pixel from the mean.

    Returns:
      Float32 scalar loss.
    """
    tp, fp, fn, present = _overlap_stats(logits, labels, ignore_label)
    score = _tversky_index(tp, fp, fn, 1.0, 1.0, smooth)  # union = tp + fp + fn
    return _class_mean(1.0 - score, present, class_weights, skip_absent_classes)


def tversky(
    logits: Array,
    labels: Array,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    smooth: float = DEFAULT_SMOOTH,
    class_weights: ClassWeights = None,
    ignore_label: int = 255,
    skip_absent_classes: bool = False,
) -> Array:
    """Soft Tversky loss (Salehi et al. 2017).

    ``TI_c = (I_c + smooth) / (I_c + alpha FP_c + beta FN_c + smooth)`` with
    ``FP_c = sum p_c (1 - g_c)`` and ``FN_c = sum (1 - p_c) g_c``; the loss is
    ``1 - sum_c w_c TI_c / sum_c w_c``. ``alpha = beta = 0.5`` is Dice, ``alpha = beta = 1``
    is Jaccard (exactly so for ``smooth = 0``).

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      alpha: weight of false positives.
      beta: weight of false negatives (``beta > alpha`` favours recall).
      smooth: additive smoothing of numerator and denominator.
      class_weights: None (uniform) or a length-C array weighting the class mean.
      ignore_label: label id excluded from the loss.
      skip_absent_classes: drop classes without a counted ground-truth pixel from the mean.

    Returns:
      Float32 scalar loss.
    """
    tp, fp, fn, present = _overlap_stats(logits, labels, ignore_label)
    score = _tversky_index(tp, fp, fn, alpha, beta, smooth)
    return _class_mean(1.0 - score, present, class_weights, skip_absent_classes)


def focal_tversky(
    logits: Array,
    labels: Array,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    gamma: float = 0.75,
    smooth: float = DEFAULT_SMOOTH,
    class_weights: ClassWeights = None,
    ignore_label: int = 255,
    skip_absent_classes: bool = False,
) -> Array:
    """Focal Tversky loss (Abraham & Khan 2019): ``sum_c w_c (1 - TI_c) ** gamma / sum_c w_c``.

    ``TI_c`` as in :func:`tversky`. Note the conventions: here ``gamma`` is the exponent
    itself (the paper writes ``1/gamma`` and recommends ``gamma = 4/3``, i.e. 0.75 here) and
    ``alpha`` weights false positives (the paper's ``alpha = 0.7`` weights false negatives,
    i.e. ``beta = 0.7`` here). Defaults follow the paper's recommendation. The paper sums over
    classes; we take the (weighted) mean so the scale does not grow with ``C``.

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      alpha: weight of false positives.
      beta: weight of false negatives.
      gamma: exponent applied to each class's ``1 - TI_c``.
      smooth: additive smoothing of numerator and denominator.
      class_weights: None (uniform) or a length-C array weighting the class mean.
      ignore_label: label id excluded from the loss.
      skip_absent_classes: drop classes without a counted ground-truth pixel from the mean.

    Returns:
      Float32 scalar loss.
    """
    tp, fp, fn, present = _overlap_stats(logits, labels, ignore_label)
    per_class = _safe_pow(1.0 - _tversky_index(tp, fp, fn, alpha, beta, smooth), gamma)
    return _class_mean(per_class, present, class_weights, skip_absent_classes)


def jdt(
    logits: Array,
    labels: Array,
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    smooth: float = DEFAULT_SMOOTH,
    label_smoothing: float = 0.0,
    class_weights: ClassWeights = None,
    ignore_label: int = 255,
    skip_absent_classes: bool = True,
) -> Array:
    """Jaccard Metric / Dice Semimetric / Tversky loss ("JDT", Wang, Ning & Blaschko 2023).

    As in the authors' reference implementation (github.com/zifuwanggg/JDTLosses, ``JDTLoss``
    with ``mIoUD=1``, ``norm=1``): for each class, with ``x`` the probabilities and ``y`` the
    (soft) labels over all counted pixels of the batch,

        tp = (|x|_1 + |y|_1 - |x - y|_1) / 2,   fp = |x|_1 - tp,   fn = |y|_1 - tp,
        loss_c = (1 - (tp + smooth) / (tp + alpha fp + beta fn + smooth)) ** gamma,

    and the loss is ``sum_c w_c loss_c / sum_c w_c`` over the active classes.
    ``alpha = beta = 1`` is the Jaccard metric loss (JML), ``alpha = beta = 0.5`` the Dice
    semimetric loss (DML), other values the Tversky loss. For hard labels
    ``|x - y|_1 = |x|_1 + |y|_1 - 2 sum x y``, so ``tp = sum x y`` and JDT equals
    :func:`jaccard` / :func:`tversky` (and :func:`dice` up to the smoothing term); the L1 form
    matters for soft labels (here: ``label_smoothing``), where it stays a (semi)metric and is
    minimised by ``x = y``, unlike the soft-Jaccard/Dice product form.

    Differences from the reference code: ``smooth`` defaults to 1e-6 like our other region
    losses (reference: 1e-3; immaterial for batch-level pixel sums); ``gamma < 1`` is allowed;
    class weights enter a *normalised* weighted mean (reference: plain mean of ``w_c loss_c``;
    identical for uniform weights); active classes are those with a counted hard-label pixel
    (reference "PRESENT" mode) also when ``label_smoothing > 0``.

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      alpha: weight of false positives.
      beta: weight of false negatives.
      gamma: exponent applied to each class's loss.
      smooth: additive smoothing of numerator and denominator.
      label_smoothing: soft labels ``y = (1 - eps) onehot + eps / C`` on counted pixels.
      class_weights: None (uniform) or a length-C array weighting the class mean.
      ignore_label: label id excluded from the loss.
      skip_absent_classes: average only over classes present in the batch (reference
        default); otherwise over all classes.

    Returns:
      Float32 scalar loss.
    """
    tp, fp, fn, present = _overlap_stats(
        logits, labels, ignore_label, label_smoothing=label_smoothing, l1_overlap=True
    )
    per_class = _safe_pow(1.0 - _tversky_index(tp, fp, fn, alpha, beta, smooth), gamma)
    return _class_mean(per_class, present, class_weights, skip_absent_classes)


def _lovasz_grad(fg_sorted: Array) -> Array:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (axis 0)."""
    gts = jnp.sum(fg_sorted, axis=0)
    intersection = gts - jnp.cumsum(fg_sorted, axis=0)
    union = gts + jnp.cumsum(1.0 - fg_sorted, axis=0)  # >= 1 everywhere, never 0
    jac = 1.0 - intersection / union
    return jnp.concatenate([jac[:1], jnp.diff(jac, axis=0)], axis=0)


def lovasz_softmax(
    logits: Array,
    labels: Array,
    *,
    ignore_label: int = 255,
    skip_absent_classes: bool = True,
    class_weights: ClassWeights = None,
) -> Array:
    """Lovász-softmax loss (Berman et al. 2018), flattened over the batch (``per_image=False``).

    Per class ``c``: errors ``e = |g_c - p_c|`` sorted in decreasing order, loss
    ``<e_sorted, lovasz_grad(g_c sorted)>``; then the weighted mean over classes
    (``skip_absent_classes=True`` is the reference ``classes='present'``). Ignored pixels get
    error 0 and ground truth 0: they sort after every positive error, so they leave the
    Jaccard gradient of all positive-error positions unchanged and add ``0 * grad`` -- exactly
    the same as removing them.

    Args:
      logits: ``[N, H, W, C]`` logits.
      labels: ``[N, H, W]`` integer labels.
      ignore_label: label id excluded from the loss.
      skip_absent_classes: average only over classes present in the batch.
      class_weights: None (uniform) or a length-C array weighting the class mean.

    Returns:
      Float32 scalar loss.
    """
    probs, fg, present = _probs_and_targets(logits, labels, ignore_label)
    errors = jnp.abs(fg - probs)
    order = jnp.argsort(-errors, axis=0)  # per class, decreasing error
    errors_sorted = jnp.take_along_axis(errors, order, axis=0)
    fg_sorted = jnp.take_along_axis(fg, order, axis=0)
    per_class = jnp.sum(errors_sorted * _lovasz_grad(fg_sorted), axis=0)
    return _class_mean(per_class, present, class_weights, skip_absent_classes)


# ----------------------------------------------------------------------------------------------
# Registry and config-driven combination
# ----------------------------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., Array]] = {
    "cross_entropy": cross_entropy,
    "focal": focal,
    "dice": dice,
    "jaccard": jaccard,
    "tversky": tversky,
    "focal_tversky": focal_tversky,
    "lovasz_softmax": lovasz_softmax,
    "jdt": jdt,
}


def _is_mapping(value: Any) -> bool:
    # ml_collections.ConfigDict is not a collections.abc.Mapping but has items()/keys().
    return isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys"))


def _keyword_options(fn: Callable[..., Array]) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _as_weight_array(class_weights: ArrayLike, num_classes: int, where: str) -> np.ndarray:
    weights = np.asarray(class_weights, dtype=np.float32)
    if weights.shape != (num_classes,):
        raise ValueError(
            f"{where}: class_weights must have length num_classes={num_classes}, "
            f"got shape {weights.shape}"
        )
    return weights


def make_loss_fn(
    spec: Mapping[str, float | Mapping[str, Any]],
    *,
    num_classes: int,
    ignore_label: int = 255,
    class_weights: ArrayLike | None = None,
) -> Callable[[Array, Array], tuple[Array, dict[str, Array]]]:
    """Builds ``loss_fn(logits, labels) -> (total, {name: value})`` from a config mapping.

    ``spec`` maps loss names (keys of :data:`LOSSES`) to either a weight, e.g.
    ``{'cross_entropy': 1.0, 'dice': 0.5}``, or a mapping of a ``'weight'`` (default 1.0) and
    keyword options of that loss, e.g. ``{'focal': {'weight': 1.0, 'gamma': 2.0}}``;
    ``ml_collections.ConfigDict`` values work too. ``total = sum(weight * value)``.
    ``ignore_label`` and ``class_weights`` are passed to every loss that accepts them unless
    its options set them. All configuration is resolved here, so the returned function is a
    pure function of arrays and can be ``jax.jit``-ed.

    Args:
      spec: loss name -> weight or options mapping.
      num_classes: number of classes C (checked against class weights and logits).
      ignore_label: label id excluded from every loss.
      class_weights: None or a length-C array of per-class weights.

    Returns:
      The combined loss function.

    Raises:
      ValueError: for an empty spec, an unknown loss name, an unknown option, a negative or
        non-numeric weight, or options the loss rejects.
    """
    if class_weights is not None:
        class_weights = _as_weight_array(class_weights, num_classes, "make_loss_fn")
    terms: list[tuple[str, float, Callable[[Array, Array], Array]]] = []
    for name, entry in spec.items():
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; valid losses: {sorted(LOSSES)}")
        fn = LOSSES[name]
        options = dict(entry.items()) if _is_mapping(entry) else {"weight": entry}
        weight = options.pop("weight", 1.0)
        valid_options = _keyword_options(fn)
        unknown = sorted(set(options) - set(valid_options))
        if unknown:
            raise ValueError(
                f"loss {name!r}: unknown option(s) {unknown}; valid options: "
                f"{['weight', *valid_options]}"
            )
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"loss {name!r}: weight must be a number, got {weight!r}") from None
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"loss {name!r}: weight must be finite and >= 0, got {weight}")
        options.setdefault("ignore_label", ignore_label)
        if "class_weights" in valid_options and class_weights is not None:
            options.setdefault("class_weights", class_weights)
        if options.get("class_weights") is not None:
            options["class_weights"] = _as_weight_array(
                options["class_weights"], num_classes, f"loss {name!r}"
            )
        terms.append((name, weight, functools.partial(fn, **options)))
    if not terms:
        raise ValueError(f"empty loss spec; valid losses: {sorted(LOSSES)}")

    # Trace every term once on a dummy input so bad option values fail here, not mid-training.
    dummy_logits = jax.ShapeDtypeStruct((1, 1, 1, num_classes), jnp.float32)
    dummy_labels = jax.ShapeDtypeStruct((1, 1, 1), jnp.int32)
    for name, _, term in terms:
        try:
            jax.eval_shape(term, dummy_logits, dummy_labels)
        except Exception as err:
            raise ValueError(f"loss {name!r}: invalid options: {err}") from err

    def loss_fn(logits: Array, labels: Array) -> tuple[Array, dict[str, Array]]:
        if logits.shape[-1] != num_classes:
            raise ValueError(f"logits have {logits.shape[-1]} classes, expected {num_classes}")
        components = {name: term(logits, labels) for name, _, term in terms}
        total = jnp.zeros((), jnp.float32)
        for name, weight, _ in terms:
            total = total + weight * components[name]
        return total, components

    return loss_fn

