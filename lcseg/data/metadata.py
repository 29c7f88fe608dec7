"""Dataset metadata: the one place where label semantics are decided.

Every dataset lcseg knows is described here once: its evaluated classes (in label-index
order), the palette used to draw them, the ignore label, and which TFDS builder
prepares it. Losses, metrics, augmentations, writers and the predictor all read these
facts from here rather than restating them.

Labels are stored by every builder as evaluated-class indices ``0..C-1``; every pixel
that is not evaluated (clouds, no-data, "unknown") carries ``IGNORE_LABEL``.
"""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np

IGNORE_LABEL = 255
# Drawn for ignored pixels in every visualisation (a neutral grey).
IGNORE_COLOUR = (128, 128, 128)


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """What lcseg needs to know about one dataset.

    Attributes:
      name: registry name, as in ``config.dataset.name``.
      class_names: evaluated classes, index ``i`` is label value ``i``.
      palette: one RGB colour per class.
      builder: ``"module:Class"`` of the TFDS builder that prepares it.
      needs_manual_dir: whether preparing needs downloaded archives.
      ignore_label: label value excluded from losses and metrics.
      resolution_cm: ground sampling distance of the published images in cm/px, or None
        where it varies or is not a fact of the data (exported models record it).
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    builder: str
    needs_manual_dir: bool = True
    ignore_label: int = IGNORE_LABEL
    resolution_cm: float | None = None

    def __post_init__(self):
        if len(self.class_names) != len(self.palette):
            raise ValueError(f"{self.name}: {len(self.class_names)} classes but "
                             f"{len(self.palette)} palette colours")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def palette_array(self) -> np.ndarray:
        """A 256x3 uint8 lookup table: class colours, ignore grey, black elsewhere."""
        table = np.zeros((256, 3), np.uint8)
        table[: self.num_classes] = np.asarray(self.palette, np.uint8)
        table[self.ignore_label] = IGNORE_COLOUR
        return table

    def builder_class(self) -> type:
        """Imports and returns the TFDS builder class (registers it with TFDS)."""
        module_name, class_name = self.builder.split(":")
        return getattr(importlib.import_module(module_name), class_name)


DATASETS: dict[str, DatasetMetadata] = {
    meta.name: meta
    for meta in [
        DatasetMetadata(
            name="synthetic",
            class_names=("urban", "agriculture", "rangeland", "forest", "water", "barren"),
            palette=((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255),
                     (255, 255, 255)),
            builder="datasets.synthetic.synthetic_dataset_builder:Builder",
            needs_manual_dir=False,
        ),
        # A binary stand-in for xView2 (same classes and palette) that needs no download.
        DatasetMetadata(
            name="synthetic_footprints",
            class_names=("background", "building"),
            palette=((0, 0, 0), (255, 255, 255)),
            builder="datasets.synthetic_footprints.synthetic_footprints_dataset_builder:Builder",
            needs_manual_dir=False,
        ),
        # DeepGlobe's "unknown" class is not evaluated: it becomes the ignore label.
        DatasetMetadata(
            name="deepglobe",
            class_names=("urban_land", "agriculture_land", "rangeland", "forest_land", "water",
                         "barren_land"),
            palette=((0, 255, 255), (255, 255, 0), (255, 0, 255), (0, 255, 0), (0, 0, 255),
                     (255, 255, 255)),
            builder="datasets.deepglobe.deepglobe_dataset_builder:Builder",
            resolution_cm=50.0,  # DigitalGlobe RGB at 50 cm/px (Demir et al., 2018).
        ),
        # LoveDA raw mask value v is stored as v - 1; raw 0 (no-data) is ignored.
        DatasetMetadata(
            name="loveda",
            class_names=("background", "building", "road", "water", "barren", "forest",
                         "agriculture"),
            palette=((255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255), (159, 129, 183),
                     (0, 255, 0), (255, 195, 128)),
            builder="datasets.loveda.loveda_dataset_builder:Builder",
            resolution_cm=30.0,  # 0.3 m/px (Wang et al., 2021).
        ),
        # LandCover.ai publishes no palette; these are the commonly used colours. Its
        # orthophotos are at 25 or 50 cm/px: no single resolution.
        DatasetMetadata(
            name="landcoverai",
            class_names=("background", "building", "woodland", "water", "road"),
            palette=((0, 0, 0), (97, 74, 74), (38, 115, 0), (0, 197, 255), (207, 207, 207)),
            builder="datasets.landcoverai.landcoverai_dataset_builder:Builder",
        ),
        # xView2 footprints: building = pre-disaster target > 0. Every pixel is labelled,
        # so no pixel carries the ignore label; white on black, as footprint masks are drawn.
        DatasetMetadata(
            name="xview2",
            class_names=("background", "building"),
            palette=((0, 0, 0), (255, 255, 255)),
            builder="datasets.xview2.xview2_dataset_builder:Builder",
        ),
    ]
}


def get_metadata(name: str) -> DatasetMetadata:
    """Returns the metadata of dataset ``name`` or raises a ValueError naming the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown dataset {name!r} (config.dataset.name); valid: {sorted(DATASETS)}"
        ) from None
