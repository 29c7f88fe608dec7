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
from lcseg import checkpoints, experiment, losses, lr_finder, optim, train
from lcseg import workdir as workdir_lib
from lcseg.tracker import check_tracker_config, update_tracker
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


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_plateau_scale_scales_the_parameter_update(optimizer):
    """The tracker's lr_scale reaches the update: 0.5 moves the parameters half as far.

    From zero parameters the first update is ``-lr * g`` (SGD: momentum and L2 decay add
    nothing yet) or ``-lr * m / (sqrt(v) + eps)`` (AdamW: decoupled decay of zero
    parameters is zero), linear in the lr; halving a float32 is exact, so the parameters
    after one step must be exactly half those of the unscaled step.
    """
    config = schedule_config(optimizer=optimizer, schedule="constant", warmup_steps=0,
                             learning_rate=0.1)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 4, 4, 3)), jnp.uint8),
             "label": jnp.asarray(rng.integers(0, 3, (2, 4, 4)), jnp.uint8)}
    step = jax.jit(functools.partial(
        experiment.train_step, loss_fn=losses.make_loss_fn({"cross_entropy": 1.0},
                                                           num_classes=3),
        schedule=optim.learning_rate_schedule(config), mean=(0.5,) * 3, std=(0.25,) * 3,
        dtype=jnp.float32))
    moved = {}
    for scale in (1.0, 0.5):
        state = _linear_state(config)
        state = state.replace(
            params=jax.tree.map(jnp.zeros_like, state.params),
            tracker={**state.tracker, "lr_scale": jnp.asarray(scale, jnp.float32)})
        state, metrics = step(state, batch)
        assert float(metrics["learning_rate"]) == pytest.approx(0.1 * scale)
        moved[scale] = jax.device_get(state.params)
    assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(moved[1.0]))
    assert_trees_equal(moved[0.5], jax.tree.map(lambda x: x / 2, moved[1.0]))


def torch_plateau(mious, *, patience, factor, min_scale, threshold, threshold_mode, cooldown,
                  base_lr=1.0):
    """PyTorch's own ReduceLROnPlateau, stepped once per mIoU: its lr / base_lr and state.

    ``min_lr`` and ``eps`` scale with ``base_lr``: lcseg's multiplier acts on the lr.
    """
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=factor, patience=patience, threshold=threshold,
        threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_scale * base_lr,
        eps=1e-8 * base_lr)
    history = []
    for miou in mious:
        scheduler.step(miou)
        history.append({"scale": optimizer.param_groups[0]["lr"] / base_lr,
                        "bad": scheduler.num_bad_epochs,
                        "cooldown": scheduler.cooldown_counter, "best": scheduler.best})
    return history


def lcseg_plateau(mious, **options):
    """lcseg's tracker after each mIoU, in the same terms as ``torch_plateau``."""
    config = schedule_config(
        plateau_patience=options["patience"], plateau_factor=options["factor"],
        plateau_min_scale=options["min_scale"], plateau_threshold=options["threshold"],
        plateau_threshold_mode=options["threshold_mode"],
        plateau_cooldown=options["cooldown"])
    tracker, history = experiment.init_tracker(), []
    for miou in mious:
        tracker = update_tracker(tracker, miou, config)
        history.append({"scale": float(tracker["lr_scale"]), "bad": int(tracker["plateau_count"]),
                        "cooldown": int(tracker["cooldown_count"]),
                        "best": float(tracker["plateau_best"])})
    return history


def assert_same_plateau_history(mious, **options):
    # float32 values: the tracker keeps the mIoU in float32, and on those the decisions
    # must be PyTorch's exactly; the scale is float32 too (relative error ~6e-8 a step).
    mious = [float(np.float32(m)) for m in mious]
    expected = torch_plateau(mious, **options)
    actual = lcseg_plateau(mious, **options)
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert got["scale"] == pytest.approx(want["scale"], rel=1e-6), (index, mious[index])
        assert (got["bad"], got["cooldown"], got["best"]) == (
            want["bad"], want["cooldown"], want["best"]), (index, mious[index])
    return [step["scale"] for step in expected]


FLAT = [0.6] * 12
PLATEAU_CASES = {
    # Plateaus and exact ties (a tie is no improvement), with one new best in between.
    "plateaus_and_ties": ([0.5, 0.6, 0.6, 0.55, 0.59, 0.58, 0.7, 0.6, 0.6, 0.6, 0.6, 0.7],
                         dict(patience=2, factor=0.5, min_scale=0.2, threshold=0.0,
                              threshold_mode="rel", cooldown=0)),
    # Every evaluation a new best by a hair: below the default relative threshold 1e-4
    # (0.5 -> 0.50005 needed), so they count as evaluations without improvement.
    "tiny_gains_under_rel_threshold": (
        [0.5, 0.50001, 0.50002, 0.50003, 0.50004, 0.50006, 0.50007, 0.50008, 0.50009],
        dict(patience=1, factor=0.5, min_scale=1e-3, threshold=1e-4, threshold_mode="rel",
             cooldown=0)),
    "abs_threshold": ([0.3, 0.305, 0.309, 0.311, 0.315, 0.32, 0.33, 0.335, 0.339, 0.34],
                      dict(patience=1, factor=0.5, min_scale=1e-3, threshold=0.01,
                           threshold_mode="abs", cooldown=0)),
    "cooldown": (FLAT[:3] + [0.7] + FLAT,
                 dict(patience=1, factor=0.5, min_scale=1e-3, threshold=1e-4,
                      threshold_mode="rel", cooldown=2)),
    # Down to the floor (0.1 ** 3 > 2e-3 > 0.1 ** 4), then held there.
    "reaching_min": (FLAT, dict(patience=1, factor=0.1, min_scale=2e-3, threshold=1e-4,
                                threshold_mode="rel", cooldown=1)),
    # A floor 5e-9 under the scale 1e-4 (after 4 reductions): that reduction is below
    # eps, PyTorch skips it (at a relative 5e-5, the float32 scale shows it).
    "eps_skips_a_tiny_reduction": (FLAT, dict(patience=1, factor=0.1,
                                              min_scale=1e-4 - 5e-9, threshold=0.0,
                                              threshold_mode="abs", cooldown=0)),
}


@pytest.mark.parametrize("case", sorted(PLATEAU_CASES))
def test_reduce_on_plateau_is_pytorchs(case):
    mious, options = PLATEAU_CASES[case]
    scales = assert_same_plateau_history(mious, **options)
    assert scales[-1] < 1.0  # every case reduces at least once...
    if case == "reaching_min":
        assert scales[-1] == pytest.approx(2e-3)  # ...this one to its floor
    if case == "cooldown":  # ...and this one waits 2 evaluations more between reductions
        reductions = [i for i in range(1, len(scales)) if scales[i] < scales[i - 1]]
        assert np.diff(reductions).min() == 1 + 2 + 1


def test_reduce_on_plateau_is_pytorchs_on_random_histories():
    """Random mIoU histories (ties and sub-threshold gains included) and settings."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        steps = rng.integers(5, 30)
        # Few distinct values (ties), small random walks (gains around the thresholds).
        if rng.random() < 0.5:
            mious = rng.choice([0.4, 0.5, 0.50003, 0.6], size=steps)
        else:
            mious = 0.5 + np.cumsum(rng.normal(0, 3e-4, size=steps))
        options = dict(patience=int(rng.integers(1, 4)), factor=float(rng.choice([0.1, 0.5])),
                       min_scale=float(rng.choice([0.0, 1e-3, 0.3])),
                       threshold=float(rng.choice([0.0, 1e-4, 1e-3])),
                       threshold_mode=str(rng.choice(["rel", "abs"])),
                       cooldown=int(rng.integers(0, 3)))
        assert_same_plateau_history(mious.tolist(), **options)


def test_plateau_scale_matches_pytorch_lr_for_a_constant_schedule():
    # The lcseg lr (learning_rate * scale, constant schedule) is PyTorch's lr with
    # min_lr = plateau_min_scale * learning_rate.
    mious, options = PLATEAU_CASES["reaching_min"]
    base_lr = 0.03
    expected = torch_plateau([float(np.float32(m)) for m in mious], base_lr=base_lr, **options)
    actual = lcseg_plateau(mious, **options)
    np.testing.assert_allclose([base_lr * step["scale"] for step in actual],
                               [base_lr * step["scale"] for step in expected], rtol=1e-6)


def lightning_early_stopping(mious, patience):
    """PyTorch Lightning's ``EarlyStopping(monitor, mode='max', min_delta=0, patience)``,
    written out from its documented rule (``_evaluate_stopping_criteria``): the best
    starts at -inf; an evaluation improves when ``current - min_delta > best`` (mode
    'max' compares with ``torch.gt``), which resets ``wait_count`` to 0, otherwise
    ``wait_count += 1`` and training stops once ``wait_count >= patience``.
    """
    best, wait_count, history = -np.inf, 0, []
    for current in mious:
        if current - 0.0 > best:
            best, wait_count = current, 0
        else:
            wait_count += 1
        history.append((best, wait_count >= patience))
    return history


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_rule_is_lightnings(patience):
    # Tiny gains count (min_delta 0), ties do not; the plateau threshold plays no part.
    mious = [float(np.float32(m)) for m in
             [0.5, 0.5, 0.50001, 0.50001, 0.4, 0.50001, 0.6, 0.59, 0.6, 0.61, 0.61, 0.61]]
    config = schedule_config(early_stopping_patience=patience, plateau_patience=1,
                             plateau_threshold=0.1)
    tracker, history = experiment.init_tracker(), []
    for miou in mious:
        tracker = update_tracker(tracker, miou, config)
        # train_and_evaluate's stopping condition
        history.append((float(tracker["best_miou"]),
                        bool(tracker["evals_since_best"] >= config.early_stopping_patience)))
    assert history == lightning_early_stopping(mious, patience)


@pytest.mark.parametrize("field, value", [
    ("plateau_patience", -1), ("plateau_cooldown", -2),
    ("plateau_factor", 1.0), ("plateau_factor", -0.5), ("plateau_min_scale", 2.0),
    ("plateau_threshold", -1e-4), ("plateau_threshold", float("nan")),
    ("plateau_threshold_mode", "relative"), ("early_stopping_patience", -1)])
def test_bad_plateau_and_early_stopping_values_name_the_field(field, value):
    config = schedule_config(**{field: value})
    with pytest.raises(ValueError, match=f"config.{field} "):
        check_tracker_config(config)
    with pytest.raises(ValueError, match=f"config.{field} "):
        update_tracker(experiment.init_tracker(), 0.5, config)


def test_bfloat16_training_steps_keep_float32_state_and_follow_float32(synthetic_data_dir):
    """half_precision: bfloat16 compute, float32 parameters, optimizer state, BatchNorm
    statistics and loss; a few steps stay close to the same steps in float32."""
    from lcseg import parallel
    from lcseg.data import open_split

    source = open_split("synthetic", "train", synthetic_data_dir)
    runs = {}
    for half in (True, False):
        # Plain SGD on one repeated batch: the loss falls at every step, and the update is
        # the gradient itself (no Adam normalisation to amplify rounding in tiny entries).
        config = tiny_config(synthetic_data_dir, half_precision=half, optimizer="sgd",
                             learning_rate=0.1, schedule="constant", warmup_steps=0)
        run = experiment.Experiment(config)
        batch = parallel.shard_batch(next(run.train_iterator(source)), run.mesh)
        state = run.init_state()
        initial = jax.device_get(state.params)
        if half:  # The model's convolutions really run in bfloat16.
            convolutions = [line for line in run.train_step.lower(state, batch).as_text()
                            .splitlines() if "stablehlo.convolution" in line]
            assert convolutions and all(line.rsplit("->", 1)[-1].strip().endswith("xbf16>")
                                        for line in convolutions)
        step_losses = []
        for _ in range(5):
            state, metrics = run.train_step(state, batch)
            assert metrics["loss"].dtype == jnp.float32
            step_losses.append(float(metrics["loss"]))
        for name, tree in (("params", state.params), ("opt_state", state.opt_state),
                           ("batch_stats", state.batch_stats)):
            floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
            assert floats and all(x.dtype == jnp.float32 for x in floats), name
        runs[half] = (np.asarray(step_losses), initial, jax.device_get(state))
    (losses_half, initial, half), (losses_full, _, full) = runs[True], runs[False]
    assert np.all(np.diff(losses_half) < 0) and losses_half[-1] < 0.7 * losses_half[0]

    def relative_rms(a, b):
        """RMS of a - b over RMS of b, over a whole tree."""
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        return np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b))
                       / sum(np.sum(y ** 2) for y in b))

    # bfloat16 keeps 8 significant bits: each rounding is off by up to 2^-9 (0.2%), and
    # these errors partly cancel over a layer's sums. Measured here: losses 0.1% apart,
    # parameter updates 1.2%, BatchNorm statistics 2% (the first layer's, near zero); the
    # bounds are ~5-10x that, while a wrong computation (a dropped term, a float16
    # overflow, an update from a different batch) is off by tens of percent.
    np.testing.assert_allclose(losses_half, losses_full, rtol=1e-2)
    updates_half, updates_full = (jax.tree.map(lambda p, p0: p - p0, s.params, initial)
                                  for s in (half, full))
    assert relative_rms(updates_half, updates_full) < 0.1
    for stat_half, stat_full in zip(jax.tree.leaves(half.batch_stats),
                                    jax.tree.leaves(full.batch_stats)):
        assert relative_rms(stat_half, stat_full) < 0.1


def eval_miou(workdir, step) -> float:
    with open(os.path.join(workdir, "eval", f"validation-{step}.json")) as f:
        return json.load(f)["miou"]


def test_resume_in_the_middle_of_reduce_on_plateau_continues_the_same_run(
        synthetic_data_dir, tmp_path):
    from tests.test_train import events_files, logged_steps

    # A constant schedule, so that the first part (run with num_train_steps=6) is exactly
    # the first part of the straight run. An absolute threshold of 1 makes every
    # evaluation after the first one without improvement (mIoU <= 1), whatever the model
    # does: with patience 1 the scale halves at step 6, whose checkpoint holds the
    # cooldown (2) that the resumed run must continue (1 left after step 8).
    options = dict(num_train_steps=8, eval_every_steps=2, checkpoint_every_steps=2,
                   plateau_patience=1, plateau_factor=0.5, plateau_threshold=1.0,
                   plateau_threshold_mode="abs", plateau_cooldown=2, warmup_steps=0,
                   schedule="constant", learning_rate=0.01)
    straight = train.train_and_evaluate(tiny_config(synthetic_data_dir, **options),
                                        str(tmp_path / "straight"))
    resumed_dir = str(tmp_path / "resumed")
    train.train_and_evaluate(tiny_config(synthetic_data_dir, **{**options,
                                                                "num_train_steps": 6}),
                             resumed_dir)
    before = events_files(resumed_dir)
    resumed = train.train_and_evaluate(tiny_config(synthetic_data_dir, **options), resumed_dir)
    (resumed_events,) = events_files(resumed_dir) - before
    assert logged_steps(resumed_events, "eval/miou") == [8]  # it did not start over
    config = tiny_config(synthetic_data_dir, **options)
    replayed = experiment.init_tracker()
    for step in (2, 4, 6, 8):  # the tracker is what the evaluations say
        replayed = update_tracker(replayed, eval_miou(tmp_path / "straight", step),
                                        config)
    assert float(replayed["lr_scale"]) == 0.5 and int(replayed["cooldown_count"]) == 1
    assert_trees_equal(jax.device_get(straight.tracker), replayed)
    assert_trees_equal(jax.device_get(resumed.tracker), jax.device_get(straight.tracker))
    # Same tracker, same lr at steps 7 and 8: the same parameters.
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
    checkpointer = checkpoints.Checkpointer(str(tmp_path / "checkpoints"))
    assert checkpointer.latest_step() == stop
    assert checkpointer.best_step() == max(history, key=history.get)
    assert checkpointer.normalisation(stop) == {"mean": list(config.dataset.mean),
                                                "std": list(config.dataset.std)}
    with open(tmp_path / "summary.txt") as f:
        summary = f.read()
    assert "total" in summary and "gflops_per_step" in summary


def test_lr_finder_writes_plot_and_suggests_a_rate(synthetic_data_dir, tmp_path):
    # A low divergence factor, so that the sweep to lr 10 stops early (the loss of this
    # tiny run drifts up by more than 10% long before).
    steps, divergence = 25, 1.1
    result = lr_finder.run(tiny_config(synthetic_data_dir), str(tmp_path), min_lr=1e-5,
                           max_lr=10.0, steps=steps, divergence=divergence)
    assert os.path.getsize(result["plot"]) > 10_000
    losses = np.asarray(result["losses"])
    ran = len(losses)
    assert 2 <= ran < steps and np.all(np.isfinite(losses))
    # Rates grow exponentially from min_lr, by (max_lr / min_lr) ** (1 / (steps - 1)).
    np.testing.assert_allclose(result["learning_rates"],
                               1e-5 * 1e6 ** (np.arange(ran) / (steps - 1)), rtol=1e-5)
    # fastai's bias-corrected moving average, beta 0.9, written out here.
    average, smoothed = 0.0, []
    for count, loss in enumerate(losses, start=1):
        average = 0.9 * average + 0.1 * loss
        smoothed.append(average / (1 - 0.9 ** count))
    np.testing.assert_allclose(result["smoothed"], smoothed, rtol=1e-6)
    # It stopped at the first step whose smoothed loss exceeds divergence x the minimum.
    assert all(smoothed[i] <= divergence * min(smoothed[:i + 1]) for i in range(ran - 1))
    assert smoothed[-1] > divergence * min(smoothed)
    assert result["suggested_learning_rate"] == lr_finder.suggest(
        np.asarray(result["learning_rates"]), np.asarray(smoothed))
    with open(tmp_path / "lr_finder.json") as f:
        assert json.load(f) == {k: v for k, v in result.items() if k != "plot"}


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
    import_weights.convert(str(tmp_path / "resnet18.npz"), converted, mean=(0.4, 0.5, 0.6),
                           std=(0.1, 0.2, 0.3))
    config = test_models.get_config("deeplabv3plus")
    config.dataset.data_dir = synthetic_data_dir
    config.model.pretrained = converted
    config.learning_rate, config.schedule, config.num_train_steps = 0.0, "constant", 2
    config.eval_every_steps = config.checkpoint_every_steps = 2
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    # A zero learning rate leaves the imported encoder weights exactly as loaded.
    assert_trees_equal(jax.device_get(state.params["encoder"]), source["params"])
    saved = workdir_lib.load_config(workdir)
    assert tuple(saved.dataset.mean) == (0.4, 0.5, 0.6)
    assert tuple(saved.dataset.std) == (0.1, 0.2, 0.3)
    checkpointer = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert checkpointer.normalisation(2) == {"mean": [0.4, 0.5, 0.6], "std": [0.1, 0.2, 0.3]}


def test_checkpoint_without_the_newer_tracker_entries_restores_them_filled_in(tmp_path):
    """A checkpoint of lcseg before plateau_best / cooldown_count resumes as that run.

    That lcseg counted a plateau improvement as a new strict best and had no cooldown:
    ``plateau_best`` is its ``best_miou`` and ``cooldown_count`` 0.
    """
    config = schedule_config(optimizer="sgd", schedule="constant", warmup_steps=0,
                             learning_rate=0.1)
    state = _linear_state(config)
    old_tracker = {"best_miou": jnp.asarray(0.7, jnp.float32),
                   "evals_since_best": jnp.asarray(2, jnp.int32),
                   "plateau_count": jnp.asarray(2, jnp.int32),
                   "lr_scale": jnp.asarray(0.5, jnp.float32)}
    writer = checkpoints.Checkpointer(str(tmp_path))
    writer.save(5, state.replace(tracker=old_tracker))
    writer.wait()
    restored = checkpoints.Checkpointer(str(tmp_path), read_only=True).restore(5, state)
    tracker = jax.device_get(restored.tracker)
    assert set(tracker) == set(experiment.init_tracker())
    assert tracker["plateau_best"] == np.float32(0.7) and tracker["cooldown_count"] == 0
    for key, value in old_tracker.items():
        assert tracker[key] == value
    np.testing.assert_array_equal(jax.device_get(restored.params["Conv_0"]["kernel"]),
                                  jax.device_get(state.params["Conv_0"]["kernel"]))
