"""Pretrained backbones: convert torchvision checkpoints once, load them into a model.

Three steps, each usable alone:

* ``read_state_dict(path)`` (``lcseg.models.torch_checkpoint``): a PyTorch state dict as
  numpy arrays, without PyTorch and without running anything in the file.
* ``convert_state_dict(state_dict)`` -> ``PretrainedWeights``: Flax ``params`` and
  ``batch_stats`` trees of the backbone the state dict belongs to, recognised from its
  keys among ``TORCH_LAYOUTS`` (each backbone module converts its own torchvision
  layout). ``save_pretrained`` writes them, with the normalisation statistics the
  weights were trained with and the path of their input kernel, to one ``.npz`` (what
  ``python -m lcseg.models.import_weights`` does).
* ``load_pretrained(variables, path)``: copies the weights into a model's ``encoder``
  (or into a bare backbone's variables) and returns the normalisation to use. Any
  missing or unexpected key and any shape mismatch is an error that lists them all.

Inputs with another band count than the weights': the first convolution's kernel is
adapted as timm and segmentation_models_pytorch do: one band gets the sum over the
weights' bands; ``C`` bands get the kernels repeated cyclically (band ``k`` takes band
``k mod B`` of the weights) and scaled by ``B / C``, which keeps the response to an
image whose bands are all alike. The returned normalisation follows the same rule: replace
it with your data's own for bands the weights never saw.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax
import numpy as np
from flax import traverse_util

from lcseg.models import resnet, swin, vgg
from lcseg.models.torch_checkpoint import read_state_dict

FORMAT = "lcseg-pretrained-v1"
# torchvision's ImageNet weights expect [0, 1] pixels normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class PretrainedWeights:
    """Backbone weights in lcseg's layout, with what they expect of the input.

    Attributes:
      params: nested dict of float32 arrays (the backbone's ``params``).
      batch_stats: nested dict of float32 arrays (its BatchNorm ``mean``/``var``; empty
        for backbones without BatchNorm).
      mean: per-band mean of [0, 1] pixels the weights were trained with.
      std: per-band standard deviation likewise.
      arch: what the weights are (``resnet50``, ``swin_v2_b``, ...).
      input_kernel: path in ``params`` of the kernel ``[kh, kw, bands, out]`` that reads
        the image (adapted to the model's band count when loading).
    """

    params: dict[str, Any]
    batch_stats: dict[str, Any]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    arch: str = "resnet"
    input_kernel: tuple[str, ...] = resnet.INPUT_KERNEL


@dataclasses.dataclass(frozen=True)
class TorchLayout:
    """A backbone family's torchvision state-dict layout and its converter.

    Attributes:
      family: the family (``'resnet'``, ...), for messages.
      matches: whether a state dict belongs to this family (from its keys).
      describe: the architecture a matching state dict holds (``resnet50``).
      convert: the state dict as the backbone's ``(params, batch_stats)``.
      input_kernel: path in ``params`` of the kernel that reads the image.
    """

    family: str
    matches: Callable[[Mapping[str, np.ndarray]], bool]
    describe: Callable[[Mapping[str, np.ndarray]], str]
    convert: Callable[[Mapping[str, np.ndarray]], tuple[dict[str, Any], dict[str, Any]]]
    input_kernel: tuple[str, ...]


TORCH_LAYOUTS: tuple[TorchLayout, ...] = (
    TorchLayout("resnet", resnet.is_torch_resnet, resnet.describe_torch_resnet,
                resnet.resnet_from_torch, resnet.INPUT_KERNEL),
    TorchLayout("vgg16", vgg.is_torch_vgg16, vgg.describe_vgg16,
                lambda state_dict: (vgg.vgg16_from_torch(state_dict), {}), vgg.INPUT_KERNEL),
    TorchLayout("swin_v2", swin.is_torch_swin_v2, swin.describe_swin_v2,
                lambda state_dict: (swin.swin_v2_from_torch(state_dict), {}),
                swin.INPUT_KERNEL),
)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], *,
                       mean: tuple[float, ...] = IMAGENET_MEAN,
                       std: tuple[float, ...] = IMAGENET_STD) -> PretrainedWeights:
    """A torchvision state dict in the layout of the lcseg backbone it belongs to.

    Args:
      state_dict: ``{torch name: array}`` (``read_state_dict``).
      mean: per-band mean of [0, 1] pixels the weights were trained with.
      std: per-band standard deviation likewise.

    Returns:
      The converted weights (classifier heads dropped).

    Raises:
      ValueError: no known layout matches (the families are listed), or the state dict
        has keys its layout does not know (listed).
    """
    layout = next((layout for layout in TORCH_LAYOUTS if layout.matches(state_dict)), None)
    if layout is None:
        raise ValueError(
            f"Not a state dict of a backbone lcseg knows ({[t.family for t in TORCH_LAYOUTS]},"
            f" in torchvision's layout); its keys start with {sorted(state_dict)[:5]}")
    params, batch_stats = layout.convert(state_dict)
    return PretrainedWeights(params=params, batch_stats=batch_stats,
                             mean=tuple(float(m) for m in mean),
                             std=tuple(float(s) for s in std),
                             arch=layout.describe(state_dict), input_kernel=layout.input_kernel)


def save_pretrained(path: str, weights: PretrainedWeights, *, source: str = "") -> None:
    """Writes converted weights and their normalisation to one ``.npz`` (atomically).

    Args:
      path: the ``.npz`` to write.
      weights: from ``convert_state_dict``.
      source: where the weights came from (recorded for reference).
    """
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: the converted weights file must end in .npz")
    arrays = {"meta/format": np.array(FORMAT), "meta/arch": np.array(weights.arch),
              "meta/source": np.array(source), "meta/mean": np.array(weights.mean),
              "meta/std": np.array(weights.std),
              "meta/input_kernel": np.array("/".join(weights.input_kernel))}
    for collection in ("params", "batch_stats"):
        for key, value in traverse_util.flatten_dict(getattr(weights, collection)).items():
            arrays["/".join((collection, *key))] = np.asarray(value, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        np.savez(f, **arrays)
    os.replace(temporary, path)  # Never a half-written weights file.


def _is_converted(path: str) -> bool:
    if not path.endswith(".npz"):
        return False
    with np.load(path, allow_pickle=False) as data:
        return "meta/format" in data.files


def read_pretrained(path: str) -> PretrainedWeights:
    """Converted weights (``save_pretrained``'s file), or a torchvision checkpoint converted
    on the fly with ImageNet normalisation.

    Args:
      path: a converted ``.npz``, or anything ``read_state_dict`` reads.

    Returns:
      The weights and their normalisation.
    """
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Pretrained weights {path} not found (config.model.pretrained)")
    if not _is_converted(path):
        return convert_state_dict(read_state_dict(path))
    with np.load(path, allow_pickle=False) as data:
        if str(data["meta/format"]) != FORMAT:
            raise ValueError(f"{path}: format {data['meta/format']}, expected {FORMAT}")
        trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
        for key in data.files:
            collection, *rest = key.split("/")
            if collection in trees:
                trees[collection][tuple(rest)] = data[key]
        # Files written before other backbones existed are ResNets.
        input_kernel = (tuple(str(data["meta/input_kernel"]).split("/"))
                        if "meta/input_kernel" in data.files else resnet.INPUT_KERNEL)
        return PretrainedWeights(
            params=traverse_util.unflatten_dict(trees["params"]),
            batch_stats=traverse_util.unflatten_dict(trees["batch_stats"]),
            mean=tuple(float(m) for m in data["meta/mean"]),
            std=tuple(float(s) for s in data["meta/std"]), arch=str(data["meta/arch"]),
            input_kernel=input_kernel)


def _per_band(statistics: tuple[float, ...], bands: int) -> tuple[float, ...]:
    """Statistics for ``bands`` bands: band ``k`` takes the weights' band ``k mod B``."""
    return tuple(float(statistics[k % len(statistics)]) for k in range(bands))


def pretrained_normalisation(path: str, bands: int = 3) -> dict[str, tuple[float, ...]]:
    """The normalisation a pretrained weights file expects, without loading the weights.

    Args:
      path: a converted ``.npz`` (or a torchvision checkpoint: ImageNet statistics).
      bands: input bands; statistics are repeated cyclically for another band count.

    Returns:
      ``{'mean': (...), 'std': (...)}`` for [0, 1] pixels.
    """
    path = os.path.expanduser(path)
    if _is_converted(path):
        with np.load(path, allow_pickle=False) as data:
            mean, std = tuple(data["meta/mean"]), tuple(data["meta/std"])
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return {"mean": _per_band(mean, bands), "std": _per_band(std, bands)}


# ---------------------------------------------------------------------------------------
# Loading into a model.
# ---------------------------------------------------------------------------------------


def adapt_input_kernel(kernel: np.ndarray, bands: int) -> np.ndarray:
    """The first conv's ``[kh, kw, B, out]`` kernel for ``bands`` input bands.

    One band: the sum over the ``B`` bands. Otherwise the kernels repeated cyclically and
    scaled by ``B / bands`` (timm's ``adapt_input_conv`` rule).
    """
    if bands == kernel.shape[2]:
        return kernel
    if bands == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeats = math.ceil(bands / kernel.shape[2])
    return np.tile(kernel, (1, 1, repeats, 1))[:, :, :bands] * (kernel.shape[2] / bands)


def _subtree(tree: Mapping[str, Any], scope: tuple[str, ...]) -> Any:
    """``tree[scope[0]][scope[1]]...``; empty where the path does not exist."""
    for key in scope:
        tree = tree.get(key, {})
    return tree


def _backbone_scope(params: Mapping[str, Any], weights: PretrainedWeights) -> tuple[str, ...]:
    """Where the backbone sits in a model's params: under ``encoder``, or at the top."""
    if "encoder" in params:
        return ("encoder",)
    if weights.input_kernel[0] in params:  # A bare backbone.
        return ()
    raise ValueError(f"The model has no encoder to load pretrained {weights.arch} weights "
                     f"into (top-level modules: {sorted(params)}); pretrained encoders exist "
                     f"for 'unetpp', 'deeplabv3plus', 'swin_fpn' and 'hypercolumn'. Set "
                     f"config.model.pretrained=None.")


def load_pretrained(variables: Mapping[str, Any], path: str
                    ) -> tuple[dict[str, Any], dict[str, tuple[float, ...]]]:
    """Copies pretrained backbone weights into a model's initialised variables.

    Args:
      variables: ``model.init(...)``'s variables of a model with an ``encoder``
        (``unetpp``, ``deeplabv3plus``, ...) or of a bare backbone.
      path: converted weights (``python -m lcseg.models.import_weights``) or a torchvision
        checkpoint.

    Returns:
      ``(variables, normalisation)``: new variables whose backbone leaves are the
      pretrained ones (host numpy float32 arrays; the rest untouched), and
      ``{'mean': (...), 'std': (...)}`` for [0, 1] pixels, one entry per input band.

    Raises:
      ValueError: keys missing from the file or the model, or shapes that differ (all
        listed), or a model without a backbone.
    """
    weights = read_pretrained(path)
    variables = flax.core.unfreeze(variables)
    scope = _backbone_scope(variables["params"], weights)
    *kernel_scope, kernel_name = weights.input_kernel
    model_kernel = _subtree(variables["params"], scope)
    source_kernel = weights.params
    for key in kernel_scope:
        model_kernel, source_kernel = model_kernel.get(key, {}), source_kernel.get(key, {})
    bands = None
    if kernel_name in model_kernel and kernel_name in source_kernel:
        bands = model_kernel[kernel_name].shape[2]
        source_kernel[kernel_name] = adapt_input_kernel(source_kernel[kernel_name], bands)
    problems = []
    for collection in ("params", "batch_stats"):
        target = traverse_util.flatten_dict(_subtree(variables.get(collection, {}), scope),
                                            sep="/")
        source = traverse_util.flatten_dict(getattr(weights, collection), sep="/")
        missing = sorted(set(target) - set(source))
        unexpected = sorted(set(source) - set(target))
        mismatched = [f"{key}: file {source[key].shape}, model {target[key].shape}"
                      for key in sorted(set(target) & set(source))
                      if source[key].shape != target[key].shape]
        for what, keys in (("missing from the file", missing),
                           ("not in the model", unexpected), ("shape mismatch", mismatched)):
            if keys:
                problems.append(f"{collection} {what} ({len(keys)}): " + ", ".join(keys))
        if not target:
            continue
        updated = {key: np.asarray(source.get(key, value), np.float32)
                   for key, value in target.items()}
        if scope:
            variables[collection][scope[0]] = traverse_util.unflatten_dict(updated, sep="/")
        else:
            variables[collection] = traverse_util.unflatten_dict(updated, sep="/")
    if problems:
        raise ValueError(f"Pretrained weights {path} ({weights.arch}) do not fit the model's "
                         f"backbone:\n  " + "\n  ".join(problems))
    bands = bands or len(weights.mean)
    normalisation = {"mean": _per_band(weights.mean, bands),
                     "std": _per_band(weights.std, bands)}
    return variables, normalisation
