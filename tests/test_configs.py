"""Every experiment config loads, names a known dataset, and builds its model.

(configs/synthetic.py's recipes each: they are the README's recipe for each model family;
that each one trains was checked by running it, see the issue 24 note.)
"""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from lcseg.data import get_metadata
from lcseg.models import create_model

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.py")
                 if p.stem not in ("__init__", "test_models"))


@pytest.mark.parametrize("name", CONFIGS + [f"synthetic:{recipe}" for recipe in
                                             importlib.import_module("configs.synthetic").RECIPES])
def test_config_builds_its_model(name):
    module, _, argument = name.partition(":")
    get_config = importlib.import_module(f"configs.{module}").get_config
    config = get_config(argument) if argument else get_config()
    metadata = get_metadata(config.dataset.name)
    options = {k: v for k, v in config.model.items()}
    model = create_model(**options, num_classes=metadata.num_classes)
    assert config.batch_size % config.grad_accum_steps == 0
    # Built and run abstractly (shapes only, no FLOPs): the options are ones the model
    # accepts, and it gives a logit per class at every pixel of the input.
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    logits, _ = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, train=False), images)
    assert logits.shape == (1, 64, 64, metadata.num_classes)
