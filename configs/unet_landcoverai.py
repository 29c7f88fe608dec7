"""U-Net on LandCover.ai v1 (5 classes), for one GPU with bfloat16.

    python main.py --config configs/unet_landcoverai.py --workdir runs/landcoverai \
        --config.dataset.manual_dir=~/Downloads \
        --config.dataset.data_dir=~/tensorflow_datasets

(``manual_dir`` is only needed until the dataset is prepared; see
datasets/landcoverai/README.md.) Then ``python -m lcseg.evaluate --workdir
runs/landcoverai --split test``.

Why these numbers (dataset facts from datasets/landcoverai/README.md):

* The official split is of 512x512 tiles (7470 train, 1602 validation, 1602 test) at
  25-50 cm: a 512 crop is a whole tile, and evaluation tiles of 512 are the official
  tiles themselves, unpadded (512 is a multiple of the U-Net's 16).
* 20k steps of 16 tiles are ~43 epochs (467 steps each); evaluating every 2000 steps
  (~4 epochs) costs 101 batches of 16 tiles.
* Tiles are small PNGs: 4 loader processes suffice.
* Every pixel is labelled (no ignore label); mIoU is over all five classes, background
  included.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = "landcoverai"
    config.model.channels = (64, 128, 256, 512, 1024)
    config.batch_size = 16
    config.eval_batch_size = 16
    config.crop_size = 512
    config.eval_tile_size = 512
    config.learning_rate = 1e-3
    config.warmup_steps = 500
    config.num_train_steps = 20_000
    config.log_every_steps = 100
    config.eval_every_steps = 2_000
    config.checkpoint_every_steps = 2_000
    config.data.workers = 4
    config.half_precision = True
    return config
