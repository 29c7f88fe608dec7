"""The fast CPU convolutions compute what lax / Flax compute, values and gradients.

Every convolution shape the models use (3x3 stride 1 and 2, 1x1, the ResNet stem's 7x7
stride 2, ASPP's dilated 3x3, the U-Net's 2x2 stride-2 transposed convolution), with odd
spatial sizes and batches > 1, against ``lax.conv_general_dilated`` /
``lax.conv_transpose``: forward, input gradient and weight gradient in float32 to float
rounding, bfloat16 close to float32; and a whole U-Net with and without
``use_fast_convolutions``.
"""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lcseg import parallel
from lcseg.models import create_model
from lcseg.ops import fast_conv
from lcseg.ops.fast_conv import (
    conv_general_dilated,
    conv_transpose_nonoverlapping,
    fast_apply,
    should_use_fast_conv,
    use_fast_convolutions,
)

NHWC = ("NHWC", "HWIO", "NHWC")


@contextlib.contextmanager
def fast_conv_chunks(*, rows: int, batch: int, width: int, k: int, itemsize: int = 4):
    """Weight gradients in chunks of ``rows`` output rows, whatever their size."""
    names = ("_WHOLE_BYTES", "_MIN_CHUNK_PIXELS", "_CHUNK_BYTES")
    saved = {name: getattr(fast_conv, name) for name in names}
    fast_conv._WHOLE_BYTES, fast_conv._MIN_CHUNK_PIXELS = 0, 1
    fast_conv._CHUNK_BYTES = rows * batch * width * k * itemsize
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(fast_conv, name, value)

# name: (input shape, kernel shape, strides, padding, kernel dilation)
CASES = {
    "3x3": ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    "3x3_stride2": ((2, 9, 11, 5), (3, 3, 5, 7), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    "3x3_stride2_same": ((3, 10, 7, 4), (3, 3, 4, 6), (2, 2), "SAME", (1, 1)),
    "1x1": ((2, 9, 11, 5), (1, 1, 5, 7), (1, 1), "VALID", (1, 1)),
    "1x1_stride2": ((2, 9, 11, 5), (1, 1, 5, 7), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    "7x7_stride2_stem": ((2, 17, 19, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    "dilated2": ((2, 13, 15, 4), (3, 3, 4, 6), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    "dilated6": ((2, 13, 15, 4), (3, 3, 4, 6), (1, 1), ((6, 6), (6, 6)), (6, 6)),
    "dilated12": ((2, 13, 15, 4), (3, 3, 4, 6), (1, 1), ((12, 12), (12, 12)), (12, 12)),
    "asymmetric": ((2, 13, 9, 3), (5, 3, 3, 4), (2, 1), ((3, 1), (0, 2)), (1, 2)),
    # Fewer output than input channels at stride 1: the patches are taken of dy.
    "3x3_fewer_outputs": ((2, 9, 11, 7), (3, 3, 7, 5), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    "dilated2_fewer_outputs": ((2, 13, 15, 6), (3, 3, 6, 4), (1, 1), "SAME", (2, 2)),
    "asymmetric_fewer_outputs": ((2, 13, 9, 5), (5, 3, 5, 3), (1, 1), ((3, 1), (0, 2)),
                                 (1, 2)),
    "overpadded_fewer_outputs": ((2, 9, 11, 6), (3, 3, 6, 4), (1, 1), ((3, 0), (0, 4)),
                                 (1, 1)),
    "1x1_fewer_outputs": ((2, 9, 11, 6), (1, 1, 6, 4), (1, 1), "VALID", (1, 1)),
}


def assert_close(actual, expected, tolerance=1e-5):
    """Max abs difference within ``tolerance`` of the largest magnitude."""
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert actual.shape == expected.shape
    difference = float(np.max(np.abs(actual - expected)))
    assert difference <= tolerance * float(np.max(np.abs(expected))), difference


def conv_and_grads(conv, x, w, dy, strides, padding, dilation):
    """Output, input gradient and weight gradient of ``conv``, compiled."""

    @jax.jit
    def run(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: conv(x, w, strides, padding, rhs_dilation=dilation,
                                           dimension_numbers=NHWC), x, w)
        return (y, *vjp(dy))

    return run(x, w, dy)


def random_inputs(x_shape, w_shape, strides, padding, dilation, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], x_shape, dtype)
    w = (jax.random.normal(keys[1], w_shape) / np.sqrt(np.prod(w_shape[:3]))).astype(dtype)
    out = jax.eval_shape(lambda: lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC))
    dy = jax.random.normal(keys[2], out.shape, dtype)
    return x, w, dy


@pytest.mark.parametrize("case", list(CASES))
def test_matches_lax_forward_and_both_gradients(case):
    x_shape, w_shape, strides, padding, dilation = CASES[case]
    x, w, dy = random_inputs(x_shape, w_shape, strides, padding, dilation)
    expected = conv_and_grads(lax.conv_general_dilated, x, w, dy, strides, padding, dilation)
    actual = conv_and_grads(conv_general_dilated, x, w, dy, strides, padding, dilation)
    for name, a, e in zip(("output", "input grad", "weight grad"), actual, expected):
        assert a.dtype == e.dtype, name
        assert_close(a, e)


@pytest.mark.parametrize("case,rows,dtype", [
    ("3x3", 2, "float32"), ("3x3", 4, "float32"), ("3x3", 2, "bfloat16"),
    ("7x7_stride2_stem", 2, "float32"), ("7x7_stride2_stem", 4, "float32"),
    ("dilated2", 2, "float32"), ("dilated2", 5, "float32"), ("asymmetric", 1, "float32"),
    ("asymmetric", 2, "float32"), ("3x3_fewer_outputs", 2, "float32"),
    ("3x3_fewer_outputs", 4, "bfloat16"), ("asymmetric_fewer_outputs", 2, "float32"),
    ("overpadded_fewer_outputs", 3, "float32")])
def test_chunked_weight_gradient(case, rows, dtype):
    """The loop over chunks of output rows, uneven ones (a padded last chunk) included."""
    x_shape, w_shape, strides, padding, dilation = CASES[case]
    x_shape = (4, *x_shape[1:])
    x, w, dy = random_inputs(x_shape, w_shape, strides, padding, dilation, jnp.dtype(dtype))
    expected = conv_and_grads(lax.conv_general_dilated, x, w, dy, strides, padding, dilation)
    kh, kw, c, o = w_shape
    patches_of_dy = strides == (1, 1) and o < c
    with fast_conv_chunks(rows=rows, batch=dy.shape[0],
                          width=x.shape[2] if patches_of_dy else dy.shape[2],
                          k=kh * kw * (o if patches_of_dy else c), itemsize=x.dtype.itemsize):
        actual = conv_and_grads(conv_general_dilated, x, w, dy, strides, padding, dilation)
        hlo = jax.jit(lambda x, w: jax.grad(lambda w: conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC).sum())(w)
        ).lower(x, w).as_text()
    assert "while" in hlo  # The loop ran, not the whole-matrix product.
    for a, e in zip(actual, expected):
        # bfloat16: lax rounds its weight gradient once; the loop rounds its float32 sum.
        assert_close(a, e, 1e-5 if dtype == "float32" else 1e-2)


@pytest.mark.parametrize("case", ["3x3", "3x3_fewer_outputs", "7x7_stride2_stem"])
@pytest.mark.parametrize("flip_max_bytes", [0, 1 << 30])
def test_weight_gradient_in_either_product_orientation(case, flip_max_bytes, monkeypatch):
    """Small results are computed transposed ([O, K]), big ones as [K, O]: both exact."""
    monkeypatch.setattr(fast_conv, "_FLIP_MAX_BYTES", flip_max_bytes)
    x_shape, w_shape, strides, padding, dilation = CASES[case]
    x, w, dy = random_inputs(x_shape, w_shape, strides, padding, dilation)
    expected = conv_and_grads(lax.conv_general_dilated, x, w, dy, strides, padding, dilation)
    actual = conv_and_grads(conv_general_dilated, x, w, dy, strides, padding, dilation)
    assert_close(actual[2], expected[2])


@pytest.mark.parametrize("case", ["3x3", "1x1", "7x7_stride2_stem", "dilated2", "wide"])
def test_bfloat16_is_close_to_float32(case):
    x_shape, w_shape, strides, padding, dilation = CASES.get(
        case, ((2, 16, 13, 32), (3, 3, 32, 16), (1, 1), "SAME", (1, 1)))
    x, w, dy = random_inputs(x_shape, w_shape, strides, padding, dilation)
    expected = conv_and_grads(lax.conv_general_dilated, x, w, dy, strides, padding, dilation)
    half = [a.astype(jnp.bfloat16) for a in (x, w, dy)]
    actual = conv_and_grads(conv_general_dilated, *half, strides, padding, dilation)
    lax_half = conv_and_grads(lax.conv_general_dilated, *half, strides, padding, dilation)
    for a, e, h in zip(actual, expected, lax_half):
        assert a.dtype == jnp.bfloat16
        assert_close(a, e, 2e-2)  # bfloat16 rounding of inputs and result.
        assert_close(a, h, 2e-2)


def test_bfloat16_transpose_is_close_to_float32():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
    w = jax.random.normal(jax.random.key(1), (2, 2, 6, 4))
    dy = jax.random.normal(jax.random.key(2), (2, 10, 14, 4))

    def grads(x, w, dy):
        y, vjp = jax.vjp(conv_transpose_nonoverlapping, x, w)
        return (y, *vjp(dy))

    expected = grads(x, w, dy)
    actual = jax.jit(grads)(*(a.astype(jnp.bfloat16) for a in (x, w, dy)))
    for a, e in zip(actual, expected):
        assert a.dtype == jnp.bfloat16
        assert_close(a, e, 2e-2)


def test_unsupported_arguments_fall_back_to_lax():
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 6))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))  # Two groups of 3 channels.
    args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC,
                feature_group_count=2)
    assert_close(conv_general_dilated(x, w, **args), lax.conv_general_dilated(x, w, **args))
    w = jax.random.normal(jax.random.key(1), (3, 3, 6, 4))
    args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=NHWC,
                lhs_dilation=(2, 2))
    assert_close(conv_general_dilated(x, w, **args), lax.conv_general_dilated(x, w, **args))


@pytest.mark.parametrize("transpose_kernel", [False, True])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_nonoverlapping_transpose_matches_lax(transpose_kernel, padding):
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))
    w = jax.random.normal(jax.random.key(1), (2, 2, 4, 6) if transpose_kernel else (2, 2, 6, 4))
    expected = lax.conv_transpose(x, w, (2, 2), padding, dimension_numbers=NHWC,
                                  transpose_kernel=transpose_kernel)
    assert_close(conv_transpose_nonoverlapping(x, w, transpose_kernel=transpose_kernel),
                 expected)


def module_outputs_and_grads(module, x, fast):
    """Variables at init, output and gradients (params, input) of a Flax module."""
    context = use_fast_convolutions if fast else contextlib.nullcontext
    with context():
        variables = module.init(jax.random.key(1), x)

    def loss(params, x):
        with context():
            y = module.apply({"params": params}, x)
        return jnp.sum(y * jnp.cos(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x)
    return variables, y, grads


@pytest.mark.parametrize("module", [
    nn.Conv(5, (3, 3), padding=1, use_bias=True),
    nn.Conv(5, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=True),
    nn.Conv(5, (3, 3), padding=2, kernel_dilation=2, use_bias=False),
    nn.Conv(5, (1, 1)),
    nn.ConvTranspose(5, (2, 2), strides=(2, 2)),
    nn.ConvTranspose(5, (2, 2), strides=(2, 2), padding="VALID", use_bias=False),
    nn.ConvTranspose(5, (2, 2), strides=(2, 2), transpose_kernel=True),
    nn.ConvTranspose(5, (3, 3), strides=(2, 2)),  # Overlapping: Flax's own path.
    nn.Conv(6, (3, 3), feature_group_count=6),  # Depthwise: lax's own path.
], ids=lambda m: f"{type(m).__name__}{m.kernel_size}")
def test_flax_modules_same_params_outputs_and_gradients(module):
    x = jax.random.normal(jax.random.key(0), (2, 7, 9, 6))
    plain_variables, plain_y, plain_grads = module_outputs_and_grads(module, x, fast=False)
    fast_variables, fast_y, fast_grads = module_outputs_and_grads(module, x, fast=True)
    jax.tree.map(np.testing.assert_array_equal, fast_variables, plain_variables)
    assert_close(fast_y, plain_y)
    jax.tree.map(assert_close, fast_grads, plain_grads)


def test_interceptor_respects_a_modules_own_convolution():
    calls = []

    def own(*args, **kwargs):
        calls.append(1)
        return lax.conv_general_dilated(*args, **kwargs)

    module = nn.Conv(3, (3, 3), conv_general_dilated=own)
    x = jnp.ones((1, 5, 5, 2))
    variables = module.init(jax.random.key(0), x)
    calls.clear()
    with use_fast_convolutions():
        module.apply(variables, x)
    assert calls == [1]


def tiny_unet_step(model, variables, images, *, fast: bool):
    """Logits, parameter gradients and new BatchNorm statistics of one training step."""
    apply = fast_apply(model.apply) if fast else model.apply

    @jax.jit
    def step(params, batch_stats):
        def loss(params):
            logits, updates = apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.sin(logits) * logits), (logits, updates["batch_stats"])

        (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads, stats

    return step(variables["params"], variables["batch_stats"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_unet_same_logits_gradients_and_statistics(dtype):
    model = create_model("unet", num_classes=3, channels=(4, 8, 16), dtype=jnp.dtype(dtype))
    images = jax.random.normal(jax.random.key(0), (2, 20, 28, 3))  # Padded to 32 inside.
    # Random variables of the model's shapes: cheaper than running its initialisers.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), images, train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(0.5, 1.5, s.shape) if len(s.shape) == 1
                              else rng.normal(0, 0.3, s.shape), s.dtype), shapes)
    plain = tiny_unet_step(model, variables, images, fast=False)
    fast = tiny_unet_step(model, variables, images, fast=True)
    tolerance = 1e-4 if dtype == "float32" else 5e-2  # bfloat16 activations.
    for a, e in zip(fast, plain):
        jax.tree.map(lambda a, e: assert_close(a, e, tolerance), a, e)


def test_batch_sharded_step_matches_and_gathers_no_activations():
    """Data-parallel over the test's 4 CPU devices: same result, no all-gather."""
    mesh = parallel.make_mesh()
    assert mesh.size > 1
    x, w, dy = random_inputs((2 * mesh.size, 16, 12, 8), (3, 3, 8, 8), (1, 1), "SAME", (1, 1))
    batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
    x, dy, w = jax.device_put(x, batch), jax.device_put(dy, batch), jax.device_put(w, replicated)

    def grads(conv):
        def run(x, w, dy):
            return jax.vjp(lambda x, w: conv(x, w, (1, 1), "SAME", dimension_numbers=NHWC),
                           x, w)[1](dy)
        return jax.jit(run, out_shardings=(batch, replicated))

    with fast_conv_chunks(rows=2, batch=x.shape[0], width=12, k=72):
        fast = grads(conv_general_dilated)
        assert "all-gather" not in fast.lower(x, w, dy).compile().as_text()
        actual = fast(x, w, dy)
    for a, e in zip(actual, grads(lax.conv_general_dilated)(x, w, dy)):
        assert_close(a, e)


def test_fast_apply_uses_the_fast_path():
    model = create_model("unet", num_classes=3, channels=(4, 8))
    images = jnp.ones((1, 8, 8, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(1), images, train=False))

    def jaxpr(apply):
        return str(jax.make_jaxpr(lambda v: apply(v, images, train=False))(variables))

    assert "name=_fast_conv" in jaxpr(fast_apply(model.apply))
    assert "name=_fast_conv" not in jaxpr(model.apply)


def test_fast_apply_of_the_same_model_compiles_once():
    model = create_model("unet", num_classes=3, channels=(4, 8))
    assert fast_apply(model.apply) == fast_apply(model.apply)
    assert hash(fast_apply(model.apply)) == hash(fast_apply(model.apply))
    assert fast_apply(model.apply) != model.apply
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def run(apply_fn, x):
        traces.append(apply_fn)
        return x

    run(fast_apply(model.apply), jnp.ones(2))
    run(fast_apply(model.apply), jnp.ones(2))
    assert len(traces) == 1


def test_should_use_fast_conv():
    assert should_use_fast_conv("on") and not should_use_fast_conv("off")
    assert should_use_fast_conv("auto") == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="fast_conv"):
        should_use_fast_conv("yes")
