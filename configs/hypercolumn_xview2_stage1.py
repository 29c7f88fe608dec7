"""Zoom-out hypercolumns on xView2 building footprints, stage one: sampled pixels.

The system of Mostajabi et al. (2015), "Feedforward semantic segmentation with zoom-out
features": every pixel is described by the VGG16 activations above it (all thirteen conv
layers, up-sampled to the input; 4,224 channels), and an MLP (1,024 hidden units, ReLU,
dropout 0.5) classifies it (``lcseg/models/hypercolumn.py``). Training has two stages:

1. this config: the ImageNet VGG16 frozen, the MLP trained on a few randomly sampled
   labelled pixels per image (``config.sampled_pixels = 3``): many images per update,
   little correlation between the pixels an update sees, and no dense up-sampling;
2. ``configs/hypercolumn_xview2_stage2.py``: starting from this stage's best
   checkpoint, dense training on whole 256x256 crops.

End to end, on one GPU (bfloat16)::

    # ImageNet VGG16 (torchvision's vgg16-397923af.pth) converted to lcseg's layout.
    python -m lcseg.models.import_weights vgg16-397923af.pth weights/vgg16.npz
    # The pre-disaster images and footprints (datasets/xview2/README.md).
    python -m lcseg.prepare xview2 --manual_dir ~/Downloads/xview2 \\
        --data_dir ~/tensorflow_datasets
    # Stage one, then stage two from stage one's best checkpoint.
    python main.py --config configs/hypercolumn_xview2_stage1.py --workdir runs/stage1 \\
        --config.dataset.data_dir=~/tensorflow_datasets
    python main.py --config configs/hypercolumn_xview2_stage2.py --workdir runs/stage2 \\
        --config.dataset.data_dir=~/tensorflow_datasets --config.model.init_from=runs/stage1
    # Test-split metrics, then footprint polygons of new images.
    python -m lcseg.evaluate --workdir runs/stage2 --split test
    python -m lcseg.predict --workdir runs/stage2 --input images/ --output out/ \\
        --polygons building

(See ``python -m lcseg.predict --help`` for its input/output options.)

Settings (those of the reference; dataset facts from datasets/xview2/README.md):

* Adam, learning rate 1e-3, constant (no warmup, no weight decay: plain Adam), cross
  entropy with inverse-frequency class weights (``'inverse'``, from the training split's
  pixel counts): buildings are ~5% of the pixels, so unweighted the MLP would learn
  "background everywhere" first. (With sampled pixels the weights act on the sampled
  pixels, which are drawn uniformly among the labelled ones.)
* 256x256 random crops of the 1024x1024 images, with random flips.
* Epochs: the train split holds 2,519 pre-disaster images (``train/`` less the
  builder's 10% validation hold-out, 280 images). Each decoded image gives
  ``config.data.crops_per_image = 16`` crops, one to each of 16 consecutive batches:
  16 crops of 256x256 are as many pixels as one 1024x1024 image, so an epoch of
  2,519 x 16 = 40,304 crops sees as many pixels as an epoch of whole images, and decoding
  a 1024x1024 PNG is shared by 16 crops instead of paid per crop. With a batch of 16,
  one epoch is 40,304 / 16 = 2,519 steps exactly, and stage one's 40 epochs are
  40 x 2,519 = 100,760 steps. Evaluation and checkpoints come once per epoch.
* Evaluation on 512x512 tiles, 4 per batch (a 1024 image is 2x2 tiles exactly): the dense
  head's hidden layer over a tile is 512 x 512 x 1,024 values per tile.
"""

import ml_collections

from configs import default

TRAIN_IMAGES = 2_519  # xView2 train split (datasets/xview2/README.md, version 1.0.0)
CROPS_PER_IMAGE = 16  # (1024 / 256) ** 2: an epoch of crops covers each image's area once
BATCH_SIZE = 16
STEPS_PER_EPOCH = TRAIN_IMAGES * CROPS_PER_IMAGE // BATCH_SIZE  # 2,519
EPOCHS = 40


def get_config() -> ml_collections.ConfigDict:
    """Stage one: frozen ImageNet VGG16, MLP trained on 3 sampled pixels per image.

    Returns:
      The experiment config (``configs/default.py`` documents every field).
    """
    config = default.get_config()
    config.dataset.name = "xview2"

    config.model = ml_collections.ConfigDict()
    config.model.name = "hypercolumn"
    config.model.layers = "all"  # all 13 conv activations: 4,224 channels per pixel
    config.model.hidden = 1024
    config.model.dropout = 0.5
    # ImageNet VGG16 for the encoder (written by lcseg.models.import_weights, above).
    config.model.pretrained = "weights/vgg16.npz"

    config.frozen = ("encoder",)  # the VGG16 stays ImageNet's: only the MLP learns
    config.sampled_pixels = 3  # the loss sees 3 random labelled pixels per image

    config.loss = ml_collections.ConfigDict({"cross_entropy": 1.0})
    config.class_weights = "inverse"
    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.schedule = "constant"
    config.warmup_steps = 0

    config.batch_size = BATCH_SIZE
    config.eval_batch_size = 4
    config.crop_size = 256
    config.eval_tile_size = 512
    config.augment.ops = ("random_crop", "flips")
    config.data.crops_per_image = CROPS_PER_IMAGE
    config.data.workers = 8
    config.num_train_steps = EPOCHS * STEPS_PER_EPOCH  # 100,760
    config.log_every_steps = 100
    config.eval_every_steps = STEPS_PER_EPOCH
    config.checkpoint_every_steps = STEPS_PER_EPOCH
    config.half_precision = True
    return config
