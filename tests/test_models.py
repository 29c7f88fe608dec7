"""The U-Net and the model registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcseg.models import create_model


def param_count(model, size=32):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((1, size, size, 3)), train=False))
    return sum(x.size for x in jax.tree.leaves(variables["params"]))


def test_unet_matches_reference_parameter_count():
    # The milesial U-Net of ../shared/bench (bias-free 3x3 convs, 7 classes).
    model = create_model("unet", num_classes=7, channels=(64, 128, 256, 512, 1024))
    assert param_count(model) == 31_038_023


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_odd_input_sizes_give_logits_of_the_input_size(upsampling):
    model = create_model("unet", num_classes=5, channels=(4, 8, 16), upsampling=upsampling)
    images = jnp.ones((2, 37, 50, 3))
    variables = model.init(jax.random.key(0), images)
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 37, 50, 5) and logits.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
    model = create_model("unet", num_classes=3, channels=(4, 8), dtype=jnp.bfloat16)
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    variables = model.init(jax.random.key(0), images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
    f32 = create_model("unet", num_classes=3, channels=(4, 8)).apply(variables, images)
    np.testing.assert_allclose(model.apply(variables, images), f32, atol=0.1, rtol=0.05)


def test_registry_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="Unknown model 'unett'.*unet"):
        create_model("unett", num_classes=2)
    with pytest.raises(ValueError, match="chanels.*channels"):
        create_model("unet", num_classes=2, chanels=(4, 8))
