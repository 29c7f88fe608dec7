"""Backbone registry: ``create_backbone(name, dtype=...)``, shared by every head.

A backbone is a Flax module whose ``apply(variables, images, train=False)`` maps NHWC
images ``[N, H, W, bands]`` to the list of its feature maps, NHWC, finest first:

* ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (``lcseg.models.resnet``): the
  stem (stride 2) and the four stages (strides 4 to 32): five maps.
* ``swin_v2_t``, ``swin_v2_s``, ``swin_v2_b`` (``lcseg.models.swin``): the four stages
  (strides 4 to 32).
* ``vgg16`` (``lcseg.models.vgg``): the last activation before each pool (strides 1 to
  16), or every convolution's with ``outputs='all'``.

Each backbone module also converts its own torchvision state dict
(``lcseg.models.pretrained.TORCH_LAYOUTS``). Heads name their backbone submodule
``encoder``: that is where ``load_pretrained`` puts pretrained weights and what
``config.frozen=('encoder',)`` freezes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcseg.models import resnet, swin, vgg


def _resnet(depth: str, *, name: str | None = None, **options: Any) -> nn.Module:
    return resnet.resnet(depth, module_name=name, **options)


def _swin_v2(preset: str, **options: Any) -> nn.Module:
    return swin.SwinV2(**{**swin.SWIN_V2[preset], **options})


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    **{depth: functools.partial(_resnet, depth) for depth in resnet.RESNETS},
    **{preset: functools.partial(_swin_v2, preset) for preset in swin.SWIN_V2},
    "vgg16": vgg.VGG16,
}


def create_backbone(name: str, /, *, dtype: jnp.dtype = jnp.float32, **options: Any
                    ) -> nn.Module:
    """The backbone registered as ``name``.

    Args:
      name: a key of ``BACKBONES``.
      dtype: compute dtype (parameters stay float32).
      **options: the backbone module's own attributes (e.g. ``output_stride`` of a ResNet,
        ``embed_dim``/``depths``/``num_heads`` of a small Swin, ``outputs`` of VGG16) and
        ``name``, the submodule name inside a parent module.

    Returns:
      The unbound backbone module.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; valid: {sorted(BACKBONES)}")
    try:
        return BACKBONES[name](dtype=dtype, **options)
    except TypeError as error:  # An option the backbone does not have.
        raise ValueError(f"Backbone {name!r} does not take options {sorted(options)}: "
                         f"{error}") from None
