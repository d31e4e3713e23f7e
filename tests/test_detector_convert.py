"""vlbert-convert-detector (vlbert/cli/convert_detector.py) on checkpoints laid out like the published ones, checked numerically.

For each source layout a random checkpoint is written with the source's exact key names
and shapes (ResNet-50 block counts instead of 101: the names are the same, the depth is
reduced), converted with the tool, loaded strictly into the ``butd_r101_vg`` preset
detector (depth 50), and compared with an independent plain-torch forward of the SOURCE
network written here from its definition: Caffe bottlenecks (stride in the first 1x1),
res5 at stride 1 with dilation 2, BGR minus the Caffe means, the source's RoI op
(VL-BERT: RoIAlign without the half-pixel shift, one sample per bin; Caffe: RoIPool),
its class order, its RPN and its box deltas. A conversion that loads but is wrong (RGB
input, undilated res5) must fail the same comparison.
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from vlbert.cli import convert_detector
from vlbert.config import DetectorConfig, detector_preset, load_config
from vlbert.model.detector import RegionFeatureExtractor
from vlbert.model.detector.convert import ConversionError, convert, load_pickle_weights

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::UserWarning")]

BLOCKS = (3, 4, 6, 3)  # ResNet-50 (the published network: 3, 4, 23, 3)
MEANS_BGR = torch.tensor([102.9801, 115.9465, 122.7717])
NUM_CLASSES = 1601  # background included
SCALES, RATIOS = (4, 8, 16, 32), (0.5, 1.0, 2.0)
A = len(SCALES) * len(RATIOS)
TOL = 1e-4
# Image and boxes (x1, y1, x2, y2 pixels); the first covers the image.
H, W = 96, 128
BOXES = torch.tensor([[0.0, 0.0, 128.0, 96.0], [8.0, 10.0, 60.0, 70.0], [40.3, 22.7, 121.5, 90.1]])


# --------------------------------------------------------------------------- source checkpoints


def _bn(rng, n):
    return {"weight": rng.uniform(0.3, 0.8, n), "bias": rng.uniform(-0.2, 0.2, n),
            "running_mean": rng.uniform(-0.2, 0.2, n), "running_var": rng.uniform(0.5, 1.5, n)}


def _conv(rng, cout, cin, k):
    return rng.normal(0, math.sqrt(1.0 / (cin * k * k)), (cout, cin, k, k))


def _resnet_blocks(rng):
    """(stage 2..5, block, {part: (conv weight, bn dict)}) of a Caffe ResNet with BLOCKS."""
    cin = 64
    for stage, n in zip((2, 3, 4, 5), BLOCKS):
        mid = 64 * 2 ** (stage - 2)
        cout = mid * 4
        for b in range(n):
            parts = {"conv1": (_conv(rng, mid, cin, 1), _bn(rng, mid)),
                     "conv2": (_conv(rng, mid, mid, 3), _bn(rng, mid)),
                     "conv3": (_conv(rng, cout, mid, 1), _bn(rng, cout))}
            if b == 0:
                parts["shortcut"] = (_conv(rng, cout, cin, 1), _bn(rng, cout))
            yield stage, b, parts
            cin = cout


def torchvision_checkpoint(seed=0, fc=False) -> dict[str, torch.Tensor]:
    """VL-BERT's ``resnet101-pt-vgbua-0000.model``: torchvision names ``conv1``, ``bn1``,
    ``layer1..layer4.N.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}`` with BatchNorm2d's
    ``num_batches_tracked``. Read from jackroos/VL-BERT common/backbone/resnet/resnet.py (ResNet:
    ``self.conv1``, ``self.bn1 = nn.BatchNorm2d``, ``layer{i+1}`` via ``_make_layer``, Bottleneck
    ``conv1/bn1/conv2/bn2/conv3/bn3/downsample``) and common/fast_rcnn.py ``init_weight`` (the file's
    ``layer4.*`` keys are loaded strictly into the res5 head). No ``fc`` unless asked (the backbone
    is built with ``expose_stages=[4]``, so a file without one loads)."""
    rng = np.random.default_rng(seed)
    w = {"conv1.weight": _conv(rng, 64, 3, 7)}
    w.update({f"bn1.{k}": v for k, v in _bn(rng, 64).items()})
    w["bn1.num_batches_tracked"] = np.array(0)
    for stage, b, parts in _resnet_blocks(rng):
        p = f"layer{stage - 1}.{b}."
        for name, (conv, bn) in parts.items():
            cname, bname = (("downsample.0", "downsample.1") if name == "shortcut" else (name, "bn" + name[-1]))
            w[p + cname + ".weight"] = conv
            w.update({f"{p}{bname}.{k}": v for k, v in bn.items()})
            w[f"{p}{bname}.num_batches_tracked"] = np.array(0)
    if fc:
        w["fc.weight"], w["fc.bias"] = rng.normal(0, 0.01, (1000, 2048)), np.zeros(1000)
    return {k: torch.tensor(v, dtype=torch.int64 if k.endswith("tracked") else torch.float32) for k, v in w.items()}


def attribute_keys(fmt: str) -> dict[str, tuple[int, ...]]:
    """The attribute head of each port's ``_attr`` file, names and shapes from its source:
    detectron2 port (airsplay/py-bottom-up-attention detectron2/modeling/roi_heads/fast_rcnn.py,
    FastRCNNOutputLayers with use_attr: ``cls_embedding = nn.Embedding(1601, 2048 // 8)``,
    ``fc_attr = nn.Linear(2048 + 256, 2048 // 4)``, ``attr_score = nn.Linear(512, 400 + 1)``);
    MILVLG (MILVLG/bottom-up-attention.pytorch bua/caffe/modeling/fast_rcnn.py,
    BUACaffeFastRCNNOutputLayers: ``cls_embed = nn.Embedding(1601, 256)``,
    ``attr_linear1 = nn.Linear(2048 + 256, 512)``, ``attr_linear2 = nn.Linear(512, 401)``)."""
    q = "roi_heads.box_predictor."
    if fmt == "bua_caffe":
        names = {"cls_embed.weight": (NUM_CLASSES, 256), "attr_linear1.weight": (512, 2048 + 256),
                 "attr_linear1.bias": (512,), "attr_linear2.weight": (401, 512), "attr_linear2.bias": (401,)}
    else:
        names = {"cls_embedding.weight": (NUM_CLASSES, 256), "fc_attr.weight": (512, 2048 + 256),
                 "fc_attr.bias": (512,), "attr_score.weight": (401, 512), "attr_score.bias": (401,)}
    return {q + k: v for k, v in names.items()}


def detectron2_checkpoint(fmt: str, seed=0, attributes=True) -> dict[str, np.ndarray]:
    """detectron2 names; fmt "detectron2_caffe" (sigmoid RPN, size-major, background last, 1600x4
    deltas in detectron2's 10/10/5/5 scaling) or "bua_caffe" (softmax RPN with 2A channels,
    background first, 1601x4 raw deltas).

    detectron2 port (airsplay/py-bottom-up-attention): configs/VG-Detection/
    faster_rcnn_R_101_C4_attr_caffemaxpool.yaml (HID_CHANNELS 512, 1600 classes, 400 attributes),
    RESNETS.NORM "FrozenBN" in detectron2/config/defaults.py, whose FrozenBatchNorm2d
    (detectron2/layers/batch_norm.py) holds weight, bias, running_mean, running_var and no
    ``num_batches_tracked``; StandardRPNHead conv/objectness_logits/anchor_deltas
    (detectron2/modeling/proposal_generator/rpn.py).
    MILVLG (MILVLG/bottom-up-attention.pytorch): configs/caffe/test-caffe-r101.yaml (NORM "BN",
    FREEZE_AT 3, NUM_CLASSES 1601, attribute head on), bua/caffe/modeling/backbone.py
    (``block.freeze()`` turns the stem, res2 and res3 into FrozenBatchNorm2d; res4 and the res5
    head keep BatchNorm2d, so their norms carry ``num_batches_tracked``), StandardBUARPNHead with
    ``objectness_logits`` of ``num_cell_anchors * 2`` channels (bua/caffe/modeling/rpn.py)."""
    rng = np.random.default_rng(seed)
    w = {"backbone.stem.conv1.weight": _conv(rng, 64, 3, 7)}
    w.update({f"backbone.stem.conv1.norm.{k}": v for k, v in _bn(rng, 64).items()})
    for stage, b, parts in _resnet_blocks(rng):
        p = f"roi_heads.res5.{b}." if stage == 5 else f"backbone.res{stage}.{b}."
        for name, (conv, bn) in parts.items():
            w[p + name + ".weight"] = conv
            w.update({f"{p}{name}.norm.{k}": v for k, v in bn.items()})
            if fmt == "bua_caffe" and stage >= 4:
                w[f"{p}{name}.norm.num_batches_tracked"] = np.array(0, dtype=np.int64)
    r = "proposal_generator.rpn_head."
    w[r + "conv.weight"], w[r + "conv.bias"] = _conv(rng, 512, 1024, 3), rng.normal(0, 0.1, 512)
    n_obj = 2 * A if fmt == "bua_caffe" else A
    w[r + "objectness_logits.weight"] = _conv(rng, n_obj, 512, 1)
    w[r + "objectness_logits.bias"] = rng.normal(0, 1, n_obj)
    w[r + "anchor_deltas.weight"], w[r + "anchor_deltas.bias"] = _conv(rng, 4 * A, 512, 1), rng.normal(0, 0.1, 4 * A)
    q = "roi_heads.box_predictor."
    w[q + "cls_score.weight"] = rng.normal(0, 0.02, (NUM_CLASSES, 2048))
    w[q + "cls_score.bias"] = rng.normal(0, 1, NUM_CLASSES)
    n_box = 4 * NUM_CLASSES if fmt == "bua_caffe" else 4 * (NUM_CLASSES - 1)
    w[q + "bbox_pred.weight"], w[q + "bbox_pred.bias"] = rng.normal(0, 0.05, (n_box, 2048)), rng.normal(0, 0.1, n_box)
    if attributes:
        w.update({k: rng.normal(0, 0.01, shape) for k, shape in attribute_keys(fmt).items()})
    return {k: v if k.endswith("tracked") else v.astype(np.float32) for k, v in w.items()}


def save_legacy(obj, path) -> None:
    """torch.save as torch < 1.6 wrote it (VL-BERT's .model, MILVLG's 2020 .pth files)."""
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def save_detectron2_pickle(weights: dict, path) -> None:
    """The detectron2 model-zoo pickle: ``{"model": {name: ndarray}, "__author__": ...}``, as
    airsplay/py-bottom-up-attention detectron2/checkpoint/detection_checkpoint.py ``_load_file``
    reads it (``pickle.load(f, encoding="latin1")``, then ``"model"`` and ``"__author__"``)."""
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "py-bottom-up-attention"}, protocol=2))


# --------------------------------------------------------------------------- reference forward


def ref_bn(x, w, p, eps=1e-5):
    g, b, m, v = (torch.as_tensor(w[f"{p}.{k}"]).float() for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m[:, None, None]) / torch.sqrt(v[:, None, None] + eps) * g[:, None, None] + b[:, None, None]


def ref_bottleneck(x, w, conv, bn, stride, dilation, has_shortcut):
    """Caffe bottleneck: stride on the first 1x1, 3x3 dilated with pad = dilation."""
    t = lambda k: torch.as_tensor(w[k]).float()  # noqa: E731
    y = F.relu(ref_bn(F.conv2d(x, t(conv("conv1")), stride=stride), w, bn("conv1")))
    y = F.relu(ref_bn(F.conv2d(y, t(conv("conv2")), padding=dilation, dilation=dilation), w, bn("conv2")))
    y = ref_bn(F.conv2d(y, t(conv("conv3"))), w, bn("conv3"))
    sc = ref_bn(F.conv2d(x, t(conv("shortcut")), stride=stride), w, bn("shortcut")) if has_shortcut else x
    return F.relu(y + sc)


def ref_roi_align_legacy(feat, boxes, size=14, scale=1 / 16):
    """RoIAlign as VL-BERT's (maskrcnn-benchmark) kernel: no half-pixel shift, one sample per bin."""
    Hf, Wf = feat.shape[-2:]
    out = []
    for x1, y1, x2, y2 in (boxes * scale).tolist():
        bw, bh = max(x2 - x1, 1.0) / size, max(y2 - y1, 1.0) / size
        ys = torch.tensor([y1 + (i + 0.5) * bh for i in range(size)])
        xs = torch.tensor([x1 + (j + 0.5) * bw for j in range(size)])

        def axis(c, n):
            valid = (c >= -1) & (c <= n)
            c = c.clamp(min=0)
            lo = c.floor().long().clamp(max=n - 1)
            hi = (lo + 1).clamp(max=n - 1)
            c = torch.where(lo >= n - 1, lo.float(), c)
            return lo, hi, c - lo, valid

        yl, yh, ly, vy = axis(ys, Hf)
        xl, xh, lx, vx = axis(xs, Wf)
        f = feat[0]
        val = (f[:, yl][:, :, xl] * ((1 - ly)[:, None] * (1 - lx)[None])
               + f[:, yl][:, :, xh] * ((1 - ly)[:, None] * lx[None])
               + f[:, yh][:, :, xl] * (ly[:, None] * (1 - lx)[None])
               + f[:, yh][:, :, xh] * (ly[:, None] * lx[None]))
        out.append(val * (vy[:, None] & vx[None]))
    return torch.stack(out)


def ref_roi_pool_caffe(feat, boxes, size=14, scale=1 / 16):
    """Caffe's ROIPoolingLayer, written as its loops."""
    Hf, Wf = feat.shape[-2:]
    out = torch.zeros(len(boxes), feat.shape[1], size, size)
    for n, box in enumerate(boxes.tolist()):
        x1, y1, x2, y2 = (math.floor(v * scale + 0.5) for v in box)  # C round() of non-negative values
        rw, rh = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        for ph in range(size):
            hs = min(max(math.floor(ph * rh / size) + y1, 0), Hf)
            he = min(max(math.ceil((ph + 1) * rh / size) + y1, 0), Hf)
            for pw in range(size):
                ws = min(max(math.floor(pw * rw / size) + x1, 0), Wf)
                we = min(max(math.ceil((pw + 1) * rw / size) + x1, 0), Wf)
                if he > hs and we > ws:
                    out[n, :, ph, pw] = feat[0, :, hs:he, ws:we].amax(dim=(-2, -1))
    return out


def ref_forward(w, fmt, image_rgb, boxes):
    """The source network on one uint8 RGB image -> dict of res4, pooled RoI features,
    class logits, box deltas (raw, per class) and RPN outputs, all in the SOURCE's layout."""
    x = image_rgb[0].float().flip(0) - MEANS_BGR[:, None, None]  # BGR minus the Caffe means
    x = x[None]
    tv = fmt == "vlbert_resnet"
    stem_conv, stem_bn = ("conv1.weight", "bn1") if tv else ("backbone.stem.conv1.weight", "backbone.stem.conv1.norm")
    x = F.relu(ref_bn(F.conv2d(x, torch.as_tensor(w[stem_conv]).float(), stride=2, padding=3), w, stem_bn))
    # VL-BERT's copy pads the max-pool by 1; the Caffe network does not and rounds the size up.
    x = F.max_pool2d(x, 3, 2, padding=1) if tv else F.max_pool2d(x, 3, 2, padding=0, ceil_mode=True)

    def run_stage(x, stage):
        for b in range(BLOCKS[stage - 2]):
            if tv:
                p = f"layer{stage - 1}.{b}."
                conv = lambda n: p + ("downsample.0" if n == "shortcut" else n) + ".weight"  # noqa: E731
                bn = lambda n: p + ("downsample.1" if n == "shortcut" else "bn" + n[-1])  # noqa: E731
            else:
                p = f"roi_heads.res5.{b}." if stage == 5 else f"backbone.res{stage}.{b}."
                conv = lambda n: p + n + ".weight"  # noqa: E731
                bn = lambda n: p + n + ".norm"  # noqa: E731
            stride = 2 if (b == 0 and stage in (3, 4)) else 1
            x = ref_bottleneck(x, w, conv, bn, stride, 2 if stage == 5 else 1, b == 0)
        return x

    for stage in (2, 3, 4):
        x = run_stage(x, stage)
    res4 = x
    pooled = ref_roi_align_legacy(res4, boxes) if tv else ref_roi_pool_caffe(res4, boxes)
    feats = run_stage(pooled, 5).mean(dim=(2, 3))
    out = {"res4": res4, "features": feats}
    if tv:
        return out
    t = lambda k: torch.as_tensor(w[k]).float()  # noqa: E731
    q, r = "roi_heads.box_predictor.", "proposal_generator.rpn_head."
    out["logits"] = F.linear(feats, t(q + "cls_score.weight"), t(q + "cls_score.bias"))
    deltas = F.linear(feats, t(q + "bbox_pred.weight"), t(q + "bbox_pred.bias")).view(len(boxes), -1, 4)
    if fmt == "detectron2_caffe":
        deltas = deltas / torch.tensor([10.0, 10.0, 5.0, 5.0])  # detectron2's BBOX_REG_WEIGHTS
    out["raw_deltas"] = deltas  # [N, classes, 4]: bua_caffe with background first
    hidden = F.relu(F.conv2d(res4, t(r + "conv.weight"), t(r + "conv.bias"), padding=1))
    out["rpn_logits"] = F.conv2d(hidden, t(r + "objectness_logits.weight"), t(r + "objectness_logits.bias"))
    out["rpn_deltas"] = F.conv2d(hidden, t(r + "anchor_deltas.weight"), t(r + "anchor_deltas.bias"))
    return out


# --------------------------------------------------------------------------- our side


def config_yaml(tmp_path, **detector) -> str:
    cfg = {"detector": {"preset": "butd_r101_vg", "depth": 50, **detector},
           "data": {"tokenizer": "unused", "captions_per_step": 0, "text_per_step": 1,
                    "text": {"sources": {"t": {"urls": ["unused"]}}}}}
    path = tmp_path / "detector.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def convert_with_tool(tmp_path, source_file, **detector) -> tuple[RegionFeatureExtractor, dict]:
    """vlbert-convert-detector's conversion; the detector it loaded the written file into."""
    out = tmp_path / "converted.pth"
    cfg = load_config(config_yaml(tmp_path, **detector), check_files=False).detector
    summary, det = convert_detector.convert_file(str(source_file), str(out), cfg)
    return det.eval(), summary


def image(seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, H, W), generator=g, dtype=torch.uint8)


def ours(det: RegionFeatureExtractor, img) -> dict:
    with torch.no_grad():
        res4 = det.res4(det.normalize(img))
        rois = torch.cat([torch.zeros(len(BOXES), 1), BOXES], 1)
        res5 = det._res5(res4, rois)
        out = {"res4": res4, "features": res5.mean(dim=(2, 3))}
        if det.has_heads:
            cls, reg = det.detector.roi_head.bbox_head(res5)
            out["logits"], out["deltas"] = cls, reg.view(len(BOXES), -1, 4)
            out["probs"] = det.class_probs(img, BOXES[None], torch.ones(1, len(BOXES), dtype=torch.bool))[0]
            out["rpn_logits"], out["rpn_deltas"] = (t[0] for t in det.detector.rpn_head((res4,)))
    return out


def max_err(a, b) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def vlbert_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlbert") / "resnet101-pt-vgbua-0000.model"
    weights = torchvision_checkpoint()
    save_legacy(weights, path)
    return path, weights


def test_vlbert_resnet_features_match_source(vlbert_source, tmp_path):
    path, weights = vlbert_source
    # VL-BERT's network: pad-1 stem pool, RoIAlign 14 without the shift, one sample per bin (the preset's op).
    det, summary = convert_with_tool(tmp_path, path, caffe_stem_pool=False)
    assert summary["source_format"] == "vlbert_resnet" and summary["parts"] == "backbone"
    assert summary["unused_source_keys"] == []  # num_batches_tracked is dropped, not reported
    assert not det.has_heads
    for seed in (0, 1):
        ref, got = ref_forward(weights, "vlbert_resnet", image(seed), BOXES), ours(det, image(seed))
        errs = {k: max_err(got[k], ref[k]) for k in ("res4", "features")}
        print("vlbert_resnet", seed, {k: f"{v:.1e}" for k, v in errs.items()})
        assert all(v < TOL for v in errs.values()), errs
        assert float(ref["features"].std()) > 1e-2  # a comparison of something non-trivial
    with pytest.raises(RuntimeError, match="only the backbone"):
        det.class_probs(image(), BOXES[None], torch.ones(1, len(BOXES), dtype=torch.bool))


def test_vlbert_resnet_wrong_but_loadable_conversions_fail_the_comparison(vlbert_source, tmp_path):
    path, weights = vlbert_source
    ref = ref_forward(weights, "vlbert_resnet", image(), BOXES)["features"]
    for wrong in (dict(bgr=False), dict(res5_dilation=1)):
        det, _ = convert_with_tool(tmp_path, path, caffe_stem_pool=False, **wrong)
        err = max_err(ours(det, image())["features"], ref)
        print("vlbert_resnet wrong", wrong, f"{err:.1e}")
        assert err > 100 * TOL, (wrong, err)


@pytest.mark.parametrize("fmt", ["detectron2_caffe", "bua_caffe"])
def test_detectron2_named_sources_match_the_caffe_network(fmt, tmp_path):
    """Each port in its authors' container: the detectron2 port's pickle, MILVLG's legacy .pth."""
    weights = detectron2_checkpoint(fmt)
    if fmt == "detectron2_caffe":
        path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
        save_detectron2_pickle(weights, path)
    else:
        path = tmp_path / "bua-caffe-frcn-r101-k10-100.pth"
        save_legacy({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}}, path)
    det, summary = convert_with_tool(tmp_path, path, roi_op="pool")  # the Caffe network's RoIPool 14
    assert summary["source_format"] == fmt and summary["parts"] == "all"
    assert summary["unused_source_keys"] == sorted(attribute_keys(fmt))  # the attribute head, reported
    K = NUM_CLASSES - 1
    for seed in (0, 1):
        img = image(seed)
        ref, got = ref_forward(weights, fmt, img, BOXES), ours(det, img)
        errs = {"res4": max_err(got["res4"], ref["res4"]), "features": max_err(got["features"], ref["features"])}
        # Classes: ours have background last; the Caffe/MILVLG source has it first.
        ref_logits = ref["logits"]
        if fmt == "bua_caffe":
            ref_logits = torch.cat([ref_logits[:, 1:], ref_logits[:, :1]], 1)
        errs["logits"] = max_err(got["logits"], ref_logits)
        ref_probs = ref["logits"].softmax(-1)
        bg = ref_probs[:, -1] if fmt == "detectron2_caffe" else ref_probs[:, 0]
        errs["background"] = max_err(got["probs"][:, NUM_CLASSES - 1], bg)
        # Box deltas: ours times the coder's stds are the raw deltas of the same foreground class.
        ref_fg = ref["raw_deltas"] if fmt == "detectron2_caffe" else ref["raw_deltas"][:, 1:]
        errs["deltas"] = max_err(got["deltas"] * torch.tensor([0.1, 0.1, 0.2, 0.2]), ref_fg)
        # RPN: our channel r * 4 + s (ratio-major) is the source's anchor (s, r); objectness as a probability.
        Hf, Wf = got["rpn_logits"].shape[-2:]
        if fmt == "bua_caffe":
            ref_fg_prob = ref["rpn_logits"].view(2, A, Hf, Wf).softmax(0)[1]
            ref_rpn_deltas = ref["rpn_deltas"][0].view(A, 4, Hf, Wf)
        else:
            order = torch.tensor([s * len(RATIOS) + r for r in range(len(RATIOS)) for s in range(len(SCALES))])
            ref_fg_prob = ref["rpn_logits"][0, order].sigmoid()
            ref_rpn_deltas = ref["rpn_deltas"][0].view(A, 4, Hf, Wf)[order]
        errs["rpn_objectness"] = max_err(got["rpn_logits"].sigmoid(), ref_fg_prob)
        errs["rpn_deltas"] = max_err(got["rpn_deltas"].view(A, 4, Hf, Wf), ref_rpn_deltas)
        print(fmt, seed, {k: f"{v:.1e}" for k, v in errs.items()})
        assert all(v < TOL for v in errs.values()), errs
        assert K == got["deltas"].shape[1]
        assert float(ref["features"].std()) > 1e-2 and float(ref_probs.max()) < 0.99


def test_caffe_wrong_but_loadable_conversions_fail_the_comparison(tmp_path):
    weights = detectron2_checkpoint("bua_caffe", attributes=False)
    path = tmp_path / "bua.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, path)  # a newer zip .pth
    ref = ref_forward(weights, "bua_caffe", image(), BOXES)
    for wrong in (dict(bgr=False), dict(res5_dilation=1)):
        det, _ = convert_with_tool(tmp_path, path, roi_op="pool", **wrong)
        got = ours(det, image())
        errs = (max_err(got["features"], ref["features"]), max_err(got["logits"][:, :-1], ref["logits"][:, 1:]))
        print("bua_caffe wrong", wrong, "features %.1e logits %.1e" % errs)
        assert min(errs) > 100 * TOL, (wrong, errs)


def test_restricted_unpickler_refuses_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(ConversionError, match="refused to build builtins.print"):
        load_pickle_weights(pickle.dumps({"model": {"a": Evil()}}))
    ok = load_pickle_weights(pickle.dumps({"model": {"a": np.ones((2, 2), np.float32)}, "__author__": "x"}))
    assert ok["a"].shape == (2, 2)


def test_conversion_refuses_unfilled_and_misshaped_targets():
    cfg = DetectorConfig(**{**detector_preset("butd_r101_vg"), "depth": 50})
    target = RegionFeatureExtractor(cfg).detector.state_dict()
    weights = detectron2_checkpoint("bua_caffe", attributes=False)
    convert(weights, target)  # the complete checkpoint maps
    partial = {k: v for k, v in weights.items() if not k.startswith("roi_heads.res5.2.")}
    with pytest.raises(ConversionError, match="unfilled detector weights"):
        convert(partial, target)
    deeper = dict(weights, **{"backbone.res4.6.conv1.weight": weights["backbone.res4.5.conv1.weight"]})
    with pytest.raises(ConversionError, match="the detector lacks"):
        convert(deeper, target)
    narrow = dict(weights, **{"roi_heads.box_predictor.cls_score.weight": weights[
        "roi_heads.box_predictor.cls_score.weight"][:100]})
    with pytest.raises(ConversionError):
        convert(narrow, target)
    with pytest.raises(ConversionError, match="unknown layout"):
        convert({"foo.weight": np.zeros(3)}, target)


def test_cli_refuses_a_checkpoint_that_does_not_map(tmp_path):
    weights = detectron2_checkpoint("detectron2_caffe", attributes=False)
    path = tmp_path / "d2.pkl"
    path.write_bytes(pickle.dumps({"model": weights}))
    with pytest.raises(SystemExit, match="does not map"):
        convert_detector.main([str(path), "--out", str(tmp_path / "out.pth"), "--config", config_yaml(tmp_path, depth=18)])
    assert not (tmp_path / "out.pth").exists()


def test_preset_config_values():
    cfg = load_config(None, ["detector.preset=butd_r101_vg", "detector.roi_op=pool", "data.tokenizer=x",
                             "data.captions_per_step=0", "data.text_per_step=1",
                             "data.text.sources={t: {urls: [x]}}"], check_files=False).detector
    assert (cfg.res5_dilation, cfg.caffe_stem_pool, cfg.bgr, cfg.rpn_channels) == (2, True, True, 512)
    assert cfg.roi_op == "pool"  # the section's own keys win over the preset
    assert dataclasses.replace(cfg, roi_op="align").roi_sampling_ratio == 1
