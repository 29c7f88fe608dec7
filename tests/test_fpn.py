"""swin_fpn (``lcseg.models.fpn.FPNSegmenter``): pyramid, fusion and head, backbones, training.

The pyramid is checked against torchvision's own ``FeaturePyramidNetwork`` (0.28.0, vendored
verbatim in ``tests/torch_reference/torchvision_fpn.py``; torchvision does not install beside
the CPU torch wheel) on the same random multi-scale features, sizes that do not halve
exactly included. The fusion of the levels and the head have no library reference: they are
checked against a float64 transcription of the module docstring (a weaker check, and the
test's name says so), with torch's own bilinear ``interpolate`` for every resize. The rest
runs the model as users do: on a ResNet, through training, resume, evaluation and
whole-scene prediction, and with converted Swin V2 weights in its encoder.
"""

import os
import signal
from collections import OrderedDict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a test-only dependency (requirements-dev.txt)

from configs import test_models
from lcseg import evaluate, predict, preemption, train
from lcseg.models import backbones, create_model, import_weights, load_pretrained
from tests.test_models import random_variables
from tests.test_swin import randomize as randomize_swin
from tests.test_train import assert_trees_equal, events_files, logged_steps, read_params
from tests.torch_reference import torchvision_swin
from tests.torch_reference.torchvision_fpn import FeaturePyramidNetwork

torch.set_num_threads(2)
F = torch.nn.functional

TINY = test_models.TINY_MODELS["swin_fpn"]


def assert_close(actual, expected, relative=1e-5):
    """Max abs difference within ``relative`` of the largest magnitude (float32 rounding)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference = float(np.max(np.abs(actual - expected)))
    assert difference <= relative * max(float(np.max(np.abs(expected))), 1.0), difference


# XLA:CPU's backend optimisations take most of the compile time of a Swin and none of it
# is needed for one forward pass (as in tests/test_swin.py).
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)


def pyramid_and_logits(model, variables, images):
    """The model's logits and its pyramid levels (finest first), both as numpy."""
    logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]),
                            compiler_options=FAST_COMPILE)(variables, jnp.asarray(images))
    (pyramid,) = state["intermediates"]["pyramid"]
    return np.asarray(logits), [np.asarray(level) for level in pyramid]


def fixed_backbone(features):
    """A backbone class that ignores its input and returns ``features`` (NHWC numpy arrays),
    so the pyramid sees exactly what torchvision's FPN sees."""

    class FixedFeatures(nn.Module):
        dtype: jnp.dtype = jnp.float32

        @nn.compact
        def __call__(self, images, *, train=False):
            del images, train
            return [jnp.asarray(f) for f in features]

    return FixedFeatures


def to_torch_kernel(kernel):
    """HWIO (Flax) -> OIHW (torch), float64."""
    return torch.from_numpy(np.asarray(kernel, np.float64).transpose(3, 2, 0, 1))


# ---------------------------------------------------------------------------------------
# The pyramid: torchvision's FeaturePyramidNetwork itself.
# ---------------------------------------------------------------------------------------


def test_pyramid_matches_torchvision_feature_pyramid_network(monkeypatch):
    rng = np.random.default_rng(0)
    # Five maps, finest first (a ResNet's stem and stages): stages=None must take the last
    # four. The sizes are an odd input's: 19 -> 10 -> 5 -> 3 rows, 15 -> 8 -> 4 -> 2
    # columns, so nearest upsampling must repeat some rows once and others twice.
    channels = (3, 4, 5, 6, 7)
    sizes = ((38, 30), (19, 15), (10, 8), (5, 4), (3, 2))
    features = [rng.normal(size=(2, h, w, c)).astype(np.float32)
                for (h, w), c in zip(sizes, channels)]
    monkeypatch.setitem(backbones.BACKBONES, "fixed", fixed_backbone(features))
    model = create_model("swin_fpn", num_classes=3, backbone="fixed", fpn_channels=6,
                         head_channels=4)
    images = np.zeros((2, 75, 61, 3), np.float32)

    reference = FeaturePyramidNetwork(list(channels[1:]), 6)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # Random biases too (torchvision initialises them to zero).
        for parameter in reference.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    reference.eval()

    variables = random_variables(model, images)
    params = dict(variables["params"])
    for i in range(4):
        for flax_name, torch_blocks in (("lateral", reference.inner_blocks),
                                        ("output", reference.layer_blocks)):
            conv = torch_blocks[i][0]
            params[f"{flax_name}_{i}"] = {
                "kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0),  # OIHW -> HWIO
                "bias": conv.bias.detach().numpy()}
    _, pyramid = pyramid_and_logits(model, {"params": params}, images)

    inputs = OrderedDict((f"feat{i}", torch.from_numpy(f.transpose(0, 3, 1, 2)))
                         for i, f in enumerate(features[1:]))
    with torch.no_grad():
        expected = list(reference(inputs).values())
    assert len(pyramid) == len(expected) == 4
    for level, reference_level in zip(pyramid, expected):
        assert_close(level, reference_level.numpy().transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------
# Fusion and head: a transcription of the docstring (weak reference).
# ---------------------------------------------------------------------------------------


def test_fusion_and_head_match_a_docstring_transcription_weak_reference():
    """Weak: the reference is written here from the module docstring, not taken from a
    library. It starts from the model's own pyramid levels (checked against torchvision
    above) and recomputes the rest in float64: each level upsampled bilinearly to the finest
    one's size and summed, Conv3x3 - ReLU - Conv1x1, bilinear upsampling to the input size
    (torch's ``interpolate``, ``align_corners=False``)."""
    model = create_model("swin_fpn", num_classes=5, **{
        k: v for k, v in TINY.items() if k != "name"})
    height, width = 45, 37  # odd: the finest level (12 x 10) does not divide it
    images = np.random.default_rng(1).normal(size=(1, height, width, 3)).astype(np.float32)
    variables = random_variables(model, images, seed=2)
    logits, pyramid = pyramid_and_logits(model, variables, images)

    levels = [torch.from_numpy(p.astype(np.float64).transpose(0, 3, 1, 2)) for p in pyramid]
    assert len(levels) == 4 and len({tuple(p.shape[-2:]) for p in levels}) == 4
    finest = tuple(levels[0].shape[-2:])
    fused = levels[0] + sum(F.interpolate(p, size=finest, mode="bilinear", align_corners=False)
                            for p in levels[1:])
    params = variables["params"]
    x = F.relu(F.conv2d(fused, to_torch_kernel(params["head_conv"]["kernel"]),
                        torch.from_numpy(np.asarray(params["head_conv"]["bias"], np.float64)),
                        padding=1))
    x = F.conv2d(x, to_torch_kernel(params["classifier"]["kernel"]),
                 torch.from_numpy(np.asarray(params["classifier"]["bias"], np.float64)))
    expected = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    assert logits.shape == (1, height, width, 5)
    assert_close(logits, expected.numpy().transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------
# Any backbone; stage selection.
# ---------------------------------------------------------------------------------------


def test_resnet_backbone_gives_input_sized_logits_and_stages_select_levels():
    images = jnp.zeros((1, 45, 37, 3))
    options = dict(backbone="resnet18", backbone_options=dict(base_width=4), fpn_channels=8,
                   head_channels=8)
    # Shapes only (jax.eval_shape): nothing to compile.
    encoder_maps = jax.eval_shape(
        lambda x: backbones.create_backbone("resnet18", base_width=4).init_with_output(
            jax.random.key(0), x)[0], images)
    assert len(encoder_maps) == 5  # the stem and four stages

    def shapes(stages):
        model = create_model("swin_fpn", num_classes=5, stages=stages, **options)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
        logits, state = jax.eval_shape(
            lambda v: model.apply(v, images, mutable=["intermediates"]), variables)
        (pyramid,) = state["intermediates"]["pyramid"]
        laterals = sorted(k for k in variables["params"] if k.startswith("lateral_"))
        return logits.shape, [p.shape[1:3] for p in pyramid], laterals

    encoder_sizes = [m.shape[1:3] for m in encoder_maps]
    # None: the last four maps (the four stages, not the stem).
    logits, sizes, laterals = shapes(None)
    assert logits == (1, 45, 37, 5)
    assert sizes == encoder_sizes[1:] and len(laterals) == 4
    # Chosen maps, in any order, become the levels finest first.
    logits, sizes, laterals = shapes((4, 0, 2))
    assert logits == (1, 45, 37, 5)
    assert sizes == [encoder_sizes[i] for i in (0, 2, 4)]
    assert laterals == ["lateral_0", "lateral_1", "lateral_2"]

    for bad in ((1, 5), (-1, 2), ()):
        with pytest.raises(ValueError, match=r"stages .* must index the 5 feature maps"):
            shapes(bad)


# ---------------------------------------------------------------------------------------
# Training, resume, evaluation and whole-scene prediction.
# ---------------------------------------------------------------------------------------


def fpn_config(data_dir, **overrides):
    """configs/test_models.py:swin_fpn on the synthetic dataset, 4 steps, evaluated and
    checkpointed at the last only (each evaluation of the validation split costs seconds)."""
    config = test_models.get_config("swin_fpn")
    config.dataset.data_dir = data_dir
    config.update(dict(num_train_steps=4, eval_every_steps=4, checkpoint_every_steps=4),
                  **overrides)
    return config


@pytest.fixture(scope="module")
def fpn_workdir(synthetic_data_dir, tmp_path_factory):
    """The uninterrupted tiny swin_fpn run."""
    workdir = str(tmp_path_factory.mktemp("fpn_run"))
    train.train_and_evaluate(fpn_config(synthetic_data_dir), workdir)
    return workdir


def test_training_stopped_and_resumed_equals_the_uninterrupted_run(
        fpn_workdir, synthetic_data_dir, tmp_path, monkeypatch):
    # A real stop signal, sent to this process when the loop asks after step 2 (before the
    # only scheduled checkpoint, at 4): the loop checkpoints step 2 and raises.
    requested = preemption.StopSignal.requested
    calls = []

    def signal_at_step_two(self):
        calls.append(None)
        if len(calls) == 2:
            assert signal.getsignal(signal.SIGUSR1) == self._handle  # else it would kill us
            os.kill(os.getpid(), signal.SIGUSR1)
        return requested(self)

    monkeypatch.setattr(preemption.StopSignal, "requested", signal_at_step_two)
    workdir = str(tmp_path)
    config = fpn_config(synthetic_data_dir, preemption_signal="SIGUSR1")
    with pytest.raises(preemption.Preempted) as stopped:
        train.train_and_evaluate(config, workdir)
    assert stopped.value.step == 2
    monkeypatch.setattr(preemption.StopSignal, "requested", requested)

    before = events_files(workdir)
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 4
    # It resumed from step 2 (a run starting over would log step 2 again)...
    (resumed_events,) = events_files(workdir) - before
    assert logged_steps(resumed_events) == [4]
    # ...with the parameters, optimizer and data-iterator state of step 2: bit for bit.
    assert_trees_equal(read_params(workdir, 4), read_params(fpn_workdir, 4))


def test_trained_model_evaluates_and_predicts_a_whole_scene(fpn_workdir):
    scores, path = evaluate.evaluate_checkpoint(fpn_workdir, "test", "latest")
    assert os.path.exists(path) and 0 <= scores["miou"] <= 1
    assert np.asarray(scores["confusion_matrix"]).shape == (6, 6)

    predictor = predict.Predictor.from_workdir(fpn_workdir, checkpoint="latest", overlap=0.25)
    assert predictor.step == 4
    # Larger than one window (config.eval_tile_size=64) and of odd size: several windows,
    # each one's logits upsampled to it.
    image = np.random.default_rng(3).integers(0, 256, (71, 93, 3), dtype=np.uint8)
    classes, probabilities = predict.predict_scene(predictor, image)
    assert classes.shape == (71, 93) and classes.max() < 6
    assert probabilities.shape == (71, 93, 6)
    np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-4)


# ---------------------------------------------------------------------------------------
# Pretrained Swin V2 weights into the encoder.
# ---------------------------------------------------------------------------------------


def test_converted_swin_v2_weights_load_into_the_encoder(tmp_path):
    backbone = TINY["backbone_options"]
    reference = randomize_swin(torchvision_swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=backbone["embed_dim"], depths=list(backbone["depths"]),
        num_heads=list(backbone["num_heads"]),
        window_size=[backbone["window_size"]] * 2, stochastic_depth_prob=0.2,
        block=torchvision_swin.SwinTransformerBlockV2,
        downsample_layer=torchvision_swin.PatchMergingV2))
    source, converted = str(tmp_path / "swin.pth"), str(tmp_path / "swin.npz")
    torch.save(reference.state_dict(), source)
    weights = import_weights.convert(source, converted, normalisation="satlas")

    model = create_model("swin_fpn", num_classes=6, **{
        k: v for k, v in TINY.items() if k != "name"})
    variables = random_variables(model, jnp.zeros((1, 32, 32, 3)))
    loaded, normalisation = load_pretrained(variables, converted)

    assert_trees_equal(loaded["params"]["encoder"], weights.params)
    rest = {k: v for k, v in variables["params"].items() if k != "encoder"}
    assert_trees_equal({k: loaded["params"][k] for k in rest}, rest)
    assert set(rest) == {"lateral_0", "lateral_1", "lateral_2", "lateral_3", "output_0",
                         "output_1", "output_2", "output_3", "head_conv", "classifier"}
    # The encoder did change: its random values were all replaced.
    for before, after in zip(jax.tree.leaves(variables["params"]["encoder"]),
                             jax.tree.leaves(loaded["params"]["encoder"])):
        assert not np.array_equal(np.asarray(before), np.asarray(after))
    assert normalisation == {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
