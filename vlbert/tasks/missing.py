"""Items whose image is missing, counted as the official evaluations count them: wrong.

The official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py), the RefCOCO+ accuracy and VCR's
Q->A, QA->R and Q->AR score every question or expression of a split; one with no prediction
cannot be right. Ours cannot
predict an item whose image is absent from the shards or cannot be decoded: it stays in the
denominator and scores 0, its count is reported as ``<split>/missing_images``, and a split
missing more than ``eval.max_missing_fraction`` of its items is an error (a wrong shard list
would otherwise produce a low score that looks like a model's).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def check_missing(split: str, missing: int, total: int, max_fraction: float, items: str) -> None:
    """Raise ValueError when more than ``max_fraction`` of the ``total`` items of ``split`` miss their image."""
    if total and missing > max_fraction * total:
        raise ValueError(f"{split}: {missing} of {total} {items} ({100.0 * missing / total:.2f}%) have no usable "
                         f"image in the shards, more than eval.max_missing_fraction={max_fraction:g}; check the "
                         f"split's image shards (or raise eval.max_missing_fraction)")


def missing_metrics(split: str, missing: int, total: int, max_fraction: float, items: str) -> dict[str, float]:
    """``{"<split>/missing_images": missing}``, printed and logged; ValueError past ``max_fraction``."""
    message = (f"{split}: {missing} of {total} {items} have no usable image; they count as wrong "
               f"(scored 0, kept in the denominator)")
    if missing:
        log.warning(message)
        print(message, flush=True)
    check_missing(split, missing, total, max_fraction, items)
    return {f"{split}/missing_images": float(missing)}
