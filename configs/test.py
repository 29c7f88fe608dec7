"""A tiny configuration for tests: seconds on a CPU."""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = "synthetic"
    config.model.channels = (4, 8)
    config.model.convs_per_level = 1
    config.batch_size = 4
    config.eval_batch_size = 4
    config.crop_size = 32
    config.eval_tile_size = 64
    config.num_train_steps = 6
    config.warmup_steps = 2
    config.log_every_steps = 2
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    config.num_panel_images = 2
    config.data.workers = 0
    # Two crops per decoded image: the end-to-end tests (resume mid-round, two
    # processes) run the loader's multi-crop rounds.
    config.data.crops_per_image = 2
    config.half_precision = False
    return config
