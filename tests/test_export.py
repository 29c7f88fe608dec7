"""ONNX export: onnxruntime gives lcseg's probabilities for every model of the zoo.

References are lcseg's own jitted prediction (``predict_step`` for classes, the
predictor's window function for probabilities) on the same pixels, and onnx /
onnxruntime for reading the file; the sliding-window loop that drives the exported model
is written here with numpy alone, as a plugin would. Each zoo model is exported once
(module fixture); one tiny training run serves the command-line, metadata, whole-scene
and bad-input tests.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import optax
import pytest

from configs import test_models
from datasets.synthetic.synthetic_dataset_builder import generate_scene
from lcseg import export, predict, provenance, train
from lcseg.data import get_metadata
from lcseg.experiment import Experiment, TrainState, compute_dtype, inference_variables
from lcseg.workdir import load_config
from tests.conftest import run_python
from tests.test_train import tiny_config

TILE = 64


def session(model):
    return onnxruntime.InferenceSession(model.SerializeToString(),
                                        providers=["CPUExecutionProvider"])


def run_onnx(sess, images):
    """uint8 NHWC images -> float32 NHWC probabilities, through the exported contract."""
    inputs = (images.astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2)
    return sess.run(["probabilities"], {"image": inputs})[0].transpose(0, 2, 3, 1)


def lcseg_probabilities(experiment, state, images):
    """lcseg.predict's probabilities of whole windows (no TTA, uniform weights)."""
    config = experiment.config
    function = jax.jit(lambda variables, x: predict.weighted_window_probabilities(
        variables, x, model=experiment.model, mean=tuple(config.dataset.mean),
        std=tuple(config.dataset.std), dtype=compute_dtype(config),
        transforms=predict.tta_transforms("none"),
        weights=np.ones(images.shape[1:3], np.float32)))
    return np.asarray(function(inference_variables(state), images))


def make_images(height=TILE, width=TILE):
    """Two random images and two synthetic-dataset crops, uint8 ``[4, H, W, 3]``."""
    rng = np.random.default_rng(0)
    random = rng.integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    scenes = [generate_scene("test", i)["image"][:height, :width] for i in range(2)]
    return np.concatenate([random, np.stack(scenes)])


def decided(probabilities, gap=1e-5):
    """Pixels whose two most probable classes differ by more than ``gap`` (not ties)."""
    top = np.sort(probabilities, axis=-1)
    return top[..., -1] - top[..., -2] > gap


def inference_ready_state(experiment, seed=0):
    """A train state with random parameters, BatchNorm statistics and EMA parameters.

    Drawn in numpy from the model's variable shapes (``jax.eval_shape``: nothing is
    compiled, which on this CPU is most of an initialisation's time). Statistics other
    than the fresh ones (mean 0, variance 1) catch a BatchNorm exported in training mode
    or without its statistics; EMA parameters that differ from the parameters catch an
    export of the wrong ones.
    """
    config = experiment.config
    size = config.eval_tile_size
    shapes = jax.eval_shape(lambda: experiment.model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "mean":
            return rng.normal(0.0, 0.3, shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if name == "kernel":  # He-like scale keeps activations of order one
            fan_in = max(1, int(np.prod(shape[:-1])))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        if name == "scale":
            return (1.0 + rng.normal(0.0, 0.1, shape)).astype(np.float32)
        return rng.normal(0.0, 0.1, shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    ema = jax.tree.map(lambda p: p * rng.uniform(0.8, 1.2, p.shape).astype(np.float32),
                       variables["params"])
    return TrainState.create(apply_fn=experiment.model.apply, params=variables["params"],
                             tx=optax.identity(), batch_stats=variables.get("batch_stats", {}),
                             rng=jax.random.key(seed), ema_params=ema, tracker={})


# ---------------------------------------------------------------------------------------
# Every model of the zoo.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(test_models.TINY_MODELS))
def exported(request):
    config = test_models.get_config(request.param)
    experiment = Experiment(config)
    state = inference_ready_state(experiment)
    model = export.export_state(config, state, step=7, tile=TILE, batch="dynamic")
    return experiment, state, model, session(model)


def test_onnx_probabilities_equal_lcseg_predictions(exported):
    experiment, state, model, sess = exported
    images = make_images()
    expected = lcseg_probabilities(experiment, state, images)
    actual = run_onnx(sess, images)
    assert actual.shape == expected.shape == (4, TILE, TILE, experiment.metadata.num_classes)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
    # Classes as lcseg's predict_step gives them, except where two classes tie.
    classes = np.asarray(experiment.predict_step(state, images))
    mask = decided(expected)
    assert mask.mean() > 0.5  # ties are the exception
    np.testing.assert_array_equal(actual.argmax(-1)[mask], classes[mask])
    # The batch size is the runtime's choice: one image alone gives the same answer.
    np.testing.assert_allclose(run_onnx(sess, images[2:3]), actual[2:3], rtol=0, atol=1e-5)


def test_graph_is_float32_with_the_documented_contract(exported):
    _, _, model, _ = exported
    (inputs,), (outputs,) = model.graph.input, model.graph.output
    assert (inputs.name, outputs.name) == ("image", "probabilities")
    assert inputs.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inputs.type.tensor_type.shape.dim]
    assert dims[1:] == [3, TILE, TILE] and isinstance(dims[0], str)  # dynamic batch
    assert {t.data_type for t in model.graph.initializer} <= {
        onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.INT32,
        onnx.TensorProto.BOOL}
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [
        export.OPSET]


def test_bfloat16_run_exports_in_float32_close_to_its_bfloat16_predictions():
    config = test_models.get_config("unet")
    config.half_precision = True
    experiment = Experiment(config)
    state = inference_ready_state(experiment, seed=1)
    sess = session(export.export_state(config, state, step=1, tile=TILE))
    images = make_images()[2:3]
    actual = run_onnx(sess, images)
    # Exactly the float32 evaluation of the same weights...
    float32 = config.copy_and_resolve_references()
    float32.half_precision = False
    np.testing.assert_allclose(
        actual, lcseg_probabilities(Experiment(float32), state, images), rtol=0, atol=1e-4)
    # ...and within bfloat16 rounding of the run's own bfloat16 predictions, by the
    # tolerance of tests/test_models.py (on logits: log-probabilities centred per pixel).
    half = lcseg_probabilities(experiment, state, images)

    def centred(p):
        log = np.log(np.maximum(p, 1e-30))
        return log - log.mean(-1, keepdims=True)

    def rms(x):
        return float(np.sqrt(np.mean(np.square(x))))

    assert rms(centred(actual) - centred(half)) < 0.03 * rms(centred(actual))
    assert np.abs(actual - half).max() > 1e-6  # the reference really was bfloat16


def test_metadata_resolution_follows_dataset_and_downscale():
    config = test_models.get_config("unet")
    config.dataset.name = "deepglobe"
    config.data.downscale = 0.5
    props = export.metadata_props(config, step=3, tile=64, batch=1)
    assert json.loads(props["resolution"]) == 100.0  # 50 cm/px images at half size
    config.dataset.name = "synthetic"
    assert "resolution" not in export.metadata_props(config, step=3, tile=64, batch=1)


# ---------------------------------------------------------------------------------------
# From a training workdir: command line, metadata, a whole scene, bad input.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_workdir(synthetic_data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(tiny_config(synthetic_data_dir, num_train_steps=3), workdir)
    return workdir


@pytest.fixture(scope="module")
def workdir_model(trained_workdir, tmp_path_factory):
    """The command line's export of the run's best checkpoint, dynamic batch."""
    path = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    result = run_python(["-m", "lcseg.export", "--workdir", trained_workdir, "--output", path,
                         "--batch", "dynamic"])
    assert "Wrote" in result.stdout
    # The console holds lcseg's lines only (issue 24): not the converter's parameter dump.
    assert "Converting JAX function" not in result.stderr
    assert all(len(line) <= 160 for line in (result.stdout + result.stderr).splitlines())
    return path


def test_metadata_read_back_with_onnx(trained_workdir, workdir_model):
    props = {p.key: p.value for p in onnx.load(workdir_model).metadata_props}
    config = load_config(trained_workdir)
    metadata = get_metadata("synthetic")
    # Deepness parses each of its keys with json.loads.
    deepness = {key: json.loads(props[key]) for key in (
        "model_type", "class_names", "tile_size", "tiles_size", "tiles_overlap", "seg_thresh",
        "seg_small_segment")}
    assert deepness["model_type"] == "Segmentor"
    assert deepness["class_names"] == {str(i): name for i, name in
                                       enumerate(metadata.class_names)}
    assert deepness["tile_size"] == deepness["tiles_size"] == config.eval_tile_size
    assert 0 <= deepness["tiles_overlap"] < 100 and deepness["seg_thresh"] == 0.0
    prefix = provenance.KEY_PREFIX
    assert props[prefix + "version"] == provenance.lcseg_version()
    assert props[prefix + "model"] == "unet" and props[prefix + "dataset"] == "synthetic"
    assert props[prefix + "config_hash"] == provenance.config_hash(config)
    steps = sorted(int(s) for s in os.listdir(os.path.join(trained_workdir, "checkpoints"))
                   if s.isdigit())
    assert props[prefix + "checkpoint_step"] == str(steps[-1])  # the one evaluated step
    assert props[prefix + "batch"] == "dynamic"
    assert json.loads(props[prefix + "class_colours"]) == {
        str(i): list(c) for i, c in enumerate(metadata.palette)}


def numpy_sliding_window(sess, image, *, tile, overlap=0.5, floor=1e-3):
    """A plugin's loop: reflect-padded windows, each weighted by a smooth positive bump.

    Written with numpy and onnxruntime only, from lcseg.predict's documented geometry
    (stride = tile * (1 - overlap), half the overlap of reflect padding, weights
    ``floor + (1 - floor) sin^2``) rather than from its code.
    """
    height, width = image.shape[:2]
    stride = round(tile * (1 - overlap))
    margin = (tile - stride) // 2
    rows = 1 + max(0, -(-(height + 2 * margin - tile) // stride))
    cols = 1 + max(0, -(-(width + 2 * margin - tile) // stride))
    padded = np.pad(image, ((margin, margin + rows * stride + tile),
                            (margin, margin + cols * stride + tile), (0, 0)), mode="reflect")
    bump = floor + (1 - floor) * np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2
    weight = np.outer(bump, bump)
    sums = np.zeros(padded.shape[:2] + (0,))
    totals = np.zeros(padded.shape[:2])
    for r in range(rows):
        for c in range(cols):
            y, x = r * stride, c * stride
            window = padded[None, y:y + tile, x:x + tile]
            probabilities = run_onnx(sess, window)[0]
            if sums.shape[-1] == 0:
                sums = np.zeros(padded.shape[:2] + probabilities.shape[-1:])
            sums[y:y + tile, x:x + tile] += probabilities * weight[..., None]
            totals[y:y + tile, x:x + tile] += weight
    crop = (slice(margin, margin + height), slice(margin, margin + width))
    return sums[crop] / totals[crop][..., None]


def test_exported_model_in_a_numpy_loop_reproduces_lcseg_predict(trained_workdir,
                                                                  workdir_model):
    image = generate_scene("test", 3, size=150)["image"][:, :110]  # not square
    predictor = predict.Predictor.from_workdir(trained_workdir, tta="none")
    classes, expected = predict.predict_scene(predictor, image)
    sess = onnxruntime.InferenceSession(workdir_model, providers=["CPUExecutionProvider"])
    actual = numpy_sliding_window(sess, image, tile=predictor.window)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4)
    different = actual.argmax(-1) != classes
    assert different.sum() <= 5 and not (different & decided(expected)).any()


def test_bad_input_gives_one_clear_line_and_writes_nothing(trained_workdir, tmp_path):
    output = tmp_path / "model.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(open(os.path.join(trained_workdir,
                                                         "config.json")).read())
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        export.export_workdir(str(empty), str(output))
    with pytest.raises(FileNotFoundError, match="step 999"):
        export.export_workdir(trained_workdir, str(output), checkpoint=999)
    with pytest.raises(ValueError, match="multiple of its stride 2"):
        export.export_workdir(trained_workdir, str(output), tile=63)
    with pytest.raises(ValueError, match="--batch"):
        export.parse_batch("many")
    assert not output.exists()
    result = run_python(["-m", "lcseg.export", "--workdir", trained_workdir, "--output",
                         str(output), "--tile", "63"], check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("lcseg.export: error: --tile 63") and "Traceback" not in (
        result.stderr)
    assert not output.exists() and not os.path.exists(str(output) + ".tmp")

