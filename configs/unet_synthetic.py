"""The demo: a small U-Net on the embedded synthetic dataset, sized for a laptop CPU.

    python main.py --config configs/unet_synthetic.py --workdir runs/demo
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset.name = "synthetic"
    config.model.channels = (16, 32, 64, 128)
    config.batch_size = 16
    config.eval_batch_size = 16
    config.crop_size = 64
    config.eval_tile_size = 128
    config.learning_rate = 3e-3
    config.warmup_steps = 50
    config.num_train_steps = 1000
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    # XLA's CPU convolutions are slow in bfloat16 (no AMX path): float32 on CPU.
    config.half_precision = False
    return config
