"""Whole-scene inference: GeoTIFF (or JPEG / PNG) in, GeoTIFF (or PNG) out.

    python -m lcseg.predict --workdir runs/demo --input scenes/ --output predictions/
    python -m lcseg.predict --workdir runs/loveda --loveda_submission submission.zip

The command, its flags, outputs and input policy, and how a scene is predicted, are
described in ``__main__.py`` (what ``python -m lcseg.predict --help`` prints).

Package map (each module imports only the ones above it):

    windows.py    window geometry (weights, starts, reflect padding) and test-time
                  augmentation; the jitted weighted window probabilities
    scenes.py     scenes read in row bands, with the band and bit-depth policy: GeoTIFF
                  (rasterio), JPEG / PNG (Pillow), arrays; ``--input`` resolution
    predictor.py  the streaming ``Predictor`` (read-ahead of windows, blending and argmax
                  on the device) and ``predict_scene`` for images in memory
    formats.py    COGs (overviews, COG copy), class names in the PAM .aux.xml, a
                  paletted PNG written row by row
    outputs.py    ``predict_file``: COG / PNG classes, colour PNG, probabilities,
                  provenance tags, ``read_provenance``
    loveda.py     LoveDA's benchmark submission zip
    __main__.py   the command line (absl flags, ``run``, ``main``)

The public names of these modules (but not ``__main__``'s, which would define the flags)
are re-exported here: ``from lcseg.predict import Predictor, predict_scene``.
"""

from lcseg.predict.loveda import (
    LOVEDA_SUBMISSION_SIZE,
    file_images,
    loveda_test_images,
    write_loveda_submission,
)
from lcseg.predict.outputs import (
    BLOCK_SIZE,
    GDAL_CACHE_MB,
    PROBABILITY_FORMATS,
    TAG_PREFIX,
    PredictionStopped,
    predict_file,
    read_provenance,
)
from lcseg.predict.predictor import Predictor, predict_scene
from lcseg.predict.scenes import (
    GEOTIFF_SUFFIXES,
    IMAGE_SUFFIXES,
    INPUT_SUFFIXES,
    OUTPUT_SUFFIXES,
    STRETCH_MODES,
    STRETCH_PERCENTILES,
    STRETCH_SAMPLE_PIXELS,
    ArrayScene,
    ImageScene,
    RasterScene,
    Scene,
    as_scene,
    open_scene,
    resolve_inputs,
)
from lcseg.predict.windows import (
    TTA_MODES,
    WEIGHT_FLOOR,
    reflect_indices,
    tta_transforms,
    weighted_window_probabilities,
    window_starts,
    window_weights,
)

__all__ = [
    "BLOCK_SIZE", "GDAL_CACHE_MB", "GEOTIFF_SUFFIXES", "IMAGE_SUFFIXES", "INPUT_SUFFIXES",
    "LOVEDA_SUBMISSION_SIZE", "OUTPUT_SUFFIXES", "PROBABILITY_FORMATS", "STRETCH_MODES",
    "STRETCH_PERCENTILES", "STRETCH_SAMPLE_PIXELS", "TAG_PREFIX", "TTA_MODES", "WEIGHT_FLOOR",
    "ArrayScene", "ImageScene", "PredictionStopped", "Predictor", "RasterScene", "Scene",
    "as_scene", "file_images", "loveda_test_images", "open_scene", "predict_file",
    "predict_scene", "read_provenance", "reflect_indices", "resolve_inputs",
    "tta_transforms", "weighted_window_probabilities", "window_starts", "window_weights",
    "write_loveda_submission",
]
