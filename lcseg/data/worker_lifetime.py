"""Loader worker processes that never outlive the process that started them.

grain's ``mp_prefetch`` workers are child processes of the training (or evaluation)
process. When that process dies without shutting them down (SIGKILL, a segfault, the
OOM killer) nothing stops them: they are re-parented to init (or a subreaper) and keep
their memory and cores, for as long as the machine runs. ``exit_with_parent`` is grain's
``worker_init_fn`` hook: it starts a daemon thread in each worker that checks twice a
second whether the worker still has the parent that started it, and ends the worker
(``os._exit``) as soon as it does not.

Polling, not Linux's ``PR_SET_PDEATHSIG``: that signal fires when the *thread* that
forked the child exits, not the process, and grain starts its workers from the threads
of a pool (``InterleaveIterDataset``'s iterator-making threads) that may end while the
process lives on.

Workers also ignore SIGINT, SIGUSR1 and SIGUSR2. Ctrl-C reaches every process of the
terminal's foreground group and SLURM's ``--signal`` every process of the job step; the
training process answers them by finishing its step and checkpointing
(lcseg/preemption.py), and its loader must not die under it meanwhile. SIGTERM keeps its
default action (Python's multiprocessing stops leftover children with it); grain stops
workers through its own event, or with SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

# Seconds between checks: a dead parent is noticed within this time.
POLL_SECONDS = 0.5
# Exit status of a worker whose parent is gone (nobody reads it: init reaps the worker).
ORPHAN_EXIT_STATUS = 1


def exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain ``worker_init_fn``: end this worker within a second of its parent's death.

    Pass it to every ``mp_prefetch(..., worker_init_fn=exit_with_parent)``.

    Args:
      worker_index: this worker's index (grain passes it; unused).
      worker_count: the number of workers (grain passes it; unused).
    """
    del worker_index, worker_count
    # The pid of the process that started this one, as multiprocessing recorded it at
    # start: if the parent died before this runs, getppid() would already be init's.
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    if threading.current_thread() is threading.main_thread():  # (grain: always)
        for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_SECONDS)
        # Re-parented: the process we load for is gone, nothing will read our output.
        os._exit(ORPHAN_EXIT_STATUS)

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()
