"""MLM and RoI masking: rates, whole words, specials, box 0."""

import numpy as np
import pytest

from vlbert.config import MaskingConfig
from vlbert.data.masking import IGNORE_INDEX, choose_rois, mask_tokens, word_index

VOCAB = 1000
MASK = 4
SPECIAL_IDS = (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]


def _sequence(rng, n_words=60, max_pieces=3):
    """[CLS] w1 w2 ... [SEP] [PAD] [PAD] with words of 1..max_pieces pieces."""
    ids, starts, special = [2], [False], [True]
    for _ in range(n_words):
        k = int(rng.integers(1, max_pieces + 1))
        ids += rng.integers(10, VOCAB, size=k).tolist()
        starts += [True] + [False] * (k - 1)
        special += [False] * k
    ids += [3, 0, 0]
    starts += [False] * 3
    special += [True] * 3
    return np.array(ids, np.int64), np.array(starts), np.array(special)


def test_word_index_groups_continuations_and_skips_specials():
    starts = np.array([False, True, False, False, True, False, False])
    special = np.array([True, False, False, False, False, True, False])
    # the last token is a continuation right after a special: it starts its own word
    assert word_index(starts, special).tolist() == [-1, 0, 0, 0, 1, -1, 2]
    assert word_index(starts, special, whole_word=False).tolist() == [-1, 0, 1, 2, 3, -1, 4]


def test_rates_whole_words_and_specials():
    cfg = MaskingConfig()
    rng = np.random.default_rng(0)
    n_words = n_chosen_words = 0
    counts = {"mask": 0, "random": 0, "kept": 0}
    for _ in range(400):
        ids, starts, special = _sequence(rng)
        masked, labels = mask_tokens(ids, starts, special, VOCAB, MASK, cfg, rng, exclude_ids=SPECIAL_IDS)
        chosen = labels != IGNORE_INDEX
        assert not chosen[special].any(), "a special token was chosen"
        assert (masked[special] == ids[special]).all()
        assert (labels[chosen] == ids[chosen]).all()
        assert (masked[~chosen] == ids[~chosen]).all()
        words = word_index(starts, special)
        for w in range(words.max() + 1):  # whole words: all pieces or none
            assert len(set(chosen[words == w].tolist())) == 1
        n_words += words.max() + 1
        n_chosen_words += len(set(words[chosen].tolist()))
        c = chosen
        counts["mask"] += int((masked[c] == MASK).sum())
        counts["kept"] += int((masked[c] == ids[c]).sum())
        counts["random"] += int(((masked[c] != MASK) & (masked[c] != ids[c])).sum())
        rand = masked[c][(masked[c] != MASK) & (masked[c] != ids[c])]
        assert not np.isin(rand, SPECIAL_IDS).any(), "random replacement drew a special id"
    rate = n_chosen_words / n_words  # 24000 words: std of the rate ~0.0023
    assert abs(rate - 0.15) < 0.012, rate
    total = sum(counts.values())
    # a random draw equal to the original counts as kept: 1/1000 of the 10%, negligible
    assert abs(counts["mask"] / total - 0.8) < 0.02, counts
    assert abs(counts["random"] / total - 0.1) < 0.015, counts
    assert abs(counts["kept"] / total - 0.1) < 0.015, counts


def test_token_level_when_not_whole_word():
    cfg = MaskingConfig(whole_word=False, mlm_prob=0.5)
    rng = np.random.default_rng(1)
    split_words = 0
    for _ in range(50):
        ids, starts, special = _sequence(rng, max_pieces=4)
        _, labels = mask_tokens(ids, starts, special, VOCAB, MASK, cfg, rng)
        chosen = labels != IGNORE_INDEX
        words = word_index(starts, special)
        split_words += sum(len(set(chosen[words == w].tolist())) == 2 for w in range(words.max() + 1))
    assert split_words > 100  # pieces of one word are chosen independently


def test_at_least_one_word_and_opt_out():
    cfg = MaskingConfig()
    rng = np.random.default_rng(2)
    ids = np.array([2, 50, 60, 70, 3], np.int64)  # [CLS] w w w [SEP]
    starts = np.array([False, True, True, True, False])
    special = np.array([True, False, False, False, True])
    n_none = 0
    for _ in range(300):
        _, labels = mask_tokens(ids, starts, special, VOCAB, MASK, cfg, rng)
        assert (labels != IGNORE_INDEX).sum() >= 1
        _, labels0 = mask_tokens(ids, starts, special, VOCAB, MASK, cfg, rng, min_words=0)
        n_none += int((labels0 == IGNORE_INDEX).all())
    assert 0.5 < n_none / 300 < 0.72  # 0.85**3 = 0.61 without the guarantee
    # nothing to choose: only specials; and masking switched off
    _, labels = mask_tokens(ids[[0, 4]], starts[[0, 4]], special[[0, 4]], VOCAB, MASK, cfg, rng)
    assert (labels == IGNORE_INDEX).all()
    _, labels = mask_tokens(ids, starts, special, VOCAB, MASK, MaskingConfig(mlm_prob=0.0), rng)
    assert (labels == IGNORE_INDEX).all()


def test_reproducible_and_shape_checked():
    ids, starts, special = _sequence(np.random.default_rng(3))
    a = mask_tokens(ids, starts, special, VOCAB, MASK, MaskingConfig(), np.random.default_rng(7))
    b = mask_tokens(ids, starts, special, VOCAB, MASK, MaskingConfig(), np.random.default_rng(7))
    assert all((x == y).all() for x, y in zip(a, b))
    assert a[0].dtype == a[1].dtype == np.int64
    with pytest.raises(ValueError):
        mask_tokens(ids, starts[:-1], special, VOCAB, MASK, MaskingConfig(), np.random.default_rng(0))


def test_choose_rois_rates_and_box0():
    cfg = MaskingConfig()
    rng = np.random.default_rng(4)
    chosen_n = masked_n = 0
    for _ in range(2000):
        masked, chosen = choose_rois(11, cfg, rng)
        assert masked.dtype == chosen.dtype == bool and masked.shape == (11,)
        assert not chosen[0] and not masked[0]
        assert not (masked & ~chosen).any()
        chosen_n += int(chosen.sum())
        masked_n += int(masked.sum())
    assert abs(chosen_n / 20000 - 0.15) < 0.01
    assert abs(masked_n / chosen_n - 0.9) < 0.02
    m, c = choose_rois(1, MaskingConfig(roi_prob=1.0), rng)
    assert not c.any() and not m.any()
    m, c = choose_rois(0, cfg, rng)
    assert m.shape == c.shape == (0,)
    m, c = choose_rois(5, MaskingConfig(roi_prob=1.0, roi_mask_frac=1.0), rng)
    assert c.tolist() == m.tolist() == [False, True, True, True, True]
