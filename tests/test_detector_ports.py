"""Each published detector port as its authors wrote it: the RPN channel order against a
re-implementation of that port's own anchor generator, and ``vlbert-convert-detector`` on files in
torch's legacy (pre-1.6) container. The checkpoints (real key names, cited in their builders) come
from tests/test_detector_convert.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from test_detector_convert import (A, RATIOS, SCALES, attribute_keys, config_yaml, detectron2_checkpoint,
                                   save_legacy, torchvision_checkpoint)
from vlbert.cli import convert_detector
from vlbert.config import DetectorConfig, detector_preset
from vlbert.model.detector import RegionFeatureExtractor
from vlbert.model.detector.convert import convert

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::UserWarning")]


def caffe_generate_anchors(base=16, ratios=RATIOS, scales=SCALES) -> torch.Tensor:
    """bottom-up-attention lib/rpn/generate_anchors.py (py-faster-rcnn's; read in the
    Shaobo-Xu/bottom-up-attention fork of peteanderson80/bottom-up-attention): ``_ratio_enum``
    over the ratios of the base window (0, 0, 15, 15), rounded, then ``_scale_enum`` of each,
    stacked ratio by ratio: anchor index = ratio index * len(scales) + scale index."""
    out = []
    for r in ratios:
        ws = np.round(np.sqrt(base * base / r))
        hs = np.round(ws * r)
        for s in scales:
            w, h, c = ws * s, hs * s, (base - 1) / 2
            out.append([c - (w - 1) / 2, c - (h - 1) / 2, c + (w - 1) / 2, c + (h - 1) / 2])
    return torch.tensor(out, dtype=torch.float32)


def detectron2_cell_anchor_sizes(sizes=(64, 128, 256, 512), ratios=RATIOS) -> list[tuple[float, float]]:
    """(w, h) of airsplay/py-bottom-up-attention detectron2/modeling/anchor_generator.py
    ``DefaultAnchorGenerator.generate_cell_anchors`` (lines 162-175: ``for size in sizes: for
    aspect_ratio in aspect_ratios``, w = sqrt(size^2 / a), h = a * w), with the VG config's
    ``SIZES: [[64, 128, 256, 512]]`` and the default ratios: index = size index * 3 + ratio index."""
    return [(math.sqrt(s * s / a), a * math.sqrt(s * s / a)) for s, a in itertools.product(sizes, ratios)]


def match_anchors(ours: torch.Tensor, theirs: list[tuple[float, float]]) -> list[int]:
    """For each of our anchors (x1, y1, x2, y2, Caffe +1 widths), the index of the source anchor
    with the same shape (nearest in log w + log h; Caffe's rounding moves that by under 0.08)."""
    perm = []
    for x1, y1, x2, y2 in ours.tolist():
        w, h = x2 - x1 + 1, y2 - y1 + 1
        d = [abs(math.log(w / tw)) + abs(math.log(h / th)) for tw, th in theirs]
        perm.append(int(np.argmin(d)))
        assert min(d) < 0.1, (w, h, theirs[perm[-1]])  # the next nearest is over 0.6 away
    assert sorted(perm) == list(range(len(theirs)))
    return perm


def test_caffe_anchors_are_py_faster_rcnn_generate_anchors():
    """Our anchors are Caffe's, in Caffe's order (the order the MILVLG and VL-BERT weights keep)."""
    cfg = DetectorConfig(**{**detector_preset("butd_r101_vg"), "depth": 18})
    gen = RegionFeatureExtractor(cfg).detector.rpn_head.prior_generator
    torch.testing.assert_close(gen.base_anchors[0], caffe_generate_anchors(), rtol=0, atol=0)
    grid = gen.grid_priors([(2, 3)], device="cpu")[0]  # location (y, x) major, then anchor
    torch.testing.assert_close(grid[A * 4: A * 5], caffe_generate_anchors() + torch.tensor([16.0, 16, 16, 16]))


@pytest.fixture(scope="module")
def depth50_target():
    cfg = DetectorConfig(**{**detector_preset("butd_r101_vg"), "depth": 50})
    det = RegionFeatureExtractor(cfg).detector
    return det.state_dict(), det.rpn_head.prior_generator.base_anchors[0]


def test_rpn_channels_follow_each_ports_anchor_order(depth50_target):
    """Converted RPN channel i must be the source channel of the anchor with our anchor i's shape,
    where the source's order is computed by re-implementing that source's generator:
    detectron2 port: DefaultAnchorGenerator (size-major), the head's channel k being cell anchor k
    (StandardRPNHead, detectron2/modeling/proposal_generator/rpn.py);
    MILVLG: the Caffe blobs, channel k = generate_anchors' anchor k, with the softmax's A background
    channels first (bua/caffe/modeling/rpn_outputs.py ``predict_objectness_logits``: view(N, 2, A,
    H, W), softmax over dim 1, keep [:, 1:]) and 4 deltas per anchor (``predict_proposals``:
    view(N, A, 4, H, W)). (MILVLG's runtime pairs those blobs with detectron2's
    DefaultAnchorGenerator, configs/caffe/test-caffe-r101.yaml SIZES [[4, 8, 16, 32]]; its
    conversion script is not published, so the Caffe order is the one the weights were trained in.)
    Fails if the converter's size-major -> ratio-major permutation is replaced by the identity."""
    target, ours = depth50_target
    cases = {"detectron2_caffe": match_anchors(ours, detectron2_cell_anchor_sizes()),
             "bua_caffe": match_anchors(ours, [(x2 - x1 + 1, y2 - y1 + 1)
                                              for x1, y1, x2, y2 in caffe_generate_anchors().tolist()])}
    for fmt, perm in cases.items():
        w = detectron2_checkpoint(fmt, attributes=False)
        r = "proposal_generator.rpn_head."
        if fmt == "bua_caffe":  # background k = -k, foreground k = k: the sigmoid head's bias is 2k
            w[r + "objectness_logits.bias"] = np.concatenate([-np.arange(A), np.arange(A)]).astype(np.float32)
        else:
            w[r + "objectness_logits.bias"] = np.arange(A, dtype=np.float32)
        w[r + "anchor_deltas.bias"] = np.arange(4 * A, dtype=np.float32)
        out = convert(w, target, fmt).state_dict
        scale = 2 if fmt == "bua_caffe" else 1
        assert out["rpn_head.rpn_cls.bias"].tolist() == [scale * p for p in perm], fmt
        assert out["rpn_head.rpn_reg.bias"].tolist() == [4 * p + j for p in perm for j in range(4)], fmt
    assert cases["detectron2_caffe"] != list(range(A)) and cases["bua_caffe"] == list(range(A))


@pytest.mark.parametrize("layout", ["vlbert_resnet", "bua_caffe", "detectron2_caffe"])
def test_cli_converts_a_legacy_torch_file_of_each_published_layout(layout, tmp_path):
    """``vlbert-convert-detector`` (main(argv)) on a file in torch's pre-1.6 container, with each
    layout's real names: VL-BERT's resnet101-pt-vgbua-0000.model (here with an ``fc`` too),
    MILVLG's .pth (``{"model": ...}``, num_batches_tracked in res4/res5, attribute head) and the
    detectron2 port's weights re-saved by torch. The written checkpoint holds the source's
    weights under our names. Fails on the previous reader, which sent every non-zip file to the
    numpy unpickler ("expected a dict of weights (optionally under 'model'), got int")."""
    from vlbert.model.detector.convert import read_checkpoint

    if layout == "vlbert_resnet":
        src = torchvision_checkpoint(fc=True)
        obj, first, ours = src, "layer3.5.conv2.weight", "backbone.layer3.5.conv2.weight"
        unused = ["fc.bias", "fc.weight"]
    else:
        src = {k: torch.from_numpy(np.asarray(v)) for k, v in detectron2_checkpoint(layout).items()}
        obj = {"model": src} if layout == "bua_caffe" else src
        first, ours = "roi_heads.res5.2.conv3.norm.running_var", "roi_head.shared_head.layer4.2.bn3.running_var"
        unused = sorted(attribute_keys(layout))
    path = tmp_path / f"{layout}.model"
    save_legacy(obj, path)
    assert path.read_bytes()[:2] == b"\x80\x02"  # the legacy container, not the zip
    out = tmp_path / "converted.pth"
    summary = convert_detector.main([str(path), str(out), "--config", config_yaml(tmp_path)])
    assert summary["source_format"] == layout and summary["unused_source_keys"] == unused
    state, meta = read_checkpoint(str(out))
    assert meta["source_format"] == layout and torch.equal(state[ours], src[first].float())
    assert not any(k.endswith("num_batches_tracked") for k in state)
