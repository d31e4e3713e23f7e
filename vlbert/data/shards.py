"""Shard listing, the split over ranks and workers, and resumable shard reading.

Every read goes through fsspec, so a shard URL may name any store (local
path, ``memory://``, ``s3://``, ``gs://``, ``https://``).

A *slot* is one data-loader worker of one rank: ``slot = rank * num_workers +
worker`` out of ``world_size * num_workers``. Each epoch the shard list is
permuted from ``(seed, epoch)``; with at least as many shards as slots the
shards go round-robin over the slots, otherwise each shard is shared by
several slots that take every k-th sample of it, so no slot is ever empty.

``ShardStream`` reads one slot's records and keeps a ``Cursor`` (epoch,
position in the slot's shard list, reader offset, sample index) that points
at the next record. Restoring a cursor seeks straight to that offset (the
readers in ``formats.py`` say what the offset is for each file type).

Bad input never stops the stream: it is skipped and counted in a
``SkipCounter`` under a short reason name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import fsspec
import numpy as np
from braceexpand import braceexpand

from vlbert.data.formats import ShardError, decompressed, reader_for

log = logging.getLogger(__name__)

BLOCK_SIZE = 8 << 20  # remote reads in 8 MiB blocks: few requests per shard
CACHE_TYPE = "readahead"  # shards are read front to back; a read-ahead block cache fits that

try:  # network errors of the async filesystems (http, gcs) that are not OSError
    from aiohttp import ClientError as _ClientError
except ImportError:  # pragma: no cover
    _ClientError = OSError
TRANSIENT_ERRORS = (OSError, TimeoutError, _ClientError)


class SkipCounter:
    """Counts of skipped inputs by reason (``"corrupt_image" -> 3``); mergeable."""

    def __init__(self, counts: Optional[dict[str, int]] = None):
        self.counts: dict[str, int] = dict(counts or {})

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def merge(self, other: "SkipCounter | dict[str, int]") -> "SkipCounter":
        for k, v in (other.counts if isinstance(other, SkipCounter) else other).items():
            self.add(k, v)
        return self

    def __getitem__(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


# --------------------------------------------------------------------------- listing


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def expand_urls(patterns: list[str] | str) -> list[str]:
    """Expand brace ranges/lists and globs into a list of shard URLs.

    ``s3://b/cc/{00000..00331}.tar`` -> 332 URLs (zero padding kept);
    ``/data/wiki/*.parquet`` -> the sorted matches. The protocol prefix is kept.
    HTTP(S) URLs cannot be listed and are used as they are. A glob that matches
    nothing, or a literal pattern whose first URL does not exist, raises
    ``FileNotFoundError`` naming the pattern; an empty list raises ``ValueError``.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError("no shard URLs given (empty list)")
    out: list[str] = []
    for pattern in patterns:
        expanded = list(braceexpand(pattern))
        literal: list[str] = []
        for url in expanded:
            protocol = url.split("://", 1)[0] if "://" in url else "file"
            if protocol in ("http", "https") or not _has_glob(url):
                literal.append(url)
                continue
            fs, path = fsspec.core.url_to_fs(url)
            # fs.glob, not get_fs_token_paths: the latter expands only "*", not "?" or "[...]".
            found = fs.glob(path, detail=True)
            paths = [p for p, info in found.items() if info.get("type") != "directory"]
            if not paths:
                raise FileNotFoundError(f"shard pattern {pattern!r} matched no files ({url!r})")
            out.extend(fs.unstrip_protocol(p) if "://" in url else p for p in sorted(paths))
        if literal:
            first = literal[0]
            if not first.startswith(("http://", "https://")):
                fs, path = fsspec.core.url_to_fs(first)
                if not fs.exists(path):
                    raise FileNotFoundError(f"shard pattern {pattern!r}: {first!r} does not exist")
            out.extend(literal)
    return out


# --------------------------------------------------------------------------- split


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of one epoch: a permutation drawn from ``(seed, epoch)``."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch])
    return rng.permutation(num_shards).tolist()


@dataclass(frozen=True)
class SlotPlan:
    """One slot's work in one epoch: shard indices (into the URL list), and
    the samples of each it takes: those with ``index % stride == phase``."""

    shards: list[int]
    stride: int
    phase: int


def slot_plan(num_shards: int, num_slots: int, slot: int, seed: int, epoch: int, shuffle: bool = True) -> SlotPlan:
    if not 0 <= slot < num_slots:
        raise ValueError(f"slot {slot} out of range for {num_slots} slots")
    if num_shards <= 0:
        raise ValueError("no shards to split")
    order = epoch_order(num_shards, seed, epoch) if shuffle else list(range(num_shards))
    if num_shards >= num_slots:
        return SlotPlan(order[slot::num_slots], 1, 0)
    # Fewer shards than slots: slots j, j+n, j+2n, ... share shard j.
    j = slot % num_shards
    sharing = len(range(j, num_slots, num_shards))
    return SlotPlan([order[j]], sharing, slot // num_shards)


@dataclass(frozen=True)
class Cursor:
    """Where a slot's stream resumes: the next record to read.

    ``offset`` is reader-specific: the byte offset of a tar sample's first
    header, a plain JSON Lines byte offset, a Parquet row, a compressed JSON
    Lines line number. ``index`` is the sample number within the shard.
    """

    epoch: int = 0
    pos: int = 0
    offset: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "Cursor":
        return cls(**{k: int(d[k]) for k in ("epoch", "pos", "offset", "index")})


@dataclass
class Record:
    """One sample read from a shard. ``payload``: ``{ext: bytes}`` for tar
    shards, the text (str) for text shards. ``cursor`` points past it."""

    key: str
    payload: Any
    shard: int  # index into the stream's URL list
    epoch: int
    index: int  # sample number within the shard
    cursor: Cursor


def record_rng(seed: int, tag: int, rec: Record, *extra: int) -> np.random.Generator:
    """A generator owned by one record: the same whatever the worker layout."""
    return np.random.default_rng([seed & 0xFFFFFFFF, tag, rec.epoch, rec.shard, rec.index, *extra])


@contextlib.contextmanager
def open_shard(url: str, compression: Optional[str] = None):
    """Open a shard for reading through fsspec with large read-ahead blocks."""
    with fsspec.open(url, "rb", block_size=BLOCK_SIZE, cache_type=CACHE_TYPE) as f:
        yield decompressed(f, compression)


# --------------------------------------------------------------------------- stream


class ShardStream:
    """One slot's records, epoch after epoch (or one pass with ``loop=False``).

    ``cursor`` always points at the next record to read: after a record has
    been handed out it is that record's ``cursor``. Transient read errors are
    retried ``retries`` times with exponential backoff, reopening the shard and
    seeking to the cursor; a shard that keeps failing is skipped
    (``failed_shard``), as are missing (``missing_shard``) and truncated
    (``truncated_shard``) ones, keeping the good samples read before.
    """

    def __init__(
        self,
        urls: list[str],
        slot: int,
        num_slots: int,
        seed: int,
        counter: SkipCounter,
        cursor: Optional[Cursor] = None,
        retries: int = 3,
        backoff_s: float = 0.5,
        shuffle: bool = True,
        loop: bool = True,
    ):
        if not urls:
            raise ValueError("ShardStream needs at least one shard URL")
        self.urls = list(urls)
        self.readers = [reader_for(u) for u in self.urls]
        self.slot, self.num_slots, self.seed = slot, num_slots, seed
        self.counter = counter
        self.cursor = cursor or Cursor()
        self.retries, self.backoff_s = retries, backoff_s
        self.shuffle, self.loop = shuffle, loop

    def __iter__(self) -> Iterator[Record]:
        c = self.cursor
        empty_epochs = 0
        while True:
            plan = slot_plan(len(self.urls), self.num_slots, self.slot, self.seed, c.epoch, self.shuffle)
            full_epoch, produced = (c.pos == 0 and c.offset == 0), False
            while c.pos < len(plan.shards):
                for rec in self._read_shard(plan.shards[c.pos], c, plan):
                    produced = True
                    yield rec
                c = Cursor(c.epoch, c.pos + 1, 0, 0)
                self.cursor = c
            if not self.loop:
                return
            empty_epochs = empty_epochs + 1 if (full_epoch and not produced) else 0
            if empty_epochs:
                raise RuntimeError(
                    f"slot {self.slot}/{self.num_slots}: a whole epoch over {len(plan.shards)} shard(s) "
                    f"gave no usable sample (first: {self.urls[plan.shards[0]]}); skips so far: "
                    f"{self.counter.as_dict()}"
                )
            c = Cursor(c.epoch + 1, 0, 0, 0)
            self.cursor = c

    def _read_shard(self, shard: int, c: Cursor, plan: SlotPlan) -> Iterator[Record]:
        url = self.urls[shard]
        reader, compression = self.readers[shard]
        failures = 0
        while True:
            try:
                with open_shard(url, compression) as f:
                    for idx, key, payload, next_offset, next_index in reader(
                        f, c.offset, c.index, plan.stride, plan.phase, self.counter
                    ):
                        c = Cursor(c.epoch, c.pos, next_offset, next_index)
                        self.cursor = c
                        failures = 0
                        yield Record(key, payload, shard, c.epoch, idx, c)
                return
            except FileNotFoundError:
                log.warning("shard %s is missing; skipped", url)
                self.counter.add("missing_shard")
                return
            except ShardError as e:
                log.warning("shard %s: %s; rest of the shard skipped", url, e)
                self.counter.add(e.reason)
                return
            except TRANSIENT_ERRORS as e:
                failures += 1
                if failures > self.retries:
                    log.warning("shard %s failed %d times (%s); skipped", url, failures, e)
                    self.counter.add("failed_shard")
                    return
                self.counter.add("read_retry")
                time.sleep(self.backoff_s * 2 ** (failures - 1))

