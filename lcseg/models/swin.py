"""Swin Transformer V2 backbone in torchvision's layout (``swin_v2_t/s/b``): weights import as-is.

The maths is torchvision 0.28's ``SwinTransformer`` built with ``SwinTransformerBlockV2``
and ``PatchMergingV2``:

- patch embedding: a 4x4 stride-4 convolution (any number of input bands; sizes that are
  not multiples of 4 lose their last rows/columns, as PyTorch's convolution does) and a
  LayerNorm;
- four stages of blocks with windows of 8 (every odd block shifted by 4 with the
  attention mask), each ``x + drop(norm1(attn(x)))`` then ``x + drop(norm2(mlp(x)))``
  ("res-post-norm": the LayerNorm comes after the branch, not before as in Swin V1);
- scaled cosine attention: ``cos(q, k) * exp(min(logit_scale, log 100))`` plus a
  continuous relative position bias ``16 * sigmoid(cpb_mlp(log-spaced coordinates))``;
  the key's third of the qkv bias exists as a parameter but is zeroed in the forward
  pass, as torchvision does;
- PatchMergingV2 between stages: 2x2 neighbours concatenated (odd sizes zero-padded at
  the bottom/right first), a linear reduction to twice the width, then a LayerNorm;
- feature maps of any size are zero-padded at the bottom/right to whole windows inside
  each attention and cropped back; the shift is dropped along an axis that fits in one
  window.

The module returns the four stages' outputs (torchvision's ``features[1]``, ``[3]``,
``[5]``, ``[7]``), NHWC, finest first, at strides 4, 8, 16 and 32. torchvision's final
``norm`` (applied after the last stage for its classifier) is not part of the backbone.

Parameter names follow the torchvision state dict, with a digit joined onto the name
before it: ``features.1.0.attn.qkv.weight`` is ``features_1_0/attn/qkv/kernel``; the
relative-coordinate table, the relative position index and the shift masks are constants
computed at trace time, not variables. ``swin_v2_from_torch`` converts a state dict.

Precision: matmuls and convolutions run in ``dtype`` (bfloat16 on accelerators) with
float32 parameters. The residual stream, every LayerNorm, the cosine-similarity logits
(whose scale reaches 100, so bfloat16 rounding there would be amplified), the position
bias MLP and the softmax stay float32. The returned features are cast to ``dtype``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lcseg.models.torch_checkpoint import hwio, module_path

# Name -> SwinV2 attributes, as torchvision's swin_v2_t/s/b (all with windows of 8).
SWIN_V2: dict[str, dict[str, Any]] = {
    "swin_v2_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                      stochastic_depth_prob=0.2),
    "swin_v2_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
                      stochastic_depth_prob=0.3),
    "swin_v2_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
                      stochastic_depth_prob=0.5),
}

PATCH_SIZE = 4
MLP_RATIO = 4
CPB_HIDDEN = 512  # Hidden width of the continuous position bias MLP (torchvision's).
LAYER_NORM_EPS = 1e-5
MASK_VALUE = -100.0  # torchvision adds -100 (not -inf) between shifted-window regions.

# torchvision re-initialises every Linear with trunc_normal(std=0.02) and zero bias, then
# the blocks' MLPs with Xavier-uniform weights and N(0, 1e-6) biases.
LINEAR_INIT = nn.initializers.truncated_normal(0.02)
MLP_INIT = nn.initializers.xavier_uniform()
MLP_BIAS_INIT = nn.initializers.normal(1e-6)


def _layer_norm(name: str) -> nn.LayerNorm:
    # Float32 and the two-pass variance: the exact mean/variance PyTorch computes.
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32, param_dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def relative_coords_table(window_size: int) -> np.ndarray:
    """The CPB MLP's inputs: log-spaced relative coordinates, ``[(2w-1)**2, 2]`` float32.

    Coordinates in ``[-(w-1), w-1]`` are scaled to ``[-8, 8]`` and mapped through
    ``sign(x) * log2(|x| + 1) / 3``, in float32 and in torchvision's order of operations.

    Args:
      window_size: square window side.

    Returns:
      Rows ordered by (dy, dx), dy and dx from ``-(w-1)`` to ``w-1``.
    """
    coords = np.arange(-(window_size - 1), window_size, dtype=np.float32)
    table = np.stack(np.meshgrid(coords, coords, indexing="ij"), axis=-1)
    table = table / np.float32(window_size - 1) * np.float32(8)
    table = np.sign(table) * np.log2(np.abs(table) + np.float32(1)) / np.float32(3)
    return table.reshape(-1, 2).astype(np.float32)


def relative_position_index(window_size: int) -> np.ndarray:
    """For each (query, key) pair of a window, its row in the coordinates table.

    Args:
      window_size: square window side.

    Returns:
      ``[w**4]`` integers: query-major, tokens of a window in row-major order.
    """
    coords = np.stack(np.meshgrid(np.arange(window_size), np.arange(window_size),
                                  indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window_size - 1)
    return (relative[..., 0] * (2 * window_size - 1) + relative[..., 1]).reshape(-1)


def shift_mask(padded_hw: tuple[int, int], window_size: int,
               shift: tuple[int, int]) -> np.ndarray:
    """Additive attention mask of shifted windows, ``[num_windows, w*w, w*w]``.

    After the cyclic shift, a window at the bottom/right edge holds pixels from distant
    regions; pairs from different regions get ``MASK_VALUE``. The slicing copies
    torchvision's, including its behaviour when only one axis is shifted (a zero shift
    makes the last slice ``[0:]``, which relabels the whole axis as one region).

    Args:
      padded_hw: the feature map's size after padding to whole windows.
      window_size: square window side.
      shift: the shift along each axis (0 where not shifted).

    Returns:
      0 within a region, ``MASK_VALUE`` across regions, float32.
    """
    height, width = padded_hw
    labels = np.zeros((height, width), np.float32)
    h_slices = ((0, -window_size), (-window_size, -shift[0]), (-shift[0], None))
    w_slices = ((0, -window_size), (-window_size, -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            labels[h[0]:h[1], w[0]:w[1]] = count
            count += 1
    labels = labels.reshape(height // window_size, window_size, width // window_size,
                            window_size).transpose(0, 2, 1, 3).reshape(-1, window_size**2)
    difference = labels[:, None, :] - labels[:, :, None]
    return np.where(difference != 0, MASK_VALUE, 0.0).astype(np.float32)


class QKVLinear(nn.Module):
    """The qkv projection of cosine attention: a Linear whose key bias is held at zero.

    torchvision keeps the full ``3 * dim`` bias as a parameter (pretrained files carry
    it) but zeroes its middle third in every forward pass, so this does the same.

    Attributes:
      features: output width (3 * dim).
      dtype: compute dtype.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", LINEAR_INIT, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        third = self.features // 3
        bias = jnp.asarray(bias).at[third:2 * third].set(0.0)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


class WindowAttentionV2(nn.Module):
    """Shifted-window scaled cosine attention (torchvision's ``ShiftedWindowAttentionV2``).

    Attributes:
      num_heads: attention heads.
      window_size: square window side.
      shift: the block's nominal shift (0 or ``window_size // 2``).
      dtype: compute dtype of the projections and of ``attention @ v``.
    """

    num_heads: int
    window_size: int = 8
    shift: int = 0
    dtype: jnp.dtype = jnp.float32

    def position_bias(self) -> jax.Array:
        """``16 * sigmoid(cpb_mlp(coords))`` gathered to ``[heads, w*w, w*w]``, float32."""
        table = jnp.asarray(relative_coords_table(self.window_size))
        hidden = nn.relu(nn.Dense(CPB_HIDDEN, kernel_init=LINEAR_INIT, name="cpb_mlp_0")(table))
        bias_table = nn.Dense(self.num_heads, use_bias=False, kernel_init=LINEAR_INIT,
                              name="cpb_mlp_2")(hidden)
        tokens = self.window_size**2
        bias = bias_table[relative_position_index(self.window_size)].reshape(tokens, tokens, -1)
        return 16.0 * jax.nn.sigmoid(bias.transpose(2, 0, 1))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        window, heads = self.window_size, self.num_heads
        pad_h, pad_w = -height % window, -width % window
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        padded_h, padded_w = height + pad_h, width + pad_w
        # No shift along an axis that one window already covers (torchvision's rule).
        shift = (0 if window >= padded_h else self.shift, 0 if window >= padded_w else self.shift)
        shifted = sum(shift) > 0
        if shifted:
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))

        rows, cols = padded_h // window, padded_w // window
        num_windows, tokens = rows * cols, window * window
        x = x.reshape(batch, rows, window, cols, window, channels).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch * num_windows, tokens, channels)

        qkv = QKVLinear(3 * channels, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(-1, tokens, 3, heads, channels // heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        def normalize(t):  # F.normalize: t / max(||t||, 1e-12), in float32.
            t = t.astype(jnp.float32)
            # sqrt(max(|t|^2, 1e-24)), not max(norm(t), 1e-12): the same values, but
            # norm's gradient is NaN at zero, and padded tokens' keys are exactly zero
            # (torchvision zeroes the key bias).
            return t / jnp.sqrt(jnp.maximum(jnp.sum(t * t, axis=-1, keepdims=True), 1e-24))

        logits = jnp.einsum("bhqd,bhkd->bhqk", normalize(q), normalize(k),
                            precision=jax.lax.Precision.HIGHEST)
        logit_scale = self.param(
            "logit_scale", lambda _, shape, dtype: jnp.full(shape, math.log(10.0), dtype),
            (heads, 1, 1), jnp.float32)
        logits = logits * jnp.exp(jnp.minimum(logit_scale, math.log(100.0)))
        logits = logits + self.position_bias()
        if shifted:
            mask = shift_mask((padded_h, padded_w), window, shift)
            logits = logits.reshape(batch, num_windows, heads, tokens, tokens) + mask[:, None]
            logits = logits.reshape(-1, heads, tokens, tokens)
        attention = jax.nn.softmax(logits, axis=-1).astype(self.dtype)

        x = jnp.einsum("bhqk,bhkd->bqhd", attention, v.astype(self.dtype))
        x = x.reshape(-1, tokens, channels)
        x = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=LINEAR_INIT, name="proj")(x)

        x = x.reshape(batch, rows, cols, window, window, channels).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, padded_h, padded_w, channels)
        if shifted:
            x = jnp.roll(x, shift, axis=(1, 2))
        return x[:, :height, :width]


class SwinBlockV2(nn.Module):
    """A res-post-norm block: ``x + drop(norm1(attn(x)))``, then ``x + drop(norm2(mlp(x)))``.

    Attributes:
      num_heads: attention heads.
      window_size: square window side.
      shift: 0 or ``window_size // 2``.
      stochastic_depth_prob: probability of dropping each residual branch per sample
        (training only).
      dtype: compute dtype.
    """

    num_heads: int
    window_size: int = 8
    shift: int = 0
    stochastic_depth_prob: float = 0.0
    dtype: jnp.dtype = jnp.float32

    def drop_path(self, x: jax.Array, *, train: bool) -> jax.Array:
        """torchvision's ``StochasticDepth(p, 'row')``: zero whole samples, rescale the rest."""
        if not train or self.stochastic_depth_prob == 0.0:
            return x
        survival = 1.0 - self.stochastic_depth_prob
        keep = jax.random.bernoulli(self.make_rng("dropout"), survival,
                                    (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * keep.astype(x.dtype) / survival if survival > 0 else x * 0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        y = WindowAttentionV2(self.num_heads, self.window_size, self.shift, self.dtype,
                              name="attn")(x)
        x = x + self.drop_path(_layer_norm("norm1")(y), train=train)
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32, kernel_init=MLP_INIT,
                     bias_init=MLP_BIAS_INIT)
        y = nn.Dense(MLP_RATIO * channels, name="mlp_0", **dense)(x)
        y = nn.Dense(channels, name="mlp_3", **dense)(nn.gelu(y, approximate=False))
        return x + self.drop_path(_layer_norm("norm2")(y), train=train)


class PatchMergingV2(nn.Module):
    """2x2 neighbours concatenated, reduced linearly to twice the width, then LayerNorm.

    Attributes:
      dtype: compute dtype of the reduction.
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        height, width, channels = x.shape[1:]
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        # torchvision's order: (0, 0), (1, 0), (0, 1), (1, 1) as (row, column) offsets.
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                             x[:, 1::2, 1::2]], axis=-1)
        x = nn.Dense(2 * channels, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                     kernel_init=LINEAR_INIT, name="reduction")(x)
        return _layer_norm("norm")(x)


class SwinV2(nn.Module):
    """A Swin Transformer V2 feature extractor (no final norm, pooling or classifier).

    Attributes:
      embed_dim: channels of the first stage (doubling at each later stage).
      depths: blocks per stage (four stages).
      num_heads: attention heads per stage.
      window_size: square attention window side (8 in torchvision's models).
      stochastic_depth_prob: the last block's drop probability; block ``i`` of ``n`` in
        the whole network drops with ``prob * i / (n - 1)``.
      dtype: compute dtype (parameters stay float32; see the module docstring).
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 8
    stochastic_depth_prob: float = 0.2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
        if len(self.depths) != 4 or len(self.num_heads) != 4:
            raise ValueError(f"depths and num_heads need four stages, got "
                             f"{tuple(self.depths)} and {tuple(self.num_heads)}")
        x = nn.Conv(self.embed_dim, (PATCH_SIZE, PATCH_SIZE), strides=PATCH_SIZE,
                    padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
                    name="features_0_0")(images.astype(self.dtype))
        x = _layer_norm("features_0_2")(x)

        total_blocks, block_id = sum(self.depths), 0
        features = []
        for stage, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            for index in range(depth):
                # torchvision divides by (total - 1); a one-block network drops nothing.
                prob = (self.stochastic_depth_prob * block_id / (total_blocks - 1)
                        if total_blocks > 1 else 0.0)
                x = SwinBlockV2(heads, self.window_size,
                                0 if index % 2 == 0 else self.window_size // 2, prob,
                                self.dtype, name=f"features_{2 * stage + 1}_{index}"
                                )(x, train=train)
                block_id += 1
            features.append(x.astype(self.dtype))
            if stage < 3:
                x = PatchMergingV2(self.dtype, name=f"features_{2 * stage + 2}")(x)
        return features


def swin_v2(name: str, **overrides: Any) -> SwinV2:
    """The SwinV2 preset ``name`` (``swin_v2_t``, ``swin_v2_s``, ``swin_v2_b``).

    Args:
      name: the preset.
      **overrides: SwinV2 attributes replacing the preset's (``dtype``, a smaller
        ``embed_dim``/``depths``/``num_heads`` for tests, ``name`` for the submodule).

    Returns:
      The unbound SwinV2 module.
    """
    if name not in SWIN_V2:
        raise ValueError(f"Unknown Swin V2 model {name!r}; valid: {sorted(SWIN_V2)}")
    return SwinV2(**{**SWIN_V2[name], **overrides})


# ---------------------------------------------------------------------------------------
# torchvision state dicts.
# ---------------------------------------------------------------------------------------

_BUFFERS = ("relative_coords_table", "relative_position_index")
INPUT_KERNEL = ("features_0_0", "kernel")  # The params path of the kernel reading the image.


def is_torch_swin_v2(state_dict: Mapping[str, np.ndarray]) -> bool:
    """Whether a state dict looks like a torchvision Swin V2 (cosine attention's logit scale).

    Args:
      state_dict: parameter name -> array.

    Returns:
      True for a state dict with a 4-D patch convolution and V2 attention.
    """
    return (np.ndim(state_dict.get("features.0.0.weight")) == 4
            and "features.1.0.attn.logit_scale" in state_dict)


def _architecture(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """SwinV2 attributes and input bands read off a torchvision swin_v2 state dict."""
    if "features.0.0.weight" not in state_dict:
        raise ValueError("Not a torchvision Swin V2 state dict: no 'features.0.0.weight' "
                         "(the patch embedding)")
    embed_dim, bands = state_dict["features.0.0.weight"].shape[:2]
    depths, heads = [], []
    for stage in range(4):
        prefix = f"features.{2 * stage + 1}."
        blocks = {k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)}
        depths.append(len(blocks))
        scale = state_dict.get(f"{prefix}0.attn.logit_scale")
        heads.append(0 if scale is None else int(scale.shape[0]))
    if not all(depths) or not all(heads):
        raise ValueError(f"Not a torchvision Swin V2 state dict: stage depths {depths}, "
                         f"heads {heads} (every stage needs blocks with attn.logit_scale)")
    return dict(embed_dim=int(embed_dim), depths=tuple(depths), num_heads=tuple(heads),
                bands=int(bands))


def describe_swin_v2(state_dict: Mapping[str, np.ndarray]) -> str:
    """The architecture of a torchvision swin_v2 state dict: ``'swin_v2_b'``, or with its bands.

    Args:
      state_dict: parameter name -> array (as ``read_state_dict`` returns).

    Returns:
      The preset's name (or the attributes where none matches), followed by
      ``', N input bands'`` when the patch embedding does not take 3.
    """
    arch = _architecture(state_dict)
    spec = {k: arch[k] for k in ("embed_dim", "depths", "num_heads")}
    name = next((name for name, preset in SWIN_V2.items()
                 if {k: preset[k] for k in spec} == spec),
                "swin_v2(" + ", ".join(f"{k}={v}" for k, v in spec.items()) + ")")
    return name if arch["bands"] == 3 else f"{name}, {arch['bands']} input bands"


def _torch_name(path: tuple[str, ...]) -> str:
    """``('features_1_0', 'attn', 'qkv', 'kernel')`` -> ``features.1.0.attn.qkv.weight``."""
    *modules, leaf = path
    leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([re.sub(r"_(\d+)", r".\1", m) for m in modules] + [leaf])


def swin_v2_from_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
    """The Flax ``params`` of ``SwinV2`` from a torchvision ``swin_v2_*`` state dict.

    Accepts any embedding width, depths, heads and number of input bands (SatlasPretrain's
    multispectral Swin V2-B files have 9 or 11). Linear weights are transposed to
    ``kernel``; the patch convolution goes OIHW -> HWIO; LayerNorm weights become
    ``scale``. The classifier (``head.*``), the final ``norm.*`` and the constant buffers
    (relative coordinates table and position index) are dropped.

    Args:
      state_dict: parameter name -> array (as ``read_state_dict`` returns).

    Returns:
      The nested ``params`` dict (float32 numpy arrays).

    Raises:
      ValueError: a key that is not a Swin V2 feature-extractor parameter, a missing one,
        or a shape that differs from what the architecture read off the file needs.
    """
    arch = _architecture(state_dict)
    converted: dict[tuple[str, ...], np.ndarray] = {}
    origin: dict[tuple[str, ...], str] = {}  # Flax path -> torch name, for the errors.
    for name, value in state_dict.items():
        value = np.asarray(value, np.float32)
        if name.startswith(("head.", "norm.")) or name.rsplit(".", 1)[-1] in _BUFFERS:
            continue
        module, _, leaf = name.rpartition(".")
        path = module_path(module)
        if leaf == "weight" and value.ndim in (2, 4):  # Linear, the patch convolution
            key, value = (*path, "kernel"), hwio(value)
        elif leaf == "weight" and value.ndim == 1:  # LayerNorm
            key = (*path, "scale")
        else:  # biases and logit_scale keep their shape.
            key = (*path, leaf)
        converted[key], origin[key] = value, name

    model = SwinV2(**{k: arch[k] for k in ("embed_dim", "depths", "num_heads")})
    images = jax.ShapeDtypeStruct((1, 64, 64, arch["bands"]), jnp.float32)
    expected = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), images)["params"])
    unknown = sorted(origin[p] for p in converted if p not in expected)
    missing = sorted(_torch_name(p) for p in expected if p not in converted)
    if unknown or missing:
        raise ValueError(f"Not a torchvision Swin V2 state dict ({describe_swin_v2(state_dict)}"
                         f"): unexpected key(s) {unknown}, missing key(s) {missing}")
    wrong = [f"{origin[p]}: {v.shape} (needs {expected[p].shape})"
             for p, v in converted.items() if v.shape != expected[p].shape]
    if wrong:
        raise ValueError(f"Swin V2 state dict with wrong shapes: {wrong}")
    return traverse_util.unflatten_dict(converted)
