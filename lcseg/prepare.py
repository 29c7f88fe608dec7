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

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lcseg import cli
from lcseg.data import DATASETS, get_metadata, prepare


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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns the exit status (0 done, 1 bad input).

    Args:
      argv: command-line arguments without the program name; None for ``sys.argv[1:]``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lcseg.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(DATASETS), help="dataset to prepare")
    parser.add_argument("--manual_dir", default=None,
                        help="folder holding the downloaded archives (not for synthetic)")
    parser.add_argument("--data_dir", default=None,
                        help="TFDS data directory (default: $TFDS_DATA_DIR or "
                             "~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    cli.quiet_library_logs()  # E.g. TFDS's "Variant folder ... has no dataset_info.json".

    data_dir = os.path.expanduser(args.data_dir) if args.data_dir else None
    was_prepared = get_metadata(args.name).builder_class()(data_dir=data_dir).is_prepared()
    start = time.perf_counter()
    try:
        builder = prepare(args.name, args.data_dir, args.manual_dir)
    except (FileNotFoundError, ValueError) as error:
        # Bad input: the message says what is wrong and what to do; a traceback would not help.
        print(f"error: {error}", file=sys.stderr)
        return 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
