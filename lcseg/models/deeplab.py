"""DeepLabv3+ (Chen et al. 2018) on a ResNet encoder, in two layouts.

``layout='standard'`` is the paper's: ASPP on the encoder's last features (a 1x1 conv,
three 3x3 atrous convs, image pooling; ``aspp_channels`` = 256 each, concatenated and
projected by a 1x1 conv, dropout 0.1 as in the TensorFlow reference); the decoder
up-samples it to stride 4, concatenates a 48-channel 1x1 projection of the stride-4
(first stage) features, applies two 3x3 256-channel convs and a 1x1 classifier, and
up-samples the logits to the input. Atrous rates follow the output stride: 6/12/18 at
16, doubled (12/24/36) at 8. Bilinear resizing uses half-pixel centres
(``align_corners=False``), the convention of ``jax.image.resize``, TensorFlow 2 and
torchvision's segmentation models.

``layout='smp'`` reproduces segmentation_models_pytorch's ``DeepLabV3Plus`` (ASPP
branches and the decoder conv depthwise-separable, rates 12/24/36, ASPP dropout 0.5, a
separable 3x3 conv after the ASPP, one separable 3x3 decoder conv, a 1x1 classifier with
bias, and ``nn.UpsamplingBilinear2d``, i.e. ``align_corners=True``), with its encoders'
uniform dilation. With a ``resnet34`` encoder and 5 classes it has exactly 22,438,485
parameters, the count Cai & Zhang report.

Every conv before a BatchNorm is bias-free. Inputs are reflect-padded at the bottom/right
to a multiple of the output stride (so the stride-4 and the ASPP features align exactly)
and the logits cropped back: any input size works.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcseg.models.layers import HE_INIT, ConvBNReLU, conv_bn_relu, pad_to_multiple, resize_bilinear
from lcseg.models.resnet import resnet

LAYOUTS = ("standard", "smp")


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3, image pooling; projected.

    Attributes:
      features: channels of every branch and of the output.
      rates: the three atrous rates.
      separable: depthwise-separable atrous convs (segmentation_models_pytorch).
      dropout: dropout rate after the projection (training only).
      dtype: compute dtype.
    """

    features: int = 256
    rates: Sequence[int] = (6, 12, 18)
    separable: bool = False
    dropout: float = 0.1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block = dict(train=train, dtype=self.dtype, kernel_init=HE_INIT)
        branches = [conv_bn_relu(x, self.features, kernel_size=1, **block)]
        for rate in self.rates:
            branches.append(conv_bn_relu(x, self.features, dilation=rate,
                                         separable=self.separable, **block))
        # The image-level mean in float32: a bfloat16 sum over a large map loses digits.
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        pooled = conv_bn_relu(pooled, self.features, kernel_size=1, **block)
        # Resizing a 1x1 map bilinearly, with either corner convention, is a broadcast.
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.features)))
        x = conv_bn_relu(jnp.concatenate(branches, axis=-1), self.features, kernel_size=1,
                         **block)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class DeepLabV3Plus(nn.Module):
    """DeepLabv3+ with a ResNet encoder (see the module docstring for the two layouts).

    Attributes:
      num_classes: logits per pixel.
      encoder: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
      output_stride: 16 or 8 (the encoder's last features' stride).
      layout: ``'standard'`` (the paper) or ``'smp'`` (segmentation_models_pytorch).
      atrous_rates: the ASPP rates; None: 6/12/18 at output stride 16 and 12/24/36 at 8
        (standard), 12/24/36 (smp, whatever the stride, as that library does).
      aspp_channels: channels of the ASPP branches and output (256).
      decoder_channels: channels of the decoder's 3x3 convs (256).
      low_level_channels: channels of the stride-4 projection (48).
      aspp_dropout: dropout after the ASPP projection; None: 0.1 (standard), 0.5 (smp).
      encoder_width: the ResNet's base width (64 for ImageNet weights; smaller only for
        prototyping and tests).
      dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    """

    num_classes: int
    encoder: str = "resnet50"
    output_stride: int = 16
    layout: str = "standard"
    atrous_rates: Sequence[int] | None = None
    aspp_channels: int = 256
    decoder_channels: int = 256
    low_level_channels: int = 48
    aspp_dropout: float | None = None
    encoder_width: int = 64
    dtype: jnp.dtype = jnp.float32

    def rates(self) -> tuple[int, ...]:
        """The ASPP's atrous rates after the defaults above."""
        if self.atrous_rates is not None:
            if len(self.atrous_rates) != 3:
                raise ValueError(f"atrous_rates needs three rates, got {self.atrous_rates}")
            return tuple(self.atrous_rates)
        if self.layout == "smp":
            return (12, 24, 36)
        return tuple(rate * 16 // self.output_stride for rate in (6, 12, 18))

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}")
        smp = self.layout == "smp"
        align_corners = smp
        dropout = self.aspp_dropout if self.aspp_dropout is not None else (0.5 if smp else 0.1)

        height, width = images.shape[1:3]
        x = pad_to_multiple(images, self.output_stride).astype(self.dtype)
        features = resnet(self.encoder, output_stride=self.output_stride,
                          dilation_style="uniform" if smp else "torchvision",
                          base_width=self.encoder_width, dtype=self.dtype)(x, train=train)
        low_level = features[1]  # Stride 4: the first stage.

        y = ASPP(self.aspp_channels, self.rates(), separable=smp, dropout=dropout,
                 dtype=self.dtype, name="aspp")(features[-1], train=train)
        if smp:
            y = ConvBNReLU(self.aspp_channels, separable=True, dtype=self.dtype,
                           name="aspp_conv")(y, train=train)
        y = resize_bilinear(y, low_level.shape[1:3], align_corners=align_corners)
        low_level = ConvBNReLU(self.low_level_channels, kernel_size=1, dtype=self.dtype,
                               name="low_level")(low_level, train=train)
        y = jnp.concatenate([y, low_level], axis=-1)
        for index in range(1 if smp else 2):
            y = ConvBNReLU(self.decoder_channels, separable=smp, dtype=self.dtype,
                           name=f"decoder_{index}")(y, train=train)
        logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32,
                         name="head")(y)
        logits = resize_bilinear(logits, x.shape[1:3], align_corners=align_corners)
        return logits[:, :height, :width].astype(jnp.float32)
