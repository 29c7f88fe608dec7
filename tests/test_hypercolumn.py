"""VGG16 and the hypercolumn (zoom-out) model: torchvision parity, the efficient head
against the concatenate-then-MLP reference, sampled pixels, dropout, bfloat16.

torchvision does not install beside the CPU torch wheel, so its ``vgg.py`` is vendored
under ``tests/torch_reference`` (torchvision 0.28.0; the header lists what was removed).
Inputs are small and not multiples of 16, so the encoder's floor-mode pooling and the
model's pad-and-crop are exercised too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcseg.models.hypercolumn import Hypercolumn, HypercolumnHead, naive_hypercolumn_logits
from lcseg.models.pretrained import read_state_dict
from lcseg.models.vgg import VGG16, vgg16_channels, vgg16_convs, vgg16_from_torch

NUM_CLASSES = 5
HIDDEN = 16  # The head's width does not change what is compared; small keeps CPU time low.


def assert_close(actual, expected, relative=1e-4):
    """Max abs difference within ``relative`` of the largest magnitude; returns it."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference = float(np.max(np.abs(actual - expected)))
    assert difference <= relative * max(float(np.max(np.abs(expected))), 1e-6), difference
    return difference


def random_variables(model, *inputs, seed=0, **kwargs):
    """Variables drawn with numpy (no compiled ``init``); He-scaled kernels, random biases."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key == "kernel":
            scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return rng.normal(0, scale, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_images(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def padded(size):
    return tuple(-(-s // 16) * 16 for s in size)


# ---------------------------------------------------------------------------------------
# VGG16.
# ---------------------------------------------------------------------------------------


def test_vgg16_features_equal_torchvisions_vgg16(tmp_path):
    """All 13 activations, and the 5 pool-level ones, of torchvision's own vgg16() with
    random weights, imported through a saved .pth as a user would."""
    torch = pytest.importorskip("torch")  # A test-only dependency (requirements-dev.txt).
    from tests.torch_reference import torchvision_vgg

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torchvision_vgg.vgg16().eval()
    with torch.no_grad():  # torchvision zeroes the biases; random ones test their import.
        for module in model.features:
            if isinstance(module, torch.nn.Conv2d):
                module.bias.normal_(0, 0.1)
    # The features and the last classifier layer (the full classifier is 500 MB);
    # classifier.* must be dropped by the converter.
    state = {k: v for k, v in model.state_dict().items()
             if k.startswith(("features.", "classifier.6."))}
    torch.save(state, tmp_path / "vgg16.pth")

    relus = [m for m in model.features if isinstance(m, torch.nn.ReLU)]
    activations = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: activations.append(out.clone()))
             for m in relus]
    images = np.random.default_rng(0).normal(size=(2, 3, 40, 44)).astype(np.float32)
    try:
        with torch.no_grad():
            model(torch.from_numpy(images))  # torchvision's own forward, classifier included.
    finally:
        for hook in hooks:
            hook.remove()
    expected = [a.numpy().transpose(0, 2, 3, 1) for a in activations]

    params = vgg16_from_torch(read_state_dict(str(tmp_path / "vgg16.pth")))
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    everything, before_pools = jax.jit(lambda p, x: (
        VGG16(outputs="all").apply({"params": p}, x), VGG16().apply({"params": p}, x)))(
            params, nhwc)
    assert len(everything) == len(expected) == 13
    for actual, reference in zip(everything, expected):
        assert_close(actual, reference)
    # The last activation before each of torchvision's pools: features.3, 8, 15, 22, 29.
    pool_levels = [1, 3, 6, 9, 12]
    assert [f.shape[1:] for f in before_pools] == [
        (40, 44, 64), (20, 22, 128), (10, 11, 256), (5, 5, 512), (2, 2, 512)]
    for actual, level in zip(before_pools, pool_levels):
        assert_close(actual, expected[level])


def test_vgg16_has_torchvisions_parameters():
    shapes = jax.eval_shape(
        lambda: VGG16().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == 14_714_688
    assert sorted(shapes) == sorted(f"features_{i}" for i, _ in vgg16_convs())
    assert [i for i, _ in vgg16_convs()] == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert shapes["features_28"]["kernel"].shape == (3, 3, 512, 512)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    assert vgg16_channels("all") == [64, 64, 128, 128, 256, 256, 256] + [512] * 6
    assert vgg16_channels("pool") == [64, 128, 256, 512, 512]


def test_vgg16_from_torch_converts_and_rejects_other_state_dicts():
    def state_dict(in_bands=3):
        """Zero-copy arrays of vgg16's shapes (torch OIHW), plus a classifier entry."""
        state, previous = {}, in_bands
        for index, width in vgg16_convs():
            state[f"features.{index}.weight"] = np.broadcast_to(
                np.float32(index), (width, previous, 3, 3))
            state[f"features.{index}.bias"] = np.broadcast_to(np.float32(-index), (width,))
            previous = width
        state["classifier.0.weight"] = np.zeros((4, 25088), np.float32)
        return state

    params = vgg16_from_torch(state_dict())
    assert "classifier" not in params and "classifier_0" not in params
    assert params["features_5"]["kernel"].shape == (3, 3, 64, 128)  # OIHW -> HWIO.
    assert float(params["features_5"]["kernel"][0, 0, 0, 0]) == 5.0
    assert float(params["features_5"]["bias"][0]) == -5.0
    assert vgg16_from_torch(state_dict(in_bands=4))["features_0"]["kernel"].shape == (
        3, 3, 4, 64)

    broken = state_dict()
    del broken["features.7.bias"]
    broken["features.1.running_mean"] = np.zeros(64, np.float32)  # vgg16_bn's layout.
    broken["features.2.weight"] = np.zeros((64, 32, 3, 3), np.float32)
    with pytest.raises(ValueError) as error:
        vgg16_from_torch(broken)
    message = str(error.value)
    assert "features.7.bias" in message and "features.1.running_mean" in message
    assert "features.2.weight" in message


# ---------------------------------------------------------------------------------------
# The hypercolumn model.
# ---------------------------------------------------------------------------------------


def random_features(layers, batch=2, size=(16, 32), seed=4):
    """Random maps with VGG16's channels at its strides for an image of ``size``."""
    rng = np.random.default_rng(seed)
    strides = [1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16] if layers == "all" else [1, 2, 4, 8, 16]
    return [jnp.asarray(rng.normal(size=(batch, size[0] // s, size[1] // s, c)), jnp.float32)
            for s, c in zip(strides, vgg16_channels(layers))]


@pytest.mark.parametrize("layers", ["all", "pool"])
def test_efficient_head_equals_concatenate_then_mlp(layers):
    """Values and gradients (w.r.t. every head parameter and the head's input maps) of
    the level-wise head equal those of up-sampling all maps, concatenating, then the MLP.

    The head is tested on random maps of VGG16's shapes: the encoder in front of it is
    the same code in both paths (end to end, the model's dense logits are compared with
    the reference in ``test_model_dense_logits_equal_reference``), and compiling VGG16's
    backward pass twice would cost most of this file's time budget on CPU.
    """
    size = (16, 32)
    features = random_features(layers, size=size)
    head = HypercolumnHead(NUM_CLASSES, hidden=HIDDEN)
    params = random_variables(head, features, size=size)["params"]
    weights = random_images((2, *size, NUM_CLASSES), seed=2)

    def efficient(params, features):
        return head.apply({"params": params}, features, size)

    def naive(params, features):
        return naive_hypercolumn_logits(params, features, size)

    @jax.jit
    def run(params, features):
        outputs = []
        for logits_fn in (efficient, naive):
            loss = lambda p, f, fn=logits_fn: jnp.sum(fn(p, f) * weights)  # noqa: E731
            outputs.append((logits_fn(params, features),
                            jax.grad(loss, argnums=(0, 1))(params, features)))
        return outputs

    (logits, grads), (naive_logits, naive_grads) = run(params, features)
    assert logits.shape == (2, *size, NUM_CLASSES) and logits.dtype == jnp.float32
    assert_close(logits, naive_logits)
    flat, naive_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(naive_grads)
    assert [path for path, _ in flat] == [path for path, _ in naive_flat]
    for (path, grad), (_, expected) in zip(flat, naive_flat):
        assert float(jnp.max(jnp.abs(expected))) > 0, path  # Not trivially equal.
        assert_close(grad, expected, relative=1e-4)


@pytest.fixture(scope="module")
def model_outputs():
    """One compiled run of a float32 ``layers='all'`` model (an input that is not a
    multiple of 16): eval and train logits, sampled ones, the reference, bfloat16 ones."""
    images = random_images((2, 20, 36, 3))
    model = Hypercolumn(NUM_CLASSES, layers="all", hidden=HIDDEN, dropout=0.5)
    model16 = Hypercolumn(NUM_CLASSES, layers="all", hidden=HIDDEN, dtype=jnp.bfloat16)
    variables = random_variables(model, images)
    rng = np.random.default_rng(3)
    pixels = np.stack([rng.integers(0, 20, (2, 9)), rng.integers(0, 36, (2, 9))], axis=-1)
    pixels[:, :3] = [[0, 0], [19, 35], [19, 0]]  # Corners: the clamped interpolation ends.
    pixels = jnp.asarray(pixels, jnp.int32)

    @jax.jit
    def run(variables, images, pixels):
        def dropout(seed):
            return {"dropout": jax.random.key(seed)}

        features = model.apply(variables, images, method="encode")
        reference = naive_hypercolumn_logits(variables["params"]["head"], features,
                                             padded(images.shape[1:3]))
        return dict(
            dense=model.apply(variables, images),
            sampled=model.apply(variables, images, pixels=pixels),
            reference=reference[:, :images.shape[1], :images.shape[2]],
            train=model.apply(variables, images, train=True, rngs=dropout(0)),
            sampled_train=model.apply(variables, images, pixels=pixels, train=True,
                                      rngs=dropout(0)),
            eval_with_rng=model.apply(variables, images, rngs=dropout(0)),
            dense16=model16.apply(variables, images),
            sampled16=model16.apply(variables, images, pixels=pixels))

    return dict(run(variables, images, pixels), pixels=pixels, images=images,
                shapes16=jax.eval_shape(lambda: model16.init(jax.random.key(0), images)),
                features16=jax.eval_shape(
                    lambda: model16.apply(variables, images, method="encode")))


def at_pixels(dense, pixels):
    return jax.vmap(lambda image, p: image[p[:, 0], p[:, 1]])(dense, pixels)


def test_model_dense_logits_equal_reference(model_outputs):
    """End to end (pad, encoder, head, crop) against the concatenate-then-MLP head."""
    # The encoder sees the input reflect-padded to multiples of 16 (20x36 -> 32x48).
    assert [f.shape[1:3] for f in model_outputs["features16"]][::3] == [
        (32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    assert model_outputs["dense"].shape == (2, 20, 36, NUM_CLASSES)
    assert model_outputs["dense"].dtype == jnp.float32
    assert_close(model_outputs["dense"], model_outputs["reference"])


def test_sampled_pixels_equal_dense_logits(model_outputs):
    sampled = model_outputs["sampled"]
    assert sampled.shape == (2, 9, NUM_CLASSES) and sampled.dtype == jnp.float32
    assert_close(sampled, at_pixels(model_outputs["dense"], model_outputs["pixels"]),
                 relative=1e-5)


@pytest.mark.parametrize("layers", ["all", "pool"])
def test_head_sampled_pixels_equal_dense_logits(layers):
    """The head alone, both layer options, every pixel of a small grid sampled."""
    size = (16, 16)
    features = random_features(layers, size=size)
    head = HypercolumnHead(NUM_CLASSES, hidden=HIDDEN)
    variables = random_variables(head, features, size=size)
    rows, cols = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    pixels = jnp.asarray(np.stack([rows.ravel(), cols.ravel()], -1)[None].repeat(2, 0))
    dense, sampled = jax.jit(lambda v, f, p: (head.apply(v, f, size),
                                              head.apply(v, f, size, pixels=p))
                             )(variables, features, pixels)
    assert_close(sampled, at_pixels(dense, pixels), relative=1e-5)


def test_dropout_only_in_training(model_outputs):
    # Evaluation ignores a dropout rng; training uses it, on both paths.
    np.testing.assert_array_equal(model_outputs["eval_with_rng"], model_outputs["dense"])
    assert not np.allclose(model_outputs["train"], model_outputs["dense"])
    assert not np.allclose(model_outputs["sampled_train"], model_outputs["sampled"])


def test_head_dropout_masks_follow_the_rng():
    size = (16, 16)
    features = random_features("pool", size=size)
    head = HypercolumnHead(NUM_CLASSES, hidden=HIDDEN, dropout=0.5)
    variables = random_variables(head, features, size=size)
    run = jax.jit(lambda seed: head.apply(variables, features, size, train=True,
                                          rngs={"dropout": jax.random.key(seed)}))
    assert not np.allclose(run(0), run(1))
    np.testing.assert_array_equal(run(0), run(0))


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits(model_outputs):
    assert all(leaf.dtype == jnp.float32
               for leaf in jax.tree.leaves(model_outputs["shapes16"]))
    assert all(f.dtype == jnp.bfloat16 for f in model_outputs["features16"])
    dense16, sampled16 = model_outputs["dense16"], model_outputs["sampled16"]
    assert dense16.dtype == sampled16.dtype == jnp.float32
    assert np.all(np.isfinite(dense16))
    # bfloat16 rounding, not a different network.
    assert_close(dense16, model_outputs["dense"], relative=0.05)
    assert_close(sampled16, at_pixels(dense16, model_outputs["pixels"]), relative=0.05)


def test_head_validates_its_options():
    with pytest.raises(ValueError, match="layers"):
        Hypercolumn(NUM_CLASSES, layers="conv5").init(jax.random.key(0),
                                                        jnp.zeros((1, 16, 16, 3)))
    head = HypercolumnHead(NUM_CLASSES, hidden=HIDDEN)
    features = [jnp.ones((1, 4, 4, 3)), jnp.ones((1, 2, 2, 5))]
    shapes = jax.eval_shape(lambda: head.init(jax.random.key(0), features, (8, 8)))["params"]
    assert shapes["hidden"]["kernel"].shape == (8, HIDDEN)  # One kernel over all levels.
    assert shapes["classifier"]["kernel"].shape == (HIDDEN, NUM_CLASSES)
