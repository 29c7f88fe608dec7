"""What a researcher needs to know before renting a cluster, in one command on one GPU.

    python benchmarks/gpu_check.py [--output DIR] [--budget 480] [--models a,b] [--smoke]

Prints (and writes as ``gpu_check.json`` and ``gpu_check.md`` to ``--output``):

1. The device's bfloat16 matrix-multiply rate, measured here (an 8192^3 product): the
   peak that model FLOPs utilisation (MFU) is taken against.
2. Every model of the zoo (``benchmarks/models.py``'s rows: the U-Net presets,
   ``unetpp`` on ResNet-34, ``deeplabv3plus`` on ResNet-50, smp's DeepLabv3+) at 512x512
   in bfloat16 with the real configs' batch size (16), each in its own process: train
   and inference images/s, MFU (XLA's cost-analysis FLOPs per step / step time /
   measured peak), XLA's activation memory and the device's peak memory.
3. The input pipeline as the real configs set it (crops per image, loader processes,
   default augmentation) on full-size in-memory examples of DeepGlobe, LoveDA and
   LandCover.ai: crops/s, peak memory per loader process, Pillow's full-image decode
   rate on one core, and "loader/step": crops/s over what the config's U-Net consumes.
4. The PyTorch reference U-Net (``../shared/bench/torch_unet_reference.py``, the same
   31M-parameter model as ``unet``) in bfloat16 autocast, channels-last, eager and
   ``torch.compile``d, when torch and a GPU are there.

Sections run in order of value and stop when ``--budget`` seconds are spent (what was
skipped is listed). ``--smoke`` runs the same code at tiny sizes on the CPU (tiny model
widths, 64 px, batch 2; a test runs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from typing import Any

from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import loader_data  # noqa: E402  (grain workers import it by this name too)
import model_child  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("output", "gpu_check", "Folder for gpu_check.json and gpu_check.md.")
flags.DEFINE_float("budget", 480.0, "Seconds after which remaining sections are skipped.")
flags.DEFINE_string("models", None, "Comma-separated model rows (default: all, in "
                    "order of interest).")
flags.DEFINE_bool("smoke", False, "Tiny sizes on whatever device there is (for tests).")
flags.DEFINE_bool("torch", True, "Also time the PyTorch reference (section 4).")
flags.DEFINE_string("torch_reference",
                    os.path.join(REPO_ROOT, "..", "shared", "bench", "torch_unet_reference.py"),
                    "The PyTorch reference U-Net script.")

# Most asked-about first: the budget may end the list.
MODEL_ORDER = ("unet_base", "unet_skinny", "deeplabv3plus", "unetpp", "unet", "unet_short",
               "unet_less_conv", "deeplabv3plus_smp")
SMOKE_MODELS = ("unet", "deeplabv3plus")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sizes() -> dict[str, int]:
    """Image side, batch and timed steps: the real configs' or the smoke test's."""
    if FLAGS.smoke:
        return {"size": 64, "batch": 2, "steps": 2}
    from configs import unet_deepglobe

    config = unet_deepglobe.get_config()
    return {"size": config.crop_size, "batch": config.batch_size, "steps": 10}


# --- 1. Peak matrix rate ---------------------------------------------------------------


def matmul_peak() -> dict[str, Any]:
    """TFLOP/s of a large bfloat16 matmul (the MFU denominator), and the device."""
    import jax
    import jax.numpy as jnp

    n = 512 if FLAGS.smoke else 8192
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in keys)
    product = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(product(a, b))
    repeats = 3 if FLAGS.smoke else 20
    start = time.perf_counter()
    for _ in range(repeats):
        out = product(a, b)
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / repeats
    device = jax.devices()[0]
    return {"device": f"{jax.device_count()} x {device.device_kind}",
            "platform": device.platform, "jax": jax.__version__,
            "matmul_n": n, "peak_tflops": 2 * n**3 / seconds / 1e12}


# --- 2. Models ---------------------------------------------------------------------------


def model_row(row: str, budget: Budget) -> dict[str, Any]:
    """``benchmarks/models.py``'s measurement of ``row`` in a child process."""
    s = sizes()
    return model_child.measure(row, size=s["size"], batch=s["batch"], steps=s["steps"],
                               half_precision="true", dataset="deepglobe",
                               tiny=FLAGS.smoke, timeout=max(budget.left(), 1))


def with_utilisation(result: dict[str, Any], peak_tflops: float) -> dict[str, Any]:
    """Adds MFU: model FLOP/s (XLA cost analysis x images/s) over the measured peak."""
    if "error" not in result:
        for kind, flops_key in (("train", "gflops_per_image"),
                                ("inference", "predict_gflops_per_image")):
            achieved = result[flops_key] * result[f"{kind}_images_per_s"] / 1e3  # TFLOP/s
            result[f"{kind}_mfu"] = achieved / peak_tflops
    return result


# --- 3. Input pipeline ------------------------------------------------------------------


def loader_check(dataset: str, demand: float | None) -> dict[str, Any]:
    """The config's training iterator on in-memory full-size examples of ``dataset``."""
    from lcseg.data import pipeline

    shape = loader_data.DATASETS[dataset]
    side, image_format = shape.side, shape.image_format
    config = importlib.import_module(f"configs.{shape.config}").get_config()
    count = 16
    if FLAGS.smoke:
        side, count = 96, 4
        config.crop_size = 32
        config.data.workers = min(config.data.workers, 1)
    source = loader_data.fake_source(dataset, count, side=side)
    iterator = pipeline.train_iterator(
        loader_data.Repeated(source, shape.train_examples), batch_size=config.batch_size,
        crop_size=config.crop_size, seed=0,
        augment=config.augment, crops_per_image=config.data.crops_per_image,
        loader=pipeline.LoaderOptions.from_config(config.data))
    rate = loader_data.loader_rate(iterator, config.batch_size,
                                   seconds=1.0 if FLAGS.smoke else 15.0)
    decodes = loader_data.pillow_decode_rate(source.images, 0.5 if FLAGS.smoke else 3.0)
    result = {"dataset": dataset, "image": f"{side}x{side} {image_format}",
              "workers": config.data.workers, "crops_per_image": config.data.crops_per_image,
              "batch": config.batch_size, "crop": config.crop_size,
              "pillow_decodes_per_s_one_core": decodes, **rate}
    if demand:
        result["step_images_per_s"] = demand
        result["loader_over_step"] = rate["crops_per_s"] / demand
    return result


# --- 4. PyTorch reference ---------------------------------------------------------------


def torch_reference(budget: Budget) -> list[dict[str, Any]]:
    """The reference U-Net's train and inference images/s in bf16, eager and compiled."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return [{"variant": "torch", "error": "torch is not installed"}]
    path = FLAGS.torch_reference
    if not os.path.exists(path):
        return [{"variant": "torch", "error": f"{path} not found"}]
    spec = importlib.util.spec_from_file_location("torch_unet_reference", path)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    s = sizes()
    x = torch.randn(s["batch"], 3, s["size"], s["size"], device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, reference.NUM_CLASSES, (s["batch"], s["size"], s["size"]),
                      device=device)
    weights = torch.tensor(reference.CLASS_WEIGHTS, device=device)
    variants = ["eager"] + ([] if FLAGS.smoke else ["compile"])
    results = []
    for variant in variants:
        if budget.left() < 60:
            results.append({"variant": variant, "error": "out of time budget"})
            continue
        torch.manual_seed(0)
        model = reference.UNet().to(device, memory_format=torch.channels_last)
        forward = torch.compile(model) if variant == "compile" else model
        optimizer = torch.optim.Adam(model.parameters(), lr=reference.LR)

        def train_step(forward=forward, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                logits = forward(x)
            F.cross_entropy(logits.float(), y, weight=weights).backward()
            optimizer.step()

        def infer_step(forward=forward):
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
                forward(x).argmax(1)

        row = {"variant": f"{variant} bf16 channels-last", "device": device}
        for kind, step in (("train", train_step), ("inference", infer_step)):
            model.train(kind == "train")
            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(s["steps"]):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            row[f"{kind}_images_per_s"] = s["batch"] * s["steps"] / (
                time.perf_counter() - start)
        if device == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        results.append(row)
    return results


# --- Report -----------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def report(results: dict[str, Any]) -> str:
    device = results["device"]
    s = results["sizes"]
    lines = [f"## gpu_check: {device['device']} (jax {device['jax']}, {platform.node()})", "",
             f"bf16 matmul {device['matmul_n']}^3: {device['peak_tflops']:.3g} TFLOP/s "
             "(the MFU peak).", "",
             f"Models, {s['size']}x{s['size']}, batch {s['batch']}, bfloat16, median of "
             f"{s['steps']} steps:", "",
             "| model | parameters | train img/s | train MFU | inference img/s | "
             "inference MFU | GFLOP/img (train) | XLA temp GiB | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["models"]:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['row']} | {r['parameters']:,} | {fmt(r['train_images_per_s'])} | "
            f"{fmt(r['train_mfu'], '.1%')} | {fmt(r['inference_images_per_s'])} | "
            f"{fmt(r['inference_mfu'], '.1%')} | {r['gflops_per_image']:.4g} | "
            f"{r['temp_gib']:.2f} | {r['peak_gib']:.2f} |")
    lines += ["", "Input pipeline (configs' crops per image and workers, default "
              "augmentation, in-memory full-size examples):", "",
              "| dataset | image | workers | crops/image | crops/s | Pillow decodes/s "
              "(1 core) | peak GiB main / worker | unet img/s | loader/step |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["loader"]:
        if "error" in r:
            lines.append(f"| {r['dataset']} | {r['error']} ||||||||")
            continue
        lines.append(
            f"| {r['dataset']} | {r['image']} | {r['workers']} | {r['crops_per_image']} | "
            f"{r['crops_per_s']:.0f} | {r['pillow_decodes_per_s_one_core']:.1f} | "
            f"{r['main_peak_gib']:.2f} / {r['worker_peak_gib']:.2f} | "
            f"{fmt(r.get('step_images_per_s'))} | {fmt(r.get('loader_over_step'), '.2f')} |")
    lines += ["", "PyTorch reference U-Net (31M, same as `unet`), same batch and size:", "",
              "| variant | train img/s | inference img/s | peak GiB |", "|---|---:|---:|---:|"]
    for r in results["torch"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['error']} | | |")
            continue
        lines.append(f"| {r['variant']} ({r['device']}) | {fmt(r['train_images_per_s'])} | "
                     f"{fmt(r['inference_images_per_s'])} | {fmt(r.get('peak_gib'), '.2f')} |")
    if results["skipped"]:
        lines += ["", "Skipped (time budget): " + ", ".join(results["skipped"])]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    budget = Budget(FLAGS.budget)
    os.makedirs(FLAGS.output, exist_ok=True)
    results: dict[str, Any] = {"sizes": sizes(), "models": [], "loader": [], "torch": [],
                               "skipped": []}

    def save() -> None:  # After every section: a cut-short run keeps what it measured.
        with open(os.path.join(FLAGS.output, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=2)

    results["device"] = matmul_peak()
    print(f"device: {results['device']}", flush=True)
    rows = (FLAGS.models.split(",") if FLAGS.models
            else SMOKE_MODELS if FLAGS.smoke else MODEL_ORDER)
    # The loader and torch sections need ~2 minutes; models get the rest first.
    reserve = 0 if FLAGS.smoke else 150
    for row in rows:
        if budget.left() < reserve + 30:
            results["skipped"].append(f"model {row}")
            continue
        result = with_utilisation(model_row(row, budget), results["device"]["peak_tflops"])
        results["models"].append(result)
        print(f"model: {json.dumps(result)}", flush=True)
        save()
    demand = next((r["train_images_per_s"] for r in results["models"]
                   if r["row"] == "unet" and "error" not in r), None)
    for dataset in loader_data.DATASETS:
        if budget.left() < 20:
            results["skipped"].append(f"loader {dataset}")
            continue
        try:
            result = loader_check(dataset, demand)
        except Exception as error:  # noqa: BLE001  (report it, measure the rest)
            result = {"dataset": dataset, "error": repr(error)[:200]}
        results["loader"].append(result)
        print(f"loader: {json.dumps(result)}", flush=True)
        save()
    results["torch"] = torch_reference(budget) if FLAGS.torch else []
    print(f"torch: {json.dumps(results['torch'])}", flush=True)
    save()
    table = report(results)
    with open(os.path.join(FLAGS.output, "gpu_check.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    app.run(main)
