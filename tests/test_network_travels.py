"""The network travels with its weights: a pretraining run's model.json carries its encoder and
detector sections, and fine-tuning and evaluation build exactly that network, whatever the
fine-tuning config leaves out; a config asking for another network is an error naming the field.

The pretrained model here is the ``butd_r101_vg`` preset at tiny widths (ResNet-18, 15 classes):
non-default settings everywhere (512-channel RPN, 12 Caffe anchors, Caffe stem pool, dilated
res5, RoIAlign without the half-pixel shift, BGR input with the Caffe means)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from vlbert.config import load_config
from vlbert.config_reader import ConfigError
from vlbert.tasks.config import load_finetune_config
from vlbert.network import NETWORK_FIELDS, resolve_network

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, demo_data):
    """A pretraining run's export (the trainer's export_weights) of a tiny butd_r101_vg model."""
    from vlbert.model.pretraining import VLBertForPretraining
    from vlbert.network import network_info
    from vlbert.train.loop import export_weights

    cfg = load_config(REPO / "configs/tiny.yaml", ["detector.preset=butd_r101_vg",
                                                   f"data.tokenizer={demo_data / 'tokenizer'}"], check_files=False)
    torch.manual_seed(3)
    model = VLBertForPretraining(cfg.model, cfg.detector)

    class Engine:  # export_weights reads only the gathered state dict (copies, as the engine's)
        def full_state_dict(self):
            return {k: v.clone() for k, v in model.state_dict().items()}

    out = tmp_path_factory.mktemp("pretrain")
    export_weights(Engine(), out, 0, {"step": 5, "mlflow_run_id": "run-1", **network_info(cfg.model, cfg.detector)})
    return cfg, {k: v.clone() for k, v in model.state_dict().items()}, out / "model.safetensors"


def _vqa_overrides(demo_data, vqa, out: Path) -> list[str]:
    split = {"questions": str(vqa / "train_questions.json"), "annotations": str(vqa / "train_annotations.json"),
             "images": [str(vqa / "images/train-*.tar")]}
    return [f"vqa.tokenizer={demo_data / 'tokenizer'}", f"vqa.train=[{json.dumps(split)}]",
            f"vqa.val={json.dumps(split)}", f"runtime.deepspeed_config={REPO / 'ds_configs/cpu_zero2_fp32.json'}",
            f"runtime.output_dir={out}", "tracking.enabled=false"]


def _no_detector_config(tmp_path: Path) -> Path:
    """configs/vqa_tiny.yaml without its detector section and without the encoder's sizes."""
    raw = yaml.safe_load((REPO / "configs/vqa_tiny.yaml").read_text())
    del raw["detector"]
    raw["model"] = {"pretrained": "", "head_dropout": 0.0}
    path = tmp_path / "no_detector.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_config_without_the_detector_builds_the_pretrained_one(demo_data, vqa, pretrained, tmp_path):
    """Fails if model.json lacks the sections, if resolution keeps the config's defaults (then
    ResNet-101 with 1601 classes is built and the weights do not load), or if a free field
    (trainable) is overwritten by the pretraining run's value."""
    from transformers import AutoTokenizer

    from vlbert.tasks.pretrained import read_pretrained_info
    from vlbert.tasks.vqa.task import VQATask

    pre_cfg, state, weights = pretrained
    info = read_pretrained_info(str(weights))
    assert info["detector"]["rpn_channels"] == 512 and info["model"]["hidden_size"] == 32
    config = _no_detector_config(tmp_path)
    cfg = load_finetune_config(config, [f"model.pretrained={weights}", *_vqa_overrides(demo_data, vqa, tmp_path)],
                               check_files=False)
    assert "detector" not in yaml.safe_load(config.read_text())
    resolved = resolve_network(cfg, info)
    for section, fields in NETWORK_FIELDS.items():
        for name in fields:
            assert getattr(getattr(resolved, section), name) == getattr(getattr(pre_cfg, section), name), name
    assert resolved.detector.trainable is True and pre_cfg.detector.trainable is True
    model = VQATask(resolved, AutoTokenizer.from_pretrained(resolved.tokenizer)).build_model()
    det = model.backbone.detector
    assert det.detector.rpn_head.rpn_conv.out_channels == 512 and det.detector.rpn_head.num_base_priors == 12
    assert det.detector.backbone.maxpool.ceil_mode and det.cfg.bgr and det.cfg.res5_dilation == 2
    mine = model.state_dict()
    detector_keys = [k for k in state if k.startswith("detector.")]
    assert detector_keys and all(torch.equal(mine["backbone." + k], state[k]) for k in detector_keys)

    # A free field written by the fine-tuning config wins.
    frozen = load_finetune_config(config, [f"model.pretrained={weights}", "detector.trainable=false",
                                           *_vqa_overrides(demo_data, vqa, tmp_path)], check_files=False)
    assert resolve_network(frozen, info).detector.trainable is False


def test_an_incompatible_detector_is_an_error_naming_the_field(demo_data, vqa, pretrained, tmp_path):
    """Fails if a network field the config writes is silently replaced, or if the fine-tuning
    config's detector.preset is not applied (the preset's depth 101 must clash with 18)."""
    from vlbert.tasks.pretrained import read_pretrained_info

    _, _, weights = pretrained
    info = read_pretrained_info(str(weights))
    base = [f"model.pretrained={weights}", *_vqa_overrides(demo_data, vqa, tmp_path)]
    config = _no_detector_config(tmp_path)
    for override, field in (("detector.rpn_channels=256", "detector.rpn_channels"),
                            ("detector.roi_op=pool", "detector.roi_op"),
                            ("model.num_layers=3", "model.num_layers"),
                            ("detector.preset=butd_r101_vg", "detector.depth")):
        cfg = load_finetune_config(config, [*base, override], check_files=False)
        with pytest.raises(ConfigError, match=f"^{field}: the config asks for"):
            resolve_network(cfg, info)
    # The same preset at the pretrained depth and classes is the same network.
    same = load_finetune_config(config, [*base, "detector.preset=butd_r101_vg", "detector.depth=18",
                                         "detector.num_classes=15"], check_files=False)
    assert resolve_network(same, info).detector.rpn_channels == 512


def test_vqa_base_fine_tunes_and_evaluates_a_butd_model(demo_data, vqa, pretrained, tmp_path):
    """configs/vqa_base.yaml as shipped, only paths and sizes overridden, fine-tunes the tiny
    butd_r101_vg model and vlbert-evaluate rebuilds it from the fine-tuned model.json.
    Fails if fine-tuning or evaluation builds the config's default detector (weights mismatch)."""
    from vlbert.cli.evaluate import main as evaluate_main
    from vlbert.tasks.finetune import finetune

    pre_cfg, _, weights = pretrained
    out = tmp_path / "ft"
    sizes = ["model.bert=", "vqa.batch_size=4", "vqa.eval_batch_size=8", "vqa.num_workers=0", "vqa.min_answer_count=1",
             'vqa.image={"short_side": 64, "max_long_side": 64, "min_boxes": 1, "max_boxes": 4}',
             "vqa.max_question_tokens=16", "optim.total_steps=2", "optim.warmup_steps=0", "runtime.checkpoint_every=10"]
    cfg = load_finetune_config(REPO / "configs/vqa_base.yaml",
                               [f"model.pretrained={weights}", *_vqa_overrides(demo_data, vqa, out), *sizes])
    result = finetune(cfg)
    assert result.step == 2 and "val/vqa_acc" in result.eval_metrics
    exported = json.loads((out / "model.json").read_text())
    trained = json.loads(json.dumps(pre_cfg.detector.__dict__))
    assert {k: exported["detector"][k] for k in NETWORK_FIELDS["detector"]} == \
        {k: trained[k] for k in NETWORK_FIELDS["detector"]}
    # Evaluation with the shipped config (not the run's resolved copy): the network comes from model.json.
    assert evaluate_main(["--config", str(REPO / "configs/vqa_base.yaml"), "--weights", str(out / "model.safetensors"),
                          "--out", str(tmp_path / "eval"), *_vqa_overrides(demo_data, vqa, out), *sizes]) == 0
    again = json.loads((tmp_path / "eval" / "val_predictions.json").read_text())
    assert len(again) == 8
