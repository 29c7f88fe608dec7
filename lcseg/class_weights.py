"""Per-class loss weights from training-set pixel counts.

All schemes work from global per-class pixel counts ``n_c`` with frequencies
``f_c = n_c / sum(n)``:

* ``'none'``: all ones.
* ``'inverse'``: ``1 / f_c``.
* ``'sqrt_inverse'``: ``1 / sqrt(f_c)``.
* ``'median_frequency'``: ``median(f) / f_c`` (Eigen & Fergus 2015). The paper's ``f_c`` is
  ``n_c`` divided by the pixels of the images in which ``c`` occurs; we only have global
  counts, so we use ``f_c = n_c / sum(n)`` and the median over classes with ``n_c > 0``.
* ``'min_over_count'``: ``min(n) / n_c``, the minimum over classes with ``n_c > 0``.
* ``'effective_number'``: ``(1 - beta) / (1 - beta ** n_c)`` (Cui et al. 2019).
* an explicit sequence of C non-negative numbers, used as given (before normalisation).

Normalisation (``normalize=True``, the default): weights are rescaled so that the
pixel-frequency-weighted mean weight is one, ``sum_c f_c w_c = 1``. Then a pixel-averaged
weighted cross-entropy has the same scale as the unweighted one (its normaliser
``sum_pixels w[y]`` equals the pixel count in expectation), so learning rates carry over.
Consequence: ``'inverse'``, ``'median_frequency'`` and ``'min_over_count'`` differ only by a
constant factor and give identical normalised weights; their raw scales (``normalize=False``)
differ (median class = 1, resp. rarest class = 1).

Classes with ``n_c = 0`` get weight 0 in every count-derived scheme (never inf/NaN): they do
not occur in the training labels, so their weight never multiplies a pixel anyway, and 0 keeps
them out of weighted class means. ``'none'`` keeps them at 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
import numpy as np

from lcseg.data.class_counts import split_class_counts

CLASS_WEIGHT_SCHEMES: tuple[str, ...] = (
    "none",
    "inverse",
    "sqrt_inverse",
    "median_frequency",
    "min_over_count",
    "effective_number",
)


def compute_class_weights(
    scheme: str | Sequence[float],
    counts: Sequence[int] | np.ndarray,
    *,
    beta: float = 0.999,
    normalize: bool = True,
) -> np.ndarray:
    """Computes per-class loss weights.

    Args:
      scheme: one of :data:`CLASS_WEIGHT_SCHEMES` or an explicit sequence of C weights.
      counts: length-C per-class training pixel counts (non-negative, may contain zeros, at
        least one positive).
      beta: ``'effective_number'`` hyper-parameter in ``[0, 1)``.
      normalize: rescale so that ``sum_c f_c w_c = 1`` (see module docstring).

    Returns:
      Float32 array of shape ``[C]``, finite and non-negative.

    Raises:
      ValueError: unknown scheme, malformed or negative counts, explicit weights of the
        wrong length / negative / non-finite, ``beta`` outside ``[0, 1)``, or weights that
        are zero on every class with pixels (cannot be normalised).
    """
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence, got shape {n.shape}")
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError(f"counts must be finite and non-negative, got {n.tolist()}")
    total = n.sum()
    if total <= 0:
        raise ValueError("counts must contain at least one positive count")
    freq = n / total
    present = n > 0

    if isinstance(scheme, str):
        if scheme not in CLASS_WEIGHT_SCHEMES:
            raise ValueError(
                f"unknown class weight scheme {scheme!r}; valid schemes: "
                f"{list(CLASS_WEIGHT_SCHEMES)} or an explicit list of {n.size} numbers"
            )
        weights = _scheme_weights(scheme, n, freq, present, beta)
    else:
        weights = np.asarray(scheme, dtype=np.float64)
        if weights.shape != n.shape:
            raise ValueError(
                f"explicit class weights must have length {n.size} (number of classes), "
                f"got shape {weights.shape}"
            )
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError(f"explicit class weights must be finite and >= 0, got {scheme}")

    if normalize:
        mean_weight = float(np.sum(freq * weights))
        if mean_weight <= 0:
            raise ValueError("class weights are zero on every class with pixels")
        weights = weights / mean_weight
    return weights.astype(np.float32)


def _scheme_weights(
    scheme: str, n: np.ndarray, freq: np.ndarray, present: np.ndarray, beta: float
) -> np.ndarray:
    if scheme == "none":
        return np.ones_like(n)
    # Divide only where the count is positive; absent classes get 0 instead of inf.
    safe_freq = np.where(present, freq, 1.0)
    if scheme == "inverse":
        raw = 1.0 / safe_freq
    elif scheme == "sqrt_inverse":
        raw = 1.0 / np.sqrt(safe_freq)
    elif scheme == "median_frequency":
        raw = np.median(freq[present]) / safe_freq
    elif scheme == "min_over_count":
        raw = n[present].min() / np.where(present, n, 1.0)
    else:  # effective_number
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"effective_number needs 0 <= beta < 1, got {beta}")
        raw = (1.0 - beta) / (1.0 - beta ** np.where(present, n, 1.0))
    return np.where(present, raw, 0.0)


def resolve_class_weights(config: ml_collections.ConfigDict) -> np.ndarray | None:
    """Class weights from the config's scheme and the training split's class counts.

    The counts recorded at preparation describe the dataset's "train" split; training on
    another split (e.g. LoveDA's ``train_rural``) counts that split's pixels instead.
    """
    scheme = config.class_weights
    if isinstance(scheme, str) and scheme == "none":
        return None
    dataset = config.dataset
    counts = split_class_counts(dataset.name, dataset.train_split, dataset.data_dir)
    return compute_class_weights(scheme if isinstance(scheme, str) else list(scheme), counts)
