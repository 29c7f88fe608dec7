"""Cost of each training augmentation op, and of whole chains, on the host (and on device).

    python benchmarks/augment.py [--size 512] [--repeats 5] [--workers 2] [--device]

Prints, per op, the median milliseconds to produce one ``size x size`` example (crops
taken from a 2x larger source image, every other op applied to a ``size`` example, blur
and noise with probability 1), then examples/s of whole chains in one process and through
the grain training iterator (batching included, with ``--workers`` worker processes).
``--device`` also times a jax version of the per-pixel ops (dihedral, colour jitter,
noise) on a batch already on the default jax device, for comparison with host placement.
These figures back the placement decision in ``lcseg/data/augment.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lcseg.data import augment  # noqa: E402
from lcseg.data.pipeline import train_iterator  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 512, "Side of the augmented examples (crop_size).")
flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).")
flags.DEFINE_integer("calls", 20, "Calls per repeat for per-op timings.")
flags.DEFINE_integer("workers", 2, "grain worker processes for the iterator timing.")
flags.DEFINE_bool("device", False, "Also time a jax variant of the per-pixel ops.")

PIXEL_OPS = ("flips", "dihedral", "rotate", "colour_jitter", "blur", "noise")
ALWAYS = dict(blur_probability=1.0, noise_probability=1.0)


def median_ms(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per call of ``fn``."""
    fn()  # warm-up (first-use caches, lazy imports)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def example(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random image (so blur and resampling see realistic data) and its label."""
    coarse = rng.integers(0, 256, (side // 16 + 1, side // 16 + 1, 3), dtype=np.uint8)
    image = np.asarray(augment.Image.fromarray(coarse).resize((side, side),
                                                                augment.BILINEAR))
    return image, (image[..., 0] // 43).astype(np.uint8)


def op_timings(size: int, calls: int, repeats: int) -> dict[str, float]:
    """Milliseconds per example of each op alone (on Pillow images, no array copies)."""
    rng = np.random.default_rng(0)
    big_image, big_label = example(rng, 2 * size)
    huge = example(rng, 4 * size)
    image, label = example(rng, size)
    options = augment.AugmentOptions(**ALWAYS)

    def timed(source: tuple[np.ndarray, np.ndarray], ops: tuple[str, ...],
              scale: float = 1.0) -> float:
        """ms per call of ``ops`` (plus "materialize": apply the pending scale)."""
        transform = augment.Augment(options, crop_size=size)
        pil = (augment.Image.fromarray(source[0]), augment.Image.fromarray(source[1]))

        def run() -> None:
            in_flight = augment._Example(*pil, scale)
            for op in ops:
                if op == "materialize":
                    in_flight.materialize()
                else:
                    transform._op(op)(in_flight, rng)
        return median_ms(run, calls, repeats)

    big = (big_image, big_label)
    source = f"({2 * size} source)"
    results = {
        f"random_crop {source}": timed(big, ("random_crop",)),
        f"random_scale + random_crop, fused {source}": timed(
            big, ("random_scale", "random_crop")),
        f"random_scale + random_crop, unfused {source}": timed(
            big, ("random_scale", "materialize", "random_crop")),
        f"random_resized_crop {source}": timed(big, ("random_resized_crop",)),
        f"downscale 0.5 + random_crop, fused ({4 * size} source)": timed(
            huge, ("random_crop",), 0.5),
        f"downscale 0.5 + random_crop, unfused ({4 * size} source)": timed(
            huge, ("materialize", "random_crop"), 0.5),
    }
    for op in PIXEL_OPS:
        results[op] = timed((image, label), (op,))
    # Array <-> Pillow conversions paid once per example around the whole chain.
    results["numpy <-> Pillow, once per example"] = median_ms(
        lambda: (np.asarray(augment.Image.fromarray(image)),
                 np.asarray(augment.Image.fromarray(label))), calls, repeats)
    return results


def chain_throughput(size: int, repeats: int, workers: int) -> list[tuple[str, float]]:
    """Examples/s of whole chains: in-process ``Augment.apply`` and the grain iterator."""
    rng = np.random.default_rng(1)
    sources = [example(rng, 2 * size) for _ in range(8)]
    chains = {
        "default (random_crop, flips)": augment.AugmentOptions(),
        "scale, crop, dihedral, colour_jitter (default probabilities otherwise)":
            augment.AugmentOptions(ops=("random_scale", "random_crop", "dihedral",
                                        "colour_jitter", "blur", "noise")),
        "every op (blur and noise always)": augment.AugmentOptions(
            ops=("random_scale", "random_crop", "dihedral", "rotate", "colour_jitter",
                 "blur", "noise"), **ALWAYS),
    }
    results = []
    for name, options in chains.items():
        transform = augment.Augment(options, crop_size=size)
        ms = median_ms(lambda t=transform: [t.apply(*s, rng) for s in sources], 2, repeats)
        results.append((f"{name}, 1 process", len(sources) * 1e3 / ms))
    source = [{"image": image, "label": label} for image, label in sources]
    every = chains["every op (blur and noise always)"]
    # Two batches of warm-up (worker start-up), then 16 timed: grain's read-ahead makes
    # this an upper bound by at most what it buffered during the warm-up.
    for num_workers in sorted({0, workers}):
        iterator = train_iterator(source, batch_size=8, crop_size=size, seed=0,
                                  workers=num_workers, augment=every)
        next(iterator), next(iterator)
        start = time.perf_counter()
        for _ in range(16):
            next(iterator)
        results.append((f"every op, grain iterator, {num_workers} workers",
                        16 * 8 / (time.perf_counter() - start)))
        del iterator  # stops its workers
    return results


def device_timing(size: int, repeats: int) -> tuple[str, float]:
    """Milliseconds per example of dihedral + colour jitter + noise on the jax device."""
    import jax
    import jax.numpy as jnp

    batch = 16

    @jax.jit
    def pixel_ops(images: jax.Array, key: jax.Array) -> jax.Array:
        k_dihedral, k_colour, k_noise = jax.random.split(key, 3)

        def dihedral(image, k):
            options = [jnp.rot90(t, r) for t in (image, image.transpose(1, 0, 2))
                       for r in range(4)]
            return jax.lax.switch(k, [lambda o=o: o for o in options])
        images = jax.vmap(dihedral)(images, jax.random.randint(k_dihedral, (batch,), 0, 8))
        x = images.astype(jnp.float32)
        factors = jax.random.uniform(k_colour, (batch, 3, 1, 1, 1), minval=0.8, maxval=1.2)
        grey = x @ jnp.asarray(augment.LUMA, jnp.float32)
        x = x * factors[:, 0]  # brightness
        x = (x - grey.mean((1, 2))[:, None, None, None]) * factors[:, 1] + grey.mean(
            (1, 2))[:, None, None, None]  # contrast
        x = grey[..., None] + (x - grey[..., None]) * factors[:, 2]  # saturation
        x = x + 5.0 * jax.random.normal(k_noise, x.shape)
        return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)

    images = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (batch, size, size, 3), dtype=np.uint8))
    key = jax.random.key(0)
    ms = median_ms(lambda: pixel_ops(images, key).block_until_ready(), 5, repeats)
    return f"jax on {jax.devices()[0].platform}, batch {batch}", ms / batch


def main(argv: list[str]) -> None:
    del argv
    size = FLAGS.size
    print(f"Per-op cost, ms per {size}x{size} example (median of {FLAGS.repeats}):")
    for name, ms in op_timings(size, FLAGS.calls, FLAGS.repeats).items():
        print(f"  {name:<58s} {ms:8.2f}")
    print("Whole chains, examples/s on the host:")
    for name, rate in chain_throughput(size, FLAGS.repeats, FLAGS.workers):
        print(f"  {name:<80s} {rate:8.1f}")
    if FLAGS.device:
        name, ms = device_timing(size, FLAGS.repeats)
        print(f"Device variant (dihedral, colour jitter, noise), {name}: {ms:.2f} ms/example")


if __name__ == "__main__":
    app.run(main)
