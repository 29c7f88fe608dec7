"""The hypercolumn system's two training stages, and its ImageNet VGG16 weights.

Stage one (``config.sampled_pixels=k``) trains the classifier on k random labelled pixels
per image; stage two (``config.model.init_from``) starts the dense classifier from stage
one's best checkpoint. Both run on ``synthetic_footprints`` (configs/test_hypercolumn.py).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch  # a test-only dependency (requirements-dev.txt)
from flax import traverse_util

from configs import test_hypercolumn
from lcseg import parallel, train
from lcseg.data import open_split, prepare_dataset
from lcseg.experiment import Experiment, sample_labelled_pixels
from lcseg.models import create_model, import_weights, load_pretrained
from lcseg.workdir import restore_run
from tests.torch_reference import torchvision_vgg


@pytest.fixture(scope="module")
def footprints_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("footprints"))
    prepare_dataset("synthetic_footprints", data_dir)
    return data_dir


def stage_config(stage, data_dir, **overrides):
    config = test_hypercolumn.get_config(stage)
    config.dataset.data_dir = data_dir
    config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = 2
    for key, value in overrides.items():
        config[key] = value
    return config


def flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


# ---------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------


def test_sampled_pixels_are_distinct_labelled_and_uniform():
    labels = np.full((2, 6, 5), 255, np.int32)
    labels[0, 1:4, 1:4] = np.arange(9).reshape(3, 3) % 2  # 9 labelled pixels.
    labels[1, 0, :2] = 1  # Only 2 labelled pixels: one of the 3 draws is unlabelled.
    counts = np.zeros((6, 5))
    draws = 3000
    sample = jax.jit(sample_labelled_pixels, static_argnums=(2, 3))
    for seed in range(draws):
        pixels, picked = map(np.asarray, sample(jax.random.key(seed), jnp.asarray(labels),
                                                3, 255))
        rows, columns = pixels[0].T
        assert len({(r, c) for r, c in pixels[0]}) == 3  # Without replacement.
        np.testing.assert_array_equal(picked[0], labels[0, rows, columns])
        assert (picked[0] != 255).all()
        counts[rows, columns] += 1
        # Image 1: both labelled pixels every time, the third draw ignored.
        assert sorted(picked[1].tolist()) == [1, 1, 255]
    # Each of the 9 labelled pixels is drawn with probability 3/9 per step.
    expected = draws / 3
    assert counts.sum() == 3 * draws and counts[labels[0] == 255].sum() == 0
    assert np.abs(counts[1:4, 1:4] - expected).max() < 5 * np.sqrt(expected)


def test_stage_one_loss_is_cross_entropy_of_the_sampled_pixels(footprints_dir):
    # 64 pixels of a 32 px crop: both classes among them, so a pixel-label mix-up shows.
    config = stage_config("1", footprints_dir, learning_rate=0.0, class_weights="none",
                          sampled_pixels=64)
    config.model.dropout = 0.0
    experiment = Experiment(config)
    state = experiment.init_state()
    # A head whose logits vary strongly from pixel to pixel (the initial one barely does),
    # so that pairing a pixel's logits with another pixel's label changes the loss.
    rng = np.random.default_rng(0)
    head = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
                        state.params["head"])
    state = state.replace(params={**state.params, "head": head})
    batch = next(experiment.train_iterator(
        open_split("synthetic_footprints", "train", footprints_dir)))
    # Copies: the step donates the state's buffers.
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    # The step's own draw: the second key of fold_in(rng, step) split in two.
    _, sample_rng = jax.random.split(jax.random.fold_in(state.rng, 0))
    sample_rng = jax.device_put(jax.device_get(sample_rng))
    _, metrics = experiment.train_step(state, parallel.shard_batch(batch, experiment.mesh))

    pixels, labels = sample_labelled_pixels(sample_rng, jnp.asarray(batch["label"]),
                                            config.sampled_pixels, 255)
    images = (batch["image"] / 255.0 - np.asarray(config.dataset.mean)) / np.asarray(
        config.dataset.std)
    dense = np.asarray(experiment.model.apply(variables, jnp.asarray(images, jnp.float32)),
                       np.float64)
    rows, columns = np.asarray(pixels[..., 0]), np.asarray(pixels[..., 1])
    logits = dense[np.arange(len(dense))[:, None], rows, columns]  # [N, k, C]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    labels = np.asarray(labels)
    counted = labels != 255
    expected = -np.take_along_axis(log_probs, np.where(counted, labels, 0)[..., None],
                                   -1)[..., 0][counted].mean()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


def test_sampled_pixels_need_a_model_that_classifies_pixels(footprints_dir):
    config = stage_config("1", footprints_dir)
    config.model = ml_collections.ConfigDict(
        {"name": "unet", "channels": (4, 8), "convs_per_level": 1})
    with pytest.raises(ValueError, match="sampled_pixels=3 needs a model"):
        Experiment(config)


# ---------------------------------------------------------------------------------------
# Both stages through training.
# ---------------------------------------------------------------------------------------


def test_stage_two_starts_from_stage_one(footprints_dir, tmp_path):
    stage1 = str(tmp_path / "stage1")
    train.train_and_evaluate(stage_config("1", footprints_dir), stage1)
    _, trained, _ = restore_run(stage1, "best")
    initial = Experiment(stage_config("1", footprints_dir)).init_state()
    # Stage one moved the classifier and left the frozen VGG16 as initialised.
    head, encoder = flat(trained.params["head"]), flat(trained.params["encoder"])
    assert any(not np.array_equal(v, flat(initial.params["head"])[k]) for k, v in head.items())
    for key, value in encoder.items():
        np.testing.assert_array_equal(value, flat(initial.params["encoder"])[key])

    # Stage two with a zero learning rate: its parameters are stage one's, exactly.
    stage2 = str(tmp_path / "stage2")
    config = stage_config("2", footprints_dir, learning_rate=0.0)
    config.model.init_from = stage1
    state = train.train_and_evaluate(config, stage2)
    for key, value in flat(trained.params).items():
        np.testing.assert_array_equal(np.asarray(flat(state.params)[key]), value, err_msg=key)

    # A run of another model cannot initialise this one.
    other = stage_config("2", footprints_dir)
    other.model.hidden = 32
    other.model.init_from = stage1
    with pytest.raises(ValueError, match="init_from=.*head/hidden/kernel"):
        train.train_and_evaluate(other, str(tmp_path / "other"))


# ---------------------------------------------------------------------------------------
# ImageNet weights.
# ---------------------------------------------------------------------------------------


def test_torchvision_vgg16_weights_load_into_the_hypercolumn_encoder(tmp_path):
    torch.manual_seed(0)
    reference = torchvision_vgg.vgg16()
    torch.save(reference.state_dict(), tmp_path / "vgg16-397923af.pth")
    converted = str(tmp_path / "vgg16.npz")
    weights = import_weights.convert(str(tmp_path / "vgg16-397923af.pth"), converted)
    assert weights.arch == "vgg16"
    model = create_model("hypercolumn", num_classes=2, layers="pool", hidden=8)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    loaded, normalisation = load_pretrained(variables, converted)
    assert normalisation == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    for index in (0, 2, 28):
        np.testing.assert_array_equal(
            loaded["params"]["encoder"][f"features_{index}"]["kernel"],
            reference.features[index].weight.detach().numpy().transpose(2, 3, 1, 0))
    for key, value in flat(variables["params"]["head"]).items():
        np.testing.assert_array_equal(flat(loaded["params"]["head"])[key], value)
