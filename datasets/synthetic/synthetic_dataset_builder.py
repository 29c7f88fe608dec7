"""Synthetic land-cover scenes: a dataset that needs no download.

Each scene is a patchwork of contiguous regions (a domain-warped Voronoi tessellation),
each region one of six land-cover classes with its own colour *and texture*:

=============  ==========================================================
urban          grey blocks on a regular street grid (structured, high frequency)
agriculture    parallel stripes at a random angle per field (crop rows)
rangeland      olive green, medium-scale mottling
forest         dark green, strong blobby canopy texture
water          dark blue, smooth, with gentle ripples
barren         tan, smooth with fine grain
=============  ==========================================================

Colours overlap on purpose (agriculture and rangeland share hues, forest and rangeland
both are green, scenes get a random illumination and haze), so that a model must use
texture and context, not a colour lookup. Translucent "clouds" cover some pixels; where
a cloud is thick the label is the ignore label (255), as real datasets mark clouds.

Scenes are generated deterministically from ``(split, index)`` with numpy's PCG64 and
Pillow's resampling only, so every machine prepares the same bytes.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lcseg.data.metadata import IGNORE_LABEL, get_metadata
from lcseg.data.tfds_builder import GeneratedBuilder

SCENE_SIZE = 128
SPLIT_SIZES = {"train": 480, "validation": 48, "test": 48}
# Independent random streams per split, fixed forever (changing them changes the data).
SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}

URBAN, AGRICULTURE, RANGELAND, FOREST, WATER, BARREN = range(6)
# Mean colour of each class before texture, illumination and noise.
BASE_COLOURS = np.array([
    [128, 124, 120],  # urban
    [150, 150, 70],   # agriculture
    [130, 140, 75],   # rangeland
    [45, 90, 40],     # forest
    [35, 60, 110],    # water
    [185, 160, 120],  # barren
], np.float32)
# How often each class is drawn for a region: land cover is imbalanced.
CLASS_PROBABILITIES = np.array([0.14, 0.26, 0.2, 0.2, 0.1, 0.1])


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a cells x cells random grid, bicubically upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image), -1.0, 1.0)


def _region_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """Contiguous regions: nearest of a few random seeds, with warped coordinates."""
    num_regions = rng.integers(5, 12)
    seeds = rng.uniform(0, size, (num_regions, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    warp = size / 8
    yy = yy + warp * _smooth_noise(rng, size, 4)
    xx = xx + warp * _smooth_noise(rng, size, 4)
    distances = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    return np.argmin(distances, axis=-1)


def _texture(rng: np.random.Generator, cls: int, size: int) -> np.ndarray:
    """A size x size x 3 texture (float, around 0) characteristic of a class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if cls == URBAN:
        # Buildings: blocks of random brightness separated by darker streets.
        block = rng.integers(8, 14)
        offset = rng.integers(0, block, 2)
        by, bx = (yy + offset[0]) // block, (xx + offset[1]) // block
        roofs = rng.uniform(-45, 45, (size // 6 + 3, size // 6 + 3))[
            by.astype(int) % (size // 6 + 3), bx.astype(int) % (size // 6 + 3)]
        streets = ((yy + offset[0]) % block < 2) | ((xx + offset[1]) % block < 2)
        gray = np.where(streets, -55.0, roofs)
        return np.repeat(gray[..., None], 3, axis=-1)
    if cls == AGRICULTURE:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(4, 8)
        phase = (yy * np.cos(angle) + xx * np.sin(angle)) * 2 * np.pi / period
        rows = 30 * np.sign(np.sin(phase))
        return rows[..., None] * np.array([0.8, 1.0, 0.5], np.float32)
    if cls == RANGELAND:
        mottle = 25 * _smooth_noise(rng, size, size // 8)
        return mottle[..., None] * np.array([1.0, 0.9, 0.6], np.float32)
    if cls == FOREST:
        canopy = 40 * _smooth_noise(rng, size, size // 3)
        return canopy[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
    if cls == WATER:
        ripples = 6 * _smooth_noise(rng, size, 6)
        return ripples[..., None] * np.array([0.5, 0.7, 1.0], np.float32)
    # Barren: smooth ground with fine grain.
    grain = rng.normal(0, 10, (size, size)).astype(np.float32)
    return grain[..., None] * np.array([1.0, 0.9, 0.7], np.float32)


def generate_scene(split: str, index: int, size: int = SCENE_SIZE) -> dict[str, np.ndarray]:
    """Generates scene ``index`` of ``split``: ``{'image': HxWx3 uint8, 'label': HxW uint8}``."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    regions = _region_map(rng, size)
    region_classes = rng.choice(len(BASE_COLOURS), size=regions.max() + 1,
                                p=CLASS_PROBABILITIES)
    label = region_classes[regions].astype(np.uint8)

    image = np.zeros((size, size, 3), np.float32)
    for region, cls in enumerate(region_classes):
        inside = regions == region
        if not inside.any():
            continue
        # Each region varies its class colour a little (fields differ, so do lakes).
        colour = BASE_COLOURS[cls] + rng.normal(0, 12, 3)
        image[inside] = colour + _texture(rng, cls, size)[inside]

    # Scene-wide illumination and haze, then sensor noise.
    image = image * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    image += rng.normal(0, 6, image.shape)

    # Clouds: soft white blobs in some scenes; thick cloud hides the ground (ignored).
    if rng.random() < 0.4:
        density = _smooth_noise(rng, size, 5)
        opacity = np.clip((density - rng.uniform(0.2, 0.5)) * 3.0, 0.0, 1.0)
        image = image * (1 - opacity[..., None]) + 235.0 * opacity[..., None]
        label = np.where(opacity > 0.6, IGNORE_LABEL, label).astype(np.uint8)

    return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": label}


class Builder(GeneratedBuilder):
    """Synthetic land-cover scenes (6 classes, 128x128, clouds ignored)."""

    name = "lcseg_synthetic"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    METADATA = get_metadata("synthetic")

    SPLIT_SIZES = SPLIT_SIZES
    generate_scene = staticmethod(generate_scene)
