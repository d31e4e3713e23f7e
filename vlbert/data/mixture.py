"""The pretraining stream: captioned images interleaved with text segments.

Every micro-batch holds ``captions_per_batch`` captioned images and
``text_per_batch`` text segments drawn from the named text sources by weight.
The sample order is split into canonical *partitions* fixed at the run's start
(``vlbert.data.partitions``: by default one per rank x worker slot of the first
attempt); partition ``p`` reads what slot ``p`` reads (``shards.slot_plan``).
Batches are made inside the DataLoader workers; each worker holds some of its
rank's partitions and makes one batch from each in turn, each batch from one
partition.

Exact resumption. A worker yields ``(logical worker, partition, its next index,
batch, the partition's state after the batch)``. The main-process iterator
keeps, per partition, the state that came with the last batch it handed out
(batches prefetched but not handed out do not count), per logical worker which
of its partitions is next, and which worker is next. The DataLoader takes
batches from its workers round-robin starting at worker 0, so on restore
physical worker ``p`` plays logical worker ``(p + next) % n``. States are plain
data (JSON-able): cursors, piece offsets, batch counters and skip counts. On the
saved layout a resume is exact batch for batch; on another (world size or
``data.num_workers`` changed) the partitions are reassigned and each continues
from its own cursor, so no sample is repeated or skipped. Sample randomness (flip,
masking) comes from per-record generators and the choice of text source from a
generator keyed on (seed, partition, the partition's batch number): nothing
depends on timing or on which process ran what.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlbert.config import CaptionDataConfig, DataConfig, MaskingConfig, TextDataConfig
from vlbert.batch import PretrainBatch
from vlbert.data.captions import BadSample, collate_captions, decode_caption_sample
from vlbert.data.formats import ReadLimits
from vlbert.data.prefetch import Prefetcher, wait_for_item
from vlbert.data.partitions import LayoutError, assignment, default_partitions
from vlbert.data.shards import Cursor, ShardStream, SkipCounter, expand_urls, record_rng
from vlbert.data.text import TextSegmenter, WordPieces, collate_text

log = logging.getLogger(__name__)

TAG_CAPTIONS = 1  # record_rng stream tags: caption sample randomness
TAG_MIX = 3  # choice of text source per batch
TAG_VALIDATION = 4
STATE_VERSION = 2


def _identity(x):
    return x


def caption_limits(cfg: CaptionDataConfig) -> ReadLimits:
    """The reader caps of a caption source (its tar members)."""
    return ReadLimits(max_member_bytes=cfg.max_member_bytes)


def text_limits(cfg: TextDataConfig) -> ReadLimits:
    """The reader caps of the text sources (a JSON Lines line, a document)."""
    return ReadLimits(max_line_bytes=cfg.max_line_bytes, max_document_bytes=cfg.max_document_bytes)


def fresh_partition_state(partition: int, text_sources: list[str]) -> dict:
    """The state of a canonical partition that has produced nothing yet."""
    start = Cursor().to_dict()
    return {
        "partition": partition,
        "batches": 0,
        "captions": dict(start),
        "text": {name: {"cursor": dict(start), "offset": 0} for name in text_sources},
        "skips": {},
    }


class CaptionReader:
    """One slot's caption samples: records -> decoded ``CaptionSample``s; bad ones counted.
    A sample's key is ``<shard URL>#<sample key>``. ``features``: read the stored box features
    instead of decoding the image (``detector.source: features``)."""

    def __init__(self, stream: ShardStream, cfg: CaptionDataConfig, masking: MaskingConfig, tokenizer,
                 seed: int, tag: int, train: bool, features: bool = False):
        self.stream, self.cfg, self.masking, self.tokenizer = stream, cfg, masking, tokenizer
        self.seed, self.tag, self.train, self.features = seed, tag, train, features
        stream.usable = self._usable

    def _decode(self, rec):
        return decode_caption_sample(rec.payload, f"{self.stream.urls[rec.shard]}#{rec.key}", self.cfg,
                                     self.masking, self.tokenizer, record_rng(self.seed, self.tag, rec),
                                     train=self.train, features=self.features)

    def _usable(self, rec, counter: SkipCounter) -> bool:
        try:
            self._decode(rec)
        except BadSample as e:
            counter.add(e.reason)
            return False
        return True

    def __iter__(self):
        for rec in self.stream:
            try:
                sample = self._decode(rec)
            except BadSample as e:
                self.stream.counter.add(e.reason)
                continue
            self.stream.mark_delivered()
            yield sample


class PartitionBatches:
    """The batches of one canonical partition, from its state (module docstring):
    ``next()`` gives ``(PretrainBatch, state after it)``."""

    def __init__(self, dataset: "PretrainDataset", state: dict):
        cfg, part = dataset.cfg, state["partition"]
        self.state = copy.deepcopy(state)
        self.counter = SkipCounter(self.state["skips"])
        self.captions_per_batch, self.text_per_batch = dataset.captions_per_batch, dataset.text_per_batch
        self.seed = cfg.seed

        def stream(urls, cursor, source, limits):
            return ShardStream(urls, part, dataset.num_partitions, cfg.seed, self.counter, Cursor.from_dict(cursor),
                               cfg.read_retries, cfg.retry_backoff_s, source=source, limits=limits)

        self.captions = None
        if self.captions_per_batch:
            self.cap_stream = stream(dataset.caption_urls, self.state["captions"], "captions",
                                     caption_limits(cfg.captions))
            self.captions = iter(CaptionReader(self.cap_stream, cfg.captions, dataset.masking, dataset.tokenizer,
                                               cfg.seed, TAG_CAPTIONS, train=True, features=dataset.features))
        self.names = sorted(dataset.text_urls)
        self.segmenters = {}
        if self.text_per_batch:
            pieces = WordPieces(dataset.tokenizer)
            for name in self.names:
                st = self.state["text"][name]
                self.segmenters[name] = TextSegmenter(stream(dataset.text_urls[name], st["cursor"], f"text.{name}",
                                                             text_limits(cfg.text)),
                                                      pieces, cfg.text.segment_length, dataset.masking, cfg.seed, st)
            weights = np.array([cfg.text.sources[k].weight for k in self.names], dtype=np.float64)
            self.weights = weights / weights.sum()

    def __next__(self) -> tuple[PretrainBatch, dict]:
        state = self.state
        batch = PretrainBatch(partition=state["partition"])
        if self.captions is not None:
            batch.captions = collate_captions([next(self.captions) for _ in range(self.captions_per_batch)])
            state["captions"] = self.cap_stream.cursor.to_dict()
        if self.segmenters:
            # Keyed on the partition and its batch number: the same picks whoever reads it.
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, TAG_MIX, state["partition"], state["batches"]])
            picks = rng.choice(len(self.names), size=self.text_per_batch, p=self.weights)
            batch.text = collate_text([next(self.segmenters[self.names[i]]) for i in picks])
            for name, seg in self.segmenters.items():
                state["text"][name] = seg.state()
        state["batches"] += 1
        state["skips"] = self.counter.as_dict()
        return batch, copy.deepcopy(state)


class PretrainDataset(IterableDataset):
    """Yields ``(logical worker, partition, worker's next index, PretrainBatch, partition state
    after it)`` forever (see the module docstring)."""

    def __init__(self, data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, num_partitions: int,
                 captions_per_batch: int, text_per_batch: int, caption_urls: list[str],
                 text_urls: dict[str, list[str]], workers: list[list[int]], worker_next: list[int],
                 partition_states: dict[int, dict], offset: int, features: bool = False):
        self.cfg, self.masking, self.tokenizer, self.features = data_cfg, masking_cfg, tokenizer, features
        self.num_partitions = num_partitions
        self.captions_per_batch, self.text_per_batch = captions_per_batch, text_per_batch
        self.caption_urls, self.text_urls = caption_urls, text_urls
        self.workers, self.worker_next = workers, worker_next
        self.partition_states, self.offset = partition_states, offset

    def __iter__(self) -> Iterator[tuple[int, int, int, PretrainBatch, dict]]:
        info = get_worker_info()
        p, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != len(self.workers):
            raise RuntimeError(f"{n} data-loader workers but the state holds {len(self.workers)}")
        logical = (p + self.offset) % n
        parts = self.workers[logical]
        readers = {part: PartitionBatches(self, self.partition_states[part]) for part in parts}
        i = self.worker_next[logical]
        while True:
            part = parts[i]
            batch, state = next(readers[part])
            i = (i + 1) % len(parts)
            yield logical, part, i, batch, state


class PretrainStream:
    """Iterable of ``PretrainBatch`` for one rank; resumable with ``state_dict()`` /
    ``load_state_dict()`` (plain, JSON-able data), also on another layout
    (``load_state_dicts`` with every saved rank's state).

    ``num_partitions``: the run's canonical partitions (``vlbert.data.partitions``);
    None or 0: ``world_size x max(1, data.num_workers)``. A resumed stream takes the
    number from the saved state. ``features``: caption samples carry the shards' stored box
    features instead of pixels (``detector.source: features``).
    """

    def __init__(self, data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int, world_size: int,
                 captions_per_batch: int, text_per_batch: int, num_partitions: Optional[int] = None,
                 features: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if captions_per_batch < 0 or text_per_batch < 0 or captions_per_batch + text_per_batch == 0:
            raise ValueError("captions_per_batch + text_per_batch must be positive (each >= 0)")
        if captions_per_batch and not data_cfg.captions.urls:
            raise ValueError("captions_per_batch > 0 needs data.captions.urls")
        if text_per_batch and not data_cfg.text.sources:
            raise ValueError("text_per_batch > 0 needs data.text.sources")
        self.cfg, self.masking, self.tokenizer, self.features = data_cfg, masking_cfg, tokenizer, features
        self.rank, self.world_size = rank, world_size
        self.captions_per_batch, self.text_per_batch = captions_per_batch, text_per_batch
        self.num_workers = data_cfg.num_workers
        self._sources = sorted(data_cfg.text.sources) if text_per_batch else []
        self._iter = None
        self._set_partitions(num_partitions or default_partitions(world_size, self.num_workers))
        # Listed once, here: a bad pattern fails at build time, and the list (hence every
        # epoch's order) stays fixed for the life of the stream.
        self.caption_urls = expand_urls(data_cfg.captions.urls) if captions_per_batch else []
        self.text_urls = {name: expand_urls(data_cfg.text.sources[name].urls) for name in self._sources}

    def _set_partitions(self, num_partitions: int, states: Optional[dict[int, dict]] = None) -> None:
        """Take this rank's share of ``num_partitions`` partitions (fresh unless in ``states``)."""
        self.num_partitions = num_partitions
        self.workers = assignment(num_partitions, self.world_size, self.rank, self.num_workers)
        self.n_logical = len(self.workers)
        states = states or {}
        self._states = {p: copy.deepcopy(states.get(p) or fresh_partition_state(p, self._sources))
                        for parts in self.workers for p in parts}
        self._worker_next = [0] * self.n_logical
        self._next = 0

    def _shard_counts(self) -> dict[str, int]:
        counts = {"captions": len(self.caption_urls)}
        counts.update({f"text.{k}": len(v) for k, v in self.text_urls.items()})
        return counts

    def _make_dataset(self) -> PretrainDataset:
        return PretrainDataset(self.cfg, self.masking, self.tokenizer, self.num_partitions, self.captions_per_batch,
                               self.text_per_batch, self.caption_urls, self.text_urls, self.workers,
                               list(self._worker_next), copy.deepcopy(self._states), self._next,
                               features=self.features)

    def __iter__(self) -> "PretrainStream":
        return self

    def __next__(self) -> PretrainBatch:
        batch = self.next_batch()
        assert batch is not None  # no stop predicate: never gives up
        return batch

    def next_batch(self, should_stop: Optional[Callable[[], bool]] = None) -> Optional[PretrainBatch]:
        """The next batch, or None if ``should_stop()`` became true while waiting for it.

        Batches are made in a background thread (which drives the DataLoader workers when
        there are any), so the wait can be watched: a warning every ``data.wait_warn_s``
        seconds, ``DataWaitTimeout`` after ``data.wait_timeout_s``. Errors of the pipeline
        (``SourceUnusable``, a worker crash) are raised here.
        """
        if self._iter is None:
            self._iter = Prefetcher(self._batches())
        got, item = wait_for_item(self._iter, should_stop, self.cfg.wait_warn_s, self.cfg.wait_timeout_s,
                                  lambda: f"rank {self.rank}; skips so far: {self.skip_counts()}",
                                  "data.wait_timeout_s")
        if not got:
            return None
        logical, part, worker_next, batch, state = item
        self._states[part] = state
        self._worker_next[logical] = worker_next
        self._next = (logical + 1) % self.n_logical
        return batch

    def _batches(self) -> Iterator[tuple[int, int, int, PretrainBatch, dict]]:
        dataset = self._make_dataset()
        if not self.num_workers:
            return iter(dataset)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenise alone
        # Its own generator: starting workers must not draw from the global torch RNG,
        # or dropout after a resume would differ from the uninterrupted run's.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.n_logical, collate_fn=_identity,
                            prefetch_factor=2, generator=torch.Generator().manual_seed(self.cfg.seed))
        return iter(loader)

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the workers (a later ``next`` starts them again from the current state);
        ``wait_s``: how long to wait for the background thread to let them go."""
        if self._iter is not None:
            self._iter.close(wait_s)
        self._iter = None

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.n_logical,
            "partitions": self.num_partitions,
            "seed": self.cfg.seed,
            "shards": self._shard_counts(),
            "workers": [{"partitions": list(parts), "next": i} for parts, i in zip(self.workers, self._worker_next)],
            "next_worker": self._next,
            "partition_states": [copy.deepcopy(self._states[p]) for p in sorted(self._states)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from this rank's own saved state (same world size: this rank keeps its
        partitions; ``data.num_workers`` may differ)."""
        self.load_state_dicts([state])

    def load_state_dicts(self, states: list[dict]) -> None:
        """Resume from saved states that hold at least this rank's partitions (after a change
        of world size: every saved rank's). On the saved layout the resume is exact,
        batch for batch; on another, each partition continues from its own cursor."""
        states = [_upgrade(s) for s in states]
        if not states:
            raise ValueError("no data state to resume from")
        for s in states:
            if s["shards"] != self._shard_counts():
                raise LayoutError(
                    f"the data state was saved over {s['shards']} shards, the config lists "
                    f"{self._shard_counts()}: the shard lists must not change to resume exactly")
            # Version 1 states may lack the seed; they are taken as saved with this one.
            if s.get("seed") is not None and s["seed"] != self.cfg.seed:
                raise LayoutError(
                    f"data.seed = {self.cfg.seed}, but the data state was saved with seed {s['seed']}: the shard "
                    f"order and every sample's randomness follow it, so a resume needs the same "
                    f"(set data.seed = {s['seed']})")
        counts = {s["partitions"] for s in states}
        if len(counts) != 1:
            raise ValueError(f"the saved data states disagree on the number of partitions: {sorted(counts)}")
        saved = counts.pop()
        wanted = self.cfg.partitions
        if wanted and wanted != saved:
            raise LayoutError(f"data.partitions = {wanted}, but the run was started with {saved} partitions; "
                             "the number of partitions is fixed at a run's start (set it to 0 or to "
                             f"{saved})")
        by_partition: dict[int, dict] = {}
        for s in states:
            for ps in s["partition_states"]:
                if ps["partition"] in by_partition:
                    raise ValueError(f"partition {ps['partition']} appears in two saved data states")
                by_partition[ps["partition"]] = ps
        self.close()
        self._set_partitions(saved, by_partition)
        missing = sorted(set(self._states) - set(by_partition))
        if missing:
            raise ValueError(f"rank {self.rank}: the saved data states lack partition(s) {missing} of this rank; "
                             "pass every saved rank's state after a change of world size")
        own = [s for s in states if s["rank"] == self.rank and s["world_size"] == self.world_size
               and [w["partitions"] for w in s["workers"]] == self.workers]
        if own:  # the same layout: the same interleaving, batch for batch
            self._worker_next = [int(w["next"]) for w in own[0]["workers"]]
            self._next = int(own[0]["next_worker"])

    def skip_counts(self) -> dict[str, int]:
        """Inputs skipped so far by this rank's partitions, by reason (as of the batches handed out)."""
        total = SkipCounter()
        for s in self._states.values():
            total.merge(s["skips"])
        return total.as_dict()


def _upgrade(state: dict) -> dict:
    """A saved data state in the current format (version 1: one partition per worker slot)."""
    version = state.get("version")
    if version == STATE_VERSION:
        return state
    if version != 1:
        raise ValueError(f"data state version {version!r}, expected {STATE_VERSION} (or 1)")
    n, world, rank = int(state["num_workers"]), int(state["world_size"]), int(state["rank"])
    parts = []
    for w in state["workers"]:
        ps = {k: v for k, v in w.items() if k != "slot"}
        parts.append({"partition": int(w["slot"]), **ps})
    return {"version": STATE_VERSION, "rank": rank, "world_size": world, "num_workers": n,
            "partitions": world * n, "seed": state.get("seed"), "shards": state["shards"],
            "workers": [{"partitions": [rank * n + w], "next": 0} for w in range(n)],
            "next_worker": int(state["next_worker"]), "partition_states": parts}


def build_pretrain_stream(data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int, world_size: int,
                          captions_per_batch: int, text_per_batch: int,
                          num_partitions: Optional[int] = None, features: bool = False) -> PretrainStream:
    """The training stream of one rank; ``*_per_batch`` are this rank's micro-batch counts;
    ``num_partitions``, ``features``: see ``PretrainStream`` (default: ``data.partitions``)."""
    return PretrainStream(data_cfg, masking_cfg, tokenizer, rank, world_size, captions_per_batch, text_per_batch,
                          num_partitions or data_cfg.partitions or None, features=features)


# --------------------------------------------------------------------------- validation


class ValidationDataset(IterableDataset):
    """One deterministic pass over ``data_cfg.validation`` (no flip, fixed masking)."""

    def __init__(self, data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int, world_size: int,
                 batch_size: int, features: bool = False):
        if not data_cfg.validation.urls:
            raise ValueError("data.validation.urls is empty: no validation set")
        self.cfg, self.masking, self.tokenizer, self.features = data_cfg, masking_cfg, tokenizer, features
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.urls = expand_urls(data_cfg.validation.urls)

    def __iter__(self) -> Iterator[PretrainBatch]:
        info = get_worker_info()
        p, n = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = ShardStream(self.urls, self.rank * n + p, self.world_size * n, self.cfg.seed, SkipCounter(),
                             retries=self.cfg.read_retries, backoff_s=self.cfg.retry_backoff_s,
                             shuffle=False, loop=False, source="validation",
                             limits=caption_limits(self.cfg.validation))
        vcfg = dataclasses.replace(self.cfg.validation, flip_prob=0.0)
        samples = []
        for sample in CaptionReader(stream, vcfg, self.masking, self.tokenizer, self.cfg.seed, TAG_VALIDATION,
                                    train=False, features=self.features):
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield PretrainBatch(captions=collate_captions(samples))
                samples = []
        if samples:
            yield PretrainBatch(captions=collate_captions(samples))


def build_validation_stream(data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int,
                            world_size: int, batch_size: int, features: bool = False):
    """A finite, deterministic iterable of caption-only ``PretrainBatch``es for one rank
    (iterate it again for another identical pass); ``features``: see ``PretrainStream``."""
    dataset = ValidationDataset(data_cfg, masking_cfg, tokenizer, rank, world_size, batch_size, features)
    if data_cfg.num_workers == 0:
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=data_cfg.num_workers, collate_fn=_identity,
                      generator=torch.Generator().manual_seed(data_cfg.seed))  # leaves the global RNG alone
