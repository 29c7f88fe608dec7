"""Non-overlapping max pooling equals ``flax.linen.max_pool``: values and gradients.

The reference is Flax's ``reduce_window`` pooling and its ``select_and_scatter``
gradient, and an independent numpy loop that sends each window's gradient to the first
maximum in row-major order (PyTorch's ``max_pool2d`` rule), on inputs with many ties
(ReLU zeros, small integers) and odd sizes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcseg.ops.pooling import max_pool_nonoverlapping


def first_max_gradient(x: np.ndarray, dy: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    """float64 loop: each window's gradient to its first maximum (row-major)."""
    kh, kw = window
    dx = np.zeros(x.shape, np.float64)
    n, out_h, out_w, c = dy.shape
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                for ch in range(c):
                    block = x[b, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw, ch]
                    a, e = np.unravel_index(np.argmax(block), block.shape)  # First max.
                    dx[b, i * kh + a, j * kw + e, ch] += dy[b, i, j, ch]
    return dx


@pytest.mark.parametrize("shape,window", [((2, 8, 8, 3), (2, 2)), ((1, 7, 9, 2), (2, 2)),
                                          ((2, 9, 6, 4), (3, 3)), ((1, 6, 8, 2), (2, 4))])
@pytest.mark.parametrize("inputs", ["ties", "gaussian"])
def test_values_and_gradients_equal_flax_max_pool(shape, window, inputs):
    rng = np.random.default_rng(0)
    if inputs == "ties":  # ReLU'd small integers: most windows hold repeated maxima.
        x = np.maximum(rng.integers(-2, 3, shape), 0).astype(np.float32)
    else:
        x = rng.normal(size=shape).astype(np.float32)
    out_shape = (shape[0], shape[1] // window[0], shape[2] // window[1], shape[3])
    dy = rng.normal(size=out_shape).astype(np.float32)

    def pooled_dot(pool, x_):
        return jnp.sum(pool(x_) * dy)

    ours = lambda x_: max_pool_nonoverlapping(x_, window)  # noqa: E731
    flax_pool = lambda x_: nn.max_pool(x_, window, strides=window)  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(x)), np.asarray(flax_pool(x)))
    grad = np.asarray(jax.jit(jax.grad(lambda x_: pooled_dot(ours, x_)))(x))
    np.testing.assert_array_equal(grad, np.asarray(jax.grad(
        lambda x_: pooled_dot(flax_pool, x_))(x)))
    np.testing.assert_allclose(grad, first_max_gradient(x, dy, window), rtol=1e-6)


def test_bfloat16_keeps_dtype_and_matches_float32():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 6, 3)), jnp.bfloat16)
    y, vjp = jax.vjp(lambda x_: max_pool_nonoverlapping(x_), x)
    (dx,) = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(nn.max_pool(x, (2, 2), strides=(2, 2)),
                                             np.float32))
    assert float(jnp.sum(dx.astype(jnp.float32))) == y.size  # One gradient per window.


def test_rejects_non_nhwc_input():
    with pytest.raises(ValueError, match="NHWC"):
        max_pool_nonoverlapping(jnp.zeros((4, 4, 3)))
