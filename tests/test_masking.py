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


# --------------------------------------------------------------------------- contracts found by mutation testing


def test_word_index_of_a_sequence_that_starts_mid_word():
    """A continuation piece at position 0 (a truncated sequence) starts a word of its own, and so
    does every piece without whole-word grouping. Fails if position 0 were taken to follow a
    regular token (it would get no word, -1)."""
    starts = np.array([False, False, True, False])
    special = np.zeros(4, bool)
    assert word_index(starts, special).tolist() == [0, 0, 1, 1]
    assert word_index(starts, special, whole_word=False).tolist() == [0, 1, 2, 3]


def test_random_ids_cover_exactly_the_ids_not_excluded():
    """Vocabulary of 8; [PAD] 0 and [MASK] 4 are always excluded, as are the ids at special
    positions (here 7, at [CLS]) and ``exclude_ids`` (2; 8 and -1 lie outside the vocabulary and are
    ignored): every random replacement is one of 1, 3, 5, 6, each about equally often. Fails if an
    id next to an excluded one were skipped or drawn in its place, if [PAD] or [MASK] could be
    drawn, or if an out-of-range exclusion shrank the draw."""
    cfg = MaskingConfig(mlm_prob=1.0, mlm_mask_frac=0.0, mlm_random_frac=1.0)
    rng = np.random.default_rng(5)
    ids = np.array([7, 1, 1, 1, 1, 1, 1, 1, 1], np.int64)
    starts = np.array([False] + [True] * 8)
    special = np.array([True] + [False] * 8)
    drawn = []
    for _ in range(300):
        masked, labels = mask_tokens(ids, starts, special, 8, MASK, cfg, rng, exclude_ids=(2, 8, -1))
        assert (labels[1:] == 1).all() and labels[0] == IGNORE_INDEX
        drawn += masked[1:].tolist()
    counts = {i: drawn.count(i) for i in set(drawn)}
    assert set(counts) == {1, 3, 5, 6}, counts
    assert all(abs(c / len(drawn) - 0.25) < 0.03 for c in counts.values()), counts  # 2400 draws


def test_nothing_left_to_draw_is_a_clear_error():
    """Every id of a vocabulary of 5 excluded (0, [MASK] 4, specials 1 2 3): the random replacement
    has nothing to draw from. With one id left (vocabulary 6) it is always that id. Fails if the
    check moved by one or its message changed."""
    cfg = MaskingConfig(mlm_prob=1.0, mlm_mask_frac=0.0, mlm_random_frac=1.0)
    ids = np.array([2, 9, 3], np.int64)
    starts, special = np.array([False, True, False]), np.array([True, False, True])
    with pytest.raises(ValueError) as e:
        mask_tokens(ids, starts, special, 5, MASK, cfg, np.random.default_rng(0), exclude_ids=(1,))
    assert str(e.value) == "no id left to draw from: vocab_size 5, 5 excluded"
    masked, _ = mask_tokens(ids, starts, special, 6, MASK, cfg, np.random.default_rng(0), exclude_ids=(1,))
    assert masked.tolist() == [2, 5, 3]


def test_default_guarantee_is_one_word_and_min_words_chooses_that_many():
    """Three words at p = 0.15: by default the Bernoulli draw is topped up to one word, so exactly
    one word is chosen P(none) + P(one) = 0.85^3 + 3 x 0.15 x 0.85^2 = 0.939 of the time; with
    ``min_words=3`` all three always are (drawn without replacement); a one-word caption always has
    its word chosen. Fails if the default were two words, if the top-up could pick a word twice or
    chose every word, or if a one-word sequence were treated as having nothing to choose."""
    cfg = MaskingConfig()
    rng = np.random.default_rng(6)
    ids = np.array([2, 50, 60, 70, 3], np.int64)
    starts = np.array([False, True, True, True, False])
    special = np.array([True, False, False, False, True])
    one = 0
    for _ in range(400):
        _, labels = mask_tokens(ids, starts, special, VOCAB, MASK, cfg, rng)
        one += int((labels != IGNORE_INDEX).sum() == 1)
        _, labels3 = mask_tokens(ids, starts, special, VOCAB, MASK, cfg, rng, min_words=3)
        assert labels3.tolist() == [IGNORE_INDEX, 50, 60, 70, IGNORE_INDEX]
    want = 0.85 ** 3 + 3 * 0.15 * 0.85 ** 2
    assert abs(one / 400 - want) < 0.04, one / 400  # std ~0.012
    # A one-word caption always has its word chosen (all of its pieces).
    for _ in range(20):
        _, labels = mask_tokens(np.array([2, 50, 51, 3]), np.array([False, True, False, False]),
                                np.array([True, False, False, True]), VOCAB, MASK, cfg, rng)
        assert labels.tolist() == [IGNORE_INDEX, 50, 51, IGNORE_INDEX]


def test_nothing_to_choose_draws_nothing():
    """An empty or all-special sequence, or masking switched off, comes back unchanged and leaves the
    generator where it was (a sample's masking must not shift the next one's). Fails if an empty
    sequence were given a word to choose."""
    cfg = MaskingConfig()
    for ids, starts, special, c in [
        (np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, bool), cfg),
        (np.array([2, 3]), np.zeros(2, bool), np.ones(2, bool), cfg),
        (np.array([2, 50, 3]), np.array([False, True, False]), np.array([True, False, True]),
         MaskingConfig(mlm_prob=0.0)),
    ]:
        rng = np.random.default_rng(9)
        masked, labels = mask_tokens(ids, starts, special, VOCAB, MASK, c, rng)
        assert masked.tolist() == list(ids) and labels.tolist() == [IGNORE_INDEX] * len(ids)
        assert rng.random() == np.random.default_rng(9).random()


def test_shape_error_names_the_three_shapes():
    """The message of a length mismatch. Fails if it lost its words."""
    ids, starts, special = np.array([2, 9, 3]), np.array([False, True]), np.array([True, False, True])
    with pytest.raises(ValueError) as e:
        mask_tokens(ids, starts, special, VOCAB, MASK, MaskingConfig(), np.random.default_rng(0))
    assert str(e.value) == "ids, word_starts and special must be 1-D of one length, got (3,), (2,), (3,)"
    with pytest.raises(ValueError) as e:
        mask_tokens(ids[None], starts, special, VOCAB, MASK, MaskingConfig(), np.random.default_rng(0))
    assert str(e.value).endswith("got (1, 3), (2,), (3,)")


def test_negative_box_count_is_an_error():
    """Fails if -1 boxes were accepted (or 0 refused), or the message changed."""
    with pytest.raises(ValueError) as e:
        choose_rois(-1, MaskingConfig(), np.random.default_rng(0))
    assert str(e.value) == "n_boxes must be >= 0, got -1"


def test_ignore_index_is_the_one_the_losses_skip():
    """Labels that are not targets hold -100: torch's cross-entropy default ``ignore_index`` and
    ``vlbert.batch.IGNORE_INDEX`` (imported here: it needs torch). Fails if the value drifted."""
    import torch.nn.functional as F

    from vlbert.batch import IGNORE_INDEX as BATCH_IGNORE

    assert IGNORE_INDEX == BATCH_IGNORE == -100
    import inspect

    assert inspect.signature(F.cross_entropy).parameters["ignore_index"].default == IGNORE_INDEX
