"""Prepares a dataset for lcseg: archives as downloaded -> TFDS ArrayRecord files.

    python -m lcseg.prepare deepglobe --manual_dir ~/Downloads/deepglobe --data_dir ~/data
    python -m lcseg.prepare synthetic --data_dir ~/data    # needs no download

``manual_dir`` holds the archives as downloaded (or their extracted folders); each
dataset's ``datasets/<name>/README.md`` says which. The command prints where the data
went, the splits with their sizes (split aliases too, with the stored splits they unite),
the time taken and the size on disk. Preparing an already prepared dataset does nothing.
``tfds build`` is not used: it needs TensorFlow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

from lcseg import cli
from lcseg.data import DATASETS, get_metadata, prepare_dataset

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program, like every lcseg command.
    flags.DEFINE_string("manual_dir", None,
                        "Folder holding the downloaded archives (not for synthetic).")
    flags.DEFINE_string("data_dir", None,
                        "TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")


def _disk_usage(path: Path) -> int:
    """Bytes of all files under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(num_bytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.2f} GiB"


def run(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> None:
    """Prepares dataset ``name`` and prints where it went, its splits, time and size.

    Raises:
      FileNotFoundError, ValueError: an unknown dataset, or missing or bad archives (the
        message says which and what to do).
    """
    data_dir = os.path.expanduser(data_dir) if data_dir else None
    was_prepared = get_metadata(name).builder_class()(data_dir=data_dir).is_prepared()
    start = time.perf_counter()
    builder = prepare_dataset(name, data_dir, manual_dir)
    elapsed = time.perf_counter() - start

    data_dir = Path(builder.data_dir)
    print(f"{builder.name} {builder.version} is in {data_dir}")
    splits = builder.info.splits
    for split, info in splits.items():
        print(f"  {split:<18} {info.num_examples:>7} examples")
    # Unions of stored splits (e.g. LoveDA's train = train_urban+train_rural).
    for alias, expression in getattr(builder, "SPLIT_ALIASES", {}).items():
        count = sum(splits[part].num_examples for part in expression.split("+"))
        print(f"  {alias:<18} {count:>7} examples ({expression})")
    done = "already prepared, nothing to do" if was_prepared else f"took {elapsed:.1f} s"
    print(f"{done}; {_human(_disk_usage(data_dir))} on disk")


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2 or argv[1] not in DATASETS:
        raise app.UsageError(f"Usage: python -m lcseg.prepare NAME [--manual_dir DOWNLOADS] "
                             f"[--data_dir DATA_DIR]; NAME one of {sorted(DATASETS)}")
    cli.quiet_library_logs()  # E.g. TFDS's "Variant folder ... has no dataset_info.json".
    with cli.exit_on_bad_input("lcseg.prepare"):
        run(argv[1], FLAGS.data_dir, FLAGS.manual_dir)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
