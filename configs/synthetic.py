"""Every model family on the embedded synthetic data, sized for a laptop CPU (no download).

    python main.py --config configs/synthetic.py:unetpp --workdir runs/unetpp
    python main.py --config configs/synthetic.py:deeplabv3plus --workdir runs/deeplab
    python main.py --config configs/synthetic.py:swin_fpn --workdir runs/swin_fpn
    python main.py --config configs/synthetic.py:hypercolumn_stage1 --workdir runs/hc1
    python main.py --config configs/synthetic.py:hypercolumn_stage2 --workdir runs/hc2 \\
        --config.model.init_from=runs/hc1

The part after the colon names the recipe (a key of ``RECIPES``); the U-Net's is the
demo, ``configs/unet_synthetic.py`` (``configs/synthetic.py:unet`` is the same). Each
keeps the demo's training settings (batch 16 of 64 px crops, 1,000 steps, float32 on a
CPU) and its model's layout at a fraction of the width: the same code paths as the
full-size configs (``configs/deeplabv3plus_deepglobe.py``, ``swinv2_fpn_landcoverai.py``,
``hypercolumn_xview2_stage*.py``), in minutes instead of GPU-days. Swap a model option on
the command line (``--config.model.encoder=resnet34``) to grow one.

The hypercolumn recipes are the two stages of the xView2 system on
``synthetic_footprints`` (binary buildings, ~6%): stage one classifies 3 sampled pixels
per image with VGG16 frozen, stage two trains densely from stage one's best checkpoint
(``--config.model.init_from``). Without ImageNet weights (``--config.model.pretrained``,
see README) VGG16 stays at its random initialisation, frozen: the head still learns, the
scores are modest.
"""

import ml_collections

from configs import test_hypercolumn, unet_synthetic

# Recipe -> config.model fields (the model's options at a laptop's width).
MODELS = {
    "unet": None,  # The demo's own model.
    "unetpp": dict(name="unetpp", encoder="resnet18", encoder_width=16,
                   decoder_channels=(64, 32, 16, 16, 8)),
    "deeplabv3plus": dict(name="deeplabv3plus", encoder="resnet18", encoder_width=16,
                          aspp_channels=64, decoder_channels=64, low_level_channels=16),
    # SwinV2-T's layout at a quarter of its width; 4-token windows fit 64 px crops
    # (16x16 tokens after the 4x4 patches, 2x2 in the last stage, padded to a window).
    "swin_fpn": dict(name="swin_fpn", backbone="swin_v2_t", fpn_channels=32,
                     head_channels=32,
                     backbone_options=dict(embed_dim=24, depths=(2, 2, 2, 2),
                                           num_heads=(1, 2, 4, 8), window_size=4)),
}
HYPERCOLUMN_STAGES = {"hypercolumn_stage1": "1", "hypercolumn_stage2": "2"}
RECIPES = (*MODELS, *HYPERCOLUMN_STAGES)


def get_config(recipe: str = "unetpp") -> ml_collections.ConfigDict:
    """The config of one recipe (``RECIPES``).

    Raises:
      ValueError: an unknown recipe, naming the valid ones.
    """
    if recipe not in RECIPES:
        raise ValueError(f"Unknown recipe {recipe!r} of configs/synthetic.py; valid: "
                         f"{list(RECIPES)}")
    if recipe in HYPERCOLUMN_STAGES:
        # The tiny test stages (frozen VGG16, 'pool' layers, class weights, Adam), given
        # the demo's loader and a wider head, for longer.
        config = test_hypercolumn.get_config(HYPERCOLUMN_STAGES[recipe])
        config.model.hidden = 64
        config.batch_size = config.eval_batch_size = 8
        config.crop_size = 64
        config.eval_tile_size = 64
        config.num_train_steps = 300
        config.log_every_steps = 25
        config.eval_every_steps = config.checkpoint_every_steps = 100
        config.num_panel_images = 4
        config.data.workers = 2
        config.data.crops_per_image = 1
        return config
    config = unet_synthetic.get_config()
    if MODELS[recipe] is not None:
        config.model = ml_collections.ConfigDict(MODELS[recipe])
        config.model.pretrained = ml_collections.config_dict.placeholder(str)
    return config
