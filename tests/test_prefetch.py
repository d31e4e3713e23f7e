"""The watched wait for a data pipeline's next item (vlbert.data.prefetch): a stop request ends
the wait, a wait past its limit is an error with a message, and warnings come while it lasts."""

from __future__ import annotations

import re
import threading
import time

import pytest

from vlbert.data.prefetch import DataWaitTimeout, Prefetcher, wait_for_item

pytestmark = pytest.mark.timeout(60)


def stalled_after(n: int, release: threading.Event):
    """Yields 0..n-1, then waits for ``release`` (at most 30 s) before yielding n."""
    yield from range(n)
    release.wait(30)
    yield n


def test_items_then_a_stop_request_ends_the_wait():
    release = threading.Event()
    prefetcher = Prefetcher(stalled_after(2, release))
    try:
        assert [wait_for_item(prefetcher, None, 60, 0, str)[1] for _ in range(2)] == [0, 1]
        stop_at = time.monotonic() + 0.6
        assert wait_for_item(prefetcher, lambda: time.monotonic() > stop_at, 60, 0, str) == (False, None)
        release.set()
        assert wait_for_item(prefetcher, None, 60, 0, str) == (True, 2)  # nothing was lost
    finally:
        release.set()
        prefetcher.close(wait_s=5)


def test_a_wait_past_its_limit_is_an_error_and_warns_meanwhile(caplog):
    release = threading.Event()
    prefetcher = Prefetcher(stalled_after(0, release))
    try:
        with caplog.at_level("WARNING", logger="vlbert.data.prefetch"), \
                pytest.raises(DataWaitTimeout, match=r"for \d+ s \(wait_timeout_s = 1.5 s\).*skips so far: 3 bad"):
            wait_for_item(prefetcher, lambda: False, 0.5, 1.5, lambda: "skips so far: 3 bad")
    finally:
        release.set()
        prefetcher.close(wait_s=5)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) >= 2 and all(w.startswith("waiting") and "skips so far: 3 bad" in w for w in warnings)


def test_the_iterators_own_error_and_its_end_pass_through():
    def broken():
        yield 1
        raise ValueError("shard 7 is corrupt")

    prefetcher = Prefetcher(broken())
    assert wait_for_item(prefetcher, None, 60, 0, str) == (True, 1)
    with pytest.raises(ValueError, match="shard 7"):
        wait_for_item(prefetcher, None, 60, 0, str)
    ended = Prefetcher(iter([]))
    with pytest.raises(StopIteration):
        wait_for_item(ended, None, 60, 0, str)


def wait_until(cond, limit_s: float = 10.0) -> None:
    """Polls ``cond`` every 10 ms until it holds (fails after ``limit_s``: a slow machine waits)."""
    end = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def producer_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_the_producer_is_a_named_daemon_thread():
    """The thread is named (``vlbert-data`` by default) and is a daemon, so that a producer stuck on
    a store never keeps the process alive. Fails if the default name or ``daemon=True`` changes."""
    release = threading.Event()
    # Only the threads these two start: earlier tests in this process may have left producers of
    # the default name behind (daemon threads still inside a stalled source).
    before = set(threading.enumerate())
    default, named = Prefetcher(stalled_after(0, release)), Prefetcher(stalled_after(0, release), name="vqa-eval")
    try:
        started = set(threading.enumerate()) - before
        assert sorted(t.name for t in started) == ["vlbert-data", "vqa-eval"]
        assert all(t.daemon for t in started)
    finally:
        release.set()
        default.close(wait_s=5)
        named.close(wait_s=5)


def test_the_producer_runs_one_item_ahead():
    """With a consumer that takes nothing, the producer pulls two items (one queued, one waiting to
    be queued) and no more. Fails if the queue holds more than one item (``maxsize=2``: three)."""
    pulled = []

    def counting():
        for i in range(100):
            pulled.append(i)
            yield i

    prefetcher = Prefetcher(counting())
    try:
        wait_until(lambda: len(pulled) >= 2)
        time.sleep(0.6)  # over two of the producer's polls: time to pull more, if it could
        assert pulled == [0, 1]
        assert [prefetcher.get(timeout=10) for _ in range(3)] == [0, 1, 2]
    finally:
        prefetcher.close(wait_s=5)


def test_a_slow_consumer_loses_nothing():
    """Items wait in the producer while the consumer is away for several of its polls. Fails if the
    producer drops an item it could not queue within one poll (``continue`` as ``break``)."""
    prefetcher = Prefetcher(iter(range(5)))
    time.sleep(0.8)
    got = []
    with pytest.raises(StopIteration):
        while True:
            got.append(prefetcher.get(timeout=10))
    assert got == [0, 1, 2, 3, 4]


def test_a_stop_request_is_seen_within_a_poll():
    """A stop requested before the wait ends it after one poll of the queue (0.25 s), not later.
    Fails if the poll interval grows (``POLL_S = 1.25``)."""
    release = threading.Event()
    prefetcher = Prefetcher(stalled_after(0, release))
    try:
        calls = []
        start = time.monotonic()
        assert wait_for_item(prefetcher, lambda: calls.append(1) or True, 60, 0, str) == (False, None)
        elapsed = time.monotonic() - start
        assert calls == [1] and 0.2 <= elapsed < 1.0
    finally:
        release.set()
        prefetcher.close(wait_s=5)


def test_close_lets_go_of_a_blocked_producer():
    """``close()`` returns at once by default, even while the producer is inside ``next``; with a
    wait it returns once the producer has left (here after ``next`` returns, 0.3 s) and the item
    in hand is dropped; a producer blocked on a full queue leaves within one poll. Fails if the
    default wait is not 0, the wait is skipped (``wait_s > 1``), or the producer's poll grows."""
    entered, release = threading.Event(), threading.Event()

    def slow():
        entered.set()
        release.wait(30)
        yield 0

    prefetcher = Prefetcher(slow(), name="close-test")
    assert entered.wait(10)
    start = time.monotonic()
    prefetcher.close()
    assert time.monotonic() - start < 0.5 and producer_threads("close-test")
    threading.Timer(0.3, release.set).start()
    prefetcher.close(wait_s=1)
    assert not producer_threads("close-test")

    pulled = []
    full = Prefetcher((pulled.append(i) or i for i in range(100)), name="full-test")
    wait_until(lambda: len(pulled) == 2)  # one queued, the second in hand: blocked on the full queue
    start = time.monotonic()
    full.close(wait_s=5)
    assert not producer_threads("full-test") and time.monotonic() - start < 1.0


def test_wait_messages_in_full(caplog):
    """The timeout's error and the warnings, word for word: with ``warn_s`` 0.5 and a limit of 1.6 s
    the wait warns at 0.5, 1.0 and 1.5 s (three warnings) and then fails; the error names the
    setting given as ``limit_key``. Fails if a message changes or the warnings come at another pace
    (``next_warning += warn_s`` as ``=``: one every poll after the first)."""
    release = threading.Event()
    prefetcher = Prefetcher(stalled_after(0, release))
    try:
        with caplog.at_level("WARNING", logger="vlbert.data.prefetch"), \
                pytest.raises(DataWaitTimeout) as e:
            wait_for_item(prefetcher, None, 0.5, 1.6, lambda: "3 skipped", limit_key="eval.wait_s")
    finally:
        release.set()
        prefetcher.close(wait_s=5)
    m = re.fullmatch(r"no batch from the data pipeline for (\d+) s \(eval\.wait_s = 1\.6 s\); the store may be "
                        r"unreachable or very slow; 3 skipped", str(e.value))
    assert m and int(m.group(1)) >= 2, str(e.value)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    for w, at in zip(warnings, (0.5, 1.0, 1.5)):
        m = re.fullmatch(r"waiting (\d+) s for a batch \(3 skipped\)", w)
        assert m and abs(int(m.group(1)) - at) <= 1, w
