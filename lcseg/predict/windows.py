"""Window geometry and test-time augmentation of the sliding-window predictor.

Windows of a fixed side step by a stride over a reflect-padded scene (``window_starts``,
``reflect_indices``); each window's softmax probabilities are averaged over the TTA group
(``tta_transforms``) and multiplied by a smooth, strictly positive weight
(``window_weights``) on device (``weighted_window_probabilities``), so that blending
overlapping windows leaves no seams. The blending itself also stays on the device: the
windows are summed into a strip of rows (``blend_windows``) and the finished rows are
normalised and classified there (``finish_rows``), so only classes (and the
probabilities, when asked for) come back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lcseg.data.pipeline import normalize_images

TTA_MODES = ("none", "flips", "dihedral")
# Weight of a window's outermost pixels relative to its centre (see window_weights).
WEIGHT_FLOOR = 1e-3


def window_weights(size: int, floor: float = WEIGHT_FLOOR) -> np.ndarray:
    """A smooth 2-D weight for a ``size x size`` window, strictly positive everywhere.

    The outer product of a squared-sine bump ``sin^2(pi (i + 1/2) / size)``, lifted so
    that its smallest value is ``floor``: 1 at the centre, falling smoothly to about
    ``floor`` at the edges. The floor keeps pixels that only a window's edge covers (a
    scene border at overlap 0) well defined; elsewhere edges count next to nothing.

    Args:
      size: window side in pixels.
      floor: weight of the outermost pixels, relative to the centre.

    Returns:
      float32 ``[size, size]``.
    """
    bump = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    one_d = floor + (1.0 - floor) * bump
    return np.outer(one_d, one_d).astype(np.float32)


def window_starts(length: int, window: int, stride: int, margin: int) -> np.ndarray:
    """First pixel of each window along an axis, in scene coordinates (may be negative).

    Windows start at ``-margin`` (the reflect padding) and step by ``stride`` until they
    cover ``length + margin`` pixels; the last may run further into the padding.

    Args:
      length: scene size along the axis.
      window: window side.
      stride: step between windows.
      margin: reflect padding on each side.

    Returns:
      int ``[count]``: the start of each window.
    """
    span = length + 2 * margin
    count = 1 + max(0, math.ceil((span - window) / stride))
    return -margin + stride * np.arange(count)


def reflect_indices(indices: np.ndarray, length: int) -> np.ndarray:
    """Maps coordinates outside ``[0, length)`` back inside by reflection.

    As numpy's 'reflect' padding (the edge pixel is not repeated), repeatedly if a scene
    is smaller than the padding.

    Args:
      indices: coordinates along an axis, any integers.
      length: scene size along the axis.

    Returns:
      The coordinates in ``[0, length)``, same shape.
    """
    indices = np.asarray(indices)
    if length == 1:
        return np.zeros_like(indices)
    period = 2 * (length - 1)
    folded = np.abs(indices) % period
    return np.where(folded >= length, period - folded, folded)


def tta_transforms(mode: str) -> list[tuple[Callable, Callable]]:
    """The transforms of a TTA mode, as (forward, inverse) pairs on NHWC arrays.

    Args:
      mode: one of ``TTA_MODES``.

    Returns:
      The pairs; ``inverse`` undoes ``forward`` on the model's output.

    Raises:
      ValueError: an unknown mode.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {mode!r}")
    if mode == "none":
        return [(lambda x: x, lambda x: x)]
    if mode == "flips":  # Flips are their own inverses.
        def flip(axes):
            return (lambda x: jnp.flip(x, axes)) if axes else (lambda x: x)
        return [(flip(axes), flip(axes)) for axes in ((), (2,), (1,), (1, 2))]
    pairs = []
    for turns in range(4):
        for mirrored in (False, True):
            def forward(x, turns=turns, mirrored=mirrored):
                return jnp.rot90(jnp.flip(x, 2) if mirrored else x, turns, axes=(1, 2))

            def inverse(x, turns=turns, mirrored=mirrored):
                x = jnp.rot90(x, -turns, axes=(1, 2))
                return jnp.flip(x, 2) if mirrored else x
            pairs.append((forward, inverse))
    return pairs


def weighted_window_probabilities(variables: Any, images: jax.Array, *, model: Any,
                                  mean: tuple, std: tuple, dtype: jnp.dtype,
                                  transforms: list[tuple[Callable, Callable]],
                                  weights: np.ndarray) -> jax.Array:
    """uint8 windows ``[B, w, w, 3]`` -> weighted softmax probabilities ``[B, w, w, C]``.

    Args:
      variables: the model's variables.
      images: uint8 windows ``[B, w, w, 3]``.
      model: a Flax linen module (see ``lcseg.predict.Predictor``).
      mean, std: per-channel normalisation of ``[0, 1]`` pixels.
      dtype: compute dtype of the normalised images.
      transforms: ``tta_transforms(mode)``; the probabilities are averaged over them.
      weights: ``window_weights(w)``.

    Returns:
      float32 ``[B, w, w, C]``: the TTA mean of the softmax, times ``weights``.
    """
    inputs = normalize_images(images, mean, std, dtype)
    total = None
    for forward, inverse in transforms:
        logits = model.apply(variables, forward(inputs), train=False)
        probabilities = inverse(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        total = probabilities if total is None else total + probabilities
    # Weighting on device keeps the host's work to one add per window.
    return total * jnp.asarray(weights / len(transforms))[None, :, :, None]


def blend_windows(sums: jax.Array, weight_sums: jax.Array, weighted: jax.Array,
                  rows: jax.Array, columns: jax.Array, valid: jax.Array, *,
                  weights: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """Adds a batch of weighted windows into the strip accumulators, in batch order.

    Args:
      sums: float32 ``[R, Wp, C]``: weighted probability sums of a strip of ``R`` rows of
        the padded scene (``Wp`` columns: every window's full width).
      weight_sums: float32 ``[R, Wp]``: the sums of the windows' weights.
      weighted: float32 ``[B, w, w, C]`` (``weighted_window_probabilities``).
      rows, columns: int32 ``[B]``: each window's first row and column in the strip.
      valid: bool ``[B]``: False for the padding windows of a last, partial batch.
      weights: ``window_weights(w)``.

    Returns:
      The updated ``(sums, weight_sums)``.
    """
    size, num_classes = weighted.shape[1], weighted.shape[-1]
    window_weight = jnp.asarray(weights)

    def add(index, carry):
        sums, weight_sums = carry
        row, column, keep = rows[index], columns[index], valid[index]
        old = lax.dynamic_slice(sums, (row, column, 0), (size, size, num_classes))
        new = jnp.where(keep, old + weighted[index], old)
        sums = lax.dynamic_update_slice(sums, new, (row, column, 0))
        old = lax.dynamic_slice(weight_sums, (row, column), (size, size))
        new = jnp.where(keep, old + window_weight, old)
        return sums, lax.dynamic_update_slice(weight_sums, new, (row, column))

    # Windows are added one after another, as a host loop would: the sums (and so the
    # probabilities) do not depend on how the windows were batched.
    return lax.fori_loop(0, weighted.shape[0], add, (sums, weight_sums))


def finish_rows(sums: jax.Array, weight_sums: jax.Array, *, count: int, first_column: int,
                width: int, probabilities: str) -> tuple[jax.Array, ...]:
    """Classifies the strip's first ``count`` rows and shifts them out of the strip.

    Args:
      sums, weight_sums: the strip accumulators (see ``blend_windows``).
      count: rows to finish (every window covering them has been added).
      first_column, width: the scene's columns in the strip.
      probabilities: what else comes back: ``'none'``, ``'uint8'`` (``round(255 p)``) or
        ``'float32'``.

    Returns:
      ``(sums, weight_sums, classes[, probabilities])``: the accumulators with the rows
      removed (zeros appended), uint8 ``[count, width]`` class indices (argmax of the
      probabilities) and the probabilities ``[count, width, C]``.
    """
    columns = slice(first_column, first_column + width)
    normalised = sums[:count, columns] / weight_sums[:count, columns, None]
    classes = jnp.argmax(normalised, axis=-1).astype(jnp.uint8)
    sums = jnp.concatenate([sums[count:], jnp.zeros_like(sums[:count])])
    weight_sums = jnp.concatenate([weight_sums[count:], jnp.zeros_like(weight_sums[:count])])
    if probabilities == "none":
        return sums, weight_sums, classes
    if probabilities == "uint8":
        return sums, weight_sums, classes, jnp.round(normalised * 255.0).astype(jnp.uint8)
    return sums, weight_sums, classes, normalised
