"""DeepLabv3+ (ResNet-50, ImageNet encoder) on LoveDA.

The model and optimiser of configs/deeplabv3plus_deepglobe.py on the data, crops,
evaluation tiles and schedule of configs/unet_loveda.py.

    python -m lcseg.models.import_weights resnet50-0676ba61.pth weights/resnet50.npz
    python main.py --config configs/deeplabv3plus_loveda.py --workdir runs/dl_loveda \
        --config.model.pretrained=weights/resnet50.npz
"""

from configs import deeplabv3plus_deepglobe, unet_loveda


def get_config():
    return deeplabv3plus_deepglobe.with_deeplabv3plus(unet_loveda.get_config())
