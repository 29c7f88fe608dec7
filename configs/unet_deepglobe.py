"""U-Net on DeepGlobe Land Cover (6 classes), for one GPU with bfloat16.

    python main.py --config configs/unet_deepglobe.py --workdir runs/deepglobe \
        --config.dataset.manual_dir=~/Downloads --config.dataset.data_dir=~/tensorflow_datasets

(``manual_dir`` is only needed until the dataset is prepared; see
datasets/deepglobe/README.md.) Then ``python -m lcseg.evaluate --workdir runs/deepglobe
--split test``.

Why these numbers (dataset facts from datasets/deepglobe/README.md):

* 803 labelled images of 2448x2448 px at 50 cm, split ~454/207/142 into train /
  validation / test: a 512 px crop (256 m) holds whole fields and urban blocks; a
  training image holds ~23 non-overlapping crops, and 40k steps of 16 random crops draw
  ~1400 crops from each image.
* Evaluation tiles of 1224 px: 2448 divides into 2x2 tiles exactly (no padded pixels),
  and a large tile keeps context at the tile edges. The U-Net pads 1224 to 1232 (a
  multiple of 16) internally. Eight tiles per batch (two images): one full-resolution
  64-channel activation of such a batch is already 1.6 GB in bfloat16.
* Decoding a whole 2448x2448 JPEG (6 Mpx) and its mask costs ~100 ms, a 512 crop ~1 ms:
  each decoded image gives 8 crops (to 8 consecutive batches; each batch still holds 16
  different images), so one core delivers ~90 crops/s instead of ~9, and 8 loader
  processes keep the GPU fed (benchmarks/input_pipeline.py).
* "unknown" pixels are the ignore label: mIoU is over the six evaluated classes.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = "deepglobe"
    config.model.channels = (64, 128, 256, 512, 1024)
    config.batch_size = 16
    config.eval_batch_size = 8
    config.crop_size = 512
    config.eval_tile_size = 1224
    config.learning_rate = 1e-3
    config.warmup_steps = 500
    config.num_train_steps = 40_000
    config.log_every_steps = 100
    config.eval_every_steps = 2_000
    config.checkpoint_every_steps = 2_000
    config.data.workers = 8
    config.data.crops_per_image = 8
    config.half_precision = True
    return config
