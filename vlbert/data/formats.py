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

import codecs
import functools
import gzip
import io
import json
import re
import tarfile
import zlib
from typing import Any, Callable, Iterator, Optional

import fsspec

TAR_BLOCK = 512

try:
    import zstandard
    from zstandard import ZstdError as _ZstdError
except ImportError:  # pragma: no cover - zstandard is a dependency
    zstandard, _ZstdError = None, EOFError


class ShardError(Exception):
    """A shard that cannot be read further; ``reason`` is the skip-counter name."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


# --------------------------------------------------------------------------- readers

Reader = Callable[..., Iterator[tuple[int, str, Any, int, int]]]
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = path up to the basename's first dot


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise ShardError("truncated_shard", f"wanted {n} bytes, got {len(data)}")
    return data


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse a pax extended header: records ``"%d %s=%s\\n"``."""
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def iter_tar(f, offset: int, index: int, stride: int, phase: int, counter):
    """Group a tar's members by key (``KEY.jpg``, ``KEY.txt``, ...) into samples.

    Headers are parsed one by one so every sample's starting offset is known;
    members of samples that belong to other slots are seeked over, not read.
    GNU long names and pax ``path`` records are honoured; members other than
    regular files are ignored (sparse ones counted as ``bad_tar_member``).
    """
    f.seek(offset)
    pos = offset
    key: Optional[str] = None  # key of the group being gathered
    files: dict[str, bytes] = {}
    own = False
    idx = index - 1
    long_name: Optional[str] = None
    ext_start: Optional[int] = None  # offset of a long-name/pax header owning the next member
    at_start = offset == 0
    while True:
        hdr_pos = pos
        buf = f.read(TAR_BLOCK)
        if len(buf) == 0:  # end of file without the end-of-archive blocks: tolerated
            if at_start and key is None:
                raise ShardError("empty_shard", "0 bytes" if hdr_pos == 0 else "no members")
            break
        if len(buf) < TAR_BLOCK:
            raise ShardError("truncated_shard", f"short header at {hdr_pos}")
        try:
            ti = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.EOFHeaderError:  # zero block: end of archive
            if at_start and key is None:
                raise ShardError("empty_shard", "an archive with no members") from None
            break
        except tarfile.HeaderError as e:
            raise ShardError("corrupt_shard", f"bad tar header at {hdr_pos}: {e}") from None
        pos += TAR_BLOCK
        padded = -(-ti.size // TAR_BLOCK) * TAR_BLOCK
        if ti.type in (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            data = _read_exact(f, padded)[: ti.size]
            pos += padded
            if ti.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            else:
                long_name = _pax_records(data).get("path", long_name)
            ext_start = hdr_pos if ext_start is None else ext_start
            continue
        name = long_name or ti.name
        start = hdr_pos if ext_start is None else ext_start
        long_name = ext_start = None
        if not ti.isreg() or ti.type == tarfile.GNUTYPE_SPARSE:
            if ti.type == tarfile.GNUTYPE_SPARSE:
                counter.add("bad_tar_member")
            f.seek(pos + padded)
            pos += padded
            continue
        m = _KEY_RE.match(name)
        if m is None:
            counter.add("bad_tar_member")
            f.seek(pos + padded)
            pos += padded
            continue
        if m.group(1) != key:
            if key is not None and own:
                yield idx, key, files, start, idx + 1
            idx += 1
            key, files, own = m.group(1), {}, idx % stride == phase
        if own:
            files[m.group(2)] = _read_exact(f, padded)[: ti.size]
        else:
            f.seek(pos + padded)
        pos += padded
    if key is not None and own:
        yield idx, key, files, hdr_pos, idx + 1


def _decode_text(value: Any, counter) -> Optional[str]:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            counter.add("bad_text")
            return None
    if not isinstance(value, str):
        counter.add("bad_text")
        return None
    if not value.strip():
        counter.add("empty_text")
        return None
    return value


def iter_parquet(f, offset: int, index: int, stride: int, phase: int, counter):
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
            text = _decode_text(values[i], counter)
            if text is not None:
                yield row, str(row), text, row + 1, row + 1
        row0 += n


def iter_jsonl(f, offset: int, index: int, stride: int, phase: int, counter, by_line: bool = False):
    """JSON Lines with a ``text`` field. Plain files: offset = byte offset;
    compressed (``by_line``): offset = line number (a compressed stream cannot seek)."""
    if by_line:
        for _ in range(offset):
            if not f.readline():
                return
    else:
        f.seek(offset)
    line_no, at_start = index, offset == 0
    try:
        for line in f:
            idx = line_no
            line_no += 1
            offset += 1 if by_line else len(line)
            if idx == 0 and line.startswith(codecs.BOM_UTF8):  # a BOM written by some editors and tools
                line = line[len(codecs.BOM_UTF8):]
            if idx % stride != phase or not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                counter.add("bad_text")
                continue
            except ValueError:
                counter.add("bad_json")
                continue
            text = _decode_text(obj.get("text") if isinstance(obj, dict) else None, counter)
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


_TEXT_EXTS = (".jsonl", ".json", ".ndjson")
_COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".xz")


def reader_for(url: str) -> tuple[Reader, Optional[str]]:
    """The reader and fsspec compression for a shard URL, from its extension."""
    path = url.split("?", 1)[0].lower()
    if path.endswith(".tar"):
        return iter_tar, None
    if path.endswith((".parquet", ".pq")):
        return iter_parquet, None
    base, comp = path, None
    for ext in _COMPRESSED:
        if path.endswith(ext):
            base, comp = path[: -len(ext)], "infer"
    if base.endswith(_TEXT_EXTS):
        if comp is None:
            return iter_jsonl, None
        return functools.partial(iter_jsonl, by_line=True), fsspec.utils.infer_compression(path)
    raise ValueError(f"{url}: unknown shard type (expected .tar, .parquet or .jsonl[.gz|.zst])")


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
