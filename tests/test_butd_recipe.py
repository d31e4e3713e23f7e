"""configs/base_e2e.yaml, as written (butd_r101_vg detector, precomputed 1601-way targets, the joint
cap of 64), trains one step on the CPU: a tiny encoder, the preset's detector at depth 50, 64-pixel
images from a shard that carries regions.npy as vlbert.cli.extract_regions writes it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlbert.config import load_config
from vlbert.data.formats import write_tar

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::FutureWarning")]

REPO = Path(__file__).resolve().parents[1]


def region_shard(path: Path, n: int = 4, classes: int = 1601) -> str:
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        boxes = [[4, 4, 30, 30], [20, 10, 60, 50], [8, 30, 40, 62]]
        logits = rng.normal(0, 2, (len(boxes), classes))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        npy = io.BytesIO()
        np.save(npy, probs.astype(np.float16))
        samples.append((f"s{i}", {"jpg": buf.getvalue(), "txt": b"a red circle left of a blue square",
                                  "json": json.dumps({"boxes": boxes, "box_scores": [0.9, 0.8, 0.7]}).encode(),
                                  "regions.npy": npy.getvalue()}))
    write_tar(str(path), samples)
    return str(path)


def test_base_e2e_recipe_trains_one_step_with_the_preset_detector(demo_data, tmp_path):
    from vlbert.train.loop import train

    shard = region_shard(tmp_path / "cc-00000.tar")
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs/base_e2e.yaml", [
        "model.bert=", "model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "model.intermediate_size=64", "model.max_position_embeddings=64", "model.geometry_freqs=16",
        "detector.depth=50", "detector.checkpoint=",  # random weights: no download in tests
        f"data.tokenizer={demo_data / 'tokenizer'}", f"data.captions.urls=[{shard}]",
        "data.captions.short_side=64", "data.captions.max_long_side=64", "data.captions.max_caption_tokens=16",
        "data.captions.max_sequence_length=8",  # binding at this size: 16-token caption + 4 RoIs
        f"data.text.sources.books.urls=[{demo_data / 'text/books-*.jsonl'}]",
        f"data.text.sources.wiki.urls=[{demo_data / 'text/wiki-*.parquet'}]", "data.text.segment_length=16",
        "data.validation.urls=[]", "data.captions_per_step=2", "data.text_per_step=2", "data.num_workers=0",
        f"runtime.deepspeed_config={REPO / 'ds_configs/cpu_zero2_fp32.json'}", f"runtime.output_dir={out}",
        "runtime.val_every=0", "runtime.checkpoint_every=1", "runtime.log_every=1",
        "optim.warmup_steps=0", "optim.total_steps=1",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false",
    ])
    det = cfg.detector
    assert (det.preset, det.res5_dilation, det.caffe_stem_pool, det.bgr, det.roi_targets) == (
        "butd_r101_vg", 2, True, True, "precomputed")
    result = train(cfg)
    assert result.step == 1 and np.isfinite(result.losses[1])
    # The model held no frozen copy (targets come from the shard) and the detector was the preset's.
    state = torch.load(out / "checkpoints" / "step-000001" / "ds" / "mp_rank_00_model_states.pt",
                                     weights_only=True)["module"]
    assert not any(k.startswith("target_detector.") for k in state)
    assert state["detector.detector.rpn_head.rpn_cls.weight"].shape[0] == 12
    assert state["detector.detector.roi_head.bbox_head.fc_cls.weight"].shape[0] == 1601
