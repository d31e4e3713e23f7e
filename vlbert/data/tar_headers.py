"""Checked tar headers: the walk over a tar's members that every shard reader uses.

Tars come from other people (a shared bucket, a download); every header field is
checked before it is used (docs/design.md section 4): a bad header ends the shard
with ``ShardError`` instead of a hang, a crash or an allocation of a declared size.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from typing import Iterator, Optional

TAR_BLOCK = 512


class ShardError(Exception):
    """A shard that cannot be read further; ``reason`` is the skip-counter name."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason


# Tar structure caps (not data dependent): a pax or GNU long-name header holds a few
# names and numbers; PATH_MAX is 4096 bytes on Linux.
MAX_EXT_HEADER_BYTES = 1 << 20
MAX_NAME_BYTES = 4096
_MAX_LENGTH_DIGITS = 20  # a pax record length longer than this is not a length


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) < n:
        raise ShardError("truncated_shard", f"wanted {n} bytes, got {len(data)}")
    return data


@dataclass(frozen=True)
class TarMember:
    """One member of a tar: ``start`` is the offset of its first header (a long-name or
    pax header's when it has one), ``data`` of its data; ``end`` is where the next
    header starts. ``complete`` is False when the file ends before ``end`` (its
    data must not be read: the walk raises ``truncated_shard`` at the next step)."""

    start: int
    name: str
    type: bytes
    data: int
    size: int
    end: int
    complete: bool = True

    @property
    def regular(self) -> bool:
        return self.type in tarfile.REGULAR_TYPES and self.type != tarfile.GNUTYPE_SPARSE


def file_size(f) -> Optional[int]:
    """The size of an open file when the file can tell (fsspec files, OS files, BytesIO), else None."""
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        pass
    if isinstance(f, io.BytesIO):
        return f.getbuffer().nbytes
    return None


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """Parse a pax extended header (records ``"%d %s=%s\\n"``, the length counting the
    whole record). Anything malformed raises ``ShardError("corrupt_shard")``: every
    record must advance, so the parse always ends."""
    out, i, n = {}, 0, len(data)
    while i < n and data[i] != 0:
        space = data.find(b" ", i, min(n, i + _MAX_LENGTH_DIGITS + 1))
        digits = data[i:space] if space > i else data[i:i + _MAX_LENGTH_DIGITS]
        if space < 0 or not digits.isdigit():
            raise ShardError("corrupt_shard", f"pax header at {at}: record length {digits!r} is not a number")
        length = int(digits)
        end = i + length
        if length < len(digits) + 4 or end > n or data[end - 1] != 0x0A:  # "N k=\n" at the least
            raise ShardError("corrupt_shard", f"pax header at {at}: bad record length {length} at byte {i} of {n}")
        key, eq, value = data[space + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise ShardError("corrupt_shard", f"pax header at {at}: record without 'key=' at byte {i}")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i = end
    return out


def _check_name(name: str, at: int) -> str:
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        raise ShardError("corrupt_shard", f"member name of over {MAX_NAME_BYTES} bytes at {at}")
    return name


def iter_tar_members(f, offset: int = 0) -> Iterator[TarMember]:
    """The members of a tar from ``offset`` (a header), checking every header.

    A bad checksum or number field, a negative size, a size past the end of the
    file (when its size is known), an extended header over ``MAX_EXT_HEADER_BYTES``,
    a malformed pax record or a name over ``MAX_NAME_BYTES`` raises ``ShardError``.
    Every step moves on by at least one 512-byte block, so the walk always ends.
    GNU long names and pax ``path``/``size`` records apply to the next member. The
    caller may read the member's data between steps (unless ``complete`` is False);
    the next step seeks past it.
    Ends at the end-of-archive block or at the end of the file.
    """
    total = file_size(f)
    pos = offset
    f.seek(pos)
    long_name: Optional[str] = None
    pax_size: Optional[int] = None
    ext_start: Optional[int] = None
    while True:
        hdr_pos = pos
        buf = f.read(TAR_BLOCK)
        if len(buf) == 0:  # end of file without the end-of-archive blocks: tolerated
            return
        if len(buf) < TAR_BLOCK:
            raise ShardError("truncated_shard", f"short header at {hdr_pos}")
        try:
            ti = tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
        except tarfile.EOFHeaderError:  # zero block: end of archive
            return
        except (tarfile.HeaderError, ValueError, UnicodeError) as e:  # checksum, number fields
            raise ShardError("corrupt_shard", f"bad tar header at {hdr_pos}: {e}") from None
        size = ti.size if pax_size is None or ti.type in _EXT_TYPES else pax_size
        if size < 0:
            raise ShardError("corrupt_shard", f"tar header at {hdr_pos}: negative size {size}")
        data = hdr_pos + TAR_BLOCK
        end = data + -(-size // TAR_BLOCK) * TAR_BLOCK
        complete = total is None or end <= total  # tar writers pad every member to whole blocks
        if not complete and ti.type in _EXT_TYPES:
            raise _cut(hdr_pos, size, total - data)
        if ti.type in _EXT_TYPES:
            if size > MAX_EXT_HEADER_BYTES:
                raise ShardError("corrupt_shard", f"extended tar header of {size} bytes at {hdr_pos}")
            blob = _read_exact(f, size)
            if ti.type == tarfile.GNUTYPE_LONGNAME:
                long_name = _check_name(blob.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), hdr_pos)
            else:
                records = _pax_records(blob, hdr_pos)
                if "path" in records:
                    long_name = _check_name(records["path"], hdr_pos)
                if "size" in records:
                    if not records["size"].isdigit() or len(records["size"]) > _MAX_LENGTH_DIGITS:
                        raise ShardError("corrupt_shard", f"pax header at {hdr_pos}: size {records['size']!r}")
                    pax_size = int(records["size"])
            ext_start = hdr_pos if ext_start is None else ext_start
        else:
            yield TarMember(hdr_pos if ext_start is None else ext_start, long_name or ti.name, ti.type,
                            data, size, end, complete)
            if not complete:  # the caller has seen the member (and ended its sample): the shard ends here
                raise _cut(hdr_pos, size, total - data)
            long_name = pax_size = ext_start = None
        pos = end
        f.seek(pos)


_EXT_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)


def _cut(at: int, size: int, left: int) -> ShardError:
    return ShardError("truncated_shard", f"tar member at {at} declares {size} bytes, {max(0, left)} left in the file")
