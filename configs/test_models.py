"""Tiny configurations of every registered model, for tests: seconds on a CPU.

    python main.py --config configs/test_models.py:deeplabv3plus --workdir /tmp/run

The part after the colon names the model (a key of ``TINY_MODELS``); everything else is
``configs/test.py``. Each model keeps its layout but with a handful of channels, so the
same code paths run (encoder dilation, ASPP, nested skips, deep supervision, padding).
"""

import ml_collections

from configs import test

# Model name -> config.model fields (the registry's options, plus 'pretrained').
TINY_MODELS = {
    "unet": dict(name="unet", channels=(4, 8), convs_per_level=1),
    # Seven levels (total stride 64): a 32 px crop is padded to 64 and cropped back.
    "unet_less_conv": dict(name="unet_less_conv", width_multiplier=1 / 16),
    "unetpp": dict(name="unetpp", encoder="resnet18", encoder_width=4,
                   decoder_channels=(16, 8, 8, 4, 4), deep_supervision=True),
    "deeplabv3plus": dict(name="deeplabv3plus", encoder="resnet18", encoder_width=4,
                          aspp_channels=8, decoder_channels=8, low_level_channels=4),
    # The other layout, at output stride 8. (ResNet-18: bottleneck encoders compile
    # twice as long; tests/test_models_torch_parity.py checks them.)
    "deeplabv3plus_smp": dict(name="deeplabv3plus", layout="smp", encoder="resnet18",
                              encoder_width=4, output_stride=8, aspp_channels=8,
                              decoder_channels=8, low_level_channels=4),
    # A one-block-per-stage SwinV2 with 8-channel patches: windows, shifts, padding and
    # patch merging all run (a 32 px crop pads every stage to a whole window).
    "swin_fpn": dict(name="swin_fpn", backbone="swin_v2_t", fpn_channels=8, head_channels=8,
                     backbone_options=dict(embed_dim=8, depths=(1, 2, 1, 1),
                                           num_heads=(1, 1, 2, 2), window_size=4)),
    # VGG16's widths are fixed (14.7M parameters); a small hidden layer keeps the head tiny.
    "hypercolumn": dict(name="hypercolumn", layers="pool", hidden=8, dropout=0.5),
}


def get_config(model: str = "deeplabv3plus") -> ml_collections.ConfigDict:
    if model not in TINY_MODELS:
        raise ValueError(f"Unknown tiny model {model!r}; valid: {sorted(TINY_MODELS)}")
    config = test.get_config()
    config.model = ml_collections.ConfigDict(TINY_MODELS[model])
    config.model.pretrained = ml_collections.config_dict.placeholder(str)
    return config
