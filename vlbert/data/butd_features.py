"""Reading published region-feature files: bottom-up-attention TSV rows and VL-BERT's per-image JSON.

Bottom-up-attention TSV (peteanderson80/bottom-up-attention, tools/generate_tsv.py): one image
per line, tab-separated, no header, columns ``image_id, image_w, image_h, num_boxes, boxes,
features``; ``boxes`` and ``features`` are base64 of float32 arrays [num_boxes, 4] (x1, y1, x2,
y2 in pixels of the original image) and [num_boxes, D] (pool5, D = 2048). LXMERT's files
(airsplay/lxmert, src/utils.py ``load_obj_tsv``) use ``img_id, img_h, img_w, objects_id,
objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features``: pass their column list
(``LXMERT_COLUMNS``); the names ``img_id``/``img_w``/``img_h`` are read as ``image_*``. Both
tools raise ``csv.field_size_limit`` to ``sys.maxsize`` (a row's base64 is megabytes), as we do.

VL-BERT's per-image JSON (jackroos/VL-BERT, pretrain/data/datasets/conceptual_captions.py):
``image_w``, ``image_h``, ``num_boxes``, and base64 float32 ``boxes``, ``features`` and
``classes`` [num_boxes, C] (the detector's class scores: box order and masked-RoI targets).

Nothing is unpickled: base64 decodes to raw float32 bytes read by ``np.frombuffer``. Every number
is checked; a bad record raises ``BadRecord(reason)``, which the importer counts and skips:
``truncated_row`` (missing fields), ``bad_number`` (ids and sizes not positive integers),
``bad_base64``, ``num_boxes_mismatch`` (an array's size does not give ``num_boxes`` rows),
``too_many_boxes``, ``box_outside_image``, ``nonfinite_features``, ``nonfinite_classes``.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO

import numpy as np

BUTD_COLUMNS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_COLUMNS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
                  "num_boxes", "boxes", "features")
_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h"}
MAX_BOXES = 1000  # a record declaring more is refused: bounds what one row may allocate
BOX_TOLERANCE = 1.0  # pixels: boxes of the +1 convention reach w (x2 = w - 1 + 1)


class BadRecord(Exception):
    """A record that cannot be imported; ``reason`` is the skip counter's name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class RegionRecord:
    """One image's regions: boxes float32 [n, 4] pixels of the ``width`` x ``height`` image,
    features float32 [n, D], classes float32 [n, C] or None."""

    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    features: np.ndarray
    classes: Optional[np.ndarray] = None


def _int(value, name: str) -> int:
    try:
        v = int(str(value).strip())
    except (TypeError, ValueError):
        raise BadRecord("bad_number", f"{name} is not an integer: {str(value)[:40]!r}") from None
    if v < 0 or (name != "image_id" and v == 0):
        raise BadRecord("bad_number", f"{name} must be positive, got {v}")
    return v


def _array(text, name: str, rows: int, width: Optional[int] = None) -> np.ndarray:
    """base64 of float32 -> [rows, width] (width inferred when None)."""
    if not isinstance(text, (str, bytes)) or not text:
        raise BadRecord("truncated_row", f"no {name}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRecord("bad_base64", f"{name}: {e}") from None
    n_floats, rest = divmod(len(raw), 4)
    if rest or n_floats == 0 or n_floats % rows or (width is not None and n_floats != rows * width):
        want = f"{rows} x {width}" if width is not None else f"a multiple of {rows}"
        raise BadRecord("num_boxes_mismatch", f"{name} holds {len(raw)} bytes, not float32 {want}")
    return np.frombuffer(raw, dtype="<f4").reshape(rows, -1)


def parse_record(fields: dict, with_classes: bool = False) -> RegionRecord:
    """A TSV row or a JSON object (``BUTD_COLUMNS`` names, plus ``classes``) -> ``RegionRecord``.
    Raises ``BadRecord``."""
    fields = {_ALIASES.get(k, k): v for k, v in fields.items()}
    missing = [k for k in BUTD_COLUMNS if fields.get(k) in (None, "")]
    if missing:
        raise BadRecord("truncated_row", f"missing {', '.join(missing)}")
    image_id = _int(fields["image_id"], "image_id")
    w, h, n = (_int(fields[k], k) for k in ("image_w", "image_h", "num_boxes"))
    if n > MAX_BOXES:
        raise BadRecord("too_many_boxes", f"num_boxes {n} > {MAX_BOXES}")
    boxes = _array(fields["boxes"], "boxes", n, 4)
    features = _array(fields["features"], "features", n)
    classes = _array(fields.get("classes"), "classes", n) if with_classes else None
    if not np.isfinite(boxes).all():
        raise BadRecord("box_outside_image", "non-finite box coordinates")
    t = BOX_TOLERANCE
    inside = ((boxes[:, 0] >= -t) & (boxes[:, 1] >= -t) & (boxes[:, 2] <= w + t) & (boxes[:, 3] <= h + t)
              & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1]))
    if not inside.all():
        i = int(np.flatnonzero(~inside)[0])
        raise BadRecord("box_outside_image", f"box {i} {boxes[i].tolist()} outside the {w} x {h} image")
    if not np.isfinite(features).all():
        raise BadRecord("nonfinite_features", "NaN or infinity in the features")
    if classes is not None and not np.isfinite(classes).all():
        raise BadRecord("nonfinite_classes", "NaN or infinity in the class scores")
    return RegionRecord(image_id, w, h, boxes, features, classes)


def read_tsv(f: TextIO, columns: tuple[str, ...] = BUTD_COLUMNS) -> Iterator[dict]:
    """The rows of a TSV as dicts of strings (a short row has None for its missing columns)."""
    csv.field_size_limit(sys.maxsize)  # as generate_tsv.py and LXMERT do: fields are megabytes
    yield from csv.DictReader(f, fieldnames=list(columns), delimiter="\t")


def read_vlbert_json(data: bytes, fallback_id: Optional[int]) -> dict:
    """VL-BERT's per-image JSON -> fields for ``parse_record`` (``image_id`` from the file, else
    ``fallback_id``, e.g. the digits of its name). Raises ``BadRecord``."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRecord("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise BadRecord("bad_json", f"expected an object, got {type(obj).__name__}")
    if obj.get("image_id") is None:
        obj["image_id"] = fallback_id
    return obj
