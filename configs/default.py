"""Defaults shared by every experiment; each config file overrides what it changes.

The names here are the config contract other parts of lcseg (and users' command lines,
``--config.learning_rate=1e-3``) rely on. Configs are locked: a key not defined here is
an error, not a silently ignored typo.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "synthetic"
    # TFDS data dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    config.dataset.data_dir = ml_collections.config_dict.placeholder(str)
    # Downloaded archives, used to prepare a real dataset when it is missing.
    config.dataset.manual_dir = ml_collections.config_dict.placeholder(str)
    config.dataset.train_split = "train"
    config.dataset.eval_split = "validation"
    # Per-channel normalisation of [0, 1] pixels (ImageNet statistics by default).
    config.dataset.mean = (0.485, 0.456, 0.406)
    config.dataset.std = (0.229, 0.224, 0.225)

    config.model = ml_collections.ConfigDict()
    config.model.name = "unet"
    config.model.channels = (64, 128, 256, 512, 1024)
    config.model.convs_per_level = 2
    config.model.upsampling = "transpose"
    config.model.conv_bias = False

    # Loss menu: name -> weight (or a dict of options with 'weight').
    config.loss = ml_collections.ConfigDict({"cross_entropy": 1.0})
    # 'none', 'inverse', 'sqrt_inverse', 'median_frequency', 'min_over_count',
    # 'effective_number', or an explicit list of per-class weights.
    config.class_weights = "none"

    config.optimizer = "adamw"  # 'adam' or 'adamw'
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4  # AdamW only
    config.schedule = "cosine"  # 'constant' or 'cosine' (with linear warmup)
    config.warmup_steps = 100

    config.batch_size = 16  # global, across all devices and hosts
    config.eval_batch_size = 16
    config.crop_size = 256
    config.eval_tile_size = 512
    config.num_train_steps = 10_000
    config.log_every_steps = 50
    config.eval_every_steps = 1_000
    config.checkpoint_every_steps = 1_000
    config.num_panel_images = 4

    config.data = ml_collections.ConfigDict()
    config.data.workers = 2  # grain worker processes; 0: in the main process

    config.half_precision = True  # bfloat16 compute, float32 parameters
    config.seed = 0
    # None: start jax.distributed when a SLURM / Open MPI multi-process job is detected.
    config.multihost = ml_collections.config_dict.placeholder(bool)
    return config
