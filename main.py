"""Trains and evaluates a land-cover segmentation model.

    python main.py --config configs/unet_synthetic.py --workdir runs/demo

Any config field can be overridden: ``--config.learning_rate=1e-3``; unknown fields are
errors. Re-running the same command resumes from the workdir's latest checkpoint; a
rerun whose config would change what the checkpoints mean is refused (lcseg/workdir.py).
Libraries' internal log lines (Orbax, TFDS, JAX backend probes) are hidden unless
``--verbosity=0`` (or higher) is given; bad input (a missing config file, an unknown
config field or dataset, data not prepared) prints one ``main.py: error:`` line, not a
traceback. See lcseg/cli.py.
"""

from absl import app, flags
from ml_collections import config_flags

# lcseg.cli first: it sets the environment that quiets TensorFlow's C++ logging, which
# must be in place before lcseg.train imports it (through CLU's TensorBoard writer).
from lcseg import cli, train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard events.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.quiet_library_logs()  # Orbax / TFDS / JAX internals only with --verbosity.
    # Bad input (a missing config file, an unknown dataset, data not prepared): one line
    # naming what to fix, not a traceback (--verbosity shows the traceback).
    with cli.exit_on_bad_input("main.py"):
        train.train_and_evaluate(cli.config_from_flag("config"), FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.config_flags_parser("main.py"))
