"""Convolutions whose backward passes run at matrix-multiply speed on XLA:CPU.

Why: XLA:CPU (jax 0.10, convolutions and dots through YNNPACK) runs a convolution's
forward pass and its input gradient close to its matmul speed, but

* lowers the *weight* gradient to a convolution whose window is the whole output image
  (``window={size=HxW}``), which runs at a fraction of it: on the 2-core development
  machine, float32, 25-60 GFLOP/s at 128-256 px with 64-128 channels against 250-350 for
  the same layer's forward pass;
* lowers the weight gradient of a transposed convolution (an input-dilated convolution)
  to its generic loop emitter, single-threaded: in the 31M-parameter U-Net the four 2x2
  up-sampling layers' weight gradients took 12 s of a 16 s training step.

What: :func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (it is
what ``flax.linen.Conv(conv_general_dilated=...)`` accepts). For 2-D NHWC/HWIO
convolutions it is a ``jax.custom_vjp`` whose

* forward pass is XLA's own convolution (already fast),
* input gradient is XLA's own transposed convolution (already fast),
* weight gradient (:func:`weight_gradient`) is an im2col matrix product
  ``dy^T @ patches`` accumulated in float32 over chunks of output rows in a ``lax.scan``:
  each chunk's patch matrix (a few MiB) stays in cache. One whole-batch patch matrix
  (hundreds of MiB at 256 px, written to fresh, page-faulting memory and read back) ran
  2-3x slower than the chunks; the chunked products run at 200-380 GFLOP/s. Where the
  convolution has fewer output than input channels (stride 1), the patches are taken of
  ``dy`` instead: half the patch bytes for the U-Net decoder's first convolutions
  (10-35% faster there).

Anything else (grouped convolutions, input dilation, other layouts) falls back to
``lax.conv_general_dilated`` unchanged. A non-overlapping transposed convolution (kernel
size equal to the stride, e.g. the U-Net's 2x2 stride-2 up-sampling) is a matrix product
and a reshape (:func:`conv_transpose_nonoverlapping`); its weight gradient is a 1x1
convolution's, the same chunked product.

bfloat16 inputs give bfloat16 results, as lax's: the products take bfloat16 operands with
float32 accumulation (YNNPACK's bfloat16 matmul is about twice its float32 speed here;
XLA:CPU computes bfloat16 convolutions in float32).

:func:`use_fast_convolutions` routes every ``nn.Conv`` / ``nn.ConvTranspose`` called
inside it (parameters unchanged) to these ops; :func:`fast_apply` wraps a model's
``apply`` in it; :func:`should_use_fast_conv` resolves the ``'auto' | 'on' | 'off'``
config switch ('auto': on the CPU backend only; GPUs keep cuDNN through XLA).

Why one module of ~530 lines: it is one custom_vjp (forward, input gradient, weight
gradient and the transposed-convolution shortcut) whose parts are only correct together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "conv_transpose_nonoverlapping", "fast_apply",
           "should_use_fast_conv", "use_fast_convolutions", "weight_gradient"]

# The one layout the fast path handles: flax's (channels last) for 2-D convolutions.
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))

# Weight-gradient chunking (measured on the 2-core development machine; see
# benchmarks/profile_step.py). A chunk's patch matrix of about this many bytes stays in
# L2/L3 between being written and being multiplied...
_CHUNK_BYTES = 4 << 20
# ...but a chunk must keep enough output pixels (rows of the product) for the matmul
# kernel to run near its peak, and each loop iteration costs a dozen thunk launches
# (thread-pool wake-ups): 512 px chunks made the 512x512 training step 10% slower.
_MIN_CHUNK_PIXELS = 2048
# Patch matrices up to this size are formed whole (one product, no loop).
_WHOLE_BYTES = 8 << 20
# Results up to this size are computed transposed (see _patch_product).
_FLIP_MAX_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True)
class _ConvSpec:
    """Static description of one 2-D NHWC/HWIO convolution (hashable: a nondiff arg)."""

    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    dilation: tuple[int, int]
    precision: Any
    preferred_element_type: Any

    def lax_conv(self, x: jax.Array, w: jax.Array) -> jax.Array:
        return lax.conv_general_dilated(
            x, w, self.strides, self.padding, rhs_dilation=self.dilation,
            dimension_numbers=_NHWC, precision=self.precision,
            preferred_element_type=self.preferred_element_type)


def _pairs(value: int | Sequence[int] | None, default: int = 1) -> tuple[int, int] | None:
    if value is None:
        return (default, default)
    value = tuple(value)
    return value if len(value) == 2 else None


def _fast_spec(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation,
               rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
               precision, preferred_element_type) -> _ConvSpec | None:
    """The fast path's spec for these arguments, or None where it does not apply."""
    if lhs.ndim != 4 or rhs.ndim != 4 or lhs.dtype != rhs.dtype:
        return None
    if feature_group_count != 1 or batch_group_count != 1:
        return None
    try:
        numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return None
    if numbers != _NHWC:
        return None
    strides, lhs_dil, rhs_dil = (_pairs(window_strides), _pairs(lhs_dilation),
                                 _pairs(rhs_dilation))
    if strides is None or rhs_dil is None or lhs_dil != (1, 1):
        return None
    if isinstance(padding, str):
        dilated_kernel = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dil)]
        pads = lax.padtype_to_pads(lhs.shape[1:3], dilated_kernel, strides, padding)
    else:
        pads = [tuple(p) for p in padding]
    if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
        return None
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _ConvSpec(tuple(int(s) for s in strides), pads, tuple(int(d) for d in rhs_dil),
                     precision, preferred_element_type)


# ---------------------------------------------------------------------------------------
# The weight gradient as chunked im2col products.
# ---------------------------------------------------------------------------------------


def _patches(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
             dilation: tuple[int, int], out_size: tuple[int, int]) -> jax.Array:
    """``[N, Ho, Wo, kh*kw*C]`` patches of an (already padded) ``[N, H, W, C]`` input.

    The last axis is ordered (kernel row, kernel column, channel), as an HWIO kernel
    reshaped to ``[kh*kw*C, O]``.
    """
    n, _, _, c = x.shape
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, strides, dilation, out_size
    taps = [lax.slice(x, (0, i * dh, j * dw, 0),
                      (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _chunk_rows(batch: int, out_h: int, out_w: int, pixel_bytes: int) -> int:
    """Output rows per chunk (of every image): about ``_CHUNK_BYTES`` of patches."""
    if batch * out_h * out_w * pixel_bytes <= _WHOLE_BYTES:
        return out_h
    pixels = max(_CHUNK_BYTES // pixel_bytes, _MIN_CHUNK_PIXELS)
    # Rows as even as possible across the chunks (padding rows are wasted work).
    chunks = -(-out_h // max(1, min(out_h, pixels // (batch * out_w))))
    return -(-out_h // chunks)


def _patch_product(source: jax.Array, top: int, left_right: tuple[int, int],
                   other: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
                   dilation: tuple[int, int], precision: Any) -> jax.Array:
    """``sum over (n, y, x) of patches(pad(source))[n, y, x, :] (outer) other[n, y, x, :]``.

    The patches are :func:`_patches` of ``source`` padded by ``top`` rows and
    ``left_right`` columns (``lax.pad`` amounts: negative ones crop; the bottom is padded
    or cropped to the rows the chunks need), one per pixel of ``other``
    (``[N, Ho, Wo, M]``). The product runs over chunks of
    ``other``'s rows in a ``lax.scan``, accumulated in float32; each chunk's patch
    matrix is formed just before it is multiplied.

    Returns:
      ``[kh*kw*C, M]`` float32 (C: ``source``'s channels).
    """
    (kh, kw), c, m = kernel, source.shape[-1], other.shape[-1]
    n, out_h, out_w, _ = other.shape
    k = kh * kw * c
    # Chunks hold rows of every image, never part of the batch: under a batch-sharded
    # mesh each device then loops over its own images and only the small [K, M] result
    # is summed across devices.
    rows = _chunk_rows(n, out_h, out_w, k * source.dtype.itemsize)
    # Zero rows of `other` contribute nothing: pad its rows up to a whole number of
    # chunks (and the source far enough to cover them), so any height works.
    padded_h = -(-out_h // rows) * rows
    in_rows = (padded_h - 1) * strides[0] + (kh - 1) * dilation[0] + 1
    source = lax.pad(source, jnp.zeros((), source.dtype),
                     ((0, 0, 0), (top, in_rows - source.shape[1] - top, 0),
                      (*left_right, 0), (0, 0, 0)))
    if padded_h != out_h:
        other = jnp.pad(other, ((0, 0), (0, padded_h - out_h), (0, 0), (0, 0)))
    chunk_in_rows = (rows - 1) * strides[0] + (kh - 1) * dilation[0] + 1
    row_chunks = padded_h // rows
    # The matmul kernels ran faster with the result's wider side last: other^T @ patches
    # ([M, K], transposed once at the end) unless M > K. But a big result transposed at
    # the end costs more than it saves (the transpose is fused, strided, into its
    # consumers: the optimizer's updates), so those keep [K, M].
    flip = k > m and k * m * 4 <= _FLIP_MAX_BYTES
    pixels = n * rows * out_w

    def chunk_product(index: jax.Array) -> jax.Array:
        first_row = index * rows
        sources = lax.dynamic_slice_in_dim(source, first_row * strides[0], chunk_in_rows,
                                           axis=1)
        others = lax.dynamic_slice_in_dim(other, first_row, rows, axis=1)
        patches = _patches(sources, (kh, kw), strides, dilation, (rows, out_w))
        patches, others = patches.reshape(pixels, k), others.reshape(pixels, m)
        # 2-D operands: contracting (N, H, W) of 4-D ones, XLA:CPU's dot thunk rejected
        # bfloat16 operands with a float32 result. XLA folds the transpose into the dot
        # (contracting both leading axes), which its Eigen dot ran about twice as fast
        # here as YNNPACK's matmul behind a transposing copy.
        lhs, rhs = (others.T, patches) if flip else (patches.T, others)
        return lax.dot_general(lhs, rhs, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)

    if row_chunks == 1:
        total = chunk_product(jnp.zeros((), jnp.int32))
    else:
        total, _ = lax.scan(lambda acc, i: (acc + chunk_product(i), None),
                            jnp.zeros((m, k) if flip else (k, m), jnp.float32),
                            jnp.arange(row_chunks, dtype=jnp.int32))
    return total.T if flip else total


def weight_gradient(x: jax.Array, dy: jax.Array, kernel_shape: Sequence[int], *,
                    strides: Sequence[int] = (1, 1),
                    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
                    dilation: Sequence[int] = (1, 1), precision: Any = None) -> jax.Array:
    """The gradient of an NHWC/HWIO convolution with respect to its kernel.

    ``dw[i, j, c, o] = sum over (n, y, x) of xpad[n, y*s + i*d, x*s + j*d, c] * dy[n, y, x, o]``,
    computed as ``patches(x)^T @ dy`` over chunks of output rows (accumulated in float32).
    Where the convolution has stride 1 and fewer output than input channels (the
    U-Net decoder's first convolution of each level, after the skip concatenation),
    the patches are taken of ``dy`` instead, the narrower of the two:
    ``dw[i, j, c, o] = sum over (n, q) of x[n, q, c] * dypad[n, q + (k-1-i)*d, o]``
    (``dy`` padded by ``(k-1)*d - pad`` on each side).

    Args:
      x: the convolution's ``[N, H, W, C]`` input.
      dy: the cotangent of its ``[N, Ho, Wo, O]`` output.
      kernel_shape: ``(kh, kw, C, O)``.
      strides, padding, dilation: the convolution's window strides, explicit
        ``((lo, hi), (lo, hi))`` padding and kernel (rhs) dilation.
      precision: passed to the products.

    Returns:
      ``[kh, kw, C, O]`` float32.
    """
    kh, kw, c, o = kernel_shape
    strides, dilation = tuple(strides), tuple(dilation)
    (top, _), (left, right) = padding  # The bottom follows from the output height.
    if strides == (1, 1) and o < c:
        dilation_h, dilation_w = dilation
        dy_left_right = ((kw - 1) * dilation_w - left, (kw - 1) * dilation_w - right)
        total = _patch_product(dy, (kh - 1) * dilation_h - top, dy_left_right, x, (kh, kw),
                               (1, 1), dilation, precision)
        # Row (i', j', o) of the product is kernel tap (kh-1-i', kw-1-j').
        return jnp.flip(total.reshape(kh, kw, o, c), (0, 1)).transpose(0, 1, 3, 2)
    total = _patch_product(x, top, (left, right), dy, (kh, kw), strides, dilation,
                           precision)
    return total.reshape(kh, kw, c, o)


# ---------------------------------------------------------------------------------------
# The custom-VJP convolution.
# ---------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fast_conv(x: jax.Array, w: jax.Array, spec: _ConvSpec) -> jax.Array:
    return spec.lax_conv(x, w)


def _fast_conv_fwd(x, w, spec):
    return spec.lax_conv(x, w), (x, w)


def _fast_conv_bwd(spec, residuals, dy):
    x, w = residuals
    with jax.named_scope("fast_conv_input_grad"):
        # XLA's own transposed convolution: it runs at forward-convolution speed.
        _, input_vjp = jax.vjp(lambda x_: spec.lax_conv(x_, w), x)
        (dx,) = input_vjp(dy)
    with jax.named_scope("fast_conv_weight_grad"):
        dw = weight_gradient(x, dy.astype(x.dtype), w.shape, strides=spec.strides,
                             padding=spec.padding, dilation=spec.dilation,
                             precision=spec.precision)
    return dx, dw.astype(w.dtype)


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` with a fast weight gradient on XLA:CPU.

    Same signature, values and gradients as ``lax.conv_general_dilated``. 2-D NHWC/HWIO
    convolutions with any strides, explicit or SAME/VALID padding and kernel dilation,
    without groups or input dilation, take the custom-VJP path; everything else is
    passed to ``lax.conv_general_dilated`` unchanged.
    """
    spec = _fast_spec(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                      dimension_numbers, feature_group_count, batch_group_count, precision,
                      preferred_element_type)
    if spec is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    return _fast_conv(lhs, rhs, spec)


# ---------------------------------------------------------------------------------------
# Non-overlapping transposed convolution (kernel size == stride).
# ---------------------------------------------------------------------------------------


def conv_transpose_nonoverlapping(x: jax.Array, kernel: jax.Array, *,
                                  transpose_kernel: bool = False,
                                  precision: Any = None) -> jax.Array:
    """``lax.conv_transpose(x, kernel, strides=kernel_size, 'SAME' or 'VALID')``, NHWC.

    With the stride equal to the kernel size no two input pixels write the same output
    pixel: output pixel ``(s*i + a, s*j + b)`` is ``x[i, j] @ K[a, b]`` for one tap of
    the kernel, so the whole layer is one ``[N*H*W, C] x [C, kh*kw*O]`` product and a
    reshape (depth to space). Its input gradient is the transposed product; its weight
    gradient is :func:`weight_gradient` of a 1x1 convolution.

    Args:
      x: ``[N, H, W, C]``.
      kernel: ``[kh, kw, C, O]`` (``[kh, kw, O, C]`` with ``transpose_kernel``), as
        ``flax.linen.ConvTranspose`` stores it.
      transpose_kernel: ``lax.conv_transpose``'s flag (flip and swap the kernel).
      precision: passed to the product.

    Returns:
      ``[N, H*kh, W*kw, O]``.
    """
    kh, kw = kernel.shape[:2]
    if transpose_kernel:
        # lax flips the kernel spatially and swaps its feature axes; the two flips cancel.
        taps = jnp.swapaxes(kernel, 2, 3)
    else:
        # lax.conv_transpose correlates the stride-dilated input with the kernel as given,
        # so output offset a within a block meets kernel row kh-1-a.
        taps = jnp.flip(kernel, (0, 1))
    c, o = taps.shape[2:]
    matrix = jnp.transpose(taps, (2, 0, 1, 3)).reshape(c, kh * kw * o)
    return _depth_to_space_product(x, matrix, (kh, kw), precision)


def _depth_to_space(y: jax.Array, block: tuple[int, int]) -> jax.Array:
    """``[N, H, W, kh*kw*O]`` -> ``[N, H*kh, W*kw, O]``: channel block (a, b) to (a, b)."""
    n, h, w, channels = y.shape
    (kh, kw), o = block, channels // (block[0] * block[1])
    y = y.reshape(n, h, w, kh, kw, o).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(n, h * kh, w * kw, o)


def _space_to_depth(dy: jax.Array, block: tuple[int, int]) -> jax.Array:
    """The inverse of :func:`_depth_to_space`."""
    n, height, width, o = dy.shape
    kh, kw = block
    dy = dy.reshape(n, height // kh, kh, width // kw, kw, o).transpose(0, 1, 3, 2, 4, 5)
    return dy.reshape(n, height // kh, width // kw, kh * kw * o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depth_to_space_product(x: jax.Array, matrix: jax.Array, block: tuple[int, int],
                            precision: Any) -> jax.Array:
    """``depth_to_space(x @ matrix)``; its weight gradient is the chunked product."""
    return _depth_to_space(lax.dot_general(x, matrix, (((3,), (0,)), ((), ())),
                                           precision=precision), block)


def _depth_to_space_product_fwd(x, matrix, block, precision):
    return _depth_to_space_product(x, matrix, block, precision), (x, matrix)


def _depth_to_space_product_bwd(block, precision, residuals, dy):
    x, matrix = residuals
    dy = _space_to_depth(dy, block).astype(x.dtype)
    dx = lax.dot_general(dy, matrix, (((3,), (1,)), ((), ())), precision=precision)
    with jax.named_scope("fast_conv_weight_grad"):
        # Left to autodiff, XLA transposes all of dy into [kh*kw*O, N*H*W] for this
        # product; as a 1x1 convolution's weight gradient it runs in cache-sized chunks.
        dmatrix = weight_gradient(x, dy, (1, 1, *matrix.shape), precision=precision)
    return dx, dmatrix.reshape(matrix.shape).astype(matrix.dtype)


_depth_to_space_product.defvjp(_depth_to_space_product_fwd, _depth_to_space_product_bwd)


def _nonoverlapping_transpose(module: nn.ConvTranspose, inputs: Any) -> bool:
    """Whether ``module(inputs)`` is a case :func:`conv_transpose_nonoverlapping` computes."""
    if getattr(inputs, "ndim", None) != 4:
        return False

    def pair(value):
        return (value, value) if isinstance(value, int) else _pairs(value)

    kernel_size = pair(module.kernel_size)
    padding = module.padding
    return (kernel_size is not None and kernel_size == pair(module.strides)
            and pair(module.kernel_dilation) == (1, 1)
            # lax.conv_transpose pads SAME and VALID alike (kernel - 1 each side) when
            # the stride equals the kernel: output size = input size * stride.
            and isinstance(padding, str) and padding.upper() in ("SAME", "VALID")
            and module.mask is None and module.preferred_element_type is None)


def _conv_transpose_call(module: nn.ConvTranspose, inputs: jax.Array) -> jax.Array:
    """``ConvTranspose.__call__`` for the non-overlapping case, with the module's params.

    Runs inside the module's compact call (the interceptor), so ``module.param`` creates
    (at init) or reads the same ``kernel`` and ``bias`` as the original, in its order.
    """
    kh, kw = ((module.kernel_size,) * 2 if isinstance(module.kernel_size, int)
              else tuple(module.kernel_size))
    in_features = inputs.shape[-1]
    kernel_shape = ((kh, kw, module.features, in_features) if module.transpose_kernel
                    else (kh, kw, in_features, module.features))
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    bias = (module.param("bias", module.bias_init, (module.features,), module.param_dtype)
            if module.use_bias else None)
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    y = conv_transpose_nonoverlapping(inputs, kernel, transpose_kernel=module.transpose_kernel,
                                      precision=module.precision)
    if bias is not None:
        y = y + bias.reshape(1, 1, 1, -1)
    return y


# ---------------------------------------------------------------------------------------
# Routing Flax's convolution modules to the fast ops.
# ---------------------------------------------------------------------------------------


def _interceptor(next_fun: Callable, args: tuple, kwargs: dict,
                 context: nn.module.InterceptorContext) -> Any:
    module = context.module
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if (isinstance(module, nn.Conv) and module.conv_general_dilated is None
            and module.conv_general_dilated_cls is None):
        # nn.Conv reads its `conv_general_dilated` field when called: set it for the
        # duration of this call only (modules are rebuilt every apply, and a user's own
        # choice, a non-None field, is respected). object.__setattr__ because Flax
        # modules refuse attribute writes outside setup.
        object.__setattr__(module, "conv_general_dilated", conv_general_dilated)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "conv_general_dilated", None)
    if (isinstance(module, nn.ConvTranspose) and len(args) == 1 and not kwargs
            and _nonoverlapping_transpose(module, args[0])):
        return _conv_transpose_call(module, args[0])
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def use_fast_convolutions() -> Iterator[None]:
    """Computes every ``nn.Conv`` / ``nn.ConvTranspose`` called inside with the fast ops.

    Parameters (names, shapes, initialisation), outputs and gradients are those of the
    plain modules; only the computation changes. Takes effect where the model is traced
    (inside ``jax.jit``, wrap the function being jitted, e.g. with :func:`fast_apply`).
    """
    with nn.intercept_methods(_interceptor):
        yield


class _FastApply:
    """A module's ``apply`` run inside :func:`use_fast_convolutions`.

    Equal (and hashing equal) to any other wrapper of an equal ``apply_fn``: jitted steps
    take the train state's ``apply_fn`` as a static argument, so two states built for the
    same model (e.g. a fresh one and the abstract one a checkpoint restores into) must
    not compile twice. (``model.apply`` bound methods compare equal the same way.)
    """

    def __init__(self, apply_fn: Callable):
        self.__wrapped__ = apply_fn
        functools.update_wrapper(self, apply_fn)

    def __call__(self, *args, **kwargs):
        with use_fast_convolutions():
            return self.__wrapped__(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _FastApply) and self.__wrapped__ == other.__wrapped__

    def __hash__(self) -> int:
        return hash((_FastApply, self.__wrapped__))

    def __repr__(self) -> str:
        return f"fast_apply({self.__wrapped__!r})"


def fast_apply(apply_fn: Callable) -> Callable:
    """``apply_fn`` (a module's ``apply``) run inside :func:`use_fast_convolutions`."""
    return _FastApply(apply_fn)


def should_use_fast_conv(setting: str) -> bool:
    """Resolves ``config.fast_conv``: ``'on'``, ``'off'``, or ``'auto'`` (CPU backend only).

    Raises:
      ValueError: for any other value.
    """
    if setting == "on":
        return True
    if setting == "off":
        return False
    if setting == "auto":
        return jax.default_backend() == "cpu"
    raise ValueError(f"fast_conv must be 'auto', 'on' or 'off', got {setting!r}")

