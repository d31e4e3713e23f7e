"""The pretraining stream: captioned images interleaved with text segments.

Every micro-batch holds ``captions_per_batch`` captioned images and
``text_per_batch`` text segments drawn from the named text sources by weight.
Batches are made inside the DataLoader workers; each worker is one *slot*
(``rank * num_workers + worker``) with its own shards (``shards.slot_plan``).

Exact resumption. A worker yields ``(logical worker, batch, its state after the
batch)``. The main-process iterator keeps, per logical worker, the state that
came with the last batch it handed out (batches prefetched but not handed out
do not count) and which worker is next. The DataLoader takes batches from its
workers round-robin starting at worker 0, so on restore physical worker ``p``
plays logical worker ``(p + next) % n``. States are plain data (JSON-able):
cursors, piece offsets, batch counters and skip counts. Sample randomness
(flip, masking) comes from per-record generators and the choice of text source
from a generator keyed on (seed, slot, batch number): nothing depends on
timing or on which process ran what.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import queue
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlbert.config import CaptionDataConfig, DataConfig, MaskingConfig
from vlbert.batch import PretrainBatch
from vlbert.data.captions import BadSample, collate_captions, decode_caption_sample
from vlbert.data.prefetch import Prefetcher
from vlbert.data.shards import Cursor, ShardStream, SkipCounter, expand_urls, record_rng
from vlbert.data.text import TextSegmenter, WordPieces, collate_text

log = logging.getLogger(__name__)

TAG_CAPTIONS = 1  # record_rng stream tags: caption sample randomness
TAG_MIX = 3  # choice of text source per batch
TAG_VALIDATION = 4
STATE_VERSION = 1


class DataWaitTimeout(RuntimeError):
    """No batch came from the data pipeline within ``data.wait_timeout_s``."""


def _identity(x):
    return x


def fresh_worker_state(slot: int, text_sources: list[str]) -> dict:
    """The state of a logical worker that has produced nothing yet."""
    start = Cursor().to_dict()
    return {
        "slot": slot,
        "batches": 0,
        "captions": dict(start),
        "text": {name: {"cursor": dict(start), "offset": 0} for name in text_sources},
        "skips": {},
    }


class CaptionReader:
    """One slot's caption samples: records -> decoded ``CaptionSample``s; bad ones counted.
    A sample's key is ``<shard URL>#<sample key>``."""

    def __init__(self, stream: ShardStream, cfg: CaptionDataConfig, masking: MaskingConfig, tokenizer,
                 seed: int, tag: int, train: bool):
        self.stream, self.cfg, self.masking, self.tokenizer = stream, cfg, masking, tokenizer
        self.seed, self.tag, self.train = seed, tag, train
        stream.usable = self._usable

    def _decode(self, rec):
        return decode_caption_sample(rec.payload, f"{self.stream.urls[rec.shard]}#{rec.key}", self.cfg,
                                     self.masking, self.tokenizer, record_rng(self.seed, self.tag, rec),
                                     train=self.train)

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


class PretrainDataset(IterableDataset):
    """Yields ``(logical_worker, PretrainBatch, state_after)`` forever (see module docstring)."""

    def __init__(self, data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, num_slots: int,
                 captions_per_batch: int, text_per_batch: int, caption_urls: list[str],
                 text_urls: dict[str, list[str]], worker_states: list[dict], offset: int):
        self.cfg, self.masking, self.tokenizer = data_cfg, masking_cfg, tokenizer
        self.num_slots = num_slots
        self.captions_per_batch, self.text_per_batch = captions_per_batch, text_per_batch
        self.caption_urls, self.text_urls = caption_urls, text_urls
        self.worker_states, self.offset = worker_states, offset

    def __iter__(self) -> Iterator[tuple[int, PretrainBatch, dict]]:
        info = get_worker_info()
        p, n = (info.id, info.num_workers) if info is not None else (0, 1)
        if n != len(self.worker_states):
            raise RuntimeError(f"{n} data-loader workers but the state holds {len(self.worker_states)}")
        logical = (p + self.offset) % n
        state = copy.deepcopy(self.worker_states[logical])
        cfg, slot = self.cfg, state["slot"]
        counter = SkipCounter(state["skips"])

        def stream(urls, cursor, source):
            return ShardStream(urls, slot, self.num_slots, cfg.seed, counter, Cursor.from_dict(cursor),
                               cfg.read_retries, cfg.retry_backoff_s, source=source)

        captions = None
        if self.captions_per_batch:
            cap_stream = stream(self.caption_urls, state["captions"], "captions")
            captions = iter(CaptionReader(cap_stream, cfg.captions, self.masking, self.tokenizer, cfg.seed,
                                          TAG_CAPTIONS, train=True))
        names = sorted(self.text_urls)
        segmenters = {}
        if self.text_per_batch:
            pieces = WordPieces(self.tokenizer)
            for name in names:
                st = state["text"][name]
                segmenters[name] = TextSegmenter(stream(self.text_urls[name], st["cursor"], f"text.{name}"), pieces,
                                                 cfg.text.segment_length, self.masking, cfg.seed, st)
            weights = np.array([cfg.text.sources[k].weight for k in names], dtype=np.float64)
            weights /= weights.sum()

        while True:
            batch = PretrainBatch()
            if captions is not None:
                batch.captions = collate_captions([next(captions) for _ in range(self.captions_per_batch)])
                state["captions"] = cap_stream.cursor.to_dict()
            if segmenters:
                rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, TAG_MIX, slot, state["batches"]])
                picks = rng.choice(len(names), size=self.text_per_batch, p=weights)
                batch.text = collate_text([next(segmenters[names[i]]) for i in picks])
                for name, seg in segmenters.items():
                    state["text"][name] = seg.state()
            state["batches"] += 1
            state["skips"] = counter.as_dict()
            yield logical, batch, copy.deepcopy(state)


class PretrainStream:
    """Iterable of ``PretrainBatch`` for one rank; resumable with
    ``state_dict()`` / ``load_state_dict()`` (plain, JSON-able data)."""

    def __init__(self, data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int, world_size: int,
                 captions_per_batch: int, text_per_batch: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if captions_per_batch < 0 or text_per_batch < 0 or captions_per_batch + text_per_batch == 0:
            raise ValueError("captions_per_batch + text_per_batch must be positive (each >= 0)")
        if captions_per_batch and not data_cfg.captions.urls:
            raise ValueError("captions_per_batch > 0 needs data.captions.urls")
        if text_per_batch and not data_cfg.text.sources:
            raise ValueError("text_per_batch > 0 needs data.text.sources")
        self.cfg, self.masking, self.tokenizer = data_cfg, masking_cfg, tokenizer
        self.rank, self.world_size = rank, world_size
        self.captions_per_batch, self.text_per_batch = captions_per_batch, text_per_batch
        self.num_workers = data_cfg.num_workers
        self.n_logical = max(1, self.num_workers)
        self.num_slots = world_size * self.n_logical
        sources = sorted(data_cfg.text.sources) if text_per_batch else []
        self._states = [fresh_worker_state(rank * self.n_logical + w, sources) for w in range(self.n_logical)]
        self._next = 0
        self._iter = None
        # Listed once, here: a bad pattern fails at build time, and the list (hence every
        # epoch's order) stays fixed for the life of the stream.
        self.caption_urls = expand_urls(data_cfg.captions.urls) if captions_per_batch else []
        self.text_urls = {name: expand_urls(data_cfg.text.sources[name].urls) for name in sources}

    def _shard_counts(self) -> dict[str, int]:
        counts = {"captions": len(self.caption_urls)}
        counts.update({f"text.{k}": len(v) for k, v in self.text_urls.items()})
        return counts

    def _make_dataset(self) -> PretrainDataset:
        return PretrainDataset(self.cfg, self.masking, self.tokenizer, self.num_slots, self.captions_per_batch,
                               self.text_per_batch, self.caption_urls, self.text_urls,
                               copy.deepcopy(self._states), self._next)

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
        start = time.monotonic()
        next_warning = self.cfg.wait_warn_s
        while True:
            try:
                logical, batch, state = self._iter.get(timeout=Prefetcher.poll_s)
                break
            except queue.Empty:
                pass
            if should_stop is not None and should_stop():
                return None
            waited = time.monotonic() - start
            if self.cfg.wait_timeout_s and waited >= self.cfg.wait_timeout_s:
                raise DataWaitTimeout(
                    f"rank {self.rank}: no batch from the data pipeline for {waited:.0f} s "
                    f"(data.wait_timeout_s={self.cfg.wait_timeout_s:g}); the store may be unreachable or "
                    f"very slow; skips so far: {self.skip_counts()}")
            if waited >= next_warning:
                log.warning("rank %d: waiting %.0f s for a batch (skips so far: %s)", self.rank, waited,
                            self.skip_counts())
                next_warning += self.cfg.wait_warn_s
        self._states[logical] = state
        self._next = (logical + 1) % self.n_logical
        return batch

    def _batches(self) -> Iterator[tuple[int, PretrainBatch, dict]]:
        dataset = self._make_dataset()
        if not self.num_workers:
            return iter(dataset)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenise alone
        # Its own generator: starting workers must not draw from the global torch RNG,
        # or dropout after a resume would differ from the uninterrupted run's.
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
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
            "seed": self.cfg.seed,
            "next_worker": self._next,
            "shards": self._shard_counts(),
            "workers": copy.deepcopy(self._states),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = {"rank": self.rank, "world_size": self.world_size, "num_workers": self.n_logical}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise ValueError(
                f"the data state was saved with {theirs} and cannot resume exactly with {mine}: "
                "keep world size and data.num_workers (and the rank order) when resuming"
            )
        if state.get("shards") != self._shard_counts():
            raise ValueError(
                f"the data state was saved over {state.get('shards')} shards, the config lists "
                f"{self._shard_counts()}: the shard lists must not change to resume exactly"
            )
        self._states = copy.deepcopy(state["workers"])
        self._next = int(state["next_worker"])
        self.close()

    def skip_counts(self) -> dict[str, int]:
        """Inputs skipped so far by this rank, by reason (as of the batches handed out)."""
        total = SkipCounter()
        for s in self._states:
            total.merge(s["skips"])
        return total.as_dict()


def build_pretrain_stream(data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int, world_size: int,
                          captions_per_batch: int, text_per_batch: int) -> PretrainStream:
    """The training stream of one rank; ``*_per_batch`` are this rank's micro-batch counts."""
    return PretrainStream(data_cfg, masking_cfg, tokenizer, rank, world_size, captions_per_batch, text_per_batch)


# --------------------------------------------------------------------------- validation


class ValidationDataset(IterableDataset):
    """One deterministic pass over ``data_cfg.validation`` (no flip, fixed masking)."""

    def __init__(self, data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int, world_size: int,
                 batch_size: int):
        if not data_cfg.validation.urls:
            raise ValueError("data.validation.urls is empty: no validation set")
        self.cfg, self.masking, self.tokenizer = data_cfg, masking_cfg, tokenizer
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.urls = expand_urls(data_cfg.validation.urls)

    def __iter__(self) -> Iterator[PretrainBatch]:
        info = get_worker_info()
        p, n = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = ShardStream(self.urls, self.rank * n + p, self.world_size * n, self.cfg.seed, SkipCounter(),
                             retries=self.cfg.read_retries, backoff_s=self.cfg.retry_backoff_s,
                             shuffle=False, loop=False, source="validation")
        vcfg = dataclasses.replace(self.cfg.validation, flip_prob=0.0)
        samples = []
        for sample in CaptionReader(stream, vcfg, self.masking, self.tokenizer, self.cfg.seed, TAG_VALIDATION,
                                    train=False):
            samples.append(sample)
            if len(samples) == self.batch_size:
                yield PretrainBatch(captions=collate_captions(samples))
                samples = []
        if samples:
            yield PretrainBatch(captions=collate_captions(samples))


def build_validation_stream(data_cfg: DataConfig, masking_cfg: MaskingConfig, tokenizer, rank: int,
                            world_size: int, batch_size: int):
    """A finite, deterministic iterable of caption-only ``PretrainBatch``es for one rank
    (iterate it again for another identical pass)."""
    dataset = ValidationDataset(data_cfg, masking_cfg, tokenizer, rank, world_size, batch_size)
    if data_cfg.num_workers == 0:
        return dataset
    return DataLoader(dataset, batch_size=None, num_workers=data_cfg.num_workers, collate_fn=_identity,
                      generator=torch.Generator().manual_seed(data_cfg.seed))  # leaves the global RNG alone
