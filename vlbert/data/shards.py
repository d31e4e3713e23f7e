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
``SkipCounter`` under a short reason name. An epoch in which every shard a
slot received was unreadable, or gave only rejected samples, is counted
(``empty_epoch``) and the slot moves on to the next epoch. Whether the source
can give this slot anything at all is then checked by a *probe*: a read of the
slot's share of every shard, without handing anything out, until one sample
passes the consumer's ``usable`` test. A probe that finds none raises
``SourceUnusable``, naming the source, the skip counts by reason, the
members seen and the likely cause; it never loops forever. Consumers tell the
stream that a record gave a sample with ``mark_delivered()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import fsspec
import numpy as np
from braceexpand import braceexpand

from vlbert.data.formats import DEFAULT_LIMITS, ReadLimits, ShardError, decompressed, reader_for

log = logging.getLogger(__name__)

BLOCK_SIZE = 8 << 20  # remote reads in 8 MiB blocks: few requests per shard
CACHE_TYPE = "readahead"  # shards are read front to back; a read-ahead block cache fits that

try:  # network errors of the async filesystems (http, gcs) that are not OSError
    from aiohttp import ClientError as _ClientError
except ImportError:  # pragma: no cover
    _ClientError = OSError
TRANSIENT_ERRORS = (OSError, TimeoutError, _ClientError)
TRANSIENT_HTTP_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_MEMBERS_SHOWN = 12


# botocore's connection errors (what s3fs raises once its and botocore's retries are spent:
# ConnectionClosedError, EndpointConnectionError, ...) are not OSError; matched by name, so
# that reading a local shard does not import botocore.
BOTOCORE_TRANSIENT = frozenset({"HTTPClientError", "ConnectionError"})


def is_transient(error: BaseException) -> bool:
    """Whether a read error is worth a retry: network and OS errors, and the network
    errors of stores whose exceptions are not ``OSError`` (botocore's connection
    errors under s3fs; gcsfs' ``HttpError`` with a 5xx or 429 status)."""
    if isinstance(error, TRANSIENT_ERRORS):
        return True
    if any(c.__module__ == "botocore.exceptions" and c.__name__ in BOTOCORE_TRANSIENT for c in type(error).__mro__):
        return True
    status = getattr(error, "code", None) or getattr(error, "status", None)
    return type(error).__name__ == "HttpError" and status in TRANSIENT_HTTP_STATUS


class SourceUnusable(RuntimeError):
    """A source that cannot give a slot any usable sample (raised by ``ShardStream``)."""


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
    # The file system's open, not fsspec.open: the latter hands extra keywords to the file
    # system's constructor, which s3fs passes on to botocore (a TypeError on every read).
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type=CACHE_TYPE) as f:
        yield decompressed(f, compression)


# --------------------------------------------------------------------------- stream


class ShardStream:
    """One slot's records, epoch after epoch (or one pass with ``loop=False``).

    ``cursor`` always points at the next record to read: after a record has
    been handed out it is that record's ``cursor``. Transient read errors are
    retried ``retries`` times with exponential backoff, reopening the shard and
    seeking to the cursor; a shard that keeps failing is skipped
    (``failed_shard``), as are missing (``missing_shard``), empty
    (``empty_shard``) and truncated (``truncated_shard``) ones, keeping the good
    samples read before.

    ``source`` names the stream in messages (``"captions"``, ``"text.wiki"``).
    ``usable(record, counter) -> bool`` is the consumer's test for the probe
    (module docstring): it counts the reason of a record it rejects in
    ``counter``. Without it every record counts as usable.
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
        source: str = "source",
        usable: Optional[Callable[[Record], bool]] = None,
        limits: ReadLimits = DEFAULT_LIMITS,
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
        self.source = source
        self.usable = usable
        self.limits = limits
        self.delivered = 0  # samples the consumer made from this stream's records
        self._viable = False  # a probe found a usable sample: empty epochs are bad luck, not a dead source

    def mark_delivered(self) -> None:
        """Called by the consumer when a record gave a usable sample."""
        self.delivered += 1

    def __iter__(self) -> Iterator[Record]:
        c = self.cursor
        fruitless = 0  # consecutive epochs that delivered nothing
        while True:
            plan = slot_plan(len(self.urls), self.num_slots, self.slot, self.seed, c.epoch, self.shuffle)
            delivered_before = self.delivered
            while c.pos < len(plan.shards):
                yield from self._read_shard(plan.shards[c.pos], c, plan, self.counter)
                c = Cursor(c.epoch, c.pos + 1, 0, 0)
                self.cursor = c
            if not self.loop:
                return
            if self.delivered > delivered_before:
                fruitless = 0
            else:
                fruitless += 1
                self.counter.add("empty_epoch")
                # Probe after 1, 2, 4, 8, ... fruitless epochs in a row: a viable source costs one
                # cheap probe, a source that dies later (every shard deleted) is still caught.
                if not self._viable or fruitless & (fruitless - 1) == 0:
                    self._viable = self._probe(plan)
                log.warning("%s, slot %d/%d: epoch %d gave no usable sample from its %d shard(s); next epoch",
                            self.source, self.slot, self.num_slots, c.epoch, len(plan.shards))
            c = Cursor(c.epoch + 1, 0, 0, 0)
            self.cursor = c

    def _probe(self, plan: SlotPlan) -> bool:
        """Read this slot's share of every shard (without handing anything out) until a
        record passes ``usable``. True if one did; raises ``SourceUnusable`` otherwise."""
        counter, records, members = SkipCounter(), 0, set()
        for shard in range(len(self.urls)):
            for rec in self._read_shard(shard, Cursor(), plan, counter, track=False):
                records += 1
                if isinstance(rec.payload, dict) and len(members) < MAX_MEMBERS_SHOWN:
                    members.update("." + ext for ext in rec.payload)
                if self.usable is None or self.usable(rec, counter):
                    return True
        raise SourceUnusable(self._unusable_message(plan, counter, records, members))

    def _unusable_message(self, plan: SlotPlan, counter: SkipCounter, records: int, members: set) -> str:
        n = len(self.urls)
        where = f"{self.source!r} ({n} shard(s), first {self.urls[0]})"
        share = "" if plan.stride == 1 else f" (this slot's share: every {plan.stride}-th sample, phase {plan.phase})"
        skips = ", ".join(f"{k} {v}" for k, v in counter.as_dict().items()) or "none"
        shard_errors = {k: v for k, v in counter.as_dict().items() if k.endswith("_shard")}
        if records == 0 and sum(shard_errors.values()) >= n:
            cause = "no shard could be read (" + ", ".join(f"{k} {v}" for k, v in shard_errors.items()) + ")"
        elif records == 0 and plan.stride > 1:
            cause = (f"too few samples for the slots: {n} shard(s) are shared by {self.num_slots} slots "
                     f"(the run's data partitions: data.partitions, by default the first attempt's ranks x "
                     f"data.num_workers) and slot {self.slot}'s share of them is empty; start the run with "
                     "fewer partitions (workers or ranks), or use more data")
        elif records == 0:
            cause = "the shards hold no samples"
        else:
            top = max(counter.as_dict().items(), key=lambda kv: kv[1], default=("", 0))[0]
            cause = _LIKELY_CAUSES.get(top, f"every sample was rejected, most often as {top!r}")
            if members:
                cause += "; members seen: " + ", ".join(sorted(members))
        return (f"source {where}: 0 of {records} samples read{share} were usable after a full pass over "
                f"every shard (skips: {skips}); likely cause: {cause}")

    def _read_shard(self, shard: int, c: Cursor, plan: SlotPlan, counter: SkipCounter,
                    track: bool = True) -> Iterator[Record]:
        """Records of one shard from cursor ``c``; ``track`` keeps ``self.cursor`` at the next record."""
        url = self.urls[shard]
        reader, compression = self.readers[shard]
        failures = 0
        while True:
            try:
                with open_shard(url, compression) as f:
                    for idx, key, payload, next_offset, next_index in reader(
                        f, c.offset, c.index, plan.stride, plan.phase, counter, limits=self.limits
                    ):
                        c = Cursor(c.epoch, c.pos, next_offset, next_index)
                        if track:
                            self.cursor = c
                        failures = 0
                        yield Record(key, payload, shard, c.epoch, idx, c)
                return
            except FileNotFoundError:
                log.warning("shard %s is missing; skipped", url)
                counter.add("missing_shard")
                return
            except ShardError as e:
                log.warning("shard %s: %s; rest of the shard skipped", url, e)
                counter.add(e.reason)
                return
            except Exception as e:
                if not is_transient(e):
                    raise
                failures += 1
                if failures > self.retries:
                    log.warning("shard %s failed %d times (%s); skipped", url, failures, e)
                    counter.add("failed_shard")
                    return
                counter.add("read_retry")
                time.sleep(self.backoff_s * 2 ** (failures - 1))


# Skip reason -> what usually causes a source to reject every sample for it.
_LIKELY_CAUSES = {
    "missing_caption": "the samples have no caption member (KEY.txt)",
    "missing_image": "the samples have no image member (KEY.jpg, .jpeg, .png or .webp)",
    "corrupt_image": "the images cannot be decoded",
    "empty_caption": "every caption is empty",
    "bad_json": "the JSON members (or JSON Lines rows) do not parse",
    "bad_boxes": "the boxes in KEY.json are malformed",
    "bad_regions": "KEY.regions.npy does not match the boxes",
    "empty_text": "every document's text is empty",
    "bad_text": "the text is not valid UTF-8 strings",
    "no_tokens": "every document tokenises to nothing (only characters the tokenizer drops)",
    "bad_text_shard": "the text shards have no 'text' column/field",
}
