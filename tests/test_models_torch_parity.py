"""Numerical parity with PyTorch transcriptions written here (torch==2.13.0 CPU, tests only).

The references are transcriptions, not torchvision's or segmentation_models_pytorch's own
modules (PyPI's torchvision does not import beside this CPU torch wheel), and
test names say so. The U-Net reference takes its level widths and convolution counts from
the Flax model itself (``level_channels``, ``level_convs``): it checks the layers and their
wiring, not those counts. Only ``resize_bilinear`` is compared with torch's own function.

Each reference follows the layout it stands for (torchvision's ResNet and its
``replace_stride_with_dilation``; segmentation_models_pytorch's dilated encoders and
DeepLabV3Plus decoder; the classic U-Net), gets random weights and BatchNorm statistics,
and its weights are copied into the Flax model: ResNets through a saved ``.pth`` and
``python -m lcseg.models.import_weights``, as a user would. Outputs agree to float32
rounding: max abs differences of 1e-7 to 2e-6 on values of order 1.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a test-only dependency (requirements-dev.txt)

from lcseg.models import create_model, import_weights, load_pretrained
from lcseg.models.layers import resize_bilinear
from lcseg.models.resnet import ResNet
from tests.conftest import run_python
from tests.test_models import random_variables

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
# torchvision-layout ResNet.
# ---------------------------------------------------------------------------------------


def conv3x3(cin, cout, stride=1, dilation=1):
    return tnn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation,
                      bias=False)


class TorchBlock(tnn.Module):
    """torchvision's BasicBlock / Bottleneck (stride on the 3x3 conv: V1.5).

    torchvision's BasicBlock refuses dilation; here its second conv may take the stage's
    new dilation (``next_dilation``) while the first, which carried the stride, keeps the
    previous one: the rule torchvision applies to the bottleneck's 3x3 conv.
    """

    def __init__(self, inplanes, planes, bottleneck, stride=1, dilation=1, downsample=None,
                 next_dilation=None):
        super().__init__()
        self.bottleneck = bottleneck
        if bottleneck:
            self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes, stride, dilation)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(planes * 4)
        else:
            self.conv1 = conv3x3(inplanes, planes, stride, dilation)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = conv3x3(planes, planes, 1, next_dilation or dilation)
            self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        if self.bottleneck:
            out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        else:
            out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class TorchResNet(tnn.Module):
    """torchvision's ResNet (``_make_layer`` logic) returning the five feature maps.

    ``replace_stride_with_dilation`` is torchvision's; ``smp_output_stride`` then patches
    the convolutions of the last stages as segmentation_models_pytorch's encoders do.
    """

    def __init__(self, stage_sizes, bottleneck, width=64, replace_stride_with_dilation=None,
                 smp_output_stride=None):
        super().__init__()
        self.expansion = 4 if bottleneck else 1
        self.inplanes, self.dilation = width, 1
        self.conv1 = tnn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        dilate = replace_stride_with_dilation or (False, False, False)
        self.layer1 = self._make_layer(width, stage_sizes[0], bottleneck)
        self.layer2 = self._make_layer(width * 2, stage_sizes[1], bottleneck, 2, dilate[0])
        self.layer3 = self._make_layer(width * 4, stage_sizes[2], bottleneck, 2, dilate[1])
        self.layer4 = self._make_layer(width * 8, stage_sizes[3], bottleneck, 2, dilate[2])
        rates = {None: [], 16: [(self.layer4, 2)], 8: [(self.layer3, 2), (self.layer4, 4)]}
        for stage, rate in rates[smp_output_stride]:
            for module in stage.modules():
                if isinstance(module, tnn.Conv2d):
                    module.stride, module.dilation = (1, 1), (rate, rate)
                    module.padding = tuple(k // 2 * rate for k in module.kernel_size)

    def _make_layer(self, planes, blocks, bottleneck, stride=1, dilate=False):
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * self.expansion:
            downsample = tnn.Sequential(
                tnn.Conv2d(self.inplanes, planes * self.expansion, 1, stride=stride,
                           bias=False),
                tnn.BatchNorm2d(planes * self.expansion))
        layers = [TorchBlock(self.inplanes, planes, bottleneck, stride, previous_dilation,
                             downsample, next_dilation=self.dilation)]
        self.inplanes = planes * self.expansion
        layers += [TorchBlock(self.inplanes, planes, bottleneck, dilation=self.dilation)
                   for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        features = [x]
        x = F.max_pool2d(x, 3, stride=2, padding=1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            features.append(x)
        return features


RESNET_CASES = {
    # ResNet-18 itself, output stride 32, odd input size, zip-format .pth.
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), bottleneck=False, width=64, output_stride=32,
                     style="torchvision", size=(45, 61), legacy=False),
    # Bottleneck blocks, output stride 8 with torchvision's dilation, legacy .pth format.
    "bottleneck_os8": dict(stage_sizes=(1, 1, 2, 2), bottleneck=True, width=16,
                           output_stride=8, style="torchvision", size=(40, 48), legacy=True),
    # Basic blocks, output stride 16 with segmentation_models_pytorch's uniform dilation.
    "basic_os16_uniform": dict(stage_sizes=(2, 2, 2, 2), bottleneck=False, width=16,
                               output_stride=16, style="uniform", size=(48, 40), legacy=False),
}


def torch_resnet(case):
    dilate = {32: None, 16: (False, False, True), 8: (False, True, True)}
    uniform = case["style"] == "uniform"
    torch.manual_seed(0)
    return randomize(TorchResNet(
        case["stage_sizes"], case["bottleneck"], case["width"],
        replace_stride_with_dilation=None if uniform else dilate[case["output_stride"]],
        smp_output_stride=case["output_stride"] if uniform else None))


@pytest.mark.parametrize("name", sorted(RESNET_CASES))
def test_imported_resnet_features_equal_a_transcription_of_torchvisions_resnet(name, tmp_path):
    case = RESNET_CASES[name]
    reference = torch_resnet(case)
    checkpoint, converted = str(tmp_path / f"{name}.pth"), str(tmp_path / f"{name}.npz")
    torch.save(reference.state_dict(), checkpoint,
               _use_new_zipfile_serialization=not case["legacy"])
    import_weights.main([checkpoint, converted])

    images = np.random.default_rng(0).normal(size=(2, 3, *case["size"])).astype(np.float32)
    with torch.no_grad():
        expected = [to_nhwc(f) for f in reference(torch.from_numpy(images))]
    encoder = ResNet(case["stage_sizes"], case["bottleneck"], case["output_stride"],
                     case["style"], case["width"])
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    variables, normalisation = load_pretrained(random_variables(encoder, nhwc), converted)
    assert normalisation["mean"] == (0.485, 0.456, 0.406)
    features = jax.jit(encoder.apply)(variables, nhwc)
    differences = [assert_close(a, e) for a, e in zip(features, expected)]
    print(f"{name}: max abs difference per feature {differences}")


def test_import_command_converts_a_checkpoint(tmp_path):
    case = dict(RESNET_CASES["basic_os16_uniform"], width=8)
    checkpoint = str(tmp_path / "resnet18-f37072fd.pth")
    torch.save(torch_resnet(case).state_dict(), checkpoint)
    result = run_python(["-m", "lcseg.models.import_weights", checkpoint,
                         str(tmp_path / "out" / "resnet18.npz")], timeout=120)
    assert "resnet18, base_width=8" in result.stdout
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


def torch_conv_bn_relu(cin, cout, kernel_size=3, dilation=1, separable=False):
    padding = dilation * (kernel_size // 2)
    if separable:  # segmentation_models_pytorch's SeparableConv2d
        conv = [tnn.Conv2d(cin, cin, kernel_size, padding=padding, dilation=dilation,
                           groups=cin, bias=False), tnn.Conv2d(cin, cout, 1, bias=False)]
    else:
        conv = [tnn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation,
                           bias=False)]
    return tnn.Sequential(*conv, tnn.BatchNorm2d(cout), tnn.ReLU())


class TorchDeepLabV3Plus(tnn.Module):
    """DeepLabv3+ as segmentation_models_pytorch builds it (``smp``) or as the paper."""

    def __init__(self, encoder, encoder_channels, classes, rates, smp, aspp=256, low=48):
        super().__init__()
        self.encoder, self.smp = encoder, smp
        cin = encoder_channels[-1]
        self.branches = tnn.ModuleList(
            [torch_conv_bn_relu(cin, aspp, 1)]
            + [torch_conv_bn_relu(cin, aspp, dilation=rate, separable=smp) for rate in rates])
        self.pooling = torch_conv_bn_relu(cin, aspp, 1)
        self.project = torch_conv_bn_relu(5 * aspp, aspp, 1)
        self.aspp_conv = torch_conv_bn_relu(aspp, aspp, separable=True) if smp else None
        self.low_level = torch_conv_bn_relu(encoder_channels[1], low, 1)
        self.decoder = tnn.Sequential(*(
            [torch_conv_bn_relu(aspp + low, aspp, separable=True)] if smp else
            [torch_conv_bn_relu(aspp + low, aspp), torch_conv_bn_relu(aspp, aspp)]))
        self.head = tnn.Conv2d(aspp, classes, 1)

    def forward(self, x):
        features = self.encoder(x)
        deep = features[-1]
        pooled = self.pooling(F.adaptive_avg_pool2d(deep, 1))
        branches = [branch(deep) for branch in self.branches]
        branches.append(F.interpolate(pooled, size=deep.shape[-2:], mode="bilinear"))
        y = self.project(torch.cat(branches, dim=1))
        if self.smp:
            y = self.aspp_conv(y)
        low = features[1]
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=self.smp)
        y = self.decoder(torch.cat([y, self.low_level(low)], dim=1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear",
                             align_corners=self.smp)


@pytest.mark.parametrize("layout", ["smp", "standard"])
def test_deeplabv3plus_logits_equal_a_transcription_of_smps_and_the_papers_layout(layout, tmp_path):
    model = create_model("deeplabv3plus", num_classes=5, encoder="resnet18", layout=layout,
                         encoder_width=8, aspp_channels=16, low_level_channels=8,
                         decoder_channels=16)
    smp = layout == "smp"
    torch.manual_seed(0)
    encoder = TorchResNet((2, 2, 2, 2), False, 8,
                          replace_stride_with_dilation=None if smp else (False, False, True),
                          smp_output_stride=16 if smp else None)
    reference = randomize(TorchDeepLabV3Plus(encoder, (8, 8, 16, 32, 64), 5, model.rates(),
                                             smp, aspp=16, low=8))
    checkpoint = str(tmp_path / "encoder.pth")
    torch.save(encoder.state_dict(), checkpoint)

    images = np.random.default_rng(0).normal(size=(2, 3, 64, 48)).astype(np.float32)
    nhwc = jnp.asarray(images.transpose(0, 2, 3, 1))
    variables, _ = load_pretrained(random_variables(model, nhwc), checkpoint)
    variables = jax.tree.map(np.asarray, variables)
    aspp = tnn.Sequential(*reference.branches, reference.pooling, reference.project)
    copy_into(variables, "aspp", aspp)
    for scope in ("aspp_conv", "low_level", "head"):
        if getattr(reference, scope) is not None:
            copy_into(variables, scope, getattr(reference, scope))
    for index, block in enumerate(reference.decoder):
        copy_into(variables, f"decoder_{index}", block)
    with torch.no_grad():
        expected = to_nhwc(reference(torch.from_numpy(images)))
    difference = assert_close(jax.jit(model.apply)(variables, nhwc), expected)
    print(f"deeplabv3plus {layout}: max abs difference {difference}, max abs logit "
          f"{np.max(np.abs(expected)):.3f}")
