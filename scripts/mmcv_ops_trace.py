"""Which compiled mmcv functions (``mmcv._ext``) vlbert's detector paths call, found by running them.

    python scripts/mmcv_ops_trace.py [--json-out FILE] [--check]

Every ``mmcv.ops`` module binds the compiled extension once, at import, through
``mmcv.utils.ext_loader.load_ext``; this script wraps that function before anything imports
``mmcv.ops``, so each module gets a recorder that notes every ``_ext`` function called, then
runs each path on tiny inputs (depth 18, 64-pixel images; the ops do not depend on the depth):

- every detector layout: the default (mmdet's faster-rcnn_r50-caffe-c4: RoIAlign aligned,
  adaptive sampling), the ``butd_r101_vg`` preset (RoIAlign legacy, one sample per bin, Caffe
  anchors and RPN decoding), and that preset with ``roi_op: pool`` (Caffe RoIPool);
- training: features with gradients into res3-res5 (masked RoIs, activation checkpointing on
  and off) and the box classifier's logits with gradients (the detector demo);
- masked-RoI targets (``class_probs``) and extraction (``detect``: RPN proposals, per-class NMS),
  as ``vlbert-extract-regions`` runs it; and mmdet's own ``FasterRCNN.predict`` for comparison.

``roi_op: pool`` runs vlbert's own Caffe RoIPool (vlbert/model/detector/roi_pool.py) on every
device, so it calls no mmcv function; ``--device cuda`` traces the CUDA paths for real.
``--check`` exits 1 when the installed ``mmcv._ext`` lacks a traced function (or has it only as a
"not built in this install" stub). The list is recorded in docs/install.md and compiled from
scripts/patches/mmcv-2.1.0-ops.txt.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcv.utils import ext_loader  # noqa: E402  (before mmcv.ops: see the module docstring)

CALLS: dict[str, set[str]] = defaultdict(set)
_current = ["import"]
# Functions a CUDA run calls that a CPU trace cannot see (none: see the module docstring).
CUDA_ONLY: dict[str, tuple[str, ...]] = {}


class _Recorder:
    """Stands for the ``mmcv._ext`` module in one ``mmcv.ops`` module; notes the functions called."""

    def __init__(self, ext):
        self._ext = ext

    def __getattr__(self, name):
        attr = getattr(self._ext, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            CALLS[_current[0]].add(name)
            return attr(*args, **kwargs)
        return call


_load_ext = ext_loader.load_ext
ext_loader.load_ext = lambda name, funcs: _Recorder(_load_ext(name, funcs))


@contextlib.contextmanager
def path(name: str):
    _current[0] = name
    try:
        yield
    finally:
        _current[0] = "other"


def run_paths(device: str) -> None:
    import torch
    from mmdet.structures import DetDataSample

    from vlbert.config import DetectorConfig, detector_preset
    from vlbert.model.detector import RegionFeatureExtractor

    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=g).to(device)
    boxes = torch.tensor([[[0, 0, 64, 64], [8.5, 10, 40, 50.2], [0, 0, 0, 0]],
                          [[0, 0, 64, 64], [5, 5, 20, 20], [30, 30, 60, 60]]], device=device)
    mask = torch.tensor([[True, True, False], [True, True, True]], device=device)
    masked = torch.tensor([[False, True, False], [False, False, True]], device=device)
    layouts = {"default": {}, "butd_r101_vg": detector_preset("butd_r101_vg"),
               "butd_r101_vg+roi_op=pool": dict(detector_preset("butd_r101_vg"), roi_op="pool")}
    for layout, fields in layouts.items():
        cfg = DetectorConfig(**dict(fields, depth=18, num_classes=5))
        for ckpt in (False, True):
            torch.manual_seed(0)
            det = RegionFeatureExtractor(dataclasses.replace(cfg, activation_checkpointing=ckpt)).to(device).train()
            with path(f"{layout}: train features, grads into res3-res5, checkpointing={ckpt}"):
                feats = det(images, boxes, mask, roi_masked=masked)
                feats[mask].square().mean().backward()
                trained = [n for n, p in det.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
                assert any(".layer2." in n for n in trained) and any("shared_head" in n for n in trained), trained
        with path(f"{layout}: box classifier training (box_logits + backward)"):
            det.box_head_parameters()[0].requires_grad_(True)
            det.box_logits(images, boxes, mask).logsumexp(-1).sum().backward()
        det.eval()
        with path(f"{layout}: masked-RoI targets (class_probs)"):
            det.class_probs(images, boxes, mask)
        with path(f"{layout}: extraction (detect: RPN, per-class NMS)"):
            det.detect(images, score_thr=0.0, min_boxes=2, max_boxes=5, num_proposals=20)
        with path(f"{layout}: mmdet FasterRCNN.predict"), torch.no_grad():
            samples = [DetDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), scale_factor=(1.0, 1.0)))
                       for _ in range(2)]
            det.detector.predict(det.normalize(images), samples, rescale=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json-out", type=Path)
    p.add_argument("--check", action="store_true", help="fail when the installed mmcv._ext lacks a traced function")
    args = p.parse_args(argv)
    run_paths(args.device)
    paths = {k: sorted(v) for k, v in CALLS.items()}
    traced = sorted(set().union(*CALLS.values()))
    cuda_path = [] if args.device == "cuda" else [f for fs in CUDA_ONLY.values() for f in fs]
    needed = sorted(set(traced) | set(cuda_path))
    import mmcv
    import torch
    from mmcv.utils import ext_loader as loader
    stubs = set(getattr(loader, "NOT_BUILT", ()))
    ext = _load_ext("_ext", [])
    missing = [f for f in needed if not hasattr(ext, f) or f in stubs]
    report = dict(device=args.device, torch=torch.__version__, mmcv=mmcv.__version__, paths=paths, traced=traced,
                  cuda_path_not_traced=cuda_path, needed=needed, missing_in_install=missing)
    text = json.dumps(report, indent=1)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    print(text)
    if args.check and missing:
        print(f"mmcv_ops_trace: the installed mmcv._ext lacks {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
