"""The zoom-out / hypercolumn classifier (Mostajabi et al. 2015) on VGG16.

Every pixel's descriptor is the concatenation of VGG16 activations at that pixel
(``layers='all'``: all thirteen conv activations, 4,224 channels; ``'pool'``: the last
one before each pool, 1,472 channels), each map bilinearly up-sampled to the input size
(``lcseg.models.layers.resize_bilinear``, half-pixel centres, ``align_corners=False``).
A per-pixel MLP classifies it: ``Dense(hidden) -> ReLU -> Dropout -> Dense(num_classes)``.

Efficient computation. Up-sampling acts on each channel alone and the first dense layer
is linear, so ``upsample(f_l) @ W_l == upsample(f_l @ W_l)``: each level is projected by
its own row block ``W_l`` of the hidden layer's kernel at its own resolution (a 1x1
conv without bias), the ``hidden``-channel projections are up-sampled and summed, and the
bias is added once. Consecutive levels of one resolution are concatenated first and
projected together (five projections for ``'all'``, not thirteen). The outputs are those
of the concatenate-then-MLP classifier (``naive_hypercolumn_logits``, to float rounding)
without ever materialising the ``[N, H, W, 4224]`` hypercolumns (nor their gradient).
Under differentiation the up-sampling multiplies by interpolation matrices and their
transposes (``upsample``) instead of differentiating ``resize_bilinear``'s gathers, whose
scatter-add transpose XLA gives large temporaries; ``benchmarks/hypercolumn_memory.py``
measures both heads.

Sampled pixels (stage one of the paper's training: the classifier sees ``k`` random
labelled pixels per image): given ``pixels`` (``[N, k, 2]`` row/column), each level's
features are interpolated at exactly those pixels with ``resize_bilinear``'s weights and
the MLP runs on ``[N, k, channels]`` only, giving the dense logits at those pixels.
(Interpolating the features rather than their projections is the same linear map in the
other order; it is cheaper because the stride-1 levels are never projected densely.)

Parameters (``params``): ``encoder/features_<i>/{kernel,bias}`` (``lcseg.models.vgg``,
torchvision's layout, so ``load_pretrained``-style loading finds the ``encoder``), and
``head/hidden/{kernel [sum of channels, hidden], bias [hidden]}`` and
``head/classifier/{kernel [hidden, num_classes], bias}``. The ``hidden`` kernel is the one
kernel of the dense layer on the concatenated descriptor; its rows are in the order of
the encoder's maps (finest first), and the efficient path slices it per level, so the
naive and efficient computations use the same parameters.

Inputs are reflect-padded at the bottom/right to a multiple of 16 (the encoder's
coarsest stride) and the logits cropped back, so every map covers the padded image
exactly and any input size works.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcseg.models.layers import LECUN_INIT, linear_indices, pad_to_multiple, resize_bilinear
from lcseg.models.vgg import VGG16

LAYERS = ("all", "pool")
STRIDE = 16  # The coarsest VGG16 map's stride: inputs are padded to a multiple of it.


class DenseParams(nn.Module):
    """A dense layer's parameters, returned rather than applied (the head slices them).

    Attributes:
      features: output features.
    """

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        """Creates (or reads) the kernel and bias.

        Args:
          in_features: input features (rows of the kernel).

        Returns:
          ``(kernel [in_features, features], bias [features])``, float32, initialised as
          ``flax.linen.Dense``'s.
        """
        kernel = self.param("kernel", LECUN_INIT, (in_features, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel, bias


def _sample_bilinear(x: jax.Array, pixels: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``resize_bilinear(x, size)`` read at ``pixels`` only, without resizing ``x``.

    Same source indices and weights, and the same order of operations (rows first, then
    columns), as ``resize_bilinear``.

    Args:
      x: ``[N, h, w, C]``.
      pixels: ``[N, k, 2]`` integer (row, column) coordinates in the ``size`` grid.
      size: the grid ``(height, width)`` the coordinates refer to.

    Returns:
      ``[N, k, C]`` in ``x.dtype``.
    """
    tables = []
    for axis, size_out in ((1, size[0]), (2, size[1])):
        lower, upper, weight = linear_indices(x.shape[axis], size_out, False)
        coordinate = pixels[..., axis - 1]
        tables.append((jnp.asarray(lower)[coordinate], jnp.asarray(upper)[coordinate],
                       jnp.asarray(weight, x.dtype)[coordinate][..., None]))
    (row_lo, row_hi, row_w), (col_lo, col_hi, col_w) = tables
    gather = jax.vmap(lambda image, rows, cols: image[rows, cols])  # Per image: [k, C].

    def rows_then_column(cols: jax.Array) -> jax.Array:
        return gather(x, row_lo, cols) * (1 - row_w) + gather(x, row_hi, cols) * row_w

    return rows_then_column(col_lo) * (1 - col_w) + rows_then_column(col_hi) * col_w


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` matrix of ``resize_bilinear``'s 1-D map (two taps a row)."""
    lower, upper, weight = linear_indices(size_in, size_out, False)
    matrix = np.zeros((size_out, size_in), np.float32)
    rows = np.arange(size_out)
    np.add.at(matrix, (rows, lower), 1 - weight)
    np.add.at(matrix, (rows, upper), weight)
    return matrix


def _interpolate(x: jax.Array, size: tuple[int, int], *, transpose: bool = False
                 ) -> jax.Array:
    """``resize_bilinear``'s map (or its transpose) as two matrix left-multiplications.

    Each is a plain batched matmul over a major axis (rows, then columns), so XLA needs
    neither gathers, scatter-adds nor transposed copies. ``HIGHEST`` keeps float32
    operands from being rounded to TF32 on GPUs (the matrices are exact either way).

    Args:
      x: ``[N, h, w, C]``, or with ``transpose`` the ``[N, H, W, C]`` cotangent.
      size: ``(H, W)``, the up-sampled size.
      transpose: apply the transposed map (``[N, H, W, C]`` -> ``[N, h, w, C]``); ``x``
        then has the up-sampled size and ``size`` is the small one.

    Returns:
      ``[N, *size, C]`` in ``x.dtype``.
    """
    batch, height, width, channels = x.shape
    matmul = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)

    def matrix(size_in: int, size_out: int) -> jax.Array:
        if transpose:  # The transpose of the up-sampling from size_out to size_in.
            return jnp.asarray(_interpolation_matrix(size_out, size_in).T, x.dtype)
        return jnp.asarray(_interpolation_matrix(size_in, size_out), x.dtype)

    if height != size[0]:
        x = matmul(matrix(height, size[0]), x.reshape(batch, height, -1))
        x = x.reshape(batch, size[0], width, channels)
    if width != size[1]:
        x = matmul(matrix(width, size[1]), x.reshape(batch * size[0], width, channels))
    return x.reshape(batch, *size, channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def upsample(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``resize_bilinear(x, size)``, differentiated through interpolation matrices.

    Evaluated alone (inference) it is ``resize_bilinear`` itself, the gathers being
    cheapest there. Under differentiation both passes multiply by ``resize_bilinear``'s
    interpolation matrices (``_interpolate``; the same taps, so the same map to float
    rounding): the gathers' automatic transpose scatter-adds products the size of the
    output, and XLA:CPU keeps the gathered operands of all levels alive for the backward
    pass. In XLA:CPU's analysis of the ``layers='all'`` head (batch 16, 256x256, hidden
    1024; ``benchmarks/hypercolumn_memory.py``), forward + backward took 45 GiB of
    temporaries with gathers in the forward pass and matrices in the backward, more with
    the scatter-add transpose, and 29 GiB with matrices in both.

    Args:
      x: ``[N, h, w, C]``.
      size: output ``(H, W)``.

    Returns:
      ``[N, H, W, C]`` in ``x.dtype``.
    """
    return resize_bilinear(x, size)


def _upsample_fwd(x: jax.Array, size: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    # A linear map needs no residuals but the input's shape and dtype; an empty slice of
    # the input carries them without keeping the input alive.
    return _interpolate(x, size), jnp.zeros((0, *x.shape[1:]), x.dtype)


def _upsample_bwd(size: tuple[int, int], residual: jax.Array, cotangent: jax.Array
                  ) -> tuple[jax.Array]:
    return (_interpolate(cotangent.astype(residual.dtype), residual.shape[1:3],
                         transpose=True),)


upsample.defvjp(_upsample_fwd, _upsample_bwd)


def _same_resolution_runs(features: Sequence[jax.Array]) -> list[list[int]]:
    """Indices of ``features`` grouped into runs of consecutive maps of one resolution."""
    runs: list[list[int]] = []
    for index, level in enumerate(features):
        if runs and features[runs[-1][-1]].shape[1:3] == level.shape[1:3]:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


class HypercolumnHead(nn.Module):
    """The per-pixel MLP on hypercolumns, computed level by level (module docstring).

    Attributes:
      num_classes: output classes.
      hidden: width of the hidden layer.
      dropout: dropout rate after the hidden layer's ReLU (training only).
      dtype: compute dtype (parameters float32; the level sum accumulates in float32).
    """

    num_classes: int
    hidden: int = 1024
    dropout: float = 0.5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], size: tuple[int, int], *,
                 train: bool = False, pixels: jax.Array | None = None) -> jax.Array:
        """Logits from the encoder's maps.

        Args:
          features: ``[N, h_l, w_l, C_l]`` maps, in the order of the hypercolumn's channels.
          size: ``(H, W)`` the maps are up-sampled to (the image they cover).
          train: apply dropout (needs a ``'dropout'`` rng).
          pixels: optional ``[N, k, 2]`` integer (row, column) pixels in ``[0, H) x [0, W)``
            (not checked: out-of-range indices are clamped by JAX's gather).

        Returns:
          ``[N, H, W, num_classes]``, or ``[N, k, num_classes]`` with ``pixels``; float32.
        """
        widths = [int(f.shape[-1]) for f in features]
        kernel, bias = DenseParams(self.hidden, name="hidden")(sum(widths))
        if pixels is None:
            hidden = None
            offset = 0
            for group in _same_resolution_runs(features):
                # Levels of one resolution are concatenated (cheaply, at that resolution)
                # and projected by one matmul: one hidden-channel map per resolution,
                # not per level (at stride 1 such a map is as large as the hidden layer).
                width = sum(widths[i] for i in group)
                block = kernel[offset:offset + width].astype(self.dtype)
                offset += width
                level = jnp.concatenate([features[i].astype(self.dtype) for i in group], -1)
                # Project at the group's own resolution, then up-sample `hidden` channels.
                projection = upsample(jnp.dot(level, block), size).astype(jnp.float32)
                hidden = projection if hidden is None else hidden + projection
        else:
            columns = jnp.concatenate(
                [_sample_bilinear(level.astype(self.dtype), pixels, size) for level in features],
                axis=-1)
            hidden = jnp.dot(columns, kernel.astype(self.dtype)).astype(jnp.float32)
        x = nn.relu(hidden + bias).astype(self.dtype)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                     name="classifier")(x)
        return x.astype(jnp.float32)


def naive_hypercolumn_logits(params: Mapping[str, Any], features: Sequence[jax.Array],
                             size: tuple[int, int], *, dtype: jnp.dtype = jnp.float32
                             ) -> jax.Array:
    """The reference: up-sample every map, concatenate, then the MLP (evaluation mode).

    Materialises the ``[N, H, W, sum of channels]`` hypercolumns; for tests and the
    memory benchmark.

    Args:
      params: ``HypercolumnHead``'s parameters (``{'hidden': ..., 'classifier': ...}``,
        i.e. a ``Hypercolumn``'s ``params['head']``).
      features: the encoder's maps, as ``HypercolumnHead`` takes them.
      size: ``(H, W)`` to up-sample to.
      dtype: compute dtype.

    Returns:
      ``[N, H, W, num_classes]`` float32 logits.
    """
    columns = jnp.concatenate([resize_bilinear(f.astype(dtype), size) for f in features],
                              axis=-1)
    hidden = jnp.dot(columns, params["hidden"]["kernel"].astype(dtype)).astype(jnp.float32)
    x = nn.relu(hidden + params["hidden"]["bias"]).astype(dtype)
    classifier = params["classifier"]
    x = jnp.dot(x, classifier["kernel"].astype(dtype)) + classifier["bias"].astype(dtype)
    return x.astype(jnp.float32)


class Hypercolumn(nn.Module):
    """Hypercolumn (zoom-out) segmentation on a VGG16 encoder.

    Attributes:
      num_classes: output classes.
      layers: ``'all'`` (the 13 conv activations) or ``'pool'`` (the 5 before each pool).
      hidden: width of the MLP's hidden layer.
      dropout: dropout rate after the hidden layer (training only).
      dtype: compute dtype (parameters stay float32; logits are float32).
    """

    num_classes: int
    layers: str = "all"
    hidden: int = 1024
    dropout: float = 0.5
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        if self.layers not in LAYERS:
            raise ValueError(f"layers must be one of {LAYERS}, got {self.layers!r}")
        self.encoder = VGG16(outputs=self.layers, dtype=self.dtype)
        self.head = HypercolumnHead(self.num_classes, self.hidden, self.dropout, self.dtype)

    def encode(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """The encoder's maps of the padded images (``apply(..., method='encode')``).

        Args:
          images: ``[N, H, W, C]`` normalised images.
          train: training mode (VGG16 behaves the same either way).

        Returns:
          The maps, finest first; they cover ``images`` padded to multiples of 16.
        """
        return self.encoder(pad_to_multiple(images, STRIDE), train=train)

    def __call__(self, images: jax.Array, *, train: bool = False,
                 pixels: jax.Array | None = None) -> jax.Array:
        """Per-pixel logits.

        Args:
          images: ``[N, H, W, C]`` normalised images.
          train: apply dropout (needs a ``'dropout'`` rng).
          pixels: optional ``[N, k, 2]`` integer (row, column) pixels in ``[0, H) x [0, W)``.

        Returns:
          ``[N, H, W, num_classes]`` float32 logits, or ``[N, k, num_classes]`` at
          ``pixels`` (equal to the dense logits there).
        """
        height, width = images.shape[1:3]
        features = self.encode(images, train=train)
        # Padding is at the bottom/right only, so pixel coordinates are unchanged.
        size = (-(-height // STRIDE) * STRIDE, -(-width // STRIDE) * STRIDE)
        logits = self.head(features, size, train=train, pixels=pixels)
        return logits if pixels is not None else logits[:, :height, :width]
