"""Schedules, optimisers, gradient accumulation, EMA, reduce-on-plateau, early stopping,
the learning-rate finder and the model summary."""

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from lcseg import experiment, losses, lr_finder, optim, train
from tests.test_train import assert_trees_equal, tiny_config


def schedule_config(**overrides):
    config = test_config.get_config()
    config.learning_rate = 1.0
    config.num_train_steps = 100
    config.warmup_steps = 10
    config.end_learning_rate_factor = 0.1
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("name, expected", [
    # Warmup: linear from 0 to the peak over 10 steps, then the schedule proper.
    ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 99: 1.0}),
    # 'step': x0.1 at 60% and 85% of the run.
    ("step", {10: 1.0, 59: 1.0, 60: 0.1, 84: 0.1, 85: 0.01, 99: 0.01}),
    # cosine over the 90 post-warmup steps down to 0.1: 0.1 + 0.9 * (1 + cos(pi t / 90)) / 2
    ("cosine", {10: 1.0, 55: 0.1 + 0.9 * 0.5, 100: 0.1,
                40: 0.1 + 0.9 * (1 + np.cos(np.pi * 30 / 90)) / 2}),
    # linear from 1 to 0.1 over 90 steps
    ("linear", {10: 1.0, 55: 0.55, 100: 0.1}),
])
def test_schedule_values(name, expected):
    schedule = optim.learning_rate_schedule(schedule_config(schedule=name))
    for step, value in expected.items():
        assert float(schedule(step)) == pytest.approx(value, abs=1e-6), (name, step)


def test_onecycle_starts_low_peaks_at_warmup_end_and_ends_near_zero():
    schedule = optim.learning_rate_schedule(schedule_config(schedule="onecycle"))
    assert float(schedule(0)) == pytest.approx(1.0 / 25)  # div_factor 25
    assert float(schedule(10)) == pytest.approx(1.0)  # peak at the end of the warmup
    assert float(schedule(100)) == pytest.approx(1.0 / 25 / 1e4, rel=1e-3)


def test_unknown_schedule_and_optimizer_name_the_valid_ones():
    with pytest.raises(ValueError, match="schedule 'cosin'.*cosine"):
        optim.learning_rate_schedule(schedule_config(schedule="cosin"))
    with pytest.raises(ValueError, match="optimizer 'adagrad'.*sgd"):
        optim.build_optimizer(schedule_config(optimizer="adagrad"))


class PixelLinear(nn.Module):
    """A BatchNorm-free model (1x1 conv): accumulation is then exactly the large batch."""

    @nn.compact
    def __call__(self, x, train=False):
        del train
        return nn.Conv(3, (1, 1))(x)


def _linear_state(config):
    model = PixelLinear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    return experiment.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optim.build_optimizer(config),
        batch_stats={}, rng=jax.random.key(1),
        ema_params=variables["params"] if config.ema_decay > 0 else None,
        tracker=experiment.init_tracker())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradient_accumulation_gives_the_large_batch_update(optimizer):
    config = schedule_config(optimizer=optimizer, schedule="constant", warmup_steps=0,
                             learning_rate=0.1, grad_clip_norm=1.0)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 4, 4, 3)), jnp.uint8),
             "label": jnp.asarray(rng.integers(0, 3, (8, 4, 4)), jnp.uint8)}
    loss_fn = losses.make_loss_fn({"cross_entropy": 1.0}, num_classes=3)
    step = functools.partial(experiment.train_step, loss_fn=loss_fn,
                             schedule=optim.learning_rate_schedule(config),
                             mean=(0.5,) * 3, std=(0.25,) * 3, dtype=jnp.float32)
    whole, whole_metrics = jax.jit(step)(_linear_state(config), batch)
    accumulated, accumulated_metrics = jax.jit(functools.partial(step, grad_accum_steps=4))(
        _linear_state(config), batch)
    assert_trees_equal(accumulated.params, whole.params, rtol=1e-6, atol=1e-7)
    assert float(accumulated_metrics["loss"]) == pytest.approx(float(whole_metrics["loss"]))


def test_ema_follows_the_parameters():
    config = schedule_config(schedule="constant", warmup_steps=0, learning_rate=0.1,
                             ema_decay=0.5)
    state = _linear_state(config)
    loss_fn = losses.make_loss_fn({"cross_entropy": 1.0}, num_classes=3)
    step = jax.jit(functools.partial(experiment.train_step, loss_fn=loss_fn,
                                     schedule=optim.learning_rate_schedule(config),
                                     mean=(0.5,) * 3, std=(0.25,) * 3, dtype=jnp.float32,
                                     ema_decay=0.5))
    batch = {"image": jnp.full((2, 4, 4, 3), 100, jnp.uint8),
             "label": jnp.ones((2, 4, 4), jnp.uint8)}
    history = [state.params]
    for _ in range(2):
        state, _ = step(state, batch)
        history.append(state.params)
    # ema_2 = 0.5 * (0.5 * p0 + 0.5 * p1) + 0.5 * p2
    expected = jax.tree.map(lambda p0, p1, p2: 0.25 * p0 + 0.25 * p1 + 0.5 * p2, *history)
    assert_trees_equal(state.ema_params, expected, rtol=1e-6)
    assert experiment.inference_variables(state)["params"] is state.ema_params


def test_plateau_tracker_reduces_and_counts_like_pytorch():
    config = schedule_config(plateau_patience=2, plateau_factor=0.5, plateau_min_scale=0.2)
    tracker = experiment.init_tracker()
    scales, since_best = [], []
    for miou in [0.5, 0.6, 0.6, 0.55, 0.59, 0.58, 0.7, 0.6, 0.6, 0.6, 0.6]:
        tracker = train.update_tracker(tracker, miou, config)
        scales.append(float(tracker["lr_scale"]))
        since_best.append(int(tracker["evals_since_best"]))
    assert scales == pytest.approx([1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2, 0.2])
    assert since_best == [0, 0, 1, 2, 3, 4, 0, 1, 2, 3, 4]


def eval_miou(workdir, step) -> float:
    with open(os.path.join(workdir, "eval", f"validation-{step}.json")) as f:
        return json.load(f)["miou"]


def test_resume_in_the_middle_of_reduce_on_plateau_continues_the_same_run(
        synthetic_data_dir, tmp_path):
    # A constant schedule, so that the first half (run with num_train_steps=4) is exactly
    # the first half of the straight run. A zero learning rate keeps mIoU nearly flat
    # (only BatchNorm statistics move), so with patience 1 the rule acts.
    options = dict(num_train_steps=8, eval_every_steps=2, checkpoint_every_steps=2,
                   plateau_patience=1, plateau_factor=0.5, warmup_steps=0,
                   schedule="constant", learning_rate=0.0)
    straight = train.train_and_evaluate(tiny_config(synthetic_data_dir, **options),
                                        str(tmp_path / "straight"))
    resumed_dir = str(tmp_path / "resumed")
    train.train_and_evaluate(tiny_config(synthetic_data_dir, **{**options,
                                                                "num_train_steps": 4}),
                             resumed_dir)
    resumed = train.train_and_evaluate(tiny_config(synthetic_data_dir, **options), resumed_dir)
    config = tiny_config(synthetic_data_dir, **options)
    replayed = experiment.init_tracker()
    for step in (2, 4, 6, 8):  # the tracker is what the evaluations say
        replayed = train.update_tracker(replayed, eval_miou(tmp_path / "straight", step),
                                        config)
    assert float(replayed["lr_scale"]) < 1.0  # the plateau rule did act
    assert_trees_equal(jax.device_get(straight.tracker), replayed)
    assert_trees_equal(jax.device_get(resumed.tracker), jax.device_get(straight.tracker))
    assert_trees_equal(jax.device_get(resumed.params), jax.device_get(straight.params),
                       rtol=1e-6, atol=1e-7)


def test_early_stopping_stops_and_keeps_the_best_checkpoint(synthetic_data_dir, tmp_path):
    config = tiny_config(synthetic_data_dir, num_train_steps=50, eval_every_steps=2,
                         checkpoint_every_steps=100, early_stopping_patience=2,
                         learning_rate=0.0, schedule="constant")
    state = train.train_and_evaluate(config, str(tmp_path))
    # With a zero learning rate mIoU stays nearly flat: the run must stop at the first
    # evaluation that is the second in a row without a new best.
    history, best, stop = {}, -1.0, None
    for step in range(2, 51, 2):
        history[step] = eval_miou(tmp_path, step)
        if history[step] > best:
            best, since_best = history[step], 0
        else:
            since_best += 1
        if since_best == 2:
            stop = step
            break
    assert stop is not None and int(state.step) == stop < 50
    assert not os.path.exists(tmp_path / "eval" / f"validation-{stop + 2}.json")
    checkpointer = train.checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpointer.latest_step() == stop
    assert checkpointer.best_step() == max(history, key=history.get)
    assert checkpointer.normalisation(stop) == {"mean": list(config.dataset.mean),
                                                "std": list(config.dataset.std)}
    with open(tmp_path / "summary.txt") as f:
        summary = f.read()
    assert "total" in summary and "gflops_per_step" in summary


def test_lr_finder_writes_plot_and_suggests_a_rate(synthetic_data_dir, tmp_path):
    result = lr_finder.run(tiny_config(synthetic_data_dir), str(tmp_path), min_lr=1e-5,
                           max_lr=10.0, steps=25)
    assert os.path.getsize(result["plot"]) > 10_000
    assert 1e-5 * 0.999 <= result["suggested_learning_rate"] <= 10.0 * 1.001  # (float32)
    assert len(result["losses"]) <= 25


def test_lr_finder_suggestion_on_a_known_curve():
    rates = np.logspace(-5, 0, 51)
    # Loss falls fastest at 1e-3 (a logistic in log lr), minimum at 1e-1.
    log_rates = np.log10(rates)
    loss = 2 - 1.5 / (1 + np.exp(-4 * (log_rates + 3))) + np.where(log_rates > -1,
                                                                     (log_rates + 1) * 5, 0)
    assert lr_finder.suggest(rates, loss) == pytest.approx(1e-3, rel=0.3)


def test_pretrained_encoder_weights_and_their_normalisation_are_used(synthetic_data_dir,
                                                                     tmp_path):
    from configs import test_models
    from lcseg.models import import_weights
    from tests.test_models import encoder_weights

    source, state_dict = encoder_weights("resnet18", 4)
    np.savez(tmp_path / "resnet18.npz", **state_dict)
    converted = str(tmp_path / "converted.npz")
    import_weights.main([str(tmp_path / "resnet18.npz"), converted, "--mean", "0.4", "0.5",
                         "0.6", "--std", "0.1", "0.2", "0.3"])
    config = test_models.get_config("deeplabv3plus")
    config.dataset.data_dir = synthetic_data_dir
    config.model.pretrained = converted
    config.learning_rate, config.schedule, config.num_train_steps = 0.0, "constant", 2
    config.eval_every_steps = config.checkpoint_every_steps = 2
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    # A zero learning rate leaves the imported encoder weights exactly as loaded.
    assert_trees_equal(jax.device_get(state.params["encoder"]), source["params"])
    saved = train.load_config(workdir)
    assert tuple(saved.dataset.mean) == (0.4, 0.5, 0.6)
    assert tuple(saved.dataset.std) == (0.1, 0.2, 0.3)
    checkpointer = train.checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.normalisation(2) == {"mean": [0.4, 0.5, 0.6], "std": [0.1, 0.2, 0.3]}
