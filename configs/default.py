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

    config.optimizer = "adamw"  # 'adam', 'adamw' or 'sgd' (with momentum)
    config.learning_rate = 1e-3  # peak learning rate
    config.weight_decay = 1e-4  # AdamW: decoupled; SGD: added to the gradient; Adam: none
    config.momentum = 0.9  # SGD only
    config.nesterov = False  # SGD only
    config.grad_clip_norm = 0.0  # clip gradients to this global norm; 0: no clipping
    # Split each batch into this many sequential micro-batches, one update per batch.
    config.grad_accum_steps = 1
    # Parameters to freeze: '/'-joined Flax parameter-path prefixes, matched on whole
    # path components ('encoder/layer1' freezes encoder/layer1/..., not encoder/layer10),
    # e.g. ('encoder',) for a whole backbone, or for swin_fpn's patch embedding, first
    # stage and first patch merging ('encoder/features_0_0', 'encoder/features_0_2',
    # 'encoder/features_1_0', 'encoder/features_1_1', 'encoder/features_2'). A prefix that
    # matches nothing is an error that lists the names there are. Frozen parameters get
    # no gradient, no update, no weight decay and no optimiser state, and do not count in
    # gradient clipping's global norm (nor in the logged grad_norm); with EMA their
    # average stays equal to them. BatchNorm running statistics of frozen modules still
    # update in training (as with PyTorch's requires_grad=False). The optimiser state
    # depends on this field: a run resumes only with the config.frozen it was saved with.
    config.frozen = ()
    # Train on this many labelled pixels per image, drawn at random each step, instead of
    # whole crops (0: whole crops). Stage one of the zoom-out hypercolumn system: only
    # for models that classify given pixels ('hypercolumn').
    config.sampled_pixels = 0
    # 'constant', 'step', 'cosine', 'linear' (all with linear warmup) or 'onecycle'.
    config.schedule = "cosine"
    config.warmup_steps = 100
    config.end_learning_rate_factor = 0.01  # cosine/linear: final lr = factor * peak
    config.step_boundaries = (0.6, 0.85)  # 'step': fractions of num_train_steps
    config.step_factor = 0.1  # 'step': multiply the lr by this at each boundary
    # Reduce-on-plateau on validation mIoU, on top of any schedule: PyTorch's
    # ReduceLROnPlateau(mode='max') acting on a multiplier of the lr (lcseg/train.py,
    # update_tracker). When more than plateau_patience evaluations in a row bring no
    # improvement, multiply the lr by plateau_factor (0: off; e.g. 2 reduces at the 3rd).
    config.plateau_patience = 0
    config.plateau_factor = 0.5  # in [0, 1)
    # Floor of the multiplier: with a constant schedule, PyTorch's min_lr / learning_rate.
    config.plateau_min_scale = 1e-3
    # An improvement is mIoU > best * (1 + threshold) ('rel') or > best + threshold
    # ('abs'); smaller gains count as evaluations without improvement (PyTorch defaults).
    config.plateau_threshold = 1e-4
    config.plateau_threshold_mode = "rel"
    # Evaluations after a reduction during which the count of evaluations without
    # improvement stays at 0 (no reduction can follow sooner than cooldown + patience + 1).
    config.plateau_cooldown = 0
    # Stop after this many evaluations in a row without a strictly better validation mIoU
    # (PyTorch Lightning's EarlyStopping(mode='max', min_delta=0); 0: off).
    config.early_stopping_patience = 0
    # Exponential moving average of the parameters (0: off); when on, evaluation and
    # the best checkpoint use the averaged parameters.
    config.ema_decay = 0.0

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
    # Crops taken from each decoded training image (each batch still holds batch_size
    # different images; an image reappears in this many consecutive batches). Decoding
    # dominates the loader's cost when images are much larger than crops: about the
    # ratio of image to crop area, at most ~8; 1 when a crop is the whole image.
    config.data.crops_per_image = 1
    # Per loader process: threads decoding ahead, and decoded elements held ahead. They
    # bound the loader's memory (see lcseg/data/pipeline.py, LoaderOptions).
    config.data.read_threads = 1
    config.data.read_ahead = 2
    # Train and evaluate at this fraction of the full resolution (e.g. 0.25); 1: full.
    config.data.downscale = 1.0

    # Training augmentation, applied jointly to image and label (labels nearest only,
    # padding with the ignore label), in this order; the options below tune them.
    config.augment = ml_collections.ConfigDict()
    config.augment.ops = ("random_crop", "flips")
    config.augment.scale_range = (0.5, 2.0)  # random_scale
    config.augment.resized_crop_area = (0.25, 1.0)  # random_resized_crop: area fraction
    config.augment.resized_crop_ratio = (0.75, 1.3333)  # random_resized_crop: aspect
    config.augment.rotation_degrees = 10.0  # rotate: uniform in [-d, d]
    config.augment.brightness = 0.2  # colour_jitter (image only)
    config.augment.contrast = 0.2
    config.augment.saturation = 0.2
    config.augment.hue = 0.02
    config.augment.blur_sigma = (0.1, 1.5)  # blur, applied with blur_probability
    config.augment.blur_probability = 0.2
    config.augment.noise_std = 5.0  # noise (uint8 units), applied with noise_probability
    config.augment.noise_probability = 0.2

    config.half_precision = True  # bfloat16 compute, float32 parameters
    # Convolution weight gradients as chunked matrix products (lcseg/ops/fast_conv.py):
    # 'auto' uses them on the CPU backend only (GPUs keep cuDNN), 'on', or 'off'.
    config.fast_conv = "auto"
    config.seed = 0
    # None: start jax.distributed when a SLURM / Open MPI multi-process job is detected.
    config.multihost = ml_collections.config_dict.placeholder(bool)
    # On SIGTERM, SIGINT or this extra signal (e.g. from SLURM's --signal=USR1@90),
    # training finishes the current step, checkpoints it and exits with status 75 (run
    # again to resume; lcseg/preemption.py). None: SIGTERM and SIGINT only.
    config.preemption_signal = ml_collections.config_dict.placeholder(str)
    config.preemption_signal = "SIGUSR1"
    return config
