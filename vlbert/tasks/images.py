"""Random access to the images of caption-style tar shards, by image id.

Fine-tuning sets (VQA, RefCOCO+) name images by COCO ``image_id`` and visit
them in question order, so the shards are indexed once: every tar header is
read and checked (``formats.iter_tar_members``; the data in between is seeked
over) and each sample's members are remembered as (offset, size). A shard whose
headers are damaged is indexed up to the damage (counted in ``skips`` under the
``ShardError`` reason); a member over ``max_member_bytes`` is left out
(``member_too_large``). A sample's image id is its JSON ``image_id``
when present, else the last run of digits in its key (COCO file names such as
``COCO_train2014_000000123456`` give 123456).

``decode_image_sample`` reuses the caption pipeline's decoding: resize, box
selection (``data.captions`` rules), optional horizontal flip; box 0 is the
whole image. ``decode_feature_sample`` is its counterpart for shards with stored
box features (``detector.source: features``): no image is decoded.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Optional

import fsspec
import numpy as np
from PIL import Image

from vlbert.config import CaptionDataConfig
from vlbert.data.captions import IMAGE_EXTENSIONS, BadSample, _decode_image, _parse_meta, select_boxes
from vlbert.data.formats import DEFAULT_LIMITS, ShardError, iter_tar_members
from vlbert.data.shards import SkipCounter, expand_urls

log = logging.getLogger(__name__)
_TRAILING_DIGITS = re.compile(r"(\d+)\D*$")


@dataclass(frozen=True)
class ImageEntry:
    url: str
    key: str
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size)


def _image_id(key: str, meta: Optional[dict]) -> Optional[int]:
    if isinstance(meta, dict) and isinstance(meta.get("image_id"), int):
        return meta["image_id"]
    m = _TRAILING_DIGITS.search(key.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


class ImageIndex:
    """image id -> where its files lie in the shards. Reads the tar headers and the JSON members."""

    def __init__(self, patterns: list[str], max_member_bytes: int = DEFAULT_LIMITS.max_member_bytes):
        urls = expand_urls(patterns)
        if not urls:
            raise FileNotFoundError(f"no image shards match {patterns}")
        self.entries: dict[int, ImageEntry] = {}
        self.unnamed = 0  # samples without an image id
        self.max_member_bytes = max_member_bytes
        self.skips = SkipCounter()
        for url in urls:
            self._index_shard(url)
        if not self.entries:
            raise ValueError(f"no images with an image id in {len(urls)} shard(s) ({urls[0]}, ...)")

    def _index_shard(self, url: str) -> None:
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        with fsspec.open(url, "rb") as f:
            try:
                for member in iter_tar_members(f):
                    base = member.name.rsplit("/", 1)[-1]
                    if not member.regular or not member.complete or "." not in base:
                        continue
                    if member.size > self.max_member_bytes:
                        self.skips.add("member_too_large")
                        continue
                    dot = member.name.rfind("/") + 1 + base.index(".")
                    key, ext = member.name[:dot], member.name[dot + 1:].lower()
                    samples.setdefault(key, {})[ext] = (member.data, member.size)
            except ShardError as e:
                log.warning("image shard %s: %s; indexed up to there", url, e)
                self.skips.add(e.reason)
            for key, members in samples.items():
                meta = None
                if "json" in members:
                    off, size = members["json"]
                    f.seek(off)
                    try:
                        meta = json.loads(f.read(size))
                    except ValueError:
                        meta = None
                image_id = _image_id(key, meta)
                if image_id is None:
                    self.unnamed += 1
                    continue
                if image_id in self.entries:
                    other = self.entries[image_id]
                    raise ValueError(f"image id {image_id} appears twice: {other.url}:{other.key} and {url}:{key}")
                self.entries[image_id] = ImageEntry(url, key, members)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, image_id: int) -> dict[str, bytes]:
        """The sample's files, ``{extension: bytes}``."""
        entry = self.entries[image_id]
        out = {}
        with fsspec.open(entry.url, "rb") as f:
            for ext, (off, size) in entry.members.items():
                f.seek(off)
                out[ext] = f.read(size)
        return out


@dataclass
class DecodedImage:
    """image: uint8 [3, h, w] RGB; boxes: float32 [n, 4] pixels, box 0 = whole image;
    image_size: (h, w); scale: (sx, sy) from the stored image's pixels to ``image``;
    rows: int [n - 1], the row of the source boxes (JSON or given) behind boxes 1..n-1
    (-1 for ``extra_boxes``)."""

    image: Optional[np.ndarray]
    boxes: np.ndarray
    image_size: tuple[int, int]
    scale: tuple[float, float]
    flipped: bool
    rows: np.ndarray
    features: Optional[np.ndarray] = None  # float [n, D] stored box features, row 0 zeros (no image then)


def _keep_all(boxes: np.ndarray, sx: float, sy: float, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    keep_all = CaptionDataConfig(min_boxes=1, max_boxes=max(1, len(boxes)))
    kept, rows, _ = select_boxes(np.asarray(boxes, np.float64).reshape(-1, 4), None, sx, sy, w, h, keep_all)
    return kept, rows


def decode_image_sample(files: dict[str, bytes], cfg: CaptionDataConfig, flip: bool,
                        boxes: Optional[np.ndarray] = None,
                        extra_boxes: Optional[np.ndarray] = None) -> DecodedImage:
    """Decode, resize, select boxes, optionally flip. ``boxes`` (float [n, 4] in stored
    pixels) replaces the JSON's detected boxes (e.g. ground-truth boxes or a detections
    file's); all of them are kept then. ``extra_boxes`` (float [m, 4], stored pixels) are
    appended after the selected ones, all kept (their ``rows`` are -1). Raises ``BadSample``."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    if image_ext is None:
        raise BadSample("missing_image", f"none of {', '.join(IMAGE_EXTENSIONS)} in {sorted(files)}")
    img, (w0, h0) = _decode_image(files[image_ext], cfg)
    w, h = img.size
    sx, sy = w / w0, h / h0
    if boxes is None:
        raw, scores = _parse_meta(files.get("json"))
        kept, rows, _ = select_boxes(raw, scores, sx, sy, w, h, cfg)
    else:
        kept, rows = _keep_all(boxes, sx, sy, w, h)
    if extra_boxes is not None and len(extra_boxes):
        extra, _ = _keep_all(extra_boxes, sx, sy, w, h)
        kept = np.concatenate([kept.reshape(-1, 4), extra]).astype(np.float32)
        rows = np.concatenate([rows, np.full(len(extra), -1, rows.dtype)])
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        kept[:, [0, 2]] = w - kept[:, [2, 0]]
    pixels = np.asarray(img).transpose(2, 0, 1)
    all_boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), kept])
    return DecodedImage(pixels, all_boxes, (h, w), (sx, sy), flip, rows)


def decode_feature_sample(files: dict[str, bytes], cfg: CaptionDataConfig, flip: bool) -> DecodedImage:
    """The stored boxes and features of a sample (``vlbert.data.region_features``): box
    selection as ``decode_image_sample``, boxes in the JSON's ``width`` x ``height`` pixels, a
    flip mirrors the boxes only (the reference's precomputed variant, jackroos/VL-BERT
    vqa/data/datasets/vqa.py, flips the boxes whatever the image). Raises ``BadSample``."""
    from vlbert.data.region_features import FEATURES_EXT, load_features, stored_image_size

    w, h = stored_image_size(files.get("json"))
    raw, scores = _parse_meta(files.get("json"))
    stored = load_features(files.get(FEATURES_EXT), len(raw))
    kept, rows, _ = select_boxes(raw, scores, 1.0, 1.0, w, h, cfg)
    if flip:
        kept[:, [0, 2]] = w - kept[:, [2, 0]]
    all_boxes = np.concatenate([np.array([[0, 0, w, h]], np.float32), kept])
    feats = np.zeros((len(all_boxes), stored.shape[1]), stored.dtype)
    feats[1:] = stored[rows]
    return DecodedImage(None, all_boxes, (h, w), (1.0, 1.0), flip, rows, feats)
