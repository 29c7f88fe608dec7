"""What lcseg's commands print: their own lines, not their libraries' internals, and
one clear line, not a traceback, for bad input.

A training run would otherwise print, among its progress lines, Orbax's every step of
every checkpoint save (its full ``CheckpointManagerOptions`` included), JAX's probe for a
TPU backend, TFDS's "Load dataset info" and "Variant folder ... has no
dataset_info.json" lines (the latter a warning on every fresh ``prepare``). Those are
for debugging the libraries, not for reading a run.

lcseg's command-line tools call ``quiet_library_logs()`` once flags are parsed. It hides
those libraries' INFO lines (and the known harmless warnings) unless the user passed
absl's ``--verbosity`` (``-v``): ``--verbosity=0`` shows every library's INFO lines again,
``--verbosity=1`` debug lines too. Warnings and errors of the libraries, and everything
lcseg logs itself (progress, metrics, per-class tables, where files went) always show.

Native libraries log before Python can filter anything: TensorFlow (imported by CLU's
TensorBoard writer and by TFDS, in the training process and in every loader worker)
prints its oneDNN notice, preceded by C++ absl's "log messages before InitializeLog"
warning. Importing this module sets, unless ``--verbosity`` is on the command line or the
user set them, the environment that keeps them quiet (``NATIVE_LOG_ENVIRONMENT``); worker
processes inherit it. Commands import ``lcseg.cli`` before anything that imports
TensorFlow.

``Progress`` is lcseg's own progress line (done/total, rate, ETA, a loss), written by
training and the learning-rate finder whether or not the output is a terminal.

``exit_on_bad_input`` turns lcseg's bad-input errors (a missing workdir, checkpoint,
split, config field: FileNotFoundError / ValueError whose message names the file, field
or value and what to do) into that one line and exit status 1 instead of a traceback;
``config_from_flag`` loads ``--config`` so that a missing file or an override of a field
the config lacks is such an error too. With ``--verbosity`` tracebacks show, for
debugging.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
import time
from collections.abc import Callable, Iterator

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# Set before TensorFlow loads (it reads them once): TF is only lcseg's TensorBoard writer
# here, so its oneDNN CPU kernels (whose notice this turns off) never run lcseg's maths,
# and its C++ INFO lines say nothing to a user.
NATIVE_LOG_ENVIRONMENT = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "1"}


def _verbosity_on_command_line(argv: list[str]) -> bool:
    return any(arg.startswith(("--verbosity", "-v")) for arg in argv[1:])


if not _verbosity_on_command_line(sys.argv):
    for _name, _value in NATIVE_LOG_ENVIRONMENT.items():
        os.environ.setdefault(_name, _value)

# Source files (path fragments, '/'-separated) whose records below WARNING are hidden.
QUIET_SOURCES = (
    "/orbax/",  # Every checkpoint save: options, threads, renames, throughput.
    "/tensorflow_datasets/",  # "Load dataset info from ...", builder internals.
    "/jax/_src/xla_bridge.py",  # "Unable to initialize backend 'tpu'" and other probes.
    "/grain/",  # Worker start-up and iterator internals.
    "/jax2onnx/",  # lcseg.export: a 600-character dump of the converter's parameters.
)
# (source fragment, message format string) of warnings that mean nothing to a user.
HARMLESS_WARNINGS = (
    # Checking whether a dataset is prepared looks into its folder before it is written.
    ("/tensorflow_datasets/", "Variant folder %s has no %s"),
    # evaluate / predict open checkpoints read-only on purpose.
    ("/orbax/", "CheckpointManagerOptions.read_only=True, setting save_interval_steps=0."),
    ("/orbax/", "Given directory is read only=%s"),
    # Restoring a checkpoint written before Orbax kept a metadata file (evaluate, predict,
    # resume): it restores all the same.
    ("/orbax/", "Metadata file does not exist: %s"),
    # A checkpoint saved between evaluations (a signal, checkpoint_every_steps) has no
    # mIoU to rank it by; that is why the latest one is kept besides the best.
    ("/orbax/", "Requested `tracked_metric`; did not provide metrics."),
)


class LibraryNoiseFilter(py_logging.Filter):
    """Drops library records below WARNING from ``QUIET_SOURCES``, and ``HARMLESS_WARNINGS``."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        path = record.pathname.replace(os.sep, "/")
        if record.levelno < py_logging.WARNING:
            return not any(fragment in path for fragment in QUIET_SOURCES)
        if record.levelno == py_logging.WARNING:
            return not any(fragment in path and record.msg == message
                           for fragment, message in HARMLESS_WARNINGS)
        return True


_FILTER = LibraryNoiseFilter()
_SHORT_FORMAT = py_logging.Formatter("%(levelname).1s%(asctime)s %(message)s",
                                     datefmt="%m%d %H:%M:%S")


def verbosity_requested() -> bool:
    """Whether the user passed absl's ``--verbosity`` / ``-v`` (flags must be parsed)."""
    return ("verbosity" in flags.FLAGS and flags.FLAGS.is_parsed()
            and flags.FLAGS["verbosity"].present > 0)


def quiet_library_logs() -> bool:
    """Hides the libraries' internal log lines, unless ``--verbosity`` was given.

    Call it at the start of a command's ``main`` (after absl parsed the flags, so that
    ``--verbosity`` is known; before the first JAX or TFDS call, so that their first
    lines are already filtered). Calling it again does nothing more.

    Returns:
      True if the filter is installed, False if ``--verbosity`` asked for everything.
    """
    if verbosity_requested():
        return False
    # Every record, absl's or the standard library's (JAX logs with the latter), reaches
    # the terminal through absl's handler on the root logger under absl.app.run.
    # Filtering there catches all. The filter also goes on the loggers the libraries log
    # to, for programs that print through Python's default handler instead (argparse
    # commands such as lcseg.prepare, where absl's handler is not installed).
    for target in (logging.get_absl_handler(), py_logging.getLogger("absl"),
                   py_logging.getLogger("jax._src.xla_bridge")):
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
    # absl's prefix (microseconds, thread id, file:line) is for debugging; a user reads
    # the level, the time and the message ('I1207 22:33:42 step 250/1000 ...').
    logging.get_absl_handler().setFormatter(_SHORT_FORMAT)
    return True


def format_duration(seconds: float) -> str:
    """``3725`` -> ``'1h02m'``, ``125`` -> ``'2m05s'``, ``7.3`` -> ``'7s'``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """lcseg's own progress line: ``step 250/1000 (25%), 11.2 steps/s, ETA 1m07s, loss 0.41``.

    Logged through absl (so on a terminal, in a log file, under nohup or SLURM alike).
    The rate is that of the units since the previous line; the ETA divides what is left
    by the rate since the first line, so time spent between units (evaluations,
    checkpoints) counts in it.

    Args:
      total: units of the whole job (the last step, e.g. ``config.num_train_steps``).
      unit: what is counted ("step", "window", ...).
      every_seconds: ``due()`` is true this long after the previous line.
    """

    def __init__(self, total: int, *, unit: str = "step", every_seconds: float = 30.0):
        self.total = total
        self.unit = unit
        self.every_seconds = every_seconds
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None

    def due(self) -> bool:
        """Whether ``every_seconds`` have passed since the previous line (or none was)."""
        return self._last is None or time.perf_counter() - self._last[1] >= self.every_seconds

    def pause_ended(self) -> None:
        """Starts the next rate interval now: time since the previous line (an evaluation,
        a checkpoint) stays out of the units' rate (it still counts in the ETA)."""
        if self._last is not None:
            self._last = (self._last[0], time.perf_counter())

    def report(self, done: int, **values: float) -> str:
        """Logs (and returns) the line for ``done`` units, with ``values`` (e.g. loss=...)."""
        now = time.perf_counter()
        parts = [f"{self.unit} {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%)"]
        if self._first is not None and done > self._last[0] and now > self._last[1]:
            parts.append(f"{(done - self._last[0]) / (now - self._last[1]):.3g} {self.unit}s/s")
            overall = (done - self._first[0]) / (now - self._first[1])
            parts.append(f"ETA {format_duration((self.total - done) / overall)}")
        parts += [f"{name} {value:.4g}" for name, value in values.items()]
        if self._first is None:
            self._first = (done, now)
        self._last = (done, now)
        line = ", ".join(parts)
        logging.info("%s", line)
        return line


@contextlib.contextmanager
def exit_on_bad_input(program: str) -> Iterator[None]:
    """Exits with ``PROGRAM: error: MESSAGE`` (status 1) on FileNotFoundError / ValueError.

    lcseg raises these for bad input, with messages that say what was wrong, where, and
    what to do; a traceback would bury that line. With ``--verbosity`` the error
    propagates (traceback and all), for debugging.

    Args:
      program: how the command is run, e.g. ``'lcseg.evaluate'``.
    """
    try:
        yield
    except (FileNotFoundError, ValueError) as error:
        if verbosity_requested():
            raise
        message = " ".join(str(error).split())  # One line, whatever the message held.
        sys.exit(f"{program}: error: {message}")


def config_from_flag(flag_name: str = "config") -> ml_collections.ConfigDict:
    """The config of an ``ml_collections`` ``--config`` flag, or a ValueError saying why not.

    config_flags loads the file when the flag is first read, inside ``main``: a missing
    file or a failing ``get_config`` would surface there as a traceback.

    Args:
      flag_name: the flag defined with ``config_flags.DEFINE_config_file``.

    Raises:
      ValueError: naming the file or the override and what to do.
    """
    path = config_flags.get_config_filename(flags.FLAGS[flag_name])
    # ``file.py:arguments`` passes the arguments to the file's get_config.
    file_path = path.split(":", 1)[0]
    if not os.path.isfile(file_path):
        raise ValueError(f"--{flag_name} {file_path}: no such file; give a config file such "
                         "as configs/unet_synthetic.py.")
    try:
        return getattr(flags.FLAGS, flag_name)
    except Exception as error:  # The config file itself failed: name it.
        if verbosity_requested():
            raise
        raise ValueError(f"--{flag_name} {path} could not be loaded: "
                         f"{type(error).__name__}: {error}") from None


def config_flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """An ``app.run(main, flags_parser=...)`` that reports unknown config overrides in a line.

    ``--config.nofield=1`` fails while absl parses the flags, before ``main`` runs, with
    ml_collections' AttributeError (``"'nofield'"``) and a traceback through absl.

    Args:
      program: how the command is run, e.g. ``'main.py'``.
    """

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except flags.Error as error:
            # absl's own report (app.parse_flags_with_usage) of a config file that fails to
            # load, e.g. 'configs/test_hypercolumn.py:3' (a stage it lacks), is a
            # "FATAL Flags parsing error" holding the file's whole traceback: keep its first
            # line and the exception's.
            if _verbosity_on_command_line(argv):
                return app.parse_flags_with_usage(argv)
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            head = lines[0] if lines else str(error)
            cause = f" {lines[-1]}" if len(lines) > 1 else ""
            sys.exit(f"{program}: error: {head}{cause} (--helpshort lists the flags)")
        except (AttributeError, KeyError) as error:
            if _verbosity_on_command_line(argv):
                raise
            # ml_collections' message: "'nmae'" and perhaps a line 'Did you mean "name"...'.
            # (an AttributeError wrapping a KeyError wrapping that text).
            text: object = error
            while isinstance(text, BaseException) and text.args:
                text = text.args[0]
            text = str(text)
            lines = [line.strip().strip("'\"") for line in text.splitlines() if line.strip()]
            name = lines[0] if lines else "?"
            hint = " ".join(line for line in lines[1:] if line.startswith("Did you mean"))
            overrides = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")
                         and arg.split("=")[0].rsplit(".", 1)[-1] == name]
            sys.exit(f"{program}: error: {' '.join(overrides) or name}: the config has no "
                     f"field {name!r}{f' ({hint})' if hint else ''}; the fields are those of "
                     "configs/default.py (and the chosen model's options under config.model).")

    return parse
