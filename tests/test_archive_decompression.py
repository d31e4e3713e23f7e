"""The decompressing readers of ``vlbert/data/formats.py``: ``ZstdReader`` (multi-frame zstd,
a cut seen), ``decompressed`` (fsspec's codecs), ``CappedReader`` (a byte cap against
decompression bombs, forward seeks, decompression errors as ``ShardError``) and
``open_archive`` (the codec told by the magic bytes). No torch, no stream.

Expected values are the bytes given to the compressors, or written out by hand in the test.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib

import pytest
import zstandard

from vlbert.data import formats
from vlbert.data.formats import CappedReader, ShardError, ZstdReader, decompressed, open_archive


def test_zstd_reader_reads_every_frame_and_sees_a_cut():
    """Fails if a frame after the first is lost (whether it comes in the same read as the
    first or later), or a stream cut inside a frame ends quietly."""
    a, b = b"first frame " * 50, b"second frame " * 70
    two = zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b)
    for chunk in (3, 64, 1 << 16):
        assert ZstdReader(io.BytesIO(two), chunk).read() == a + b
        assert io.BufferedReader(ZstdReader(io.BytesIO(two), chunk), 7).read() == a + b
    assert decompressed(io.BytesIO(two), "zstd").read() == a + b
    assert ZstdReader(io.BytesIO(b"")).read() == b""
    assert ZstdReader(io.BytesIO(two)).readable()
    with pytest.raises(EOFError, match="^zstd stream ended inside a frame$"):
        ZstdReader(io.BytesIO(two[:-4])).read()


def test_decompressed_none_and_fsspec_names():
    """Fails if no compression does not give back the file itself, or fsspec's codecs are
    not used for the others."""
    f = io.BytesIO(b"x")
    assert decompressed(f, None) is f
    assert decompressed(io.BytesIO(bz2.compress(b"hello")), "bz2").read() == b"hello"
    assert decompressed(io.BytesIO(gzip.compress(b"hello")), "gzip").read() == b"hello"


class _Dribble(io.RawIOBase):
    """Gives one byte per read, then whatever ``error`` says."""

    def __init__(self, data: bytes, error: Exception | None = None):
        self.data, self.error = data, error

    def readable(self):
        return True

    def read(self, n=-1):
        if n == 0:
            return b""
        if not self.data:
            if self.error is not None:
                raise self.error
            return b""
        out, self.data = self.data[:1], self.data[1:]
        return out


def test_capped_reader_bounds_fills_and_seeks():
    """Fails if ``cap`` bytes exactly are refused or ``cap + 1`` allowed, the message
    changes, a short inner read is not topped up, or a seek goes backwards (to an absolute
    position or by a negative offset from the current one) or from the end."""
    r = CappedReader(_Dribble(b"0123456789"), 10, "x.tar.gz")
    assert r.readable() and r.seekable() and r.tell() == 0
    buf = bytearray(4)
    assert r.readinto(buf) == 4 and bytes(buf) == b"0123"
    assert r.seek(2, io.SEEK_CUR) == 6 and r.tell() == 6
    assert r.seek(8) == 8 and r.seek(8) == 8 and r.seek(0, io.SEEK_CUR) == 8  # staying put is no backward seek
    with pytest.raises(io.UnsupportedOperation, match="^a decompressed archive seeks forward only$"):
        r.seek(7)
    with pytest.raises(io.UnsupportedOperation, match="^a decompressed archive seeks forward only$"):
        r.seek(-1, io.SEEK_CUR)
    with pytest.raises(io.UnsupportedOperation):
        r.seek(0, io.SEEK_END)
    assert r.read() == b"89"
    assert r.seek(50) == 10  # past the end: stops there
    r = CappedReader(io.BytesIO(b"0123456789"), 9, "x.tar.gz")
    with pytest.raises(ShardError) as e:
        r.read()
    assert str(e.value) == "archive_too_large: x.tar.gz decompresses to over 9 bytes"
    with pytest.raises(ShardError) as e:
        CappedReader(io.BytesIO(b"0123456789"), 9).read()
    assert str(e.value) == "archive_too_large: archive decompresses to over 9 bytes"


@pytest.mark.parametrize("error, reason", [
    (EOFError("cut"), "truncated_shard"), (zlib.error("bad"), "corrupt_shard"),
    (gzip.BadGzipFile("bad"), "corrupt_shard"), (lzma.LZMAError("bad"), "corrupt_shard"),
    (zstandard.ZstdError("bad"), "corrupt_shard"),
])
def test_capped_reader_turns_decompression_errors_into_shard_errors(error, reason):
    """Fails if a decompressor's error escapes or gets another reason or message."""
    with pytest.raises(ShardError) as e:
        CappedReader(_Dribble(b"ab", error), 100, "s.tar.xz").read()
    assert str(e.value) == f"{reason}: s.tar.xz: {error}"


@pytest.mark.parametrize("compress", [
    gzip.compress, bz2.compress, lzma.compress, lambda d: zstandard.ZstdCompressor().compress(d)])
def test_open_archive_by_magic(compress):
    """Fails if a format's magic is not recognised or its cap not applied."""
    payload = b"tar bytes " * 30
    f = io.BytesIO(compress(payload))
    r = open_archive(f, len(payload), "a")
    assert isinstance(r, CappedReader) and r.read() == payload
    with pytest.raises(ShardError, match="^archive_too_large: a decompresses"):
        open_archive(io.BytesIO(compress(payload)), len(payload) - 1, "a").read()


def test_open_archive_leaves_plain_files_alone():
    """Fails if an uncompressed file is wrapped or left away from its start."""
    f = io.BytesIO(b"plain tar bytes")
    assert open_archive(f, 1) is f and f.tell() == 0
    f = io.BytesIO(b"\x1f")  # shorter than any magic
    assert open_archive(f, 1) is f


def test_open_archive_default_name():
    """Fails if the default name in the message is not "archive"."""
    with pytest.raises(ShardError) as e:
        open_archive(io.BytesIO(gzip.compress(b"12345")), 4).read()
    assert str(e.value) == "archive_too_large: archive decompresses to over 4 bytes"


def test_capped_reader_reads_one_byte_past_the_cap_and_no_more():
    """Fails if a read asks the inner stream for more than one byte past the cap (``cap + 1``
    as ``cap + 2``, or ``- self.pos`` as ``+ self.pos``): the stream here is damaged right
    after byte 12, so a reader that reads on meets the damage (``truncated_shard``) where it
    should have stopped at byte 11 (cap 10, then ``archive_too_large``), from the start and
    after a first read of 4 bytes."""
    with pytest.raises(ShardError) as e:
        CappedReader(_Dribble(b"x" * 11, EOFError("cut")), 10, "b.tar.gz").read()
    assert str(e.value) == "archive_too_large: b.tar.gz decompresses to over 10 bytes"
    r = CappedReader(_Dribble(b"x" * 11, EOFError("cut")), 10, "b.tar.gz")
    assert r.read(4) == b"xxxx"
    with pytest.raises(ShardError) as e:
        r.read()
    assert str(e.value) == "archive_too_large: b.tar.gz decompresses to over 10 bytes"


def test_capped_reader_seeks_in_reads_of_at_most_1_mib():
    """Fails if a forward seek asks the inner stream for more than 1 MiB at once (``1 << 20``
    as ``1 << 21`` or ``2 << 20``): skipping a large member must not hold it whole."""
    sizes = []

    class Spy(io.BytesIO):
        def read(self, n=-1):
            sizes.append(n)
            return super().read(n)

    r = CappedReader(Spy(bytes(3 << 20)), 4 << 20)
    assert r.seek((3 << 20) - 5) == (3 << 20) - 5
    assert max(sizes) == 1 << 20 and sum(sizes) == (3 << 20) - 5


def test_zstd_reader_default_chunk_is_64_kib():
    """Fails if the default read size of the compressed stream is not 64 KiB."""
    sizes = []

    class Spy(io.BytesIO):
        def read(self, n=-1):
            sizes.append(n)
            return super().read(n)

    assert ZstdReader(Spy(zstandard.ZstdCompressor().compress(b"abc"))).read() == b"abc"
    assert sizes[0] == 65536


def test_zstd_reader_keeps_what_a_small_read_leaves():
    """Fails if the decompressed bytes a read has no room for are dropped (``self.buf =
    self.buf[n:]`` changed): read 5 bytes at a time, the two frames must come back whole."""
    a, b = b"first frame " * 50, b"second frame " * 70
    r = ZstdReader(io.BytesIO(zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b)))
    pieces = list(iter(lambda: r.read(5), b""))
    assert b"".join(pieces) == a + b and {len(p) for p in pieces[:-1]} == {5}


def test_decompressed_zstd_buffers_64_kib(monkeypatch):
    """Fails if the buffered view of a zstd stream asks its decompressor for other than 64 KiB
    at a time (the ``BufferedReader``'s size)."""
    asked = []

    class Spy(formats.ZstdReader):
        def readinto(self, b):
            asked.append(len(b))
            return super().readinto(b)

    monkeypatch.setattr(formats, "ZstdReader", Spy)
    assert decompressed(io.BytesIO(zstandard.ZstdCompressor().compress(b"x" * 100)), "zstd").read(1) == b"x"
    assert asked == [65536]


class _Trickle(io.RawIOBase):
    """Gives at most 3 bytes per read (as many as asked for, up to 3)."""

    def __init__(self, data: bytes):
        self.data = data

    def readable(self):
        return True

    def read(self, n=-1):
        out, self.data = self.data[:min(n, 3)], self.data[min(n, 3):]
        return out


def test_capped_reader_tops_up_with_exactly_the_missing_bytes():
    """Fails if a short inner read is topped up with more than the bytes still missing
    (``want - len(data)`` as ``want + len(data)``): a read of 10 would give 12."""
    r = CappedReader(_Trickle(bytes(range(20))), 100)
    assert r.read(10) == bytes(range(10)) and r.tell() == 10
    assert r.read(10) == bytes(range(10, 20)) and r.read(10) == b""


def test_capped_reader_refuses_the_read_that_crosses_the_cap():
    """Fails if the read that takes the stream past the cap hands out its bytes (``self.pos +
    len(data)`` as ``self.pos - len(data)``: the error came only at the next read, after
    cap + 1 bytes were given), at the first read or a later one."""
    with pytest.raises(ShardError, match="^archive_too_large: a.gz decompresses to over 9 bytes$"):
        CappedReader(io.BytesIO(b"0123456789"), 9, "a.gz").read(10)
    r = CappedReader(io.BytesIO(b"0123456789"), 9, "a.gz")
    assert r.read(6) == b"012345"
    with pytest.raises(ShardError, match="^archive_too_large: a.gz decompresses to over 9 bytes$"):
        r.read(4)
