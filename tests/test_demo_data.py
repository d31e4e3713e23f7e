"""The demo data: files, shard layout, boxes that match the drawn shapes, captions, tokenizer."""

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from vlbert.demo.make_data import COLOURS, SHAPES, vocabulary
from vlbert.config import CaptionDataConfig, MaskingConfig
from vlbert.data.captions import collate_captions, decode_caption_sample

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    # as scripts/demo.sh runs it: python -m from the repository root
    cmd = [sys.executable, "-m", "vlbert.demo.make_data", "--out", str(out), "--train-shards", "2",
           "--rows-per-shard", "60", "--val", "20", "--seed", "3", "--size", "96", "--book-files", "1",
           "--docs-per-file", "20", "--wiki-docs", "10"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def _samples(demo, split="train"):
    manifest = json.loads((demo / "manifest.json").read_text())
    urls = [str(demo / name) for name in manifest["captions"][split]]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_files_and_manifest(demo):
    m = json.loads((demo / "manifest.json").read_text())
    assert m["colour_words"] == list(COLOURS) and m["shape_words"] == list(SHAPES)
    assert m["n_classes"] == len(m["class_names"]) == 15 and "red circle" in m["class_names"]
    assert m["max_objects"] == 2
    for name in m["captions"]["train"] + m["captions"]["val"] + m["text"]["books"] + m["text"]["wiki"]:
        assert (demo / name).is_file(), name
    assert m["captions"]["train"] == ["captions/train-00000.tar", "captions/train-00001.tar"]
    assert (demo / "tokenizer/tokenizer.json").is_file() and (demo / "README.txt").is_file()
    assert len(_samples(demo)) == 120 and len(_samples(demo, "val")) == 20


def test_same_seed_same_bytes(demo, tmp_path):
    from vlbert.demo.make_data import make_demo_data

    make_demo_data(tmp_path, train_shards=2, per_shard=60, val=20, seed=3, size=96, book_files=1,
                   docs_per_file=20, wiki_docs=10)
    for name in ("captions/train-00001.tar", "captions/val-00000.tar", "text/books-00000.jsonl"):
        assert (tmp_path / name).read_bytes() == (demo / name).read_bytes()


def _nearest_colour(rgb):
    return min(COLOURS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, COLOURS[c])))


def test_boxes_match_shapes_and_captions_name_colours(demo):
    m = json.loads((demo / "manifest.json").read_text())
    colour_counts, n_objects = Counter(), Counter()
    for s in _samples(demo):
        assert set(s) >= {"__key__", "jpg", "txt", "json", "regions.npy"}
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        assert (meta["width"], meta["height"]) == (img.shape[1], img.shape[0]) == (96, 96)
        assert meta["box_scores"] == [1.0] * len(meta["boxes"]) and 1 <= len(meta["boxes"]) <= 2
        n_objects[len(meta["boxes"])] += 1
        regions = np.load(io.BytesIO(s["regions.npy"]))
        assert regions.dtype == np.float16 and regions.shape == (len(meta["boxes"]), 15)
        assert (regions.sum(1) == 1).all()
        shapes = [label.split()[1] for label in meta["labels"]]
        assert len(set(shapes)) == len(shapes), meta["labels"]  # a shape word names one box
        named = [w for w in caption.split() if w in COLOURS]
        assert named == [label.split()[0] for label in meta["labels"]], caption  # in box order
        for (x1, y1, x2, y2), label, row in zip(meta["boxes"], meta["labels"], regions):
            colour, shape = label.split()
            assert m["class_names"][int(row.argmax())] == label
            assert f"{colour} {shape}" in caption
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
            assert _nearest_colour(img[cy, cx]) == colour
            # the box is tight: the row and column through the centre reach the shape at its edges
            inside = np.array([_nearest_colour(p) == colour for p in img[cy, x1:x2]])
            assert inside.mean() > 0.4
            ring = np.concatenate([img[max(y1 - 2, 0), x1:x2], img[min(y2 + 1, 95), x1:x2]])
            # grey outside (JPEG tints the pixel next to an edge a little: up to a channel spread of ~16)
            assert all(_nearest_colour(p) != colour or p.std() < 25 for p in ring)
            colour_counts[colour] += 1
    # colours drawn uniformly: every colour appears, none dominates (~240 shapes)
    assert set(colour_counts) == set(COLOURS)
    assert max(colour_counts.values()) < 2.2 * min(colour_counts.values()), colour_counts
    assert set(n_objects) == {1, 2}  # --max-objects 2, the default


def test_max_objects():
    from vlbert.demo.make_data import make_scene

    rng = np.random.default_rng(0)
    counts = Counter(len(make_scene(rng, 64, max_objects=3)[1]) for _ in range(300))
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60, counts
    assert {len(make_scene(rng, 64, max_objects=1)[1]) for _ in range(20)} == {1}
    for bad in (0, 4):
        with pytest.raises(ValueError, match="max_objects"):
            make_scene(rng, 64, max_objects=bad)


def test_relations_follow_positions(demo):
    for s in _samples(demo, "val"):
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        if len(meta["boxes"]) < 2:
            continue
        (a, b) = meta["boxes"][:2]
        dx = (a[0] + a[2] - b[0] - b[2]) / 2
        dy = (a[1] + a[3] - b[1] - b[3]) / 2
        if abs(dx) >= abs(dy):
            assert ("left of" if dx < 0 else "right of") in caption
        else:
            assert ("above" if dy < 0 else "below") in caption


def test_tokenizer_round_trips_every_word(demo):
    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    assert tok.is_fast and len(tok) == len(vocabulary())
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [0, 1, 2, 3, 4]
    for word in vocabulary()[5:]:
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids) == [word]
    assert tok("A RED Circle").input_ids == tok("a red circle").input_ids  # lower case
    texts = [s["txt"].decode() for s in _samples(demo)]
    texts += [json.loads(line)["text"] for line in (demo / "text/books-00000.jsonl").read_text().splitlines()]
    texts += pq.read_table(demo / "text/wiki-00000.parquet").column("text").to_pylist()
    assert len(texts) == 120 + 20 + 10
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids, text
        assert " ".join(tok.convert_ids_to_tokens(ids)) == text  # one token per word


def test_text_documents_are_long_enough(demo):
    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    docs = pq.read_table(demo / "text/wiki-00000.parquet").column("text").to_pylist()
    lengths = [len(tok(d).input_ids) for d in docs]
    assert np.median(lengths) > 64  # a text segment is 64 tokens


def test_demo_shards_decode_and_collate(demo):
    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    cfg = CaptionDataConfig(short_side=96, max_long_side=96, flip_prob=0.5, min_boxes=1)
    rng = np.random.default_rng(0)
    samples = [decode_caption_sample({k: v for k, v in s.items() if not k.startswith("__")}, s["__key__"], cfg,
                                     MaskingConfig(), tok, rng) for s in _samples(demo, "val")]
    for s in samples:
        assert s.roi_targets.shape == (len(s.boxes), 15) and (s.roi_targets[0] == 0).all()
        assert s.image.shape == (3, 96, 96)
    b = collate_captions(samples)
    # box slots: the whole image and at most 2 shapes
    assert b.images.shape == (20, 3, 96, 96) and b.roi_targets.shape[2] == 15 and b.boxes.shape[1] == 3
