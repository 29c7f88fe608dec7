"""DeepLabv3+ (ResNet-50, ImageNet encoder) on DeepGlobe Land Cover, one GPU, bfloat16.

    python -m lcseg.models.import_weights resnet50-0676ba61.pth weights/resnet50.npz
    python main.py --config configs/deeplabv3plus_deepglobe.py --workdir runs/dl_deepglobe \
        --config.model.pretrained=weights/resnet50.npz \
        --config.dataset.data_dir=~/tensorflow_datasets

(torchvision's ImageNet weights: https://download.pytorch.org/models/resnet50-0676ba61.pth;
the import is done once. Without ``pretrained`` the encoder starts from random weights.)

Data, crops, evaluation tiles, steps and loaders as configs/unet_deepglobe.py, which says
why (512 px crops, 1224 px evaluation tiles: DeepLabv3+ pads them to 1232, a multiple of
its output stride). The model:

* ResNet-50 at output stride 16, ASPP rates 6/12/18: the paper's training setting
  (stride 8 quadruples the cost of the last two stages; the paper gains about a point of
  mIoU from it at evaluation only).
* The paper's layout (``layout='smp'`` is segmentation_models_pytorch's, the one Cai &
  Zhang benchmark, on ``encoder='resnet34'``).
* AdamW at 1e-4 with 500 warm-up steps: an ImageNet encoder fine-tuned at the U-Net's
  1e-3 loses much of what it learnt in the first steps.
* Normalisation: ImageNet's statistics, which the default ``config.dataset.mean/std``
  already are and which the imported file records.
"""

import ml_collections

from configs import unet_deepglobe


def with_deeplabv3plus(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` (a U-Net config of some dataset) with this file's model and optimiser."""
    config.model = ml_collections.ConfigDict({
        "name": "deeplabv3plus",
        "encoder": "resnet50",
        "output_stride": 16,
        "layout": "standard",
        # A file written by `python -m lcseg.models.import_weights`, or None.
        "pretrained": ml_collections.config_dict.placeholder(str),
    })
    config.learning_rate = 1e-4
    return config


def get_config():
    return with_deeplabv3plus(unet_deepglobe.get_config())
