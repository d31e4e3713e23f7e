"""Evaluation keeps the official denominators: a question (VQA) or an expression (RefCOCO+) whose
image is missing from the shards, or cannot be decoded, counts as wrong; the count is reported
as ``<split>/missing_images``; more than ``eval.max_missing_fraction`` missing is an error that
names the split and the count."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from vlbert.tasks.config import load_finetune_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[1]
IMAGE = {"short_side": 32, "max_long_side": 32, "flip_prob": 0.0, "min_boxes": 1, "max_boxes": 2}


def _add(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _shard(path: Path, image_ids: list[int], broken: tuple[int, ...] = ()) -> str:
    """A caption-style shard holding ``image_ids`` (those in ``broken`` with undecodable bytes)."""
    with tarfile.open(path, "w") as tar:
        for i in image_ids:
            _add(tar, f"COCO_val2014_{i:012d}.png", b"not an image" if i in broken else _png())
            _add(tar, f"COCO_val2014_{i:012d}.json", json.dumps({"boxes": [[2, 2, 20, 20]], "box_scores": [0.9]}).encode())
    return str(path)


def _config(demo_data: Path, tmp_path: Path, section: str, *overrides: str):
    return load_finetune_config(REPO / "configs/vqa_tiny.yaml", [
        f"{section}", f"runtime.output_dir={tmp_path / 'out'}", "tracking.enabled=false", *overrides],
        check_files=False)


# ------------------------------------------------------------------------------------------ VQA


@pytest.fixture()
def vqa_files(tmp_path):
    """Five questions on images 1..5; the shard has 1, 2 and 5 (5 undecodable), so 3 are missing.
    Answers: q1 ten times "yes"; q2 three "2" and seven "3"; q3..q5 ten times "no"."""
    answers = {1: ["yes"] * 10, 2: ["2"] * 3 + ["3"] * 7, 3: ["no"] * 10, 4: ["no"] * 10, 5: ["no"] * 10}
    questions = [{"question_id": q, "image_id": q, "question": "what is it?"} for q in answers]
    annotations = [{"question_id": q, "image_id": q, "answer_type": "other", "question_type": "what",
                    "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(ans)]}
                   for q, ans in answers.items()]
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": annotations}))
    split = {"questions": str(tmp_path / "q.json"), "annotations": str(tmp_path / "a.json"),
             "images": [_shard(tmp_path / "val.tar", [1, 2, 5], broken=(5,))]}
    (tmp_path / "answers.txt").write_text("yes\nno\n2\n3\n")
    return split


def _vqa_task(demo_data, tmp_path, split, *overrides):
    from transformers import AutoTokenizer

    from vlbert.tasks.vqa.task import VQATask

    cfg = _config(demo_data, tmp_path, f"vqa.val={json.dumps(split)}", "vqa.train=[]",
                  f"vqa.tokenizer={demo_data / 'tokenizer'}", f"vqa.answers_file={tmp_path / 'answers.txt'}",
                  f"vqa.image={json.dumps(IMAGE)}", *overrides)
    return VQATask(cfg, AutoTokenizer.from_pretrained(cfg.tokenizer))


def _answering(task, answer_of: dict[int, str]):
    """A stand-in model: for each question of the batch, a one-hot logit on the answer we choose."""
    def forward(batch):
        logits = torch.zeros(len(batch.question_ids), len(task.vocab))
        for row, qid in enumerate(batch.question_ids.tolist()):
            logits[row, task.vocab.answers.index(answer_of[qid])] = 1.0
        return SimpleNamespace(logits=logits)
    return forward


def test_vqa_missing_images_score_zero_and_stay_in_the_denominator(demo_data, tmp_path, vqa_files, capsys):
    """q1 right (1.0); q2 answered "2", said by 3 of 10 humans: official accuracy mean over the 10
    leave-one-out subsets = (3 x min(1, 2/3) + 7 x min(1, 3/3)) / 10 = 0.9; q3, q4 (absent) and
    q5 (undecodable) score 0: overall 100 x 1.9 / 5 = 38.0. Fails if the missing questions leave
    the denominator (then 95.0) or if an undecodable image is not counted."""
    task = _vqa_task(demo_data, tmp_path, vqa_files, "eval.max_missing_fraction=0.6")
    (eval_set,) = task.eval_sets()
    predictions = task.predict(_answering(task, {1: "yes", 2: "2", 5: "no"}), eval_set, 0, 1)
    assert set(predictions) == {1, 2}
    metrics = task.score(eval_set, predictions)
    assert metrics["val/vqa_acc"] == pytest.approx(38.0)
    assert metrics["val/missing_images"] == 3.0
    assert "val: 3 of 5 questions have no usable image" in capsys.readouterr().out


def test_vqa_too_many_missing_is_an_error_naming_split_and_count(demo_data, tmp_path, vqa_files):
    """Fails if the check is missing or counts wrongly: 2 of 5 absent from the shards (the
    undecodable one is found only when predicting), 3 of 5 once scored."""
    with pytest.raises(ValueError, match=r"val: 2 of 5 questions \(40.00%\).*eval.max_missing_fraction=0.01"):
        _vqa_task(demo_data, tmp_path, vqa_files).eval_sets()
    task = _vqa_task(demo_data, tmp_path, vqa_files, "eval.max_missing_fraction=0.5")
    (eval_set,) = task.eval_sets()  # 2 of 5 absent: within 0.5
    predictions = task.predict(_answering(task, {1: "yes", 2: "2", 5: "no"}), eval_set, 0, 1)
    with pytest.raises(ValueError, match=r"val: 3 of 5 questions \(60.00%\)"):
        task.score(eval_set, predictions)  # the undecodable image makes it 3


def test_vqa_unannotated_split_reports_missing(demo_data, tmp_path, vqa_files):
    """test-dev (no annotations): no accuracy, but the missing count."""
    split = {**vqa_files, "annotations": ""}
    task = _vqa_task(demo_data, tmp_path, split, "eval.max_missing_fraction=1")
    (eval_set,) = task.eval_sets()
    predictions = task.predict(_answering(task, {1: "yes", 2: "2", 5: "no"}), eval_set, 0, 1)
    assert task.score(eval_set, predictions) == {"val/missing_images": 3.0}


def test_max_missing_fraction_is_checked():
    from vlbert.config_reader import ConfigError

    with pytest.raises(ConfigError, match="eval.max_missing_fraction"):
        load_finetune_config(REPO / "configs/vqa_tiny.yaml", ["eval.max_missing_fraction=1.5"], check_files=False)
    assert load_finetune_config(REPO / "configs/vqa_tiny.yaml", check_files=False).eval.max_missing_fraction == 0.01


# ------------------------------------------------------------------------------------- RefCOCO+


def test_refcoco_missing_images_count_as_wrong(demo_data, tmp_path, capsys):
    """Four expressions on images 1..4, images 3 and 4 absent from the shards; the stand-in model
    picks the ground-truth box for both present ones: accuracy 100 x 2 / 4 = 50.0 (not 100).
    Fails if the missing expressions leave the denominator."""
    from transformers import AutoTokenizer

    from vlbert.tasks.refcoco.task import RefCOCOTask

    gt = [2, 2, 18, 18]  # COCO xywh [2, 2, 16, 16]
    images = [{"id": i, "width": 32, "height": 32} for i in range(1, 5)]
    anns = [{"id": i, "image_id": i, "bbox": [2, 2, 16, 16], "category_id": 1} for i in range(1, 5)]
    refs = [{"ref_id": i, "ann_id": i, "image_id": i, "split": "val",
             "sentences": [{"sent": "the square", "sent_id": 10 * i}]} for i in range(1, 5)]
    (tmp_path / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    rc = {"tokenizer": str(demo_data / "tokenizer"), "refs": str(tmp_path / "refs.json"),
          "instances": str(tmp_path / "instances.json"), "images": [_shard(tmp_path / "val.tar", [1, 2])],
          "train_split": "val", "val_splits": ["val"], "image": IMAGE, "eval_batch_size": 4, "num_workers": 0}

    def task_with(*overrides):
        cfg = _config(demo_data, tmp_path, "vqa=null", f"refcoco={json.dumps(rc)}", *overrides)
        return RefCOCOTask(cfg, AutoTokenizer.from_pretrained(cfg.tokenizer))

    with pytest.raises(ValueError, match=r"val: 2 of 4 expressions \(50.00%\)"):
        task_with().eval_sets()
    task = task_with("eval.max_missing_fraction=0.5")
    (eval_set,) = task.eval_sets()

    def forward(batch):  # the box of each batch row nearest the ground truth, in the batch's pixels
        return SimpleNamespace(top_boxes=torch.tensor([gt] * len(batch.sent_ids)) * batch.scales)

    predictions = task.predict(forward, eval_set, 0, 1)
    assert set(predictions) == {10, 20}
    metrics = task.score(eval_set, predictions)
    assert metrics == {"val/refcoco_acc": pytest.approx(50.0), "val/missing_images": 2.0}
    assert "val: 2 of 4 expressions have no usable image" in capsys.readouterr().out
