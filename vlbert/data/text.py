"""Text-only samples: documents packed into fixed-length MLM segments.

Each document is tokenised with the fast tokenizer (no special tokens) and the
word pieces of consecutive documents are packed back to back into segments of
``segment_length`` tokens: ``[CLS]`` + ``segment_length - 2`` pieces + ``[SEP]``.
The remainder of a document is carried into the next segment rather than
dropped, so short documents (sentences, paragraphs) are not lost; every
segment is full, none padded.

Resuming: ``TextSegmenter.state()`` is the cursor of the document holding the
next segment's first piece plus the piece offset within it; restoring re-reads
that one document and nothing before it. Each segment's masking draws from a
generator derived from (seed, epoch, shard, document, piece offset), so it does
not depend on the worker layout.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from vlbert.config import MaskingConfig
from vlbert.batch import IGNORE_INDEX, TextBatch
from vlbert.data.masking import mask_tokens
from vlbert.data.shards import Cursor, ShardStream, SkipCounter, record_rng

TAG_TEXT = 2  # stream tag in record_rng: text masking


@dataclass
class TextSegment:
    """input_ids int64 [L] (after masking), mlm_labels int64 [L]; ``key`` names where the
    segment starts: ``<source>:<shard URL>#<document index>+<piece offset>``."""

    input_ids: np.ndarray
    mlm_labels: np.ndarray
    key: str = ""


class WordPieces:
    """Document -> (word-piece ids, word-start flags) with a fast tokenizer.

    Uses a copy of the tokenizer's Rust backend with truncation and padding
    switched off (checkpoints such as sentence-transformers ship them on).
    """

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer (word_ids are needed for whole-word masking)")
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special_ids = sorted(set(tokenizer.all_special_ids))
        if None in (self.cls_id, self.sep_id, self.mask_id):
            raise ValueError("the tokenizer needs [CLS], [SEP] and [MASK] tokens")

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        words = np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int64)
        starts = np.ones(len(ids), dtype=bool)
        starts[1:] = words[1:] != words[:-1]
        return ids, starts


class TextSegmenter:
    """Packs one slot's document stream (a ``ShardStream`` over text shards)
    into masked segments.

    ``state()`` / the ``state`` argument: ``{"cursor": Cursor dict, "offset": int}``.
    """

    def __init__(
        self,
        stream: ShardStream,
        pieces: WordPieces,
        segment_length: int,
        masking: MaskingConfig,
        seed: int,
        state: Optional[dict] = None,
    ):
        if segment_length < 3:
            raise ValueError(f"segment_length must be at least 3, got {segment_length}")
        self.stream, self.pieces, self.masking, self.seed = stream, pieces, masking, seed
        self.length = segment_length
        state = state or {"cursor": Cursor().to_dict(), "offset": 0}
        self._cursor = Cursor.from_dict(state["cursor"])
        self._offset = int(state["offset"])
        self._iter: Optional[Iterator[TextSegment]] = None
        stream.usable = self._usable

    def _pieces(self, text: str, counter: SkipCounter) -> tuple[np.ndarray, np.ndarray]:
        """Word pieces of a document; an empty result is counted (``bad_text``, ``no_tokens``)."""
        try:
            ids, starts = self.pieces(text)
        except Exception:  # the Rust tokenizer rejects e.g. lone surrogates
            counter.add("bad_text")
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        if len(ids) == 0:
            counter.add("no_tokens")
        return ids, starts

    def _usable(self, rec, counter: SkipCounter) -> bool:
        return len(self._pieces(rec.payload, counter)[0]) > 0

    @property
    def counter(self) -> SkipCounter:
        return self.stream.counter

    def state(self) -> dict:
        return {"cursor": self._cursor.to_dict(), "offset": self._offset}

    def __iter__(self) -> "TextSegmenter":
        return self

    def __next__(self) -> TextSegment:
        if self._iter is None:
            self._iter = self._segments()
        return next(self._iter)

    def _segments(self) -> Iterator[TextSegment]:
        n = self.length - 2
        self.stream.cursor = self._cursor
        # Documents whose pieces are not all used yet: [cursor before it, record, ids, starts, next piece].
        pending: deque[list] = deque()
        before = self._cursor
        skip_first = self._offset
        for rec in self.stream:
            ids, starts = self._pieces(rec.payload, self.counter)
            if len(ids):
                self.stream.mark_delivered()
            start = min(skip_first, len(ids))
            skip_first = 0
            if start < len(ids):
                pending.append([before, rec, ids, starts, start])
            before = rec.cursor
            while sum(len(d[2]) - d[4] for d in pending) >= n:
                first = pending[0]
                rng = record_rng(self.seed, TAG_TEXT, first[1], first[4])
                key = f"{self.stream.source}:{self.stream.urls[first[1].shard]}#{first[1].index}+{first[4]}"
                parts_ids, parts_starts, need = [], [], n
                while need:
                    doc = pending[0]
                    take = min(need, len(doc[2]) - doc[4])
                    parts_ids.append(doc[2][doc[4]:doc[4] + take])
                    parts_starts.append(doc[3][doc[4]:doc[4] + take])
                    doc[4] += take
                    need -= take
                    if doc[4] == len(doc[2]):
                        pending.popleft()
                if pending:
                    self._cursor, self._offset = pending[0][0], pending[0][4]
                else:
                    self._cursor, self._offset = before, 0
                yield self._make(np.concatenate(parts_ids), np.concatenate(parts_starts), rng, key)

    def _make(self, body: np.ndarray, body_starts: np.ndarray, rng: np.random.Generator, key: str) -> TextSegment:
        p = self.pieces
        ids = np.concatenate([[p.cls_id], body, [p.sep_id]]).astype(np.int64)
        starts = np.concatenate([[False], body_starts, [False]])
        starts[1] = True  # a segment may begin inside a word: its first piece starts a word here
        special = np.zeros(len(ids), dtype=bool)
        special[0] = special[-1] = True
        masked, labels = mask_tokens(
            ids, starts, special, p.vocab_size, p.mask_id, self.masking, rng, exclude_ids=p.special_ids
        )
        return TextSegment(masked, labels, key)


def collate_text(segments: list[TextSegment]) -> TextBatch:
    """Stack segments into a ``TextBatch`` (padded with 0 / IGNORE_INDEX if lengths differ)."""
    if not segments:
        raise ValueError("collate_text needs at least one segment")
    length = max(len(s.input_ids) for s in segments)
    ids = np.zeros((len(segments), length), dtype=np.int64)
    labels = np.full((len(segments), length), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(segments), length), dtype=bool)
    for i, s in enumerate(segments):
        ids[i, : len(s.input_ids)] = s.input_ids
        labels[i, : len(s.mlm_labels)] = s.mlm_labels
        mask[i, : len(s.input_ids)] = True
    return TextBatch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels),
                     keys=[s.key for s in segments])
