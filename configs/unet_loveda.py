"""U-Net on LoveDA (7 classes, urban and rural), for one GPU with bfloat16.

    python main.py --config configs/unet_loveda.py --workdir runs/loveda \
        --config.dataset.manual_dir=~/Downloads/loveda \
        --config.dataset.data_dir=~/tensorflow_datasets

(``manual_dir`` is only needed until the dataset is prepared; see
datasets/loveda/README.md.) Test masks are not published: evaluate on ``validation``
(``python -m lcseg.evaluate --workdir runs/loveda --split validation``) and send test
predictions to the benchmark server.

Why these numbers (dataset facts from datasets/loveda/README.md):

* 2522 training images (``train`` = ``train_urban+train_rural``) and 1669 validation
  images, all 1024x1024 px at 0.3 m: batches of 16 random 512 px crops for 15k steps,
  as the official LoveDA baselines train (github.com/Junjue-Wang/LoveDA), ~95 epochs.
* Evaluation tiles of 1024 px: one tile is one whole image, so nothing is cut or padded
  (1024 is a multiple of the U-Net's 16). Eight images per evaluation batch.
* A 1 Mpx PNG takes ~20 ms to decode, a 512 crop ~1 ms: each decoded image gives 4 crops
  (to 4 consecutive batches), and 4 loader processes suffice.
* Raw mask value 0 (no-data) is the ignore label; mIoU is over all seven classes,
  background included, as the benchmark reports it.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = "loveda"
    config.model.channels = (64, 128, 256, 512, 1024)
    config.batch_size = 16
    config.eval_batch_size = 8
    config.crop_size = 512
    config.eval_tile_size = 1024
    config.learning_rate = 1e-3
    config.warmup_steps = 500
    config.num_train_steps = 15_000
    config.log_every_steps = 100
    config.eval_every_steps = 1_500
    config.checkpoint_every_steps = 1_500
    config.data.workers = 4
    config.data.crops_per_image = 4
    config.half_precision = True
    return config
