"""The watched wait for a data pipeline's next item (vlbert.data.prefetch): a stop request ends
the wait, a wait past its limit is an error with a message, and warnings come while it lasts."""

from __future__ import annotations

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
