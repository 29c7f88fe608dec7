"""UNet++ (Zhou et al. 2018): nested, densely connected skips on a ResNet encoder.

Nodes ``X[i, j]`` sit at encoder level ``i`` (stride ``2 ** (i + 1)``: the ResNet stem,
then its four stages) and nesting column ``j``. ``X[i, 0]`` are the encoder features; every
other node is two [3x3 conv -> BatchNorm -> ReLU] applied to the concatenation of
``up(X[i + 1, j - 1])`` and all earlier nodes of its level ``X[i, j - 1], ..., X[i, 0]``,
with ``up`` 2x nearest-neighbour up-sampling. The nodes of the last column of each level
(``i + j = 4``, the plain U-Net decoder path) have ``decoder_channels[3 - i]`` channels,
inner nodes the channels of their level's encoder features. ``X[0, 4]`` (stride 2) is
up-sampled to the input resolution, refined by one more block of
``decoder_channels[4]`` channels and classified by a 3x3 conv. This is the layout of
segmentation_models_pytorch's ``UnetPlusPlus`` (same blocks, channels and concatenation
order), so its parameter counts match that library's.

Deep supervision (the paper's "accurate mode"): 1x1 classifiers on ``X[0, 1..3]`` as
well, bilinearly up-sampled (half-pixel centres) to the input; the model returns the
mean of the four logit maps, and ``sow``s each head's logits in the ``intermediates``
collection (``mutable=['intermediates']``) for a per-head loss.

Inputs are reflect-padded at the bottom/right to a multiple of 32 and the logits
cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcseg.models.layers import pad_to_multiple, resize_bilinear, upsample_nearest
from lcseg.models.resnet import resnet
from lcseg.models.unet import ConvBlock

ENCODER_STRIDE = 32


class UNetPlusPlus(nn.Module):
    """UNet++ with a ResNet encoder.

    Attributes:
      num_classes: logits per pixel.
      encoder: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
      decoder_channels: channels of the decoder path from deep to shallow: levels 3, 2,
        1, 0 and the full-resolution block (segmentation_models_pytorch's default).
      deep_supervision: average the final logits with those of 1x1 heads on
        ``X[0, 1..3]`` (see the module docstring).
      encoder_width: the ResNet's base width (64 for ImageNet weights).
      dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    """

    num_classes: int
    encoder: str = "resnet34"
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
    deep_supervision: bool = False
    encoder_width: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        if len(self.decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 entries (levels 3..0 and full "
                             f"resolution), got {tuple(self.decoder_channels)}")
        height, width = images.shape[1:3]
        x = pad_to_multiple(images, ENCODER_STRIDE).astype(self.dtype)
        features = resnet(self.encoder, base_width=self.encoder_width,
                          dtype=self.dtype)(x, train=train)
        depth = len(features) - 1

        nodes = {(level, 0): feature for level, feature in enumerate(features)}
        for column in range(1, depth + 1):
            for level in range(depth - column + 1):
                inputs = [upsample_nearest(nodes[level + 1, column - 1]),
                          *(nodes[level, k] for k in reversed(range(column)))]
                last = level + column == depth
                channels = (self.decoder_channels[depth - 1 - level] if last
                            else features[level].shape[-1])
                nodes[level, column] = ConvBlock(channels, 2, dtype=self.dtype,
                                                 name=f"x_{level}_{column}")(
                    jnp.concatenate(inputs, axis=-1), train=train)

        y = ConvBlock(self.decoder_channels[-1], 2, dtype=self.dtype, name="x_full")(
            upsample_nearest(nodes[0, depth]), train=train)
        logits = nn.Conv(self.num_classes, (3, 3), padding=1, dtype=self.dtype,
                         param_dtype=jnp.float32, name="head")(y)
        if self.deep_supervision:
            heads = [logits]
            for column in range(1, depth):
                head = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype,
                               param_dtype=jnp.float32, name=f"head_{column}")(
                    nodes[0, column])
                heads.append(resize_bilinear(head, x.shape[1:3]))
            for index, head in enumerate(heads):
                self.sow("intermediates", f"logits_{index}", head[:, :height, :width])
            logits = jnp.mean(jnp.stack([h.astype(jnp.float32) for h in heads]), axis=0)
        return logits[:, :height, :width].astype(jnp.float32)
