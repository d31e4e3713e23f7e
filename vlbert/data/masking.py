"""Masking for the two pretraining tasks (docs/design.md section 5.2).

``mask_tokens`` is the masked-language-modelling corruption shared by caption
and text-only samples; ``choose_rois`` picks the RoIs of masked-RoI
classification. Both work on one sample with NumPy and take the generator
explicitly, so a sample's masking is reproducible from the data seed.

At-least-one-word rule: the reference code draws every word independently, so
a short caption often gets no MLM target at all (a 3-word caption at p=0.15:
61% of the time). Captions average about ten words and the demo's are three to
eleven, so that would waste much of the caption MLM signal, and a batch with no
target at all gives a NaN mean cross-entropy. ``mask_tokens`` therefore chooses
one word uniformly at random when the Bernoulli draw chose none (``min_words``,
default 1; only when ``mlm_prob > 0``). For long sequences the rate is unchanged
(64-token segments: +0.0002 absolute). ``choose_rois`` keeps the plain
Bernoulli draw: the RoI loss is averaged over the RoIs of the whole batch and
must cope with none being chosen.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from vlbert.config import MaskingConfig

IGNORE_INDEX = -100  # same value as vlbert.batch.IGNORE_INDEX (kept torch-free here)


def word_index(word_starts: np.ndarray, special: np.ndarray, whole_word: bool = True) -> np.ndarray:
    """Word number of every token, -1 on special tokens.

    With ``whole_word`` a non-special token that does not start a word belongs to
    the word before it (a ``##`` continuation); a continuation with no word
    before it (after truncation, or right after a special token) starts a new
    word. Without ``whole_word`` every non-special token is its own word.
    """
    special = np.asarray(special, dtype=bool)
    regular = ~special
    if whole_word:
        prev_regular = np.concatenate([[False], regular[:-1]])
        starts = regular & (np.asarray(word_starts, dtype=bool) | ~prev_regular)
    else:
        starts = regular
    idx = np.cumsum(starts) - 1
    return np.where(regular, idx, -1)


def _random_ids(n: int, vocab_size: int, excluded: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` ids uniform over ``[0, vocab_size)`` minus the sorted unique ``excluded``.

    Draw in the smaller range and step over each excluded id in turn: an exact
    uniform draw with no rejection loop.
    """
    allowed = vocab_size - len(excluded)
    if allowed <= 0:
        raise ValueError(f"no id left to draw from: vocab_size {vocab_size}, {len(excluded)} excluded")
    r = rng.integers(0, allowed, size=n, dtype=np.int64)
    for e in excluded:  # ascending; at most a handful of special ids
        r += r >= e
    return r


def mask_tokens(
    ids: np.ndarray,
    word_starts: np.ndarray,
    special: np.ndarray,
    vocab_size: int,
    mask_id: int,
    cfg: MaskingConfig,
    rng: np.random.Generator,
    *,
    exclude_ids: Optional[Iterable[int]] = None,
    min_words: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt one token sequence for MLM.

    ids:         int64 [T] token ids
    word_starts: bool  [T] True on the first piece of a word (from a fast
                 tokenizer's ``word_ids()``)
    special:     bool  [T] True on [CLS]/[SEP]/[PAD]...: never chosen
    exclude_ids: ids never drawn as the random replacement (pass the tokenizer's
                 ``all_special_ids``); ``0``, ``mask_id`` and the ids at special
                 positions are always excluded.
    min_words:   when ``mlm_prob > 0`` and the draw chose fewer words, choose
                 more at random (module docstring).

    Words are chosen with p = ``cfg.mlm_prob`` (all pieces of a chosen word go
    together when ``cfg.whole_word``); each chosen piece independently becomes
    [MASK] (``mlm_mask_frac``), a random non-special id (``mlm_random_frac``) or
    stays as it is.

    Returns ``(masked_ids int64 [T], labels int64 [T])``; labels hold the
    original id where chosen and -100 elsewhere.
    """
    ids = np.asarray(ids, dtype=np.int64)
    special = np.asarray(special, dtype=bool)
    if not (ids.ndim == 1 and ids.shape == special.shape == np.shape(word_starts)):
        raise ValueError(
            f"ids, word_starts and special must be 1-D of one length, got {ids.shape}, "
            f"{np.shape(word_starts)}, {special.shape}"
        )
    words = word_index(word_starts, special, cfg.whole_word)
    n_words = int(words.max()) + 1 if words.size else 0
    masked = ids.copy()
    labels = np.full_like(ids, IGNORE_INDEX)
    if n_words == 0 or cfg.mlm_prob <= 0:
        return masked, labels

    chosen_words = rng.random(n_words) < cfg.mlm_prob
    short = min(min_words, n_words) - int(chosen_words.sum())
    if short > 0:
        extra = rng.choice(np.flatnonzero(~chosen_words), size=short, replace=False)
        chosen_words[extra] = True
    chosen = np.zeros(ids.shape, dtype=bool)
    regular = words >= 0
    chosen[regular] = chosen_words[words[regular]]

    labels[chosen] = ids[chosen]
    pos = np.flatnonzero(chosen)
    u = rng.random(len(pos))
    to_mask = pos[u < cfg.mlm_mask_frac]
    to_random = pos[(u >= cfg.mlm_mask_frac) & (u < cfg.mlm_mask_frac + cfg.mlm_random_frac)]
    masked[to_mask] = mask_id
    if len(to_random):
        excluded = {0, int(mask_id), *ids[special].tolist(), *(exclude_ids or ())}
        excluded_arr = np.array(sorted(e for e in excluded if 0 <= e < vocab_size), dtype=np.int64)
        masked[to_random] = _random_ids(len(to_random), vocab_size, excluded_arr, rng)
    return masked, labels


def choose_rois(n_boxes: int, cfg: MaskingConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Choose RoIs for masked-RoI classification.

    Box 0 is the whole image and is never chosen; every other box is chosen with
    p = ``cfg.roi_prob``; of the chosen, a ``cfg.roi_mask_frac`` share is masked
    (pixels zeroed and mask token, done on the device), the rest stay visible.

    Returns ``(roi_masked bool [n], roi_labels_mask bool [n])``;
    ``roi_labels_mask`` is the chosen set (masked or kept), ``roi_masked`` a subset.
    """
    if n_boxes < 0:
        raise ValueError(f"n_boxes must be >= 0, got {n_boxes}")
    chosen = rng.random(n_boxes) < cfg.roi_prob
    masked = chosen & (rng.random(n_boxes) < cfg.roi_mask_frac)
    if n_boxes:
        chosen[0] = masked[0] = False
    return masked, chosen
