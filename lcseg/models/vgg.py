"""VGG16 feature extractor in torchvision's layout, so ImageNet weights import as-is.

Layout (torchvision ``vgg16``, configuration "D" without BatchNorm): thirteen 3x3
convolutions with bias, padding 1, each followed by a ReLU, in five blocks of 2, 2, 3, 3
and 3 convolutions separated by 2x2 stride-2 max-pools (floor mode, as PyTorch's
``MaxPool2d(2, 2)``: an odd row or column at the bottom/right is dropped). The fifth
pool and the classifier only feed ImageNet classification and are left out.

Submodules are named after torchvision's ``features`` indices (``features.0.weight`` ->
``features_0/kernel``, HWIO instead of OIHW; ``features.0.bias`` -> ``features_0/bias``):
the convolutions sit at indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 of
``torchvision.models.vgg16().features`` (each ReLU and pool takes an index too). The
thirteen convolutions hold 14,714,688 parameters. ``vgg16_from_torch`` converts a
torchvision state dict.

The backbone returns a list of feature maps, finest first: by default (``outputs=
'pool'``) the last convolution's activation (after its ReLU) before each pool, at strides
1, 2, 4, 8, 16 (64, 128, 256, 512, 512 channels); with ``outputs='all'`` all thirteen
activations (4,224 channels together). Inputs are expected normalised; torchvision's
ImageNet weights want [0, 1] pixels normalised with ``lcseg.models.pretrained``'s
``IMAGENET_MEAN``/``IMAGENET_STD``, which ``import_weights`` records with them.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcseg.models.layers import HE_INIT
from lcseg.models.torch_checkpoint import hwio

# torchvision's cfgs["D"]: output channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")
OUTPUTS = ("pool", "all")


def vgg16_convs() -> list[tuple[int, int]]:
    """``(torchvision features index, output channels)`` of VGG16's thirteen convolutions.

    Returns:
      The convolutions in order; each conv + ReLU occupies two indices of torchvision's
      ``features`` ``Sequential``, each max-pool one.
    """
    convs, index = [], 0
    for entry in VGG16_LAYOUT:
        if entry == "M":
            index += 1
        else:
            convs.append((index, int(entry)))
            index += 2
    return convs


def vgg16_channels(outputs: str = "pool") -> list[int]:
    """Channels of the feature maps ``VGG16(outputs=outputs)`` returns, finest first."""
    if outputs == "all":
        return [width for _, width in vgg16_convs()]
    if outputs == "pool":
        widths, previous = [], None
        for entry in VGG16_LAYOUT:
            if entry == "M":
                widths.append(previous)
            else:
                previous = int(entry)
        return widths
    raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")


class VGG16(nn.Module):
    """VGG16's convolutional part (torchvision ``vgg16().features`` without the last pool).

    Attributes:
      outputs: ``'pool'``: the last activation before each pool (5 maps, strides 1 to
        16); ``'all'``: every conv's activation (13 maps). Activations are after the ReLU.
      dtype: compute dtype (parameters stay float32).
    """

    outputs: str = "pool"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """Feature maps of ``[N, H, W, C]`` (normalised) images.

        Args:
          x: ``[N, H, W, C]`` images.
          train: unused (VGG16 has neither BatchNorm nor dropout in its features); kept
            for the backbone contract shared with ``ResNet``.

        Returns:
          The feature maps, finest first, in ``dtype``.
        """
        del train
        if self.outputs not in OUTPUTS:
            raise ValueError(f"outputs must be one of {OUTPUTS}, got {self.outputs!r}")
        x = x.astype(self.dtype)
        features, index = [], 0
        for position, entry in enumerate(VGG16_LAYOUT):
            if entry == "M":
                if self.outputs == "pool":
                    features.append(x)
                if position == len(VGG16_LAYOUT) - 1:
                    break  # The fifth pool only feeds torchvision's classifier.
                # Floor mode: matches torch's MaxPool2d(2, 2) on odd sizes too.
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
                index += 1
            else:
                # torchvision initialises VGG's convs with Kaiming normal (fan-out) and
                # zero biases; HE_INIT is that initialiser.
                x = nn.Conv(int(entry), (3, 3), padding=1, use_bias=True, dtype=self.dtype,
                            param_dtype=jnp.float32, kernel_init=HE_INIT,
                            bias_init=nn.initializers.zeros, name=f"features_{index}")(x)
                x = nn.relu(x)
                if self.outputs == "all":
                    features.append(x)
                index += 2
        return features


# The params path of the kernel reading the image (adapted to the band count on loading).
INPUT_KERNEL = ("features_0", "kernel")


def is_torch_vgg16(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Whether a state dict looks like torchvision's VGG (a 4-D ``features.0.weight``)."""
    return np.ndim(state_dict.get("features.0.weight")) == 4


def describe_vgg16(state_dict: Mapping[str, np.ndarray]) -> str:
    """``'vgg16'``, with the input band count when it is not 3."""
    bands = np.shape(state_dict["features.0.weight"])[1]
    return "vgg16" if bands == 3 else f"vgg16, {bands} bands"


def vgg16_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """A torchvision ``vgg16`` state dict as ``VGG16``'s Flax ``params`` tree.

    Args:
      state_dict: ``{torch name: array}``, e.g. from
        ``lcseg.models.pretrained.read_state_dict``. ``classifier.*`` (the ImageNet
        classifier) is dropped. The first conv may have any number of input bands.

    Returns:
      ``{'features_0': {'kernel': HWIO float32, 'bias': float32}, ...}`` for the 13 convs.

    Raises:
      ValueError: keys missing or unknown (e.g. a ``vgg16_bn`` or a ResNet state dict),
        or shapes that are not VGG16's; all of them are listed.
    """
    expected: dict[str, tuple[int, ...]] = {}
    in_channels = None  # The first conv's input bands are whatever the file has.
    for index, width in vgg16_convs():
        expected[f"features.{index}.weight"] = (width, in_channels, 3, 3)
        expected[f"features.{index}.bias"] = (width,)
        in_channels = width
    kept = {name: value for name, value in state_dict.items()
            if not name.startswith("classifier.")}
    unknown = sorted(set(kept) - set(expected))
    missing = sorted(set(expected) - set(kept))
    mismatched = []
    for name in sorted(set(expected) & set(kept)):
        shape, want = tuple(np.shape(kept[name])), expected[name]
        if len(shape) != len(want) or any(w is not None and s != w
                                          for s, w in zip(shape, want)):
            mismatched.append(f"{name}: {shape}, expected {want}")
    problems = [f"{what} ({len(keys)}): {', '.join(keys)}"
                for what, keys in (("missing", missing), ("unknown", unknown),
                                   ("shape mismatch", mismatched)) if keys]
    if problems:
        raise ValueError("Not a torchvision vgg16 state dict: " + "; ".join(problems))
    flat = {}
    for name, value in kept.items():
        _, index, leaf = name.split(".")
        value = np.asarray(value, np.float32)
        if leaf == "weight":
            flat[(f"features_{index}", "kernel")] = hwio(value)
        else:
            flat[(f"features_{index}", "bias")] = value
    return traverse_util.unflatten_dict(flat)
