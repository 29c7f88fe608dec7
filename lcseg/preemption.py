"""Stopping training cleanly when the cluster says so: a signal costs one step.

Schedulers stop jobs from outside: SLURM sends SIGTERM some seconds before SIGKILL (or,
with ``#SBATCH --signal=USR1@90``, SIGUSR1 90 seconds before the time limit), and a
terminal sends SIGINT on Ctrl-C. ``StopSignal`` turns SIGTERM, SIGINT and one
configurable extra signal (``config.preemption_signal``) into a flag that the training
loop reads once per step. The loop then finishes the current step (and the one queued
behind it: the loop keeps at most one in flight), checkpoints it (state and data-iterator
position, like any checkpoint), waits until the checkpoint is committed, flushes its
writers and raises ``Preempted``: the process exits with
``EXIT_STATUS``, on which a job script can requeue, and the next start resumes from that
checkpoint exactly.

Several processes stop at the same step: every step, each process contributes its flag to
a one-boolean all-gather (``StopSignal.requested``), so when any one of them received a
signal, all of them checkpoint that step and exit. JAX's own
``multihost_utils.reached_preemption_sync_point`` works here too (CPU processes
included), but it sees SIGTERM only (through a C++ handler that ours would replace) and
picks a stop step some steps after the signal, so it cannot serve SIGINT or SIGUSR1.

The first signal sets the default action back for all these signals, so a second one
ends the process at once, without waiting for the checkpoint: Orbax writes a checkpoint
into a temporary folder and renames it when complete, so whatever the moment, the latest
complete checkpoint stays intact and the next start resumes from it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from absl import logging

from lcseg import parallel

# EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): the
# run stopped on a signal after checkpointing; run the same command again to resume.
EXIT_STATUS = 75

# Always handled; config.preemption_signal adds one more.
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Training stopped on a signal; its checkpoint is committed.

    A ``SystemExit`` with code ``EXIT_STATUS``: ``main.py`` exits with that status and no
    traceback; in-process callers may catch it.

    Attributes:
      step: the step that was checkpointed (the next start resumes after it).
    """

    def __init__(self, step: int):
        super().__init__(EXIT_STATUS)
        self.step = step


def parse_signal(name: str | None) -> signal.Signals | None:
    """``'SIGUSR1'`` / ``'USR1'`` / ``'usr1'`` -> ``signal.SIGUSR1``; None or 'none' -> None.

    Raises:
      ValueError: ``name`` is not a signal this platform knows, or one that cannot be
        caught (SIGKILL, SIGSTOP).
    """
    if name is None or str(name).strip().lower() in ("", "none"):
        return None
    upper = str(name).upper()
    full = upper if upper.startswith("SIG") else f"SIG{upper}"
    try:
        signum = signal.Signals[full]
    except KeyError:
        raise ValueError(f"config.preemption_signal={name!r} is not a signal name; use e.g. "
                         "'SIGUSR1' (as in SLURM's --signal=USR1@90), or None.") from None
    if signum in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"config.preemption_signal={name!r} cannot be caught; use e.g. "
                         "'SIGUSR1'.")
    return signum


class StopSignal:
    """Signal handlers that ask the training loop to stop, while in a ``with`` block.

    Usage::

        with StopSignal(config.preemption_signal) as stop:
            for step in ...:
                ...  # one training step
                if stop.requested():  # every process, every step
                    ...  # checkpoint, wait, exit

    Handlers can only be installed from the main thread; elsewhere signals keep their
    current handling (a warning says so). Leaving the block restores the previous ones.
    """

    def __init__(self, extra_signal: str | None = None, *,
                 on_stop: str = "finishing this step, then checkpointing it"):
        """Args:
          extra_signal: a signal name to handle besides SIGTERM and SIGINT.
          on_stop: what the program does when asked to stop, for its log lines
            (``lcseg.predict``: it drops the scene in progress).
        """
        self.on_stop = on_stop
        self.signals = list(DEFAULT_SIGNALS)
        extra = parse_signal(extra_signal)
        if extra is not None and extra not in self.signals:
            self.signals.append(extra)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("Training runs outside the main thread: stop signals (%s) are not "
                            "handled, a signal ends it without a checkpoint.",
                            ", ".join(s.name for s in self.signals))
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        logging.info("Stop signals handled: %s (%s, then exit with status %d).",
                     ", ".join(s.name for s in self.signals), self.on_stop, EXIT_STATUS)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            # None: installed outside Python (e.g. by a C++ library); nothing to restore to.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signal.Signals(signum)
        # A second signal takes the default action: the process ends at once.
        for other in self.signals:
            signal.signal(other, signal.SIG_DFL)
        logging.warning("Received %s: %s and exiting with status %d. Send it again to exit "
                        "at once (what is complete stays intact).", self.received.name,
                        self.on_stop, EXIT_STATUS)

    def requested(self) -> bool:
        """Whether any process received a stop signal.

        With several processes this is a collective (an all-gather of one boolean): every
        process must call it at the same points, e.g. once per step, and all get the same
        answer.
        """
        return parallel.any_process_true(self.received is not None)
