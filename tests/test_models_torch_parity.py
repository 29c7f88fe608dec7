"""Numerical parity with the reference libraries' own PyTorch code (torch==2.13.0 CPU, tests only).

torchvision's ResNet and segmentation_models_pytorch's (smp) DeepLabV3Plus and
UnetPlusPlus do not install beside this CPU torch wheel in CI, so their model code is
vendored verbatim under ``tests/torch_reference`` (torchvision 0.28.0, smp 0.6.0; each
file's header says what was left out: weight download, Hub and telemetry machinery).
The originals get random weights and BatchNorm statistics (``randomize``), run in eval
mode, and their weights are copied into the Flax model: encoders through a saved ``.pth``
read by ``python -m lcseg.models.import_weights`` / ``load_pretrained``, as a user would;
decoders module by module (``copy_into``). Outputs agree to float32 rounding.

Two references remain transcriptions written here, and their tests say so: the classic
U-Net (no library has lcseg's configurable one; it takes its level widths and convolution
counts from the Flax model itself) and the paper's DeepLabv3+ decoder (``layout=
'standard'``; smp builds only its own layout), which runs on torchvision's own ResNet-50.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a test-only dependency (requirements-dev.txt)

from lcseg.models import count_parameters, create_model, import_weights, load_pretrained
from lcseg.models.layers import resize_bilinear
from lcseg.models.resnet import ResNet
from tests.conftest import run_python
from tests.test_models import random_variables
from tests.torch_reference import torchvision_resnet
from tests.torch_reference.segmentation_models_pytorch.decoders.deeplabv3 import DeepLabV3Plus
from tests.torch_reference.segmentation_models_pytorch.decoders.unetplusplus import (
    UnetPlusPlus,
)
from tests.torch_reference.segmentation_models_pytorch.encoders import get_encoder

tnn = torch.nn
F = torch.nn.functional
torch.set_num_threads(2)


def to_nhwc(x):
    return np.asarray(x.detach().numpy()).transpose(0, 2, 3, 1)


def assert_close(actual, expected, relative=1e-4):
    """Max abs difference within ``relative`` of the largest magnitude; returns it."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    difference = float(np.max(np.abs(actual - expected)))
    assert difference <= relative * max(float(np.max(np.abs(expected))), 1.0), difference
    return difference


def randomize(model, seed=0):
    """Random BatchNorm affine parameters and statistics, so eval mode is not identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, tnn.BatchNorm2d):
                for tensor, low, high in ((module.weight, 0.5, 1.5),
                                          (module.running_var, 0.5, 1.5)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low)
                                 + low)
                for tensor in (module.bias, module.running_mean):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


# ---------------------------------------------------------------------------------------
# ResNet: torchvision's own, and smp's encoder built on it.
# ---------------------------------------------------------------------------------------


def torchvision_features(model, images):
    """The stem's and the four stages' outputs of torchvision's ResNet, recorded by
    forward hooks while its own ``forward`` runs (the classifier's logits are dropped)."""
    features = []
    modules = (model.relu, model.layer1, model.layer2, model.layer3, model.layer4)
    hooks = [m.register_forward_hook(lambda _m, _i, out: features.append(out.clone()))
             for m in modules]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(features) == 5
    return features


def save_encoder(model, path, prefix="", legacy=False):
    """Saves the ``prefix``-ed part of a torch state dict as a checkpoint file."""
    state = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


TORCHVISION_CASES = {
    # torchvision's resnet18() itself, output stride 32, odd input size, zip-format .pth.
    "resnet18": dict(build=lambda: torchvision_resnet.resnet18(), stage_sizes=(2, 2, 2, 2),
                     bottleneck=False, output_stride=32, size=(45, 61), legacy=False),
    # torchvision's ResNet with Bottleneck blocks (shortened to 1, 1, 2, 2 blocks) and its
    # replace_stride_with_dilation for output stride 8; legacy .pth format.
    "bottleneck_os8": dict(
        build=lambda: torchvision_resnet.ResNet(torchvision_resnet.Bottleneck, [1, 1, 2, 2],
                                                replace_stride_with_dilation=[False, True, True]),
        stage_sizes=(1, 1, 2, 2), bottleneck=True, output_stride=8, size=(40, 48),
        legacy=True),
}


def model_with_imported_encoder(model, encoder, path, *, prefix="", height=64, width=64):
    """A random batch and ``model``'s variables with ``encoder``'s weights imported.

    The weights go through a saved ``.pth`` and lcseg's importer; the other variables are
    random. Returns the batch as NCHW numpy and NHWC jax, and the variables as numpy.
    """
    checkpoint = save_encoder(encoder, path, prefix=prefix)
    images = np.random.default_rng(0).normal(size=(1, 3, height, width)).astype(np.float32)
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    variables, _ = load_pretrained(random_variables(model, nhwc), checkpoint)
    return images, nhwc, jax.tree.map(np.asarray, variables)


def compare_encoder_features(reference_features, checkpoint, tmp_path, images, stage_sizes,
                             bottleneck, output_stride, style):
    converted = str(tmp_path / "converted.npz")
    import_weights.convert(checkpoint, converted)
    expected = [to_nhwc(f) for f in reference_features]
    encoder = ResNet(stage_sizes, bottleneck, output_stride, style, 64)
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    variables, normalisation = load_pretrained(random_variables(encoder, nhwc), converted)
    assert normalisation["mean"] == (0.485, 0.456, 0.406)
    features = jax.jit(encoder.apply)(variables, nhwc)
    assert len(features) == len(expected)
    return [assert_close(a, e) for a, e in zip(features, expected)]


@pytest.mark.parametrize("name", sorted(TORCHVISION_CASES))
def test_resnet_features_equal_torchvisions_resnet(name, tmp_path):
    case = TORCHVISION_CASES[name]
    torch.manual_seed(0)
    reference = randomize(case["build"]())
    checkpoint = save_encoder(reference, str(tmp_path / f"{name}.pth"), legacy=case["legacy"])
    images = np.random.default_rng(0).normal(size=(2, 3, *case["size"])).astype(np.float32)
    expected = torchvision_features(reference, torch.from_numpy(images))
    differences = compare_encoder_features(
        expected, checkpoint, tmp_path, images, case["stage_sizes"], case["bottleneck"],
        case["output_stride"], "torchvision")
    print(f"{name}: max abs difference per feature {differences}")


def test_resnet_features_equal_smps_dilated_resnet18_encoder(tmp_path):
    """smp's encoders reach output stride 16 by dilating every conv of the last stage
    (``make_dilated``): lcseg's ``dilation_style='uniform'``."""
    torch.manual_seed(0)
    reference = randomize(get_encoder("resnet18", weights=None, output_stride=16))
    checkpoint = save_encoder(reference, str(tmp_path / "smp_resnet18.pth"))
    images = np.random.default_rng(0).normal(size=(2, 3, 48, 40)).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(images))[1:]  # [0] is the input itself
    differences = compare_encoder_features(expected, checkpoint, tmp_path, images,
                                           (2, 2, 2, 2), False, 16, "uniform")
    print(f"smp resnet18 os16: max abs difference per feature {differences}")


def test_import_command_converts_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_encoder(torchvision_resnet.resnet18(),
                              str(tmp_path / "resnet18-f37072fd.pth"))
    result = run_python(["-m", "lcseg.models.import_weights", checkpoint,
                         str(tmp_path / "out" / "resnet18.npz")], timeout=120)
    assert ": resnet18, 11,176,512 encoder parameters" in result.stdout
    assert "--config.model.pretrained=" in result.stdout
    assert "RuntimeWarning" not in result.stderr
    assert (tmp_path / "out" / "resnet18.npz").exists()


# ---------------------------------------------------------------------------------------
# U-Net.
# ---------------------------------------------------------------------------------------


def conv_block(cin, cout, convs, bias):
    layers = []
    for index in range(convs):
        layers += [tnn.Conv2d(cin if index == 0 else cout, cout, 3, padding=1, bias=bias),
                   tnn.BatchNorm2d(cout), tnn.ReLU()]
    return tnn.Sequential(*layers)


class TorchUNet(tnn.Module):
    """The classic U-Net: the up-sampling maps a level's channels to the next level's."""

    def __init__(self, channels, convs, classes, bias, upsampling):
        super().__init__()
        levels = range(len(channels))
        self.encoders = tnn.ModuleList(
            conv_block(3 if level == 0 else channels[level - 1], channels[level],
                       convs[level], bias) for level in levels)
        if upsampling == "transpose":
            ups = [tnn.ConvTranspose2d(channels[level + 1], channels[level], 2, stride=2)
                   for level in levels[:-1]]
        else:
            ups = [tnn.Sequential(tnn.Upsample(scale_factor=2, mode="bilinear"),
                                  tnn.Conv2d(channels[level + 1], channels[level], 3, padding=1))
                   for level in levels[:-1]]
        self.ups = tnn.ModuleList(ups)
        self.decoders = tnn.ModuleList(
            conv_block(2 * channels[level], channels[level], convs[level], bias)
            for level in levels[:-1])
        self.head = tnn.Conv2d(channels[0], classes, 1)

    def forward(self, x):
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(F.max_pool2d(x, 2) if level else x)
            skips.append(x)
        for level in reversed(range(len(self.decoders))):
            x = self.decoders[level](torch.cat([skips[level], self.ups[level](x)], dim=1))
        return self.head(x)


def copy_into(variables, scope, module):
    """Copies a torch module's convs and BatchNorms, in order, into the Flax scope whose
    submodules Flax named ``Conv_<i>``/``BatchNorm_<i>`` in creation order (or, for a
    module that is a single conv, into the scope itself)."""
    params, stats = variables["params"][scope], variables["batch_stats"].get(scope, {})
    convs = [m for m in module.modules() if isinstance(m, (tnn.Conv2d, tnn.ConvTranspose2d))]
    norms = [m for m in module.modules() if isinstance(m, tnn.BatchNorm2d)]
    for index, conv in enumerate(convs):
        target = params if "kernel" in params else params[f"Conv_{index}"]
        weight = conv.weight.detach().numpy()
        if isinstance(conv, tnn.ConvTranspose2d):  # [in, out, kh, kw], kernel flipped
            target["kernel"] = weight.transpose(2, 3, 0, 1)[::-1, ::-1]
        else:
            target["kernel"] = weight.transpose(2, 3, 1, 0)
        if conv.bias is not None:
            target["bias"] = conv.bias.detach().numpy()
    for index, norm in enumerate(norms):
        name = f"BatchNorm_{index}"
        params[name] = {"scale": norm.weight.detach().numpy(),
                        "bias": norm.bias.detach().numpy()}
        stats[name] = {"mean": norm.running_mean.numpy(), "var": norm.running_var.numpy()}


UNET_CASES = {
    "transpose": dict(name="unet", channels=(8, 16, 32, 64), convs_per_level=(2, 1, 3, 2),
                      conv_bias=True, upsampling="transpose", size=(48, 40)),
    "bilinear": dict(name="unet", channels=(8, 16, 32), convs_per_level=2, conv_bias=False,
                     upsampling="bilinear", size=(32, 24)),
    # The preset's exact layout at 1/16 width: seven levels, 3,3,1,1,1,1,1 convolutions.
    "unet_less_conv": dict(name="unet_less_conv", width_multiplier=1 / 16, size=(64, 64)),
}


@pytest.mark.parametrize("key", sorted(UNET_CASES))
def test_unet_logits_equal_a_torch_transcription_built_from_the_models_level_layout(key):
    options = dict(UNET_CASES[key])
    size = options.pop("size")
    model = create_model(options.pop("name"), num_classes=5, **options)
    channels, convs = model.level_channels(), model.level_convs()
    torch.manual_seed(0)
    reference = randomize(TorchUNet(channels, convs, 5, model.conv_bias, model.upsampling))

    images = np.random.default_rng(0).normal(size=(2, 3, *size)).astype(np.float32)
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    variables = jax.tree.map(np.asarray, random_variables(model, nhwc))
    for level, encoder in enumerate(reference.encoders):
        copy_into(variables, f"encoder_{level}", encoder)
    for level, (up, decoder) in enumerate(zip(reference.ups, reference.decoders)):
        copy_into(variables, f"up_{level}", up)
        copy_into(variables, f"decoder_{level}", decoder)
    copy_into(variables, "head", reference.head)
    with torch.no_grad():
        expected = to_nhwc(reference(torch.from_numpy(images)))
    difference = assert_close(jax.jit(model.apply)(variables, nhwc), expected)
    print(f"{key}: max abs difference {difference}, max abs logit {np.max(np.abs(expected)):.3f}")


# ---------------------------------------------------------------------------------------
# DeepLabv3+ (both layouts) and bilinear resizing.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(20, 28), (13, 30)])
def test_resize_bilinear_equals_torch_interpolate(align_corners, size):
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 7)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                             align_corners=align_corners)
    actual = resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), size,
                             align_corners=align_corners)
    assert_close(actual, to_nhwc(expected), relative=1e-6)


def torch_conv_bn_relu(cin, cout, kernel_size=3, dilation=1):
    padding = dilation * (kernel_size // 2)
    return tnn.Sequential(tnn.Conv2d(cin, cout, kernel_size, padding=padding,
                                     dilation=dilation, bias=False),
                          tnn.BatchNorm2d(cout), tnn.ReLU())


class TorchPaperDeepLabV3Plus(tnn.Module):
    """A transcription of the paper's DeepLabv3+ decoder (lcseg's ``layout='standard'``)
    on torchvision's own ResNet (its ``replace_stride_with_dilation``)."""

    def __init__(self, encoder, low_channels, deep_channels, classes, rates, aspp, low):
        super().__init__()
        self.encoder = encoder
        self.branches = tnn.ModuleList(
            [torch_conv_bn_relu(deep_channels, aspp, 1)]
            + [torch_conv_bn_relu(deep_channels, aspp, dilation=rate) for rate in rates])
        self.pooling = torch_conv_bn_relu(deep_channels, aspp, 1)
        self.project = torch_conv_bn_relu(5 * aspp, aspp, 1)
        self.low_level = torch_conv_bn_relu(low_channels, low, 1)
        self.decoder = tnn.Sequential(torch_conv_bn_relu(aspp + low, aspp),
                                      torch_conv_bn_relu(aspp, aspp))
        self.head = tnn.Conv2d(aspp, classes, 1)

    def forward(self, x):
        features = torchvision_features(self.encoder, x)
        deep, low = features[-1], features[1]
        pooled = self.pooling(F.adaptive_avg_pool2d(deep, 1))
        branches = [branch(deep) for branch in self.branches]
        branches.append(F.interpolate(pooled, size=deep.shape[-2:], mode="bilinear"))
        y = self.project(torch.cat(branches, dim=1))
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.decoder(torch.cat([y, self.low_level(low)], dim=1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


def torch_parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def perturb_head_bias(conv):
    """smp initialises the head's bias to zero; a random one checks that it is copied."""
    with torch.no_grad():
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=torch.Generator().manual_seed(1)))


SMP_DEEPLAB_CASES = {
    # smp's defaults (resnet34, 256 channels, output stride 16, rates 12, 24, 36). On a
    # 64x64 input the ASPP sees 4x4 features, where rates of 4 or more all reduce to the
    # centre tap: this case checks the default rates by value (``rates()``), not numerically.
    "resnet34_os16": dict(encoder="resnet34", output_stride=16, channels=256, rates=None),
    # Output stride 8 (smp dilates layer3 by 2 and layer4 by 4), narrower decoder, and
    # rates below the 8x8 ASPP input so that each rate and its branch order show.
    "resnet18_os8": dict(encoder="resnet18", output_stride=8, channels=32, rates=(2, 3, 5)),
}


@pytest.mark.parametrize("key", sorted(SMP_DEEPLAB_CASES))
def test_deeplabv3plus_smp_layout_logits_equal_smps_deeplabv3plus(key, tmp_path):
    case = SMP_DEEPLAB_CASES[key]
    torch.manual_seed(0)
    rates = {} if case["rates"] is None else dict(decoder_atrous_rates=case["rates"])
    reference = randomize(DeepLabV3Plus(
        case["encoder"], encoder_weights=None, encoder_output_stride=case["output_stride"],
        decoder_channels=case["channels"], classes=5, **rates))
    perturb_head_bias(reference.segmentation_head[0])
    model = create_model("deeplabv3plus", num_classes=5, encoder=case["encoder"], layout="smp",
                         output_stride=case["output_stride"], aspp_channels=case["channels"],
                         decoder_channels=case["channels"], low_level_channels=48,
                         atrous_rates=case["rates"])
    # Each atrous branch: [SeparableConv2d[depthwise, pointwise], BatchNorm2d, ReLU].
    smp_rates = tuple(branch[0][0].dilation[0] for branch in reference.decoder.aspp[0].convs[1:4])
    assert model.rates() == smp_rates
    images, nhwc, variables = model_with_imported_encoder(
        model, reference, str(tmp_path / "encoder.pth"), prefix="encoder.")
    assert count_parameters(variables["params"]) == torch_parameter_count(reference)
    decoder = reference.decoder
    copy_into(variables, "aspp", decoder.aspp[0])
    copy_into(variables, "aspp_conv", tnn.Sequential(decoder.aspp[1], decoder.aspp[2]))
    copy_into(variables, "low_level", decoder.block1)
    copy_into(variables, "decoder_0", decoder.block2)
    copy_into(variables, "head", reference.segmentation_head[0])
    with torch.no_grad():
        expected = to_nhwc(reference(torch.from_numpy(images)))
    difference = assert_close(jax.jit(model.apply)(variables, nhwc), expected)
    print(f"deeplabv3plus smp {key}: max abs difference {difference}, max abs logit "
          f"{np.max(np.abs(expected)):.3f}")


def test_deeplabv3plus_standard_layout_logits_equal_a_transcription_of_the_papers_decoder(
        tmp_path):
    # Rates below the 4x3 ASPP input, so that each one shows in the logits.
    model = create_model("deeplabv3plus", num_classes=5, encoder="resnet50", layout="standard",
                         atrous_rates=(1, 2, 3), aspp_channels=16, low_level_channels=8,
                         decoder_channels=16)
    torch.manual_seed(0)
    encoder = torchvision_resnet.resnet50(replace_stride_with_dilation=[False, False, True])
    reference = randomize(TorchPaperDeepLabV3Plus(encoder, 256, 2048, 5, model.rates(),
                                                  aspp=16, low=8))
    images, nhwc, variables = model_with_imported_encoder(
        model, encoder, str(tmp_path / "encoder.pth"), width=48)
    copy_into(variables, "aspp", tnn.Sequential(*reference.branches, reference.pooling,
                                                reference.project))
    copy_into(variables, "low_level", reference.low_level)
    for index, block in enumerate(reference.decoder):
        copy_into(variables, f"decoder_{index}", block)
    copy_into(variables, "head", reference.head)
    with torch.no_grad():
        expected = to_nhwc(reference(torch.from_numpy(images)))
    difference = assert_close(jax.jit(model.apply)(variables, nhwc), expected)
    print(f"deeplabv3plus standard: max abs difference {difference}, max abs logit "
          f"{np.max(np.abs(expected)):.3f}")


# ---------------------------------------------------------------------------------------
# UNet++.
# ---------------------------------------------------------------------------------------


def smp_unetplusplus_scopes(depth=4):
    """smp's decoder block ``x_{d}_{l}`` (``d``: nesting depth, ``l``: decoder layer from the
    deepest) is lcseg's node ``x_{level}_{column}`` with level ``depth - 1 - l`` and column
    ``l - d + 1``; smp's last block ``x_0_{depth}`` is lcseg's ``x_full``."""
    scopes = {f"x_0_{depth}": "x_full"}
    for layer in range(depth):
        for nesting in range(layer + 1):
            scopes[f"x_{nesting}_{layer}"] = f"x_{depth - 1 - layer}_{layer - nesting + 1}"
    return scopes


UNETPP_CASES = {
    # smp's defaults: resnet34, decoder channels 256, 128, 64, 32, 16.
    "resnet34": dict(encoder="resnet34", decoder_channels=(256, 128, 64, 32, 16)),
    "resnet50_narrow": dict(encoder="resnet50", decoder_channels=(32, 24, 16, 8, 8)),
}


@pytest.mark.parametrize("key", sorted(UNETPP_CASES))
def test_unetplusplus_logits_equal_smps_unetplusplus(key, tmp_path):
    case = UNETPP_CASES[key]
    torch.manual_seed(0)
    reference = randomize(UnetPlusPlus(case["encoder"], encoder_weights=None,
                                       decoder_channels=case["decoder_channels"], classes=5))
    perturb_head_bias(reference.segmentation_head[0])
    model = create_model("unetpp", num_classes=5, encoder=case["encoder"],
                         decoder_channels=case["decoder_channels"])
    images, nhwc, variables = model_with_imported_encoder(
        model, reference, str(tmp_path / "encoder.pth"), prefix="encoder.")
    assert count_parameters(variables["params"]) == torch_parameter_count(reference)
    scopes = smp_unetplusplus_scopes()
    assert sorted(scopes) == sorted(reference.decoder.blocks)
    for name, block in reference.decoder.blocks.items():
        copy_into(variables, scopes[name], block)
    copy_into(variables, "head", reference.segmentation_head[0])
    with torch.no_grad():
        expected = to_nhwc(reference(torch.from_numpy(images)))
    difference = assert_close(jax.jit(model.apply)(variables, nhwc), expected)
    print(f"unet++ {key}: max abs difference {difference}, max abs logit "
          f"{np.max(np.abs(expected)):.3f}")
