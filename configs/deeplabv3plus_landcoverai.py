"""DeepLabv3+ (ResNet-50, ImageNet encoder) on LandCover.ai.

The model and optimiser of configs/deeplabv3plus_deepglobe.py on the data, crops,
evaluation tiles and schedule of configs/unet_landcoverai.py.

    python -m lcseg.models.import_weights resnet50-0676ba61.pth weights/resnet50.npz
    python main.py --config configs/deeplabv3plus_landcoverai.py --workdir runs/dl_landcoverai \
        --config.model.pretrained=weights/resnet50.npz
"""

from configs import deeplabv3plus_deepglobe, unet_landcoverai


def get_config():
    return deeplabv3plus_deepglobe.with_deeplabv3plus(unet_landcoverai.get_config())
