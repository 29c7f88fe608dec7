"""A feature pyramid network (Lin et al. 2017) with a light segmentation head, on any backbone.

The LandCover.ai hackathon system: a SwinV2-B backbone (SatlasPretrain weights), an FPN
over its four stages and a small head. Layout:

* lateral 1x1 convolutions bring each chosen backbone stage to ``fpn_channels``;
* top-down: from the coarsest level, each level is upsampled (nearest, to the finer
  level's size, as torchvision's ``FeaturePyramidNetwork``) and added to the next finer
  lateral;
* a 3x3 output convolution on every level;
* the levels fused to the finest one: each upsampled bilinearly to the finest level's
  size and summed;
* the head: Conv3x3(``head_channels``) - ReLU - Conv1x1(classes), then bilinear upsampling
  of the logits to the input size.

``backbone`` is any name of ``lcseg.models.backbones`` (``swin_v2_b``, ``resnet50``, ...);
``stages`` picks the backbone's feature maps that feed the pyramid, counted from the
coarsest: ``None`` takes the last four (a Swin's four stages; a ResNet's four stages
without the stem). The backbone is the submodule ``encoder``, where pretrained weights
load and what ``config.frozen=('encoder',)`` freezes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcseg.models.backbones import create_backbone
from lcseg.models.layers import resize_bilinear


def _resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's ``F.interpolate(mode='nearest')``: source index ``floor(i * in / out)``."""
    rows = (jnp.arange(size[0]) * x.shape[1]) // size[0]
    columns = (jnp.arange(size[1]) * x.shape[2]) // size[1]
    return x[:, rows][:, :, columns]


class FPNSegmenter(nn.Module):
    """Backbone + FPN + light head (see the module docstring).

    Attributes:
      num_classes: logits per pixel.
      backbone: a ``lcseg.models.backbones`` name.
      fpn_channels: channels of every pyramid level.
      stages: indices of the backbone's feature maps feeding the pyramid (None: the last
        four).
      head_channels: channels of the head's 3x3 convolution (128 in the hackathon).
      backbone_options: the backbone's own attributes (e.g. a small Swin's ``embed_dim``,
        ``depths``, ``num_heads`` for tests), or None for the preset's.
      dtype: compute dtype (parameters stay float32).
    """

    num_classes: int
    backbone: str = "swin_v2_b"
    fpn_channels: int = 256
    stages: Sequence[int] | None = None
    head_channels: int = 128
    backbone_options: Mapping[str, Any] | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        options = dict(self.backbone_options or {})
        features = create_backbone(self.backbone, dtype=self.dtype, name="encoder",
                                   **options)(images, train=train)
        stages = tuple(self.stages) if self.stages is not None else tuple(
            range(len(features) - 4, len(features)))
        if not stages or any(not 0 <= s < len(features) for s in stages):
            raise ValueError(f"stages {stages} (config.model.stages) must index the "
                             f"{len(features)} feature maps of backbone {self.backbone!r}")
        levels = [features[s] for s in sorted(stages)]

        def conv(features: int, kernel: int, name: str) -> nn.Conv:
            return nn.Conv(features, (kernel, kernel), padding=kernel // 2, dtype=self.dtype,
                           param_dtype=jnp.float32, name=name)

        laterals = [conv(self.fpn_channels, 1, f"lateral_{i}")(x)
                    for i, x in enumerate(levels)]
        top_down = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            top_down.insert(0, lateral + _resize_nearest(top_down[0], lateral.shape[1:3]))
        outputs = [conv(self.fpn_channels, 3, f"output_{i}")(x) for i, x in enumerate(top_down)]
        # The pyramid levels, finest first, for tests and inspection (apply(...,
        # mutable=['intermediates'])); a no-op otherwise.
        self.sow("intermediates", "pyramid", tuple(outputs))
        finest = outputs[0].shape[1:3]
        fused = outputs[0]
        for x in outputs[1:]:
            fused = fused + resize_bilinear(x, finest).astype(fused.dtype)
        x = nn.relu(conv(self.head_channels, 3, "head_conv")(fused))
        logits = conv(self.num_classes, 1, "classifier")(x)
        return resize_bilinear(logits.astype(jnp.float32), images.shape[1:3])
