"""What made an output: lcseg's version, the run's config hash, the checkpoint and options.

Every file lcseg writes for use outside a workdir (class maps, probabilities, STAC Items,
ONNX models) carries the same provenance, so that a map or a model can be traced back to
the run and checkpoint that made it, and a rerun can tell whether an existing output was
made by the same model with the same options (``lcseg.predict`` skips those).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

import ml_collections

import lcseg

#: Prefix of lcseg's keys where outputs hold free-form metadata beside others' (STAC
#: properties, ONNX ``metadata_props``). GeoTIFF tags use ``lcseg_`` instead
#: (``lcseg.predict.outputs.TAG_PREFIX``): GDAL splits metadata names at ':'.
KEY_PREFIX = "lcseg:"


def lcseg_version() -> str:
    """lcseg's version (``lcseg.__version__``, the one home of the package's version)."""
    return lcseg.__version__


def utc_now() -> str:
    """The current time as lcseg's outputs record it: ISO 8601, UTC, whole seconds."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def config_hash(config: ml_collections.ConfigDict | dict[str, Any]) -> str:
    """A short stable hash of a run's config (16 hex digits of SHA-256).

    The config is serialised as sorted JSON, so the same settings give the same hash in
    any process and any Python session; tuples and lists hash alike (JSON arrays).
    """
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    text = json.dumps(values, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(config: ml_collections.ConfigDict, *, step: int | None,
               **options: Any) -> dict[str, str]:
    """The provenance record of an output made by ``config``'s model at ``step``.

    Args:
      config: the training run's config (``lcseg.workdir.load_config``).
      step: the checkpoint step the weights come from (None: not from a checkpoint).
      **options: the options the output was made with (window, overlap, tta, ...);
        values are stored as strings.

    Returns:
      ``{'version', 'model', 'dataset', 'config_hash', 'checkpoint_step', *options}``,
      every value a string (ready for GeoTIFF tags or ONNX metadata). Add ``KEY_PREFIX``
      where the keys share a namespace with others'.
    """
    record = {
        "version": lcseg_version(),
        "model": str(config.model.name),
        "dataset": str(config.dataset.name),
        "config_hash": config_hash(config),
        "checkpoint_step": "none" if step is None else str(int(step)),
    }
    record.update({key: str(value) for key, value in options.items()})
    return record
