"""Model registry: ``create_model(**config.model, num_classes=..., dtype=...)``.

A config names its model (``config.model.name``); the remaining ``config.model`` fields
are the model's own attributes, so a typo in a config is an error, not a silent default.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcseg.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet,
}


def create_model(name: str, *, num_classes: int, dtype: jnp.dtype = jnp.float32,
                 **options: Any) -> nn.Module:
    """Builds the model registered as ``name`` with ``options`` as its attributes.

    Args:
      name: registry name (``config.model.name``).
      num_classes: logits per pixel (from the dataset metadata).
      dtype: compute dtype; parameters stay float32.
      **options: the model's attributes (the rest of ``config.model``).

    Returns:
      An unbound Flax module whose ``apply(variables, images, train=...)`` gives logits.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r} (config.model.name); valid: {sorted(MODELS)}")
    model_cls = MODELS[name]
    valid = {field for field in model_cls.__dataclass_fields__
             if field not in ("parent", "name", "num_classes", "dtype")}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r} in config.model; "
                         f"valid: {sorted(valid)}")
    # Configs hold lists (ml_collections turns tuples into lists on the command line).
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return model_cls(num_classes=num_classes, dtype=dtype, **options)
