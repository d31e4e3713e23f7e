"""Caption samples, rule by rule: every error message in full, the caps and thresholds at their
exact bounds, box selection in each direction, the joint token/RoI budget, high-depth and float
images, stored features instead of an image (decode and collate), the region targets' checks and
the reduced-scale JPEG decode. Helpers and the demo tokenizer come from ``test_captions``."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from test_captions import CFG, MASK, _decode, _files, _image_bytes, _px, _sample, tok  # noqa: F401 (tok: fixture)
from vlbert.batch import IGNORE_INDEX
from vlbert.config import CaptionDataConfig
from vlbert.data import captions
from vlbert.data.captions import (
    BadSample, CaptionSample, _decode_image, _is_number, _to_rgb, collate_captions, decode_caption_sample,
    select_boxes, target_size,
)
from vlbert.data.region_features import FEATURES_EXT, encode_npy


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _reason_and_text(files, tok, **kw):
    with pytest.raises(BadSample) as e:
        _decode(files, tok, **kw)
    return e.value.reason, str(e.value)


def test_bad_sample_messages_in_full(tok):
    """Every message the decoder gives, word for word (the reason, then the detail after ": ").
    Fails if any message's text changes (e.g. "XX" put around it), if ``BadSample`` keeps no
    detail or joins it differently, or if an error reason's word changes."""
    assert str(BadSample("empty_caption")) == "empty_caption" and BadSample("empty_caption").detail == ""
    err = BadSample("bad_json", "why")
    assert (str(err), err.reason, err.detail) == ("bad_json: why", "bad_json", "why")

    files = _files()
    del files["jpg"]
    assert _reason_and_text(files, tok) == ("missing_image", "missing_image: none of jpg, jpeg, png, webp in ['txt']")
    small = CaptionDataConfig(**{**CFG.__dict__, "max_image_pixels": 200 * 100 - 1})
    assert _reason_and_text(_files(), tok, cfg=small) == (
        "image_too_large", "image_too_large: 200x100 pixels, over data.captions.max_image_pixels (19999)")
    reason, text = _reason_and_text({**_files(), "jpg": b"not an image"}, tok)
    assert reason == "corrupt_image" and text.startswith("corrupt_image: UnidentifiedImageError: cannot identify")
    short = CaptionDataConfig(**{**CFG.__dict__, "max_caption_bytes": 9})
    assert _reason_and_text(_files(caption=b"ten bytes!"), tok, cfg=short) == (
        "caption_too_large", "caption_too_large: 10 bytes, over data.captions.max_caption_bytes (9)")
    reason, text = _reason_and_text(_files(caption=b"\xff caption"), tok)
    assert reason == "bad_caption" and text.startswith("bad_caption: not UTF-8: 'utf-8' codec can't decode byte 0xff")
    assert _reason_and_text(_files(caption=b" \t\n "), tok) == ("empty_caption", "empty_caption")
    # U+200B is not whitespace to str.split(), and BERT's normaliser drops it: no word is left.
    assert _reason_and_text(_files(caption="\u200b".encode()), tok) == (
        "empty_caption", "empty_caption: no tokens besides [CLS] and [SEP]")

    def meta(raw: bytes):
        return _reason_and_text({**_files(), "json": raw}, tok)

    reason, text = meta(b"{not json")
    assert reason == "bad_json" and text.startswith("bad_json: not valid JSON: Expecting property name")
    assert meta(b"[1, 2]") == ("bad_json", "bad_json: expected an object, got list")
    assert meta(b'{"boxes": [[1, 2, 3, 4], 5]}') == ("bad_json", "bad_json: 'boxes' must be a list of lists of numbers")
    assert meta(b'{"boxes": [[1, 2, 3, 4]], "box_scores": 0.5}') == (
        "bad_json", "bad_json: 'box_scores' must be a list of numbers")
    assert meta(b'{"boxes": [[1, 2, 3, 4, 5]]}') == ("bad_boxes", "bad_boxes: every box needs 4 numbers (x1, y1, x2, y2)")
    assert meta(b'{"boxes": [[1, 2, 3, 4]], "box_scores": [0.5, 0.6]}') == (
        "bad_boxes", "bad_boxes: 2 box_scores for 1 boxes")

    one_box = {"boxes": [[1, 2, 30, 40]]}
    reason, text = _reason_and_text({**_files(meta=one_box), "regions.npy": b"not numpy"}, tok)
    assert reason == "bad_regions" and text.startswith("bad_regions: not a .npy array: ")
    assert _reason_and_text(_files(meta=one_box, regions=np.zeros((2, 5), np.float16)), tok) == (
        "bad_regions", "bad_regions: expected a numeric [1, C] array, got float16 (2, 5)")
    assert _reason_and_text(_files(meta=one_box, regions=np.array([[0.5, np.nan]], np.float32)), tok) == (
        "bad_regions", "bad_regions: non-finite class scores")


def test_json_values_that_are_not_numbers_are_refused(tok):
    """Booleans are not coordinates or scores (in Python they are ints). Fails if ``_is_number``
    lets ``bool`` through (``and not`` as ``and``/``or``), or if a box that is not a list passes."""
    for raw in (b'{"boxes": [[true, 0, 10, 10]]}', b'{"boxes": [[0, 0, 10, 10]], "box_scores": [false]}',
                b'{"boxes": [[0, 0, 10, 10], "0 0 10 10"]}', b'{"boxes": [[0, 0, "10", 10]]}'):
        assert _reason_and_text({**_files(), "json": raw}, tok)[0] == "bad_json", raw
    assert _is_number(3) and _is_number(2.5) and not _is_number(True) and not _is_number("3")


def test_caps_are_exact_bounds(tok):
    """An image of exactly ``max_image_pixels`` pixels and a caption of exactly
    ``max_caption_bytes`` bytes are used; one more is refused. Fails if ``>`` becomes ``>=``."""
    cfg = CaptionDataConfig(**{**CFG.__dict__, "max_image_pixels": 200 * 100, "max_caption_bytes": 10})
    s = _decode(_files(caption=b"red circle"), tok, cfg=cfg)
    assert s.image.shape == (3, 64, 128)
    cfg = CaptionDataConfig(**{**cfg.__dict__, "max_image_pixels": 200 * 100 - 1})
    assert _reason_and_text(_files(caption=b"red circle"), tok, cfg=cfg)[0] == "image_too_large"


def test_a_missing_json_means_no_boxes_and_nothing_dropped(tok):
    """No JSON (or one without ``boxes``): only the whole-image box, nothing counted as dropped,
    and the defaults of ``CaptionSample``. Fails if the empty box array gets a row."""
    for files in (_files(), _files(meta={"width": 200, "height": 100})):
        s = _decode(files, tok, train=False)
        assert s.boxes.tolist() == [[0, 0, 128, 64]] and s.dropped_boxes == 0 and not s.flipped
        assert s.features is None and s.key == "k"
    bare = CaptionSample(key="x", input_ids=np.zeros(3, np.int64), mlm_labels=np.zeros(3, np.int64), image=None,
                         boxes=np.zeros((1, 4), np.float32), roi_masked=np.zeros(1, bool),
                         roi_labels_mask=np.zeros(1, bool), roi_targets=None, image_size=(1, 1))
    assert (bare.flipped, bare.dropped_boxes, bare.features) == (False, 0, None)


def test_boxes_empty_in_either_direction_and_scores_at_the_threshold():
    """On a 40 x 30 image (width != height): a box empty only in x or only in y, a box off
    the bottom or the right edge, a NaN score: dropped and counted; a score of exactly
    ``min_box_score`` is good; equal scores keep file order. Fails if a ``>`` of the emptiness
    test becomes ``>=``, if a coordinate index changes, if the clip bounds change, if NaN scores
    are not dropped, or if the threshold ``>=`` becomes ``>``."""
    boxes = np.array([
        [5, 5, 5, 20],    # 0 empty in x only
        [5, 8, 20, 8],    # 1 empty in y only
        [5, 31, 20, 50],  # 2 below the image: empty in y after clipping
        [41, 5, 60, 20],  # 3 right of the image: empty in x after clipping
        [1, 2, 39, 29],   # 4 fine
        [2, 3, 10, 12],   # 5 NaN score
        [0, 0, 35, 25],   # 6 fine, score exactly at the threshold
        [3, 4, 30, 28],   # 7 fine, under the threshold
        [6, 7, 8, 9],     # 8 fine, same score as 6
    ], float)
    scores = np.array([0.9, 0.9, 0.9, 0.9, 0.8, np.nan, 0.5, 0.4, 0.5])
    cfg = CaptionDataConfig(**{**CFG.__dict__, "min_boxes": 1, "max_boxes": 10, "min_box_score": 0.5})
    kept_boxes, rows, dropped = select_boxes(boxes, scores, 1.0, 1.0, 40, 30, cfg)
    assert rows.tolist() == [4, 6, 8] and dropped == 5
    np.testing.assert_array_equal(kept_boxes, boxes[[4, 6, 8]])
    # with scale: x by 2, y by 0.5; x2 of box 4 (78) clipped to the width 60, nothing empty
    kept_boxes, rows, dropped = select_boxes(boxes[[4]], scores[[4]], 2.0, 0.5, 60, 20, cfg)
    np.testing.assert_array_equal(kept_boxes, [[2, 1, 60, 14.5]])
    assert kept_boxes.dtype == np.float32 and dropped == 0
    # a negative start clips to 0, in both directions
    kept_boxes, _, _ = select_boxes(np.array([[-3.0, -4.0, 10.0, 12.0]]), None, 1.0, 1.0, 40, 30, cfg)
    assert kept_boxes.tolist() == [[0, 0, 10, 12]]


def test_joint_budget_cases_worked_by_hand():
    """Each case stepped through by hand from the rule (the longer side loses one; a tie costs
    the text; floors of 3 tokens and 1 RoI). Fails if a comparison or a floor changes by one,
    if the cap is taken as exclusive, or if the tie goes to the RoIs."""
    from vlbert.data.captions import joint_budget

    assert joint_budget(5, 5, 9) == (4, 5)  # tie: a token goes first
    assert joint_budget(6, 4, 10) == (6, 4)  # exactly at the cap: nothing goes
    assert joint_budget(6, 4, 9) == (5, 4)
    assert joint_budget(4, 1, 2) == (3, 1)  # the text down to its floor, the RoIs at theirs
    assert joint_budget(4, 2, 5) == (3, 2)  # 4 tokens > 2 RoIs: the text loses
    assert joint_budget(3, 2, 2) == (3, 1)  # the text at its floor: the RoIs lose
    assert joint_budget(3, 5, 4) == (3, 1)
    assert joint_budget(10, 1, 5) == (4, 1)  # only the text can lose
    assert joint_budget(3, 1, 1) == (3, 1)  # under the floors: as small as allowed
    assert joint_budget(5, 2, 1) == (3, 1)  # a cap of 1 is a cap
    assert joint_budget(7, 9, -1) == (7, 9)  # a negative cap is no cap


def test_high_depth_and_float_images_scale_to_8_bits(monkeypatch):
    """``_to_rgb`` on 16-bit, 32-bit integer and float greyscale, expected tones computed here:
    16-bit p -> round(p / 257) for all 65536 tones (floats: no tone is a tie), also when an
    image's tones are all under 256; 32-bit tones up to 255 kept as they are, above that scaled
    like 16-bit (over 65535: white), negative: black; float tones in [0, 1] times 255, above 1
    as they are, rounded half up and clipped, NaN black. Each image wide and tall, in one chunk
    and in chunks of 2 rows or more with a remainder. Fails if any scale, rounding term, clip bound or
    threshold (``peak > 255``, ``peak <= 1.0``) changes, if 16-bit images are told apart by
    their peak rather than their mode, or if a chunk is skipped or misplaced."""
    all16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    low16 = np.arange(256, dtype=np.uint16).reshape(16, 16)
    int32 = [
        (np.array([[0, 1, 128, 254, 255]], np.int32), [0, 1, 128, 254, 255]),
        (np.array([[-7, 0, 128, 129, 256]], np.int32), [0, 0, 0, 1, 1]),
        (np.array([[-5, 257, 65535, 70000, 32768]], np.int32), [0, 1, 255, 255, 128]),
    ]
    floats = [
        (np.array([[0, 0.5, 1.0, 0.2, 0.998, -0.3, np.nan]], np.float32), [0, 128, 255, 51, 254, 0, 0]),
        (np.array([[0, 1.4, 2.5, 254.6, 300, -5, np.nan]], np.float32), [0, 1, 3, 255, 255, 0, 0]),
        (np.array([[0, 0.5, 1.2, 1.5, 2.0]], np.float32), [0, 1, 1, 2, 2]),  # a peak just over 1: as they are
    ]

    def grey(array):
        rgb = np.asarray(_to_rgb(Image.fromarray(array)))
        assert rgb.shape == (*array.shape, 3) and rgb.dtype == np.uint8
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        return rgb[..., 0]

    def three_rows(array):  # the row, reversed, the row again: chunks of 2 rows leave a remainder of 1
        return np.concatenate([array, array[:, ::-1], array])

    for chunk in (None, 2):  # one chunk, then chunks of 2 rows
        for array, tones in int32 + floats:
            if chunk:
                monkeypatch.setattr(captions, "CHUNK_PIXELS", chunk * array.shape[1])
            assert Image.fromarray(array).mode == ("I" if array.dtype == np.int32 else "F")
            expected = [tones, tones[::-1], tones]
            assert grey(three_rows(array)).tolist() == expected, (chunk, array)
            assert grey(three_rows(array).T.copy()).T.tolist() == expected, (chunk, array)  # taller than wide
        if chunk:
            monkeypatch.setattr(captions, "CHUNK_PIXELS", chunk * 256)
        assert Image.fromarray(all16).mode == "I;16"
        assert (grey(all16) == np.floor(all16 / 257.0 + 0.5)).all(), chunk
        assert (grey(low16) == np.floor(low16 / 257.0 + 0.5)).all(), chunk


def _feature_files(feats, meta, caption=b"a red circle left of a blue square", regions=None):
    files = {"txt": caption, "json": json.dumps(meta).encode(), FEATURES_EXT: encode_npy(feats)}
    if regions is not None:
        files["regions.npy"] = _npy(regions)
    return files


def test_stored_features_instead_of_an_image(tok):
    """With ``features=True`` no image is read: boxes stay in the JSON's ``width`` x ``height``
    pixels (clipped there, not scaled), row 0 of the features is zeros and row i + 1 is the
    stored feature of the i-th kept box (best score first), in the stored dtype; a flip mirrors
    the boxes about that width only; the joint cap cuts features with the boxes. Fails if the
    boxes are scaled, clipped to another frame or left unflipped, if features are not reordered
    with the boxes, or if row 0 is not zero."""
    meta = {"width": 40, "height": 30, "boxes": [[2, 3, 12, 13], [20, 5, 50, 25], [1, 1, 4, 4], [9, 9, 9, 20]],
            "box_scores": [0.6, 0.9, 0.7, 0.95]}  # box 3 is empty: dropped
    feats = (np.arange(4)[:, None] + np.arange(6)[None, :] / 10).astype(np.float16)  # row i = i.0, i.1, ...
    regions = np.eye(4, 5, dtype=np.float16)  # row i is class i
    files = _feature_files(feats, meta, regions=regions)
    s = decode_caption_sample(files, "k", CFG, MASK, tok, np.random.default_rng(0), train=False, features=True)
    assert s.image is None and s.image_size == (30, 40) and not s.flipped and s.dropped_boxes == 1
    assert s.boxes.tolist() == [[0, 0, 40, 30], [20, 5, 40, 25], [1, 1, 4, 4], [2, 3, 12, 13]]
    assert s.features.dtype == np.float16 and s.features.shape == (4, 6)
    np.testing.assert_array_equal(s.features, np.concatenate([np.zeros((1, 6), np.float16), feats[[1, 2, 0]]]))
    assert s.roi_targets[1:].argmax(1).tolist() == [1, 2, 0] and (s.roi_targets[0] == 0).all()

    flip = CaptionDataConfig(**{**CFG.__dict__, "flip_prob": 1.0})
    f = decode_caption_sample(files, "k", flip, MASK, tok, np.random.default_rng(0), features=True)
    assert f.flipped and f.image is None
    assert f.boxes.tolist() == [[0, 0, 40, 30], [0, 5, 20, 25], [36, 1, 39, 4], [28, 3, 38, 13]]
    np.testing.assert_array_equal(f.features, s.features)

    # [CLS] red circle [SEP] and 4 RoIs under a cap of 6: a token goes (the tie), then a RoI
    capped = CaptionDataConfig(**{**CFG.__dict__, "max_sequence_length": 6})
    c = decode_caption_sample(_feature_files(feats, meta, caption=b"red circle", regions=regions), "k", capped, MASK,
                              tok, np.random.default_rng(0), train=False, features=True)
    assert len(c.input_ids) == 3 and c.boxes.tolist() == s.boxes[:3].tolist()
    np.testing.assert_array_equal(c.features, s.features[:3])
    assert c.roi_targets.shape == (3, 5)


def test_collate_stored_features(tok):
    """Samples with features collate into ``features`` [B, R, D] in their dtype, zero-padded,
    with no images; the image sizes come from ``image_size``. Mixed samples, or features of
    different widths or dtypes, are refused with their message in full. Fails if the features
    are not copied, if the padding or the sizes change, or if a message changes."""
    a = CaptionSample(key="a", input_ids=np.arange(1, 4), mlm_labels=np.full(3, IGNORE_INDEX), image=None,
                      boxes=np.ones((2, 4), np.float32), roi_masked=np.zeros(2, bool),
                      roi_labels_mask=np.zeros(2, bool), roi_targets=None, image_size=(30, 40),
                      features=np.full((2, 3), 1.5, np.float16))
    b = CaptionSample(**{**a.__dict__, "key": "b", "boxes": np.ones((3, 4), np.float32), "image_size": (7, 5),
                         "roi_masked": np.ones(3, bool), "roi_labels_mask": np.ones(3, bool),
                         "features": np.arange(9, dtype=np.float16).reshape(3, 3)})
    batch = collate_captions([a, b])
    assert batch.images is None and batch.keys == ["a", "b"]
    assert batch.features.dtype == torch.float16 and batch.features.shape == (2, 3, 3)
    assert batch.features[0].tolist() == [[1.5] * 3, [1.5] * 3, [0, 0, 0]]
    assert batch.features[1].tolist() == np.arange(9).reshape(3, 3).tolist()
    assert batch.image_sizes.tolist() == [[30, 40], [7, 5]]
    assert batch.box_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.roi_masked.tolist() == [[False, False, False], [True, True, True]]

    c = _sample(32, 32, 3, 2)
    with pytest.raises(ValueError) as e:
        collate_captions([a, c])
    assert str(e.value) == "collate_captions: some samples carry features and others images"
    wide = CaptionSample(**{**a.__dict__, "features": np.zeros((2, 4), np.float16)})
    with pytest.raises(ValueError) as e:
        collate_captions([a, wide])
    assert str(e.value) == ("samples disagree on the feature width or dtype: "
                            "[\"(3, dtype('float16'))\", \"(4, dtype('float16'))\"]")
    f32 = CaptionSample(**{**a.__dict__, "features": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match="disagree on the feature width or dtype"):
        collate_captions([a, f32])
    assert collate_captions([f32]).features.dtype == torch.float32


def test_collate_messages_keys_and_padding_to_any_multiple():
    """The two other errors word for word, the keys kept in order, and the image padding with
    odd sizes: multiple 1 (and 0) leaves 33 x 21 as it is, 5 rounds it up to 35 x 25, and the
    default is 32. Fails if the rounding's floor of 1 changes, if the default changes, or if a
    message changes."""
    with pytest.raises(ValueError) as e:
        collate_captions([])
    assert str(e.value) == "collate_captions needs at least one sample"
    with pytest.raises(ValueError) as e:
        collate_captions([_sample(8, 8, 3, 2, classes=4), _sample(8, 8, 3, 2, classes=5)])
    assert str(e.value) == "samples disagree on the number of RoI classes: [4, 5]"
    odd = _sample(33, 21, 3, 1)
    assert collate_captions([odd], pad_to_multiple=1).images.shape == (1, 3, 33, 21)
    assert collate_captions([odd], pad_to_multiple=0).images.shape == (1, 3, 33, 21)
    assert collate_captions([odd], pad_to_multiple=5).images.shape == (1, 3, 35, 25)
    assert collate_captions([odd]).images.shape == (1, 3, 64, 32)
    b = collate_captions([odd, CaptionSample(**{**odd.__dict__, "key": "t"})])
    assert b.keys == ["s", "t"]


def test_regions_shapes_kinds_and_non_finite_rows(tok):
    """One class column and integer scores are fine; no column, a 1-D or 3-D array and a
    pickled object array are ``bad_regions`` (the pickle is never loaded: "not a .npy array");
    a NaN in the row of a box that is dropped does not matter, in a kept one it does. Fails if
    the column floor or the dimension check changes, if pickles are allowed, or if the NaN test
    looks at the rows before the boxes are chosen."""
    meta = {"boxes": [[1, 2, 30, 40], [3, 4, 20, 20]], "box_scores": [0.9, 0.2]}  # box 1 under 0.5: dropped
    s = _decode(_files(meta=meta, regions=np.array([[2.0], [np.nan]], np.float32)), tok)
    assert s.roi_targets.tolist() == [[0.0], [2.0]]
    s = _decode(_files(meta=meta, regions=np.array([[3, 4], [5, 6]], np.uint8)), tok)
    assert s.roi_targets.dtype == np.float32 and s.roi_targets.tolist() == [[0, 0], [3, 4]]
    for bad in (np.zeros((2, 0), np.float16), np.zeros(2, np.float16), np.zeros((2, 1, 1), np.float16)):
        reason, text = _reason_and_text(_files(meta=meta, regions=bad), tok)
        assert (reason, text) == ("bad_regions", f"bad_regions: expected a numeric [2, C] array, got float16 {bad.shape}")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    reason, text = _reason_and_text({**_files(meta=meta), "regions.npy": pickled.getvalue()}, tok)
    assert reason == "bad_regions" and text.startswith("bad_regions: not a .npy array: ")
    assert _reason_and_text(_files(meta=meta, regions=np.array([[np.inf], [1.0]], np.float32)), tok)[0] == "bad_regions"
    assert _reason_and_text(_files(meta=meta, regions=np.array([[True], [False]])), tok)[0] == "bad_regions"


def test_jpeg_key_default_flip_and_a_tokenizer_without_is_fast(tok):
    """An image under ``jpeg`` is found; ``train`` defaults to True (flip_prob 1 flips); a
    tokenizer with no ``is_fast`` at all is refused like a slow one, word for word. Fails if
    "jpeg" is dropped from the extensions, if the default of ``train`` changes, or if a
    missing ``is_fast`` counts as fast."""
    files = _files()
    files["jpeg"] = files.pop("jpg")
    flip = CaptionDataConfig(**{**CFG.__dict__, "flip_prob": 1.0})
    s = decode_caption_sample(files, "k", flip, MASK, tok, np.random.default_rng(0))
    assert s.flipped and _px(s, 32, 100) == pytest.approx((230, 20, 20), abs=12)

    class NoFlag:
        pass

    with pytest.raises(TypeError) as e:
        _decode(_files(), NoFlag())
    assert str(e.value) == "decode_caption_sample needs a fast (Rust) Hugging Face tokenizer for word_ids()"


def test_big_jpegs_are_decoded_at_a_reduced_scale():
    """A 1600 x 1200 JPEG resized to 85 x 64 is decoded by libjpeg at 1/8 scale (``draft``),
    then resized: the pixels equal that path done here with PIL, and differ from a full decode
    then resize. Fails if the draft is not asked for JPEGs."""
    rng = np.random.default_rng(0)
    data = _image_bytes(Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)))
    img, size = _decode_image(data, CFG)
    assert size == (1600, 1200) and img.size == (85, 64)
    reduced = Image.open(io.BytesIO(data))
    reduced.draft("RGB", (85, 64))
    assert reduced.size == (200, 150)  # 1/8
    expected = reduced.convert("RGB").resize((85, 64), Image.BILINEAR)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((85, 64), Image.BILINEAR)
    assert not np.array_equal(np.asarray(full), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(img), np.asarray(expected))


def test_target_size_keeps_at_least_one_pixel():
    """A 3000 x 1 strip capped at 1000 pixels long is 1000 x 1, not 1000 x 0. Fails if the
    floor of 1 pixel changes."""
    assert target_size(3000, 1, 1, 1000) == (1000, 1)
    assert target_size(1, 3000, 1, 1000) == (1, 1000)
    assert target_size(1, 3000, 1, 1000) == (1, 1000)


def test_a_decompression_bomb_is_image_too_large(tok, monkeypatch):
    """More pixels than twice PIL's own limit (its ``DecompressionBombError``, raised on open)
    is ``image_too_large`` with PIL's words, even under ``max_image_pixels``. Fails if the
    reason changes (it would be counted under another name)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 100 // 2 - 1)  # the 200 x 100 image is 2 pixels over
    reason, text = _reason_and_text(_files(fmt="PNG"), tok)
    assert reason == "image_too_large"
    assert text.startswith("image_too_large: Image size (20000 pixels) exceeds limit of 19998 pixels")
