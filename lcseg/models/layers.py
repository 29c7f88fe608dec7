"""Building blocks shared by the models: conv -> BatchNorm -> ReLU, resizing, padding.

Every convolution here computes in the caller's ``dtype`` with float32 parameters, and
every BatchNorm keeps its statistics in float32 (Flax reduces in at least float32 and
stores ``batch_stats`` as float32 whatever the compute dtype).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# He (Kaiming) normal initialisation over the fan-out, as torchvision initialises its
# ResNets and segmentation heads; appropriate for ReLU networks trained from scratch.
HE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
LECUN_INIT = nn.initializers.lecun_normal()  # Flax's default (the U-Net keeps it).


def batch_norm(*, train: bool, dtype: jnp.dtype, name: str | None = None) -> nn.BatchNorm:
    """A BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here, epsilon 1e-5).

    Args:
      train: normalise with the batch statistics (and update the running ones) if True,
        with the running statistics otherwise.
      dtype: compute dtype; statistics and parameters stay float32.
      name: the submodule's name (None: Flax's automatic ``BatchNorm_<i>``).

    Returns:
      The (unbound) BatchNorm module.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        dtype=dtype, param_dtype=jnp.float32, name=name)


def conv_bn_relu(x: jax.Array, features: int, *, train: bool, dtype: jnp.dtype,
                 kernel_size: int = 3, dilation: int = 1, use_bias: bool = False,
                 separable: bool = False, kernel_init=LECUN_INIT
                 ) -> jax.Array:
    """``conv -> BatchNorm -> ReLU`` with symmetric "same" padding, inside a compact module.

    Called from a ``@nn.compact`` method, the convolutions and the BatchNorm become that
    module's submodules (``Conv_<i>``, ``BatchNorm_<i>``), so a module built from these
    calls has the flat parameter tree of one written out by hand.

    Args:
      x: ``[N, H, W, C]`` input.
      features: output channels.
      train: BatchNorm mode.
      dtype: compute dtype.
      kernel_size: square kernel size (odd).
      dilation: kernel dilation (atrous rate); the padding grows with it.
      use_bias: whether the convolution has a bias (redundant before BatchNorm).
      separable: depthwise ``kernel_size`` conv (no bias) then pointwise 1x1 conv, as
        segmentation_models_pytorch's ``SeparableConv2d``.
      kernel_init: initialiser of the convolution kernels.

    Returns:
      ``[N, H, W, features]``.
    """
    padding = dilation * (kernel_size // 2)
    conv = dict(dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init)
    if separable:
        x = nn.Conv(x.shape[-1], (kernel_size, kernel_size), padding=padding,
                    kernel_dilation=dilation, feature_group_count=x.shape[-1],
                    use_bias=False, **conv)(x)
        x = nn.Conv(features, (1, 1), use_bias=use_bias, **conv)(x)
    else:
        x = nn.Conv(features, (kernel_size, kernel_size), padding=padding,
                    kernel_dilation=dilation, use_bias=use_bias, **conv)(x)
    return nn.relu(batch_norm(train=train, dtype=dtype)(x))


class ConvBNReLU(nn.Module):
    """``conv_bn_relu`` as a named submodule (He-initialised, like torchvision's heads).

    Attributes:
      features: output channels.
      kernel_size: square kernel size (odd).
      dilation: kernel dilation.
      separable: depthwise-separable convolution.
      dtype: compute dtype.
    """

    features: int
    kernel_size: int = 3
    dilation: int = 1
    separable: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return conv_bn_relu(x, self.features, train=train, dtype=self.dtype,
                            kernel_size=self.kernel_size, dilation=self.dilation,
                            separable=self.separable, kernel_init=HE_INIT)


def pad_to_multiple(images: jax.Array, multiple: int) -> jax.Array:
    """Reflect-pads ``[N, H, W, C]`` at the bottom and right to multiples of ``multiple``.

    Padding only at the bottom/right keeps pixel (i, j) of the output at pixel (i, j) of
    the input, so cropping the logits back to ``[:H, :W]`` is exact. Reflection (rather
    than zeros) keeps the padded border looking like image, so the valid pixels near it
    see plausible context.
    """
    height, width = images.shape[1:3]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return images
    return jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")


def linear_indices(size_in: int, size_out: int, align_corners: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear interpolation, PyTorch's conventions."""
    if align_corners:
        scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        source = np.arange(size_out) * scale
    else:  # Half-pixel centres; PyTorch clamps negative source coordinates to 0.
        source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int32), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    return lower, upper, (source - lower).astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int], *,
                    align_corners: bool = False) -> jax.Array:
    """Bilinear resize of ``[N, H, W, C]`` to ``size``, as ``torch.nn.functional.interpolate``.

    ``align_corners=False`` (half-pixel centres) is the convention of
    ``jax.image.resize``, TensorFlow 2 and PyTorch's default; ``align_corners=True`` maps
    the corner pixels onto each other, as PyTorch's ``nn.UpsamplingBilinear2d`` (used by
    segmentation_models_pytorch) and the original TensorFlow DeepLab do. Separable
    gathers: two reads per output pixel and axis, whatever the scale (no antialiasing, so
    meant for up-sampling).

    Args:
      x: ``[N, H, W, C]``.
      size: output ``(height, width)``.
      align_corners: the corner convention above.

    Returns:
      ``[N, size[0], size[1], C]`` in ``x.dtype``.
    """
    for axis, size_out in ((1, size[0]), (2, size[1])):
        size_in = x.shape[axis]
        if size_in == size_out:
            continue
        lower, upper, weight = linear_indices(size_in, size_out, align_corners)
        shape = [1] * x.ndim
        shape[axis] = size_out
        weight = jnp.asarray(weight.reshape(shape), x.dtype)
        x = (jnp.take(x, lower, axis=axis) * (1 - weight)
             + jnp.take(x, upper, axis=axis) * weight)
    return x


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour up-sampling of ``[N, H, W, C]`` by an integer factor."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)
