"""A functional Flax linen U-Net, configurable enough to express the classic variants.

Layout (Ronneberger et al. 2015, as most land-cover papers use it): at each encoder level
``convs_per_level`` times [3x3 conv -> BatchNorm -> ReLU], then 2x2 max-pool; the decoder
mirrors it, up-sampling by a 2x2 stride-2 transposed conv (or bilinear resize + 3x3 conv),
concatenating the skip connection, and a 1x1 conv gives the class logits.

Inputs whose height or width is not a multiple of ``2 ** (levels - 1)`` are padded at the
bottom/right (reflect) before the encoder and the logits are cropped back, so any input
size works and every output pixel corresponds to its input pixel.

Compute runs in ``dtype`` (bfloat16 for mixed precision) while parameters and BatchNorm
statistics stay float32; logits are returned in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvBlock(nn.Module):
    """``num_convs`` x [3x3 conv -> BatchNorm -> ReLU]."""

    features: int
    num_convs: int = 2
    conv_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for _ in range(self.num_convs):
            x = nn.Conv(self.features, (3, 3), padding=1, use_bias=self.conv_bias,
                        dtype=self.dtype, param_dtype=jnp.float32)(x)
            # momentum 0.9 = PyTorch's BatchNorm momentum 0.1; statistics stay float32.
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=jnp.float32)(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    """U-Net with ``len(channels)`` levels.

    Attributes:
      num_classes: number of output logits per pixel.
      channels: output channels of each encoder level, shallow to deep (the last is the
        bottleneck).
      convs_per_level: 3x3 convolutions per level, one int or one per level; the decoder
        level ``i`` uses the same count as encoder level ``i``.
      upsampling: ``'transpose'`` (2x2 stride-2 transposed conv) or ``'bilinear'``
        (bilinear resize, then a 3x3 conv to halve the channels).
      conv_bias: whether the 3x3 convolutions have a bias (redundant before BatchNorm,
        but part of some published configurations).
      dtype: compute dtype (parameters are always float32).
    """

    num_classes: int
    channels: Sequence[int] = (64, 128, 256, 512, 1024)
    convs_per_level: int | Sequence[int] = 2
    upsampling: str = "transpose"
    conv_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    def _convs(self) -> tuple[int, ...]:
        if isinstance(self.convs_per_level, int):
            return (self.convs_per_level,) * len(self.channels)
        if len(self.convs_per_level) != len(self.channels):
            raise ValueError(f"convs_per_level {tuple(self.convs_per_level)} needs one entry "
                             f"per level of channels {tuple(self.channels)}")
        return tuple(self.convs_per_level)

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if self.upsampling not in ("transpose", "bilinear"):
            raise ValueError(f"upsampling must be 'transpose' or 'bilinear', "
                             f"got {self.upsampling!r}")
        convs = self._convs()
        height, width = images.shape[1:3]
        stride = 2 ** (len(self.channels) - 1)
        pad_h, pad_w = -height % stride, -width % stride
        x = jnp.pad(images, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")
        x = x.astype(self.dtype)

        skips = []
        for level, features in enumerate(self.channels):
            if level > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = ConvBlock(features, convs[level], self.conv_bias, self.dtype,
                          name=f"encoder_{level}")(x, train=train)
            skips.append(x)

        for level in reversed(range(len(self.channels) - 1)):
            features = self.channels[level]
            if self.upsampling == "transpose":
                x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=self.dtype,
                                     param_dtype=jnp.float32, name=f"up_{level}")(x)
            else:
                n, h, w, c = x.shape
                x = jax.image.resize(x, (n, 2 * h, 2 * w, c), "bilinear")
                x = nn.Conv(features, (3, 3), padding=1, dtype=self.dtype,
                            param_dtype=jnp.float32, name=f"up_{level}")(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = ConvBlock(features, convs[level], self.conv_bias, self.dtype,
                          name=f"decoder_{level}")(x, train=train)

        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                         name="head")(x)
        return logits[:, :height, :width].astype(jnp.float32)
