"""Shard file formats: readers that yield samples with their resume offsets, and a tar writer.

A reader gets an open binary file and ``(offset, index, stride, phase,
counter)``, starts at ``offset`` (the position of sample number ``index``) and
yields ``(index, key, payload, next_offset, next_index)`` for the samples with
``index % stride == phase``; others are passed over without being decoded.

- WebDataset tar (``.tar``): payload ``{ext: bytes}``; offset = byte offset of
  the sample's first header.
- Parquet (``.parquet``): payload = the ``text`` column's string; offset = row.
- JSON Lines (``.jsonl``, ``.json``, ``.ndjson``; ``.gz``/``.zst``/...):
  payload = the ``text`` field; offset = byte offset for plain files, line
  number for compressed ones (a compressed stream cannot seek).

Problems that end a shard raise ``ShardError(reason)``; bad rows or members are
counted in the counter (``counter.add(reason)``) and skipped. A shard with no
sample at all (0 bytes, an empty archive, 0 rows, no lines) raises
``ShardError("empty_shard")`` when read from its start.
"""

from __future__ import annotations

import bz2
import codecs
import functools
import gzip
import io
import json
import lzma
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import fsspec

from vlbert.data.tar_headers import (  # noqa: F401  (ShardError, TarMember, file_size: imported from here too)
    ShardError, TarMember, _read_exact, file_size, iter_tar_members,
)

try:
    import zstandard
    from zstandard import ZstdError as _ZstdError
except ImportError:  # pragma: no cover - zstandard is a dependency
    zstandard, _ZstdError = None, EOFError


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class ReadLimits:
    """Caps, in bytes, on what one record of a shard may make a reader hold in memory.

    The defaults fit real data with room to spare: a Conceptual Captions image is
    well under a MB, a Wikipedia article under 1 MB of text, a whole BooksCorpus book
    a few MB. A tar member over ``max_member_bytes`` is passed over unread
    (``member_too_large``); a JSON Lines line over ``max_line_bytes`` is passed over
    without being kept (``line_too_long``); a document whose text is over
    ``max_document_bytes`` (UTF-8) is skipped before tokenising (``document_too_large``).
    """

    max_member_bytes: int = 64 << 20
    max_line_bytes: int = 32 << 20
    max_document_bytes: int = 16 << 20


DEFAULT_LIMITS = ReadLimits()

# --------------------------------------------------------------------------- readers

Reader = Callable[..., Iterator[tuple[int, str, Any, int, int]]]
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = path up to the basename's first dot


def iter_tar(f, offset: int, index: int, stride: int, phase: int, counter,
             limits: ReadLimits = DEFAULT_LIMITS):
    """Group a tar's members by key (``KEY.jpg``, ``KEY.txt``, ...) into samples.

    Headers are parsed one by one (``iter_tar_members``: every field checked) so
    every sample's starting offset is known; members of samples that belong to
    other slots are seeked over, not read. Members other than regular files are
    ignored (sparse ones counted as ``bad_tar_member``); a member over
    ``limits.max_member_bytes`` is not read (``member_too_large``).
    """
    key: Optional[str] = None  # key of the group being gathered
    files: dict[str, bytes] = {}
    own = False
    idx = index - 1
    after = offset  # where the last member ended
    for m in iter_tar_members(f, offset):
        after = m.end
        if not m.regular:
            if m.type == tarfile.GNUTYPE_SPARSE:
                counter.add("bad_tar_member")
            continue
        km = _KEY_RE.match(m.name)
        if km is None:
            counter.add("bad_tar_member")
            continue
        if km.group(1) != key:
            if key is not None and own:
                yield idx, key, files, m.start, idx + 1
            idx += 1
            key, files, own = km.group(1), {}, idx % stride == phase
        if not own or not m.complete:  # an incomplete member: the walk raises truncated_shard next
            continue
        if m.size > limits.max_member_bytes:
            counter.add("member_too_large")
            continue
        files[km.group(2)] = _read_exact(f, m.size)
    if key is None and offset == 0:
        raise ShardError("empty_shard", "0 bytes" if after == 0 and file_size(f) == 0 else "no members")
    if key is not None and own:
        yield idx, key, files, after, idx + 1


def _decode_text(value: Any, counter, limits: ReadLimits = DEFAULT_LIMITS) -> Optional[str]:
    """A document's text, or None (counted): not UTF-8 text, empty, or over
    ``limits.max_document_bytes`` in UTF-8 (checked before any tokenising)."""
    cap = limits.max_document_bytes
    if isinstance(value, (bytes, bytearray)):
        if len(value) > cap:
            counter.add("document_too_large")
            return None
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            counter.add("bad_text")
            return None
    if not isinstance(value, str):
        counter.add("bad_text")
        return None
    # A character is 1 to 4 UTF-8 bytes: the exact count only when the length leaves a doubt.
    if len(value) > cap or (4 * len(value) > cap and len(value.encode("utf-8", "surrogatepass")) > cap):
        counter.add("document_too_large")
        return None
    if not value.strip():
        counter.add("empty_text")
        return None
    return value


def iter_parquet(f, offset: int, index: int, stride: int, phase: int, counter,
                 limits: ReadLimits = DEFAULT_LIMITS):
    """Rows of a Parquet file's ``text`` column; offset = index = row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except pa.ArrowInvalid as e:  # not Parquet (bad magic, truncated footer)
        raise ShardError("corrupt_shard", str(e)) from None
    if "text" not in pf.schema_arrow.names:
        raise ShardError("bad_text_shard", f"no 'text' column (columns: {pf.schema_arrow.names})")
    if offset == 0 and pf.metadata.num_rows == 0:
        raise ShardError("empty_shard", "0 rows")
    row0 = 0
    for rg in range(pf.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if row0 + n <= offset:
            row0 += n
            continue
        col = pf.read_row_group(rg, columns=["text"]).column("text")
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.large_binary())  # decode ourselves: invalid UTF-8 is counted, not fatal
        values = col.to_pylist()
        for i in range(max(offset, row0) - row0, n):
            row = row0 + i
            if row % stride != phase:
                continue
            text = _decode_text(values[i], counter, limits)
            if text is not None:
                yield row, str(row), text, row + 1, row + 1
        row0 += n


def _bounded_lines(f, cap: int, chunk: int = 1 << 16) -> Iterator[tuple[Optional[bytes], int]]:
    """``(line, bytes it took)`` for each line of ``f`` (read in ``chunk``-byte pieces;
    works on any file with ``read``); ``line`` is None for a line of over ``cap`` bytes,
    whose pieces are dropped as they come, so it is never held whole."""
    pending: list[bytes] = []  # pieces of the current line
    size, dropping = 0, False
    while True:
        data = f.read(chunk)
        if not data:
            if size:
                yield (None if dropping else b"".join(pending)), size
            return
        start = 0
        while True:
            nl = data.find(b"\n", start)
            piece = data[start:] if nl < 0 else data[start:nl + 1]
            size += len(piece)
            if size > cap:
                dropping, pending = True, []
            elif not dropping:
                pending.append(piece)
            if nl < 0:
                break
            yield (None if dropping else b"".join(pending)), size
            pending, size, dropping = [], 0, False
            start = nl + 1


def iter_jsonl(f, offset: int, index: int, stride: int, phase: int, counter, by_line: bool = False,
               limits: ReadLimits = DEFAULT_LIMITS):
    """JSON Lines with a ``text`` field. Plain files: offset = byte offset;
    compressed (``by_line``): offset = line number (a compressed stream cannot seek).
    A line over ``limits.max_line_bytes`` is skipped unread (``line_too_long``)."""
    cap = limits.max_line_bytes
    line_no, at_start = index, offset == 0
    try:
        if not by_line:
            f.seek(offset)
        lines = _bounded_lines(f, cap)
        if by_line and sum(1 for _ in zip(range(offset), lines)) < offset:
            return
        for line, n in lines:
            idx = line_no
            line_no += 1
            offset += 1 if by_line else n
            if idx % stride != phase:
                continue
            if line is None:
                counter.add("line_too_long")
                continue
            if idx == 0 and line.startswith(codecs.BOM_UTF8):  # a BOM written by some editors and tools
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                counter.add("bad_text")
                continue
            except ValueError:
                counter.add("bad_json")
                continue
            text = _decode_text(obj.get("text") if isinstance(obj, dict) else None, counter, limits)
            if text is not None:
                yield idx, str(idx), text, offset, line_no
        if at_start and line_no == 0:
            raise ShardError("empty_shard", "no lines")
    except EOFError as e:  # a compressed stream cut short
        raise ShardError("truncated_shard", str(e)) from None
    except (zlib.error, gzip.BadGzipFile, _ZstdError) as e:  # BadGzipFile is an OSError: not transient
        raise ShardError("corrupt_shard", str(e)) from None


class ZstdReader(io.RawIOBase):
    """Decompress a (multi-frame) zstd stream; a stream cut inside a frame raises
    ``EOFError``, as gzip does (zstandard's own stream reader just stops)."""

    def __init__(self, f, chunk: int = 1 << 16):
        self.f, self.chunk = f, chunk
        self.d = zstandard.ZstdDecompressor().decompressobj()
        self.buf = b""
        self.started = False  # inside a frame

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            if self.d.eof:  # frame done: the next one starts with the unused bytes
                rest = self.d.unused_data
                self.d, self.started = zstandard.ZstdDecompressor().decompressobj(), False
                if rest:
                    self.started = True
                    self.buf = self.d.decompress(rest)
                    continue
            data = self.f.read(self.chunk)
            if not data:
                if self.started:
                    raise EOFError("zstd stream ended inside a frame")
                return 0
            self.started = True
            self.buf = self.d.decompress(data)
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n


def decompressed(f, compression: Optional[str]):
    """A line-readable view of ``f`` decompressed with ``compression`` (fsspec's names)."""
    if compression is None:
        return f
    if compression == "zstd":
        return io.BufferedReader(ZstdReader(f), 1 << 16)
    from fsspec.compression import compr

    return compr[compression](f, mode="rb")


class CappedReader(io.RawIOBase):
    """A decompressing file that refuses to give more than ``cap`` bytes: past them it
    raises ``ShardError("archive_too_large")`` (a decompression bomb costs at most
    ``cap`` bytes of reading, and nothing is held). Seeks go forward only, by reading.
    Decompression errors become ``ShardError`` (``truncated_shard``, ``corrupt_shard``)."""

    def __init__(self, f, cap: int, name: str = "archive"):
        self.f, self.cap, self.name, self.pos = f, cap, name, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        """Fills ``b`` unless the stream ends (a short read means the end)."""
        want = min(len(b), self.cap + 1 - self.pos)  # one byte past the cap tells a bomb from an exact fit
        try:
            data = self.f.read(want)
            while 0 < len(data) < want:
                more = self.f.read(want - len(data))
                if not more:
                    break
                data += more
        except EOFError as e:
            raise ShardError("truncated_shard", f"{self.name}: {e}") from None
        except (zlib.error, gzip.BadGzipFile, lzma.LZMAError, _ZstdError) as e:
            raise ShardError("corrupt_shard", f"{self.name}: {e}") from None
        if self.pos + len(data) > self.cap:
            raise ShardError("archive_too_large", f"{self.name} decompresses to over {self.cap} bytes")
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def seek(self, target: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            target += self.pos
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self.pos:
            raise io.UnsupportedOperation("a decompressed archive seeks forward only")
        while self.pos < target:
            if not self.read(min(target - self.pos, 1 << 20)):
                break
        return self.pos


_ARCHIVE_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


def open_archive(f, max_bytes: int, name: str = "archive"):
    """``f`` as it is when it is not compressed, else a ``CappedReader`` over its
    decompression (gzip, bzip2, xz or zstd, told by the magic bytes) that gives at
    most ``max_bytes`` bytes."""
    head = f.read(6)
    f.seek(0)
    kind = next((k for magic, k in _ARCHIVE_MAGIC if head.startswith(magic)), None)
    if kind is None:
        return f
    inner = {"gzip": lambda: gzip.GzipFile(fileobj=f, mode="rb"), "bz2": lambda: bz2.BZ2File(f),
             "xz": lambda: lzma.LZMAFile(f), "zstd": lambda: decompressed(f, "zstd")}[kind]()
    return CappedReader(inner, max_bytes, name)


_TEXT_EXTS = (".jsonl", ".json", ".ndjson")
# Suffix -> fsspec codec name (``fsspec.compression.compr``); fsspec's own inference knows no ``.zstd``.
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}


def reader_for(url: str) -> tuple[Reader, Optional[str]]:
    """The reader and fsspec compression for a shard URL, from its extension."""
    path = url.split("?", 1)[0].lower()
    if path.endswith(".tar"):
        return iter_tar, None
    if path.endswith((".parquet", ".pq")):
        return iter_parquet, None
    base, comp = path, None
    for ext, codec in _COMPRESSED.items():
        if path.endswith(ext):
            base, comp = path[: -len(ext)], codec
    if base.endswith(_TEXT_EXTS):
        if comp is None:
            return iter_jsonl, None
        return functools.partial(iter_jsonl, by_line=True), comp
    raise ValueError(f"{url}: unknown shard type (expected .tar, .parquet or .jsonl[{'|'.join(_COMPRESSED)}])")


def write_tar(url: str, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write samples ``(key, {ext: bytes})`` as a WebDataset tar shard through fsspec
    (for tests, benchmarks and demo data; img2dataset writes the real ones)."""
    with fsspec.open(url, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
