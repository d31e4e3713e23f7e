"""Captioned-image samples: decode one WebDataset sample, collate a batch.

A sample is the files of one key in a caption shard (docs/design.md section 4):
``{"jpg": bytes, "txt": bytes, "json": bytes, "regions.npy": bytes}``.
``decode_caption_sample`` turns it into a ``CaptionSample`` of NumPy arrays;
``collate_captions`` pads a list of them into a ``CaptionBatch``.

Conventions:
- Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: a box
  covering pixels 0..9 is ``(0, 10)``; the whole image is ``(0, 0, W, H)``.
  JSON boxes refer to the pixels of the stored image (its decoded size; the
  JSON ``width``/``height`` are not used to rescale them).
- Box 0 is always the whole image. It has no masked-RoI target (a zero row)
  and ``choose_rois`` never picks it.
- Detected boxes are kept the way the bottom-up-attention features were:
  boxes with non-finite numbers, or empty after clipping to the image, are
  dropped (counted in ``dropped_boxes``); of the rest, those with score >=
  ``min_box_score`` are kept, topped up to ``min_boxes`` with the best of the
  others and cut to ``max_boxes``, by descending score (without
  ``box_scores``: the first ``max_boxes`` in file order). So a sample carries at
  most ``max_boxes + 1`` RoIs. With ``max_sequence_length``, caption tokens + RoIs
  are capped jointly (``joint_budget``): the lowest-scoring boxes and the last words go.
- The image stays uint8 RGB, ``[3, h, w]``; normalisation runs on the device.
- With ``features=True`` (``detector.source: features``) no image is decoded: the sample
  carries each kept box's stored feature (``vlbert.data.region_features``), the boxes stay in
  the pixels of the JSON's ``width`` x ``height``, and a flip mirrors the boxes only, as the
  reference's precomputed variant does (its transform flips boxes whatever the image). Row 0
  (whole image) of the features is 0: the model makes it from the other boxes.
- Masking is applied whether or not ``train``; ``train=False`` only turns off
  the random flip (validation measures the same masked losses; pass a
  generator seeded per sample for a fixed validation set).
- Problems with the data raise ``BadSample(reason)``; the stream counts the
  reason and skips the sample. Programming errors (a slow tokenizer) raise
  ordinary exceptions.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image

from vlbert.config import CaptionDataConfig, MaskingConfig
from vlbert.batch import IGNORE_INDEX, CaptionBatch
from vlbert.data.masking import choose_rois, mask_tokens

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadSample(Exception):
    """A sample that cannot be used. ``reason`` is a short counter name:
    missing_image, corrupt_image, image_too_large (over ``max_image_pixels``, or a decompression bomb),
    missing_caption, bad_caption (not UTF-8), caption_too_large (over ``max_caption_bytes``),
    empty_caption, bad_json, bad_boxes, bad_regions."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class CaptionSample:
    """One decoded captioned image (n = RoIs including the whole-image box 0).

    input_ids:       int64 [T]  ``[CLS] caption [SEP]`` after MLM masking
    mlm_labels:      int64 [T]  original id where chosen for MLM, else -100
    image:           uint8 [3, h, w]  RGB after resize (and flip); may be a
                     non-contiguous view of an [h, w, 3] buffer
    boxes:           float32 [n, 4]  in pixels of ``image``; box 0 = (0, 0, w, h)
    roi_masked:      bool [n]
    roi_labels_mask: bool [n]
    roi_targets:     float32 [n, C] or None (no ``regions.npy``); row 0 is zeros
    image_size:      (h, w)
    features:        float16/32 [n, D] stored box features, row 0 zeros; with ``image`` None
    """

    key: str
    input_ids: np.ndarray
    mlm_labels: np.ndarray
    image: Optional[np.ndarray]
    boxes: np.ndarray
    roi_masked: np.ndarray
    roi_labels_mask: np.ndarray
    roi_targets: Optional[np.ndarray]
    image_size: tuple[int, int]
    flipped: bool = False
    dropped_boxes: int = 0  # boxes in the JSON that were invalid (non-finite or empty after clipping)
    features: Optional[np.ndarray] = None


# --------------------------------------------------------------------------- image


def target_size(width: int, height: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """(width, height) with the short side ``short_side`` and the long side at most
    ``max_long_side``, aspect kept (rounded, at least 1 pixel)."""
    scale = short_side / min(width, height)
    if max(width, height) * scale > max_long_side:
        scale = max_long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode_image(data: bytes, cfg: CaptionDataConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Decode and resize; returns the RGB image and the stored (width, height).
    An image over ``cfg.max_image_pixels`` is refused from its header, before decoding."""
    try:
        img = Image.open(io.BytesIO(data))
        size = img.size
        if size[0] * size[1] > cfg.max_image_pixels:
            raise BadSample("image_too_large", f"{size[0]}x{size[1]} pixels, over data.captions.max_image_pixels "
                                               f"({cfg.max_image_pixels})")
        tw, th = target_size(*size, cfg.short_side, cfg.max_long_side)
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller
            # (the result is never smaller than the target): several times faster on big photos.
            img.draft("RGB", (tw, th))
        img = _to_rgb(img)  # forces the full decode: truncated or corrupt data fails here
        if img.size != (tw, th):
            img = img.resize((tw, th), Image.BILINEAR)
    except BadSample:
        raise
    except Image.DecompressionBombError as e:  # more pixels than PIL allows: refused before decoding
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError)
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    return img, size


CHUNK_PIXELS = 1 << 18  # pixels converted at a time from a high-depth image: bounded scratch memory


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, 8 bits per channel. 16-bit and 32-bit integer greyscale (``I;16*``, ``I``)
    is scaled to 8 bits first (PIL's own conversion clips it, turning most pixels
    white), in integer arithmetic, ``CHUNK_PIXELS`` at a time, before any resizing:
    the extra memory is the 8-bit result plus a fixed scratch, never a float copy of
    the image. Float images (``F``) are scaled chunk by chunk the same way."""
    if img.mode.startswith("I") or img.mode == "F":
        pixels = np.asarray(img)  # [h, w] uint16 / int32 / float32: what PIL holds, 2-4 bytes a pixel
        rows = max(1, CHUNK_PIXELS // max(1, pixels.shape[1]))
        chunks = [pixels[r:r + rows] for r in range(0, pixels.shape[0], rows)]
        out = np.empty(pixels.shape, np.uint8)
        if img.mode == "F":
            peak = max((float(np.nan_to_num(c).max(initial=0)) for c in chunks), default=0.0)
            scale = 255.0 / (1.0 if peak <= 1.0 else 255.0)
            for r, c in zip(range(0, len(out), rows), chunks):
                out[r:r + rows] = np.clip(np.nan_to_num(c.astype(np.float64)) * scale + 0.5, 0, 255)
        else:
            peak = max((int(c.max(initial=0)) for c in chunks), default=0)
            top = 65535 if img.mode.startswith("I;16") or peak > 255 else 255
            for r, c in zip(range(0, len(out), rows), chunks):
                # round(p * 255 / top) with halves up, exactly: floor((510 p + top) / (2 top))
                out[r:r + rows] = (np.clip(c, 0, top).astype(np.int64) * 510 + top) // (2 * top)
        img = Image.fromarray(out, "L")
    return img.convert("RGB")


# --------------------------------------------------------------------------- boxes


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_meta(data: Optional[bytes]) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Boxes float64 [n, 4] and scores float64 [n] (or None) from the JSON bytes."""
    if data is None:
        return np.zeros((0, 4)), None
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample("bad_json", f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    boxes = meta.get("boxes")
    if boxes is None:
        return np.zeros((0, 4)), None
    if not isinstance(boxes, list) or not all(isinstance(b, list) and all(map(_is_number, b)) for b in boxes):
        raise BadSample("bad_json", "'boxes' must be a list of lists of numbers")
    if any(len(b) != 4 for b in boxes):
        raise BadSample("bad_boxes", "every box needs 4 numbers (x1, y1, x2, y2)")
    arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    scores = meta.get("box_scores")
    if scores is None:
        return arr, None
    if not isinstance(scores, list) or not all(map(_is_number, scores)):
        raise BadSample("bad_json", "'box_scores' must be a list of numbers")
    if len(scores) != len(arr):
        raise BadSample("bad_boxes", f"{len(scores)} box_scores for {len(arr)} boxes")
    return arr, np.array(scores, dtype=np.float64)


def select_boxes(
    boxes: np.ndarray, scores: Optional[np.ndarray], sx: float, sy: float, width: int, height: int,
    cfg: CaptionDataConfig,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scale boxes by (sx, sy), clip to the ``width`` x ``height`` image, drop
    invalid ones and keep the best (module docstring).

    Returns (kept boxes float32 [k, 4], their row numbers in the JSON [k], number dropped as invalid).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = boxes * np.array([sx, sy, sx, sy])
        finite = np.isfinite(scaled).all(axis=1)
        if scores is not None:
            finite &= np.isfinite(scores)
        clipped = np.clip(np.nan_to_num(scaled), 0, [width, height, width, height])
        valid = finite & (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    idx = np.flatnonzero(valid)
    if scores is not None:
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        n_good = int((scores[idx] >= cfg.min_box_score).sum())  # sorted: the good ones come first
        idx = idx[: max(n_good, cfg.min_boxes)]
    idx = idx[: cfg.max_boxes]
    return clipped[idx].astype(np.float32), idx, int((~valid).sum())


def _load_regions(data: bytes, n_boxes: int) -> np.ndarray:
    try:
        regions = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise BadSample("bad_regions", f"not a .npy array: {e}") from None
    if regions.ndim != 2 or regions.shape[0] != n_boxes or regions.shape[1] < 1 or regions.dtype.kind not in "fiu":
        raise BadSample("bad_regions", f"expected a numeric [{n_boxes}, C] array, got {regions.dtype} {regions.shape}")
    return regions


def joint_budget(n_tokens: int, n_rois: int, cap: int) -> tuple[int, int]:
    """(tokens kept, RoIs kept) under a joint cap, as the reference VL-BERT truncates.

    While the total exceeds ``cap`` the longer of the two loses one element (the RoIs
    on a tie go to the text), never below 3 tokens ([CLS] word [SEP]) and 1 RoI (the
    whole image). ``cap`` 0 keeps everything.
    """
    t, r = n_tokens, n_rois
    if cap <= 0:
        return t, r
    while t + r > cap and (t > 3 or r > 1):
        if (r > t and r > 1) or t <= 3:
            r -= 1
        else:
            t -= 1
    return t, r


# --------------------------------------------------------------------------- caption


def _caption_text(data: Optional[bytes], max_bytes: int) -> str:
    if data is None:
        raise BadSample("missing_caption")
    if len(data) > max_bytes:  # before decoding and tokenising
        raise BadSample("caption_too_large", f"{len(data)} bytes, over data.captions.max_caption_bytes ({max_bytes})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadSample("bad_caption", f"not UTF-8: {e}") from None
    text = " ".join(text.split())  # newlines and runs of spaces from scraped alt-texts
    if not text:
        raise BadSample("empty_caption")
    return text


def encode_caption(
    text: str, tokenizer, max_tokens: int, masking: MaskingConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``[CLS] text [SEP]`` truncated to ``max_tokens``, then MLM-masked.
    Returns (input_ids int64 [T], mlm_labels int64 [T])."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("decode_caption_sample needs a fast (Rust) Hugging Face tokenizer for word_ids()")
    enc = tokenizer(text, truncation=True, max_length=max_tokens)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    word_ids = enc.word_ids()
    special = np.array([w is None for w in word_ids], dtype=bool)
    if special.all():
        raise BadSample("empty_caption", "no tokens besides [CLS] and [SEP]")
    starts = np.array([w is not None and (i == 0 or w != word_ids[i - 1]) for i, w in enumerate(word_ids)])
    return mask_tokens(ids, starts, special, len(tokenizer), tokenizer.mask_token_id, masking, rng,
                       exclude_ids=tokenizer.all_special_ids)


# --------------------------------------------------------------------------- sample


def decode_caption_sample(
    files: dict[str, bytes],
    key: str,
    cfg: CaptionDataConfig,
    masking: MaskingConfig,
    tokenizer,
    rng: np.random.Generator,
    train: bool = True,
    features: bool = False,
) -> CaptionSample:
    """Decode one shard sample (``files`` maps extension -> bytes). Raises ``BadSample``.
    ``features``: read the stored box features instead of the image (module docstring)."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None and not features:
        raise BadSample("missing_image", f"none of {', '.join(IMAGE_EXTENSIONS)} in {sorted(files)}")
    text = _caption_text(files.get("txt"), cfg.max_caption_bytes)
    boxes_json, scores = _parse_meta(files.get("json"))
    regions = _load_regions(files["regions.npy"], len(boxes_json)) if "regions.npy" in files else None

    img, stored = None, None
    if features:
        from vlbert.data.region_features import FEATURES_EXT, load_features, stored_image_size

        w, h = stored_image_size(files.get("json"))
        stored = load_features(files.get(FEATURES_EXT), len(boxes_json))
        boxes, kept, dropped = select_boxes(boxes_json, scores, 1.0, 1.0, w, h, cfg)
    else:
        img, (w0, h0) = _decode_image(files[image_ext], cfg)
        w, h = img.size
        boxes, kept, dropped = select_boxes(boxes_json, scores, w / w0, h / h0, w, h, cfg)

    flipped = train and rng.random() < cfg.flip_prob
    if flipped:
        if img is not None:
            # PIL flips in C about 4x faster than copying a reversed numpy view.
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    pixels = np.asarray(img).transpose(2, 0, 1) if img is not None else None  # [3, h, w] view of [h, w, 3]
    boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), boxes])
    box_features = None
    if stored is not None:
        box_features = np.zeros((len(boxes), stored.shape[1]), stored.dtype)
        box_features[1:] = stored[kept]

    roi_targets = None
    if regions is not None:
        roi_targets = np.zeros((len(boxes), regions.shape[1]), np.float32)
        roi_targets[1:] = regions[kept]
        if not np.isfinite(roi_targets).all():
            raise BadSample("bad_regions", "non-finite class scores")

    input_ids, mlm_labels = encode_caption(text, tokenizer, cfg.max_caption_tokens, masking, rng)
    n_tokens, n_rois = joint_budget(len(input_ids), len(boxes), cfg.max_sequence_length)
    if n_tokens < len(input_ids):  # keep [SEP]
        input_ids = np.concatenate([input_ids[: n_tokens - 1], input_ids[-1:]])
        mlm_labels = np.concatenate([mlm_labels[: n_tokens - 1], mlm_labels[-1:]])
    boxes = boxes[:n_rois]  # best-scoring first (select_boxes)
    roi_targets = roi_targets[:n_rois] if roi_targets is not None else None
    box_features = box_features[:n_rois] if box_features is not None else None
    roi_masked, roi_labels_mask = choose_rois(len(boxes), masking, rng)
    return CaptionSample(
        key=key, input_ids=input_ids, mlm_labels=mlm_labels, image=pixels, boxes=boxes,
        roi_masked=roi_masked, roi_labels_mask=roi_labels_mask, roi_targets=roi_targets,
        image_size=(h, w), flipped=flipped, dropped_boxes=dropped, features=box_features,
    )


# --------------------------------------------------------------------------- batch


def collate_captions(samples: list[CaptionSample], pad_to_multiple: int = 32) -> CaptionBatch:
    """Pad samples into a ``CaptionBatch``.

    Tokens are padded with 0 (labels with -100), images at the bottom/right with
    0 up to the largest height and width in the batch rounded up to a multiple of
    ``pad_to_multiple`` (1 = no rounding), boxes with zeros and ``box_mask`` False.
    ``roi_targets`` is None unless every sample has targets (a batch never mixes
    shard targets with detector-made ones); all must then have the same C.
    Samples with stored features (all or none) give ``features`` [B, R, D] in their
    dtype, padded with 0, and ``images`` None.
    """
    if not samples:
        raise ValueError("collate_captions needs at least one sample")
    b = len(samples)
    t = max(len(s.input_ids) for s in samples)
    r = max(len(s.boxes) for s in samples)
    with_features = [s.features is not None for s in samples]
    if any(with_features) and not all(with_features):
        raise ValueError("collate_captions: some samples carry features and others images")
    features = None
    if all(with_features):
        dims = {(s.features.shape[1], s.features.dtype) for s in samples}
        if len(dims) != 1:
            raise ValueError(f"samples disagree on the feature width or dtype: {sorted(map(str, dims))}")
        dim, dtype = dims.pop()
        features = torch.zeros(b, r, dim, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
        for i, s in enumerate(samples):
            features[i, :len(s.features)] = torch.from_numpy(s.features)
        images_np = None
    m = max(1, pad_to_multiple)

    input_ids = torch.zeros(b, t, dtype=torch.long)
    attention_mask = torch.zeros(b, t, dtype=torch.bool)
    mlm_labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    images = None
    if features is None:
        hh = math.ceil(max(s.image.shape[1] for s in samples) / m) * m
        ww = math.ceil(max(s.image.shape[2] for s in samples) / m) * m
        images = torch.zeros(b, 3, hh, ww, dtype=torch.uint8)
        images_np = images.numpy()
    image_sizes = torch.zeros(b, 2, dtype=torch.long)
    boxes = torch.zeros(b, r, 4, dtype=torch.float32)
    box_mask = torch.zeros(b, r, dtype=torch.bool)
    roi_masked = torch.zeros(b, r, dtype=torch.bool)
    roi_labels_mask = torch.zeros(b, r, dtype=torch.bool)

    with_targets = all(s.roi_targets is not None for s in samples)
    roi_targets = None
    if with_targets:
        classes = {s.roi_targets.shape[1] for s in samples}
        if len(classes) != 1:
            raise ValueError(f"samples disagree on the number of RoI classes: {sorted(classes)}")
        roi_targets = torch.zeros(b, r, classes.pop(), dtype=torch.float32)

    for i, s in enumerate(samples):
        n, k = len(s.input_ids), len(s.boxes)
        h, w = s.image.shape[1:] if s.image is not None else s.image_size
        input_ids[i, :n] = torch.from_numpy(s.input_ids)
        attention_mask[i, :n] = True
        mlm_labels[i, :n] = torch.from_numpy(s.mlm_labels)
        if images_np is not None:
            images_np[i, :, :h, :w] = s.image  # NumPy copy: the decoded image may be a read-only view
        image_sizes[i, 0], image_sizes[i, 1] = h, w
        boxes[i, :k] = torch.from_numpy(s.boxes)
        box_mask[i, :k] = True
        roi_masked[i, :k] = torch.from_numpy(s.roi_masked)
        roi_labels_mask[i, :k] = torch.from_numpy(s.roi_labels_mask)
        if roi_targets is not None:
            roi_targets[i, :k] = torch.from_numpy(s.roi_targets)
    return CaptionBatch(
        input_ids=input_ids, attention_mask=attention_mask, mlm_labels=mlm_labels, images=images,
        image_sizes=image_sizes, boxes=boxes, box_mask=box_mask, roi_masked=roi_masked,
        roi_labels_mask=roi_labels_mask, roi_targets=roi_targets, keys=[s.key for s in samples],
        features=features,
    )
