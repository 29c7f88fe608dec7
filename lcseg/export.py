"""ONNX export: a trained checkpoint as a model that QGIS, onnxruntime and any runtime run.

    python -m lcseg.export --workdir runs/demo --output demo.onnx
        [--checkpoint best|latest|STEP] [--tile 512] [--batch 1|N|dynamic]

The graph is the checkpoint's inference function (its EMA parameters where the run kept
them, BatchNorm in inference mode), with the run's input normalisation before it and the
softmax after it, computed in float32 whatever precision the run trained in.

Input/output contract (QGIS's Deepness plugin's, checked in its source: it feeds RGB tiles
scaled to [0, 1], NCHW, and reads per-class probabilities):

    input  'image':          float32 [N, 3, tile, tile], RGB, pixel / 255 (values in [0, 1])
    output 'probabilities':  float32 [N, C, tile, tile], softmax over the C classes

``N`` is fixed (``--batch N``, default 1) or left to the runtime (``--batch dynamic``).
The tile is fixed: several models compute index tables and attention masks from the tile
size while the graph is traced, so a graph for one size is not valid at another. It must
be a multiple of the model's stride (``model_stride``): lcseg's models reflect-pad other
sizes at the bottom and right, which a runtime would silently see as a different model at
the tile's border.

Metadata (ONNX ``metadata_props``, all strings, Deepness's as JSON values since it parses
them with ``json.loads``): Deepness's keys (``model_type`` '"Segmentor"', ``class_names``
``{"0": name, ...}``, ``resolution`` in cm/px where the dataset's is known, ``tile_size``
and ``tiles_size``, ``tiles_overlap`` in percent, ``seg_thresh``, ``seg_small_segment``)
and lcseg's own under ``lcseg:`` (``lcseg.provenance``: version, model, dataset, config
hash, checkpoint step, export options; plus ``class_colours`` and the contract above).

Converter: jax2onnx (jaxpr -> ONNX, opset ``OPSET``). TensorFlow's route does not work
with this JAX: ``jax2tf`` serialises natively only (one ``XlaCallModule`` op holding
StableHLO), which tf2onnx 1.17 cannot convert. jax2onnx replaces some Flax layers with its
own ONNX ops while tracing; two of those replacements are wrong for lcseg's models (see
``_converter_fixes``), so they are corrected or turned off for the export, and every
model's ONNX output is tested against lcseg's own prediction (tests/test_export.py).
jax2onnx declares a dependency on orbax-checkpoint<0.11.37 that it never imports and that
conflicts with lcseg's pin, so it is installed without dependencies:
``pip install --no-deps -r requirements-export.txt``.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lcseg.data.metadata import DatasetMetadata, get_metadata
from lcseg.experiment import TrainState, inference_variables
from lcseg.models import create_model
from lcseg.provenance import KEY_PREFIX, provenance

OPSET = 18  # onnxruntime >= 1.14 (2023) runs it: old enough for QGIS installs.
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
INPUT_CONTRACT = "float32 [N, 3, H, W] RGB, pixel / 255 (values in [0, 1])"
OUTPUT_CONTRACT = "float32 [N, C, H, W] softmax probabilities"
# lcseg.predict's default window overlap (0.5), as Deepness's percentage.
TILES_OVERLAP_PERCENT = 50
BATCH_DYNAMIC = "dynamic"


# ---------------------------------------------------------------------------------------
# The function that becomes the graph.
# ---------------------------------------------------------------------------------------


def model_stride(model: Any) -> int:
    """The multiple of which a model's input sides must be to need no internal padding.

    Args:
      model: a module built by ``lcseg.models.create_model``.

    Returns:
      The stride in pixels (the coarsest feature map's, where the model pads to it).
    """
    from lcseg.models import deeplab, fpn, hypercolumn, unet, unetpp

    if isinstance(model, unet.UNet):
        return 2 ** (len(model.channels) - 1)
    if isinstance(model, unetpp.UNetPlusPlus):
        return unetpp.ENCODER_STRIDE
    if isinstance(model, deeplab.DeepLabV3Plus):
        return model.output_stride
    if isinstance(model, hypercolumn.Hypercolumn):
        return hypercolumn.STRIDE
    if isinstance(model, fpn.FPNSegmenter):
        return 32  # Every backbone's coarsest stage (Swin: 4x4 patches, three merges).
    return 32  # A new model: the largest stride of lcseg's backbones, to be safe.


def probability_function(config: ml_collections.ConfigDict, variables: Any
                         ) -> Callable[[jax.Array], jax.Array]:
    """The exported computation: ``[N, 3, H, W]`` pixels in [0, 1] -> probabilities.

    The model is built in float32 whatever ``config.half_precision`` says (its parameters
    are float32 either way); normalisation is ``lcseg.data.pipeline.normalize_images``'s,
    from [0, 1] pixels instead of uint8 ones.

    Args:
      config: the run's config.
      variables: ``{'params': ..., 'batch_stats': ...}`` (``inference_variables``).

    Returns:
      A function of float32 NCHW images returning float32 NCHW probabilities.
    """
    metadata = get_metadata(config.dataset.name)
    model = create_model(**config.model, num_classes=metadata.num_classes, dtype=jnp.float32)
    mean = np.asarray(config.dataset.mean, np.float32)
    std = np.asarray(config.dataset.std, np.float32)

    def probabilities(images: jax.Array) -> jax.Array:
        x = (jnp.transpose(images, (0, 2, 3, 1)) - mean) / std
        logits = model.apply(variables, x, train=False).astype(jnp.float32)
        return jnp.transpose(jax.nn.softmax(logits, axis=-1), (0, 3, 1, 2))

    return probabilities


# ---------------------------------------------------------------------------------------
# Metadata.
# ---------------------------------------------------------------------------------------


def metadata_props(config: ml_collections.ConfigDict, *, step: int | None, tile: int,
                   batch: int | str) -> dict[str, str]:
    """The model file's metadata: Deepness's keys and lcseg's provenance.

    Args:
      config: the run's config.
      step: the checkpoint step of the weights.
      tile: the exported tile side.
      batch: the exported batch size, or ``'dynamic'``.

    Returns:
      ``{key: value}``, every value a string.
    """
    metadata = get_metadata(config.dataset.name)
    # Deepness parses every value with json.loads (its model_base.py): strings quoted.
    props = {
        "model_type": json.dumps("Segmentor"),
        "class_names": json.dumps({str(i): n for i, n in enumerate(metadata.class_names)}),
        # Deepness's code reads 'tile_size', its documentation names 'tiles_size'.
        "tile_size": str(tile),
        "tiles_size": str(tile),
        "tiles_overlap": str(TILES_OVERLAP_PERCENT),
        # 0: every pixel gets its most probable class, as lcseg.predict's maps do.
        "seg_thresh": "0.0",
        "seg_small_segment": "0",
    }
    resolution = _resolution_cm(metadata, config)
    if resolution is not None:
        props["resolution"] = json.dumps(resolution)
    record = provenance(config, step=step, tile=tile, batch=batch, opset=OPSET,
                        input=INPUT_CONTRACT, output=OUTPUT_CONTRACT,
                        class_colours=json.dumps({str(i): list(c)
                                                  for i, c in enumerate(metadata.palette)}))
    props.update({KEY_PREFIX + key: value for key, value in record.items()})
    return props


def _resolution_cm(metadata: DatasetMetadata, config: ml_collections.ConfigDict
                   ) -> float | None:
    """The ground sampling distance the model was trained at, in cm/px (None: unknown)."""
    resolution = metadata.resolution_cm
    if resolution is None:
        return None
    # Training on images resized by `downscale` (0.5: half the pixels per side) means
    # coarser pixels: the model expects scenes at that resolution.
    return float(resolution) / float(config.data.downscale)


# ---------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _converter_fixes() -> Iterator[Any]:
    """jax2onnx's ``to_onnx``, with its replacements that are wrong for lcseg corrected.

    While tracing, jax2onnx swaps some Flax layers for its own ONNX ops. Two are wrong here
    (found by the tests, jax2onnx 0.17.1):

    * ``flax.linen.max_pool``'s replacement takes the window by keyword only and the
      padding as a string only, so ResNet's stem pool, ``max_pool(x, (3, 3), strides=2,
      padding=((1, 1), (1, 1)))``, fails; the fixed one takes Flax's signature and turns
      explicit padding into -inf padding followed by a 'VALID' pool (the same maximum).
    * ``flax.linen.BatchNorm``'s replacement mixes up NCHW and NHWC in residual blocks
      (ResNet encoders: an Add of [1, C, H, W] and [1, H, W, C]); turned off, BatchNorm is
      exported as the arithmetic Flax computes.

    Everything is restored on exit. jax2onnx's and onnx_ir's logging is hidden: plugin
    discovery imports optional examples that need packages lcseg does not use, and warns.
    """
    try:
        import jax2onnx
        from jax2onnx.plugins.flax.linen import batch_norm, max_pool
    except ImportError as error:
        raise ImportError(f"ONNX export needs jax2onnx ({error}): pip install --no-deps "
                          "-r requirements-export.txt") from None
    max_pool_plugin = max_pool.MaxPoolPlugin
    batch_norm_plugin = batch_norm.BatchNormPlugin
    original_make_patch = max_pool_plugin.__dict__["_make_patch"]
    original_specs = batch_norm_plugin.__dict__["binding_specs"]

    def make_patch(cls, orig):
        replacement = original_make_patch.__func__(cls, orig)

        def flax_max_pool(x, window_shape, strides=None, padding="VALID"):
            if not isinstance(padding, str):
                pads = ((0, 0), *(tuple(p) for p in padding), (0, 0))
                x = jnp.pad(x, pads, constant_values=-jnp.inf)
                padding = "VALID"
            return replacement(x, window_shape=window_shape, strides=strides,
                               padding=padding)
        return flax_max_pool

    loggers = [py_logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    max_pool_plugin._make_patch = classmethod(make_patch)
    batch_norm_plugin.binding_specs = classmethod(lambda cls: [])
    for logger in loggers:
        logger.setLevel(py_logging.CRITICAL)
    try:
        yield jax2onnx.to_onnx
    finally:
        max_pool_plugin._make_patch = original_make_patch
        batch_norm_plugin.binding_specs = original_specs
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_options(config: ml_collections.ConfigDict, *, tile: int, batch: int | str
                  ) -> None:
    """Raises a ValueError naming the option if the model cannot be exported with it."""
    metadata = get_metadata(config.dataset.name)
    model = create_model(**config.model, num_classes=metadata.num_classes)
    stride = model_stride(model)
    if not isinstance(tile, int) or tile < stride or tile % stride:
        raise ValueError(f"--tile {tile}: model {config.model.name!r} needs a tile side that "
                         f"is a positive multiple of its stride {stride} (e.g. "
                         f"{max(stride, round(int(tile) / stride) * stride)}).")
    if batch != BATCH_DYNAMIC and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"--batch {batch}: give a positive number of tiles or "
                         f"{BATCH_DYNAMIC!r}.")


def export_model(config: ml_collections.ConfigDict, variables: Any, *, step: int | None,
                 tile: int, batch: int | str = 1) -> Any:
    """Converts a model and its variables to an ONNX model with lcseg's metadata.

    Args:
      config: the run's config.
      variables: the variables to export (``inference_variables(state)``).
      step: the checkpoint step they come from (recorded; None: not a checkpoint).
      tile: the tile side (a multiple of ``model_stride``).
      batch: tiles per call, or ``'dynamic'``.

    Returns:
      The ``onnx.ModelProto``.

    Raises:
      ValueError: a tile or batch the model cannot take.
    """
    import onnx

    check_options(config, tile=tile, batch=batch)
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    function = probability_function(config, variables)
    if batch == BATCH_DYNAMIC:
        shape = jax.export.symbolic_shape(f"N, 3, {tile}, {tile}")
    else:
        shape = (batch, 3, tile, tile)
    with _converter_fixes() as to_onnx:
        model = to_onnx(function, [jax.ShapeDtypeStruct(shape, jnp.float32)], opset=OPSET,
                        model_name=f"lcseg_{config.model.name}", input_names=[INPUT_NAME],
                        output_names=[OUTPUT_NAME])
    model.producer_name = "lcseg"
    model.doc_string = (f"lcseg {config.model.name} on {config.dataset.name}: "
                        f"{INPUT_CONTRACT} -> {OUTPUT_CONTRACT}")
    onnx.helper.set_model_props(model, metadata_props(config, step=step, tile=tile,
                                                      batch=batch))
    onnx.checker.check_model(model)
    return model


def export_state(config: ml_collections.ConfigDict, state: TrainState, *, step: int | None,
                 tile: int, batch: int | str = 1) -> Any:
    """``export_model`` of a train state's inference variables (EMA parameters if kept)."""
    return export_model(config, inference_variables(state), step=step, tile=tile,
                        batch=batch)


def save_model(model: Any, path: str) -> None:
    """Writes an ONNX model in one file, complete or not at all (temporary name, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--output {path}: directory {directory} does not exist.")
    temporary = path + ".tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def parse_batch(value: str | int) -> int | str:
    """``--batch``: a positive integer or ``'dynamic'``."""
    if value == BATCH_DYNAMIC:
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--batch must be a number of tiles or {BATCH_DYNAMIC!r}, got "
                         f"{value!r}") from None


def export_workdir(workdir: str, output: str, *, checkpoint: str | int = "best",
                   tile: int | None = None, batch: int | str = 1) -> dict[str, str]:
    """Exports a checkpoint of a training workdir to an ONNX file.

    Args:
      workdir: a training workdir (``config.json`` and ``checkpoints/``).
      output: the ``.onnx`` file to write (replaced if it exists).
      checkpoint: ``'best'``, ``'latest'`` or a step number.
      tile: tile side; default the run's ``eval_tile_size``.
      batch: tiles per call, or ``'dynamic'``.

    Returns:
      The metadata written into the file.

    Raises:
      FileNotFoundError, ValueError: no such workdir, checkpoint or output directory; a
        tile or batch the model cannot take. Nothing is written then.
    """
    from lcseg.workdir import load_config, restore_run

    config = load_config(workdir)
    tile = int(config.eval_tile_size if tile is None else tile)
    check_options(config, tile=tile, batch=batch)  # Before the (slow) restore.
    if not os.path.isdir(os.path.dirname(os.path.abspath(output))):
        raise FileNotFoundError(f"--output {output}: its directory does not exist.")
    _, state, step = restore_run(workdir, checkpoint, local_devices=True)
    model = export_state(config, state, step=step, tile=tile, batch=batch)
    save_model(model, output)
    return {p.key: p.value for p in model.metadata_props}


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training workdir (holds config.json, checkpoints).")
    flags.DEFINE_string("output", None, "The .onnx file to write.")
    flags.DEFINE_string("checkpoint", "best", "'best' (validation mIoU), 'latest' or a step.")
    flags.DEFINE_integer("tile", None, "Tile side in pixels, a multiple of the model's stride "
                         "(default: the run's eval_tile_size).")
    flags.DEFINE_string("batch", "1", "Tiles per call: a number, or 'dynamic' (the runtime "
                        "chooses).")
    flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
    from absl import app, flags

    from lcseg import cli

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    cli.quiet_library_logs()
    with cli.exit_on_bad_input("lcseg.export"):
        props = export_workdir(FLAGS.workdir, FLAGS.output, checkpoint=FLAGS.checkpoint,
                               tile=FLAGS.tile, batch=parse_batch(FLAGS.batch))
    size = os.path.getsize(FLAGS.output)
    print(f"Wrote {FLAGS.output} ({size / 2**20:.1f} MiB): {props[KEY_PREFIX + 'model']} "
          f"at step {props[KEY_PREFIX + 'checkpoint_step']}, tile {props['tiles_size']}, "
          f"batch {props[KEY_PREFIX + 'batch']}, opset {OPSET}")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
