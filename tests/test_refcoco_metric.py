"""RefCOCO+ accuracy (IoU >= 0.5 with the referred object's box) against hand-computed cases and a
pixel-counting IoU.

Only numpy and the metric module are imported, so the file runs in a second (mutation testing
runs it once per mutant: docs/development.md, "Mutation testing")."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vlbert.tasks.refcoco.metric import HIT_IOU, box_iou, refcoco_accuracy

pytestmark = [pytest.mark.timeout(60)]


def _pixel_iou(a, b, size: int = 24) -> float:
    """IoU of two integer [x1, y1, x2, y2] boxes by counting the pixels each covers on a grid
    (no corner arithmetic, unlike ``box_iou``)."""
    masks = []
    for x1, y1, x2, y2 in (a, b):
        m = np.zeros((size, size), bool)
        m[y1:y2, x1:x2] = True
        masks.append(m)
    union = (masks[0] | masks[1]).sum()
    return float((masks[0] & masks[1]).sum() / union) if union else 0.0


def test_box_iou():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    assert box_iou(boxes, np.array([0, 0, 10, 10])) == pytest.approx([1.0, 50 / 150, 0.0])


def test_box_iou_matches_pixel_counting_on_random_boxes():
    """200 random integer box pairs of unequal width and height, overlapping or not, against the
    pixel count. Fails if any corner index is swapped (x for y, x1 for x2), if the overlap is not
    clipped at 0 (or is clipped at 1), or if either area is left out of the union."""
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(200):
        boxes = []
        for _ in range(2):
            x1, y1 = rng.integers(0, 18, size=2)
            w, h = rng.integers(1, 7, size=2)
            boxes.append([int(x1), int(y1), int(x1 + w), int(y1 + h)])
        pairs.append(boxes)
    many = np.array([a for a, _ in pairs])
    got = np.array([box_iou(np.array(a), np.array(b, np.float64))[0] for a, b in pairs])
    want = np.array([_pixel_iou(a, b) for a, b in pairs])
    assert got == pytest.approx(want)
    assert 0 < (want == 0).sum() < len(pairs) and 0 < ((want > 0) & (want < 1)).sum()  # both kinds occur
    # Several boxes at once against one: row i is the IoU of box i.
    gt = np.array([3, 4, 9, 8], np.float64)
    assert box_iou(many, gt) == pytest.approx([_pixel_iou(a, [3, 4, 9, 8]) for a in many.tolist()])


def test_box_iou_of_sub_pixel_and_degenerate_boxes():
    """A half-pixel box against its lower half: intersection 1/8, union 1/4, IoU 0.5 (fails if a
    union under 1 were treated as empty or floored at 1). Two empty boxes (union 0) have IoU 0, not
    1 or NaN; a zero-width box inside another has IoU 0. A flat [4] list is one box (shape [1])."""
    assert box_iou([0, 0, 0.5, 0.5], np.array([0, 0, 0.5, 0.25])) == pytest.approx([0.5])
    degenerate = box_iou([1, 1, 1, 1], np.array([1, 1, 1, 1.0]))
    assert degenerate.shape == (1,) and degenerate[0] == 0.0
    assert box_iou([2, 2, 2, 5], np.array([0, 0, 4, 4.0]))[0] == 0.0


def _expr(sent_id, box=(0, 0, 10, 10)):
    return SimpleNamespace(sent_id=sent_id, gt_box=np.array(box, np.float64))


def test_box_iou_is_exact_for_tiny_boxes():
    """IoU is a ratio: a box of 1e-7 x 1e-7 pixels against itself has IoU 1 and against its left
    half 1/2, and no warning is raised for an empty union. Fails if the union were floored at a
    constant (1e-12 would give 0.01 and 0.005) or the division ran where the union is empty."""
    import warnings

    tiny = np.array([0, 0, 1e-7, 1e-7])
    assert box_iou([tiny, [0, 0, 0.5e-7, 1e-7]], tiny) == pytest.approx([1.0, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert box_iou([[3, 3, 3, 3]], np.array([3, 3, 3, 3.0])).tolist() == [0.0]


def test_accuracy_counts_hits_at_iou_half_and_missing_as_wrong():
    """Ground truth [0, 0, 10, 10] throughout: the same box (IoU 1, hit), twice as wide from the same
    corner (IoU exactly 1/2, a hit at the >= 0.5 threshold), shifted by half its width (IoU 1/3,
    miss), no prediction (miss): 2 of 4 = 50%. A prediction for an expression outside the split
    does not count. Fails if the threshold were > 0.5 or not 0.5, if a missing expression left the
    denominator (66.7%) or raised, or if the percent scale were off."""
    exprs = [_expr(1), _expr(2), _expr(3), _expr(4)]
    preds = {1: [0, 0, 10, 10], 2: [0, 0, 20, 10], 3: [5, 0, 15, 10], 99: [0, 0, 10, 10]}
    assert [_pixel_iou(preds[i], [0, 0, 10, 10]) for i in (1, 2, 3)] == pytest.approx([1, 0.5, 1 / 3])
    assert HIT_IOU == 0.5
    assert refcoco_accuracy(exprs, preds) == pytest.approx(50.0)
    assert refcoco_accuracy(exprs[:1], preds) == pytest.approx(100.0)
    assert refcoco_accuracy(exprs[2:], preds) == 0.0
    # a generator of expressions works too (the split is walked once)
    assert refcoco_accuracy((e for e in exprs[:2]), preds) == pytest.approx(100.0)


def test_accuracy_of_no_expressions_is_an_error():
    """An empty split has no accuracy: a clear error, not ZeroDivisionError. Fails if the check or
    its words were lost."""
    with pytest.raises(ValueError, match=r"^RefCOCO\+ accuracy: no expression to score \(is the split empty\?\)$"):
        refcoco_accuracy([], {1: [0, 0, 1, 1]})
