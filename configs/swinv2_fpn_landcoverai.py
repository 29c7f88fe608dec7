"""SwinV2-B + FPN on LandCover.ai: the transformer system of the LandCover.ai hackathon project.

Weights: SatlasPretrain's SwinV2-B (aerial RGB, or Sentinel-2 RGB), as torchgeo
distributes them (``torchgeo.models.Swin_V2_B_Weights.NAIP_RGB_SI_SATLAS`` or
``SENTINEL2_RGB_SI_SATLAS``; the file is a plain torchvision ``swin_v2_b`` state dict,
downloaded once, e.g. ``Swin_V2_B_Weights.NAIP_RGB_SI_SATLAS.get_state_dict()`` on a
machine with internet, then ``torch.save``d, or the ``.pth`` from torchgeo's weight
URL). Convert it once (no PyTorch needed), with Satlas's normalisation (pixels / 255):

    python -m lcseg.models.import_weights satlas_swinb_naip_rgb.pth weights/satlas_b.npz \
        --normalisation=satlas
    python main.py --config configs/swinv2_fpn_landcoverai.py --workdir runs/swin_fpn \
        --config.model.pretrained=weights/satlas_b.npz \
        --config.dataset.manual_dir=~/Downloads --config.dataset.data_dir=~/tensorflow_datasets

torchvision's ImageNet ``swin_v2_b`` weights work the same way without
``--normalisation`` (ImageNet statistics). Without pretrained weights the backbone starts
from random weights (slow to converge: a transformer wants pretraining).

The hackathon recipe, field by field:

* model: SwinV2-B, an FPN of 256 channels over its four stages, a 128-channel head;
* optimiser: Adam, learning rate 1e-4, constant, with reduce-on-plateau on validation
  mIoU (factor 0.5 after 3 evaluations without improvement) and early stopping after 10;
* loss: cross-entropy with inverse-frequency class weights and label smoothing 0.1;
* batch 16 as 2 accumulated micro-batches of 8 (the memory of a 512 px SwinV2-B batch);
* augmentation: random resized crop to 512, colour jitter, rotation, flips;
* bfloat16 compute (``half_precision``) on GPU.

``config.frozen=('encoder',)`` freezes the whole backbone (the hackathon's first phase),
``('encoder/features_0_0', 'encoder/features_0_2', 'encoder/features_1_0',
'encoder/features_1_1', 'encoder/features_2')`` only the patch embedding and the first
stage.
"""

import ml_collections

from configs import unet_landcoverai


def get_config():
    config = unet_landcoverai.get_config()
    config.model.unlock()
    for field in list(config.model.keys()):
        del config.model[field]
    config.model.name = "swin_fpn"
    config.model.backbone = "swin_v2_b"
    config.model.fpn_channels = 256
    config.model.stages = (0, 1, 2, 3)
    config.model.head_channels = 128
    config.model.pretrained = ml_collections.config_dict.placeholder(str)
    config.model.lock()

    config.optimizer = "adam"
    config.learning_rate = 1e-4
    config.schedule = "constant"
    config.warmup_steps = 500
    config.plateau_patience = 2  # Halve the lr at the third evaluation without progress.
    config.plateau_factor = 0.5
    config.early_stopping_patience = 10
    config.loss = {"cross_entropy": {"weight": 1.0, "label_smoothing": 0.1}}
    config.class_weights = "inverse"
    config.batch_size = 16
    config.grad_accum_steps = 2
    config.crop_size = 512
    config.augment.ops = ("random_resized_crop", "colour_jitter", "rotate", "flips")
    config.augment.resized_crop_area = (0.25, 1.0)
    config.augment.rotation_degrees = 15.0
    # One evaluation per ~2 epochs of 7,470 tiles: plateau and early stopping count these.
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 1_000
    config.num_train_steps = 40_000
    return config
