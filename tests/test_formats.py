"""The shard readers of ``vlbert/data/formats.py`` called directly (no torch, no stream):
offsets, slots, limits at their exact bounds, counted skips and every message.

Expected values come from Python's ``tarfile`` (member offsets), from pyarrow (written
rows), or are written out by hand in the test.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import lzma
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from vlbert.data.formats import (
    DEFAULT_LIMITS, ReadLimits, ShardError, _bounded_lines, _decode_text, decompressed, iter_jsonl,
    iter_parquet, iter_tar, reader_for, write_tar,
)


class Counter:
    """A skip counter: ``add(reason)`` as ``SkipCounter`` has it."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n


def _pad(n: int) -> int:
    return (n + 511) // 512 * 512


# --------------------------------------------------------------------------- limits


def test_read_limits_defaults_and_frozen():
    """Fails if a default cap changes (64, 32 and 16 MiB written out) or the record is not frozen."""
    assert ReadLimits() == ReadLimits(64 * 1024 * 1024, 32 * 1024 * 1024, 16 * 1024 * 1024)
    assert DEFAULT_LIMITS == ReadLimits()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ReadLimits().max_line_bytes = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- tar


def _tar(members: list[tuple[str, bytes]], dirs: tuple[str, ...] = ()) -> tuple[bytes, list[tarfile.TarInfo]]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    return data, tarfile.open(fileobj=io.BytesIO(data)).getmembers()


def test_tar_samples_keys_offsets_and_slots():
    """Fails if a sample's next offset is not the next sample's first header (or, for the
    last, the end of its last member), if the key is not the path up to the basename's first
    dot, if bad names or directories are not skipped as they should be, or if the slot test
    ``idx % stride == phase`` changes."""
    members = [("a.jpg", b"J"), ("a.txt", b"cap a"), ("d.x/b.c.json", b"{}"), ("noext", b"?"),
               (".hidden", b"h"), ("c.txt", b"cap c" * 200)]
    data, infos = _tar(members, dirs=("d.x",))
    by_name = {i.name: i for i in infos}
    start_b, start_c = by_name["d.x/b.c.json"].offset, by_name["c.txt"].offset
    end_c = by_name["c.txt"].offset_data + _pad(1000)
    ctr = Counter()
    got = list(iter_tar(io.BytesIO(data), 0, 0, 1, 0, ctr))
    assert got == [
        (0, "a", {"jpg": b"J", "txt": b"cap a"}, start_b, 1),
        (1, "d.x/b", {"c.json": b"{}"}, start_c, 2),  # bad names start no sample
        (2, "c", {"txt": b"cap c" * 200}, end_c, 3),
    ]
    assert ctr.counts == {"bad_tar_member": 2}
    # Two slots: phase 1 gets only "d.x/b"; phase 0 gets "a" and "c".
    assert [g[:2] for g in iter_tar(io.BytesIO(data), 0, 0, 2, 1, Counter())] == [(1, "d.x/b")]
    assert [g[:2] for g in iter_tar(io.BytesIO(data), 0, 0, 2, 0, Counter())] == [(0, "a"), (2, "c")]
    # Resume at sample 2's first header.
    assert [g[:2] for g in iter_tar(io.BytesIO(data), start_c, 2, 1, 0, Counter())] == [(2, "c")]
    assert [g[:2] for g in iter_tar(io.BytesIO(data), start_c, 2, 2, 0, Counter())] == [(2, "c")]
    assert list(iter_tar(io.BytesIO(data), start_c, 2, 2, 1, Counter())) == []


def test_tar_member_cap_is_exact():
    """Fails if a member of exactly ``max_member_bytes`` is refused (``>`` as ``>=``), one
    byte more is read, or the sample's other members and the next sample are lost after it
    (``continue`` as ``break``)."""
    data, _ = _tar([("k.a", b"123"), ("k.b", b"1234"), ("k.c", b"12"), ("m.a", b"m")])
    ctr = Counter()
    got = list(iter_tar(io.BytesIO(data), 0, 0, 1, 0, ctr, ReadLimits(max_member_bytes=3)))
    assert [g[2] for g in got] == [{"a": b"123", "c": b"12"}, {"a": b"m"}]  # the walk goes on after it
    assert ctr.counts == {"member_too_large": 1}


def test_empty_tar_shards_say_why():
    """Fails if an empty shard at its start is not ``empty_shard`` with "0 bytes" (no bytes)
    or "no members" (only a directory), or if a resumed read past the end raises."""
    with pytest.raises(ShardError) as e:
        list(iter_tar(io.BytesIO(b""), 0, 0, 1, 0, Counter()))
    assert (e.value.reason, str(e.value)) == ("empty_shard", "empty_shard: 0 bytes")
    data, infos = _tar([], dirs=("only",))
    with pytest.raises(ShardError) as e:
        list(iter_tar(io.BytesIO(data), 0, 0, 1, 0, Counter()))
    assert (e.value.reason, str(e.value)) == ("empty_shard", "empty_shard: no members")
    data, infos = _tar([("a.txt", b"x")])
    assert list(iter_tar(io.BytesIO(data), infos[0].offset_data + 512, 1, 1, 0, Counter())) == []


# --------------------------------------------------------------------------- text


@pytest.mark.parametrize("value, cap, reason", [
    (b"abcd", 4, None), (bytearray(b"abcde"), 4, "document_too_large"), (b"\xff\xfe", 4, "bad_text"),
    (5, 4, "bad_text"), (None, 4, "bad_text"), ("abcde", 4, "document_too_large"),
    ("\U0001F600\U0001F600", 8, None), ("\U0001F600\U0001F600a", 8, "document_too_large"),
    ("\ud800", 2, "document_too_large"), ("\ud800", 3, None), ("\u00e9\u00e9", 4, None),
    ("\u00e9\u00e9\u00e9", 5, "document_too_large"), (" \n\t", 8, "empty_text"), (b"  ", 8, "empty_text"),
])
def test_decode_text_limits_and_reasons(value, cap, reason):
    """Fails if the UTF-8 size is not the cap's measure (e.g. the character count, or ``>``
    as ``>=`` at exactly the cap: two 4-byte emoji fit 8 bytes), if bytes are not decoded, or a
    reason changes. Sizes by hand: U+1F600 is 4 bytes, U+00E9 2, a lone surrogate 3."""
    ctr = Counter()
    got = _decode_text(value, ctr, ReadLimits(max_document_bytes=cap))
    if reason is None:
        assert got == (value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value)
        assert ctr.counts == {}
    else:
        assert got is None and ctr.counts == {reason: 1}


def _parquet(col, row_group_size=2, name="text") -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({name: col}), buf, row_group_size=row_group_size)
    return buf.getvalue()


def test_parquet_rows_slots_and_resume():
    """Fails if the row groups before ``offset`` are not skipped correctly (rows lost or
    repeated), the slot test changes, or a row's next offset is not row + 1."""
    texts = [f"row {i}" for i in range(7)]
    data = _parquet(texts, row_group_size=3)
    assert list(iter_parquet(io.BytesIO(data), 0, 0, 1, 0, Counter())) == [
        (i, str(i), t, i + 1, i + 1) for i, t in enumerate(texts)]
    for offset in range(8):
        got = [g[0] for g in iter_parquet(io.BytesIO(data), offset, offset, 1, 0, Counter())]
        assert got == list(range(offset, 7))
    assert [g[0] for g in iter_parquet(io.BytesIO(data), 2, 2, 2, 1, Counter())] == [3, 5]


def test_parquet_counts_bad_rows_and_refuses_bad_files():
    """Fails if invalid UTF-8 in a binary or string column stops the shard instead of being
    counted, or if a message changes (no text column, not Parquet, no rows)."""
    ctr = Counter()
    data = _parquet(pa.array([b"ok", b"\xff", None, b"   "], pa.binary()))
    assert [g[2] for g in iter_parquet(io.BytesIO(data), 0, 0, 1, 0, ctr)] == ["ok"]
    assert ctr.counts == {"bad_text": 2, "empty_text": 1}
    ctr = Counter()
    data = _parquet(pa.array(["fine", "also"], pa.large_string()))
    assert [g[2] for g in iter_parquet(io.BytesIO(data), 0, 0, 1, 0, ctr)] == ["fine", "also"]
    with pytest.raises(ShardError) as e:
        list(iter_parquet(io.BytesIO(_parquet(["a"], name="caption")), 0, 0, 1, 0, Counter()))
    assert str(e.value) == "bad_text_shard: no 'text' column (columns: ['caption'])"
    with pytest.raises(ShardError) as e:
        list(iter_parquet(io.BytesIO(b"not parquet at all"), 0, 0, 1, 0, Counter()))
    assert e.value.reason == "corrupt_shard"
    empty = _parquet(pa.array([], pa.string()))
    with pytest.raises(ShardError) as e:
        list(iter_parquet(io.BytesIO(empty), 0, 0, 1, 0, Counter()))
    assert str(e.value) == "empty_shard: 0 rows"
    assert list(iter_parquet(io.BytesIO(empty), 1, 1, 1, 0, Counter())) == []


def _lines_reference(data: bytes, cap: int):
    out, start = [], 0
    while start < len(data):
        nl = data.find(b"\n", start)
        end = len(data) if nl < 0 else nl + 1
        line = data[start:end]
        out.append((None if len(line) > cap else line, len(line)))
        start = end
    return out


def test_bounded_lines_by_hand_and_against_a_split():
    """Fails if a line of exactly ``cap`` bytes is dropped, a longer one kept, a byte count is
    off, a line across chunks is cut, or a last line without a newline is lost."""
    f = io.BytesIO(b"ab\ncdef\n\ngh")
    assert list(_bounded_lines(f, 3, chunk=2)) == [(b"ab\n", 3), (None, 5), (b"\n", 1), (b"gh", 2)]
    assert list(_bounded_lines(io.BytesIO(b"abcdef"), 5, chunk=4)) == [(None, 6)]
    assert list(_bounded_lines(io.BytesIO(b""), 5)) == []
    rng = random.Random(0)
    for _ in range(200):
        data = bytes(rng.choice(b"ab\n") for _ in range(rng.randrange(0, 30)))
        cap, chunk = rng.randrange(1, 8), rng.randrange(1, 9)
        assert list(_bounded_lines(io.BytesIO(data), cap, chunk)) == _lines_reference(data, cap), (data, cap, chunk)


def test_bounded_lines_default_chunk_is_64_kib():
    """Fails if the default read size is not 64 KiB."""
    sizes = []

    class Spy(io.BytesIO):
        def read(self, n=-1):
            sizes.append(n)
            return super().read(n)

    list(_bounded_lines(Spy(b"x\n"), 10))
    assert sizes[0] == 65536


def _jl(*objs) -> bytes:
    return b"".join(o if isinstance(o, bytes) else json.dumps(o).encode() + b"\n" for o in objs)


def test_jsonl_rows_offsets_and_reasons():
    """Fails if a reason changes, the BOM is stripped anywhere but the first line, a blank
    line is counted, or a next offset is not the byte after its line."""
    lines = [b"\xef\xbb\xbf" + json.dumps({"text": "first"}).encode() + b"\n",
             b"\n",
             b"\xef\xbb\xbf" + json.dumps({"text": "bom"}).encode() + b"\n",
             b"{bad json\n",
             b"\xff\xfe\n",
             json.dumps(["text"]).encode() + b"\n",
             json.dumps({"text": "x" * 20}).encode() + b"\n",
             json.dumps({"text": "last"}).encode()]
    data = b"".join(lines)
    ends = [sum(map(len, lines[: i + 1])) for i in range(len(lines))]
    ctr = Counter()
    got = list(iter_jsonl(io.BytesIO(data), 0, 0, 1, 0, ctr, limits=ReadLimits(max_line_bytes=len(lines[0]))))
    assert got == [(0, "0", "first", ends[0], 1), (7, "7", "last", ends[7], 8)]
    assert ctr.counts == {"bad_json": 2, "bad_text": 2, "line_too_long": 1}
    # Resume at line 7's byte offset; two slots.
    assert list(iter_jsonl(io.BytesIO(data), ends[6], 7, 1, 0, Counter())) == [(7, "7", "last", ends[7], 8)]
    assert [g[0] for g in iter_jsonl(io.BytesIO(data), 0, 0, 2, 1, Counter())] == [7]
    assert [g[0] for g in iter_jsonl(io.BytesIO(data), 0, 0, 2, 0, Counter())] == [0, 6]


def test_jsonl_by_line_resume_and_empty():
    """Fails if a compressed file's offset is not a line number, a resume past the end does
    anything but end, or an empty file at its start is not ``empty_shard: no lines``."""
    data = gzip.compress(_jl({"text": "a"}, {"text": "b"}, {"text": "c"}))
    got = list(iter_jsonl(gzip.GzipFile(fileobj=io.BytesIO(data)), 1, 1, 1, 0, Counter(), by_line=True))
    assert got == [(1, "1", "b", 2, 2), (2, "2", "c", 3, 3)]
    assert list(iter_jsonl(gzip.GzipFile(fileobj=io.BytesIO(data)), 3, 3, 1, 0, Counter(), by_line=True)) == []
    assert list(iter_jsonl(gzip.GzipFile(fileobj=io.BytesIO(data)), 5, 5, 1, 0, Counter(), by_line=True)) == []
    for f in (io.BytesIO(b""), gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(b"")))):
        with pytest.raises(ShardError) as e:
            list(iter_jsonl(f, 0, 0, 1, 0, Counter(), by_line=isinstance(f, gzip.GzipFile)))
        assert str(e.value) == "empty_shard: no lines"
    assert list(iter_jsonl(io.BytesIO(b""), 4, 2, 1, 0, Counter())) == []


def test_jsonl_compression_errors_are_shard_errors():
    """Fails if a cut gzip or zstd stream is not ``truncated_shard`` or damaged bytes not
    ``corrupt_shard``."""
    gz = gzip.compress(_jl(*({"text": f"line {i}"} for i in range(100))))
    with pytest.raises(ShardError) as e:
        list(iter_jsonl(gzip.GzipFile(fileobj=io.BytesIO(gz[: len(gz) // 2])), 0, 0, 1, 0, Counter(), by_line=True))
    assert e.value.reason == "truncated_shard"
    with pytest.raises(ShardError) as e:
        list(iter_jsonl(gzip.GzipFile(fileobj=io.BytesIO(b"\x1f\x8bnot gzip")), 0, 0, 1, 0, Counter(), by_line=True))
    assert e.value.reason == "corrupt_shard"
    zs = zstandard.ZstdCompressor().compress(_jl(*({"text": f"line {i}"} for i in range(100))))
    with pytest.raises(ShardError) as e:
        list(iter_jsonl(decompressed(io.BytesIO(zs[:-5]), "zstd"), 0, 0, 1, 0, Counter(), by_line=True))
    assert e.value.reason == "truncated_shard"


# --------------------------------------------------------------------------- reader_for / write_tar


@pytest.mark.parametrize("url, reader, by_line, compression", [
    ("s3://b/x.tar", iter_tar, False, None), ("X.TAR?versionId=3", iter_tar, False, None),
    ("a.parquet", iter_parquet, False, None), ("a.pq", iter_parquet, False, None),
    ("a.jsonl", iter_jsonl, False, None), ("a.json", iter_jsonl, False, None),
    ("a.ndjson", iter_jsonl, False, None), ("a.jsonl.gz", iter_jsonl, True, "gzip"),
    ("a.jsonl.zst", iter_jsonl, True, "zstd"), ("a.jsonl.zstd", iter_jsonl, True, "zstd"), ("a.json.bz2", iter_jsonl, True, "bz2"),
    ("a.ndjson.xz", iter_jsonl, True, "xz"), ("a.jsonl.gz?x=1.tar", iter_jsonl, True, "gzip"),
])
def test_reader_for_extensions(url, reader, by_line, compression):
    """Fails if an extension maps to another reader or compression, the query is not cut, or
    the case matters."""
    got, comp = reader_for(url)
    assert comp == compression
    if by_line:
        assert got.func is reader and got.keywords == {"by_line": True}
    else:
        assert got is reader


@pytest.mark.parametrize("url", ["a.txt", "a.tar.gz", "a.gz", "a.jsonl.lz4"])
def test_reader_for_unknown_type(url):
    """Fails if the message changes or leaves out a compressed suffix that ``reader_for`` reads."""
    with pytest.raises(ValueError) as e:
        reader_for(url)
    assert str(e.value) == f"{url}: unknown shard type (expected .tar, .parquet or .jsonl[.gz|.zst|.zstd|.bz2|.xz])"


def test_write_tar_gnu_members_in_order(tmp_path):
    """Fails if the members are not ``key.ext`` in the given order, sizes or bytes differ,
    the mtime is not 0, or the format is not GNU (magic ``ustar  \\0`` at byte 257)."""
    url = str(tmp_path / "s.tar")
    write_tar(url, [("k1", {"jpg": b"abc", "txt": b""}), ("k2", {"json": b"{}"})])
    raw = (tmp_path / "s.tar").read_bytes()
    assert raw[257:265] == b"ustar  \0"
    with tarfile.open(url) as tar:
        ms = tar.getmembers()
        assert [(m.name, m.size, m.mtime) for m in ms] == [("k1.jpg", 3, 0), ("k1.txt", 0, 0), ("k2.json", 2, 0)]
        assert tar.extractfile(ms[0]).read() == b"abc"


def test_every_compressed_suffix_reads_its_lines():
    """Fails if a compressed suffix is read without its codec: ``.jsonl.zstd`` was handed
    fsspec's inferred compression, which knows only ``.zst``, and so was read as plain lines
    (every line a ``bad_text``)."""
    lines = _jl({"text": "one"}, {"text": "two"})
    codecs_ = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
               "zst": zstandard.ZstdCompressor().compress, "zstd": zstandard.ZstdCompressor().compress}
    for suffix, compress in codecs_.items():
        reader, comp = reader_for(f"s3://b/part-0.jsonl.{suffix}")
        ctr = Counter()
        got = [g[2] for g in reader(decompressed(io.BytesIO(compress(lines)), comp), 0, 0, 1, 0, ctr)]
        assert (got, ctr.counts) == (["one", "two"], {}), suffix


def test_tar_counts_sparse_members_only():
    """Fails if a GNU sparse member is not counted as ``bad_tar_member`` or a symlink is
    (both are passed over; neither ends the sample)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind in (("a.txt", tarfile.REGTYPE), ("a.bin", tarfile.GNUTYPE_SPARSE),
                           ("a.lnk", tarfile.SYMTYPE), ("a.json", tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "a.txt"
            tar.addfile(info, io.BytesIO(b""))
    ctr = Counter()
    got = list(iter_tar(io.BytesIO(buf.getvalue()), 0, 0, 1, 0, ctr))
    assert [(g[1], g[2]) for g in got] == [("a", {"txt": b"", "json": b""})]
    assert ctr.counts == {"bad_tar_member": 1}


def test_tar_of_only_end_blocks_has_no_members():
    """Fails if a shard of bytes with no member is called "0 bytes" (``and`` as ``or``)."""
    with pytest.raises(ShardError) as e:
        list(iter_tar(io.BytesIO(bytes(1024)), 0, 0, 1, 0, Counter()))
    assert str(e.value) == "empty_shard: no members"


@pytest.mark.parametrize("binary, string", [(pa.binary(), pa.string()), (pa.large_binary(), pa.large_string())])
def test_parquet_string_column_with_invalid_utf8_is_counted(binary, string):
    """Fails if a ``string`` or ``large_string`` column is not read as bytes: another writer's
    invalid UTF-8 (made here with a view, which does not validate) would end the shard with
    pyarrow's error instead of one counted ``bad_text``."""
    col = pa.array([b"ok", b"\xff", b"fine"], binary).view(string)
    ctr = Counter()
    assert [g[2] for g in iter_parquet(io.BytesIO(_parquet(col)), 0, 0, 1, 0, ctr)] == ["ok", "fine"]
    assert ctr.counts == {"bad_text": 1}


def test_tar_member_cut_inside_its_data_ends_with_the_walks_message():
    """Fails if the data of a member the file cuts short is read (``not own or not
    m.complete`` as ``and``): the shard would end with ``_read_exact``'s "wanted 1000 bytes,
    got 600" instead of the walk's message naming the member and the bytes left."""
    data, infos = _tar([("a.txt", b"x" * 1000)])
    cut = data[: infos[0].offset_data + 600]
    got = []
    with pytest.raises(ShardError) as e:
        for g in iter_tar(io.BytesIO(cut), 0, 0, 1, 0, Counter()):
            got.append(g)
    assert got == []
    assert str(e.value) == "truncated_shard: tar member at 0 declares 1000 bytes, 600 left in the file"


def test_tar_members_of_other_slots_are_not_read_or_counted():
    """Fails if a member of another slot's sample is read and checked against the cap
    (``not own or not m.complete`` as ``and``): it would be counted as ``member_too_large``
    for a sample this reader never yields."""
    data, _ = _tar([("a.txt", b"1"), ("b.txt", b"12345"), ("c.txt", b"3")])
    ctr = Counter()
    got = list(iter_tar(io.BytesIO(data), 0, 0, 2, 0, ctr, ReadLimits(max_member_bytes=3)))
    assert [(g[1], g[2]) for g in got] == [("a", {"txt": b"1"}), ("c", {"txt": b"3"})]
    assert ctr.counts == {}


def test_parquet_resume_at_a_row_group_start_reads_nothing_before_it():
    """Fails if the row group that ends exactly at ``offset`` is read (``row0 + n <= offset``
    as ``<``): its pages are damaged here, so reading it raises pyarrow's error, while the
    rows from ``offset`` on are all intact."""
    data = bytearray(_parquet([f"row {i}" for i in range(6)], row_group_size=3))
    chunk = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    got = list(iter_parquet(io.BytesIO(bytes(data)), 3, 3, 1, 0, Counter()))
    assert got == [(i, str(i), f"row {i}", i + 1, i + 1) for i in (3, 4, 5)]
    with pytest.raises(OSError):  # the damage is real: a read from row 2 meets it
        list(iter_parquet(io.BytesIO(bytes(data)), 2, 2, 1, 0, Counter()))
