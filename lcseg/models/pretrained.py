"""Pretrained ResNet encoders: read torchvision checkpoints, convert, load into a model.

Three steps, each usable alone:

* ``read_state_dict(path)``: a torchvision-style state dict (``conv1.weight``,
  ``layer1.0.bn1.running_mean``, ...) as numpy arrays, from a PyTorch checkpoint (``.pth``,
  ``.pt``, ``.bin``: the zip format of ``torch.save`` and the legacy format both), a
  ``.safetensors`` file or an ``.npz`` of the same keys. PyTorch files are read by a
  restricted unpickler that rebuilds tensors and ordered dicts only: no PyTorch needed,
  and no code from the file ever runs (anything else is refused).
* ``convert_resnet(state_dict)`` -> ``PretrainedWeights``: Flax ``params`` and
  ``batch_stats`` trees in the layout of ``lcseg.models.resnet.ResNet`` (kernels
  transposed from OIHW to HWIO; BatchNorm ``weight``/``bias`` -> ``scale``/``bias``,
  ``running_mean``/``running_var`` -> ``mean``/``var``; the classifier ``fc`` dropped).
  ``save_pretrained`` writes them, with the normalisation statistics the weights were
  trained with, to one ``.npz`` (what ``python -m lcseg.models.import_weights`` does).
* ``load_pretrained(variables, path)``: copies the weights into a model's ``encoder``
  (or into a bare ResNet's variables) and returns the normalisation to use. Any missing
  or unexpected key and any shape mismatch is an error that lists them all.

Inputs with other than 3 bands: the first convolution's RGB kernel is adapted as timm and
segmentation_models_pytorch do: one band gets the sum over RGB; ``C`` bands get the RGB
kernels repeated cyclically (band ``k`` takes RGB channel ``k mod 3``) and scaled by
``3 / C``, which keeps the response to an image whose bands are all alike. The returned
normalisation follows the same rule (band ``k`` gets the statistics of RGB channel
``k mod 3``): replace them with your data's own for bands that are not RGB.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import flax
import ml_dtypes
import numpy as np
from flax import traverse_util

from lcseg.models.resnet import RESNETS

FORMAT = "lcseg-pretrained-v1"
# torchvision's ImageNet weights expect [0, 1] pixels normalised with these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


@dataclasses.dataclass
class PretrainedWeights:
    """Encoder weights in lcseg's layout, with what they expect of the input.

    Attributes:
      params: nested dict of float32 arrays (the ResNet's ``params``).
      batch_stats: nested dict of float32 arrays (its BatchNorm ``mean``/``var``).
      mean: per-band mean of [0, 1] pixels the weights were trained with.
      std: per-band standard deviation likewise.
      arch: what the weights are (``resnet50``, or the stage sizes when unnamed).
    """

    params: dict[str, Any]
    batch_stats: dict[str, Any]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    arch: str = "resnet"


# ---------------------------------------------------------------------------------------
# Reading state dicts.
# ---------------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` and its kind while unpickling."""

    dtype: Any


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2`` over a numpy storage (a writable C-ordered copy)."""
    if not size:
        return np.array(storage[offset])
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride])
    return np.array(view, order="C")


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a PyTorch state dict; refuses every global that is not plain data.

    ``load_storage(storage_type, key, ...)`` answers the persistent ids of storages and
    ``rebuild_tensor`` stands for ``torch._utils._rebuild_tensor_v2``.
    """

    def __init__(self, file, path: str, load_storage=None, rebuild_tensor=_rebuild_tensor):
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage
        self._rebuild_tensor = rebuild_tensor

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self._rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_DTYPES:
            return _StorageType(_TORCH_DTYPES[name])
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to load {module}.{name}: only state dicts of tensors "
            f"are read (nothing in the file is executed). Save model.state_dict(), or "
            f"convert the file to .safetensors.")

    def persistent_load(self, pid: Any) -> Any:
        if not (self._load_storage and isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unsupported persistent id {pid!r}")
        return self._load_storage(*pid[1:])


def _read_torch_zip(path: str) -> Any:
    """``torch.save``'s zip format: ``<name>/data.pkl`` plus one record per storage."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise ValueError(f"{path}: a zip file without data.pkl is not a PyTorch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        if (prefix + "byteorder" in names
                and archive.read(prefix + "byteorder").decode().strip() != "little"):
            raise ValueError(f"{path}: big-endian PyTorch checkpoints are not supported")
        storages: dict[str, np.ndarray] = {}

        def load_storage(storage_type: _StorageType, key: str, *_: Any) -> np.ndarray:
            if key not in storages:  # Tensors may share a storage.
                storages[key] = np.frombuffer(archive.read(f"{prefix}data/{key}"),
                                              storage_type.dtype)
            return storages[key]

        return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path,
                                    load_storage).load()


@dataclasses.dataclass
class _LegacyTensor:
    """A tensor of the legacy format, rebuilt once its storage's bytes have been read."""

    key: str
    args: tuple


def _read_torch_legacy(path: str) -> Any:
    """The pre-1.6 format: pickles (magic number, version, system information, the object,
    the storage keys), then each storage as an int64 element count and its raw bytes."""
    storage_types: dict[str, _StorageType] = {}

    def load_storage(storage_type: _StorageType, key: str, location: str, numel: int,
                     view: Any = None) -> str:
        if view is not None:
            raise ValueError(f"{path}: storage views of the legacy format are not supported")
        storage_types[key] = storage_type
        return key

    def rebuild(key: str, *args: Any) -> _LegacyTensor:
        return _LegacyTensor(key, args)

    with open(path, "rb") as f:
        if _RestrictedUnpickler(f, path).load() != _LEGACY_MAGIC:
            raise ValueError(f"{path}: neither a zip nor a legacy PyTorch checkpoint")
        _RestrictedUnpickler(f, path).load()  # Protocol version.
        _RestrictedUnpickler(f, path).load()  # System information (little-endian only).
        result = _RestrictedUnpickler(f, path, load_storage, rebuild).load()
        storages = {}
        for key in _RestrictedUnpickler(f, path).load():
            count = int(np.frombuffer(f.read(8), np.int64)[0])
            dtype = np.dtype(storage_types[key].dtype)
            storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)

    def resolve(value: Any) -> Any:
        if isinstance(value, _LegacyTensor):
            return _rebuild_tensor(storages[value.key], *value.args)
        if isinstance(value, Mapping):
            return {name: resolve(item) for name, item in value.items()}
        return value

    return resolve(result)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        data = f.read()
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[begin:end], _SAFETENSORS_DTYPES[info["dtype"]]
                                      ).reshape(info["shape"])
    return tensors


def _unwrap(state: Any, path: str) -> dict[str, np.ndarray]:
    """The state dict inside a training checkpoint, without DataParallel's ``module.``."""
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got "
                         f"{type(state).__name__}")
    arrays = {k.removeprefix("module."): v for k, v in state.items()
              if isinstance(v, np.ndarray)}
    if not arrays:
        raise ValueError(f"{path}: holds no tensors")
    return arrays


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A torchvision-style state dict from ``.pth``/``.pt``/``.bin``, ``.safetensors``, ``.npz``.

    Args:
      path: the checkpoint file.

    Returns:
      ``{torch name: numpy array}`` (wrappers such as ``{'state_dict': ...}`` and
      DataParallel's ``module.`` prefix removed).
    """
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return _unwrap({k: data[k] for k in data.files}, path)
    if path.endswith(TORCH_SUFFIXES):
        read = _read_torch_zip if zipfile.is_zipfile(path) else _read_torch_legacy
        return _unwrap(read(path), path)
    raise ValueError(f"{path}: unknown checkpoint type; expected one of "
                     f"{(*TORCH_SUFFIXES, '.safetensors', '.npz')}")


# ---------------------------------------------------------------------------------------
# Conversion to lcseg's layout, and the converted file.
# ---------------------------------------------------------------------------------------

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _module_path(torch_name: str) -> tuple[str, ...]:
    """``layer1.0.downsample.1`` -> ``('layer1_0', 'downsample_1')``."""
    path: list[str] = []
    for part in torch_name.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def describe_resnet(state_dict: Mapping[str, np.ndarray]) -> str:
    """The architecture a torchvision ResNet state dict belongs to (``resnet50``, ...)."""
    stage_sizes = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{s}.")})
                        for s in range(1, 5))
    bottleneck = any(".conv3." in k for k in state_dict)
    width = state_dict["conv1.weight"].shape[0]
    name = next((name for name, spec in RESNETS.items() if spec == (stage_sizes, bottleneck)),
                f"resnet(stage_sizes={stage_sizes}, bottleneck={bottleneck})")
    return name if width == 64 else f"{name}, base_width={width}"


def convert_resnet(state_dict: Mapping[str, np.ndarray], *,
                   mean: tuple[float, ...] = IMAGENET_MEAN,
                   std: tuple[float, ...] = IMAGENET_STD) -> PretrainedWeights:
    """A torchvision ResNet state dict in the layout of ``lcseg.models.resnet.ResNet``.

    Args:
      state_dict: ``{torch name: array}`` (``read_state_dict``).
      mean: per-band mean of [0, 1] pixels the weights were trained with.
      std: per-band standard deviation likewise.

    Returns:
      The converted weights; the classifier (``fc.*``) is dropped.

    Raises:
      ValueError: the state dict is not a torchvision ResNet (unknown keys are listed).
    """
    if "conv1.weight" not in state_dict or np.ndim(state_dict["conv1.weight"]) != 4:
        raise ValueError("Not a torchvision ResNet state dict: no 4-D 'conv1.weight'; keys "
                         f"start with {sorted(state_dict)[:5]}")
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    unknown = []
    for name, value in state_dict.items():
        module, _, leaf = name.rpartition(".")
        if name.startswith("fc.") or leaf == "num_batches_tracked":
            continue  # The ImageNet classifier; a counter Flax does not keep.
        value = np.asarray(value, np.float32)
        if not re.fullmatch(r"(conv1|bn1|layer\d\.\d+\.(conv\d|bn\d|downsample\.[01]))",
                            module):
            unknown.append(name)
        elif leaf == "weight" and value.ndim == 4:  # OIHW -> HWIO
            trees["params"][(*_module_path(module), "kernel")] = value.transpose(2, 3, 1, 0)
        elif leaf in _BN_LEAVES and value.ndim == 1:
            collection, flax_leaf = _BN_LEAVES[leaf]
            trees[collection][(*_module_path(module), flax_leaf)] = value
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Not a torchvision ResNet state dict: unexpected key(s) {unknown}")
    return PretrainedWeights(
        params=traverse_util.unflatten_dict(trees["params"]),
        batch_stats=traverse_util.unflatten_dict(trees["batch_stats"]),
        mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
        arch=describe_resnet(state_dict))


def save_pretrained(path: str, weights: PretrainedWeights, *, source: str = "") -> None:
    """Writes converted weights and their normalisation to one ``.npz`` (atomically).

    Args:
      path: the output file (must end in ``.npz``).
      weights: from ``convert_resnet``.
      source: where the weights came from (recorded for reference).
    """
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: the converted weights file must end in .npz")
    arrays = {"meta/format": np.array(FORMAT), "meta/arch": np.array(weights.arch),
              "meta/source": np.array(source), "meta/mean": np.array(weights.mean),
              "meta/std": np.array(weights.std)}
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
        return convert_resnet(read_state_dict(path))
    with np.load(path, allow_pickle=False) as data:
        if str(data["meta/format"]) != FORMAT:
            raise ValueError(f"{path}: format {data['meta/format']}, expected {FORMAT}")
        trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
        for key in data.files:
            collection, *rest = key.split("/")
            if collection in trees:
                trees[collection][tuple(rest)] = data[key]
        return PretrainedWeights(
            params=traverse_util.unflatten_dict(trees["params"]),
            batch_stats=traverse_util.unflatten_dict(trees["batch_stats"]),
            mean=tuple(float(m) for m in data["meta/mean"]),
            std=tuple(float(s) for s in data["meta/std"]), arch=str(data["meta/arch"]))


def pretrained_normalisation(path: str, bands: int = 3) -> dict[str, tuple[float, ...]]:
    """The normalisation a pretrained weights file expects, without loading the weights.

    Args:
      path: a converted ``.npz`` (or a torchvision checkpoint: ImageNet statistics).
      bands: input bands; statistics are repeated cyclically for other than 3.

    Returns:
      ``{'mean': (...), 'std': (...)}`` for [0, 1] pixels.
    """
    path = os.path.expanduser(path)
    if _is_converted(path):
        with np.load(path, allow_pickle=False) as data:
            mean, std = tuple(data["meta/mean"]), tuple(data["meta/std"])
    else:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return {"mean": tuple(float(mean[k % len(mean)]) for k in range(bands)),
            "std": tuple(float(std[k % len(std)]) for k in range(bands))}


# ---------------------------------------------------------------------------------------
# Loading into a model.
# ---------------------------------------------------------------------------------------


def adapt_input_kernel(kernel: np.ndarray, bands: int) -> np.ndarray:
    """The first conv's ``[kh, kw, 3, out]`` RGB kernel for ``bands`` input bands.

    One band: the sum over RGB. Otherwise the RGB kernels repeated cyclically and scaled
    by ``3 / bands`` (timm's ``adapt_input_conv`` rule).
    """
    if bands == kernel.shape[2]:
        return kernel
    if bands == 1:
        return kernel.sum(axis=2, keepdims=True)
    repeats = math.ceil(bands / kernel.shape[2])
    return np.tile(kernel, (1, 1, repeats, 1))[:, :, :bands] * (kernel.shape[2] / bands)


def _encoder_scope(params: Mapping[str, Any]) -> tuple[str, ...]:
    if "encoder" in params:
        return ("encoder",)
    if "conv1" in params and "layer1_0" in params:  # A bare ResNet.
        return ()
    raise ValueError(f"The model has no ResNet encoder to load pretrained weights into "
                     f"(top-level modules: {sorted(params)}); pretrained encoders exist for "
                     f"'unetpp' and 'deeplabv3plus'. Set config.model.pretrained=None.")


def _subtree(tree: Mapping[str, Any], scope: tuple[str, ...]) -> Any:
    for key in scope:
        tree = tree[key]
    return tree


def load_pretrained(variables: Mapping[str, Any], path: str
                    ) -> tuple[dict[str, Any], dict[str, tuple[float, ...]]]:
    """Copies pretrained encoder weights into a model's initialised variables.

    Args:
      variables: ``model.init(...)``'s ``{'params': ..., 'batch_stats': ...}`` of a model
        with a ResNet ``encoder`` (``unetpp``, ``deeplabv3plus``) or of a bare ResNet.
      path: converted weights (``python -m lcseg.models.import_weights``) or a torchvision
        checkpoint.

    Returns:
      ``(variables, normalisation)``: new variables whose encoder leaves are the
      pretrained ones (host numpy float32 arrays; the rest untouched), and
      ``{'mean': (...), 'std': (...)}`` for [0, 1] pixels, one entry per input band.

    Raises:
      ValueError: keys missing from the file or the model, or shapes that differ (all
        listed), or a model without a ResNet encoder.
    """
    weights = read_pretrained(path)
    variables = flax.core.unfreeze(variables)
    scope = _encoder_scope(variables["params"])
    bands = _subtree(variables["params"], scope)["conv1"]["kernel"].shape[2]
    weights.params["conv1"]["kernel"] = adapt_input_kernel(weights.params["conv1"]["kernel"],
                                                           bands)
    problems = []
    for collection in ("params", "batch_stats"):
        target = traverse_util.flatten_dict(_subtree(variables[collection], scope), sep="/")
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
        updated = {key: np.asarray(source.get(key, value), np.float32)
                   for key, value in target.items()}
        if scope:
            variables[collection][scope[0]] = traverse_util.unflatten_dict(updated, sep="/")
        else:
            variables[collection] = traverse_util.unflatten_dict(updated, sep="/")
    if problems:
        raise ValueError(f"Pretrained weights {path} ({weights.arch}) do not fit the model's "
                         f"encoder:\n  " + "\n  ".join(problems))
    normalisation = {"mean": tuple(weights.mean[k % 3] for k in range(bands)),
                     "std": tuple(weights.std[k % 3] for k in range(bands))}
    return variables, normalisation
