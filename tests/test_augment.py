"""Training augmentation: image/label alignment, ignore padding, determinism, op coverage.

Alignment is checked with a coordinate image: red and green are linear ramps of the source
column and row (bilinear resampling of a linear ramp is exact, so every output pixel's
colour says which source position it sampled, to 1/8 pixel) and blue is 255 on every
source pixel (so blends with padding are recognisable). The label of a source pixel is a
function of its coordinates that differs between any two pixels less than 8 apart, so a
label resampled from anywhere but where the image sampled shows up, down to one pixel.
"""

import numpy as np
import pytest

from lcseg.data.augment import Augment, AugmentOptions, resize_example, resolve_ops
from lcseg.data.pipeline import train_iterator

SIDE = 60  # red = 4 * column + 2 stays below 255
ALL_OPS = ("random_scale", "random_crop", "dihedral", "rotate", "colour_jitter", "blur",
           "noise", "flips")


def coordinate_label(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A label that tells apart any two pixels closer than 8 in both directions."""
    return (np.mod(x, 8) + 8 * np.mod(y, 8)).astype(np.uint8)


def coordinate_example(height: int = SIDE, width: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:height, :width]
    image = np.stack([4 * x + 2, 4 * y + 2, np.full_like(x, 255)], axis=-1).astype(np.uint8)
    return image, coordinate_label(x, y)


def misaligned_pixels(image: np.ndarray, label: np.ndarray, *, tolerance: float = 0.25,
                      margin: int = 2) -> tuple[int, int]:
    """(misaligned, checked) labelled pixels of an augmented coordinate example.

    A pixel is checked when it is labelled, its image is not blended with padding, and it
    sampled at least ``margin`` pixels inside the source (where antialiasing filters are
    cut off by the image edge). Its label must be that of the source pixel containing the
    sampled position, give or take ``tolerance`` pixels (ramp quantisation; more for
    chains of resamplings).
    """
    u = (image[..., 0].astype(np.float64) - 2) / 4 + 0.5  # sampled position, in pixels
    v = (image[..., 1].astype(np.float64) - 2) / 4 + 0.5
    checked = ((label != 255) & (image[..., 2] == 255) & (u >= margin) & (v >= margin)
               & (u <= SIDE - margin) & (v <= SIDE - margin))
    ok = np.zeros(label.shape, bool)
    steps = range(-int(np.ceil(tolerance)), int(np.ceil(tolerance)) + 1)
    for dx in steps:  # every source pixel within the tolerance of the sampled position
        for dy in steps:
            x, y = np.floor(u) + dx, np.floor(v) + dy
            near = ((np.abs(x + 0.5 - u) <= 0.5 + tolerance)
                    & (np.abs(y + 0.5 - v) <= 0.5 + tolerance))
            ok |= near & (coordinate_label(x, y) == label)
    return int(np.sum(checked & ~ok)), int(np.sum(checked))


def augment(ops, crop_size: int = 32, downscale: float = 1.0, **options) -> Augment:
    return Augment(AugmentOptions(ops=tuple(ops), **options), crop_size=crop_size,
                   downscale=downscale)


def test_alignment_check_detects_a_one_pixel_shift():
    image, label = coordinate_example()
    assert misaligned_pixels(image, label) == (0, (SIDE - 4) ** 2)
    bad, checked = misaligned_pixels(image[:, 1:], label[:, :-1])
    assert bad == checked > 0


@pytest.mark.parametrize("ops, downscale, options, tolerance", [
    (("random_crop",), 1.0, {}, 0.25),
    (("flips",), 1.0, {}, 0.25),
    (("dihedral",), 1.0, {}, 0.25),
    (("random_scale", "random_crop"), 1.0, {"scale_range": (0.5, 2.0)}, 0.25),
    (("random_resized_crop",), 1.0, {"resized_crop_area": (0.1, 1.0)}, 0.25),
    (("rotate",), 1.0, {"rotation_degrees": 45.0}, 0.25),
    (("random_crop",), 0.6, {}, 0.25),  # downscale fused into the crop
    (("blur", "random_crop"), 0.6, {"blur_probability": 0.0}, 0.25),  # whole image resized
    # Chains of two resamplings (scale, crop and downscale fuse into one): each nearest
    # resampling may pick a label up to 0.5 pixel of its input away (0.71 when rotated),
    # and the errors add up (at scales >= 1: 0.5 + 0.71 + ramp quantisation < 1.5).
    (("random_scale", "dihedral", "random_crop", "rotate", "flips"), 0.8,
     {"rotation_degrees": 30.0, "scale_range": (1.25, 2.0)}, 1.5),
    (("rotate", "random_resized_crop", "dihedral"), 1.0, {"resized_crop_area": (0.1, 0.3)},
     1.5),
])
def test_geometric_ops_keep_image_and_label_aligned(ops, downscale, options, tolerance):
    image, label = coordinate_example()
    transform = augment(ops, downscale=downscale, **options)
    for seed in range(12):
        out_image, out_label = transform.apply(image, label, np.random.default_rng(seed))
        assert out_image.shape == (32, 32, 3) and out_label.shape == (32, 32)
        bad, checked = misaligned_pixels(out_image, out_label, tolerance=tolerance)
        assert bad == 0 and checked > 0.3 * 32 * 32, (seed, bad, checked)


def test_evaluation_downscale_keeps_image_and_label_aligned():
    image, label = coordinate_example()
    for scale in (0.25, 0.4, 0.5, 0.75):
        small_image, small_label = resize_example(image, label, scale)
        assert small_label.shape == (int(SIDE * scale + 0.5),) * 2
        bad, checked = misaligned_pixels(small_image, small_label, margin=int(2 / scale))
        assert bad == 0 and checked > 0.3 * small_label.size, (scale, bad, checked)


def test_scaling_fused_into_the_crop_matches_resizing_then_cropping():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    label = rng.integers(0, 250, (90, 70), dtype=np.uint8)
    for seed, scale in enumerate((0.37, 0.5, 0.83, 1.3, 2.0)):
        fused = augment(("random_crop",), downscale=scale).apply(
            image, label, np.random.default_rng(seed))
        unfused = augment(("random_crop",)).apply(
            *resize_example(image, label, scale), np.random.default_rng(seed))
        assert np.abs(fused[0].astype(int) - unfused[0]).max() <= 1  # float rounding
        # Labels differ only in rows or columns where nearest had a tie (two source rows
        # equally near, e.g. every 5th row at 0.83) and rounding took the other one;
        # their alignment is checked by test_geometric_ops_keep_image_and_label_aligned.
        assert np.mean(fused[1] == unfused[1]) > 0.8


def test_padding_is_ignore_and_black_exactly():
    image, label = coordinate_example(40, 40)
    # Scaled down to 20x20 inside a 32x32 crop: the rest is padding.
    for seed in range(4):
        out_image, out_label = augment(("random_scale", "random_crop"), scale_range=(0.5, 0.5))\
            .apply(image, label, np.random.default_rng(seed))
        padding = out_label == 255
        assert padding.sum() == 32 * 32 - 20 * 20
        assert np.all(out_image[padding] == 0) and np.all(out_image[~padding, 2] > 0)
    # Rotation: uncovered corners are ignored and black; the rest keeps its label.
    out_image, out_label = augment(("random_crop", "rotate"), rotation_degrees=30.0)\
        .apply(image, label, np.random.default_rng(0))
    padding = out_label == 255
    assert padding.sum() > 20 and np.all(out_image[padding] == 0)
    # A resized crop stays inside the image: nothing to pad.
    _, out_label = augment(("random_resized_crop",)).apply(image, label,
                                                           np.random.default_rng(0))
    assert not np.any(out_label == 255)


def test_rotate_keeps_the_image_under_a_sources_own_ignore_pixels():
    image, label = coordinate_example(32, 32)
    label = label.copy()
    label[8:24, 8:24] = 255  # e.g. clouds: ignored, but the image is real
    out_image, out_label = augment(("rotate",), rotation_degrees=20.0)\
        .apply(image, label, np.random.default_rng(1))
    # The 16x16 ignored block is rotated, not erased: about as many ignored pixels as
    # the block had still show the source image (blue 255; padding would be 0).
    assert abs(np.sum((out_label == 255) & (out_image[..., 2] == 255)) - 16 * 16) <= 16
    assert np.sum((out_label[12:20, 12:20] == 255) & (out_image[12:20, 12:20, 2] == 255)) == 64


def test_dihedral_reaches_the_eight_symmetries_and_flips_four():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    label = image[..., 0].copy()
    symmetries = {np.rot90(t, k).tobytes() for t in (image, image.transpose(1, 0, 2))
                  for k in range(4)}
    assert len(symmetries) == 8
    for ops, expected in (("dihedral", 8), ("flips", 4)):
        transform = augment((ops,), crop_size=4)
        seen = set()
        for seed in range(64):
            out_image, out_label = transform.apply(image, label, np.random.default_rng(seed))
            np.testing.assert_array_equal(out_label, out_image[..., 0])
            seen.add(out_image.tobytes())
        assert len(seen) == expected and seen <= symmetries


def test_colour_ops_change_the_image_and_never_the_label():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    label = rng.integers(0, 6, (24, 24), dtype=np.uint8)
    transform = augment(("colour_jitter", "blur", "noise"), crop_size=24, brightness=0.4,
                        contrast=0.4, saturation=0.4, hue=0.1, blur_probability=1.0,
                        noise_probability=1.0)
    for seed in range(5):
        out_image, out_label = transform.apply(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_label, label)
        assert out_image.dtype == np.uint8 and not np.array_equal(out_image, image)


def test_colour_jitter_is_identity_at_zero_strength_and_keeps_grey_grey():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    label = np.zeros((16, 16), np.uint8)
    still = augment(("colour_jitter",), crop_size=16, brightness=0.0, contrast=0.0,
                    saturation=0.0, hue=0.0)
    np.testing.assert_array_equal(still.apply(image, label, rng)[0], image)
    grey = np.repeat(image[..., :1], 3, axis=-1)
    hue_only = augment(("colour_jitter",), crop_size=16, brightness=0.0, contrast=0.0,
                       saturation=0.5, hue=0.5)
    out = hue_only.apply(grey, label, rng)[0].astype(int)
    assert np.abs(out - grey).max() <= 1  # no chroma to rotate or scale


def test_noise_has_the_configured_strength():
    image = np.full((64, 64, 3), 128, np.uint8)
    label = np.zeros((64, 64), np.uint8)
    out = augment(("noise",), crop_size=64, noise_std=5.0, noise_probability=1.0)\
        .apply(image, label, np.random.default_rng(0))[0]
    assert 4.5 < np.std(out.astype(float) - 128) < 5.5


def test_a_fixed_seed_gives_the_same_augmented_batches():
    image, label = coordinate_example(48, 40)
    source = [{"image": image, "label": label}] * 3
    options = dict(ops=ALL_OPS, blur_probability=0.5, noise_probability=0.5)

    def first_batches(seed: int) -> list[dict[str, np.ndarray]]:
        iterator = train_iterator(source, batch_size=3, crop_size=24, seed=seed,
                                  augment=options, downscale=0.9)
        return [next(iterator) for _ in range(2)]

    batches, again, other = first_batches(5), first_batches(5), first_batches(6)
    for batch, same, different in zip(batches, again, other):
        assert batch["image"].shape == (3, 24, 24, 3) and batch["label"].shape == (3, 24, 24)
        np.testing.assert_array_equal(batch["image"], same["image"])
        np.testing.assert_array_equal(batch["label"], same["label"])
        assert not np.array_equal(batch["image"], different["image"])


def test_op_lists_end_with_a_crop():
    assert resolve_ops(["flips"]) == ("flips", "random_crop")
    assert resolve_ops(["random_crop", "random_scale"]) == (
        "random_crop", "random_scale", "random_crop")
    assert resolve_ops(["random_scale", "random_resized_crop", "rotate"]) == (
        "random_scale", "random_resized_crop", "rotate")


def test_config_errors_name_the_field_and_the_valid_values():
    with pytest.raises(ValueError, match="Unknown augmentation op 'flip' in config.augment.ops"
                                         ".*random_crop.*dihedral.*noise"):
        AugmentOptions.from_config({"ops": ["random_crop", "flip"]})
    with pytest.raises(ValueError, match="Unknown config.augment field.*'scale'"):
        AugmentOptions.from_config({"scale": (0.5, 2.0)})
    with pytest.raises(ValueError, match=r"config.augment.hue=0.7"):
        AugmentOptions.from_config({"hue": 0.7})
    with pytest.raises(ValueError, match="config.data.downscale=0"):
        train_iterator([], batch_size=1, crop_size=8, seed=0, downscale=0)


def test_default_config_is_accepted():
    from configs.default import get_config

    options = AugmentOptions.from_config(get_config().augment)
    assert options.ops == ("random_crop", "flips")
