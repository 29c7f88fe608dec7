"""Freezing parameters (config.frozen): no updates, no optimiser state, clear errors,
summary counts, and checkpoints."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import test as test_config
from lcseg import checkpoints, experiment, optim, parallel
from lcseg.models import summary
from lcseg.models.summary import count_trainable

# The tiny test U-Net's parameters: encoder_0, encoder_1, decoder_0, up_0, head (each
# block a Conv_0 and a BatchNorm_0). Freeze the encoder, and one leaf of the decoder by
# its full path.
FROZEN = ("encoder_0", "encoder_1", "decoder_0/Conv_0/kernel")


def make_config(frozen=FROZEN, **overrides):
    config = test_config.get_config()
    config.frozen = frozen
    # Constant rate, no warmup: the first step already updates (warmup starts at 0).
    config.schedule = "constant"
    config.warmup_steps = 0
    for key, value in overrides.items():
        config[key] = value
    return config


def flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def is_frozen(path, frozen=FROZEN):
    """Independent of optim.frozen_mask: a path is frozen when it is a prefix or under it."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in frozen)


def batch_for(run, seed=0):
    rng = np.random.default_rng(seed)
    size, batch = run.config.crop_size, run.config.batch_size
    return parallel.shard_batch(
        {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
         "label": rng.integers(0, run.metadata.num_classes, (batch, size, size),
                               dtype=np.uint8)}, run.mesh)


def test_prefixes_match_whole_path_components():
    params = {"encoder": {"layer1": {"kernel": jnp.zeros(2)},
                          "layer10": {"kernel": jnp.zeros(2)},
                          "layer1_extra": {"kernel": jnp.zeros(2)}},
              "head": {"kernel": jnp.zeros(2), "bias": jnp.zeros(2)}}
    mask = flat(optim.frozen_mask(params, ("encoder/layer1", "/head/bias")))
    assert mask == {"encoder/layer1/kernel": True, "encoder/layer10/kernel": False,
                    "encoder/layer1_extra/kernel": False, "head/kernel": False,
                    "head/bias": True}
    assert not any(flat(optim.frozen_mask(params, ())).values())


@pytest.mark.parametrize("prefix", ["encoder", "encoder_0/Conv", "head/kernel/x", ""])
def test_prefix_matching_nothing_is_an_error_naming_it_and_the_top_level_paths(prefix):
    run = experiment.Experiment(make_config(frozen=("encoder_1", prefix)))
    with pytest.raises(ValueError, match=f"prefix {prefix!r}") as error:
        run.abstract_state()
    if prefix:  # A typo: the message lists what exists.
        assert "matches no parameter" in str(error.value)
        assert "['decoder_0', 'encoder_0', 'encoder_1', 'head', 'up_0']" in str(error.value)
        # And what exists where the prefix goes astray.
        expected = {"encoder": "up_0']",  # No part matches: the top level only.
                    "encoder_0/Conv": "; under 'encoder_0': ['BatchNorm_0', 'Conv_0']",
                    "head/kernel/x": "; 'head/kernel' is a parameter, with nothing under it"}
        assert str(error.value).endswith(expected[prefix])
    else:
        assert "empty prefix" in str(error.value)


def test_frozen_parameters_stay_bit_identical_and_the_rest_train():
    """AdamW with strong weight decay, clipping, EMA and gradient accumulation: none of
    them moves a frozen parameter (or its average); every other parameter moves."""
    run = experiment.Experiment(make_config(
        optimizer="adamw", weight_decay=0.5, grad_clip_norm=0.1, ema_decay=0.9,
        grad_accum_steps=2, learning_rate=1e-2))
    state = run.init_state()
    initial_params, initial_stats = flat(state.params), flat(state.batch_stats)
    for seed in range(3):
        state, metrics = run.train_step(state, batch_for(run, seed))
        assert np.isfinite(float(metrics["loss"]))
    params, ema, stats = flat(state.params), flat(state.ema_params), flat(state.batch_stats)
    frozen = [path for path in params if is_frozen(path)]
    assert len(frozen) == 7 and len(params) - len(frozen) == 6
    for path, value in params.items():
        if is_frozen(path):
            assert value.tobytes() == initial_params[path].tobytes(), path
            assert ema[path].tobytes() == initial_params[path].tobytes(), path
        else:
            assert np.all(value != initial_params[path]), path
    # BatchNorm statistics of frozen modules keep updating in train mode (as in PyTorch).
    for path in ("encoder_0/BatchNorm_0/mean", "encoder_1/BatchNorm_0/var"):
        assert not np.array_equal(stats[path], initial_stats[path]), path


def test_clipping_and_grad_norm_count_trainable_gradients_only():
    """Plain SGD at rate 1: an unclipped, unfrozen step gives the gradients ``g``. The
    frozen run's grad_norm is the norm of g's trainable part, and clipping to c scales
    that part to norm c: frozen gradients do not count in the global norm (they would
    make it 13% larger here)."""
    clip = 0.05
    plain = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, learning_rate=1.0)
    unfrozen_run = experiment.Experiment(make_config(frozen=(), **plain))
    state = unfrozen_run.init_state()
    initial = flat(state.params)
    batch = batch_for(unfrozen_run)
    after, unfrozen_metrics = unfrozen_run.train_step(state, batch)
    gradients = {path: initial[path] - value for path, value in flat(after.params).items()}
    assert all(np.any(gradients[path] != 0) for path in gradients if is_frozen(path))
    trainable = sorted(path for path in gradients if not is_frozen(path))
    g = np.concatenate([gradients[path].ravel() for path in trainable]).astype(np.float64)
    trainable_norm = np.linalg.norm(g)
    assert float(unfrozen_metrics["grad_norm"]) > 1.1 * trainable_norm > 1.1 * clip

    frozen_run = experiment.Experiment(make_config(grad_clip_norm=clip, **plain))
    state = frozen_run.init_state()
    after, metrics = frozen_run.train_step(state, batch)
    # g is a difference of float32 parameters: ~1e-7 of them off, elementwise. Its norm
    # and the fitted scale of the update average that out.
    assert float(metrics["grad_norm"]) == pytest.approx(trainable_norm, rel=1e-5)
    final = flat(after.params)
    update = np.concatenate([(initial[path] - final[path]).ravel()
                             for path in trainable]).astype(np.float64)
    assert update @ g / (g @ g) == pytest.approx(clip / trainable_norm, rel=1e-4)
    assert np.linalg.norm(update - g * clip / trainable_norm) < 1e-4 * clip


def opt_state_bytes(config):
    run = experiment.Experiment(config)
    state = run.abstract_state()
    return (sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state)),
            state)


@pytest.mark.parametrize("optimizer, copies", [("adamw", 2), ("sgd", 1)])
def test_optimizer_state_holds_nothing_for_frozen_parameters(optimizer, copies):
    """Adam keeps two float32 moments per trainable scalar, SGD one momentum: freezing
    saves exactly those bytes of every frozen parameter."""
    unfrozen, state = opt_state_bytes(make_config(frozen=(), optimizer=optimizer))
    frozen, frozen_state = opt_state_bytes(make_config(optimizer=optimizer))
    frozen_scalars = sum(x.size for path, x in flat(state.params).items() if is_frozen(path))
    assert frozen_scalars > 0
    assert unfrozen - frozen == copies * 4 * frozen_scalars
    # Each frozen parameter has an (array-less) MaskedNode in place of each state copy.
    nodes = jax.tree.leaves(frozen_state.opt_state,
                            is_leaf=lambda x: isinstance(x, optax.MaskedNode))
    assert sum(isinstance(x, optax.MaskedNode) for x in nodes) == copies * 7


def test_summary_counts_trainable_and_frozen_parameters():
    run = experiment.Experiment(make_config())
    params = run.abstract_state().params
    sizes = {path: int(np.prod(x.shape)) for path, x in flat(params).items()}
    frozen = sum(size for path, size in sizes.items() if is_frozen(path))
    trainable = sum(sizes.values()) - frozen
    assert count_trainable(params, FROZEN) == (trainable, frozen)
    table = summary(params, FROZEN).splitlines()
    assert table[-3].split() == ["total", f"{trainable + frozen:,}"]
    assert table[-2].split()[:2] == ["trainable", f"{trainable:,}"]
    assert table[-1].split()[:2] == ["frozen", f"{frozen:,}"]
    assert table[-1].split()[2] == f"{frozen / (trainable + frozen):.1%}"
    # Nothing frozen: the table is the one lcseg always wrote.
    plain = summary(params).splitlines()
    assert plain == table[:-2] and plain[-1].split()[0] == "total"


def test_checkpoints_restore_with_the_same_frozen_and_refuse_another(tmp_path):
    run = experiment.Experiment(make_config())
    state = run.init_state()
    # Moments other than their initial zeros (cheaper than compiling a train step).
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 1, state.opt_state))
    writer = checkpoints.Checkpointer(str(tmp_path))
    writer.save(1, state)
    writer.wait()
    restored = checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(
        1, run.abstract_state())
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    saved = ocp.StandardCheckpointer().metadata(
        os.path.join(tmp_path, "1", "state")).item_metadata.tree["opt_state"]
    optim.check_saved_optimizer_state(saved, run.abstract_state().opt_state)
    for other in [(), ("encoder_0",), (*FROZEN, "head")]:
        target = experiment.Experiment(make_config(frozen=other)).abstract_state().opt_state
        with pytest.raises(ValueError, match="config.frozen .* differs from the run"):
            optim.check_saved_optimizer_state(saved, target)
