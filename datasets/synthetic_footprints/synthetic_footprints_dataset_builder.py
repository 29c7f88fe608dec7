"""Synthetic building footprints: a binary dataset like xView2's that needs no download.

Each 64x64 scene is a piece of suburb seen from above, labelled ``background`` (0) or
``building`` (1), with no ignored pixel (as in xView2's footprint labels):

* Ground: grass (green, blobby mottling), patches of bare soil (tan, fine grain), and
  in most scenes one or two straight asphalt roads (grey, smooth, with a pale centre line).
* Buildings: a few small rectangles, axis-aligned or rotated by up to ~20 degrees,
  with flat roofs of one of a few colours (terracotta, pale concrete, blue metal), each
  roof split in two halves of slightly different brightness (a gable lit from one side).
* Shadows: every building casts a dark shadow on the side away from the scene's sun;
  a shadow is ground, not building, so the model must find the roof's edge.

Buildings cover roughly 5-10% of the pixels (some scenes have none), so the class
imbalance that makes class weighting matter on xView2 (~5% buildings) is there too. Roofs
differ from the ground by colour and texture (flat versus mottled), so a tiny model learns
the task in a few hundred steps; tests and the tiny hypercolumn configs train on it.

Scenes are generated deterministically from ``(split, index)`` with numpy's PCG64 and
Pillow's resampling only, so every machine prepares the same bytes.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from lcseg.data.metadata import get_metadata
from lcseg.data.tfds_builder import GeneratedBuilder

SCENE_SIZE = 64
# Small on purpose: preparing the whole dataset takes about a second.
SPLIT_SIZES = {"train": 200, "validation": 24, "test": 24}
# Independent random streams per split, fixed forever (changing them changes the data).
# They differ from datasets/synthetic's seeds so the two datasets share no stream.
SPLIT_SEEDS = {"train": 101, "validation": 102, "test": 103}

BACKGROUND, BUILDING = 0, 1
GRASS = np.array([75, 110, 50], np.float32)
SOIL = np.array([160, 130, 95], np.float32)
ASPHALT = np.array([100, 100, 104], np.float32)
# Roof colours: distinct from the ground's hues (a colour lookup gets far, not all the way:
# pale concrete is close to soil in brightness, blue metal to asphalt in darkness).
ROOF_COLOURS = np.array([
    [175, 85, 60],    # terracotta tiles
    [205, 200, 190],  # pale concrete
    [80, 115, 150],   # blue metal
], np.float32)
# Scenes with no building at all: xView2 has many (fields, forest, water).
EMPTY_SCENE_PROBABILITY = 0.1
# Shadows darken the ground to this fraction of its brightness.
SHADOW_FACTOR = 0.45


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [-1, 1]: a cells x cells random grid, bicubically upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(image), -1.0, 1.0)


def _ground(rng: np.random.Generator, size: int) -> np.ndarray:
    """Grass with soil patches and roads: a size x size x 3 float image (no buildings)."""
    grass = GRASS + rng.normal(0, 8, 3) + 22 * _smooth_noise(rng, size, size // 4)[..., None]
    soil = SOIL + rng.normal(0, 8, 3) + rng.normal(0, 9, (size, size, 1))
    # Soil where a coarse noise field exceeds a random threshold: irregular patches.
    soil_mask = _smooth_noise(rng, size, 4) > rng.uniform(0.2, 0.8)
    image = np.where(soil_mask[..., None], soil, grass)

    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(rng.choice([0, 1, 2], p=[0.25, 0.5, 0.25])):
        # Straight roads along a row or a column (suburban streets are a grid).
        width = rng.integers(3, 6)
        start = rng.integers(0, size - width)
        along = yy if rng.random() < 0.5 else xx
        road = (along >= start) & (along < start + width)
        image[road] = ASPHALT + rng.normal(0, 3, (int(road.sum()), 3))
        centre = along == start + width // 2
        image[centre & ((yy + xx) % 6 < 3)] = (190, 190, 180)  # dashed centre line
    return image


def _rectangle(size: int, centre: np.ndarray, half: np.ndarray, angle: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose centre lies in a rotated rectangle, and their side of its ridge.

    Args:
      size: scene size.
      centre: (row, column) of the rectangle's centre.
      half: half extents (along its first axis, along its second axis).
      angle: rotation in radians.

    Returns:
      ``(inside, first_half)``: boolean size x size masks; ``first_half`` marks the
      pixels with a negative coordinate along the rectangle's first axis (one roof slope).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = yy - centre[0], xx - centre[1]
    u = dy * np.cos(angle) + dx * np.sin(angle)
    v = -dy * np.sin(angle) + dx * np.cos(angle)
    inside = (np.abs(u) <= half[0]) & (np.abs(v) <= half[1])
    return inside, u < 0


def _shift(mask: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """``mask`` moved by ``offset`` (rows, columns), filled with False (np.roll would wrap
    a shadow around to the opposite edge)."""
    shifted = np.zeros_like(mask)
    (dy, dx), (h, w) = offset, mask.shape
    shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return shifted


def generate_scene(split: str, index: int, size: int = SCENE_SIZE) -> dict[str, np.ndarray]:
    """Generates scene ``index`` of ``split``.

    Args:
      split: ``'train'``, ``'validation'`` or ``'test'``.
      index: the scene's index within its split.
      size: side of the square scene in pixels.

    Returns:
      ``{'image': HxWx3 uint8, 'label': HxW uint8}`` with labels 0 (background) and
      1 (building).
    """
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    image = _ground(rng, size)
    label = np.zeros((size, size), np.uint8)

    # One sun per scene: every shadow falls the same way, 1-3 px from its building.
    shadow_offset = rng.integers(1, 4, 2) * rng.choice([-1, 1], 2)
    num_buildings = 0 if rng.random() < EMPTY_SCENE_PROBABILITY else rng.integers(2, 7)
    roofs = []
    for _ in range(num_buildings):
        # A few tries to place a building that does not touch one already placed.
        for _ in range(10):
            half = rng.uniform(2.5, 6.0, 2)
            centre = rng.uniform(half.max() + 1, size - half.max() - 1, 2)
            angle = 0.0 if rng.random() < 0.5 else rng.uniform(-0.35, 0.35)
            inside, first_half = _rectangle(size, centre, half, angle)
            grown, _ = _rectangle(size, centre, half + 2, angle)
            if not (grown & (label == BUILDING)).any():
                break
        else:
            continue
        label[inside] = BUILDING
        roofs.append((inside, first_half))

    # Shadows first (the roof mask shifted away from the sun, on the ground only), then
    # roofs on top, so a roof is never darkened by a neighbour's shadow.
    buildings = label == BUILDING
    shadow = _shift(buildings, shadow_offset) & ~buildings
    image[shadow] *= SHADOW_FACTOR
    for inside, first_half in roofs:
        colour = ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))] + rng.normal(0, 10, 3)
        slope = rng.uniform(6, 14)  # one slope lit, the other in half-shade
        roof = colour + np.where(first_half, slope, -slope)[..., None]
        image[inside] = roof[inside]

    # Scene-wide illumination, then sensor noise.
    image = image * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12)
    image += rng.normal(0, 4, image.shape)
    return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": label}


class Builder(GeneratedBuilder):
    """Synthetic building footprints (background/building, 64x64, ~5-10% buildings)."""

    name = "lcseg_synthetic_footprints"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    METADATA = get_metadata("synthetic_footprints")

    SPLIT_SIZES = SPLIT_SIZES
    generate_scene = staticmethod(generate_scene)
