"""Run an iterator in a background thread so that the consumer can wait for it with a time limit.

The training loop must notice a stop request (SIGTERM/SIGUSR1) within seconds
even while the data loader waits on a store or retries a shard, and must never
wait for a batch without limit. ``Prefetcher.get(timeout)`` gives the next item,
re-raises the iterator's exception, or raises ``queue.Empty`` when nothing came
in time; the caller decides what to do between polls.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a blocked producer looks whether it was closed


class DataWaitTimeout(RuntimeError):
    """No item came from a data pipeline within its wait limit (``wait_timeout_s``)."""


class Prefetcher:
    """Pulls items from ``it`` in a daemon thread, one ahead of the consumer."""

    poll_s = POLL_S  # a good interval for the consumer's own polling, too

    def __init__(self, it: Iterator[Any], name: str = "vlbert-data"):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), name=name, daemon=True)
        self._thread.start()

    def _run(self, it: Iterator[Any]) -> None:
        while not self._closed.is_set():
            try:
                item = ("item", next(it))
            except StopIteration:
                item = ("end", None)
            except BaseException as e:  # handed to the consumer, raised there
                item = ("error", e)
            while not self._closed.is_set():
                try:
                    self._queue.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            if item[0] != "item":
                return

    def get(self, timeout: float) -> Any:
        """The next item; ``StopIteration`` at the end; the iterator's own exception if it
        raised; ``queue.Empty`` if nothing arrived within ``timeout`` seconds."""
        kind, value = self._queue.get(timeout=timeout)
        if kind == "end":
            self._closed.set()
            raise StopIteration
        if kind == "error":
            self._closed.set()
            raise value
        return value

    def close(self, wait_s: float = 0.0) -> None:
        """Stop pulling, and wait up to ``wait_s`` for the producer to let go of the iterator.
        A producer blocked inside ``next(it)`` exits when that call returns; waiting lets a
        DataLoader iterator shut its workers down before the process exits (a thread still
        inside it at exit can abort the interpreter). It is a daemon thread: a producer stuck
        on a store that never answers does not keep the process alive."""
        self._closed.set()
        if wait_s > 0:
            self._thread.join(wait_s)


def wait_for_item(prefetcher: Prefetcher, should_stop: Optional[Callable[[], bool]], warn_s: float,
                  timeout_s: float, describe: Callable[[], str], limit_key: str = "wait_timeout_s") -> tuple[bool, Any]:
    """Wait for ``prefetcher``'s next item, watching the wait: ``(True, item)``, or ``(False, None)``
    as soon as ``should_stop()`` is true while nothing has come. A warning every ``warn_s`` seconds;
    ``DataWaitTimeout`` after ``timeout_s`` (0 = no limit). ``describe()`` adds the pipeline's state
    (its skip counts, say) to both messages, and the error names the setting ``limit_key``.
    ``StopIteration`` and the iterator's own errors pass."""
    start = time.monotonic()
    next_warning = warn_s
    while True:
        try:
            return True, prefetcher.get(timeout=Prefetcher.poll_s)
        except queue.Empty:
            pass
        if should_stop is not None and should_stop():
            return False, None
        waited = time.monotonic() - start
        if timeout_s and waited >= timeout_s:
            raise DataWaitTimeout(f"no batch from the data pipeline for {waited:.0f} s ({limit_key} = "
                                  f"{timeout_s:g} s); the store may be unreachable or very slow; {describe()}")
        if waited >= next_warning:
            log.warning("waiting %.0f s for a batch (%s)", waited, describe())
            next_warning += warn_s
