"""A functional Flax linen U-Net, configurable enough to express the classic variants.

Layout (Ronneberger et al. 2015, as most land-cover papers use it): at each encoder level
``convs_per_level`` times [3x3 conv -> BatchNorm -> ReLU], then 2x2 max-pool; the decoder
mirrors it, up-sampling by a 2x2 stride-2 transposed conv (or bilinear resize + 3x3 conv)
to the channels of the level below, concatenating the skip connection, and a 1x1 conv
gives the class logits.

``UNET_PRESETS`` holds the configurations of "Finding a Faster UNet for Satellite Image
Segmentation" (Cai & Zhang), registered as models of their own (``unet_base``, ...). Their
published parameter counts are reproduced exactly by this layout with a bias on every 3x3
convolution (``conv_bias=True``), a transposed convolution (with bias) that maps the
deeper level's channels to the channels of the level it joins, and decoder levels with
the convolution count of the encoder level at the same depth:

    preset          channels per level              convs per level  classes  parameters
    unet_base       64,128,256,512,1024             2 each           8        31,043,976
    unet_short      128,128,256,512                 2 each           5         8,254,981
    unet_skinny     32,64,128,256,512,512,512       1 each           5        20,095,781
    unet_less_conv  32,64,128,256,512,512,512       3,3,1,1,1,1,1    5        20,281,253

(halving the channels in the transposed conv instead, as the milesial implementation
does, changes the last three; leaving out the biases removes one parameter per 3x3
output channel). The milesial U-Net itself is ``unet`` with the default channels and
``conv_bias=False``: 31,038,023 parameters with 7 classes.

Inputs whose height or width is not a multiple of ``2 ** (levels - 1)`` (16 for five
levels, 64 for the seven of ``unet_skinny``) are padded at the bottom/right (reflect)
before the encoder and the logits are cropped back, so any input size works and every
output pixel corresponds to its input pixel.

Compute runs in ``dtype`` (bfloat16 for mixed precision) while parameters and BatchNorm
statistics stay float32; logits are returned in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcseg.models.layers import conv_bn_relu, pad_to_multiple, resize_bilinear
from lcseg.ops.pooling import max_pool_nonoverlapping

# Cai & Zhang's configurations: registered model names -> the UNet attributes they fix.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "unet_base": dict(channels=(64, 128, 256, 512, 1024), convs_per_level=2),
    "unet_short": dict(channels=(128, 128, 256, 512), convs_per_level=2),
    "unet_skinny": dict(channels=(32, 64, 128, 256, 512, 512, 512), convs_per_level=1),
    "unet_less_conv": dict(channels=(32, 64, 128, 256, 512, 512, 512),
                           convs_per_level=(3, 3, 1, 1, 1, 1, 1)),
}
for _preset in UNET_PRESETS.values():  # The classic layout the paper's counts imply.
    _preset.update(conv_bias=True, upsampling="transpose")


class ConvBlock(nn.Module):
    """``num_convs`` x [3x3 conv -> BatchNorm -> ReLU]."""

    features: int
    num_convs: int = 2
    conv_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        for _ in range(self.num_convs):
            x = conv_bn_relu(x, self.features, train=train, dtype=self.dtype,
                             use_bias=self.conv_bias)
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
      width_multiplier: scales every level's channels (rounded, at least 1): 0.5 is the
        half-channel prototype of a configuration (about a quarter of the parameters).
      dtype: compute dtype (parameters are always float32).
    """

    num_classes: int
    channels: Sequence[int] = (64, 128, 256, 512, 1024)
    convs_per_level: int | Sequence[int] = 2
    upsampling: str = "transpose"
    conv_bias: bool = False
    width_multiplier: float = 1.0
    dtype: jnp.dtype = jnp.float32

    def level_channels(self) -> tuple[int, ...]:
        """The channels of each level after the width multiplier."""
        return tuple(max(1, round(c * self.width_multiplier)) for c in self.channels)

    def level_convs(self) -> tuple[int, ...]:
        """The 3x3 convolutions of each level (encoder and decoder alike)."""
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
        convs = self.level_convs()
        channels = self.level_channels()
        height, width = images.shape[1:3]
        x = pad_to_multiple(images, 2 ** (len(channels) - 1)).astype(self.dtype)

        skips = []
        for level, features in enumerate(channels):
            if level > 0:
                x = max_pool_nonoverlapping(x, (2, 2))
            x = ConvBlock(features, convs[level], self.conv_bias, self.dtype,
                          name=f"encoder_{level}")(x, train=train)
            skips.append(x)

        for level in reversed(range(len(channels) - 1)):
            features = channels[level]
            if self.upsampling == "transpose":
                x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=self.dtype,
                                     param_dtype=jnp.float32, name=f"up_{level}")(x)
            else:
                # Half-pixel centres: jax.image.resize's and PyTorch's default.
                x = resize_bilinear(x, (2 * x.shape[1], 2 * x.shape[2]))
                x = nn.Conv(features, (3, 3), padding=1, dtype=self.dtype,
                            param_dtype=jnp.float32, name=f"up_{level}")(x)
            x = jnp.concatenate([skips[level], x], axis=-1)
            x = ConvBlock(features, convs[level], self.conv_bias, self.dtype,
                          name=f"decoder_{level}")(x, train=train)

        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                         name="head")(x)
        return logits[:, :height, :width].astype(jnp.float32)
