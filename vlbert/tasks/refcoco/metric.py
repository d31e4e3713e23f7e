"""RefCOCO+ accuracy: box IoU and the fraction of expressions grounded right.

An expression is grounded right when the box predicted for it has IoU >= 0.5
with the referred object's ground-truth box (jackroos/VL-BERT,
common/metrics/refcoco_metrics.py ``RefAccuracy`` scores the top box by its
IoU label against 0.5; the REFER papers' criterion is IoU >= 0.5). The
accuracy is over every expression of the split: one without a prediction (its
image is absent from the shards or cannot be decoded) counts as wrong.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

HIT_IOU = 0.5  # an expression is grounded right at IoU >= HIT_IOU


def box_iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of each of ``boxes`` [n, 4] with ``box`` [4] (x1, y1, x2, y2, continuous pixels) -> [n].
    A pair whose union is empty (two degenerate boxes) has IoU 0."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    ix = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = ix * iy
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + (box[2] - box[0]) * (box[3] - box[1]) - inter
    # Divide only where the union is not empty (no floor on it: tiny boxes keep their exact IoU).
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def refcoco_accuracy(expressions: Iterable, predictions: Mapping[int, Sequence[float]]) -> float:
    """Percent of ``expressions`` (each with ``sent_id`` and ``gt_box`` [4]) whose predicted box
    (``predictions``: sent_id -> [x1, y1, x2, y2], same pixels as ``gt_box``) has IoU >= 0.5 with
    ``gt_box``; an expression without a prediction counts as wrong."""
    hits = [e.sent_id in predictions and box_iou(predictions[e.sent_id], e.gt_box)[0] >= HIT_IOU
            for e in expressions]
    if not hits:
        raise ValueError("RefCOCO+ accuracy: no expression to score (is the split empty?)")
    return 100.0 * sum(hits) / len(hits)
