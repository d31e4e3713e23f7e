"""vlbert-extract-regions (vlbert/cli/extract_regions.py) on two tiny shards: annotations, skips, resume, rank split."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vlbert.cli.extract_regions import main, read_samples
from vlbert.data.formats import write_tar
from vlbert.data.shards import SkipCounter

NUM_CLASSES = 5
CONFIG = """
detector: {depth: 18, num_classes: 5}
data:
  tokenizer: unused
  text_per_step: 0
  captions: {urls: [unused.tar], short_side: 64, max_long_side: 96, min_boxes: 2, max_boxes: 5,
             min_box_score: 0.0}
"""


def jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    src = tmp_path / "in"
    src.mkdir()
    a = [(f"a{i}", {"jpg": jpeg(96, 72, i), "txt": f"caption {i}".encode(),
                    "json": json.dumps({"width": 96, "height": 72, "url": f"u{i}"}).encode()}) for i in range(2)]
    b = [("b0", {"jpg": jpeg(80, 100, 7), "txt": b"tall"}),  # no JSON: one is made
         ("b1", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"corrupt", "json": b"{}"}),
         ("b2", {"txt": b"no image"})]
    write_tar(str(src / "s0.tar"), a)
    write_tar(str(src / "s1.tar"), b)
    return tmp_path


def run(tmp_path, *extra, output=None):
    return main(["--config", str(tmp_path / "cfg.yaml"), "--input", str(tmp_path / "in" / "s{0..1}.tar"),
                 "--out", output or str(tmp_path / "out"), "--device", "cpu", "--num-proposals", "20",
                 "--batch-size", "2", *extra])


def read(path):
    return dict(read_samples(str(path), SkipCounter()))


def test_extract_regions_annotates_and_skips(shards):
    out = f"memory://extract_{shards.name}/regions"  # any fsspec URL as the output folder
    stats = run(shards, output=out)
    assert stats["shards_done"] == 2 and stats["samples_written"] == 3
    assert stats["skipped_samples"] == {"corrupt_image": 1, "missing_image": 1}
    out0, out1 = read(out + "/s0.tar"), read(out + "/s1.tar")
    assert list(out0) == ["a0", "a1"] and list(out1) == ["b0"]
    for key, files, (w, h) in [("a0", out0["a0"], (96, 72)), ("a1", out0["a1"], (96, 72)),
                               ("b0", out1["b0"], (80, 100))]:
        meta = json.loads(files["json"])
        boxes = np.array(meta["boxes"])
        assert 2 <= len(boxes) <= 5 and len(meta["box_scores"]) == len(boxes)
        assert meta["width"] == w and meta["height"] == h
        # boxes are in pixels of the stored image, not of the 64-pixel resized one
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
        assert boxes[:, 2].max() > 64 or boxes[:, 3].max() > 64
        regions = np.load(io.BytesIO(files["regions.npy"]), allow_pickle=False)
        assert regions.dtype == np.float16 and regions.shape == (len(boxes), NUM_CLASSES)
        np.testing.assert_allclose(regions.astype(np.float32).sum(1), 1.0, atol=5e-3)
    assert out0["a1"]["txt"] == b"caption 1" and json.loads(out0["a1"]["json"])["url"] == "u1"


def test_extract_regions_resumes_and_splits_by_rank(shards):
    stats = run(shards, "--rank", "1", "--world-size", "2")
    assert stats["shards"] == 1 and stats["shards_done"] == 1
    assert not (shards / "out" / "s0.tar").exists() and (shards / "out" / "s1.tar").exists()
    # a stale partial file from a killed run does not count as done
    (shards / "out" / "s0.tar.partial").write_bytes(b"half")
    before = (shards / "out" / "s1.tar").read_bytes()
    stats = run(shards)
    assert stats["shards_skipped"] == 1 and stats["shards_done"] == 1
    assert (shards / "out" / "s1.tar").read_bytes() == before
    assert list(read(shards / "out" / "s0.tar")) == ["a0", "a1"]
    assert not (shards / "out" / "s0.tar.partial").exists()


def test_extracted_shards_decode_with_the_caption_reader(shards):
    from vlbert.demo.make_data import build_tokenizer
    from vlbert.config import CaptionDataConfig, MaskingConfig
    from vlbert.data.captions import decode_caption_sample

    run(shards, "--max-boxes", "4")
    files = read(shards / "out" / "s0.tar")["a0"]
    cfg = CaptionDataConfig(short_side=36, max_long_side=48, min_boxes=1, max_boxes=10, min_box_score=0.0)
    sample = decode_caption_sample(files, "a0", cfg, MaskingConfig(), build_tokenizer(shards / "tok"),
                                   np.random.default_rng(0), train=False)
    meta = json.loads(files["json"])
    assert sample.boxes.shape[0] == 1 + len(meta["boxes"]) <= 5  # whole-image box first
    assert sample.roi_targets.shape == (sample.boxes.shape[0], NUM_CLASSES)
    np.testing.assert_allclose(sample.roi_targets[1:].sum(1), 1.0, atol=5e-3)
    assert (sample.boxes[:, 2] <= 48).all() and (sample.boxes[:, 3] <= 36).all()


def test_extract_regions_with_the_visual_genome_preset(shards):
    """The butd_r101_vg architecture (depth 50) with a converted Caffe-layout (MILVLG) checkpoint whose
    classifier favours the Caffe background class 0: regions are 1601-way with background LAST, the
    column the training code and the caption reader take as the detector's order."""
    import torch

    from test_detector_convert import detectron2_checkpoint
    from vlbert.cli import convert_detector
    from vlbert.config import load_config

    weights = detectron2_checkpoint("bua_caffe", attributes=False)
    weights["roi_heads.box_predictor.cls_score.bias"][0] = 16.0  # Caffe's background
    weights["roi_heads.box_predictor.cls_score.bias"][7] = 12.0  # Caffe's class 7 = our class 6
    source = shards / "bua.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}}, source)
    (shards / "cfg.yaml").write_text(CONFIG.replace("detector: {depth: 18, num_classes: 5}",
                                                    "detector: {preset: butd_r101_vg, depth: 50}"))
    det_cfg = load_config(shards / "cfg.yaml", check_files=False).detector
    convert_detector.convert_file(str(source), str(shards / "butd.pth"), det_cfg)
    stats = main(["--config", str(shards / "cfg.yaml"), "--input", str(shards / "in" / "s0.tar"),
                  "--out", str(shards / "out"), "--device", "cpu", "--num-proposals", "6", "--batch-size", "2",
                  "--set", f"detector.checkpoint={shards / 'butd.pth'}"])
    assert stats["samples_written"] == 2
    for files in read(shards / "out" / "s0.tar").values():
        meta = json.loads(files["json"])
        regions = np.load(io.BytesIO(files["regions.npy"]), allow_pickle=False).astype(np.float32)
        assert 2 <= len(meta["boxes"]) == len(meta["box_scores"]) == len(regions) <= 5
        assert regions.shape[1] == 1601
        np.testing.assert_allclose(regions.sum(1), 1.0, atol=5e-3)
        assert (regions.argmax(1) == 1600).all()  # background is the last column
        fg = regions[:, :1600]
        assert (fg.argmax(1) == 6).all()  # the foreground order is kept (Caffe class 7 -> 6)
        # box scores are foreground scores: never the background's probability
        assert max(meta["box_scores"]) <= fg.max() + 1e-3


def test_two_processes_never_share_a_partial_file(shards):
    """Another live process holds s0's partial file (its lease, with a fresh heartbeat): this one
    exits naming it and writes nothing under that name. Fails without the lease: both would write
    one ``.partial`` and publish an interleaved tar."""
    import time

    out = shards / "out"
    out.mkdir()
    (out / "s0.tar.partial").write_bytes(b"being written by the other process")
    (out / "s0.tar.partial.lease").write_text(json.dumps({
        "holder": "slurm-job 99 step 0 task 3", "host": "node-b", "pid": 1, "token": "theirs",
        "acquired_at": time.time(), "heartbeat_at": time.time()}))
    with pytest.raises(SystemExit, match=r"s0\.tar\.partial\.lease is held by slurm-job 99 step 0 task 3"):
        run(shards)
    assert (out / "s0.tar.partial").read_bytes() == b"being written by the other process"
    assert not (out / "s0.tar").exists()


def test_given_boxes_keep_the_annotations_and_add_their_features(tmp_path):
    """--given-boxes: no detection; each sample keeps its JSON boxes, scores and regions.npy, and
    gains one feature per box: what the detector's forward gives for that box, scaled here by hand
    into the resized image (and not what it gives for the unscaled box); a sample without valid
    boxes is a counted skip. The image is stored at 96x72 and read at 85x64 (short side 64), so
    the boxes must be scaled into the resized image.
    Fails if the boxes are not scaled (features of the wrong regions), if detections replace the
    given boxes, or if the given regions.npy is overwritten."""
    import torch

    from vlbert.config import load_config
    from vlbert.model.detector import RegionFeatureExtractor

    (tmp_path / "cfg.yaml").write_text(CONFIG)
    det_cfg = load_config(tmp_path / "cfg.yaml", check_files=False).detector
    torch.manual_seed(0)
    detector = RegionFeatureExtractor(det_cfg).eval()
    torch.save(detector.detector.state_dict(), tmp_path / "det.pth")
    boxes = [[6, 3, 40, 30], [48, 24, 90, 70]]  # pixels of the stored 96x72 image
    one_hot = np.eye(NUM_CLASSES, dtype=np.float16)[[1, 3]]
    buf = io.BytesIO()
    np.save(buf, one_hot)
    meta = {"width": 96, "height": 72, "boxes": boxes, "box_scores": [1.0, 1.0], "labels": ["a", "b"]}
    samples = [("g0", {"jpg": jpeg(96, 72, 3), "txt": b"two boxes", "json": json.dumps(meta).encode(),
                       "regions.npy": buf.getvalue()}),
               ("g1", {"jpg": jpeg(96, 72, 4), "txt": b"one box, no regions",
                       "json": json.dumps(dict(meta, boxes=boxes[:1], box_scores=[0.9])).encode()}),
               ("g2", {"jpg": jpeg(96, 72, 5), "txt": b"box outside",
                       "json": json.dumps(dict(meta, boxes=[[0, 0, 97, 10]])).encode()}),
               ("g3", {"jpg": jpeg(96, 72, 6), "txt": b"no json"})]
    (tmp_path / "in").mkdir()
    write_tar(str(tmp_path / "in" / "g.tar"), samples)
    stats = main(["--config", str(tmp_path / "cfg.yaml"), "--input", str(tmp_path / "in" / "g.tar"),
                  "--out", str(tmp_path / "out"), "--device", "cpu", "--given-boxes", "--batch-size", "4",
                  "--set", f"detector.checkpoint={tmp_path / 'det.pth'}"])
    assert stats["samples_written"] == 2 and stats["skipped_samples"] == {"bad_boxes": 2}
    out = read(tmp_path / "out" / "g.tar")
    assert list(out) == ["g0", "g1"]
    assert out["g0"]["regions.npy"] == buf.getvalue()  # the given targets, byte for byte
    regions1 = np.load(io.BytesIO(out["g1"]["regions.npy"]), allow_pickle=False)  # the detector's, where none
    assert regions1.shape == (1, NUM_CLASSES)
    np.testing.assert_allclose(regions1.astype(np.float32).sum(1), 1.0, atol=5e-3)
    for key, n in (("g0", 2), ("g1", 1)):
        written = json.loads(out[key]["json"])
        assert written["boxes"] == boxes[:n] and written["width"] == 96 and written["height"] == 72
        feats = np.load(io.BytesIO(out[key]["features.npy"]), allow_pickle=False)
        assert feats.dtype == np.float16 and feats.shape == (n, detector.out_channels)
        image = torch.from_numpy(np.asarray(Image.open(io.BytesIO(out[key]["jpg"])).convert("RGB")
                                            .resize((85, 64), Image.BILINEAR)).copy()).permute(2, 0, 1)[None]
        scaled = torch.tensor(boxes[:n], dtype=torch.float) * torch.tensor([85 / 96, 64 / 72] * 2)
        mask = torch.ones(1, n, dtype=torch.bool)
        with torch.no_grad():
            expected = detector(image, scaled[None], mask)[0].numpy()
            unscaled = detector(image, torch.tensor(boxes[:n], dtype=torch.float)[None], mask)[0].numpy()
        # float16 storage: ~1e-3 relative; the unscaled boxes' features differ well beyond that.
        np.testing.assert_allclose(feats.astype(np.float32), expected, rtol=2e-3, atol=1e-3)
        assert not np.allclose(feats.astype(np.float32), unscaled, rtol=2e-3, atol=1e-3)
