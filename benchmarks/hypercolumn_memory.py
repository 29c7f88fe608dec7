"""Compiled memory of the hypercolumn head: level-wise (efficient) vs concatenate-then-MLP.

    python benchmarks/hypercolumn_memory.py [--size 256] [--batch 16] [--layers all]
        [--hidden 1024] [--num_classes 7] [--dtype float32]

Both heads take the VGG16 maps of a ``--batch`` of ``--size`` x ``--size`` images
(shapes from ``jax.eval_shape`` of the encoder; the encoder itself is not compiled, so
the figures are the head's alone) and the same parameters. Two programs each: the
forward pass (logits), and forward + backward of a per-pixel softmax cross-entropy
(gradients w.r.t. the head's parameters and its input maps, as when the encoder is
fine-tuned). Nothing is executed: the programs are only lowered and compiled, and XLA's
``memory_analysis()`` reports the temporary buffers (activations kept for the backward
pass plus workspace; arguments and outputs excluded), so the naive head's
``[N, H, W, 4224]`` hypercolumns need not fit anywhere. The figures are for the default
backend (CPU here; run on an accelerator for its own).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from lcseg.models.hypercolumn import HypercolumnHead, naive_hypercolumn_logits  # noqa: E402
from lcseg.models.vgg import VGG16  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("size", 256, "Square image size.")
flags.DEFINE_integer("batch", 16, "Images per batch.")
flags.DEFINE_enum("layers", "all", ["all", "pool"], "Hypercolumn layers.")
flags.DEFINE_integer("hidden", 1024, "Hidden layer width.")
flags.DEFINE_integer("num_classes", 7, "Output classes.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def temporary_bytes(function, *args) -> int:
    """XLA's temporary-buffer size of ``jit(function)`` compiled for ``args`` (shapes)."""
    analysis = jax.jit(function).lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes)


def main(argv: list[str]) -> None:
    del argv
    dtype = jnp.dtype(FLAGS.dtype)
    size = (FLAGS.size, FLAGS.size)
    images = jax.ShapeDtypeStruct((FLAGS.batch, *size, 3), jnp.float32)
    encoder = VGG16(outputs=FLAGS.layers, dtype=dtype)
    features = jax.eval_shape(
        lambda x: encoder.apply(encoder.init(jax.random.key(0), x), x), images)
    head = HypercolumnHead(FLAGS.num_classes, hidden=FLAGS.hidden, dtype=dtype)
    params = jax.eval_shape(lambda f: head.init(jax.random.key(0), f, size), features
                            )["params"]
    labels = jax.ShapeDtypeStruct((FLAGS.batch, *size), jnp.int32)

    heads = {
        "efficient": lambda p, f: head.apply({"params": p}, f, size),
        "naive": lambda p, f: naive_hypercolumn_logits(p, f, size, dtype=dtype),
    }
    rows = {}
    for name, logits_fn in heads.items():
        def loss(p, f, y, logits_fn=logits_fn):
            logits = logits_fn(p, f)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        rows[name] = (temporary_bytes(logits_fn, params, features),
                      temporary_bytes(jax.grad(loss, argnums=(0, 1)), params, features,
                                      labels))

    channels = sum(f.shape[-1] for f in features)
    print(f"Hypercolumn head, layers={FLAGS.layers} ({channels} channels), hidden "
          f"{FLAGS.hidden}, {FLAGS.num_classes} classes, batch {FLAGS.batch} of "
          f"{FLAGS.size}x{FLAGS.size}, {FLAGS.dtype}, backend {jax.default_backend()}")
    print("XLA temporary memory (MiB):")
    print(f"{'head':<12}{'forward':>14}{'fwd+backward':>16}")
    for name, (forward, backward) in rows.items():
        print(f"{name:<12}{forward / 2**20:>14,.1f}{backward / 2**20:>16,.1f}")
    (eff_f, eff_b), (naive_f, naive_b) = rows["efficient"], rows["naive"]
    print(f"{'naive/eff.':<12}{naive_f / max(eff_f, 1):>14.2f}{naive_b / max(eff_b, 1):>16.2f}")


if __name__ == "__main__":
    app.run(main)
