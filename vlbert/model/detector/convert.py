"""Published Visual Genome detector checkpoints -> this project's detector state dict.

The "bottom-up attention" Faster R-CNN ResNet-101 C4 (DESIGN.md section 6) exists in
three layouts people actually have. Each is mapped, name by name, onto the
``RegionFeatureExtractor`` state dict (mmdet names: ``backbone.*``, ``rpn_head.*``,
``roi_head.shared_head.layer4.*``, ``roi_head.bbox_head.*``) of a detector built with
``detector.preset: butd_r101_vg``:

``vlbert_resnet`` — VL-BERT's ``resnet101-pt-vgbua-0000.model``: torchvision names
    (``conv1``, ``bn1``, ``layer1..layer3`` = res2..res4, ``layer4`` = res5, which VL-BERT
    runs at stride 1 with dilation 2). No RPN and no box head: the result holds the
    backbone and res5 only (meta ``parts: backbone``); such a detector gives features but
    no detections or class distributions, so regions must come from a full checkpoint.
``detectron2_caffe`` — the detectron2 ports ``faster_rcnn_from_caffe.pkl`` and
    ``faster_rcnn_from_caffe_attr.pkl`` (py-bottom-up-attention): a pickle of
    ``{"model": {name: ndarray}, "__author__": ...}``, read through inert stand-ins
    (``weight_files``: no object is built from pickle data). Names ``backbone.stem.conv1``,
    ``backbone.res{2,3,4}.N.*``, ``roi_heads.res5.N.*``, ``proposal_generator.rpn_head.*``,
    ``roi_heads.box_predictor.*``.
``bua_caffe`` — MILVLG bottom-up-attention.pytorch ``bua-caffe-frcn-r101-*.pth``: the
    Caffe blobs under the same detectron2 names, BatchNorm ``num_batches_tracked`` in res4 and
    res5 (read with ``torch.load(weights_only=True)``).

Files are read by ``weight_files.read_weights_file``: torch's zip and legacy (pre-1.6, which
VL-BERT's ``.model`` and MILVLG's 2020 files are) containers and numpy pickles, told apart
by their first bytes.

Conventions, and what the conversion does about each:
- Background class: mmdet and the detectron2 ports put it LAST (index 1600); the Caffe
  network and the MILVLG file put it FIRST (index 0): its ``cls_score`` rows are rotated
  so that background is last. Class distributions (``class_probs``, ``regions.npy``, the
  masked-RoI targets) therefore always have background in the last column.
- RPN objectness: detectron2 ports use a sigmoid over A channels; Caffe/MILVLG a softmax
  over 2A channels (the first A background, the next A foreground). A two-way softmax's
  foreground probability is sigmoid(fg - bg), so a softmax head becomes the sigmoid head
  exactly with weight = W_fg - W_bg, bias = b_fg - b_bg.
- Anchor order: this detector's (mmdet's and Caffe's) is ratio-major, anchor index
  ``ratio * 4 + scale``. The detectron2 ports are size-major (``scale * 3 + ratio``), so
  their objectness and delta channels are permuted. The MILVLG file is taken to keep the
  Caffe blob order (its conversion script is not published; its runtime pairs the weights
  with detectron2's size-major generator, which could not be reconciled with Caffe).
- Box deltas: the head's coder decodes ``delta * (0.1, 0.1, 0.2, 0.2)`` (mmdet
  ``DeltaXYWHBBoxCoder`` target_stds, ``BOX_DELTA_STDS``; detectron2's weights 10, 10,
  5, 5). The Caffe weights output raw deltas (the normalisation was folded in before
  release), so the MILVLG ``bbox_pred`` rows for dx, dy are multiplied by 10 and for dw,
  dh by 5; the background's 4 rows are dropped (mmdet regresses foreground classes only).
  The detectron2 port's ``bbox_pred`` already has 1600 x 4 rows in detectron2's scaling.
  The RPN's deltas are raw in every source: its coder uses stds 1.
- Input: every source expects BGR pixels minus (102.9801, 115.9465, 122.7717), std 1:
  what the preset sets (``bgr``, ``pixel_mean``, ``pixel_std``); weights are not changed.
- BatchNorm: Caffe's BatchNorm+Scale pairs arrive as weight, bias, running_mean,
  running_var (eps 1e-5); ``num_batches_tracked`` is dropped.
- Attribute heads (``_attr`` files; detectron2 port: ``cls_embedding``, ``fc_attr``,
  ``attr_score``; MILVLG: ``cls_embed``, ``attr_linear1``, ``attr_linear2``) have no
  counterpart here; they are reported as unused.

``convert`` refuses a checkpoint when any target weight stays unfilled or has the wrong
shape, and returns the source names it did not use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import fsspec
import numpy as np
import torch
from torch import Tensor

from vlbert.model.detector.weight_files import (ConversionError, load_numpy_pickle, load_tensors, read_weights_file,
                                                weights_dict)

FORMATS = ("vlbert_resnet", "detectron2_caffe", "bua_caffe")
# Foreground-delta scaling of this project's box head (mmdet target_stds); raw deltas are divided by it.
BOX_DELTA_STDS = (0.1, 0.1, 0.2, 0.2)
# Parts a backbone-only source lacks (as in vlbert.model.detector.HEAD_PREFIXES).
HEAD_PREFIXES = ("rpn_head.", "roi_head.bbox_head.")
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
# Prefixes a whole saved state dict may carry (DataParallel, or our own RegionFeatureExtractor).
_STRIPPED_PREFIXES = ("module.", "detector.")


@dataclass
class Conversion:
    """The converted state dict, its source format, and what was left over."""

    state_dict: dict[str, Tensor]
    source_format: str
    parts: str  # "all" or "backbone"
    unused: list[str] = field(default_factory=list)

    def checkpoint(self, source: str = "") -> dict:
        """What ``read_checkpoint`` reads (``torch.save`` it)."""
        return {"state_dict": self.state_dict,
                "meta": {"source_format": self.source_format, "parts": self.parts, "source": source,
                         "unused_source_keys": list(self.unused)}}


# The DetectorConfig values of each source's own network (DESIGN.md section 6).
SOURCE_ARCHITECTURE = {
    "vlbert_resnet": dict(res5_dilation=2, caffe_stem_pool=False, roi_op="align", roi_sampling_ratio=1,
                          roi_aligned=False, bgr=True, pixel_mean=[102.9801, 115.9465, 122.7717],
                          pixel_std=[1.0, 1.0, 1.0]),
    "detectron2_caffe": dict(res5_dilation=2, caffe_stem_pool=True, roi_op="pool", bgr=True,
                             pixel_mean=[102.9801, 115.9465, 122.7717], pixel_std=[1.0, 1.0, 1.0],
                             rpn_channels=512),
    "bua_caffe": dict(res5_dilation=2, caffe_stem_pool=True, roi_op="pool", bgr=True,
                      pixel_mean=[102.9801, 115.9465, 122.7717], pixel_std=[1.0, 1.0, 1.0], rpn_channels=512),
}


def architecture_differences(fmt: str, cfg) -> list[str]:
    """Where ``cfg`` (a DetectorConfig) runs the converted weights differently from the source's network.

    Not errors: VL-BERT itself ran the Caffe weights with RoIAlign and a pad-1 stem pool.
    """
    return [f"detector.{k} is {getattr(cfg, k)!r}; the {fmt} source's network used {v!r}"
            for k, v in SOURCE_ARCHITECTURE[fmt].items() if getattr(cfg, k) != v]


# --------------------------------------------------------------------------- reading


def load_pickle_weights(data: bytes) -> dict[str, np.ndarray]:
    """``{"model": {name: ndarray}}`` (or a bare ``{name: ndarray}``) from a numpy pickle (inert stand-ins)."""
    return weights_dict(load_numpy_pickle(data))


def load_torch_weights(data: bytes) -> dict[str, Tensor]:
    """A torch checkpoint of tensors in either container, bare or under model/state_dict."""
    return weights_dict(load_tensors(data))


def read_checkpoint(url: str) -> tuple[dict[str, Tensor], dict]:
    """A detector checkpoint from a path or any fsspec URL -> (state dict, meta).

    Accepts ``{"state_dict": {...}, "meta": {...}}`` (MMDetection/mmengine, and what
    ``Conversion.checkpoint`` writes) or a bare state dict; only tensors and plain
    containers are built (``torch.load(weights_only=True)``). This is the one place the
    detector's weights are read (``RegionFeatureExtractor.load_checkpoint``).
    """
    with fsspec.open(url, "rb") as f:
        data = f.read()
    try:
        obj = load_tensors(data)
    except ConversionError as e:
        raise ValueError(f"{url}: refused to load: {e}. Re-save it as torch.save(ckpt['state_dict'], path)") from None
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{url}: expected a state dict of tensors or {{'state_dict': ...}}, got {type(obj).__name__}")
    for prefix in _STRIPPED_PREFIXES:
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj, meta


def read_source(data: bytes) -> dict:
    """Source weights from file bytes in any container (told by its first bytes, see weight_files)."""
    return weights_dict(read_weights_file(data))


def detect_format(weights: dict) -> str:
    """Which published layout ``weights`` has (see the module docstring)."""
    if "layer1.0.conv1.weight" in weights and "conv1.weight" in weights:
        return "vlbert_resnet"
    if "backbone.stem.conv1.weight" in weights:
        obj = weights.get("proposal_generator.rpn_head.objectness_logits.weight")
        deltas = weights.get("proposal_generator.rpn_head.anchor_deltas.weight")
        if obj is None or deltas is None:
            raise ConversionError("detectron2 names but no proposal_generator.rpn_head weights")
        return "bua_caffe" if obj.shape[0] == 2 * (deltas.shape[0] // 4) else "detectron2_caffe"
    raise ConversionError("unknown layout: neither torchvision ResNet names (conv1, layer1...) nor detectron2 "
                          "names (backbone.stem.conv1...); pass the format explicitly if you know it")


# --------------------------------------------------------------------------- name maps


def _tensor(v) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(v)).float() if isinstance(v, np.ndarray) else v.detach().float()


def _torchvision_name(name: str) -> Optional[str]:
    """VL-BERT's torchvision ResNet name -> target name (None: not used)."""
    if name.endswith("num_batches_tracked"):
        return None
    if re.match(r"^(conv1|bn1)\.", name):
        return "backbone." + name
    m = re.match(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(\w+)$", name)
    if not m:
        return None
    stage, block, part, leaf = m.groups()
    where = f"roi_head.shared_head.layer4.{block}" if stage == "4" else f"backbone.layer{stage}.{block}"
    return f"{where}.{part}.{leaf}"


def _detectron2_name(name: str) -> Optional[str]:
    """detectron2 backbone / res5 name -> target name (None: not a backbone name)."""
    if name.endswith("num_batches_tracked"):
        return None
    if name == "backbone.stem.conv1.weight":
        return "backbone.conv1.weight"
    m = re.match(r"^backbone\.stem\.conv1\.norm\.(\w+)$", name)
    if m:
        return f"backbone.bn1.{m.group(1)}"
    m = re.match(r"^(?:backbone\.res([234])|roi_heads\.res(5))\.(\d+)\.(conv[123]|shortcut)(\.norm)?\.(\w+)$", name)
    if not m:
        return None
    stage = int(m.group(1) or m.group(2))
    block, conv, norm, leaf = m.group(3), m.group(4), m.group(5), m.group(6)
    where = "roi_head.shared_head.layer4" if stage == 5 else f"backbone.layer{stage - 1}"
    if conv == "shortcut":
        part = "downsample.1" if norm else "downsample.0"
    else:
        part = f"bn{conv[-1]}" if norm else conv
    return f"{where}.{block}.{part}.{leaf}"


def _size_major_to_ratio_major(num_sizes: int, num_ratios: int) -> Tensor:
    """index[new] = old: new anchor r * S + s comes from old anchor s * R + r."""
    return torch.tensor([s * num_ratios + r for r in range(num_ratios) for s in range(num_sizes)])


def _heads(src: dict[str, Tensor], fmt: str, num_sizes: int, num_ratios: int) -> dict[str, Tensor]:
    """RPN and box head of a detectron2-named source, in this detector's conventions."""
    p, q = "proposal_generator.rpn_head.", "roi_heads.box_predictor."
    out = {"rpn_head.rpn_conv.weight": src[p + "conv.weight"], "rpn_head.rpn_conv.bias": src[p + "conv.bias"]}
    obj_w, obj_b = src[p + "objectness_logits.weight"], src[p + "objectness_logits.bias"]
    reg_w, reg_b = src[p + "anchor_deltas.weight"], src[p + "anchor_deltas.bias"]
    A = num_sizes * num_ratios
    cls_w, cls_b = src[q + "cls_score.weight"], src[q + "cls_score.bias"]
    box_w, box_b = src[q + "bbox_pred.weight"], src[q + "bbox_pred.bias"]
    if fmt == "bua_caffe":
        if obj_w.shape[0] != 2 * A:
            raise ConversionError(f"softmax RPN needs 2 x {A} objectness channels, got {obj_w.shape[0]}")
        # [bg_0..bg_A-1, fg_0..fg_A-1] -> sigmoid(fg - bg), anchors already in Caffe (ratio-major) order.
        obj_w, obj_b = obj_w[A:] - obj_w[:A], obj_b[A:] - obj_b[:A]
        K1 = cls_w.shape[0]
        if box_w.shape[0] != 4 * K1:
            raise ConversionError(f"Caffe bbox_pred needs 4 x {K1} rows (background first), got {box_w.shape[0]}")
        roll = torch.cat([torch.arange(1, K1), torch.tensor([0])])  # background first -> last
        cls_w, cls_b = cls_w[roll], cls_b[roll]
        scale = 1.0 / torch.tensor(BOX_DELTA_STDS).repeat(K1 - 1)  # raw deltas -> deltas / stds
        box_w, box_b = box_w[4:] * scale[:, None], box_b[4:] * scale
    else:
        if obj_w.shape[0] != A:
            raise ConversionError(f"sigmoid RPN needs {A} objectness channels, got {obj_w.shape[0]}")
        order = _size_major_to_ratio_major(num_sizes, num_ratios)
        obj_w, obj_b = obj_w[order], obj_b[order]
        reg_order = (order[:, None] * 4 + torch.arange(4)).reshape(-1)
        reg_w, reg_b = reg_w[reg_order], reg_b[reg_order]
        if box_w.shape[0] != 4 * (cls_w.shape[0] - 1):
            raise ConversionError(f"detectron2 bbox_pred needs 4 x {cls_w.shape[0] - 1} rows (foreground only), "
                                  f"got {box_w.shape[0]}")
    out.update({"rpn_head.rpn_cls.weight": obj_w, "rpn_head.rpn_cls.bias": obj_b,
                "rpn_head.rpn_reg.weight": reg_w, "rpn_head.rpn_reg.bias": reg_b,
                "roi_head.bbox_head.fc_cls.weight": cls_w, "roi_head.bbox_head.fc_cls.bias": cls_b,
                "roi_head.bbox_head.fc_reg.weight": box_w, "roi_head.bbox_head.fc_reg.bias": box_b})
    return out


_HEAD_SOURCE_KEYS = tuple(
    f"proposal_generator.rpn_head.{n}.{leaf}" for n in ("conv", "objectness_logits", "anchor_deltas")
    for leaf in ("weight", "bias")) + tuple(
    f"roi_heads.box_predictor.{n}.{leaf}" for n in ("cls_score", "bbox_pred") for leaf in ("weight", "bias"))


# --------------------------------------------------------------------------- convert


def convert(weights: dict, target: dict[str, Tensor], fmt: Optional[str] = None,
            num_anchor_sizes: int = 4, num_anchor_ratios: int = 3) -> Conversion:
    """Map ``weights`` (a published checkpoint's arrays) onto ``target`` (the detector's state dict).

    target: name -> tensor of the detector that will load the result (shapes are checked;
    ``num_batches_tracked`` entries are ignored). ``fmt``: one of FORMATS, detected when None.
    Raises ConversionError when a target weight stays unfilled or mis-shaped.
    """
    fmt = fmt or detect_format(weights)
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    src = {k: _tensor(v) for k, v in weights.items()}
    name_map: Callable[[str], Optional[str]] = _torchvision_name if fmt == "vlbert_resnet" else _detectron2_name
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, value in src.items():
        new = name_map(name)
        if new is not None:
            out[new] = value
            used.add(name)
    parts = "backbone"
    if fmt != "vlbert_resnet":
        missing_src = [k for k in _HEAD_SOURCE_KEYS if k not in src]
        if missing_src:
            raise ConversionError(f"{fmt}: source lacks {', '.join(missing_src)}")
        out.update(_heads(src, fmt, num_anchor_sizes, num_anchor_ratios))
        used.update(_HEAD_SOURCE_KEYS)
        parts = "all"

    wanted = {k: v for k, v in target.items() if not k.endswith("num_batches_tracked")
              and not (parts == "backbone" and k.startswith(HEAD_PREFIXES))}
    unfilled = sorted(k for k in wanted if k not in out)
    extra = sorted(k for k in out if k not in wanted)
    mismatched = [f"{k}: source {tuple(out[k].shape)} vs detector {tuple(wanted[k].shape)}"
                  for k in sorted(wanted) if k in out and out[k].shape != wanted[k].shape]
    if unfilled or extra or mismatched:
        parts_msg = [f"{what} {len(keys)} (e.g. {'; '.join(keys[:3])})"
                     for what, keys in (("unfilled detector weights", unfilled), ("mapped names the detector "
                                        "lacks", extra), ("shape mismatches", mismatched)) if keys]
        raise ConversionError(f"{fmt}: the checkpoint does not map onto this detector (check detector.depth and "
                              f"the preset): " + ", ".join(parts_msg))
    unused = sorted(k for k in src if k not in used and not k.endswith("num_batches_tracked"))
    return Conversion({k: out[k].contiguous() for k in wanted}, fmt, parts, unused)
