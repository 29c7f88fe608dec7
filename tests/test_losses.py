"""Tests for lcseg.losses against independent float64 NumPy implementations."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcseg import losses

N, H, W, C = 2, 5, 7, 4
IGNORE = 255
CLASS_W = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
SMOOTH = 1e-6  # documented default of every region loss


def _make_batch(seed=0, scale=2.0):
    """Random logits and labels in {0, 1, 2} (class 3 absent) with ~20% ignored pixels."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.normal(size=(N, H, W, C))).astype(np.float32)
    labels = rng.integers(0, 3, size=(N, H, W))
    labels[rng.random((N, H, W)) < 0.2] = IGNORE
    assert (labels == IGNORE).any() and not (labels == 3).any()
    return logits, labels.astype(np.int32)


LOGITS, LABELS = _make_batch()


# ----------------------------------------------------------------------------------------------
# Float64 NumPy references, written from the published formulas. They drop ignored pixels
# outright instead of masking them.
# ----------------------------------------------------------------------------------------------


def _counted(logits, labels):
    x = np.asarray(logits, np.float64).reshape(-1, C)
    y = np.asarray(labels).reshape(-1)
    keep = y != IGNORE
    x, y = x[keep], y[keep]
    log_p = x - x.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    return log_p, y


def ref_cross_entropy(logits, labels, class_weights=None, label_smoothing=0.0):
    log_p, y = _counted(logits, labels)
    w = np.ones(C) if class_weights is None else np.asarray(class_weights, np.float64)
    nll = -log_p[np.arange(len(y)), y]
    smooth = -(log_p * w).sum(1)
    eps = label_smoothing
    return ((1 - eps) * (w[y] * nll).sum() + eps / C * smooth.sum()) / w[y].sum()


def ref_focal(logits, labels, gamma=2.0, class_weights=None):
    log_p, y = _counted(logits, labels)
    w = np.ones(C) if class_weights is None else np.asarray(class_weights, np.float64)
    log_p_y = log_p[np.arange(len(y)), y]
    per_pixel = -w[y] * (1 - np.exp(log_p_y)) ** gamma * log_p_y
    return per_pixel.sum() / w[y].sum()


def _class_mean(per_class, y, class_weights, skip_absent_classes):
    w = np.ones(C) if class_weights is None else np.asarray(class_weights, np.float64)
    if skip_absent_classes:
        w = w * np.isin(np.arange(C), y)
    return 0.0 if w.sum() == 0 else (w * per_class).sum() / w.sum()


def ref_region(name, logits, labels, *, alpha=0.5, beta=0.5, gamma=1.0, smooth=SMOOTH,
               label_smoothing=0.0, class_weights=None, skip_absent_classes=False):
    log_p, y = _counted(logits, labels)
    p = np.exp(log_p)
    g = np.eye(C)[y]
    if name == "jdt":
        g = (1 - label_smoothing) * g + label_smoothing / C
        p_l1, g_l1, diff_l1 = p.sum(0), g.sum(0), np.abs(p - g).sum(0)
        tp = (p_l1 + g_l1 - diff_l1) / 2
        fp, fn = p_l1 - tp, g_l1 - tp
        per_class = (1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)) ** gamma
    else:
        inter = (p * g).sum(0)
        fp, fn = (p * (1 - g)).sum(0), ((1 - p) * g).sum(0)
        if name == "dice":
            per_class = 1 - (2 * inter + smooth) / (p.sum(0) + g.sum(0) + smooth)
        elif name == "jaccard":
            per_class = 1 - (inter + smooth) / (p.sum(0) + g.sum(0) - inter + smooth)
        else:  # tversky / focal_tversky
            ti = (inter + smooth) / (inter + alpha * fp + beta * fn + smooth)
            per_class = (1 - ti) ** gamma
    return _class_mean(per_class, y, class_weights, skip_absent_classes)


def ref_lovasz(logits, labels, class_weights=None, skip_absent_classes=True):
    """Berman et al.'s lovasz_softmax_flat, looping over classes."""
    log_p, y = _counted(logits, labels)
    p = np.exp(log_p)
    per_class = np.zeros(C)
    for c in range(C):
        fg = (y == c).astype(np.float64)
        errors = np.abs(fg - p[:, c])
        order = np.argsort(-errors, kind="stable")
        fg_sorted = fg[order]
        gts = fg_sorted.sum()
        jac = 1 - (gts - np.cumsum(fg_sorted)) / (gts + np.cumsum(1 - fg_sorted))
        jac[1:] = jac[1:] - jac[:-1]
        per_class[c] = errors[order] @ jac
    return _class_mean(per_class, y, class_weights, skip_absent_classes)


# Documented defaults, spelled out so that the tests also pin them down.
DEFAULTS = {
    "cross_entropy": {},
    "focal": {"gamma": 2.0},
    "dice": {"skip_absent_classes": False},
    "jaccard": {"skip_absent_classes": False},
    "tversky": {"alpha": 0.5, "beta": 0.5, "skip_absent_classes": False},
    "focal_tversky": {"alpha": 0.3, "beta": 0.7, "gamma": 0.75, "skip_absent_classes": False},
    "lovasz_softmax": {"skip_absent_classes": True},
    "jdt": {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "skip_absent_classes": True},
}


def reference(name, logits, labels, **options):
    options = {**DEFAULTS[name], **options}
    if name == "cross_entropy":
        return ref_cross_entropy(logits, labels, **options)
    if name == "focal":
        return ref_focal(logits, labels, **options)
    if name == "lovasz_softmax":
        return ref_lovasz(logits, labels, **options)
    return ref_region(name, logits, labels, **options)


CASES = [
    ("cross_entropy", {}),
    ("cross_entropy", {"class_weights": CLASS_W, "label_smoothing": 0.1}),
    ("focal", {}),
    ("focal", {"gamma": 0.5, "class_weights": CLASS_W}),
    ("dice", {}),
    ("dice", {"smooth": 1.0, "skip_absent_classes": True, "class_weights": CLASS_W}),
    ("jaccard", {}),
    ("jaccard", {"smooth": 1.0, "skip_absent_classes": True}),
    ("tversky", {"alpha": 0.3, "beta": 0.7}),
    ("tversky", {"skip_absent_classes": True, "class_weights": CLASS_W}),
    ("focal_tversky", {}),
    ("focal_tversky", {"gamma": 2.0, "skip_absent_classes": True, "class_weights": CLASS_W}),
    ("lovasz_softmax", {}),
    ("lovasz_softmax", {"skip_absent_classes": False, "class_weights": CLASS_W}),
    ("jdt", {}),
    ("jdt", {"alpha": 0.5, "beta": 0.5, "gamma": 2.0, "label_smoothing": 0.1,
             "skip_absent_classes": False, "class_weights": CLASS_W}),
]


@pytest.mark.parametrize("name, options", CASES)
def test_matches_float64_reference(name, options):
    value = losses.LOSSES[name](jnp.asarray(LOGITS), jnp.asarray(LABELS), **options)
    assert value.dtype == jnp.float32 and value.shape == ()
    np.testing.assert_allclose(value, reference(name, LOGITS, LABELS, **options),
                               rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name, options", CASES)
def test_gradient_matches_finite_differences(name, options):
    """jax.grad agrees with central differences of the float64 reference."""
    grad = jax.grad(losses.LOSSES[name])(jnp.asarray(LOGITS), jnp.asarray(LABELS), **options)
    rng = np.random.default_rng(1)
    counted = np.argwhere(LABELS != IGNORE)
    h = 1e-5
    for n, i, j in counted[rng.choice(len(counted), size=4, replace=False)]:
        k = rng.integers(C)
        plus, minus = LOGITS.astype(np.float64), LOGITS.astype(np.float64)
        plus[n, i, j, k] += h
        minus[n, i, j, k] -= h
        expected = (reference(name, plus, LABELS, **options)
                    - reference(name, minus, LABELS, **options)) / (2 * h)
        np.testing.assert_allclose(grad[n, i, j, k], expected, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Ignore handling, gradients, dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_ignored_pixels_do_not_change_loss_or_gradient(name):
    fn = jax.value_and_grad(losses.LOSSES[name])
    value, grad = fn(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    ignored = LABELS == IGNORE
    perturbed = LOGITS.copy()
    perturbed[ignored] = 1e4 * np.random.default_rng(2).normal(size=(ignored.sum(), C))
    perturbed[tuple(np.argwhere(ignored)[0])] = [np.nan, np.inf, -np.inf, 0.0]
    value2, grad2 = fn(jnp.asarray(perturbed), jnp.asarray(LABELS))
    np.testing.assert_allclose(value2, value, rtol=1e-6)
    np.testing.assert_allclose(grad2, grad, rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(grad)[ignored] == 0)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_all_ignored_batch_gives_zero_loss_and_zero_gradient(name):
    labels = jnp.full((N, H, W), IGNORE, jnp.int32)
    value, grad = jax.value_and_grad(losses.LOSSES[name])(jnp.asarray(LOGITS), labels)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("name, options", CASES)
def test_bf16_logits(name, options):
    logits_bf16 = jnp.asarray(LOGITS, jnp.bfloat16)
    value, grad = jax.value_and_grad(losses.LOSSES[name])(
        logits_bf16, jnp.asarray(LABELS), **options)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    expected = reference(name, np.asarray(logits_bf16, np.float32), LABELS, **options)
    np.testing.assert_allclose(value, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_gradients_finite_for_saturated_logits(name):
    """Near-one-hot softmax (p_y == 1 in float32) must not give inf/NaN gradients."""
    logits = 100.0 * jax.nn.one_hot(jnp.asarray(LABELS) % C, C)
    grad = jax.grad(losses.LOSSES[name])(logits, jnp.asarray(LABELS))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_labels_outside_range_are_ignored():
    labels = LABELS.copy()
    labels[labels == IGNORE] = -1
    for name, fn in losses.LOSSES.items():
        np.testing.assert_allclose(fn(jnp.asarray(LOGITS), jnp.asarray(labels)),
                                   fn(jnp.asarray(LOGITS), jnp.asarray(LABELS)), err_msg=name)


def test_wrong_class_weight_length_raises():
    with pytest.raises(ValueError, match="class_weights"):
        losses.dice(jnp.asarray(LOGITS), jnp.asarray(LABELS), class_weights=[1.0, 2.0])


# ----------------------------------------------------------------------------------------------
# Cross-entropy: hand-computed PyTorch semantics
# ----------------------------------------------------------------------------------------------

# One image, three pixels, C = 3:
#   pixel A: logits [0, 0, 0]     -> p = [1/3, 1/3, 1/3], -log p = [ln3, ln3, ln3]; label 0
#   pixel B: logits [0, ln2, 0]   -> p = [1/4, 1/2, 1/4], -log p = [ln4, ln2, ln4]; label 1
#   pixel C: logits [5, -3, 1]    -> label 255, ignored
# Weights w = [1, 2, 0.5]; smoothing term per pixel is sum_c w_c (-log p_c):
#   A: (1 + 2 + 0.5) ln3 = 3.5 ln3;   B: 1 ln4 + 2 ln2 + 0.5 ln4 = 5 ln2
# Unweighted smoothing terms: A: 3 ln3; B: 2 ln4 + ln2 = 5 ln2.
# PyTorch F.cross_entropy(weight=w, ignore_index=255, label_smoothing=eps, reduction='mean')
#   = (1 - eps) * sum w[y] nll / sum w[y] + eps / C * sum smooth / sum w[y]
#   a) no w, eps = 0:   (ln3 + ln2) / 2                           = 0.8958797346...
#   b) w,    eps = 0:   (1 ln3 + 2 ln2) / 3 = ln12 / 3            = 0.8283022166...
#   c) w,    eps = 0.3: (0.7 (ln3 + 2 ln2) + 0.1 (3.5 ln3 + 5 ln2)) / 3
#                     = 0.35 ln3 + (1.9 / 3) ln2                  = 0.8235075154...
#   d) no w, eps = 0.3: (0.7 (ln3 + ln2) + 0.1 (3 ln3 + 5 ln2)) / 2
#                     = 0.5 ln3 + 0.6 ln2                         = 0.9651944527...
HAND_LOGITS = np.array([[[[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0], [5.0, -3.0, 1.0]]]],
                       np.float32)
HAND_LABELS = np.array([[[0, 1, IGNORE]]], np.int32)


@pytest.mark.parametrize("weights, eps, expected", [
    (None, 0.0, 0.8958797346140275),
    ([1.0, 2.0, 0.5], 0.0, 0.8283022165960001),
    ([1.0, 2.0, 0.5], 0.3, 0.8235075153884703),
    (None, 0.3, 0.965194452670022),
])
def test_cross_entropy_hand_computed(weights, eps, expected):
    value = losses.cross_entropy(jnp.asarray(HAND_LOGITS), jnp.asarray(HAND_LABELS),
                                 class_weights=weights, label_smoothing=eps)
    np.testing.assert_allclose(value, expected, rtol=1e-6)


@pytest.mark.parametrize("weights", [None, CLASS_W])
def test_focal_gamma_zero_equals_cross_entropy(weights):
    logits, labels = jnp.asarray(LOGITS), jnp.asarray(LABELS)
    np.testing.assert_allclose(losses.focal(logits, labels, gamma=0.0, class_weights=weights),
                               losses.cross_entropy(logits, labels, class_weights=weights),
                               rtol=1e-6)


def test_focal_down_weights_easy_pixels():
    logits, labels = jnp.asarray(LOGITS), jnp.asarray(LABELS)
    assert losses.focal(logits, labels, gamma=2.0) < losses.cross_entropy(logits, labels)


# ----------------------------------------------------------------------------------------------
# Relations between region losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [False, True])
def test_tversky_reduces_to_dice_and_jaccard(skip):
    args = (jnp.asarray(LOGITS), jnp.asarray(LABELS))
    common = {"class_weights": CLASS_W, "skip_absent_classes": skip}
    np.testing.assert_allclose(losses.tversky(*args, alpha=0.5, beta=0.5, smooth=0.0, **common),
                               losses.dice(*args, smooth=0.0, **common), rtol=1e-5)
    np.testing.assert_allclose(losses.tversky(*args, alpha=1.0, beta=1.0, smooth=1.0, **common),
                               losses.jaccard(*args, smooth=1.0, **common), rtol=1e-5)
    np.testing.assert_allclose(
        losses.focal_tversky(*args, alpha=0.3, beta=0.7, gamma=1.0, **common),
        losses.tversky(*args, alpha=0.3, beta=0.7, **common), rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_jdt_equals_jaccard_dice_tversky_on_hard_labels(skip):
    args = (jnp.asarray(LOGITS), jnp.asarray(LABELS))
    common = {"class_weights": CLASS_W, "skip_absent_classes": skip}
    np.testing.assert_allclose(losses.jdt(*args, smooth=1.0, **common),
                               losses.jaccard(*args, smooth=1.0, **common), rtol=1e-5)
    np.testing.assert_allclose(losses.jdt(*args, alpha=0.5, beta=0.5, smooth=0.0, **common),
                               losses.dice(*args, smooth=0.0, **common), rtol=1e-5)
    np.testing.assert_allclose(losses.jdt(*args, alpha=0.2, beta=0.9, **common),
                               losses.tversky(*args, alpha=0.2, beta=0.9, **common), rtol=1e-5)
    np.testing.assert_allclose(
        losses.jdt(*args, alpha=0.2, beta=0.9, gamma=1.5, **common),
        losses.focal_tversky(*args, alpha=0.2, beta=0.9, gamma=1.5, **common), rtol=1e-5)


def test_jdt_with_soft_labels_is_zero_at_the_soft_target():
    """The L1 form is a metric: predicting the smoothed labels exactly gives loss 0, whereas
    the product-form soft Jaccard does not vanish there."""
    eps = 0.2
    labels = np.where(LABELS == IGNORE, 0, LABELS)
    soft = (1 - eps) * np.eye(C)[labels] + eps / C
    logits = jnp.asarray(np.log(soft), jnp.float32)
    value = losses.jdt(logits, jnp.asarray(labels), label_smoothing=eps, smooth=0.0)
    np.testing.assert_allclose(value, 0.0, atol=1e-6)
    p, g = soft.reshape(-1, C), soft.reshape(-1, C)
    inter = (p * g).sum(0)
    product_form = 1 - inter / (p.sum(0) + g.sum(0) - inter)
    assert product_form[np.isin(np.arange(C), labels)].mean() > 0.1


def test_region_losses_on_hard_predictions_equal_hard_metrics():
    """With saturated logits the soft losses equal 1 - hard Dice / IoU, Lovász included
    (the Lovász extension agrees with the Jaccard set function on {0, 1} errors)."""
    pred = np.random.default_rng(3).integers(0, C, size=(N, H, W))
    pred[0, 0, :3] = [0, 1, 2]
    logits = jnp.asarray(50.0 * np.eye(C)[pred], jnp.float32)
    keep = LABELS != IGNORE
    y, q = LABELS[keep], pred[keep]
    present = [c for c in range(C) if (y == c).any()]
    inter = np.array([np.sum((y == c) & (q == c)) for c in present])
    sizes = np.array([np.sum(y == c) + np.sum(q == c) for c in present])
    one_minus_iou = 1 - np.mean(inter / (sizes - inter))
    one_minus_dice = 1 - np.mean(2 * inter / sizes)
    labels = jnp.asarray(LABELS)
    opts = {"skip_absent_classes": True, "smooth": 0.0}
    np.testing.assert_allclose(losses.lovasz_softmax(logits, labels), one_minus_iou, rtol=1e-5)
    np.testing.assert_allclose(losses.jaccard(logits, labels, **opts), one_minus_iou, rtol=1e-5)
    np.testing.assert_allclose(losses.jdt(logits, labels, **opts), one_minus_iou, rtol=1e-5)
    np.testing.assert_allclose(losses.dice(logits, labels, **opts), one_minus_dice, rtol=1e-5)


def test_skip_absent_classes_changes_only_absent_class_terms():
    args = (jnp.asarray(LOGITS), jnp.asarray(LABELS))
    # Class 3 is absent: with uniform weights, the all-classes mean is (3 m + d3) / 4 where m
    # is the present-class mean and d3 the absent-class term, which is ~1 (no ground truth).
    present_mean = losses.dice(*args, skip_absent_classes=True)
    all_mean = losses.dice(*args, skip_absent_classes=False)
    np.testing.assert_allclose(4 * all_mean - 3 * present_mean, 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# make_loss_fn
# ----------------------------------------------------------------------------------------------


def test_make_loss_fn_combination_and_components():
    spec = {
        "cross_entropy": 1.0,
        "dice": {"weight": 0.5, "skip_absent_classes": True},
        "focal": {"weight": 2.0, "gamma": 1.0},
        "lovasz_softmax": {"weight": 0.25, "class_weights": [1.0, 1.0, 1.0, 1.0]},
    }
    loss_fn = jax.jit(losses.make_loss_fn(spec, num_classes=C, class_weights=CLASS_W))
    args = (jnp.asarray(LOGITS), jnp.asarray(LABELS))
    total, parts = loss_fn(*args)
    expected = {
        "cross_entropy": losses.cross_entropy(*args, class_weights=CLASS_W),
        "dice": losses.dice(*args, skip_absent_classes=True, class_weights=CLASS_W),
        "focal": losses.focal(*args, gamma=1.0, class_weights=CLASS_W),
        "lovasz_softmax": losses.lovasz_softmax(*args),  # per-loss weights override
    }
    assert set(parts) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(parts[name], value, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(
        total,
        expected["cross_entropy"] + 0.5 * expected["dice"] + 2.0 * expected["focal"]
        + 0.25 * expected["lovasz_softmax"],
        rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda x: loss_fn(x, args[1])[0])(args[0])))


def test_make_loss_fn_accepts_config_dict_and_ignore_label():
    spec = ml_collections.ConfigDict(
        {"jdt": {"weight": 2.0, "alpha": 0.5, "beta": 0.5}, "cross_entropy": 1.0})
    labels = np.where(LABELS == IGNORE, -7, LABELS)
    total, parts = losses.make_loss_fn(spec, num_classes=C, ignore_label=-7)(
        jnp.asarray(LOGITS), jnp.asarray(labels))
    args = (jnp.asarray(LOGITS), jnp.asarray(LABELS))
    np.testing.assert_allclose(parts["jdt"], losses.jdt(*args, alpha=0.5, beta=0.5), rtol=1e-6)
    np.testing.assert_allclose(total, 2 * parts["jdt"] + losses.cross_entropy(*args), rtol=1e-6)


@pytest.mark.parametrize("spec, kwargs, pattern", [
    ({"dicee": 1.0}, {}, r"unknown loss 'dicee'.*cross_entropy.*lovasz_softmax"),
    ({"dice": {"weight": 1.0, "gama": 2.0}}, {}, r"'dice'.*'gama'.*smooth.*skip_absent_classes"),
    ({"focal": {"alpha": 0.5}}, {}, r"'focal'.*'alpha'.*gamma"),
    ({"dice": {"class_weights": [1.0, 2.0]}}, {}, r"'dice'.*num_classes=4"),
    ({"dice": 1.0}, {"class_weights": [1.0]}, r"num_classes=4"),
    ({"dice": -1.0}, {}, r"'dice'.*>= 0"),
    ({"dice": {"weight": "heavy"}}, {}, r"'dice'.*number"),
    ({}, {}, r"empty"),
])
def test_make_loss_fn_errors(spec, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        losses.make_loss_fn(spec, num_classes=C, **kwargs)
