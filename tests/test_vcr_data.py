"""VCR data and loss pieces, each against a hand computation or a second implementation:
object-reference tokens (names, categories, tags), polygon masks, truncation, the 4-choice
loss, bad input, and the masked RoI features. The metrics and the leaderboard CSV:
tests/test_vcr_metric.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlbert.data.captions import BadSample
from vlbert.tasks.vcr.data import (Item, MemberIndex, VCRDataset, load_regions, load_vcr_jsonl, rasterize_polygons,
                                   truncate_q2a, truncate_qa2r)
from vlbert.tasks.vcr.model import choice_loss
from vlbert.tasks.vcr.tokens import TaggedText, encode_sentence, object_words

pytestmark = [pytest.mark.timeout(120)]


def _tokenizer(words):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    try:
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    except TypeError:  # transformers 4.x
        import tempfile

        path = Path(tempfile.mkdtemp()) / "vocab.txt"
        path.write_text("\n".join(vocab) + "\n")
        return BertTokenizerFast(vocab_file=str(path), do_lower_case=True)


# --------------------------------------------------------------------------- tokens


def test_object_references_become_names_and_categories_tagged_with_their_region():
    """Persons -> names in turn, others -> category; every WordPiece of a reference is tagged
    index + 1, plain words and the joining "and" 0. Fails if the tag were the index itself, if
    "and" took an object's tag, or if a second WordPiece of a name lost its tag."""
    tok = _tokenizer(["why", "is", "and", "near", "?", "casey", "ri", "##ley", "dog", "quinn"])
    names = object_words(["person", "dog", "person"], offset=0)
    assert names == ["Casey", "dog", "Riley"]
    text = encode_sentence(["why", "is", [0, 2], "near", [1], "?"], names, tok)
    assert tok.convert_ids_to_tokens(text.ids.tolist()) == ["why", "is", "casey", "and", "ri", "##ley", "near",
                                                            "dog", "?"]
    assert text.tags.tolist() == [0, 0, 1, 0, 3, 3, 0, 2, 0]
    # The offset picks where the fixed list starts and wraps around its 13 names.
    assert object_words(["person", "person", "car"], offset=12) == ["Quinn", "Casey", "car"]


def test_truncation_follows_the_reference_rules():
    """Hand-worked cases of the reference's loops (vcr/data/datasets/vcr.py). Fails if Q->A cut the
    question first when the answer is longer, or QA->R cut the answer before the question."""
    def t(n):
        return TaggedText(np.arange(n), np.zeros(n, np.int64))

    assert [len(x) for x in truncate_q2a(t(10), t(70), 64)] == [10, 54]
    assert [len(x) for x in truncate_q2a(t(40), t(40), 64)] == [32, 32]
    assert [len(x) for x in truncate_qa2r(t(20), t(10), t(50), 64)] == [20, 10, 34]
    assert [len(x) for x in truncate_qa2r(t(30), t(30), t(20), 64)] == [14, 30, 20]
    assert [len(x) for x in truncate_qa2r(t(1), t(70), t(10), 64)] == [1, 53, 10]


# --------------------------------------------------------------------------- masks


def _inside_convex(px, py, poly):
    """Point strictly inside a convex polygon: the same side of every edge (cross products)."""
    signs = []
    for (x1, y1), (x2, y2) in zip(poly, poly[1:] + poly[:1]):
        signs.append((x2 - x1) * (py - y1) - (y2 - y1) * (px - x1))
    return all(s > 0 for s in signs) or all(s < 0 for s in signs)


def test_polygon_mask_matches_an_independent_point_in_polygon_test():
    """A triangle and a square in a 28-pixel box on a 14x14 grid: a cell is 1 exactly when its
    centre is inside either (half-plane test written here). Fails if cells were sampled at their
    corners, if rows and columns were swapped, or if a second polygon replaced the first."""
    box = [10.0, 20.0, 38.0, 48.0, 0.9]
    tri = [[11.3, 20.7], [36.1, 27.4], [18.2, 46.9]]
    square = [[30.3, 38.3], [37.7, 38.3], [37.7, 47.7], [30.3, 47.7]]
    mask = rasterize_polygons(box, [tri, square], 14)
    expected = np.zeros((14, 14), np.float32)
    for i in range(14):
        for j in range(14):
            x, y = 10.0 + 2 * j + 1, 20.0 + 2 * i + 1
            expected[i, j] = _inside_convex(x, y, [tuple(p) for p in tri]) or _inside_convex(
                x, y, [tuple(p) for p in square])
    assert 20 < expected.sum() < 150  # a real test: partly covered
    np.testing.assert_array_equal(mask, expected)


def test_empty_polygon_is_a_counted_reason():
    """Fails if a detection without a usable polygon gave an all-zero mask silently."""
    for polys in ([], [[]], [[[1, 2], [3, 4]]], [[[0, 0], [1, float("nan")], [2, 2]]]):
        with pytest.raises(BadSample) as e:
            rasterize_polygons([0, 0, 10, 10], polys, 14)
        assert e.value.reason == "bad_polygon"


def test_flip_mirrors_boxes_and_masks():
    """Fails if a flipped image kept its masks or boxes unmirrored."""
    import io

    from PIL import Image

    from vlbert.config import CaptionDataConfig

    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (100, 100, 100)).save(buf, format="PNG")
    meta = {"boxes": [[2, 3, 12, 17, 1.0]], "segms": [[[[2, 3], [12, 3], [2, 17]]]]}
    cfg = CaptionDataConfig(short_side=20, max_long_side=40)
    _, boxes, masks, _ = load_regions(buf.getvalue(), meta, 1, cfg, 14, flip=False)
    _, fboxes, fmasks, size = load_regions(buf.getvalue(), meta, 1, cfg, 14, flip=True)
    assert size == (20, 40)
    np.testing.assert_allclose(fboxes[1], [40 - 12, 3, 40 - 2, 17])
    np.testing.assert_array_equal(fboxes[0], [0, 0, 40, 20])
    np.testing.assert_array_equal(fmasks[1], masks[1][:, ::-1])
    assert masks[1][0, 0] == 1 and masks[1][13, 13] == 0  # the right angle is at the top left: bottom right empty


# --------------------------------------------------------------------------- loss


def test_choice_loss_is_mean_bce_over_the_four_logits():
    """Hand computation: -log sigmoid(x) for the right choice, -log(1 - sigmoid(x)) for the others,
    averaged over the 8 logits. Fails if the loss were a softmax cross-entropy or a sum."""
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([3, 0])
    terms = [math.log1p(math.exp(1.0)), math.log1p(math.exp(-2.0)), math.log1p(math.exp(0.5)),
             math.log1p(math.exp(-3.0)), math.log(2), math.log(2), math.log(2), math.log(2)]
    assert choice_loss(logits, labels).item() == pytest.approx(sum(terms) / 8, rel=1e-6)


# --------------------------------------------------------------------------- bad input


def test_bad_records_and_files_are_counted_not_fatal(demo_data, tmp_path):
    """Label out of range and an object index past ``objects`` are left out when the file is read;
    a missing metadata file, a detection without a polygon and an object missing from the
    metadata are counted skips of the batch, whose other questions still come through. Fails if
    any of them raised out of get_batch or was miscounted."""
    from transformers import AutoTokenizer

    from vlbert.config import CaptionDataConfig
    from vlbert.demo.make_vcr import CATEGORIES, make_demo_vcr

    root = tmp_path / "vcr"
    make_demo_vcr(root, train=6, val=1, test=1, seed=3)
    lines = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    lines[0]["answer_label"] = 7
    lines[1]["rationale_choices"][2][0] = [9]
    meta_dir = root / "metadata"
    (meta_dir / lines[2]["metadata_fn"]).unlink()
    m3 = json.loads((meta_dir / lines[3]["metadata_fn"]).read_text())
    m3["segms"][0] = []
    (meta_dir / lines[3]["metadata_fn"]).write_text(json.dumps(m3))
    m4 = json.loads((meta_dir / lines[4]["metadata_fn"]).read_text())
    m4["boxes"], m4["segms"] = m4["boxes"][:1], m4["segms"][:1]
    (meta_dir / lines[4]["metadata_fn"]).write_text(json.dumps(m4))
    (root / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    categories = {c: i for i, c in enumerate(CATEGORIES)}
    examples, skipped = load_vcr_jsonl(str(root / "train.jsonl"), categories, with_labels=True)
    assert skipped == {"label_out_of_range": 1, "object_out_of_range": 1}
    assert [e.annot_id for e in examples] == ["train-2", "train-3", "train-4", "train-5"]
    tok = AutoTokenizer.from_pretrained(demo_data / "tokenizer")
    ds = VCRDataset(examples, [Item(i, "q2a") for i in range(4)], MemberIndex([str(root / "images/train-*.tar")]),
                    str(meta_dir), categories, CaptionDataConfig(short_side=64, max_long_side=64), tok, 32, 14,
                    train=False)
    batch, skips = ds.get_batch([(i, -1) for i in range(4)])
    assert skips == {"missing_metadata": 1, "bad_polygon": 1, "object_not_in_metadata": 1}
    assert batch is not None and len(batch) == 1 and batch.items.tolist() == [3]
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_vcr_jsonl(str(root / "nothere.jsonl"), categories, True)


# --------------------------------------------------------------------------- model pieces


def test_region_masks_multiply_the_res5_map_before_the_pool():
    """All-ones masks give the plain features; a mask keeping the left half gives the mean over
    the whole map of res5 x (the mask pooled 2x2 to res5's 7x7), computed here by reshaping.
    Fails if the mask were applied after the pool, or resized by nearest neighbour."""
    from vlbert.config import DetectorConfig
    from vlbert.model.detector import RegionFeatureExtractor, apply_region_masks

    torch.manual_seed(0)
    det = RegionFeatureExtractor(DetectorConfig(depth=18, num_classes=5, trainable=False)).eval()
    images = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    boxes = torch.tensor([[[0.0, 0.0, 64.0, 64.0], [8.0, 4.0, 40.0, 50.0]]])
    box_mask = torch.ones(1, 2, dtype=torch.bool)
    m = torch.zeros(1, 2, 14, 14)
    m[..., :, :7] = 1.0
    m[0, 1, 3, 8] = 1.0  # a lone cell: pooled to 0.25 of its 2x2 block
    with torch.no_grad():
        plain = det(images, boxes, box_mask)
        ones = det(images, boxes, box_mask, region_masks=torch.ones(1, 2, 14, 14))
        masked = det(images, boxes, box_mask, region_masks=m)
        res5 = det._res5(det.res4(det.normalize(images)), torch.tensor([[0.0, 0, 0, 64, 64], [0.0, 8, 4, 40, 50]]))
    torch.testing.assert_close(ones, plain)
    pooled = m[0].reshape(2, 7, 2, 7, 2).mean(dim=(2, 4))  # 2x2 blocks by reshaping
    expected = (res5 * pooled[:, None]).mean(dim=(2, 3))
    torch.testing.assert_close(masked[0], expected)
    assert res5.shape[-1] == 7
    torch.testing.assert_close(apply_region_masks(res5, m[0]), res5 * pooled[:, None])


def test_text_regions_give_a_word_its_object_feature():
    """With text_regions, the tagged word's embedding changes and only it; a tag of 0 everywhere
    equals the default (whole image). Fails if every word took the tagged region's feature."""
    from transformers import BertConfig

    from vlbert.model.embeddings import VisualInputs, VLBertEmbeddings

    torch.manual_seed(0)
    emb = VLBertEmbeddings(BertConfig(vocab_size=20, hidden_size=8, max_position_embeddings=16,
                                      hidden_dropout_prob=0.0), appearance_dim=6, geometry_freqs=2,
                           visual_dropout=0.0).eval()
    torch.nn.init.ones_(emb.visual_layer_norm.weight)  # starts at 0: the visual part would vanish
    ids, am = torch.tensor([[2, 5, 6, 3]]), torch.ones(1, 4, dtype=torch.bool)
    visual = dict(appearance=torch.randn(1, 3, 6), boxes=torch.tensor([[[0, 0, 10, 10], [1, 1, 5, 5], [4, 4, 9, 9.]]]),
                  image_sizes=torch.tensor([[10, 10]]), box_mask=torch.ones(1, 3, dtype=torch.bool))
    base, _ = emb(ids, am, VisualInputs(**visual))
    zero, _ = emb(ids, am, VisualInputs(**visual, text_regions=torch.zeros(1, 4, dtype=torch.long)))
    tagged, layout = emb(ids, am, VisualInputs(**visual, text_regions=torch.tensor([[0, 2, 0, 0]])))
    torch.testing.assert_close(zero, base)
    changed = (tagged - base).abs().sum(-1)[0] > 1e-6
    assert changed.tolist() == [s == int(layout.text_index[0, 1]) for s in range(changed.shape[0])]
