"""VCR evaluation counts a question whose image is missing the way VQA and RefCOCO+ do
(``vlbert.tasks.missing``): it scores 0 in Q->A, QA->R and Q->AR and stays in their denominators,
``<split>/missing_images`` reports it, more than ``eval.max_missing_fraction`` of a split is an
error naming the split and the count, and the test leaderboard CSV still has its row (uniform
probabilities).

Four questions (demo scenes, vlbert.demo.make_vcr); the shards lose question 2's image. A stand-in
model puts all probability on the choice we pick, so the expected figures follow by hand.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlbert.tasks.config import load_finetune_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[1]


def _rewrite_shard(shard: Path, drop: set[str] = frozenset(), corrupt: set[str] = frozenset()) -> None:
    """Rewrite ``shard`` without the members in ``drop`` and with bytes no decoder reads in ``corrupt``."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            if name in drop:
                continue
            data = b"not an image" if name in corrupt else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _records(root: Path, split: str) -> list[dict]:
    return [json.loads(x) for x in (root / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture()
def vcr4(tmp_path) -> Path:
    """Four val and four test questions; question 2's image is absent from both splits' shards."""
    from vlbert.demo.make_vcr import make_demo_vcr

    root = tmp_path / "vcr"
    make_demo_vcr(root, train=1, val=4, test=4, seed=5)
    for split in ("val", "test"):
        _rewrite_shard(root / "images" / f"{split}-00000.tar", drop={_records(root, split)[2]["img_fn"]})
    return root


def _task(demo_data: Path, root: Path, tmp_path: Path, *overrides: str):
    from transformers import AutoTokenizer

    from vlbert.tasks.vcr.task import VCRTask

    def split(name):
        return json.dumps({"annotations": str(root / f"{name}.jsonl"), "metadata": str(root / "metadata"),
                           "images": [str(root / f"images/{name}-*.tar")]})

    cfg = load_finetune_config(REPO / "configs/vcr_tiny.yaml", [
        f"vcr.tokenizer={demo_data / 'tokenizer'}", f"vcr.train={split('train')}", f"vcr.val={split('val')}",
        f"vcr.test={split('test')}", f"runtime.output_dir={tmp_path / 'out'}", "tracking.enabled=false",
        *overrides])
    return VCRTask(cfg, AutoTokenizer.from_pretrained(cfg.tokenizer))


def _picking(dataset, answer_of: dict[str, int], rationale_of: dict[str, int]):
    """A stand-in model: for each item of the batch, all probability on the choice we pick
    (Q->A: ``answer_of[annot_id]``; QA->R, whatever answer it is given: ``rationale_of[annot_id]``)."""
    def forward(batch):
        logits = torch.full((len(batch), 4), -30.0)
        for row, k in enumerate(batch.items.tolist()):
            item = dataset.items[k]
            annot_id = dataset.examples[item.example].annot_id
            logits[row, (answer_of if item.subtask == "q2a" else rationale_of)[annot_id]] = 30.0
        return SimpleNamespace(logits=logits)
    return forward


def test_missing_image_is_wrong_in_all_three_accuracies(demo_data, vcr4, tmp_path, capsys):
    """val-0 answer and rationale right; val-1 answer right, rationale wrong; val-2 image absent
    (the stand-in would get both right); val-3 answer wrong, rationale right. Over all four:
    Q->A 2/4 = 50, QA->R 2/4 = 50, Q->AR 1/4 = 25, one missing image. Fails if the absent question
    leaves the denominators (then 66.7, 66.7, 33.3: broken by building the val labels only from
    the questions whose image is in the shards) or if missing_images is not reported (broken by
    dropping missing_metrics from VCRTask.score)."""
    labels = {r["annot_id"]: (r["answer_label"], r["rationale_label"]) for r in _records(vcr4, "val")}
    task = _task(demo_data, vcr4, tmp_path, "eval.max_missing_fraction=0.25")
    (eval_set,) = task.eval_sets()
    answers = {"val-0": labels["val-0"][0], "val-1": labels["val-1"][0], "val-2": labels["val-2"][0],
               "val-3": (labels["val-3"][0] + 1) % 4}
    rationales = {"val-0": labels["val-0"][1], "val-1": (labels["val-1"][1] + 1) % 4, "val-2": labels["val-2"][1],
                  "val-3": labels["val-3"][1]}
    predictions = task.predict(_picking(eval_set.dataset, answers, rationales), eval_set, 0, 1)
    assert list(predictions) == ["val-0", "val-1", "val-2", "val-3"]
    assert predictions["val-2"].answer is None and predictions["val-2"].rationale == {}
    assert task.score(eval_set, predictions) == pytest.approx(
        {"val/q2a_acc": 50.0, "val/qa2r_acc": 50.0, "val/q2ar_acc": 25.0, "val/missing_images": 1.0})
    assert "val: 1 of 4 questions have no usable image" in capsys.readouterr().out


def test_too_many_missing_is_an_error_naming_split_and_count(demo_data, vcr4, tmp_path):
    """1 of 4 absent is past the default 1%: an error before predicting. Within 0.25, an unreadable
    image on val-1 makes it 2 of 4 once predicted: an error when scoring. Fails if VCRTask.eval_set
    does not call check_missing (broken by removing that call: no error at eval_sets) or if an
    unreadable image is not counted as missing (broken by counting only absent keys in score)."""
    with pytest.raises(ValueError, match=r"val: 1 of 4 questions \(25.00%\).*eval.max_missing_fraction=0.01"):
        _task(demo_data, vcr4, tmp_path).eval_sets()
    _rewrite_shard(vcr4 / "images" / "val-00000.tar", corrupt={_records(vcr4, "val")[1]["img_fn"]})
    task = _task(demo_data, vcr4, tmp_path, "eval.max_missing_fraction=0.25")
    (eval_set,) = task.eval_sets()
    predictions = task.predict(_picking(eval_set.dataset, dict.fromkeys(eval_set.annot_ids, 0),
                                        dict.fromkeys(eval_set.annot_ids, 0)), eval_set, 0, 1)
    with pytest.raises(ValueError, match=r"val: 2 of 4 questions \(50.00%\)"):
        task.score(eval_set, predictions)


def test_leaderboard_has_a_uniform_row_for_a_question_without_image(demo_data, vcr4, tmp_path):
    """--split test: every annot_id gets a row, in file order; test-2 (image absent) has 0.25 in all
    20 columns and nulls in the predictions JSON, the others the stand-in's one-hot choices;
    ``test/missing_images`` is 1 and there is no accuracy. Fails if the CSV is skipped or loses
    test-2 (broken by writing the CSV only when every question is complete, as before), or if
    the uniform value is not 1/4."""
    task = _task(demo_data, vcr4, tmp_path, "eval.max_missing_fraction=0.25")
    (eval_set,) = task.eval_sets("test")
    ids = [r["annot_id"] for r in _records(vcr4, "test")]
    answers = {a: i % 4 for i, a in enumerate(ids)}
    rationales = {a: (i + 2) % 4 for i, a in enumerate(ids)}
    predictions = task.predict(_picking(eval_set.dataset, answers, rationales), eval_set, 0, 1)
    assert task.score(eval_set, predictions) == {"test/missing_images": 1.0}
    task.write_predictions(str(tmp_path / "test_predictions.json"), predictions)

    written = json.loads((tmp_path / "test_predictions.json").read_text())
    assert written["test-2"] == {"answer": None, "rationale": {}}
    rows = list(csv.DictReader(open(tmp_path / "test_leaderboard.csv")))
    assert [r["annot_id"] for r in rows] == ids == ["test-0", "test-1", "test-2", "test-3"]
    groups = ["answer"] + [f"rationale_conditioned_on_a{i}" for i in range(4)]
    for r in rows:
        i = ids.index(r["annot_id"])
        for g in groups:
            got = [float(r[f"{g}_{j}"]) for j in range(4)]
            if r["annot_id"] == "test-2":
                assert got == [0.25] * 4, g
            else:
                pick = answers[r["annot_id"]] if g == "answer" else rationales[r["annot_id"]]
                assert got == pytest.approx([1.0 if j == pick else 0.0 for j in range(4)], abs=1e-6), (i, g)


def test_leaderboard_completion_keeps_what_was_predicted():
    """A question with its answer and one conditioned rationale keeps those and gets 1/4 in the
    three groups it lacks; a complete one is unchanged; the count of filled questions is 1. Fails
    if a predicted group were overwritten (broken by always using UNIFORM for the rationales) or
    the count included complete questions."""
    from vlbert.tasks.vcr.metric import VCRPrediction, complete_for_leaderboard

    full = VCRPrediction([0.4, 0.3, 0.2, 0.1], {i: [0.1 * (i + 1)] * 4 for i in range(4)})
    part = VCRPrediction([0.1, 0.2, 0.3, 0.4], {1: [0.7, 0.1, 0.1, 0.1]})
    done, filled = complete_for_leaderboard({"a": full, "b": part})
    assert filled == 1 and list(done) == ["a", "b"]
    assert done["a"].answer == full.answer and done["a"].rationale == full.rationale
    assert done["b"].answer == [0.1, 0.2, 0.3, 0.4]
    assert done["b"].rationale == {0: [0.25] * 4, 1: [0.7, 0.1, 0.1, 0.1], 2: [0.25] * 4, 3: [0.25] * 4}
