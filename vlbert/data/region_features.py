"""Stored region features in a shard sample (``detector.source: features``).

A sample that carries features has, next to its caption (or alone, for fine-tuning sets)::

    <key>.json           {"width", "height", "boxes": [[x1, y1, x2, y2], ...], "box_scores": [...], ...}
    <key>.features.npy   float16 (or float32) [n_boxes, D]: one feature per JSON box, same order
    <key>.regions.npy    float16 [n_boxes, C]: the detector's class scores (masked-RoI targets)

``width``/``height`` give the pixel frame of the boxes (no image is decoded, so the boxes are
normalised by these for the geometry embedding). Arrays are read with ``allow_pickle=False``.
Problems raise ``BadSample`` (counted and skipped by the streams): ``missing_features``,
``bad_features`` (not a float .npy, wrong row count, non-finite values), ``bad_json``
(no positive integer width and height).
"""

from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np

from vlbert.data.captions import BadSample

FEATURES_EXT = "features.npy"
REGIONS_EXT = "regions.npy"


def _is_size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def stored_image_size(data: Optional[bytes]) -> tuple[int, int]:
    """(width, height) from a sample's JSON bytes: the pixel frame its boxes are in."""
    if data is None:
        raise BadSample("bad_json", "a sample with features needs its JSON (width, height, boxes)")
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample("bad_json", f"not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not _is_size(meta.get("width")) or not _is_size(meta.get("height")):
        raise BadSample("bad_json", "a sample with features needs positive integer 'width' and 'height'")
    return meta["width"], meta["height"]


def load_features(data: Optional[bytes], n_boxes: int) -> np.ndarray:
    """The ``features.npy`` bytes -> float [n_boxes, D] (the stored dtype, float16 or float32)."""
    if data is None:
        raise BadSample("missing_features", f"no {FEATURES_EXT} (detector.source: features)")
    try:
        feats = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, OSError, EOFError on bad files
        raise BadSample("bad_features", f"not a .npy array: {e}") from None
    if feats.ndim != 2 or feats.shape[0] != n_boxes or feats.shape[1] < 1 or feats.dtype.kind != "f":
        raise BadSample("bad_features", f"expected a float [{n_boxes}, D] array, got {feats.dtype} {feats.shape}")
    if not np.isfinite(feats).all():
        raise BadSample("bad_features", "non-finite values")
    return feats


def encode_npy(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
