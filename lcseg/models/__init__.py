"""Model registry: ``create_model(**config.model, num_classes=..., dtype=...)``.

A config names its model (``config.model.name``); the remaining ``config.model`` fields
are the model's own attributes, so a typo in a config is an error, not a silent default.

Registered models (``MODELS``; options with their defaults from ``model_options(name)``):

* ``unet``: the generic U-Net (``lcseg.models.unet.UNet``): ``channels``,
  ``convs_per_level``, ``upsampling`` ('transpose' | 'bilinear'), ``conv_bias``,
  ``width_multiplier``.
* ``unet_base``, ``unet_short``, ``unet_skinny``, ``unet_less_conv``: Cai & Zhang's
  configurations (``lcseg.models.unet.UNET_PRESETS``). The preset fixes ``channels``,
  ``convs_per_level``, ``conv_bias`` and ``upsampling`` (setting one is an error: use
  ``unet`` for a variant); ``width_multiplier`` remains (0.5 for half-channel prototypes).
* ``unetpp``: UNet++ on a ResNet (``lcseg.models.unetpp``): ``encoder``,
  ``decoder_channels``, ``deep_supervision``, ``encoder_width``.
* ``deeplabv3plus``: DeepLabv3+ on a ResNet (``lcseg.models.deeplab``): ``encoder``,
  ``output_stride``, ``layout`` ('standard' | 'smp'), ``atrous_rates``,
  ``aspp_channels``, ``decoder_channels``, ``low_level_channels``, ``aspp_dropout``,
  ``encoder_width``.
* ``swin_fpn``: an FPN and a light head on any backbone (``lcseg.models.fpn``; SwinV2-B
  by default, the LandCover.ai hackathon system): ``backbone``, ``fpn_channels``,
  ``stages``, ``head_channels``, ``backbone_options``.
* ``hypercolumn``: the zoom-out classifier of Mostajabi et al. on VGG16
  (``lcseg.models.hypercolumn``): ``layers`` ('all' | 'pool'), ``hidden``, ``dropout``;
  it also classifies sampled pixels (``config.sampled_pixels``, its stage one).

Backbones (``create_backbone``, ``BACKBONES``: ResNets, SwinV2, VGG16) are a registry of
their own, in ``lcseg.models.backbones``.

Model-level options (``MODEL_LEVEL_OPTIONS``) belong to the experiment, not the module:
``create_model`` accepts and ignores them. ``pretrained`` (a file written by
``python -m lcseg.models.import_weights``, or None) is loaded into initialised variables
with ``load_pretrained``; ``init_from`` (a training workdir of the same model, or None)
starts training from that run's best checkpoint (``lcseg.train``; the hypercolumn
system's stage two starts from stage one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcseg.models.backbones import BACKBONES, create_backbone
from lcseg.models.deeplab import DeepLabV3Plus
from lcseg.models.fpn import FPNSegmenter
from lcseg.models.hypercolumn import Hypercolumn
from lcseg.models.pretrained import load_pretrained, pretrained_normalisation
from lcseg.models.summary import count_parameters, summary
from lcseg.models.unet import UNET_PRESETS, UNet
from lcseg.models.unetpp import UNetPlusPlus

__all__ = ["BACKBONES", "MODELS", "MODEL_LEVEL_OPTIONS", "ModelSpec", "count_parameters",
           "create_backbone", "create_model", "load_pretrained", "model_options",
           "pretrained_normalisation", "summary"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its module and the attributes the name fixes (presets)."""

    module: type[nn.Module]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    "unet": ModelSpec(UNet),
    **{name: ModelSpec(UNet, preset) for name, preset in UNET_PRESETS.items()},
    "unetpp": ModelSpec(UNetPlusPlus),
    "deeplabv3plus": ModelSpec(DeepLabV3Plus),
    "swin_fpn": ModelSpec(FPNSegmenter),
    "hypercolumn": ModelSpec(Hypercolumn),
}

# config.model keys that are not module attributes; create_model drops them.
MODEL_LEVEL_OPTIONS = ("pretrained", "init_from")
# Attributes create_model sets itself (or Flax owns).
_RESERVED = ("parent", "name", "num_classes", "dtype")


def _from_config(value: Any) -> Any:
    """A config value as a module attribute: lists -> tuples, ConfigDicts -> dicts."""
    if isinstance(value, list):
        return tuple(_from_config(v) for v in value)
    if hasattr(value, "to_dict"):
        return {k: _from_config(v) for k, v in value.to_dict().items()}
    if isinstance(value, dict):
        return {k: _from_config(v) for k, v in value.items()}
    return value


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r} (config.model.name); valid: {sorted(MODELS)}")
    return MODELS[name]


def model_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts in ``config.model``, with their defaults.

    Args:
      name: a registered model name.

    Returns:
      ``{option: default}``, model-level options (``pretrained``) excluded.
    """
    spec = _spec(name)
    return {field.name: field.default for field in dataclasses.fields(spec.module)
            if field.name not in _RESERVED and field.name not in spec.fixed}


def create_model(name: str, *, num_classes: int, dtype: jnp.dtype = jnp.float32,
                 **options: Any) -> nn.Module:
    """Builds the model registered as ``name`` with ``options`` as its attributes.

    Args:
      name: registry name (``config.model.name``).
      num_classes: logits per pixel (from the dataset metadata).
      dtype: compute dtype; parameters and BatchNorm statistics stay float32.
      **options: the model's attributes (the rest of ``config.model``); the model-level
        options (``MODEL_LEVEL_OPTIONS``, e.g. ``pretrained``) are accepted and ignored.

    Returns:
      An unbound Flax module whose ``apply(variables, images, train=...)`` maps NHWC float
      images to float32 logits ``[N, H, W, num_classes]``.
    """
    spec = _spec(name)
    options = {k: v for k, v in options.items() if k not in MODEL_LEVEL_OPTIONS}
    fixed = sorted(set(options) & set(spec.fixed))
    if fixed:
        raise ValueError(f"Model {name!r} is a preset that fixes {fixed} (config.model); "
                         f"remove them, or use model {spec.module.__name__.lower()!r} for "
                         f"a variant. {name!r} accepts: {sorted(model_options(name))}")
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r} in config.model; "
                         f"valid: {sorted(valid)}")
    # Configs hold lists (ml_collections turns tuples into lists on the command line) and
    # ConfigDicts (e.g. swin_fpn's backbone_options); modules take tuples and dicts.
    options = {k: _from_config(v) for k, v in options.items()}
    return spec.module(num_classes=num_classes, dtype=dtype, **spec.fixed, **options)
