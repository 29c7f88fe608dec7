"""Tests for lcseg.class_weights on hand-computed values."""

import math

import numpy as np
import pytest

from lcseg.class_weights import CLASS_WEIGHT_SCHEMES, compute_class_weights

# 100 pixels: frequencies f = [0.1, 0.3, 0.6, 0]; class 3 never occurs.
COUNTS = [10, 30, 60, 0]
FREQ = np.array([0.1, 0.3, 0.6, 0.0])

_SQRT_SUM = math.sqrt(0.1) + math.sqrt(0.3) + math.sqrt(0.6)  # sum_c f_c / sqrt(f_c)
_EFF = [0.1 / (1 - 0.9**10), 0.1 / (1 - 0.9**30), 0.1 / (1 - 0.9**60)]  # beta = 0.9
_EFF_MEAN = 0.1 * _EFF[0] + 0.3 * _EFF[1] + 0.6 * _EFF[2]

RAW = {
    "none": [1, 1, 1, 1],
    "inverse": [10, 10 / 3, 10 / 6, 0],  # 1 / f
    "sqrt_inverse": [1 / math.sqrt(0.1), 1 / math.sqrt(0.3), 1 / math.sqrt(0.6), 0],
    "median_frequency": [3, 1, 0.5, 0],  # median(0.1, 0.3, 0.6) = 0.3, over present classes
    "min_over_count": [1, 1 / 3, 1 / 6, 0],  # min count 10, over present classes
    "effective_number": [*_EFF, 0],
}
# Normalised so that sum_c f_c w_c = 1. The three inverse-family schemes coincide:
# inverse has sum f / f = 3 present classes, so w = (1 / f) / 3.
NORMALISED = {
    "none": [1, 1, 1, 1],
    "inverse": [10 / 3, 10 / 9, 5 / 9, 0],
    "sqrt_inverse": [w / _SQRT_SUM for w in RAW["sqrt_inverse"]],
    "median_frequency": [10 / 3, 10 / 9, 5 / 9, 0],
    "min_over_count": [10 / 3, 10 / 9, 5 / 9, 0],
    "effective_number": [w / _EFF_MEAN for w in RAW["effective_number"]],
}


@pytest.mark.parametrize("scheme", CLASS_WEIGHT_SCHEMES)
@pytest.mark.parametrize("normalize", [False, True])
def test_schemes_hand_computed(scheme, normalize):
    weights = compute_class_weights(scheme, COUNTS, beta=0.9, normalize=normalize)
    expected = (NORMALISED if normalize else RAW)[scheme]
    assert weights.dtype == np.float32 and weights.shape == (4,)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


@pytest.mark.parametrize("scheme", CLASS_WEIGHT_SCHEMES)
def test_normalised_pixel_mean_is_one_and_zero_count_weight_is_zero(scheme):
    weights = compute_class_weights(scheme, COUNTS)
    assert np.all(np.isfinite(weights))
    np.testing.assert_allclose(np.sum(FREQ * weights), 1.0, rtol=1e-6)
    if scheme != "none":
        assert weights[3] == 0.0


def test_effective_number_default_beta():
    # beta = 0.999: (1 - beta) / (1 - beta ** n) for n = 10, 30, 60.
    raw = [0.001 / (1 - 0.999**n) for n in (10, 30, 60)]
    weights = compute_class_weights("effective_number", COUNTS, normalize=False)
    np.testing.assert_allclose(weights, [*raw, 0.0], rtol=1e-6)


def test_explicit_weights():
    weights = compute_class_weights([2.0, 1.0, 1.0, 5.0], COUNTS, normalize=False)
    np.testing.assert_allclose(weights, [2.0, 1.0, 1.0, 5.0])
    # sum f w = 0.2 + 0.3 + 0.6 = 1.1
    weights = compute_class_weights((2.0, 1.0, 1.0, 5.0), COUNTS)
    np.testing.assert_allclose(weights, np.array([2.0, 1.0, 1.0, 5.0]) / 1.1, rtol=1e-6)


def test_median_frequency_with_even_number_of_present_classes():
    # f = [0.1, 0.2, 0.3, 0.4] -> median 0.25 -> w = 0.25 / f
    weights = compute_class_weights("median_frequency", [1, 2, 3, 4], normalize=False)
    np.testing.assert_allclose(weights, [2.5, 1.25, 0.25 / 0.3, 0.625], rtol=1e-6)


@pytest.mark.parametrize("scheme, counts, kwargs, pattern", [
    ("inverse_frequency", COUNTS, {}, r"unknown class weight scheme.*sqrt_inverse"),
    ([1.0, 2.0], COUNTS, {}, r"length 4"),
    ([1.0, -2.0, 1.0, 1.0], COUNTS, {}, r">= 0"),
    ("inverse", [10, -1, 5], {}, r"non-negative"),
    ("inverse", [0, 0, 0], {}, r"positive count"),
    ("inverse", [[1, 2], [3, 4]], {}, r"1-D"),
    ("effective_number", COUNTS, {"beta": 1.0}, r"beta"),
    ([0.0, 0.0, 0.0, 1.0], COUNTS, {}, r"zero on every class"),
])
def test_errors(scheme, counts, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        compute_class_weights(scheme, counts, **kwargs)
