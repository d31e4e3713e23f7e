"""Preemption: SIGTERM or SIGUSR1 asks the trainer to checkpoint and exit cleanly.

The handler only records the request; the training loop checks it before each
step and while it waits for data, all ranks agree through an all-reduce
(``dist.any_rank``), save a checkpoint at that same step and return. Slurm sends SIGTERM before killing a
preempted job (and ``--signal=USR1@<s>`` before the time limit); the job is
requeued and resumes from the checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs handlers for ``STOP_SIGNALS`` (main thread only) until ``restore()``."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signal: Optional[str] = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGUSR1 will not stop training cleanly")
            return
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum).name
            log.warning("received %s: stopping at the next step boundary with a checkpoint", self.signal)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
