"""ResNet-18/34/50/101 encoders in torchvision's layout, so ImageNet weights import as-is.

Layout (torchvision ``resnet*``, "V1.5"): a 7x7 stride-2 conv, BatchNorm, ReLU and a 3x3
stride-2 max-pool; four stages of basic blocks (two 3x3 convs; ResNet-18/34) or
bottleneck blocks (1x1, 3x3, 1x1 with 4x expansion; ResNet-50/101) whose first block
carries the stride, on the 3x3 conv of a bottleneck; a 1x1 conv + BatchNorm projection
("downsample") where the shortcut changes shape. Every convolution pads explicitly and
symmetrically by ``dilation * (kernel // 2)`` as PyTorch does, never with 'SAME' (which
pads strided convolutions asymmetrically): features of imported weights then equal
torchvision's.

Submodule names follow torchvision's state dict (``conv1``, ``bn1``, ``layer3_1/conv2``,
``layer2_0/downsample_0`` for ``layer2.0.downsample.0``), which is what
``lcseg.models.import_weights`` relies on.

Output stride 16 or 8 replaces the stride of the last one or two stages by dilation.
``dilation_style='torchvision'`` is torchvision's ``replace_stride_with_dilation``: the
first block of a dilated stage keeps the previous dilation on its first 3x3 conv (the one
that carried the stride) and everything after uses the new one (2 for output stride 16;
2 then 4 for 8; torchvision's basic block refuses dilation, this one follows the same
rule). ``'uniform'`` dilates every 3x3 conv
of the stage alike, as segmentation_models_pytorch's encoders do. The parameters are the
same either way.

The encoder returns the features of the stem (stride 2, before the max-pool) and of each
stage (strides 4, 8, 16, 32 at output stride 32).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcseg.models.layers import HE_INIT, batch_norm
from lcseg.models.torch_checkpoint import hwio, module_path

# Name -> (blocks per stage, bottleneck blocks).
RESNETS: dict[str, tuple[tuple[int, ...], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}
EXPANSION = 4  # Bottleneck output channels / inner channels.


class ResNetBlock(nn.Module):
    """A basic or bottleneck residual block (torchvision's ``BasicBlock``/``Bottleneck``).

    Attributes:
      planes: inner channels (the output has ``planes`` or ``4 * planes``).
      bottleneck: bottleneck (1x1, 3x3, 1x1) or basic (3x3, 3x3) block.
      stride: stride of the first 3x3 conv (and of the projection shortcut).
      dilations: dilation of the block's 3x3 convs, in order (one for a bottleneck).
      project: whether the shortcut is a 1x1 conv + BatchNorm projection.
      dtype: compute dtype.
    """

    planes: int
    bottleneck: bool
    stride: int = 1
    dilations: Sequence[int] = (1, 1)
    project: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                                 param_dtype=jnp.float32, kernel_init=HE_INIT)
        norm = functools.partial(batch_norm, train=train, dtype=self.dtype)

        def conv3x3(features, stride, dilation, name):
            return conv(features, (3, 3), strides=stride, padding=dilation,
                        kernel_dilation=dilation, name=name)

        if self.bottleneck:
            out_features = self.planes * EXPANSION
            y = nn.relu(norm(name="bn1")(conv(self.planes, (1, 1), name="conv1")(x)))
            y = conv3x3(self.planes, self.stride, self.dilations[0], "conv2")(y)
            y = nn.relu(norm(name="bn2")(y))
            y = norm(name="bn3")(conv(out_features, (1, 1), name="conv3")(y))
        else:
            out_features = self.planes
            y = conv3x3(self.planes, self.stride, self.dilations[0], "conv1")(x)
            y = nn.relu(norm(name="bn1")(y))
            y = norm(name="bn2")(conv3x3(self.planes, 1, self.dilations[1], "conv2")(y))
        if self.project:
            x = conv(out_features, (1, 1), strides=self.stride, name="downsample_0")(x)
            x = norm(name="downsample_1")(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """A ResNet feature extractor (no pooling or classifier).

    Attributes:
      stage_sizes: blocks per stage (four stages).
      bottleneck: bottleneck blocks (ResNet-50/101) or basic blocks (ResNet-18/34).
      output_stride: 32, 16 or 8: the stride of the last stage's features.
      dilation_style: ``'torchvision'`` or ``'uniform'`` (see the module docstring).
      base_width: channels of the stem and the first stage (64 in every ImageNet ResNet;
        smaller widths are for prototyping and tests, and cannot load ImageNet weights).
      dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    """

    stage_sizes: Sequence[int] = RESNETS["resnet50"][0]
    bottleneck: bool = True
    output_stride: int = 32
    dilation_style: str = "torchvision"
    base_width: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        if self.dilation_style not in ("torchvision", "uniform"):
            raise ValueError(f"dilation_style must be 'torchvision' or 'uniform', "
                             f"got {self.dilation_style!r}")
        if len(self.stage_sizes) != 4:
            raise ValueError(f"stage_sizes needs four stages, got {tuple(self.stage_sizes)}")
        x = nn.Conv(self.base_width, (7, 7), strides=2, padding=3, use_bias=False,
                    dtype=self.dtype, param_dtype=jnp.float32, kernel_init=HE_INIT,
                    name="conv1")(x.astype(self.dtype))
        x = nn.relu(batch_norm(train=train, dtype=self.dtype, name="bn1")(x))
        features = [x]
        # Flax pads max-pooling with -inf, as PyTorch does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        # Stages 4 (output stride 16) or 3 and 4 (output stride 8) trade stride for dilation.
        first_dilated = {32: 4, 16: 3, 8: 2}[self.output_stride]
        dilation, in_features = 1, self.base_width
        expansion = EXPANSION if self.bottleneck else 1
        for stage, num_blocks in enumerate(self.stage_sizes):
            planes = self.base_width * 2**stage
            stride = 1 if stage == 0 else 2
            previous = dilation
            if stage >= first_dilated:
                dilation, stride = dilation * stride, 1
            first = previous if self.dilation_style == "torchvision" else dilation
            for index in range(num_blocks):
                first_block = index == 0
                x = ResNetBlock(
                    planes, self.bottleneck, stride=stride if first_block else 1,
                    # The conv that carried the stride keeps the previous dilation
                    # (torchvision); every later 3x3 conv of the stage takes the new one.
                    dilations=(first if first_block else dilation, dilation),
                    project=first_block and (stride != 1 or in_features != planes * expansion),
                    dtype=self.dtype, name=f"layer{stage + 1}_{index}")(x, train=train)
                in_features = planes * expansion
            features.append(x)
        return features


def resnet(name: str, *, output_stride: int = 32, dilation_style: str = "torchvision",
           base_width: int = 64, dtype: jnp.dtype = jnp.float32,
           module_name: str | None = "encoder") -> ResNet:
    """The ResNet registered as ``name`` (``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``).

    Args:
      name: the depth's name.
      output_stride: 32, 16 or 8.
      dilation_style: ``'torchvision'`` or ``'uniform'``.
      base_width: stem and first-stage channels (64 for ImageNet weights).
      dtype: compute dtype.
      module_name: the submodule name in the parent (``encoder`` is where
        ``load_pretrained`` looks for encoder weights).

    Returns:
      The unbound ResNet module.
    """
    if name not in RESNETS:
        raise ValueError(f"Unknown encoder {name!r}; valid: {sorted(RESNETS)}")
    stage_sizes, bottleneck = RESNETS[name]
    return ResNet(stage_sizes, bottleneck, output_stride, dilation_style, base_width, dtype,
                  name=module_name)


# ---------------------------------------------------------------------------------------
# torchvision's state dict in this layout (``lcseg.models.pretrained`` uses it).
# ---------------------------------------------------------------------------------------

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
# The first convolution's kernel, adapted to the input's band count when loading.
INPUT_KERNEL = ("conv1", "kernel")


def is_torch_resnet(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Whether a state dict looks like a torchvision ResNet (a 4-D ``conv1.weight``)."""
    return np.ndim(state_dict.get("conv1.weight")) == 4 and "layer1.0.conv1.weight" in state_dict


def describe_torch_resnet(state_dict: Mapping[str, np.ndarray]) -> str:
    """The architecture a torchvision ResNet state dict belongs to (``resnet50``, ...)."""
    stage_sizes = tuple(len({k.split(".")[1] for k in state_dict if k.startswith(f"layer{s}.")})
                        for s in range(1, 5))
    bottleneck = any(".conv3." in k for k in state_dict)
    width = state_dict["conv1.weight"].shape[0]
    name = next((name for name, spec in RESNETS.items() if spec == (stage_sizes, bottleneck)),
                f"resnet(stage_sizes={stage_sizes}, bottleneck={bottleneck})")
    return name if width == 64 else f"{name}, base_width={width}"


def resnet_from_torch(state_dict: Mapping[str, np.ndarray]
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A torchvision ResNet state dict as this module's ``(params, batch_stats)``.

    Kernels are transposed from OIHW to HWIO; BatchNorm ``weight``/``bias`` become
    ``scale``/``bias``, ``running_mean``/``running_var`` ``mean``/``var``; the ImageNet
    classifier ``fc`` is dropped.

    Args:
      state_dict: ``{torch name: array}`` (``lcseg.models.torch_checkpoint.read_state_dict``).

    Returns:
      ``(params, batch_stats)`` nested dicts of float32 arrays.

    Raises:
      ValueError: the state dict is not a torchvision ResNet (unknown keys are listed).
    """
    if np.ndim(state_dict.get("conv1.weight")) != 4:
        raise ValueError("Not a torchvision ResNet state dict: no 4-D 'conv1.weight'; keys "
                         f"start with {sorted(state_dict)[:5]}")
    trees: dict[str, dict] = {"params": {}, "batch_stats": {}}
    unknown = []
    for name, value in state_dict.items():
        module, _, leaf = name.rpartition(".")
        if name.startswith("fc.") or leaf == "num_batches_tracked":
            continue  # The ImageNet classifier; a counter Flax does not keep.
        value = np.asarray(value, np.float32)
        if not re.fullmatch(r"(conv1|bn1|layer\d\.\d+\.(conv\d|bn\d|downsample\.[01]))",
                            module):
            unknown.append(name)
        elif leaf == "weight" and value.ndim == 4:
            trees["params"][(*module_path(module), "kernel")] = hwio(value)
        elif leaf in _BN_LEAVES and value.ndim == 1:
            collection, flax_leaf = _BN_LEAVES[leaf]
            trees[collection][(*module_path(module), flax_leaf)] = value
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Not a torchvision ResNet state dict: unexpected key(s) {unknown}")
    return (traverse_util.unflatten_dict(trees["params"]),
            traverse_util.unflatten_dict(trees["batch_stats"]))
