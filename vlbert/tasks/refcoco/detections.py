"""A detections file for RefCOCO+: the boxes the reference evaluates on, instead of our own.

The reference (jackroos/VL-BERT refcoco/data/datasets/refcoco.py, ``proposal_source``
"official") reads MAttNet's ``refcoco+/proposal/res101_coco_minus_refer_notime_dets.json``
(data/PREPARE_DATA.md: ``detections/refcoco+_unc`` of MAttNet's ``detections.zip``).
MAttNet writes it in lichengunc/MAttNet tools/run_detect.py: a JSON list of
``{det_id, h5_id, box, image_id, category_id, category_name, score}`` with
``box = [x1, y1, x2 - x1 + 1, y2 - y1 + 1]``. The reference keeps ``image_id`` and
``box`` only and turns the box into ``[x, y, x + w, y + h]``, which is what we do
(our pixels are continuous: a box covering pixels 0..9 is ``(0, 10)``).

Entries that are not such a record (not an object, no integer ``image_id``, a box
that is not four finite numbers with positive width and height) are skipped and
counted by reason; a file that is not a JSON list is an error.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from vlbert.tasks.vqa.data import read_json


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_detections(url: str) -> tuple[dict[int, np.ndarray], dict[str, int]]:
    """image id -> float64 [n, 4] boxes (x1, y1, x2, y2, stored pixels, file order), and the
    skipped entries counted by reason (``not_a_record``, ``bad_image_id``, ``bad_box``)."""
    data = read_json(url)
    if not isinstance(data, list):
        raise ValueError(f"{url}: expected a JSON list of detections {{image_id, box: [x, y, w, h]}}, "
                         f"got {type(data).__name__}")
    boxes: dict[int, list[list[float]]] = {}
    skipped: Counter = Counter()
    for det in data:
        if not isinstance(det, dict):
            skipped["not_a_record"] += 1
            continue
        image_id, box = det.get("image_id"), det.get("box")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            skipped["bad_image_id"] += 1
            continue
        if not (isinstance(box, list) and len(box) == 4 and all(map(_number, box)) and box[2] > 0 and box[3] > 0):
            skipped["bad_box"] += 1
            continue
        x, y, w, h = (float(v) for v in box)
        boxes.setdefault(image_id, []).append([x, y, x + w, y + h])
    return {k: np.asarray(v, np.float64) for k, v in boxes.items()}, dict(skipped)
