"""VCR metrics (Q->A, QA->R, Q->AR) and the leaderboard CSV against hand-computed cases.

Only numpy and the metric module are imported, so the file runs in a second (mutation testing
runs it once per mutant: docs/development.md, "Mutation testing")."""

from __future__ import annotations

import csv
import json

import pytest

from vlbert.tasks.vcr.metric import LEADERBOARD_COLUMNS, VCRPrediction, leaderboard_rows, vcr_accuracies, \
    write_leaderboard_csv

pytestmark = [pytest.mark.timeout(60)]


def test_three_metrics_on_hand_computed_cases():
    """q1 both right, q2 answer only, q3 rationale only, q4 no prediction: Q->A 50, QA->R 50,
    Q->AR 25. Fails if QA->R read the rationale given the predicted (not the right) answer, or
    if Q->AR were the product of the two accuracies (also 25 here, hence q5)."""
    labels = {"q1": (0, 1), "q2": (2, 3), "q3": (1, 0), "q4": (0, 0), "q5": (3, 3)}
    p = {
        "q1": VCRPrediction([0.7, 0.1, 0.1, 0.1], {0: [0.1, 0.6, 0.2, 0.1]}),
        "q2": VCRPrediction([0.1, 0.1, 0.7, 0.1], {2: [0.9, 0.0, 0.1, 0.0]}),
        # predicted answer 0, but the rationale given the right answer (1) is right
        "q3": VCRPrediction([0.4, 0.3, 0.2, 0.1], {1: [0.5, 0.2, 0.2, 0.1], 0: [0.0, 1.0, 0.0, 0.0]}),
        "q5": VCRPrediction([0.1, 0.1, 0.1, 0.7], {3: [0.1, 0.1, 0.1, 0.7]}),
    }
    m = vcr_accuracies(p, labels)
    assert m == pytest.approx({"val/q2a_acc": 60.0, "val/qa2r_acc": 60.0, "val/q2ar_acc": 40.0})
    assert vcr_accuracies(p, labels, ("q2a",)) == pytest.approx({"val/q2a_acc": 60.0})


def test_leaderboard_csv_columns_and_values(tmp_path):
    """The column list of rowanz/r2c models/eval_for_leaderboard.py, built the way it builds it
    (group names x 0..3) after annot_id. Fails if the groups were ordered by choice first or the
    rationale values were written transposed."""
    groups = ["answer"] + [f"rationale_conditioned_on_a{i}" for i in range(4)]
    expected = ["annot_id"] + [f"{g}_{i}" for g in groups for i in range(4)]
    rationale = {i: [i + 0.1 * j for j in range(4)] for i in range(4)}
    write_leaderboard_csv(str(tmp_path / "lb.csv"), {"test-7": VCRPrediction([0.1, 0.2, 0.3, 0.4], rationale)})
    rows = list(csv.reader(open(tmp_path / "lb.csv")))
    assert rows[0] == expected
    row = dict(zip(rows[0], rows[1]))
    assert row["annot_id"] == "test-7" and float(row["answer_2"]) == pytest.approx(0.3)
    assert float(row["rationale_conditioned_on_a2_1"]) == pytest.approx(2.1)
    assert float(row["rationale_conditioned_on_a1_3"]) == pytest.approx(1.3)
    with pytest.raises(ValueError, match="test-8"):
        write_leaderboard_csv(str(tmp_path / "x.csv"), {"test-8": VCRPrediction([0.25] * 4, {0: [0.25] * 4})})




def test_prediction_defaults_count_as_no_prediction():
    """A question's prediction starts empty (the evaluation fills in what the model scored): no
    answer probabilities (None, which the leaderboard check and the accuracies read as missing)
    and a dict of its own for the rationales. A default prediction scores wrong on both subtasks.
    Fails if the default answer were anything but None (e.g. "") or the rationale default were
    None or shared between predictions."""
    a, b = VCRPrediction(), VCRPrediction()
    assert a.answer is None and a.rationale == {} and a.rationale is not b.rationale
    a.rationale[0] = [1.0, 0.0, 0.0, 0.0]
    assert b.rationale == {}
    m = vcr_accuracies({"q1": VCRPrediction(), "q2": VCRPrediction([0.9, 0.1, 0, 0], {0: [0, 1, 0, 0]})},
                       {"q1": (0, 0), "q2": (0, 1)})
    assert m == pytest.approx({"val/q2a_acc": 50.0, "val/qa2r_acc": 50.0, "val/q2ar_acc": 50.0})


def test_prediction_json_has_string_keys_in_answer_order():
    """The predictions file (json has string keys only): ``{"answer": [...], "rationale": {"0":
    [...], ...}}`` with the conditioning answers in ascending order whatever order they were filled
    in. Fails if a key were renamed or the rationales were left in insertion order."""
    p = VCRPrediction([0.1, 0.2, 0.3, 0.4], {2: [0.5, 0.5, 0, 0], 0: [0, 0, 1, 0]})
    got = p.to_json()
    assert got == {"answer": [0.1, 0.2, 0.3, 0.4], "rationale": {"0": [0, 0, 1, 0], "2": [0.5, 0.5, 0, 0]}}
    assert list(got["rationale"]) == ["0", "2"]
    assert json.loads(json.dumps(got)) == got
    assert VCRPrediction().to_json() == {"answer": None, "rationale": {}}


def test_subtasks_prefix_and_no_labels():
    """One subtask reports its accuracy only (no Q->AR without both), under the given prefix; no
    labels, no metrics. Fails if a subtask's name or test were flipped, or the empty case raised."""
    labels = {"q1": (1, 2), "q2": (0, 0)}
    p = {"q1": VCRPrediction([0, 1, 0, 0], {1: [0, 0, 0, 1]}), "q2": VCRPrediction([0, 1, 0, 0], {0: [1, 0, 0, 0]})}
    # Q->A: q1 right, q2 wrong; QA->R: q1 wrong (3 != 2), q2 right; Q->AR: none.
    assert vcr_accuracies(p, labels, ("qa2r",), prefix="test") == pytest.approx({"test/qa2r_acc": 50.0})
    assert vcr_accuracies(p, labels, ("q2a",), prefix="test") == pytest.approx({"test/q2a_acc": 50.0})
    assert vcr_accuracies(p, labels, (), prefix="test") == {}
    assert vcr_accuracies(p, labels) == pytest.approx({"val/q2a_acc": 50.0, "val/qa2r_acc": 50.0,
                                                       "val/q2ar_acc": 0.0})
    assert vcr_accuracies(p, {}) == {}


def test_leaderboard_rows_and_what_a_question_misses():
    """A row is annot_id, the 4 answer probabilities, then the rationales given answers 0..3 (21
    values). A question without answer probabilities, or without the rationales given some answer,
    is an error that names the question and what it lacks. Fails if the row were built in another
    order, or if the message lost its words or named the wrong thing missing."""
    rationale = {i: [10 * i + j for j in range(4)] for i in range(4)}
    assert leaderboard_rows({"t1": VCRPrediction([1, 2, 3, 4], rationale)}) == [
        ["t1", 1, 2, 3, 4, 0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23, 30, 31, 32, 33]]
    assert len(LEADERBOARD_COLUMNS) == 21
    start = "t2: the leaderboard needs the answer probabilities and the rationale probabilities given every answer"
    with pytest.raises(ValueError) as e:
        leaderboard_rows({"t2": VCRPrediction(None, rationale)})
    assert str(e.value) == start + " (missing answers)"
    with pytest.raises(ValueError) as e:
        leaderboard_rows({"t2": VCRPrediction([1, 2, 3, 4], {0: rationale[0], 2: rationale[2]})})
    assert str(e.value) == start + " (missing [1, 3])"
