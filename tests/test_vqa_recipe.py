"""The reference's VQA recipe (jackroos/VL-BERT cfgs/vqa/base_4x16G_fp32.yaml and
vqa/modules/resnet_vlbert_for_vqa.py): regions at confidence 0.2, 10-100 per image; the answer
vocabulary from train+val when the config says so; a Xavier-initialised classifier; the
whole-image feature of the reference's end-to-end path (box 0 pooled) or of its precomputed
path (mean of the box features)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlbert.config import ConfigError
from vlbert.tasks.config import load_finetune_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[1]


def _split(tmp_path: Path, name: str, answers: list[str]) -> dict:
    """One question per answer, all ten humans agreeing (multiple_choice_answer = the answer)."""
    qs = [{"question_id": 1000 * len(name) + i, "image_id": i, "question": "what is it?"}
          for i in range(len(answers))]
    anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "multiple_choice_answer": a,
             "answer_type": "other", "question_type": "what",
             "answers": [{"answer": a, "answer_id": k + 1} for k in range(10)]} for q, a in zip(qs, answers)]
    (tmp_path / f"{name}_q.json").write_text(json.dumps({"questions": qs}))
    (tmp_path / f"{name}_a.json").write_text(json.dumps({"annotations": anns}))
    return {"questions": str(tmp_path / f"{name}_q.json"), "annotations": str(tmp_path / f"{name}_a.json"),
            "images": [str(tmp_path / f"{name}-*.tar")]}  # never opened: the vocabulary needs no image


def _vocab(tmp_path: Path, answers_from: str) -> list[str]:
    from vlbert.tasks.vqa.task import VQATask

    train = _split(tmp_path, "train", ["cat", "cat", "dog"])
    val = _split(tmp_path, "val", ["zebra", "zebra", "dog"])
    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", [
        f"vqa.train=[{json.dumps(train)}]", f"vqa.val={json.dumps(val)}", "vqa.min_answer_count=2",
        f"vqa.answers_from={answers_from}"], check_files=False)
    return VQATask(cfg, tokenizer=None).vocab.answers


def test_answers_from_train_plus_val(tmp_path):
    """min count 2: from train only, "cat" (2 train questions); from train+val also "zebra" (2, val
    only) and "dog" (1 + 1). Fails if train+val still counts the training annotations only."""
    assert sorted(_vocab(tmp_path, "train")) == ["cat"]
    assert sorted(_vocab(tmp_path, "train+val")) == ["cat", "dog", "zebra"]


def test_answers_from_train_plus_val_needs_val_annotations():
    """Fails if a train+val vocabulary without val annotations is accepted silently."""
    with pytest.raises(ConfigError, match="vqa.answers_from"):
        load_finetune_config(REPO / "configs/vqa_tiny.yaml", ["vqa.val=null", "vqa.answers_from=train+val"],
                             check_files=False)
    with pytest.raises(ConfigError, match="vqa.answers_from"):
        load_finetune_config(REPO / "configs/vqa_tiny.yaml", ["vqa.answers_from=val"], check_files=False)


def test_classifier_starts_xavier_uniform():
    """The reference's init_weight: xavier_uniform_ on the classifier, bias 0. Xavier-uniform is
    U(-a, a), a = sqrt(6 / (fan_in + fan_out)), variance a^2 / 3 = 2 / (fan_in + fan_out).
    Fails if the classifier keeps normal(0.02) (variance 4e-4 against 9.8e-4 here)."""
    from vlbert.tasks.vqa.model import VLBertForVQA

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", check_files=False)
    torch.manual_seed(0)
    answers = 2000
    model = VLBertForVQA(cfg.model, cfg.detector, answers)
    w, b = model.head.classifier.weight.detach(), model.head.classifier.bias.detach()
    fan_in, fan_out = cfg.model.hidden_size, answers
    assert w.shape == (fan_out, fan_in) and torch.all(b == 0)
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    assert float(w.abs().max()) <= bound
    assert float(w.var()) == pytest.approx(2.0 / (fan_in + fan_out), rel=0.05)


def test_mean_whole_image_feature():
    """Box 0 becomes the mean of the image's other real boxes (padding left out); an image with
    no other box keeps its own. Fails if padding or box 0 enters the mean."""
    from vlbert.tasks.backbone import mean_whole_image

    a = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, 6.0], [100.0, 100.0]],
                      [[5.0, 7.0], [8.0, 8.0], [8.0, 8.0], [8.0, 8.0]]])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    out = mean_whole_image(a, mask)
    assert out[0, 0].tolist() == [2.0, 4.0] and out[1, 0].tolist() == [5.0, 7.0]
    assert torch.equal(out[:, 1:], a[:, 1:])


@pytest.mark.parametrize("mode", ["pooled", "mean"])
def test_backbone_whole_image_switch(mode, monkeypatch):
    """``model.whole_image`` decides what the encoder gets for box 0: the detector's pooled box
    (the reference's end-to-end path) or the mean of the other boxes (its precomputed path).
    Fails if the switch is ignored."""
    from vlbert.tasks.backbone import Backbone, ImageInputs

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", [f"model.whole_image={mode}"], check_files=False)
    backbone = Backbone(cfg.model, cfg.detector)
    pooled = torch.tensor([[[9.0] * 4, [1.0] * 4, [3.0] * 4]])
    seen = {}
    monkeypatch.setattr(backbone.detector, "forward", lambda images, boxes, mask: pooled)
    monkeypatch.setattr(backbone.vlbert, "forward", lambda ids, att, visual, types: seen.setdefault("v", visual))
    image = ImageInputs(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.tensor([[8, 8]]),
                        torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
    backbone(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3), image)
    assert seen["v"].appearance[0, 0].tolist() == ([9.0] * 4 if mode == "pooled" else [2.0] * 4)


def test_vqa_base_yaml_is_the_reference_recipe():
    """configs/vqa_base.yaml against cfgs/vqa/base_4x16G_fp32.yaml: 4 GPUs x BATCH_IMAGES 64 = 256;
    lr = LR 6.25e-7 x 256 (vqa/function/train.py); WARMUP_STEPS 500; END_EPOCH 5; WD 1e-4;
    CLIP_GRAD_NORM 1.0; CLASSIFIER_DROPOUT 0.1; "10-100ada" boxes (bottom-up-attention: conf 0.2,
    10 to 100 boxes); answers of train2014 + val2014. Fails if a value drifts or the file stops loading."""
    cfg = load_finetune_config(REPO / "configs/vqa_base.yaml", check_files=False)
    v, o = cfg.vqa, cfg.optim
    assert v.batch_size == 4 * 64 and o.lr == pytest.approx(6.25e-7 * 256)
    assert (o.warmup_steps, o.decay_steps, cfg.epochs, o.weight_decay, o.grad_clip) == (500, 0, 5, 1e-4, 1.0)
    assert cfg.model.head_dropout == 0.1 and cfg.model.whole_image == "pooled"
    assert (v.image.min_box_score, v.image.min_boxes, v.image.max_boxes) == (0.2, 10, 100)
    assert (v.answers_from, v.min_answer_count, v.answers_file) == ("train+val", 9, "")


@pytest.mark.parametrize("n_good, kept", [(5, 10), (12, 12), (120, 100)])
def test_vqa_base_regions_keep_10_to_100_at_confidence_0_2(n_good, kept):
    """With vqa_base.yaml's image section, boxes scoring >= 0.2 are kept, topped up by score to 10
    and cut at 100 (bottom-up-attention's generate_tsv: conf_thresh 0.2, MIN_BOXES 10, MAX_BOXES 100).
    Scores: n_good boxes at 0.3 (>= 0.2, < 0.5), then boxes at 0.1. Fails at the old 0.5."""
    from vlbert.data.captions import select_boxes

    cfg = load_finetune_config(REPO / "configs/vqa_base.yaml", check_files=False)
    n = max(n_good, 10) + 20
    boxes = np.array([[i % 50, 0, i % 50 + 10, 10] for i in range(n)], np.float64)
    scores = np.array([0.3] * n_good + [0.1] * (n - n_good))
    out, rows, _ = select_boxes(boxes, scores, 1.0, 1.0, 100, 100, cfg.vqa.image)
    assert len(out) == kept and sorted(rows.tolist()) == list(range(kept))
