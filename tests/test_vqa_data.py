"""VQA loaders on small files in the official formats: questions/annotations JSON, image shards."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlbert.config import CaptionDataConfig
from vlbert.tasks.images import ImageIndex
from vlbert.tasks.sampling import EpochBatchSampler, eval_batches
from vlbert.tasks.vqa.answers import AnswerVocab
from vlbert.tasks.vqa.data import VQADataset, VQAQuestion, encode_question, load_vqa_split

REPO = Path(__file__).resolve().parents[1]
IMAGE_CFG = CaptionDataConfig(short_side=64, max_long_side=64, min_boxes=1, max_boxes=4, flip_prob=0.0)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> Path:
    from vlbert.demo.make_vqa import make_demo_vqa

    root = tmp_path_factory.mktemp("vqa")
    make_demo_vqa(root, train_questions=12, val_questions=6, seed=0)
    return root


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_data / "tokenizer"))


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(w=40, h=20, left=(255, 0, 0), right=(0, 0, 255)) -> bytes:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2], arr[:, w // 2:] = left, right
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_official_files_are_read_with_their_answers(vqa):
    questions, annotations = load_vqa_split(str(vqa / "train_questions.json"), str(vqa / "train_annotations.json"))
    raw_q = json.loads((vqa / "train_questions.json").read_text())["questions"]
    raw_a = {a["question_id"]: a for a in json.loads((vqa / "train_annotations.json").read_text())["annotations"]}
    assert [q.question_id for q in questions] == [q["question_id"] for q in raw_q]
    q = questions[0]
    assert q.question == raw_q[0]["question"] and q.image_id == raw_q[0]["image_id"]
    assert q.answers == [a["answer"] for a in raw_a[q.question_id]["answers"]] and len(q.answers) == 10
    assert q.answer_type == raw_a[q.question_id]["answer_type"]
    assert len(annotations) == len(questions)
    # Questions alone (test-dev): no answers.
    test_questions, none = load_vqa_split(str(vqa / "val_questions.json"))
    assert none == [] and all(t.answers is None for t in test_questions)


def test_bad_files_give_clear_errors(vqa, tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"image_id": 1, "question": "x"}]}))
    with pytest.raises(ValueError, match="question 0 lacks"):
        load_vqa_split(str(tmp_path / "q.json"))
    with pytest.raises(ValueError, match="no annotation for"):
        load_vqa_split(str(vqa / "val_questions.json"), str(vqa / "train_annotations.json"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_vqa_split(str(tmp_path / "nope.json"))


def test_image_index_by_json_id_or_key_digits(tmp_path):
    path = tmp_path / "coco.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "COCO_train2014_000000000042.jpg", _jpeg())
        _add(tar, "sample7.png", _jpeg())
        _add(tar, "sample7.json", json.dumps({"image_id": 900, "boxes": [[0, 0, 10, 10]]}).encode())
        _add(tar, "nodigits.png", _jpeg())
    index = ImageIndex([str(path)])
    assert 42 in index and 900 in index and 7 not in index and len(index) == 2 and index.unnamed == 1
    files = index.read(900)
    assert set(files) == {"png", "json"} and json.loads(files["json"])["image_id"] == 900
    assert files["png"] == _jpeg()
    with pytest.raises(FileNotFoundError, match="matched no files"):
        ImageIndex([str(tmp_path / "missing-*.tar")])


def test_question_encoding_layout(tokenizer):
    ids, seg, mask_pos = encode_question("what colour is the circle", tokenizer, 16)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == ["[CLS]", "[UNK]", "colour", "is", "the", "circle", "[SEP]", "[MASK]", "[SEP]"]
    assert seg.tolist() == [0] * 7 + [1, 1]
    assert tokens[mask_pos] == "[MASK]"
    ids, seg, mask_pos = encode_question("red " * 40, tokenizer, 5)  # truncated question, same tail
    assert len(ids) == 9 and tokenizer.convert_ids_to_tokens(ids[-3:].tolist()) == ["[SEP]", "[MASK]", "[SEP]"]


def _flip_dataset(tmp_path, tokenizer, flip_prob):
    path = tmp_path / "img.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", _jpeg(64, 64))
        _add(tar, "a.json", json.dumps({"image_id": 5, "boxes": [[0, 0, 16, 64]], "box_scores": [1.0]}).encode())
    q = VQAQuestion(1, 5, "is the red shape left of the blue shape", ["left"] * 6 + ["right"] * 4)
    vocab = AnswerVocab(["left", "right"])
    cfg = CaptionDataConfig(short_side=64, max_long_side=64, min_boxes=1, max_boxes=4, flip_prob=flip_prob)
    return VQADataset([q], ImageIndex([str(path)]), cfg, tokenizer, vocab, 16, seed=0, train=True)


def test_flip_mirrors_the_image_and_swaps_left_right(tmp_path, tokenizer):
    plain = _flip_dataset(tmp_path, tokenizer, 0.0).sample(0, 0)
    flipped = _flip_dataset(tmp_path, tokenizer, 1.0).sample(0, 0)
    assert not plain.flipped and flipped.flipped
    assert plain.boxes[1].tolist() == [0, 0, 16, 64] and flipped.boxes[1].tolist() == [48, 0, 64, 64]
    assert plain.image[:, 10, 5].tolist()[0] > 200 and flipped.image[:, 10, 5].tolist()[2] > 200  # red <-> blue
    words = lambda s: tokenizer.convert_ids_to_tokens(s.input_ids.tolist())  # noqa: E731
    assert "left" in words(plain) and "right" in words(flipped) and "left" not in words(flipped)
    assert plain.targets == pytest.approx({0: 1.0, 1: 1.0})  # 6 x left, 4 x right: both >= 4 humans
    d = _flip_dataset(tmp_path, tokenizer, 1.0)
    d.questions[0].answers = ["left"] * 8 + ["right"] * 2
    assert d.sample(0, 0).targets == pytest.approx({1: 1.0, 0: 0.6})  # answers swapped too
    assert not d.sample(0, -1).flipped  # evaluation never flips


def test_batches_from_the_demo_files(vqa, tokenizer):
    questions, _ = load_vqa_split(str(vqa / "train_questions.json"), str(vqa / "train_annotations.json"))
    vocab = AnswerVocab(["yes", "no", "red", "0", "1", "2"])
    ds = VQADataset(questions, ImageIndex([str(vqa / "images/train-*.tar")]), IMAGE_CFG, tokenizer, vocab, 16)
    batch, skipped = ds[[(0, 0), (1, 0), (2, 0)]]
    assert skipped == {} and len(batch) == 3
    assert batch.targets.shape == (3, 6) and batch.question_ids.tolist() == [q.question_id for q in questions[:3]]
    rows = range(3)
    assert (batch.input_ids[list(rows), batch.mask_position] == tokenizer.mask_token_id).all()
    assert batch.box_mask[:, 0].all() and (batch.boxes[:, 0] == batch.boxes.new_tensor([0, 0, 64, 64])).all()
    assert batch.images.shape[-2:] == (64, 64)


def test_questions_without_images_are_left_out(vqa, tokenizer, caplog):
    """All present, some absent, none present. In the mixed set, questions 1, 3 and 4 point at image
    ids no shard holds (the demo shards' ids are all positive): exactly those three are left out, the others
    keep their order, and the warning counts 3 of 6. Fails if the filter keeps every question, drops
    the wrong ones, or the count is taken after filtering (then 0)."""
    questions, _ = load_vqa_split(str(vqa / "val_questions.json"), str(vqa / "val_annotations.json"))
    index = ImageIndex([str(vqa / "images/train-*.tar")] + [str(vqa / "images/val-*.tar")])
    ds = VQADataset(questions, index, IMAGE_CFG, tokenizer, None, 16)
    assert len(ds) == len(questions) == 6 and ds.missing_images == 0
    absent = {1, 3, 4}
    mixed = [dataclasses.replace(q, image_id=-1 - i) if i in absent else q for i, q in enumerate(questions)]
    with caplog.at_level(logging.WARNING, logger="vlbert.tasks.vqa.data"):
        ds = VQADataset(mixed, index, IMAGE_CFG, tokenizer, None, 16)
    assert [q.question_id for q in ds.questions] == [q.question_id for i, q in enumerate(questions) if i not in absent]
    assert len(ds) == 3 and ds.missing_images == 3
    assert "3 of 6 questions have no image in the shards; left out" in caplog.text
    with pytest.raises(ValueError, match="none of the"):
        VQADataset(questions, ImageIndex([str(vqa / "images/train-*.tar")]), IMAGE_CFG, tokenizer, None, 16)


def test_sampler_is_resumable_and_splits_ranks():
    s = EpochBatchSampler(10, micro_batch=2, rank=0, world_size=2, seed=3)
    assert s.batches_per_epoch == 2
    it = iter(s)
    straight = [next(it) for _ in range(5)]
    assert {e for b in straight for _, e in b} == {0, 1, 2}
    other = EpochBatchSampler(10, 2, rank=1, world_size=2, seed=3)
    mine = {i for b in straight[:2] for i, _ in b}
    theirs = {i for b in list(zip(range(2), iter(other))) for i, _ in b[1]}
    assert not mine & theirs
    resumed = EpochBatchSampler(10, 2, 0, 2, seed=3)
    resumed.resume_from(3)
    it = iter(resumed)
    assert [next(it) for _ in range(2)] == straight[3:5]
    assert eval_batches(5, 2, 1, 2) == [[(1, -1), (3, -1)]]
    with pytest.raises(ValueError, match="do not fill"):
        EpochBatchSampler(3, 2, 0, 2, 0)
