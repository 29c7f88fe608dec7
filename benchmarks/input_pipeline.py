"""Training crops/s of the real loader, from full-size fake downloads of each real dataset.

    python benchmarks/input_pipeline.py [--datasets deepglobe,loveda,landcoverai]
        [--workers 0,1,2] [--seconds 10] [--step_model unet] [--small]

For each dataset a fake download is written as users get it (``tests/fake_archives``:
DeepGlobe's 2448x2448 JPEGs and colour-coded PNG masks, LoveDA's 1024x1024 PNGs,
LandCover.ai's GeoTIFF sheets), prepared by the real TFDS builder (``lcseg.data.prepare``)
and read back through ``open_split`` (presented as many examples as the real training
split holds) and ``pipeline.train_iterator`` with the batch,
crop, augmentation and read-ahead of ``configs/unet_<dataset>.py``: at each number of
``--workers``, with the config's ``crops_per_image`` and with one crop per image (the
scheme before it). Printed beside each:

* Pillow's decode rate of one stored full image (the training split's image bytes as
  the builder stores them: DeepGlobe's original JPEG, LoveDA's and LandCover.ai's
  lossless PNG), measured in this run on one core. ``crops/s / decodes/s`` is the
  stable figure: it does not depend on how fast or busy this machine is.
* Peak resident memory of the main process and of the most-grown worker.
* ``loader/step``: crops/s over the images/s of the config's model's compiled train step
  on this device (one batch of ``--step_batch``, ``benchmarks/models.py`` in a child),
  i.e. whether this loader would keep that step busy. On a CPU the step is the
  bottleneck by far; ``benchmarks/gpu_check.py`` prints the same ratio on a GPU.

LandCover.ai is read as the builder stores it, as 512x512 tiles cut from the sheets; its
configs' crop is the whole tile, so several crops per decoded tile would be the same
pixels and it keeps one (its decode is already 12x cheaper per crop than DeepGlobe's).
``--small`` runs everything at small sizes (a test runs it).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from absl import app, flags

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCHMARKS)
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, BENCHMARKS)

import loader_data  # noqa: E402
import model_child  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", list(loader_data.DATASETS), "Datasets to measure.")
flags.DEFINE_list("workers", ["0", "1", "2"], "Loader worker counts to measure.")
flags.DEFINE_float("seconds", 10.0, "Seconds of batches per measurement (after the first).")
flags.DEFINE_string("step_model", "unet", "Model whose train step is the demand "
                    "(a row of benchmarks/models.py); empty: skip.")
flags.DEFINE_integer("step_batch", 2, "Batch of the timed train step.")
flags.DEFINE_bool("small", False, "Small images, crops and batches (for tests).")
flags.DEFINE_string("workdir", None, "Where fake downloads and prepared data go "
                    "(default: a temporary folder, removed at the end).")


def write_download(dataset: str, manual_dir: Path, small: bool) -> None:
    """The fake download of ``dataset`` at full size (or small), as a zip."""
    from tests import fake_archives

    if dataset == "deepglobe":
        fake_archives.write_deepglobe(manual_dir, size=128 if small else 2448)
    elif dataset == "loveda":
        fake_archives.write_loveda(manual_dir, size=128 if small else 1024)
    else:  # Sheets of a few 512 tiles: the tiles are what training reads.
        fake_archives.write_landcoverai(manual_dir)


def stored_image_bytes(dataset: str, manual_dir: Path, example: dict[str, Any]) -> bytes:
    """One full training image as the builder stores it (what each crop decodes)."""
    if dataset == "deepglobe":  # The original JPEG bytes are kept.
        with zipfile.ZipFile(next(manual_dir.glob("*.zip"))) as archive:
            name = next(n for n in archive.namelist() if n.endswith("_sat.jpg"))
            return archive.read(name)
    from lcseg.data.tfds_builder import encode_png

    return encode_png(example["image"])


def loader_config(dataset: str, small: bool):
    config = importlib.import_module(f"configs.{loader_data.DATASETS[dataset].config}"
                                     ).get_config()
    if small:
        config.crop_size = 32
        config.batch_size = 4
    return config


def measure_loader(source, config, *, crops_per_image: int, workers: int,
                   seconds: float) -> dict[str, float]:
    from lcseg.data import pipeline

    config.data.workers = workers
    iterator = pipeline.train_iterator(
        source, batch_size=config.batch_size, crop_size=config.crop_size, seed=0,
        augment=config.augment, crops_per_image=crops_per_image,
        loader=pipeline.LoaderOptions.from_config(config.data))
    try:
        return loader_data.loader_rate(iterator, config.batch_size, seconds=seconds)
    finally:
        del iterator  # Stops the workers before the next measurement starts its own.


def step_demand(config, small: bool) -> dict[str, Any] | None:
    """Images/s of ``--step_model``'s train step at the config's crop size here."""
    if not FLAGS.step_model:
        return None
    return model_child.measure(FLAGS.step_model, size=config.crop_size,
                               batch=FLAGS.step_batch, steps=1, dataset="synthetic",
                               tiny=small)


def run(workdir: Path) -> list[dict[str, Any]]:
    import tensorflow_datasets as tfds
    from absl import logging

    from lcseg.data import open_split, prepare_dataset

    tfds.disable_progress_bar()
    logging.set_verbosity(logging.WARNING)
    rows = []
    demands: dict[int, dict[str, Any] | None] = {}
    for dataset in FLAGS.datasets:
        manual_dir, data_dir = workdir / dataset / "download", workdir / "tfds"
        start = time.perf_counter()
        write_download(dataset, manual_dir, FLAGS.small)
        prepare_dataset(dataset, str(data_dir), str(manual_dir))
        prepared = open_split(dataset, "train", str(data_dir))
        print(f"{dataset}: {len(prepared)} training examples written and prepared in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        # As many examples as the real training split (the loader's shuffle costs more
        # per element over a handful of them).
        source = loader_data.Repeated(prepared, loader_data.DATASETS[dataset].train_examples)
        example = source[0]
        encoded = stored_image_bytes(dataset, manual_dir, example)
        config = loader_config(dataset, FLAGS.small)
        if config.crop_size not in demands:
            demands[config.crop_size] = step_demand(config, FLAGS.small)
        demand = demands[config.crop_size]
        step_rate = demand.get("train_images_per_s") if demand else None
        schemes = sorted({1, config.data.crops_per_image}, reverse=True)
        for crops_per_image in schemes:
            for workers in map(int, FLAGS.workers):
                decodes = loader_data.pillow_decode_rate([encoded], 2.0)
                rate = measure_loader(source, config, crops_per_image=crops_per_image,
                                      workers=workers, seconds=FLAGS.seconds)
                row = {"dataset": dataset,
                       "image": "{}x{}".format(*example["image"].shape[:2]),
                       "crops_per_image": crops_per_image, "workers": workers,
                       "pillow_decodes_per_s": decodes,
                       "over_decodes": rate["crops_per_s"] / decodes, **rate}
                if step_rate:
                    row["step_images_per_s"] = step_rate
                    row["loader_over_step"] = rate["crops_per_s"] / step_rate
                rows.append(row)
                print(f"  crops/image {crops_per_image}, workers {workers}: "
                      f"{rate['crops_per_s']:.1f} crops/s, {row['over_decodes']:.2f}x "
                      "decodes/s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| dataset | image | crops/image | workers | crops/s | Pillow decodes/s (1 core) "
             "| crops/s / decodes/s | first batch s | peak GiB main / worker | "
             "loader/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['image']} | {r['crops_per_image']} | {r['workers']} | "
            f"{r['crops_per_s']:.1f} | {r['pillow_decodes_per_s']:.1f} | "
            f"{r['over_decodes']:.2f} | {r['first_batch_s']:.1f} | "
            f"{r['main_peak_gib']:.2f} / {r['worker_peak_gib']:.2f} | "
            f"{fmt(r.get('loader_over_step'), '.3g')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(FLAGS.datasets) - set(loader_data.DATASETS))
    if unknown:
        raise app.UsageError(f"Unknown --datasets {unknown}; valid: "
                             f"{sorted(loader_data.DATASETS)}")
    if FLAGS.workdir:
        rows = run(Path(FLAGS.workdir))
    else:
        with tempfile.TemporaryDirectory() as workdir:
            rows = run(Path(workdir))
    steps = {r["step_images_per_s"] for r in rows if "step_images_per_s" in r}
    import jax

    print(f"\n{jax.devices()[0].device_kind}, {os.cpu_count()} cores; default augmentation "
          f"of each dataset's config; {FLAGS.seconds:.0f} s per row. loader/step: against "
          f"{FLAGS.step_model} train step images/s {sorted(round(s, 3) for s in steps)} "
          f"(batch {FLAGS.step_batch}).\n")
    print(table(rows))


if __name__ == "__main__":
    app.run(main)
