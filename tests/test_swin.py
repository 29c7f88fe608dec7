"""Swin V2 backbone: numerical parity with torchvision's own swin_v2_t/b (torch 2.13.0 CPU).

torchvision does not install beside the CPU torch wheel, so its Swin code is vendored
verbatim in ``tests/torch_reference/torchvision_swin.py`` (0.28.0; the header lists what
was left out). Every parameter of the torch model is perturbed (LayerNorms, the qkv bias
including the key third torchvision ignores, ``logit_scale`` partly beyond the log(100)
clamp, the position-bias MLP), saved with ``torch.save``, read back with lcseg's reader
and converted; the Flax stage outputs must equal ``features[1, 3, 5, 7]``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a test-only dependency (requirements-dev.txt)

from lcseg.models.swin import (
    SWIN_V2,
    SwinBlockV2,
    SwinV2,
    describe_swin_v2,
    is_torch_swin_v2,
    swin_v2,
    swin_v2_from_torch,
)
from lcseg.models.torch_checkpoint import read_state_dict
from tests.torch_reference import torchvision_swin

torch.set_num_threads(2)

# torchvision's feature extractors (``features``: no final norm, no head).
TORCHVISION_PARAMETERS = {"swin_v2_t": 27_581_034, "swin_v2_s": 48_966_906,
                          "swin_v2_b": 86_903_800}
TINY = dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4))


def randomize(model, seed=0):
    """Perturbs every parameter so that no part of the maths can hide behind its init."""
    generator = torch.Generator().manual_seed(seed)

    def rand(shape, low, high):
        return torch.rand(shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):  # exp(4.6) is the clamp: some heads exceed it.
                p.copy_(rand(p.shape, 1.0, 6.0))
            elif ".cpb_mlp." in name:  # a position bias far from 16 * sigmoid(0) = 8
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
            elif p.ndim == 1 and name.endswith("weight"):  # LayerNorm scales
                p.copy_(rand(p.shape, 0.5, 1.5))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            else:
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def tiny_torch_swin(bands=3):
    """torchvision's SwinTransformer with V2 blocks at TINY's sizes; ``bands`` input bands
    by replacing the patch convolution, as torchgeo's multispectral SatlasPretrain do."""
    model = torchvision_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=TINY["embed_dim"], depths=list(TINY["depths"]),
        num_heads=list(TINY["num_heads"]), window_size=[8, 8], stochastic_depth_prob=0.2,
        block=torchvision_swin.SwinTransformerBlockV2,
        downsample_layer=torchvision_swin.PatchMergingV2)
    if bands != 3:
        model.features[0][0] = torch.nn.Conv2d(bands, TINY["embed_dim"], 4, 4)
    return randomize(model)


def torch_features(model, images):
    """``features[1, 3, 5, 7]`` of torchvision's model while its own ``forward`` runs."""
    features = []
    hooks = [model.features[i].register_forward_hook(
        lambda _m, _i, out: features.append(out.detach().numpy().copy())) for i in (1, 3, 5, 7)]
    try:
        with torch.no_grad():
            model(torch.from_numpy(images))
    finally:
        for hook in hooks:
            hook.remove()
    return features


def converted_params(model, tmp_path):
    """The model's weights as a user gets them: ``torch.save`` -> read -> convert."""
    path = tmp_path / "swin.pth"
    torch.save(model.state_dict(), path)
    state_dict = read_state_dict(str(path))
    return state_dict, swin_v2_from_torch(state_dict)


def images(batch, height, width, bands=3, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, bands, height, width)).astype(np.float32)


# XLA:CPU's backend optimisations take most of the compile time of these deep unrolled
# models and none of it is needed for one forward pass.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def flax_features(module, params, nchw):
    return jax.jit(lambda p, x: module.apply({"params": p}, x), compiler_options=FAST_COMPILE)(
        params, jnp.asarray(nchw.transpose(0, 2, 3, 1)))


def assert_close(actual, expected, relative=1e-4):
    """Max abs difference within ``relative`` of the largest magnitude."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected)
    assert actual.shape == expected.shape
    difference = float(np.max(np.abs(actual - expected)))
    assert difference <= relative * max(float(np.max(np.abs(expected))), 1.0), difference


@pytest.fixture(scope="module")
def swin_v2_t(tmp_path_factory):
    model = randomize(torchvision_swin.swin_v2_t())
    state_dict, params = converted_params(model, tmp_path_factory.mktemp("swin_v2_t"))
    return model, state_dict, params


def test_parameter_counts_equal_torchvisions():
    shapes = {name: jax.eval_shape(swin_v2(name).init, jax.random.key(0),
                                   jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))["params"]
              for name in SWIN_V2}
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in shapes.items()}
    assert counts == TORCHVISION_PARAMETERS


# 256x256: whole windows at every stage. 138x266 (batch 2): the patch convolution drops
# 2 rows/columns, windows need padding at every stage, every patch merging sees odd sizes
# (17x33, 9x17), and the last stage (5x9, padded to 8x16) shifts along its width only.
@pytest.mark.parametrize("batch,height,width", [(1, 256, 256), (2, 138, 266)])
def test_swin_v2_t_features_equal_torchvisions(swin_v2_t, batch, height, width):
    model, state_dict, params = swin_v2_t
    assert describe_swin_v2(state_dict) == "swin_v2_t" and is_torch_swin_v2(state_dict)
    x = images(batch, height, width)
    expected = torch_features(model, x)
    features = flax_features(swin_v2("swin_v2_t"), params, x)
    assert [f.shape for f in features] == [e.shape for e in expected]
    for actual, reference in zip(features, expected):
        assert_close(actual, reference)


def test_bfloat16_close_to_float32(tmp_path):
    """bfloat16 compute (float32 parameters) stays within a few percent of torch's float32."""
    model = tiny_torch_swin()
    _, params = converted_params(model, tmp_path)
    x = images(2, 64, 96)
    features = flax_features(SwinV2(**TINY, dtype=jnp.bfloat16), params, x)
    for actual, reference in zip(features, torch_features(model, x)):
        assert actual.dtype == jnp.bfloat16
        error = np.asarray(actual, np.float32) - reference
        # Observed: 0.3% (stage 1) to 0.7% (stage 4) RMS; bfloat16 keeps 8 bits.
        assert np.sqrt(np.mean(error**2) / np.mean(reference**2)) < 0.02


def test_swin_v2_b_features_equal_torchvisions(tmp_path):
    model = randomize(torchvision_swin.swin_v2_b())
    state_dict, params = converted_params(model, tmp_path)
    assert describe_swin_v2(state_dict) == "swin_v2_b"
    # The cheapest size that still shifts windows (stages 1 and 2); swin_v2_t's tests
    # cover padding and odd sizes, this one swin_v2_b's widths and heads.
    x = images(1, 128, 128)
    for actual, reference in zip(flax_features(swin_v2("swin_v2_b"), params, x),
                                 torch_features(model, x)):
        assert_close(actual, reference)


def test_nine_band_swin_v2_features_equal_torchvisions(tmp_path):
    """SatlasPretrain's multispectral Swin V2-B are torchvision state dicts whose patch
    convolution reads 9 or 11 bands; a tiny one of the same layout converts and matches."""
    model = tiny_torch_swin(bands=9)
    state_dict, params = converted_params(model, tmp_path)
    assert describe_swin_v2(state_dict) == (
        "swin_v2(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 4)), 9 input bands")
    assert params["features_0_0"]["kernel"].shape == (4, 4, 9, 16)
    x = images(2, 72, 88, bands=9)
    for actual, reference in zip(flax_features(SwinV2(**TINY), params, x),
                                 torch_features(model, x)):
        assert_close(actual, reference)


def test_converter_is_strict(swin_v2_t):
    _, state_dict, _ = swin_v2_t
    assert {"head.weight", "norm.weight"} <= set(state_dict)  # dropped, not refused
    assert any(k.endswith("relative_position_index") for k in state_dict)
    extra = {**state_dict, "features.1.0.attn.extra.weight": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match=r"unexpected key\(s\) \['features.1.0.attn.extra"):
        swin_v2_from_torch(extra)
    missing = {k: v for k, v in state_dict.items() if k != "features.3.1.attn.cpb_mlp.2.weight"}
    with pytest.raises(ValueError, match=r"missing key\(s\) \['features.3.1.attn.cpb_mlp.2.weight"):
        swin_v2_from_torch(missing)
    wrong = {**state_dict, "features.2.norm.bias": np.zeros(7, np.float32)}
    with pytest.raises(ValueError, match=r"features.2.norm.bias: \(7,\) \(needs \(192,\)\)"):
        swin_v2_from_torch(wrong)
    with pytest.raises(ValueError, match="Not a torchvision Swin V2"):
        swin_v2_from_torch({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})


def test_stochastic_depth_only_when_training():
    # One block per stage: probabilities 0, 1/3, 2/3 and 1 times 0.6 (torchvision's rule).
    model = SwinV2(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                   stochastic_depth_prob=0.6)
    x = jnp.asarray(images(16, 32, 32).transpose(0, 2, 3, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
    apply = jax.jit(model.apply, static_argnames="train", compiler_options=FAST_COMPILE)
    evaluated = apply(variables, x)  # train=False needs no 'dropout' rng
    trained = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    # Block 0 never drops; every later branch is either dropped or rescaled by 1 / (1 - p)
    # (checked exactly below), so every sample of the last stage changes.
    np.testing.assert_array_equal(trained[0], evaluated[0])
    assert np.all(np.any(np.asarray(trained[3]) != np.asarray(evaluated[3]), axis=(1, 2, 3)))
    again = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert np.any(np.asarray(again[3]) != np.asarray(trained[3]))
    with pytest.raises(Exception, match="dropout"):
        apply(variables, x, train=True)


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    block = SwinBlockV2(num_heads=1, stochastic_depth_prob=0.25).bind(
        {}, rngs={"dropout": jax.random.key(0)})
    out = np.asarray(block.drop_path(jnp.ones((256, 3, 3, 2)), train=True))
    per_sample = out.reshape(256, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)}
    assert 0.15 < np.mean(per_sample[:, 0] == 0) < 0.35


def test_gradients_are_finite_where_windows_are_padded():
    # 36x20 px: every stage is padded to whole windows, and padded tokens' keys are
    # exactly zero (the key bias is zeroed), where a plain norm's gradient is NaN.
    model = SwinV2(embed_dim=8, depths=(1, 2, 1, 1), num_heads=(1, 1, 2, 2), window_size=4)
    x = jnp.asarray(images(2, 36, 20).transpose(0, 2, 3, 1))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]  # Eager init: 3x slower.

    def loss(params):
        return sum(jnp.sum(f.astype(jnp.float32) ** 2) for f in model.apply({"params": params}, x))

    grads = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
