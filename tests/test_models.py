"""The model zoo: registry, published parameter counts, shapes, precision, pretrained
encoders (without PyTorch; tests/test_models_torch_parity.py compares against PyTorch
transcriptions), and a few training steps of every model family through main.py."""

import concurrent.futures
import functools
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs.test_models import TINY_MODELS
from lcseg.models import (
    MODELS,
    count_parameters,
    create_model,
    import_weights,
    load_pretrained,
    model_options,
    pretrained_normalisation,
    summary,
)
from lcseg.models.layers import resize_bilinear
from lcseg.models.resnet import resnet
from lcseg.models.torch_checkpoint import read_state_dict
from tests.conftest import run_python


def param_count(model, size=32):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                  jnp.zeros((1, size, size, 3)), train=False))
    return count_parameters(variables["params"])


def random_variables(model, images, seed=0):
    """Variables of ``model`` drawn with numpy: no compiled ``init`` (slow on CPU)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":  # He-scaled, so activations stay O(1) through deep nets.
            scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return rng.normal(0, scale, leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_model(key, **overrides):
    options = {**TINY_MODELS[key], **overrides}
    return create_model(options.pop("name"), num_classes=5, **options)


# ---------------------------------------------------------------------------------------
# Registry and parameter counts.
# ---------------------------------------------------------------------------------------


def test_unet_matches_reference_parameter_count():
    # The milesial U-Net of ../shared/bench (bias-free 3x3 convs, 7 classes).
    model = create_model("unet", num_classes=7, channels=(64, 128, 256, 512, 1024))
    assert param_count(model) == 31_038_023


@pytest.mark.parametrize("name, num_classes, expected", [
    ("unet_base", 8, 31_043_976), ("unet_short", 5, 8_254_981),
    ("unet_skinny", 5, 20_095_781), ("unet_less_conv", 5, 20_281_253)])
def test_presets_have_the_published_parameter_counts(name, num_classes, expected):
    # Cai & Zhang, "Finding a Faster UNet for Satellite Image Segmentation".
    assert param_count(create_model(name, num_classes=num_classes)) == expected


def test_smp_deeplabv3plus_has_the_published_parameter_count():
    model = create_model("deeplabv3plus", num_classes=5, encoder="resnet34", layout="smp")
    assert param_count(model) == 22_438_485


@pytest.mark.parametrize("name, expected", [
    ("resnet18", 11_176_512), ("resnet34", 21_284_672), ("resnet50", 23_508_032),
    ("resnet101", 42_500_160)])
def test_resnet_encoders_have_torchvisions_parameter_counts(name, expected):
    # torchvision's counts (11,689,512 / 21,797,672 / 25,557,032 / 44,549,160) minus fc.
    assert param_count(resnet(name, module_name=None)) == expected


def test_width_multiplier_scales_the_channels_of_a_preset():
    half = create_model("unet_base", num_classes=8, width_multiplier=0.5)
    explicit = create_model("unet", num_classes=8, channels=(32, 64, 128, 256, 512),
                            conv_bias=True)
    assert param_count(half) == param_count(explicit)


def test_registry_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="Unknown model 'unett'.*unet"):
        create_model("unett", num_classes=2)
    with pytest.raises(ValueError, match="chanels.*channels"):
        create_model("unet", num_classes=2, chanels=(4, 8))
    with pytest.raises(ValueError, match="preset that fixes \\['channels'\\].*'unet'"):
        create_model("unet_base", num_classes=2, channels=(4, 8))
    with pytest.raises(ValueError, match="encodr.*encoder"):
        create_model("deeplabv3plus", num_classes=2, encodr="resnet18")


def test_registry_lists_every_model_and_ignores_model_level_options():
    assert {"unet", "unet_base", "unet_short", "unet_skinny", "unet_less_conv", "unetpp",
            "deeplabv3plus", "swin_fpn", "hypercolumn"} == set(MODELS)
    assert model_options("unet_skinny") == {"width_multiplier": 1.0}
    assert model_options("deeplabv3plus")["output_stride"] == 16
    model = create_model("deeplabv3plus", num_classes=3, pretrained="/some/weights.npz")
    assert model.encoder == "resnet50"


def test_summary_counts_each_top_level_module_and_the_total():
    model = create_model("deeplabv3plus", num_classes=5, encoder="resnet34", layout="smp")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    table = summary(variables)
    assert "encoder       21,284,672" in table and "aspp" in table
    assert table.splitlines()[-1].split() == ["total", "22,438,485"]


# ---------------------------------------------------------------------------------------
# Forward passes.
# ---------------------------------------------------------------------------------------


@functools.cache
def tiny_outputs(key):
    """(variables, images, float32 logits) of a tiny model on an odd-sized batch."""
    model = tiny_model(key)
    images = jax.random.uniform(jax.random.key(1), (2, 37, 50, 3))
    variables = random_variables(model, images)
    return variables, images, jax.jit(model.apply)(variables, images)


@pytest.mark.parametrize("key", sorted(TINY_MODELS))
def test_every_model_gives_logits_of_any_input_size(key):
    _, _, logits = tiny_outputs(key)
    assert logits.shape == (2, 37, 50, 5) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_odd_input_sizes_give_logits_of_the_input_size(upsampling):
    model = create_model("unet", num_classes=5, channels=(4, 8, 16), upsampling=upsampling)
    images = jnp.ones((2, 37, 50, 3))
    logits = model.apply(random_variables(model, images), images, train=False)
    assert logits.shape == (2, 37, 50, 5) and logits.dtype == jnp.float32


@pytest.mark.parametrize("key", ["deeplabv3plus", "unetpp"])
def test_bfloat16_forward_is_finite_and_close_to_float32(key):
    variables, images, f32 = tiny_outputs(key)
    bf16 = jax.jit(tiny_model(key, dtype=jnp.bfloat16).apply)(variables, images)
    assert bf16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(bf16)))
    # bfloat16 keeps 8 significant bits (relative rounding ~0.4% per operation); through
    # a few dozen layers the error should stay a few percent of the logits' magnitude.
    def rms(x):
        return float(jnp.sqrt(jnp.mean(jnp.square(x))))

    assert rms(bf16 - f32) < 0.03 * rms(f32)


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
    model = create_model("unet", num_classes=3, channels=(4, 8), dtype=jnp.bfloat16)
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    variables = random_variables(model, images)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(updates))
    f32 = create_model("unet", num_classes=3, channels=(4, 8)).apply(variables, images)
    np.testing.assert_allclose(model.apply(variables, images), f32, atol=0.1, rtol=0.05)


def test_deep_supervision_averages_the_heads_it_records():
    variables, images, logits = tiny_outputs("unetpp")
    model = tiny_model("unetpp")
    _, state = model.apply(variables, images, mutable=["intermediates"])
    heads = [state["intermediates"][f"logits_{i}"][0] for i in range(4)]
    assert all(h.shape == logits.shape for h in heads)
    np.testing.assert_allclose(np.mean(heads, axis=0), logits, rtol=1e-5, atol=1e-5)


def test_resize_bilinear_with_half_pixel_centres_matches_jax_image_resize():
    x = jax.random.normal(jax.random.key(0), (1, 5, 7, 2))
    np.testing.assert_allclose(resize_bilinear(x, (20, 21)),
                               jax.image.resize(x, (1, 20, 21, 2), "bilinear"), atol=1e-6)


# ---------------------------------------------------------------------------------------
# Pretrained encoders (files written here; .pth files in the PyTorch parity tests).
# ---------------------------------------------------------------------------------------

_TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias",
                 "mean": "running_mean", "var": "running_var"}


def torchvision_state_dict(variables):
    """The torchvision state dict of a Flax ResNet's variables (the import's inverse)."""
    state = {}
    for collection in ("params", "batch_stats"):
        for path, value in traverse_util.flatten_dict(variables[collection]).items():
            module = ".".join(part.replace("_", ".") for part in path[:-1])
            value = np.asarray(value)
            state[f"{module}.{_TORCH_LEAVES[path[-1]]}"] = (
                value.transpose(3, 2, 0, 1) if path[-1] == "kernel" else value)
    state["fc.weight"] = np.zeros((10, 8), np.float32)  # The classifier the import drops.
    return state


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        data = np.ascontiguousarray(value, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


@functools.cache
def encoder_weights(name, width):
    """A tiny ResNet's random variables, as the torchvision state dict they came from."""
    encoder = resnet(name, base_width=width, module_name=None)
    variables = random_variables(encoder, jnp.zeros((1, 32, 32, 3)), seed=3)
    return variables, torchvision_state_dict(variables)


def tiny_deeplab_variables(encoder="resnet18", width=4, bands=3):
    model = tiny_model("deeplabv3plus", encoder=encoder, encoder_width=width)
    return random_variables(model, jnp.zeros((1, 32, 32, bands)))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_imported_weights_load_into_the_encoder_with_their_normalisation(tmp_path, suffix):
    source, state = encoder_weights("resnet18", 4)
    checkpoint = str(tmp_path / f"resnet18{suffix}")
    if suffix == ".npz":
        np.savez(checkpoint, **state)
    else:
        write_safetensors(checkpoint, state)
    converted = str(tmp_path / "converted.npz")
    import_weights.convert(checkpoint, converted, mean=(0.4, 0.5, 0.6), std=(0.1, 0.2, 0.3))
    assert pretrained_normalisation(converted) == {"mean": (0.4, 0.5, 0.6),
                                                   "std": (0.1, 0.2, 0.3)}

    variables, normalisation = load_pretrained(tiny_deeplab_variables(), converted)
    assert normalisation == {"mean": (0.4, 0.5, 0.6), "std": (0.1, 0.2, 0.3)}
    for collection in ("params", "batch_stats"):
        loaded = jax.tree.leaves(variables[collection]["encoder"])
        assert len(loaded) == len(jax.tree.leaves(source[collection]))
        for a, b in zip(loaded, jax.tree.leaves(source[collection])):
            np.testing.assert_array_equal(a, b)
    assert "aspp" in variables["params"] and "head" in variables["params"]


def test_mismatched_weights_list_every_missing_key_and_shape(tmp_path):
    _, state = encoder_weights("resnet18", 4)
    checkpoint = str(tmp_path / "resnet18.npz")
    np.savez(checkpoint, **state)
    with pytest.raises(ValueError, match=r"(?s)resnet18.*params missing from the file \(48\): "
                                         r"layer1_2/.*layer3_5"):
        load_pretrained(tiny_deeplab_variables(encoder="resnet34"), checkpoint)
    with pytest.raises(ValueError, match=r"shape mismatch.*conv1/kernel: file \(7, 7, 3, 4\), "
                                         r"model \(7, 7, 3, 8\)"):
        load_pretrained(tiny_deeplab_variables(width=8), checkpoint)
    unet = tiny_model("unet")
    with pytest.raises(ValueError, match="no encoder.*unetpp"):
        load_pretrained(random_variables(unet, jnp.zeros((1, 8, 8, 3))), checkpoint)


@pytest.mark.parametrize("bands", [1, 4])
def test_other_band_counts_adapt_the_first_convolution(tmp_path, bands):
    _, state = encoder_weights("resnet18", 4)
    checkpoint = str(tmp_path / "resnet18.npz")
    np.savez(checkpoint, **state)
    variables, normalisation = load_pretrained(tiny_deeplab_variables(bands=bands), checkpoint)
    kernel = variables["params"]["encoder"]["conv1"]["kernel"]
    rgb = state["conv1.weight"].transpose(2, 3, 1, 0)
    expected = (rgb.sum(axis=2, keepdims=True) if bands == 1
                else np.concatenate([rgb, rgb[:, :, :1]], axis=2) * 3 / 4)
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)
    assert normalisation["mean"] == (0.485, 0.456, 0.406, 0.485)[:bands]


def test_checkpoints_that_would_run_code_are_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    checkpoint = str(tmp_path / "evil.pth")
    with zipfile.ZipFile(checkpoint, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"conv1.weight": Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*system"):
        read_state_dict(checkpoint)
    assert not os.path.exists(tmp_path / "pwned")


# ---------------------------------------------------------------------------------------
# Training through main.py.
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_model_trains_through_main(synthetic_data_dir, tmp_path):
    # The tiny models of configs/test_models.py that train nowhere else (a preset, the smp
    # DeepLabv3+ layout, UNet++), as a user runs them. The runs start together: much of
    # each is Python start-up, which overlaps well.
    from configs.test_models import TINY_MODELS

    # swin_fpn and hypercolumn train (and resume, evaluate, predict) in tests/test_fpn.py
    # and tests/test_hypercolumn_training.py, and deeplabv3plus (this layout, from
    # imported weights) in tests/test_training_features.py; each concurrent compile here
    # adds ~20 s on 2 cores.
    elsewhere = ("unet", "swin_fpn", "hypercolumn", "deeplabv3plus")
    keys = [key for key in TINY_MODELS if key not in elsewhere]

    def train(key):
        workdir = tmp_path / key
        run_python(["main.py", "--config", f"configs/test_models.py:{key}",
                    "--workdir", str(workdir), f"--config.dataset.data_dir={synthetic_data_dir}",
                    "--config.num_train_steps=2", "--config.eval_every_steps=2",
                    "--config.checkpoint_every_steps=2"],
                   timeout=600)
        with open(workdir / "eval" / "validation-2.json") as f:
            return json.load(f)

    with concurrent.futures.ThreadPoolExecutor(len(keys)) as pool:
        for key, scores in zip(keys, pool.map(train, keys)):
            assert len(scores["confusion_matrix"]) == 6, key
