"""Training on stored region features (``detector.source: features``), from bottom-up-attention
files to pretraining and VQA fine-tuning.

- ``PrecomputedRegions``: the whole-image feature is the mean of the unmasked boxes and a
  masked box takes the mask embedding (checked against a hand computation);
- ``vlbert-import-features``: a TSV in the bottom-up-attention layout (written here with
  base64 of float32, as tools/generate_tsv.py writes it) becomes shards; a truncated row, a
  bad base64 field and a box outside its image are counted skips; VL-BERT's per-image JSON
  (with class scores) too; an interrupted import resumes;
- the imported shards pretrain (tiny model, a few steps) and fine-tune VQA end to end, with
  no mmdet imported; resume on feature shards gives the same next batch;
- configs that mix the modes inconsistently are clear errors.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vlbert.config import ConfigError, load_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::FutureWarning")]
REPO = Path(__file__).resolve().parents[1]
DIM = 8  # feature width of the test files (2048 in published ones)
WORDS = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow circle"]


def b64(a) -> str:
    return base64.b64encode(np.asarray(a, dtype="<f4").tobytes()).decode()


def butd_row(image_id: int, w: int, h: int, boxes, feats) -> str:
    """One line of a bottom-up-attention TSV: image_id, image_w, image_h, num_boxes, boxes, features."""
    return "\t".join([str(image_id), str(w), str(h), str(len(boxes)), b64(boxes), b64(feats)]) + "\n"


def good_record(rng, image_id: int, n: int = 3, w: int = 64, h: int = 48):
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(2, w / 2, n), y1 + rng.uniform(2, h / 2, n)], 1)
    return image_id, w, h, boxes, rng.normal(size=(n, DIM))


def write_tsv(path: Path, image_ids, bad: bool = True) -> dict:
    """Good rows for ``image_ids`` and, with ``bad``, one truncated row, one bad base64 field and one
    box outside its image. Returns the good features by image id."""
    rng = np.random.default_rng(0)
    lines, feats = [], {}
    for i in image_ids:
        rec = good_record(rng, i)
        feats[i] = rec[4]
        lines.append(butd_row(*rec))
    if bad:
        _, w, h, boxes, f = good_record(rng, 9001)
        lines.insert(1, "\t".join(["9001", str(w), str(h), "3", b64(boxes)]) + "\n")  # truncated: no features
        lines.insert(2, butd_row(9002, w, h, boxes, f).replace(b64(f), "%%not-base64%%"))
        outside = boxes.copy()
        outside[0, 2] = w + 50  # x2 past the right edge
        lines.insert(3, butd_row(9003, w, h, outside, f))
    path.write_text("".join(lines))
    return feats


def import_features(*argv: str) -> dict:
    from vlbert.cli.import_features import main

    return main(list(argv))


def shard_members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


# --------------------------------------------------------------------------- the model part


def test_whole_image_feature_is_the_mean_of_unmasked_boxes_and_masked_boxes_take_the_mask_embedding():
    """Fails if slot 0 averages masked or padded boxes (or itself), or if masked boxes keep their feature."""
    from vlbert.model.regions import PrecomputedRegions

    regions = PrecomputedRegions(feature_dim=2)
    assert torch.equal(regions.mask_embedding, torch.zeros(2))  # started at 0, as the reference
    with torch.no_grad():
        regions.mask_embedding.copy_(torch.tensor([7.0, -7.0]))
    # Sample 0: boxes 1..3 real, box 2 masked; sample 1: boxes 1, 2 real (slot 3 padding holds NaN).
    feats = torch.tensor([[[99, 99], [1, 2], [3, 4], [5, 10]],
                          [[99, 99], [2, 0], [4, 8], [float("nan"), 1]]])
    box_mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    masked = torch.tensor([[False, False, True, False], [False, False, False, False]])
    out = regions(feats, box_mask, masked)
    # By hand: sample 0 mean of (1,2) and (5,10) = (3, 6); sample 1 mean of (2,0), (4,8) = (3, 4).
    expected = torch.tensor([[[3, 6], [1, 2], [7, -7], [5, 10]],
                             [[3, 4], [2, 0], [4, 8], [0, 0]]], dtype=torch.float32)
    assert torch.equal(out, expected)
    # Without masking: the plain mean of the real boxes ((1+3+5)/3, (2+4+10)/3).
    plain = regions(feats, box_mask)
    assert torch.allclose(plain[0, 0], torch.tensor([3.0, 16 / 3]))
    # The mask embedding learns: its gradient is the sum of the gradients at the masked slots.
    regions(feats, box_mask, masked).sum().backward()
    assert torch.equal(regions.mask_embedding.grad, torch.tensor([1.0, 1.0]))


def test_feature_width_not_matching_the_projection_is_a_clear_error():
    """Fails if features of another width reach the projection (a shape error deep in Linear, or none)."""
    from vlbert.model.regions import PrecomputedRegions

    with pytest.raises(ValueError, match="2048 wide but detector.feature_dim is 8"):
        PrecomputedRegions(8)(torch.zeros(1, 2, 2048), torch.ones(1, 2, dtype=torch.bool))


# --------------------------------------------------------------------------- import


def test_tsv_import_counts_bad_rows_and_writes_the_features(tmp_path):
    """Fails if a truncated row, a bad base64 field or a box outside its image is written or not counted,
    or if the stored features differ from the TSV's (beyond float16 rounding)."""
    feats = write_tsv(tmp_path / "f.tsv", [1, 2, 3, 4])
    stats = import_features("--tsv", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "out"), "--prefix", "vqa",
                            "--rows-per-shard", "3")
    assert stats["skipped"] == {"truncated_row": 1, "bad_base64": 1, "box_outside_image": 1}
    assert stats["images"] == 4 and stats["samples"] == 4 and stats["shards_written"] == 2
    members = {**shard_members(tmp_path / "out/vqa-00000.tar"), **shard_members(tmp_path / "out/vqa-00001.tar")}
    assert sorted(members) == [f"{i:012d}" for i in (1, 2, 3, 4)]
    m = members[f"{2:012d}"]
    got = np.load(io.BytesIO(m["features.npy"]), allow_pickle=False)
    assert got.dtype == np.float16 and got.shape == (3, DIM)
    np.testing.assert_allclose(got.astype(np.float32), feats[2], rtol=1e-3, atol=1e-3)
    meta = json.loads(m["json"])
    assert (meta["image_id"], meta["width"], meta["height"]) == (2, 64, 48) and len(meta["boxes"]) == 3


def test_an_interrupted_import_resumes_without_rewriting_finished_shards(tmp_path):
    """Fails if a finished shard is rewritten or the samples shift between shards on a rerun."""
    write_tsv(tmp_path / "f.tsv", [1, 2, 3, 4, 5], bad=False)
    args = ["--tsv", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "out"), "--rows-per-shard", "2"]
    import_features(*args)
    first = (tmp_path / "out/features-00000.tar").read_bytes()
    (tmp_path / "out/features-00001.tar").unlink()  # as if the run died while writing shard 1
    (tmp_path / "out/features-00000.tar").write_bytes(first)
    stats = import_features(*args)
    assert stats["shards_skipped"] == 2 and stats["shards_written"] == 1
    assert sorted(shard_members(tmp_path / "out/features-00001.tar")) == [f"{i:012d}" for i in (3, 4)]


def test_vlbert_json_with_class_scores_gives_targets_and_scores(tmp_path):
    """Fails if the JSON's classes are not stored as regions.npy, or box_scores are not each box's top score."""
    rng = np.random.default_rng(1)
    _, w, h, boxes, f = good_record(rng, 7)
    classes = rng.dirichlet(np.ones(5), size=3)
    (tmp_path / "frcnn").mkdir()
    (tmp_path / "frcnn/000000000007.json").write_text(json.dumps(
        {"image_w": w, "image_h": h, "num_boxes": 3, "boxes": b64(boxes), "features": b64(f),
         "classes": b64(classes)}))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image_id": 7, "caption": "a red circle"}) + "\n")
    stats = import_features("--json", str(tmp_path / "frcnn/*.json"), "--captions", str(tmp_path / "caps.jsonl"),
                            "--out", str(tmp_path / "out"))
    assert stats["samples"] == 1 and stats["skipped"] == {}
    m = shard_members(tmp_path / "out/features-00000.tar")[f"{7:012d}_0"]
    np.testing.assert_allclose(np.load(io.BytesIO(m["regions.npy"])).astype(np.float32), classes, atol=1e-3)
    assert json.loads(m["json"])["box_scores"] == pytest.approx([max(r) for r in classes], abs=1e-4)
    assert m["txt"] == b"a red circle"


# --------------------------------------------------------------------------- pretraining


def _pretrain_shards(tmp_path: Path, n_images: int = 8) -> Path:
    write_tsv(tmp_path / "f.tsv", list(range(1, n_images + 1)))
    caps = [{"image_id": i, "caption": WORDS[i % len(WORDS)]} for i in range(1, n_images + 1)]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    import_features("--tsv", str(tmp_path / "f.tsv"), "--captions", str(tmp_path / "caps.jsonl"),
                    "--out", str(tmp_path / "shards"), "--prefix", "train", "--rows-per-shard", "4")
    return tmp_path / "shards"


def _features_config(demo_data: Path, shards: Path, out: Path, *overrides: str):
    from test_train_e2e import tiny_config, write_config

    cfg = tiny_config(demo_data, out)
    cfg["detector"] = {"source": "features", "feature_dim": DIM, "num_classes": 15}
    cfg["data"]["captions"]["urls"] = [str(shards / "train-*.tar")]
    cfg["data"]["validation"]["urls"] = [str(shards / "train-00000.tar")]
    cfg["masking"] = {"roi_prob": 0.0}  # bottom-up-attention TSVs carry no class scores
    cfg["optim"]["total_steps"] = 3
    return load_config(write_config(cfg, out.parent / f"{out.name}.yaml"), list(overrides))


def test_pretraining_on_imported_features_runs_without_mmdet(demo_data, tmp_path):
    """Fails if the feature path builds the detector or imports mmdet, or if training on feature
    shards does not run (loss finite, steps taken)."""
    shards = _pretrain_shards(tmp_path)
    _features_config(demo_data, shards, tmp_path / "run")  # writes run.yaml
    code = (
        "import sys, math\n"
        "from vlbert.config import load_config\n"
        "from vlbert.train.loop import train\n"
        "losses = []\n"
        "r = train(load_config(%r), on_step=lambda s, l: losses.append(l))\n"
        "assert r.step == 3 and all(math.isfinite(x) for x in losses), (r, losses)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mmdet', 'mmcv', 'mmengine'))\n"
        "assert not bad, bad[:5]\n"
        "print('OK', losses)\n"
    ) % str(tmp_path / "run.yaml")
    # A process group of its own: not the rendezvous of this test process.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=280,
                          cwd=str(tmp_path), env=env)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_feature_batches_carry_no_images_and_resume_gives_the_same_next_batch(demo_data, tmp_path):
    """Fails if a feature batch decodes images, or if a restored stream's next batch differs."""
    from transformers import AutoTokenizer

    from vlbert.data.mixture import build_pretrain_stream

    shards = _pretrain_shards(tmp_path)
    cfg = _features_config(demo_data, shards, tmp_path / "run", "masking.roi_prob=0.15",
                           "detector.roi_targets=precomputed")
    tok = AutoTokenizer.from_pretrained(cfg.data.tokenizer)

    def stream():
        return build_pretrain_stream(cfg.data, cfg.masking, tok, 0, 1, 2, 2, features=True)

    a = stream()
    first = next(iter(a))
    c = first.captions
    assert c.images is None and c.features.shape[-1] == DIM and c.features.dtype == torch.float16
    assert torch.equal(c.features[:, 0], torch.zeros_like(c.features[:, 0]))  # made by the model
    state = a.state_dict()
    expected = next(iter(a))
    b = stream()
    b.load_state_dict(state)
    got = next(iter(b))
    assert got.captions.keys == expected.captions.keys and got.text.keys == expected.text.keys
    for name in ("input_ids", "features", "boxes", "roi_masked", "mlm_labels"):
        assert torch.equal(getattr(got.captions, name), getattr(expected.captions, name)), name


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("overrides,match", [
    (["masking.roi_prob=0.15"], "detector.roi_targets.*no detector to compute masked-RoI targets"),
    (["detector.checkpoint=x.pth"], "detector.checkpoint.*not used with detector.source: features"),
    (["detector.source=voxels"], "detector.source.*expected one of pixels, features"),
    (["detector.feature_dim=0"], "detector.feature_dim.*must be positive"),
])
def test_inconsistent_feature_configs_are_clear_errors(demo_data, tmp_path, overrides, match):
    """Fails if a features config without class scores but with masked-RoI on (or the other
    mixes) loads, or if the error does not name the key."""
    with pytest.raises(ConfigError, match=match):
        _features_config(demo_data, tmp_path, tmp_path / "run", *overrides)


def test_a_batch_without_class_scores_under_masked_roi_is_a_clear_error(demo_data, tmp_path):
    """Fails if features without class scores train masked-RoI classification against nothing."""
    from vlbert.batch import PretrainBatch
    from vlbert.data.mixture import build_pretrain_stream
    from vlbert.model.pretraining import VLBertForPretraining
    from transformers import AutoTokenizer

    shards = _pretrain_shards(tmp_path)
    cfg = _features_config(demo_data, shards, tmp_path / "run", "masking.roi_prob=0.15",
                           "detector.roi_targets=precomputed")
    tok = AutoTokenizer.from_pretrained(cfg.data.tokenizer)
    batch = next(iter(build_pretrain_stream(cfg.data, cfg.masking, tok, 0, 1, 2, 0, features=True)))
    model = VLBertForPretraining(cfg.model, cfg.detector)
    with pytest.raises(ValueError, match="no masked-RoI targets.*detector.source: features"):
        model(PretrainBatch(captions=batch.captions))


# --------------------------------------------------------------------------- VQA


def test_vqa_finetunes_on_imported_features(demo_data, tmp_path):
    """Fails if VQA fine-tuning or evaluation on feature shards does not run, or scores no question."""
    from vlbert.demo.make_vqa import make_demo_vqa
    from vlbert.tasks.config import load_finetune_config
    from vlbert.tasks.finetune import finetune

    vqa = tmp_path / "vqa"
    make_demo_vqa(vqa, train_questions=8, val_questions=4, seed=0)
    ids = sorted({q["image_id"] for q in json.loads((vqa / "train_questions.json").read_text())["questions"]})
    write_tsv(tmp_path / "f.tsv", ids)
    import_features("--tsv", str(tmp_path / "f.tsv"), "--out", str(tmp_path / "feats"), "--prefix", "train")
    split = {"questions": str(vqa / "train_questions.json"), "annotations": str(vqa / "train_annotations.json"),
             "images": [str(tmp_path / "feats/train-*.tar")]}
    out = tmp_path / "out"
    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", [
        f"vqa.tokenizer={demo_data / 'tokenizer'}", f"vqa.train=[{json.dumps(split)}]", f"vqa.val={json.dumps(split)}",
        "vqa.image.flip_prob=0.5", "detector.source=features", f"detector.feature_dim={DIM}",
        f"runtime.deepspeed_config={REPO / 'ds_configs/cpu_zero2_fp32.json'}", f"runtime.output_dir={out}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "optim.total_steps=3"])
    result = finetune(cfg)
    assert not result.preempted and result.step == 3
    assert "val/vqa_acc" in result.eval_metrics, result.eval_metrics


# --------------------------------------------------------------------------- features -> pixels


def _features_export(tmp_path: Path, feature_dim: int) -> Path:
    """A pretraining export (model.safetensors + model.json) of vqa_tiny.yaml's encoder trained on
    ``feature_dim``-wide stored features, with random weights."""
    from safetensors.torch import save_file

    from vlbert.model.pretraining import VLBertForPretraining
    from vlbert.network import network_info
    from vlbert.tasks.config import load_finetune_config

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", ["detector.source=features",
                                                                f"detector.feature_dim={feature_dim}"],
                               check_files=False)
    torch.manual_seed(3)
    model = VLBertForPretraining(cfg.model, cfg.detector)
    with torch.no_grad():
        model.regions.mask_embedding.normal_()
    out = tmp_path / f"export{feature_dim}"
    out.mkdir()
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "model.json").write_text(json.dumps({"step": 1, **network_info(cfg.model, cfg.detector)}))
    return out / "model.safetensors"


def _detector_file(tmp_path: Path) -> tuple[Path, dict]:
    from vlbert.model.detector import RegionFeatureExtractor
    from vlbert.tasks.config import load_finetune_config

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", [], check_files=False)
    torch.manual_seed(4)
    det = RegionFeatureExtractor(cfg.detector)
    state = {k: v.clone() for k, v in det.detector.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "detector.pth")
    return tmp_path / "detector.pth", state


def _vqa_model_from(export: Path, *overrides: str):
    from vlbert.tasks.config import load_finetune_config
    from vlbert.tasks.vqa.model import VLBertForVQA

    cfg = load_finetune_config(REPO / "configs/vqa_tiny.yaml", [f"model.pretrained={export}", *overrides],
                               check_files=False)
    return VLBertForVQA.from_config(cfg.model, cfg.detector, 5)


def test_a_features_trained_export_fine_tunes_on_pixels_with_the_detector_that_made_the_features(tmp_path):
    """A model pretrained on stored features fine-tunes end to end on pixels: the encoder comes
    from the export, the detector (absent from the export) from detector.checkpoint. Fails if the
    features export is refused on pixels, if the detector keeps its random weights, or if the
    encoder's weights are not the export's."""
    from safetensors.torch import load_file

    export = _features_export(tmp_path, 512)  # ResNet-18's res5 width, vqa_tiny.yaml's detector
    detector_file, detector_state = _detector_file(tmp_path)
    model = _vqa_model_from(export, f"detector.checkpoint={detector_file}", "model.whole_image=mean")
    exported = load_file(str(export))
    encoder = model.backbone.vlbert.state_dict()
    assert {f"vlbert.{k}" for k in encoder} == {k for k in exported if k.startswith("vlbert.")}
    for k, v in encoder.items():
        torch.testing.assert_close(v, exported[f"vlbert.{k}"], rtol=0, atol=0)
    loaded = model.backbone.detector.detector.state_dict()
    for k, v in detector_state.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    assert model.backbone.regions is None


def test_a_features_trained_export_on_pixels_needs_the_detector_file_and_its_width(tmp_path):
    """Fails if a features export is fine-tuned on pixels with a random detector (no
    detector.checkpoint) or with features of another width than the detector's, silently."""
    with pytest.raises(ValueError, match="pretrained on stored region features.*detector.checkpoint"):
        _vqa_model_from(_features_export(tmp_path, 512))
    detector_file, _ = _detector_file(tmp_path)
    with pytest.raises(ValueError, match=f"{DIM}-wide region features.*512-wide"):
        _vqa_model_from(_features_export(tmp_path, DIM), f"detector.checkpoint={detector_file}")
