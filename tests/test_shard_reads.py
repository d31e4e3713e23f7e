"""Reading shards (vlbert/data/shards.py): the open's read-ahead, which errors are retried and
how, what is logged when a shard is skipped, and where ``ShardStream.cursor`` stands."""

import logging
import sys

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from test_shards import FakeFS, _FakeFile, fakefs, keys, make_shards  # noqa: F401 (fixture)
from vlbert.data.shards import Cursor, ShardStream, SkipCounter, epoch_order, is_transient, open_shard

pytestmark = pytest.mark.timeout(60)


class _RecordingMemFS(MemoryFileSystem):
    """Memory store that records the keywords each open is given."""

    protocol = "openrec"
    store: dict = {}
    pseudo_dirs = [""]
    opened: list = []

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(str(path).removeprefix("openrec://"))

    def _open(self, path, mode="rb", **kwargs):
        if mode == "rb":
            _RecordingMemFS.opened.append(kwargs)
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("openrec", _RecordingMemFS, clobber=True)


def test_open_shard_asks_for_8_mib_read_ahead_blocks():
    """Fails if the block size is not 8 MiB or the cache is not read-ahead (BLOCK_SIZE as
    9 << 20, CACHE_TYPE as "XXreadaheadXX": a local file ignores both, so only the request shows)."""
    _RecordingMemFS.store.clear()
    _RecordingMemFS.opened.clear()
    fsspec.filesystem("openrec").pipe("/o/a.jsonl", b'{"text": "x"}\n')
    with open_shard("openrec:///o/a.jsonl") as f:
        assert f.read() == b'{"text": "x"}\n'
    assert len(_RecordingMemFS.opened) == 1
    assert _RecordingMemFS.opened[0]["block_size"] == 8 * 1024 * 1024
    assert _RecordingMemFS.opened[0]["cache_type"] == "readahead"


class HttpError(Exception):
    """Shaped like gcsfs.retry.HttpError (not an OSError): the status in ``code``."""

    def __init__(self, code=None, status=None):
        super().__init__(f"HTTP {code or status}")
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class ServerError(HttpError):
    """An exception with a 503 ``code`` whose class is not named HttpError."""


def test_transient_http_statuses_are_exactly_timeouts_throttling_and_server_errors():
    """Fails if any status of 408 (request timeout), 429 (too many requests), 500, 502, 503, 504
    (server errors, bad gateway, unavailable, gateway timeout) is not retried, or any other from 100
    to 599 is (501 not implemented and 505 version not supported repeat whatever the retry), if
    the status is not also read from ``status``, or if the class name is not checked."""
    retried = {408, 429, 500, 502, 503, 504}
    assert [c for c in range(100, 600) if is_transient(HttpError(c))] == sorted(retried)
    assert [c for c in range(100, 600) if is_transient(HttpError(status=c))] == sorted(retried)
    assert not is_transient(HttpError())
    assert not is_transient(ServerError(503))


def test_botocore_connection_errors_are_transient_by_name():
    """Fails if botocore's connection errors (not OSError) are not retried, or if another
    botocore error or a same-named class outside botocore is ("!=" for "==", "not in" for "in")."""
    botocore = pytest.importorskip("botocore.exceptions", reason="botocore comes with the s3 extra (s3fs)")
    assert is_transient(botocore.EndpointConnectionError(endpoint_url="https://s3.example"))
    assert is_transient(botocore.ConnectionClosedError(endpoint_url="https://s3.example"))
    assert is_transient(botocore.HTTPClientError(error="reset"))
    assert not is_transient(botocore.NoCredentialsError())
    assert not is_transient(botocore.ParamValidationError(report="bad"))
    not_botocore = type("HTTPClientError", (Exception,), {})
    assert not is_transient(not_botocore())
    assert not is_transient(type("ConnectionError", (ValueError,), {})())


def test_without_aiohttp_os_errors_stay_transient(monkeypatch):
    """Fails if the module's fallback for a missing aiohttp is not OSError (``_ClientError =
    None`` makes every check of a non-OSError raise TypeError)."""
    import importlib.util

    import vlbert.data.shards as shards

    monkeypatch.setitem(sys.modules, "aiohttp", None)  # import aiohttp raises ImportError
    spec = importlib.util.spec_from_file_location("shards_without_aiohttp", shards.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    assert module.is_transient(ConnectionResetError()) and module.is_transient(TimeoutError())
    assert not module.is_transient(ValueError("not a network error"))

def test_a_stream_needs_urls():
    """Fails if an empty URL list is not refused with its message."""
    with pytest.raises(ValueError) as err:
        ShardStream([], 0, 1, 0, SkipCounter())
    assert str(err.value) == "ShardStream needs at least one shard URL"


def test_the_stream_cursor_follows_each_record(tmp_path):
    """Fails if ``stream.cursor`` is not the last handed-out record's cursor (reading without
    ``track``), does not move to the next shard, then the next epoch, at their ends, or if a
    record's shard, epoch and index are not the plan's."""
    urls = make_shards(str(tmp_path), 2, 3)
    stream = ShardStream(urls, 0, 1, seed=6, counter=SkipCounter())
    it = iter(stream)
    order = epoch_order(2, 6, 0)
    for pos in range(2):
        for i in range(3):
            rec = next(it)
            assert stream.cursor == rec.cursor
            assert (rec.key, rec.shard, rec.epoch, rec.index) == (f"s{order[pos]}_{i:03d}", order[pos], 0, i)
            assert (rec.cursor.epoch, rec.cursor.pos, rec.cursor.index) == (0, pos, i + 1)
    rec = next(it)  # the first of epoch 1: the cursor passed (0, 2, 0, 0) and (1, 0, 0, 0)
    assert (rec.epoch, rec.index, rec.cursor.epoch, rec.cursor.pos) == (1, 0, 1, 0)
    assert rec.shard == epoch_order(2, 6, 1)[0]
    one_pass = ShardStream(urls, 0, 1, seed=6, counter=SkipCounter(), loop=False)
    assert len(list(one_pass)) == 6 and one_pass.cursor == Cursor(0, 2, 0, 0)


def test_the_cursor_points_at_the_next_epoch_while_its_first_shard_opens(fakefs, monkeypatch):
    """Fails if ``stream.cursor`` is not (epoch + 1, 0, 0, 0) once an epoch has ended (``self.cursor
    = None`` there): a failure opening the next epoch's first shard leaves it for a checkpoint."""
    urls = make_shards("fakemem://next", 1, 2)
    stream = ShardStream(urls, 0, 1, 0, SkipCounter())
    it = iter(stream)
    for _ in range(2):
        next(it)
        stream.mark_delivered()

    def refuse(self, path, mode="rb", **kwargs):
        raise ValueError("cannot open")

    monkeypatch.setattr(FakeFS, "_open", refuse)
    with pytest.raises(ValueError, match="cannot open"):
        next(it)
    assert stream.cursor == Cursor(1, 0, 0, 0)

def test_retries_back_off_exponentially_then_skip(fakefs, monkeypatch, caplog):
    """Fails if the defaults are not 3 retries from 0.5 s doubling (sleeps 0.5, 1, 2), if a
    shard is given up before or after the fourth failure, or if the warning differs."""
    import vlbert.data.shards as shards

    sleeps = []
    monkeypatch.setattr(shards, "time", type("Clock", (), {"sleep": staticmethod(sleeps.append)}))
    urls = make_shards("fakemem://backoff", 1, 2)
    FakeFS.fail_reads["/backoff/shard-000.tar"] = -1
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="vlbert.data.shards"):
        assert keys(ShardStream(urls, 0, 1, 0, counter, loop=False)) == []
    assert sleeps == [0.5, 1.0, 2.0]
    assert counter.as_dict() == {"failed_shard": 1, "read_retry": 3}
    assert [r.getMessage() for r in caplog.records] == [
        "shard fakemem://backoff/shard-000.tar failed 4 times (injected read failure on /backoff/shard-000.tar); "
        "skipped"]


def test_failures_count_again_after_each_record(fakefs, monkeypatch):
    """Fails if a failure count is not reset by a record read after it: with one retry allowed,
    two failures with records between them lose nothing."""
    urls = make_shards("fakemem://reset", 1, 8)
    expected = keys(ShardStream(urls, 0, 1, 0, SkipCounter(), loop=False))
    real_read, calls = _FakeFile.read, [0]

    def read(self, n=-1):
        calls[0] += 1
        if calls[0] in (5, 30):
            raise OSError("injected")
        return real_read(self, n)

    monkeypatch.setattr(_FakeFile, "read", read)
    counter = SkipCounter()
    assert keys(ShardStream(urls, 0, 1, 0, counter, retries=1, backoff_s=0.001, loop=False)) == expected
    assert counter.as_dict() == {"read_retry": 2}


def test_other_errors_are_raised_not_retried(fakefs, monkeypatch):
    """Fails if an error that is not a read error is retried or swallowed."""
    urls = make_shards("fakemem://bug", 1, 2)

    def read(self, n=-1):
        raise ValueError("a bug, not a flaky store")

    monkeypatch.setattr(_FakeFile, "read", read)
    counter = SkipCounter()
    with pytest.raises(ValueError, match="a bug"):
        keys(ShardStream(urls, 0, 1, 0, counter, backoff_s=0.001, loop=False))
    assert counter.as_dict() == {}


def test_skipped_shards_are_logged(tmp_path, caplog):
    """Fails if the warning for a missing shard or a shard error differs."""
    missing, noise = str(tmp_path / "gone.tar"), str(tmp_path / "noise.tar")
    (tmp_path / "noise.tar").write_bytes(b"\x01" * 1024)
    with caplog.at_level(logging.WARNING, logger="vlbert.data.shards"):
        assert keys(ShardStream([missing, noise], 0, 1, 0, SkipCounter(), shuffle=False, loop=False)) == []
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == f"shard {missing} is missing; skipped"
    assert msgs[1].startswith(f"shard {noise}: corrupt_shard: ") and msgs[1].endswith("; rest of the shard skipped")
