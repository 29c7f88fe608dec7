"""PyTorch state dicts as numpy arrays, without PyTorch and without running the file.

Also the naming and layout rules every architecture's converter shares (``module_path``,
``hwio``): lcseg's Flax modules are named after the torch state dict's keys, so a
converter is a walk over the keys, not a table.

``read_state_dict(path)`` reads a state dict (``conv1.weight``, ``layer1.0.bn1.running_mean``,
...) from a PyTorch checkpoint (``.pth``, ``.pt``, ``.bin``, ``.ckpt``: the zip format of
``torch.save`` and the pre-1.6 legacy format both), a ``.safetensors`` file
(``safetensors.numpy``) or an ``.npz`` of the same keys. PyTorch files are read by a
restricted unpickler that rebuilds tensors and ordered dicts only: anything else in the
pickle (a class, a function) is refused, so no code from the file ever runs.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
import safetensors.numpy

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
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
        return safetensors.numpy.load_file(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return _unwrap({k: data[k] for k in data.files}, path)
    if path.endswith(TORCH_SUFFIXES):
        read = _read_torch_zip if zipfile.is_zipfile(path) else _read_torch_legacy
        return _unwrap(read(path), path)
    raise ValueError(f"{path}: unknown checkpoint type; expected one of "
                     f"{(*TORCH_SUFFIXES, '.safetensors', '.npz')}")


def module_path(torch_name: str) -> tuple[str, ...]:
    """``layer1.0.downsample.1`` -> ``('layer1_0', 'downsample_1')``: lcseg's module names.

    Indices of torch's Sequential / ModuleList containers join the name before them, as
    Flax submodule names cannot be bare numbers.
    """
    path: list[str] = []
    for part in torch_name.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def hwio(weight: np.ndarray) -> np.ndarray:
    """A torch weight in Flax's kernel layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    weight = np.asarray(weight, np.float32)
    if weight.ndim == 4:
        return weight.transpose(2, 3, 1, 0)
    if weight.ndim == 2:
        return weight.T
    raise ValueError(f"expected a 2-D or 4-D weight, got shape {weight.shape}")
