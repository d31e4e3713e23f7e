"""Shard listing, the rank/worker split, cursors and fault handling (vlbert/data/shards.py)."""

import gzip
import io
import itertools
import json
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from fsspec.implementations.memory import MemoryFileSystem

from vlbert.data.formats import write_tar
from vlbert.data.shards import (
    Cursor,
    ShardStream,
    SkipCounter,
    SourceUnusable,
    epoch_order,
    expand_urls,
    open_shard,
    slot_plan,
)

pytestmark = pytest.mark.timeout(60)


class FakeFS(MemoryFileSystem):
    """In-memory store whose readers get their own file position (MemoryFileSystem
    hands every reader one shared BytesIO), log every read and fail on demand."""

    protocol = "fakemem"
    store: dict = {}
    pseudo_dirs = [""]
    reads: list = []  # (path, position, size)
    fail_reads: dict = {}  # path -> reads still to fail (-1: always)

    @classmethod
    def _strip_protocol(cls, path):
        return MemoryFileSystem._strip_protocol(str(path).removeprefix("fakemem://"))

    def _open(self, path, mode="rb", **kwargs):
        if mode != "rb":
            return super()._open(path, mode, **kwargs)
        path = self._strip_protocol(path)
        if path not in self.store:
            raise FileNotFoundError(path)
        return _FakeFile(path, self.store[path].getvalue())


class _FakeFile(io.BytesIO):
    def __init__(self, path, data):
        super().__init__(data)
        self.path = path

    def read(self, n=-1):
        left = FakeFS.fail_reads.get(self.path, 0)
        if left:
            FakeFS.fail_reads[self.path] = left - 1 if left > 0 else -1
            raise OSError(f"injected read failure on {self.path}")
        FakeFS.reads.append((self.path, self.tell(), n))
        return super().read(n)


fsspec.register_implementation("fakemem", FakeFS, clobber=True)


@pytest.fixture
def fakefs():
    FakeFS.store.clear()
    FakeFS.reads.clear()
    FakeFS.fail_reads.clear()
    yield FakeFS()
    FakeFS.store.clear()


def make_shards(base: str, n_shards: int, per_shard: int) -> list[str]:
    urls = []
    for s in range(n_shards):
        url = f"{base}/shard-{s:03d}.tar"
        write_tar(url, [(f"s{s}_{i:03d}", {"txt": f"caption {s} {i}".encode(), "json": b"{}"})
                        for i in range(per_shard)])
        urls.append(url)
    return urls


def keys(stream, n=None):
    return [r.key for r in itertools.islice(stream, n)]


def test_expand_urls_braces_globs_and_errors(tmp_path):
    for s in range(3):
        (tmp_path / f"{s:05d}.tar").write_bytes(b"")
    (tmp_path / "x.parquet").write_bytes(b"")
    assert expand_urls([str(tmp_path / "{00000..00002}.tar")]) == [str(tmp_path / f"{s:05d}.tar") for s in range(3)]
    assert expand_urls(str(tmp_path / "{00001,00002}.tar")) == [str(tmp_path / "00001.tar"), str(tmp_path / "00002.tar")]
    assert expand_urls([str(tmp_path / "*.tar"), str(tmp_path / "*.parquet")]) == sorted(
        str(p) for p in tmp_path.glob("*.tar")) + [str(tmp_path / "x.parquet")]
    fs = fsspec.filesystem("memory")
    for s in range(2):
        fs.pipe(f"/globtest/d{s}/a.tar", b"x")
    assert expand_urls(["memory://globtest/d*/a.tar"]) == ["memory:///globtest/d0/a.tar", "memory:///globtest/d1/a.tar"]
    assert expand_urls(["https://example.com/cc/{00..01}.tar"]) == ["https://example.com/cc/00.tar",
                                                                    "https://example.com/cc/01.tar"]
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.tar"):
        expand_urls([str(tmp_path / "nothing-*.tar")])
    with pytest.raises(FileNotFoundError, match="absent"):
        expand_urls([str(tmp_path / "absent-{0..3}.tar")])
    with pytest.raises(ValueError, match="empty"):
        expand_urls([])


def test_epoch_order_and_stream_are_deterministic(tmp_path):
    assert epoch_order(20, 7, 3) == epoch_order(20, 7, 3)
    assert epoch_order(20, 7, 3) != epoch_order(20, 7, 4) != epoch_order(20, 8, 3)
    assert sorted(epoch_order(20, 7, 3)) == list(range(20))
    urls = make_shards(str(tmp_path), 6, 5)
    a = keys(ShardStream(urls, 0, 1, seed=1, counter=SkipCounter()), 70)
    b = keys(ShardStream(urls, 0, 1, seed=1, counter=SkipCounter()), 70)
    assert a == b
    assert sorted(a[:30]) == sorted(a[30:60])  # each epoch covers every sample once
    assert a[:30] != a[30:60]  # in a new order


@pytest.mark.parametrize("n_shards", [7, 3])
def test_split_over_ranks_and_workers_is_disjoint_and_complete(tmp_path, n_shards):
    urls = make_shards(str(tmp_path), n_shards, 9)
    world, workers = 2, 2
    slots = world * workers
    seen = []
    for rank in range(world):
        for worker in range(workers):
            slot = rank * workers + worker
            got = keys(ShardStream(urls, slot, slots, seed=3, counter=SkipCounter(), loop=False))
            assert got, f"slot {slot} is empty"
            seen.append(set(got))
    union = set().union(*seen)
    assert sum(map(len, seen)) == len(union) == n_shards * 9
    plan = slot_plan(n_shards, slots, 3, seed=3, epoch=0)
    assert (plan.stride > 1) == (n_shards < slots)


def test_one_shard_four_slots_never_starves(tmp_path):
    urls = make_shards(str(tmp_path), 1, 10)
    per_slot = [keys(ShardStream(urls, s, 4, seed=0, counter=SkipCounter()), 12) for s in range(4)]
    for got in per_slot:
        assert len(got) == 12  # crosses several epochs of the shared shard
    epoch0 = [keys(ShardStream(urls, s, 4, seed=0, counter=SkipCounter(), loop=False)) for s in range(4)]
    assert [len(k) for k in epoch0] == [3, 3, 2, 2]  # every 4th sample of the 10
    assert sorted(sum(epoch0, [])) == [f"s0_{i:03d}" for i in range(10)]


def test_empty_slot_raises_instead_of_hanging(tmp_path):
    urls = make_shards(str(tmp_path), 1, 2)  # 2 samples shared by 4 slots: slots 2, 3 get none
    with pytest.raises(SourceUnusable, match="too few samples for the slots: 1 shard.* shared by 4 slots"):
        keys(ShardStream(urls, 3, 4, seed=0, counter=SkipCounter()), 1)


def test_resume_from_cursor_seeks_and_matches(fakefs):
    urls = make_shards("fakemem://res", 3, 20)
    full = list(itertools.islice(ShardStream(urls, 1, 2, seed=5, counter=SkipCounter()), 70))
    for k in (0, 4, 29, 30, 41):
        cursor = full[k].cursor if k else Cursor()
        start = k + 1 if k else 0
        FakeFS.reads.clear()
        resumed = list(itertools.islice(ShardStream(urls, 1, 2, 5, SkipCounter(), cursor=cursor), 70 - start))
        assert [r.key for r in resumed] == [r.key for r in full[start:]]
        assert [r.payload for r in resumed] == [r.payload for r in full[start:]]
        if k:  # the first read of the resumed shard is at the cursor, nothing before it
            path = FakeFS._strip_protocol(urls[full[k].shard])
            first = next((pos for p, pos, _ in FakeFS.reads if p == path), None)
            assert first == cursor.offset


def test_transient_errors_are_retried(fakefs):
    urls = make_shards("fakemem://flaky", 2, 6)
    expected = keys(ShardStream(urls, 0, 1, 0, SkipCounter(), loop=False))
    FakeFS.fail_reads["/flaky/shard-000.tar"] = 2
    counter = SkipCounter()
    got = keys(ShardStream(urls, 0, 1, 0, counter, retries=3, backoff_s=0.001, loop=False))
    assert got == expected
    assert counter["read_retry"] == 2 and counter["failed_shard"] == 0

    FakeFS.fail_reads["/flaky/shard-001.tar"] = -1  # always failing: skipped after the retries
    counter = SkipCounter()
    got = keys(ShardStream(urls, 0, 1, 0, counter, retries=2, backoff_s=0.001, loop=False))
    assert got == [k for k in expected if k.startswith("s0_")]
    assert counter["failed_shard"] == 1 and counter["read_retry"] == 2


def test_failure_mid_shard_resumes_at_the_cursor(fakefs, monkeypatch):
    urls = make_shards("fakemem://mid", 1, 8)
    expected = keys(ShardStream(urls, 0, 1, 0, SkipCounter(), loop=False))
    real_read, calls = _FakeFile.read, [0]

    def read(self, n=-1):
        calls[0] += 1
        if calls[0] == 9:  # somewhere inside the shard
            raise TimeoutError("injected timeout")
        return real_read(self, n)

    monkeypatch.setattr(_FakeFile, "read", read)
    counter = SkipCounter()
    assert keys(ShardStream(urls, 0, 1, 0, counter, backoff_s=0.001, loop=False)) == expected
    assert counter["read_retry"] == 1


def test_truncated_missing_and_corrupt_shards_are_counted(tmp_path):
    urls = make_shards(str(tmp_path), 4, 5)
    data = open(urls[0], "rb").read()
    open(urls[0], "wb").write(data[: 2048 * 3 + 612])  # inside sample 3 (2 members of 2 blocks each)
    open(urls[2], "wb").write(b"\x01" * 1024)  # not a tar
    listed = expand_urls([str(tmp_path / "*.tar")])
    (tmp_path / "shard-003.tar").unlink()  # deleted after listing
    counter = SkipCounter()
    got = keys(ShardStream(listed, 0, 1, 0, counter, loop=False))
    assert sorted(got) == [f"s0_{i:03d}" for i in range(3)] + [f"s1_{i:03d}" for i in range(5)]
    assert counter.as_dict() == {"truncated_shard": 1, "corrupt_shard": 1, "missing_shard": 1}
    merged = SkipCounter({"truncated_shard": 2}).merge(counter)
    assert merged["truncated_shard"] == 3 and merged.total() == 5


def test_long_names_pax_and_directories(tmp_path):
    long_key = "sub/" + "k" * 150
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu.tar"), (tarfile.PAX_FORMAT, "pax.tar")):
        with tarfile.open(tmp_path / name, "w", format=fmt) as tar:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            for key, ext, data in [("a", "txt", b"A"), (long_key, "txt", b"L"), (long_key, "json", b"{}"),
                                   ("b", "txt", b"B")]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        stream = ShardStream([str(tmp_path / name)], 0, 1, 0, SkipCounter(), loop=False)
        recs = list(stream)
        assert [(r.key, r.payload) for r in recs] == [
            ("a", {"txt": b"A"}), (long_key, {"txt": b"L", "json": b"{}"}), ("b", {"txt": b"B"})]
        resumed = ShardStream([str(tmp_path / name)], 0, 1, 0, SkipCounter(), cursor=recs[0].cursor, loop=False)
        assert [r.key for r in resumed] == [long_key, "b"]


# --------------------------------------------------------------------------- text shards

TEXTS = ["first doc", "", "second doc", None, "third doc", "   ", "fourth doc"]


def _jsonl_bytes():
    lines = []
    for t in TEXTS:
        lines.append(json.dumps({"text": t} if t is not None else {"title": "no text"}).encode())
    lines.insert(3, b"{not json")
    lines.insert(5, b'{"text": "\xff\xfe bad"}')
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.json.gz", "a.jsonl.zst", "a.parquet"])
def test_text_shards_skip_bad_rows_and_resume(name):
    fs = fsspec.filesystem("memory")
    url = f"memory://text/{name}"
    raw = _jsonl_bytes()
    if name.endswith(".gz"):
        fs.pipe(url, gzip.compress(raw))
    elif name.endswith(".zst"):
        fs.pipe(url, zstandard.ZstdCompressor().compress(raw))
    elif name.endswith(".parquet"):
        rows = [t for t in TEXTS] + [b"\xff\xfe bad"]
        table = pa.table({"text": pa.array([t.encode() if isinstance(t, str) else t for t in rows], pa.binary())})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=3)
        fs.pipe(url, buf.getvalue())
    else:
        fs.pipe(url, raw)
    counter = SkipCounter()
    recs = list(ShardStream([url], 0, 1, 0, counter, loop=False))
    assert [r.payload for r in recs] == ["first doc", "second doc", "third doc", "fourth doc"]
    expect = {"empty_text": 2, "bad_text": 2}
    if not name.endswith(".parquet"):
        expect["bad_json"] = 1
    assert counter.as_dict() == dict(sorted(expect.items()))
    for k in range(len(recs)):
        resumed = ShardStream([url], 0, 1, 0, SkipCounter(), cursor=recs[k].cursor, loop=False)
        assert [r.payload for r in resumed] == [r.payload for r in recs[k + 1:]]
    # Two slots share the one shard: disjoint, complete.
    halves = [[r.payload for r in ShardStream([url], s, 2, 0, SkipCounter(), loop=False)] for s in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(r.payload for r in recs) and not set(halves[0]) & set(halves[1])


def test_open_shard_reads_through_fsspec(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "x"}\n'))
    with open_shard(str(path), "gzip") as f:
        assert f.readline() == b'{"text": "x"}\n'


@pytest.mark.parametrize("ext", ["gz", "zst"])
def test_truncated_or_corrupt_compressed_text_is_counted(ext):
    fs = fsspec.filesystem("memory")
    rng = np.random.default_rng(0)
    raw = b"".join(json.dumps({"text": f"doc {i} " + " ".join(map(str, rng.integers(0, 10**6, 20)))}).encode() + b"\n"
                   for i in range(3000))
    if ext == "gz":
        packed = gzip.compress(raw)
    else:  # two frames, as parallel compressors write
        packed = zstandard.ZstdCompressor().compress(raw[:100000]) + zstandard.ZstdCompressor().compress(raw[100000:])
    fs.pipe(f"/ctext/full.jsonl.{ext}", packed)
    fs.pipe(f"/ctext/cut.jsonl.{ext}", packed[: len(packed) // 2])
    fs.pipe(f"/ctext/bad.jsonl.{ext}", packed[:4] + b"garbage" * 50)
    outcomes = {}
    for name in ("full", "cut", "bad"):
        counter = SkipCounter()
        docs = [r.payload for r in ShardStream([f"memory:///ctext/{name}.jsonl.{ext}"], 0, 1, 0, counter, loop=False)]
        assert docs == [f"doc {i} " + d.split(" ", 2)[2] for i, d in enumerate(docs)]  # the good lines, in order
        outcomes[name] = (len(docs), counter.as_dict())
    assert outcomes["full"] == (3000, {})
    assert 500 < outcomes["cut"][0] < 3000 and outcomes["cut"][1] == {"truncated_shard": 1}
    assert outcomes["bad"] == (0, {"corrupt_shard": 1})
