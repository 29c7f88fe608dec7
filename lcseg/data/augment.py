"""Training augmentation: joint image/label transforms chosen and ordered by ``config.augment``.

Every op transforms image and label together. Labels are only ever resampled with nearest
neighbour (a class is never blended into another), and every pixel that no source pixel
covers (padding of a crop larger than the image, a scaled-down image, the corners of a
rotation) gets image 0 and the ignore label, which losses and metrics skip.

Ops (``config.augment.ops``, applied in the listed order; options in ``config.augment``):

- ``random_crop``: a ``crop_size`` square at a uniform position. Along an axis where the
  image is smaller, the image is placed at a uniform offset inside the crop and the rest
  is padding.
- ``random_scale``: resize by a factor uniform in ``scale_range`` (image bilinear,
  antialiased when shrinking; label nearest).
- ``random_resized_crop``: torchvision's RandomResizedCrop: a box of ``resized_crop_area``
  of the image's area and log-uniform aspect ratio in ``resized_crop_ratio`` (10 tries,
  then a central crop), resized to ``crop_size`` square. Its output scale is set by the
  area fraction alone, so a ``random_scale`` before it, and ``downscale``, do not change
  what it produces: to train at a fixed resolution use ``random_scale`` + ``random_crop``.
- ``flips``: horizontal and vertical flips, each with probability 1/2 (4 of the 8
  dihedral transforms).
- ``dihedral``: one of the 8 symmetries of the square (identity, three 90-degree
  rotations, four reflections), uniformly. Aerial imagery has no "up".
- ``rotate``: rotation by an angle uniform in ``[-rotation_degrees, rotation_degrees]``
  about the centre, keeping the size (image bilinear, label nearest; corners padding).
- ``colour_jitter``: brightness, contrast, saturation (factors uniform in ``[1 - x, 1 + x]``)
  and hue (shift uniform in ``[-hue, hue]`` of the colour circle) in random order, as
  torchvision's ColorJitter; image only. Each is linear in RGB (hue: a rotation of the
  chroma plane in YIQ, the linear approximation of an HSV hue shift), so the four
  compose into one 3x4 colour matrix applied in one pass (clipping once, at the end).
- ``blur``: with ``blur_probability``, a Gaussian blur of standard deviation uniform in
  ``blur_sigma`` pixels; image only.
- ``noise``: with ``noise_probability``, additive Gaussian noise of ``noise_std`` (uint8
  units) per pixel and channel; image only.

Every list ends at ``crop_size x crop_size``: when no ``random_crop`` or
``random_resized_crop`` comes after the last ``random_scale`` (or there is no crop at all)
a ``random_crop`` is appended. An unknown op name is a ``ValueError`` listing the valid
ones. Randomness comes only from the ``np.random.Generator`` grain hands each element, so a
seed fixes every batch, across worker counts and checkpoint resumes.

Where the work runs, and why: on the host, in grain's worker processes, with Pillow (C
loops that release the GIL) and numpy. Measured with ``benchmarks/augment.py`` on the
2-core development CPU (one core, medians, ms per 512x512 example; crops from a 1024
source): random_crop 0.05, random_scale + random_crop 2.2 (15 unfused, see below),
random_resized_crop 3.4, flips 0.13, dihedral 0.19, rotate 6.9, colour_jitter 0.9, blur
7.1, noise 2.0, plus 0.3 of array conversions per example. Whole chains per core: the
default (random_crop, flips) about 1,100 examples/s; random_scale, random_crop, dihedral,
colour_jitter, blur and noise (at probability 0.2) about 160/s; every op with blur and
noise always about 47/s. Reasons for the host: the geometric ops take images of any
size (on device, jit would need padding and recompilation), grain overlaps this work
with the device step and spreads it over ``config.data.workers`` processes, and the
seeded grain stream stays exact and checkpointable. The per-pixel ops could run on an
accelerator after the transfer, but on the host they are among the cheap ones (a jax
version of dihedral + colour jitter + noise on this CPU took 12-26 ms per example
against 3 ms here; no GPU was available to time it). Budget the workers: a GPU trains a
U-Net on a 512x512 example in a few milliseconds, so a heavy chain needs several cores.

Scaling is lazy: ``random_scale`` (and the pipeline's ``downscale``) only record a factor,
which a following ``random_crop`` folds into one resample of just the source box it needs
(Pillow's ``resize(box=...)``: the result of resizing the whole image and then cropping,
up to float rounding: image values within 1, and now and then a label row or column
taken from the neighbouring source row where nearest had a tie). Flips and dihedral
transforms commute with scaling (up to the same ties), so they keep it pending; any
other op resizes the whole image first. Put the crop early: ops after it touch
``crop_size**2`` pixels instead of the whole (possibly 2448x2448) image.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageFilter

from lcseg.data.metadata import IGNORE_LABEL

BILINEAR = Image.Resampling.BILINEAR
NEAREST = Image.Resampling.NEAREST

# Ops whose output is crop_size x crop_size.
CROP_OPS = ("random_crop", "random_resized_crop")
OPS = ("random_crop", "random_scale", "random_resized_crop", "flips", "dihedral", "rotate",
       "colour_jitter", "blur", "noise")
DEFAULT_OPS = ("random_crop", "flips")

# The 7 non-identity symmetries of the square, as Pillow transposes (no resampling).
DIHEDRAL = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
            Image.Transpose.ROTATE_270, Image.Transpose.FLIP_LEFT_RIGHT,
            Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
            Image.Transpose.TRANSVERSE)

# ITU-R 601 luma, as torchvision's rgb_to_grayscale (saturation and contrast).
LUMA = np.array([0.299, 0.587, 0.114])
# RGB -> YIQ; hue rotates the (I, Q) chroma plane.
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                       [0.596, -0.274, -0.322],
                       [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """The augmentation ops and their options (the fields of ``config.augment``)."""

    ops: tuple[str, ...] = DEFAULT_OPS
    scale_range: tuple[float, float] = (0.5, 2.0)
    resized_crop_area: tuple[float, float] = (0.25, 1.0)
    resized_crop_ratio: tuple[float, float] = (0.75, 1.3333)
    rotation_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    blur_probability: float = 0.2
    noise_std: float = 5.0
    noise_probability: float = 0.2

    @classmethod
    def from_config(cls, augment: Mapping[str, Any] | AugmentOptions | None) -> AugmentOptions:
        """Options from ``config.augment`` (a ConfigDict or mapping); None: the defaults.

        Args:
          augment: fields to override; missing fields keep their defaults.

        Returns:
          Validated options.

        Raises:
          ValueError: an unknown field, op name or out-of-range option.
        """
        if augment is None:
            return cls()
        if isinstance(augment, AugmentOptions):
            return augment
        fields = {f.name for f in dataclasses.fields(cls)}
        values = dict(augment.items())
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"Unknown config.augment field(s) {unknown}; valid: {sorted(fields)}.")
        # ConfigDicts hold lists where configs wrote tuples; the options are hashable.
        values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()}
        options = cls(**values)
        options.validate()
        return options

    def validate(self) -> None:
        """Raises ValueError naming the ``config.augment`` field that is out of range."""
        if isinstance(self.ops, str):
            raise ValueError(f"config.augment.ops must be a list of names, got {self.ops!r}.")
        for name in self.ops:
            if name not in OPS:
                raise ValueError(f"Unknown augmentation op {name!r} in config.augment.ops; "
                                 f"valid: {', '.join(OPS)}.")
        checks = {
            "scale_range": 0 < self.scale_range[0] <= self.scale_range[1],
            "resized_crop_area": 0 < self.resized_crop_area[0] <= self.resized_crop_area[1] <= 1,
            "resized_crop_ratio": 0 < self.resized_crop_ratio[0] <= self.resized_crop_ratio[1],
            "rotation_degrees": 0 <= self.rotation_degrees <= 180,
            "brightness": 0 <= self.brightness,
            "contrast": 0 <= self.contrast,
            "saturation": 0 <= self.saturation,
            "hue": 0 <= self.hue <= 0.5,
            "blur_sigma": 0 < self.blur_sigma[0] <= self.blur_sigma[1],
            "blur_probability": 0 <= self.blur_probability <= 1,
            "noise_std": 0 <= self.noise_std,
            "noise_probability": 0 <= self.noise_probability <= 1,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"config.augment.{field}={getattr(self, field)!r} is out of "
                                 "range (see configs/default.py).")


def resolve_ops(ops: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The op list that runs: ``ops`` validated, plus a final ``random_crop`` when needed.

    Args:
      ops: op names in order.

    Returns:
      ``ops``, with ``random_crop`` appended unless a crop op follows the last
      ``random_scale`` (so every list ends at ``crop_size x crop_size``).

    Raises:
      ValueError: an unknown op name (the message lists the valid ones).
    """
    ops = tuple(ops)
    AugmentOptions(ops=ops).validate()
    last_scale = max((i for i, name in enumerate(ops) if name == "random_scale"), default=-1)
    if not any(name in CROP_OPS for name in ops[last_scale + 1:]):
        ops += ("random_crop",)
    return ops


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """``(width, height)`` times ``scale``, rounded half up, at least 1."""
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def resize_example(image: np.ndarray, label: np.ndarray,
                   scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resizes an example by ``scale``: image bilinear (antialiased), label nearest.

    Args:
      image: uint8 ``[h, w, 3]``.
      label: uint8 ``[h, w]``.
      scale: size factor (the pipeline's ``downscale``); 1 returns the inputs.

    Returns:
      ``(image, label)`` of size ``scaled_size(w, h, scale)``.
    """
    if not scale > 0:
        raise ValueError(f"config.data.downscale={scale!r} must be positive.")
    if scale == 1:
        return image, label
    size = scaled_size(label.shape[1], label.shape[0], scale)
    return (np.asarray(Image.fromarray(image).resize(size, BILINEAR)),
            np.asarray(Image.fromarray(label).resize(size, NEAREST)))


@functools.cache
def _normal_table() -> np.ndarray:
    # 2**16 fixed standard-normal draws, indexed by uniform random integers: i.i.d.
    # Gaussian noise for augmentation purposes at a fraction of the cost of drawing
    # normals for every pixel (measured: 2 ms vs 10 ms per 512x512x3).
    return np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)


@dataclasses.dataclass
class _Example:
    """An example in flight: Pillow images, and a scale factor not yet applied."""

    image: Image.Image
    label: Image.Image
    scale: float = 1.0

    def materialize(self) -> None:
        """Applies the pending scale to the whole example."""
        if self.scale != 1:
            size = scaled_size(*self.image.size, self.scale)
            self.image = self.image.resize(size, BILINEAR)
            self.label = self.label.resize(size, NEAREST)
            self.scale = 1.0


class Augment(grain.transforms.RandomMap):
    """The configured augmentation as a grain random map: ``{'image', 'label'}`` -> crops.

    Args:
      options: ops and options (``AugmentOptions.from_config(config.augment)``).
      crop_size: side of the square output.
      ignore_label: label of padding.
      downscale: resize factor applied to every example before the ops (fused into the
        first crop where possible).
    """

    def __init__(self, options: AugmentOptions | None = None, *, crop_size: int,
                 ignore_label: int = IGNORE_LABEL, downscale: float = 1.0):
        self.options = options or AugmentOptions()
        self.ops = resolve_ops(self.options.ops)
        self.options.validate()
        if not downscale > 0:  # Fail when the pipeline is built, not in a worker.
            raise ValueError(f"config.data.downscale={downscale!r} must be positive.")
        self.crop_size = crop_size
        self.ignore_label = ignore_label
        self.downscale = downscale

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image, label = self.apply(element["image"], element["label"], rng)
        return {"image": image, "label": label}

    def apply(self, image: np.ndarray, label: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Runs the ops on one example.

        Args:
          image: uint8 ``[h, w, 3]``.
          label: uint8 ``[h, w]``.
          rng: the only source of randomness.

        Returns:
          uint8 ``[crop_size, crop_size, 3]`` image and ``[crop_size, crop_size]`` label.
        """
        images, labels = self.apply_several(image, label, rng, count=1)
        return images[0], labels[0]

    def apply_several(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                      *, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Runs the ops ``count`` times on one example: independent draws, one decode.

        Each result is what ``apply`` would give for the next state of ``rng``; the
        example is converted to Pillow once (on a 2448x2448 image that copy alone costs
        as much as a crop's whole augmentation).

        Args:
          image: uint8 ``[h, w, 3]``.
          label: uint8 ``[h, w]``.
          rng: the only source of randomness, drawn from for each result in turn.
          count: number of augmented copies.

        Returns:
          uint8 ``[count, crop_size, crop_size, 3]`` images and ``[count, crop_size,
          crop_size]`` labels.
        """
        source_image, source_label = Image.fromarray(image), Image.fromarray(label)
        images, labels = [], []
        for _ in range(count):
            # Ops replace the example's images, never draw on them: the source stays intact.
            example = _Example(source_image, source_label, self.downscale)
            for name in self.ops:
                self._op(name)(example, rng)
            example.materialize()  # A no-op: every list ends with a crop.
            images.append(np.asarray(example.image))
            labels.append(np.asarray(example.label))
        return np.stack(images), np.stack(labels)

    def _op(self, name: str) -> Callable[[_Example, np.random.Generator], None]:
        return getattr(self, f"_{name}")

    # --- Geometric ops (image and label) ----------------------------------------------

    def _random_crop(self, example: _Example, rng: np.random.Generator) -> None:
        size = self.crop_size
        width, height = scaled_size(*example.image.size, example.scale)

        def place(length: int) -> tuple[int, int, int]:
            """(start in the scaled image, offset in the crop, extent) along one axis."""
            if length >= size:
                return int(rng.integers(0, length - size + 1)), 0, size
            return 0, int(rng.integers(0, size - length + 1)), length

        top, pad_top, crop_h = place(height)
        left, pad_left, crop_w = place(width)
        if example.scale == 1:
            box = (left, top, left + crop_w, top + crop_h)
            image, label = example.image.crop(box), example.label.crop(box)
        else:
            # Resample only the source box under the crop: the same pixels as resizing
            # the whole image and cropping, for a fraction of the work.
            fx, fy = example.image.size[0] / width, example.image.size[1] / height
            box = (left * fx, top * fy, (left + crop_w) * fx, (top + crop_h) * fy)
            image = example.image.resize((crop_w, crop_h), BILINEAR, box=box)
            label = example.label.resize((crop_w, crop_h), NEAREST, box=box)
        if (crop_w, crop_h) != (size, size):
            padded_image = Image.new("RGB", (size, size), 0)
            padded_image.paste(image, (pad_left, pad_top))
            padded_label = Image.new("L", (size, size), self.ignore_label)
            padded_label.paste(label, (pad_left, pad_top))
            image, label = padded_image, padded_label
        example.image, example.label, example.scale = image, label, 1.0

    def _random_scale(self, example: _Example, rng: np.random.Generator) -> None:
        example.scale *= float(rng.uniform(*self.options.scale_range))

    def _random_resized_crop(self, example: _Example, rng: np.random.Generator) -> None:
        # torchvision's RandomResizedCrop.get_params, on the unscaled source: the box is a
        # fraction of the image, so a pending scale would not change the output.
        width, height = example.image.size
        area = width * height
        log_ratio = np.log(self.options.resized_crop_ratio)
        for _ in range(10):
            target = area * rng.uniform(*self.options.resized_crop_area)
            ratio = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                break
        else:  # Central crop at the nearest allowed aspect ratio.
            ratio_lo, ratio_hi = self.options.resized_crop_ratio
            if width / height < ratio_lo:
                w, h = width, int(round(width / ratio_lo))
            elif width / height > ratio_hi:
                w, h = int(round(height * ratio_hi)), height
            else:
                w, h = width, height
            top, left = (height - h) // 2, (width - w) // 2
        box = (left, top, left + w, top + h)
        size = (self.crop_size, self.crop_size)
        example.image = example.image.resize(size, BILINEAR, box=box)
        example.label = example.label.resize(size, NEAREST, box=box)
        example.scale = 1.0

    def _flips(self, example: _Example, rng: np.random.Generator) -> None:
        # Transposes commute with the pending scale, which stays pending.
        for method in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM):
            if rng.random() < 0.5:
                example.image = example.image.transpose(method)
                example.label = example.label.transpose(method)

    def _dihedral(self, example: _Example, rng: np.random.Generator) -> None:
        method = DIHEDRAL[int(rng.integers(len(DIHEDRAL)))]
        if method is not None:
            example.image = example.image.transpose(method)
            example.label = example.label.transpose(method)

    def _rotate(self, example: _Example, rng: np.random.Generator) -> None:
        degrees = self.options.rotation_degrees
        angle = float(rng.uniform(-degrees, degrees))
        example.materialize()
        image = example.image.rotate(angle, BILINEAR, fillcolor=(0, 0, 0))
        example.label = example.label.rotate(angle, NEAREST, fillcolor=self.ignore_label)
        # Bilinear sampling blends the image into the fill near the corners, while the
        # label's nearest sampling decides which pixels are covered: zero the image
        # exactly where the label became padding (a source's own ignore pixels keep
        # their image).
        covered = Image.new("L", image.size, 255).rotate(angle, NEAREST, fillcolor=0)
        example.image = Image.composite(image, Image.new("RGB", image.size, 0), covered)

    # --- Pixel ops (image only) -------------------------------------------------------

    def _colour_jitter(self, example: _Example, rng: np.random.Generator) -> None:
        example.materialize()
        options = self.options
        # One affine colour map x -> matrix @ x + offset, composed in a random order.
        matrix, offset = np.eye(3), np.zeros(3)
        for which in rng.permutation(4):
            if which == 0:  # Brightness: scale towards black.
                factor = rng.uniform(max(0.0, 1 - options.brightness), 1 + options.brightness)
                step, shift = factor * np.eye(3), np.zeros(3)
            elif which == 1:  # Contrast: blend with the mean grey of the image so far.
                factor = rng.uniform(max(0.0, 1 - options.contrast), 1 + options.contrast)
                mean = LUMA @ (matrix @ _mean_rgb(example.image) + offset)
                step, shift = factor * np.eye(3), np.full(3, (1 - factor) * mean)
            elif which == 2:  # Saturation: blend with the pixel's own grey.
                factor = rng.uniform(max(0.0, 1 - options.saturation), 1 + options.saturation)
                step = factor * np.eye(3) + (1 - factor) * np.outer(np.ones(3), LUMA)
                shift = np.zeros(3)
            else:  # Hue: rotate the chroma plane.
                angle = 2 * math.pi * rng.uniform(-options.hue, options.hue)
                cos, sin = math.cos(angle), math.sin(angle)
                rotation = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]])
                step = YIQ_TO_RGB @ rotation @ RGB_TO_YIQ
                shift = np.zeros(3)
            matrix, offset = step @ matrix, step @ offset + shift
        affine = np.concatenate([matrix, offset[:, None]], axis=1)
        # Pillow applies the 3x4 matrix, rounds and clips in one C pass.
        example.image = example.image.convert("RGB", tuple(affine.ravel().tolist()))

    def _blur(self, example: _Example, rng: np.random.Generator) -> None:
        example.materialize()
        if rng.random() < self.options.blur_probability:
            sigma = float(rng.uniform(*self.options.blur_sigma))
            example.image = example.image.filter(ImageFilter.GaussianBlur(sigma))

    def _noise(self, example: _Example, rng: np.random.Generator) -> None:
        example.materialize()
        if rng.random() < self.options.noise_probability:
            image = np.asarray(example.image)
            table = np.rint(_normal_table() * self.options.noise_std).astype(np.int16)
            noise = table[rng.integers(0, table.size, image.shape, dtype=np.uint16)]
            noisy = np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            example.image = Image.fromarray(noisy)


def _mean_rgb(image: Image.Image) -> np.ndarray:
    """Per-channel mean from Pillow's histogram (no float copy of the image)."""
    histogram = np.asarray(image.histogram(), np.float64).reshape(3, 256)
    return histogram @ np.arange(256) / histogram[0].sum()
