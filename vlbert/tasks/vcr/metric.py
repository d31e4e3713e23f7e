"""VCR metrics and the leaderboard file.

Accuracies (percent), per question:
- Q->A: the highest-scored answer is the right one;
- QA->R: given the right answer in the context, the highest-scored rationale is the right one;
- Q->AR: both (jackroos/VL-BERT, common/metrics/vcr_metrics.py ``JointAccuracy``).
A question without a prediction (its image absent from the shards or unreadable, its metadata
unreadable) counts as wrong and stays in the denominator (``vlbert.tasks.missing``).

Leaderboard CSV (rowanz/r2c, models/eval_for_leaderboard.py; jackroos/VL-BERT,
vcr/function/test.py): one row per test question, ``annot_id`` then the answer
probabilities ``answer_0`` .. ``answer_3`` and, for each answer i, the rationale
probabilities given that answer, ``rationale_conditioned_on_a{i}_0`` .. ``_3``. The
leaderboard wants a row for every annot_id of the test set; a question we could not predict
gets uniform probabilities (``UNIFORM``) in each group it lacks (``complete_for_leaderboard``):
the leaderboard's argmax then picks choice 0, a guess, so the count of such questions is
reported as ``test/missing_images`` and bounded by ``eval.max_missing_fraction``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Optional

import fsspec
import numpy as np

NUM_CHOICES = 4
LEADERBOARD_COLUMNS = (["annot_id"] + [f"answer_{j}" for j in range(NUM_CHOICES)]
                       + [f"rationale_conditioned_on_a{i}_{j}" for i in range(NUM_CHOICES) for j in range(NUM_CHOICES)])
UNIFORM = [1.0 / NUM_CHOICES] * NUM_CHOICES  # a group's probabilities for a question without a prediction


@dataclass
class VCRPrediction:
    """Probabilities (softmax over the 4 choices) of one question."""

    answer: Optional[list[float]] = None
    rationale: dict[int, list[float]] = field(default_factory=dict)  # conditioning answer -> 4 probabilities

    @property
    def empty(self) -> bool:
        """Nothing predicted (the placeholder of a question whose image or metadata could not be read)."""
        return self.answer is None and not self.rationale

    @property
    def leaderboard_ready(self) -> bool:
        """The answer and the rationale given each of the 4 answers (test split, both subtasks)."""
        return self.answer is not None and len(self.rationale) == NUM_CHOICES

    def to_json(self) -> dict:
        return {"answer": self.answer, "rationale": {str(k): v for k, v in sorted(self.rationale.items())}}


def vcr_accuracies(predictions: dict[str, VCRPrediction], labels: dict[str, tuple[int, int]],
                   subtasks: tuple[str, ...] = ("q2a", "qa2r"), prefix: str = "val") -> dict[str, float]:
    """``{prefix}/q2a_acc``, ``{prefix}/qa2r_acc`` and (with both subtasks) ``{prefix}/q2ar_acc``, in percent,
    over every question of ``labels`` (annot_id -> (answer_label, rationale_label))."""
    if not labels:
        return {}
    qa, qr = [], []
    for annot_id, (answer_label, rationale_label) in labels.items():
        p = predictions.get(annot_id)
        qa.append(p is not None and p.answer is not None and int(np.argmax(p.answer)) == answer_label)
        r = p.rationale.get(answer_label) if p is not None else None
        qr.append(r is not None and int(np.argmax(r)) == rationale_label)
    out = {}
    if "q2a" in subtasks:
        out[f"{prefix}/q2a_acc"] = 100.0 * float(np.mean(qa))
    if "qa2r" in subtasks:
        out[f"{prefix}/qa2r_acc"] = 100.0 * float(np.mean(qr))
    if "q2a" in subtasks and "qa2r" in subtasks:
        out[f"{prefix}/q2ar_acc"] = 100.0 * float(np.mean(np.logical_and(qa, qr)))
    return out


def complete_for_leaderboard(predictions: dict[str, VCRPrediction]) -> tuple[dict[str, VCRPrediction], int]:
    """Every question with all 20 probabilities: a group it lacks becomes ``UNIFORM``. Returns the
    completed predictions (same keys and order) and how many questions needed filling."""
    out, filled = {}, 0
    for annot_id, p in predictions.items():
        filled += not p.leaderboard_ready
        out[annot_id] = VCRPrediction(p.answer if p.answer is not None else list(UNIFORM),
                                      {i: p.rationale.get(i, list(UNIFORM)) for i in range(NUM_CHOICES)})
    return out, filled


def leaderboard_rows(predictions: dict[str, VCRPrediction]) -> list[list]:
    """Rows in ``LEADERBOARD_COLUMNS`` order; every question needs all 20 probabilities."""
    rows = []
    for annot_id, p in predictions.items():
        missing = [i for i in range(NUM_CHOICES) if i not in p.rationale]
        if p.answer is None or missing:
            raise ValueError(f"{annot_id}: the leaderboard needs the answer probabilities and the rationale "
                             f"probabilities given every answer (missing {'answers' if p.answer is None else missing})")
        rows.append([annot_id, *p.answer, *(x for i in range(NUM_CHOICES) for x in p.rationale[i])])
    return rows


def write_leaderboard_csv(url: str, predictions: dict[str, VCRPrediction]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(LEADERBOARD_COLUMNS)
    writer.writerows(leaderboard_rows(predictions))
    with fsspec.open(url, "w") as f:
        f.write(buf.getvalue())
