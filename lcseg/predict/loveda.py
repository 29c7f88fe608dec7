"""LoveDA's benchmark submission: a flat zip of one class PNG per test image.

One PNG per image of the LoveDA test split (``loveda_test_images``) or of input files
(``file_images``), named exactly as the source file (``3514.png``), 1024x1024, uint8 class
indices 0..6, zipped flat (no folder inside the zip): ``write_loveda_submission``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

from lcseg.data import open_split, prepare_dataset
from lcseg.predict.predictor import Predictor
from lcseg.predict.scenes import Scene, as_scene, open_scene

LOVEDA_SUBMISSION_SIZE = (1024, 1024)


def loveda_test_images(data_dir: str | None = None, manual_dir: str | None = None
                       ) -> Iterator[tuple[str, str, np.ndarray]]:
    """LoveDA's test images as ``(where, submission file name, image)``.

    Ids look like ``urban/3514``; the server wants the source file name, ``3514.png``.
    """
    prepare_dataset("loveda", data_dir, manual_dir)  # Prepares it only if not there yet.
    source = open_split("loveda", "test", data_dir)
    for index in range(len(source)):
        example = source[index]
        yield (f"LoveDA test image {example['id']}",
               example["id"].rsplit("/", 1)[-1] + ".png", example["image"])


def file_images(paths: Iterable[str | os.PathLike], *, bands: Sequence[int] | None = None,
                stretch: str = "none") -> Iterator[tuple[str, str, Scene]]:
    """Input files as ``(where, submission file name, scene)``; each scene is closed when
    the next is requested."""
    for path in paths:
        with open_scene(path, bands=bands, stretch=stretch) as scene:
            yield str(path), Path(path).stem + ".png", scene


def write_loveda_submission(predictor: Predictor, output_zip: str | os.PathLike,
                            images: Iterable[tuple[str, str, np.ndarray | Scene]], *,
                            progress: bool = False) -> list[str]:
    """Writes a LoveDA benchmark submission: a flat zip of one class PNG per test image.

    Args:
      predictor: a predictor of a model trained on LoveDA (7 classes).
      output_zip: the zip to write (replaced only once complete).
      images: ``(where, file name, image)`` triples, e.g. ``loveda_test_images()`` or
        ``file_images(paths)``; ``where`` names the image in errors.
      progress: show a progress bar per image (on a terminal).

    Returns:
      The file names in the zip, in the order written.

    Raises:
      ValueError: a model not trained on LoveDA, an image that is not 1024x1024, two
        images with the same file name (the server identifies images by name), or none.
    """
    if predictor.metadata.name != "loveda":
        raise ValueError(f"A LoveDA submission needs a model trained on loveda; this one "
                         f"predicts {predictor.metadata.name!r} ({predictor.num_classes} "
                         "classes).")
    output_zip = Path(output_zip)
    output_zip.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_zip.with_name(f".{output_zip.name}.partial")
    sources: dict[str, str] = {}
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED) as archive:
            for where, name, image in images:
                if name in sources:
                    raise ValueError(
                        f"{where} and {sources[name]} would both be {name} in the "
                        "submission, which identifies images by file name only: predict "
                        "them into separate submissions.")
                sources[name] = where
                scene = as_scene(image, name=where)
                if (scene.height, scene.width) != LOVEDA_SUBMISSION_SIZE:
                    raise ValueError(f"{where} is {scene.width}x{scene.height} px; LoveDA "
                                     "test images (and submissions) are 1024x1024.")
                probabilities = predictor.predict_probabilities(scene, progress=progress)
                # The server wants a class (0..6) for every pixel: no ignore label here.
                classes = np.argmax(probabilities, axis=-1).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(classes, mode="L").save(buffer, format="PNG")
                archive.writestr(name, buffer.getvalue())  # At the root: a flat zip.
        if not sources:
            raise ValueError("No image to predict for the submission.")
        os.replace(temporary, output_zip)
    finally:
        temporary.unlink(missing_ok=True)
    logging.info("Wrote %s (%d images)", output_zip, len(sources))
    return list(sources)
