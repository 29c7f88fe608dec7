"""Trains and evaluates a land-cover segmentation model.

    python main.py --config configs/unet_synthetic.py --workdir runs/demo

Any config field can be overridden: ``--config.learning_rate=1e-3``; unknown fields are
errors. Re-running the same command resumes from the workdir's latest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from lcseg import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
