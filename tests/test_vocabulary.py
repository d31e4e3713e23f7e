"""The tokenizer against the model it feeds (vlbert/data/vocabulary.py): a tokenizer with more
ids than the model has embeddings, one that maps tokens to other ids than the checkpoint's, and
one that differs from the pretraining run's are refused before the first step, naming the
setting; the same tokenizer passes. Fails if any of the three checks is removed (each case below
was run against its check deleted) or if the fingerprint depends on the order of the vocabulary."""

from __future__ import annotations

import json

import pytest

from vlbert.config import ConfigError
from vlbert.data.vocabulary import check_vocabulary, checkpoint_tokenizer, vocabulary_fingerprint


class _Vocab:
    """A stand-in tokenizer: only what the checks read (``get_vocab``, ``len``)."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = dict(vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


def test_fingerprint_is_the_sha256_of_the_id_ordered_pairs():
    """The fingerprint written into model.json: sha256 of the JSON list of [token, id] pairs in id
    order, non-ASCII tokens as UTF-8 (hashed here from the hand-written JSON text). Fails if the
    order, the pair layout or the escaping of "é" changed (an export's recorded fingerprint would
    no longer match), or if two tokens on one id were left in the map's order."""
    import hashlib

    tok = _Vocab({"b": 1, "é": 2, "a": 0})
    text = '[["a", 0], ["b", 1], ["é", 2]]'
    assert vocabulary_fingerprint(tok) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    # Two tokens on one id (an alias) are ordered by the token, whatever the map's order.
    alias = hashlib.sha256('[["x", 0], ["y", 0]]'.encode()).hexdigest()
    assert vocabulary_fingerprint(_Vocab({"y": 0, "x": 0})) == alias
    assert vocabulary_fingerprint(_Vocab({"x": 0, "y": 0})) == alias


def test_every_message_in_full():
    """The three errors word for word: too many ids; other ids than the checkpoint (the first
    three differing tokens in the checkpoint's id order, then the sizes); a tokenizer with extra
    tokens only (no token shown); another fingerprint. Fails if a word, the number of tokens shown
    or their order changed."""
    base = {f"w{i}": i for i in range(6)}
    with pytest.raises(ConfigError) as e:
        check_vocabulary(_Vocab(base), 5, "data.tokenizer")
    assert str(e.value) == ("data.tokenizer: the tokenizer has 6 tokens but the model only 5 word embeddings: ids "
                            "past the end would index nothing (a tokenizer of another model?)")
    shifted = {f"w{i}": (i + 1) % 6 for i in range(6)}  # all 6 tokens on other ids
    with pytest.raises(ConfigError) as e:
        check_vocabulary(_Vocab(shifted), 6, "model.bert", reference=_Vocab(base))
    assert str(e.value) == ("model.bert: the tokenizer maps tokens to other ids than the model's checkpoint (6 of 6 "
                            "differ: 'w0': 0 vs 1, 'w1': 1 vs 2, 'w2': 2 vs 3; 6 vs 6 tokens): the model would read "
                            "wrong words")
    with pytest.raises(ConfigError) as e:
        check_vocabulary(_Vocab({**base, "extra": 6}), 7, "model.bert", reference=_Vocab(base))
    assert str(e.value) == ("model.bert: the tokenizer maps tokens to other ids than the model's checkpoint (0 of 6 "
                            "differ; 7 vs 6 tokens): the model would read wrong words")
    with pytest.raises(ConfigError) as e:
        check_vocabulary(_Vocab(base), 6, "data.tokenizer", expected_fingerprint="0" * 64)
    assert str(e.value) == ("data.tokenizer: the tokenizer is not the one the pretrained model was trained with "
                            "(its vocabulary fingerprint differs from model.json's tokenizer_vocab_sha256)")
    check_vocabulary(_Vocab(base), 6, "data.tokenizer", reference=_Vocab(base),
                     expected_fingerprint=vocabulary_fingerprint(_Vocab(dict(reversed(list(base.items()))))))


# --------------------------------------------------------------------------- real tokenizers
# (transformers is imported where needed, so that the stand-in tests above run without it)


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_data / "tokenizer"))


def with_vocab(tokenizer, tmp_path, tokens: list[str], name: str):
    """A copy of ``tokenizer`` whose WordPiece vocabulary is ``tokens`` (id = position)."""
    folder = tmp_path / name
    tokenizer.save_pretrained(str(folder))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {t: i for i, t in enumerate(tokens)}
    spec["added_tokens"] = [dict(a, id=tokens.index(a["content"])) for a in spec["added_tokens"]
                            if a["content"] in tokens]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    for extra in ("vocab.txt",):
        (folder / extra).unlink(missing_ok=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def tokens_of(tok) -> list[str]:
    return [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]


def test_same_tokenizer_passes(tokenizer):
    check_vocabulary(tokenizer, len(tokenizer), "data.tokenizer", reference=tokenizer,
                     expected_fingerprint=vocabulary_fingerprint(tokenizer))
    check_vocabulary(tokenizer, len(tokenizer) + 8, "data.tokenizer")  # padded embedding rows are fine


def test_more_ids_than_embeddings(tokenizer):
    with pytest.raises(ConfigError, match=rf"data.tokenizer: the tokenizer has {len(tokenizer)} tokens but the "
                                          rf"model only {len(tokenizer) - 1} word embeddings"):
        check_vocabulary(tokenizer, len(tokenizer) - 1, "data.tokenizer")


def test_other_ids_than_the_checkpoint(tokenizer, tmp_path):
    tokens = tokens_of(tokenizer)
    swapped = tokens[:]
    i, j = len(tokens) - 2, len(tokens) - 1  # two ordinary words trade places: same size, wrong ids
    swapped[i], swapped[j] = swapped[j], swapped[i]
    other = with_vocab(tokenizer, tmp_path, swapped, "swapped")
    assert len(other) == len(tokenizer)
    with pytest.raises(ConfigError, match=r"maps tokens to other ids .* \(2 of \d+ differ"):
        check_vocabulary(other, len(tokenizer), "data.tokenizer", reference=tokenizer)
    # A tokenizer that is a prefix of the checkpoint's (fewer tokens, same ids) is still another one.
    shorter = with_vocab(tokenizer, tmp_path, tokens[:-1], "shorter")
    with pytest.raises(ConfigError, match="maps tokens to other ids"):
        check_vocabulary(shorter, len(tokenizer), "data.tokenizer", reference=tokenizer)


def test_fingerprint_of_the_pretraining_run(tokenizer, tmp_path):
    same = with_vocab(tokenizer, tmp_path, tokens_of(tokenizer), "same")
    assert vocabulary_fingerprint(same) == vocabulary_fingerprint(tokenizer)  # built anew: same map
    tokens = tokens_of(tokenizer)
    tokens[-1], tokens[-2] = tokens[-2], tokens[-1]
    other = with_vocab(tokenizer, tmp_path, tokens, "other")
    assert vocabulary_fingerprint(other) != vocabulary_fingerprint(tokenizer)
    with pytest.raises(ConfigError, match="tokenizer: the tokenizer is not the one the pretrained model"):
        check_vocabulary(other, len(tokenizer), "tokenizer", expected_fingerprint=vocabulary_fingerprint(tokenizer))


def test_checkpoint_tokenizer_only_when_the_run_reads_another(tokenizer, demo_data, tmp_path):
    folder = str(demo_data / "tokenizer")
    assert checkpoint_tokenizer("", folder) is None  # random init: no checkpoint
    assert checkpoint_tokenizer(folder, "") is None and checkpoint_tokenizer(folder, folder) is None
    assert checkpoint_tokenizer(str(tmp_path), folder) is None  # a folder without a tokenizer
    ref = checkpoint_tokenizer(folder, "another")
    assert ref is not None and ref.get_vocab() == tokenizer.get_vocab()
