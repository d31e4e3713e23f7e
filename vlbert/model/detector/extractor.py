"""Faster R-CNN ResNet C4 (MMDetection) as a region feature extractor.

The detector is mmdet's ``FasterRCNN`` built from the ``faster-rcnn_r50-caffe-c4``
dicts: a ResNet with three stages (stem, res2, res3, res4; output stride 16), an
RPN on res4, and a ``StandardRoIHead`` whose shared head is res5 (``ResLayer``
stage 3) followed by a ``BBoxHead``. Parameter names are mmdet's (``backbone.*``, ``rpn_head.*``,
``roi_head.*``) under ``self.detector``, so MMDetection checkpoints load as they are.

Shapes: B images, R box slots, H/W padded image size, C = ``cfg.num_classes``.

Architecture options (``DetectorConfig``; the ``butd_r101_vg`` preset sets them to the
published Visual Genome network): Caffe stem pool, dilated res5 at stride 1, the RoI op
(mmcv RoIAlign, or Caffe's RoIPool), RPN width, anchors (Caffe geometry and order),
BGR input. ``vlbert-convert-detector`` (``vlbert.model.detector.convert``) turns the
published checkpoints into this module's state dict.

Class distributions: ``cfg.num_classes`` counts every output of the box
classifier *including* background (the Visual Genome detector: 1600 objects +
background = 1601). mmdet's head is therefore built with ``num_classes - 1``
foreground classes, and ``class_probs``/``detect`` return the full softmax over
all ``cfg.num_classes`` outputs in mmdet's order (foreground classes first,
background last). Rows sum to 1; this is the masked-RoI target of the paper.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmcv.ops import batched_nms
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi
from mmdet.utils import register_all_modules
from mmengine.config import ConfigDict
from mmengine.logging import MMLogger

from vlbert.config import DetectorConfig
from vlbert.model.detector.convert import HEAD_PREFIXES, read_checkpoint
from vlbert.model.detector.parts import CaffeAnchorGenerator, freeze_batchnorms, mmdet_config
from vlbert.model.detector.roi_pool import CaffeRoIPool

# Checkpoint keys we may lack or ignore: the box regressor is never used (regions
# are RPN proposals, as in bottom-up attention), and mask heads are not built.
_IGNORED_MISSING = ("roi_head.bbox_head.fc_reg.",)
_IGNORED_UNEXPECTED = ("roi_head.mask_head.", "roi_head.mask_roi_extractor.", "data_preprocessor.")


def zero_masked_regions(images: Tensor, boxes: Tensor, masked: Tensor) -> Tensor:
    """Set the raw pixels inside the masked boxes to 0 (a new tensor).

    images: [B, 3, H, W] (any dtype, usually uint8 RGB); boxes: float [B, R, 4]
    (x1, y1, x2, y2) in pixels; masked: bool [B, R]. Pixel (i, j) covers
    [j, j+1) x [i, i+1); it is zeroed when it overlaps a masked box.
    """
    B, _, H, W = images.shape
    # No early return when nothing is masked: testing that would make the host wait for the device,
    # and with no masked box ``covered`` is all False, so the result equals the input.
    with torch.autocast(images.device.type, enabled=False):
        b = boxes.float()
        xs = torch.arange(W, device=images.device, dtype=torch.float32)
        ys = torch.arange(H, device=images.device, dtype=torch.float32)
        cols = (xs >= b[..., 0:1].floor()) & (xs < b[..., 2:3].ceil()) & masked[..., None]  # [B, R, W]
        rows = (ys >= b[..., 1:2].floor()) & (ys < b[..., 3:4].ceil())  # [B, R, H]
        # Union over boxes of row x column rectangles as one batched matmul: [B, H, R] @ [B, R, W].
        covered = torch.bmm(rows.transpose(1, 2).float(), cols.float()) > 0
    return images.masked_fill(covered[:, None], 0)


def apply_region_masks(res5: Tensor, masks: Tensor) -> Tensor:
    """res5 [N, C, S, S] times each box's mask [N, M, M], resized to S x S by area
    (a 14 x 14 mask on the 7 x 7 map of an undilated res5: each cell the mean of 2 x 2).

    As the VL-BERT reference does for VCR (jackroos/VL-BERT, common/fast_rcnn.py: the
    res5 output times ``segms``, then the average pool over every cell, so a small
    object's feature is also scaled by the fraction of its box it covers)."""
    m = masks.to(res5.dtype)[:, None]
    if m.shape[-2:] != res5.shape[-2:]:
        m = torch.nn.functional.adaptive_avg_pool2d(m, res5.shape[-2:])
    return res5 * m


class RegionFeatureExtractor(nn.Module):
    """Boxes -> one appearance feature each (RoIAlign on res4, res5, average pool).

    The constructor builds a randomly initialised detector and reads no file;
    ``from_config`` also loads ``cfg.checkpoint``.
    """

    def __init__(self, cfg: DetectorConfig):
        super().__init__()
        if cfg.num_classes < 2:
            raise ValueError(f"detector.num_classes counts background too; need >= 2, got {cfg.num_classes}")
        if cfg.roi_size % 2 and cfg.res5_dilation == 1:
            raise ValueError(f"detector.roi_size must be even (res5 halves it), got {cfg.roi_size}")
        self.cfg = cfg
        register_all_modules(init_default_scope=True)
        self.detector = MODELS.build(mmdet_config(cfg))
        self._apply_architecture(cfg)
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)  # init_weights reports every parameter at INFO
        try:
            self.detector.init_weights()
        finally:
            logger.setLevel(level)
        self.out_channels = 512 * ResNet.arch_settings[cfg.depth][0].expansion
        self.num_classes = cfg.num_classes
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1), persistent=False)
        # False after loading a backbone-only checkpoint: the RPN and box head are random.
        self.has_heads = True
        self._freeze()

    @classmethod
    def from_config(cls, cfg: DetectorConfig) -> "RegionFeatureExtractor":
        """Build, then load ``cfg.checkpoint`` when it names one (random init otherwise)."""
        detector = cls(cfg)
        if cfg.checkpoint:
            detector.load_checkpoint(cfg.checkpoint)
        return detector

    def _apply_architecture(self, cfg: DetectorConfig) -> None:
        """The options mmdet's config dicts cannot express, set on the built modules."""
        if cfg.caffe_stem_pool:
            self.detector.backbone.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=0, ceil_mode=True)
        if cfg.caffe_boxes:
            rpn = self.detector.rpn_head
            rpn.prior_generator = CaffeAnchorGenerator(
                strides=[16], scales=list(cfg.anchor_scales), ratios=list(cfg.anchor_ratios))
        if cfg.roi_op == "pool":
            extractor = self.detector.roi_head.bbox_roi_extractor
            extractor.roi_layers = nn.ModuleList([CaffeRoIPool(cfg.roi_size, 1 / 16)])

    # ------------------------------------------------------------------ freezing

    def _frozen_modules(self) -> list[nn.Module]:
        """Stem and res2..res(k+1) for frozen_stages = k (mmdet's meaning); k = 4 adds res5."""
        bb, k = self.detector.backbone, self.cfg.frozen_stages
        mods: list[nn.Module] = []
        if k >= 0:
            mods += [bb.stem] if bb.deep_stem else [bb.conv1, bb.norm1]
        mods += [getattr(bb, f"layer{i}") for i in range(1, min(k, 3) + 1)]
        if k >= 4:
            mods.append(self.detector.roi_head.shared_head)
        return mods

    def _batchnorms(self) -> list[nn.Module]:
        return [m for m in self.detector.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _freeze(self) -> None:
        # The RPN is only used by ``detect``; the box head only gives targets (under no_grad):
        # neither receives a gradient from pretraining, so neither carries optimizer state.
        frozen = self._frozen_modules() + [self.detector.rpn_head, self.detector.roi_head.bbox_head]
        if self.cfg.freeze_batchnorm:
            freeze_batchnorms(self.detector)
        if not self.cfg.trainable:
            frozen = [self.detector]
        for m in frozen:
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "RegionFeatureExtractor":
        """Frozen stages and (with freeze_batchnorm) every BatchNorm stay in eval mode."""
        super().train(mode)
        if mode:
            if not self.cfg.trainable:
                self.detector.eval()
                return self
            for m in self._frozen_modules():
                m.eval()
            if self.cfg.freeze_batchnorm:
                for m in self._batchnorms():
                    m.eval()
        return self

    # ------------------------------------------------------------------ pieces

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] RGB -> float [B, 3, H, W] (BGR when ``cfg.bgr``), on the images' device."""
        x = images.float()
        x = x.flip(1) if self.cfg.bgr else x
        x = (x - self.pixel_mean) / self.pixel_std
        # In the dtype of the convolutions: bf16/fp16 when the engine has cast the weights.
        return x.to(self.detector.backbone.conv1.weight.dtype)

    def _run(self, fn, x: Tensor, params: nn.Module) -> Tensor:
        """``fn(x)``, under activation checkpointing when configured and ``params`` train."""
        # Recomputation pays only where something trains; frozen stages run plainly.
        if (self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
                and any(p.requires_grad for p in params.parameters())):
            return checkpoint(fn, x, use_reentrant=False)
        return fn(x)

    def _stem(self, x: Tensor) -> Tensor:
        bb = self.detector.backbone
        x = bb.stem(x) if bb.deep_stem else bb.relu(bb.norm1(bb.conv1(x)))
        return bb.maxpool(x)

    def res4(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> res4 feature map [B, C4, H/16, W/16]."""
        bb = self.detector.backbone
        x = self._run(self._stem, x, bb.stem if bb.deep_stem else bb.conv1)
        for name in bb.res_layers:
            x = self._run(getattr(bb, name), x, getattr(bb, name))
        return x

    def _res5(self, feat: Tensor, rois: Tensor) -> Tensor:
        """res4 map + rois [N, 5] (batch index, x1, y1, x2, y2) -> res5 output [N, C5, S/2, S/2]."""
        # mmcv's RoIAlign kernels are float32 (CPU) / float16 (CUDA) only: run it in float32.
        with torch.autocast(feat.device.type, enabled=False):
            # .contiguous(): the kernel reads NCHW whatever the strides (channels-last would be wrong).
            pooled = self.detector.roi_head.bbox_roi_extractor((feat.float().contiguous(),), rois.float())
        head = self.detector.roi_head.shared_head
        return self._run(head, pooled.to(feat.dtype), head)

    @staticmethod
    def _check(images: Tensor, boxes: Tensor, box_mask: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        B = images.shape[0]
        if boxes.dim() != 3 or boxes.shape[0] != B or boxes.shape[2] != 4:
            raise ValueError(f"boxes must be [B={B}, R, 4], got {tuple(boxes.shape)}")
        if box_mask.shape != boxes.shape[:2] or box_mask.dtype != torch.bool:
            raise ValueError(f"box_mask must be bool [B, R] = {tuple(boxes.shape[:2])}, got "
                             f"{box_mask.dtype} {tuple(box_mask.shape)}")

    @staticmethod
    def _real_boxes(box_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(image index, box index) of the real boxes, long [N] each, row-major over ``box_mask``.

        The one host sync of the forward: N sizes RoIAlign's output. Indexing with these long
        tensors (gather, index_put) then needs none, where boolean-mask indexing syncs each time.
        """
        return box_mask.nonzero(as_tuple=True)

    @staticmethod
    def _scatter(values: Tensor, index: tuple[Tensor, Tensor], box_mask: Tensor) -> Tensor:
        """values [N, C] of the real boxes -> [B, R, C], 0 in padded slots."""
        out = values.new_zeros(*box_mask.shape, values.shape[-1])
        out[index] = values
        return out

    @staticmethod
    def _rois(boxes: Tensor, index: tuple[Tensor, Tensor]) -> Tensor:
        """rois [N, 5] (image index, x1, y1, x2, y2) float32, as mmdet's bbox2roi lays them out."""
        b, r = index
        return torch.cat([b[:, None].float(), boxes[b, r].float()], dim=1)

    # ------------------------------------------------------------------ public API

    def forward(self, images: Tensor, boxes: Tensor, box_mask: Tensor,
                roi_masked: Optional[Tensor] = None, region_masks: Optional[Tensor] = None) -> Tensor:
        """Appearance feature of every box.

        images: uint8 [B, 3, H, W] RGB; boxes: float [B, R, 4] (x1, y1, x2, y2) pixels;
        box_mask: bool [B, R] real boxes; roi_masked: bool [B, R] or None, boxes whose
        raw pixels are set to 0 before the CNN runs; region_masks: float [B, R, M, M] or
        None, a soft mask over each box (an object's segmentation rasterised on an M x M
        grid over its box) that multiplies the res5 map before the average pool, so the
        feature is the object's rather than its box's (VCR; see ``apply_region_masks``).
        Returns [B, R, out_channels]; padded slots are 0 and do not affect real boxes.
        """
        self._check(images, boxes, box_mask)
        if region_masks is not None and (region_masks.dim() != 4 or region_masks.shape[:2] != box_mask.shape):
            raise ValueError(f"region_masks must be [B, R, M, M] with [B, R] = {tuple(box_mask.shape)}, "
                             f"got {tuple(region_masks.shape)}")
        # First, while little is queued on the device: the host waits for this one.
        index = self._real_boxes(box_mask)
        if index[0].numel() == 0:
            return images.new_zeros(*box_mask.shape, self.out_channels, dtype=self.detector.backbone.conv1.weight.dtype)
        if roi_masked is not None:
            images = zero_masked_regions(images, boxes, roi_masked & box_mask)
        feat = self.res4(self.normalize(images))
        res5 = self._res5(feat, self._rois(boxes, index))
        if region_masks is not None:
            res5 = apply_region_masks(res5, region_masks[index])
        return self._scatter(res5.mean(dim=(2, 3)), index, box_mask)

    def box_logits(self, images: Tensor, boxes: Tensor, box_mask: Tensor) -> Tensor:
        """Box classifier scores of the given boxes: [N, num_classes] for the N real boxes
        (row-major over ``box_mask``), with gradients; for training the detector's classifier
        (``box_head_parameters``), as a detector is trained before VL-BERT pretraining."""
        self._check(images, boxes, box_mask)
        return self._classify(images, self._real_boxes(box_mask), boxes)

    def _classify(self, images: Tensor, index: tuple[Tensor, Tensor], boxes: Tensor) -> Tensor:
        """Box classifier scores [N, num_classes] of the boxes at ``index`` (see ``_real_boxes``)."""
        self._require_heads("box_logits")
        feat = self.res4(self.normalize(images))
        cls_score, _ = self.detector.roi_head.bbox_head(self._res5(feat, self._rois(boxes, index)))
        return cls_score

    def _require_heads(self, what: str) -> None:
        if not self.has_heads:
            raise RuntimeError(
                f"{what}: the detector checkpoint {self.cfg.checkpoint} holds only the backbone and res5 "
                f"(VL-BERT's ResNet file has no RPN or box head), so there are no detections or class "
                f"distributions; extract regions with a full checkpoint (docs/detector.md, converting the "
                f"published weights) and train with detector.roi_targets: precomputed")

    def box_head_parameters(self) -> list[nn.Parameter]:
        """The box classifier's parameters (frozen during VL-BERT pretraining)."""
        return list(self.detector.roi_head.bbox_head.parameters())

    @torch.no_grad()
    def class_probs(self, images: Tensor, boxes: Tensor, box_mask: Tensor) -> Tensor:
        """Box classifier distribution on the unmasked images: float32 [B, R, num_classes].

        Softmax over all ``num_classes`` outputs, background last (see module
        docstring); rows of real boxes sum to 1, padded rows are 0.
        """
        self._check(images, boxes, box_mask)
        index = self._real_boxes(box_mask)
        if index[0].numel() == 0:
            return torch.zeros(*box_mask.shape, self.num_classes, device=images.device)
        scores = self._classify(images, index, boxes)
        return self._scatter(scores.float().softmax(-1), index, box_mask)

    @torch.no_grad()
    def detect(self, images: Tensor, score_thr: float = 0.5, min_boxes: int = 10, max_boxes: int = 100,
               image_sizes: Optional[Tensor] = None, nms_iou: float = 0.3,
               num_proposals: int = 300) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Regions for pretraining, the bottom-up-attention recipe.

        The top ``num_proposals`` RPN proposals are classified; per class, NMS (``nms_iou``) keeps the best
        proposals, and each proposal's score is its highest surviving foreground
        class score. Proposals scoring >= ``score_thr`` are kept, topped up by score
        to ``min_boxes`` and cut to ``max_boxes`` (fewer only if the RPN gives fewer).
        Boxes are the proposals themselves, clipped to the image.

        images: uint8 [B, 3, H, W]; image_sizes: long [B, 2] (height, width) before
        padding, or None for the full size.
        Returns per image (boxes float [n, 4], scores float [n], class_probs float [n, num_classes]).
        """
        return [r[:3] for r in self.detect_with_features(images, score_thr, min_boxes, max_boxes, image_sizes,
                                                         nms_iou, num_proposals)]

    @torch.no_grad()
    def detect_with_features(self, images: Tensor, score_thr: float = 0.5, min_boxes: int = 10,
                             max_boxes: int = 100, image_sizes: Optional[Tensor] = None, nms_iou: float = 0.3,
                             num_proposals: int = 300) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """``detect``, plus each kept box's pooled appearance feature (res5 on its RoI, average-pooled:
        what ``forward`` gives for that box on the same image): per image (boxes [n, 4], scores [n],
        class_probs [n, num_classes], features float [n, out_channels])."""
        if not 1 <= min_boxes <= max_boxes:
            raise ValueError(f"need 1 <= min_boxes <= max_boxes, got {min_boxes}, {max_boxes}")
        self._require_heads("detect")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        B, _, H, W = images.shape
        sizes = [(H, W)] * B if image_sizes is None else [(int(h), int(w)) for h, w in image_sizes.tolist()]
        feat = self.res4(self.normalize(images))
        rpn = self.detector.rpn_head
        cls_scores, bbox_preds = rpn((feat,))
        metas = [{"img_shape": s} for s in sizes]
        rpn_cfg = ConfigDict(rpn.test_cfg.to_dict(), max_per_img=num_proposals)
        proposals = [p.bboxes.float() for p in rpn.predict_by_feat(cls_scores, bbox_preds, batch_img_metas=metas,
                                                                   cfg=rpn_cfg)]
        res5 = self._res5(feat, bbox2roi(proposals))
        cls_score, _ = self.detector.roi_head.bbox_head(res5)
        counts = [len(p) for p in proposals]
        probs = cls_score.float().softmax(-1).split(counts)
        pooled = res5.mean(dim=(2, 3)).float().split(counts)
        out = []
        for p, q, f in zip(proposals, probs, pooled):
            keep, scores = _select_regions(p, q, score_thr, min_boxes, max_boxes, nms_iou)
            out.append((p[keep], scores, q[keep], f[keep]))
        return out

    def load_checkpoint(self, url: str) -> None:
        """Load MMDetection weights from a path or any fsspec URL, read by
        ``convert.read_checkpoint`` (tensors only); see ``load_detector_state``."""
        state, meta = read_checkpoint(url)
        self.load_detector_state(state, meta, source=url)

    def load_detector_state(self, state: dict[str, Tensor], meta: Optional[dict] = None, source: str = "") -> None:
        """Load mmdet-named weights (``backbone.*``, ``rpn_head.*``, ``roi_head.*``) into ``self.detector``.

        Raises ValueError naming missing, unexpected and mis-shaped keys, except
        keys of parts we never use (box regressor, mask heads), BatchNorm counters, and
        the RPN and box head when ``meta`` says ``parts: backbone`` (then ``has_heads``
        is False and ``detect``/``class_probs`` refuse to run).
        """
        backbone_only = (meta or {}).get("parts") == "backbone"
        ignored_missing = _IGNORED_MISSING + (HEAD_PREFIXES if backbone_only else ())
        own = self.detector.state_dict()
        missing = [k for k in own if k not in state and not k.startswith(ignored_missing)
                   and not k.endswith("num_batches_tracked")]
        # A frozen BatchNorm keeps no counter, so a checkpoint's counters have nowhere to go.
        unexpected = [k for k in state if k not in own and not k.startswith(_IGNORED_UNEXPECTED)
                      and not k.endswith("num_batches_tracked")]
        mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in state if k in own and state[k].shape != own[k].shape]
        if missing or unexpected or mismatched:
            parts = [f"{name} {len(keys)} (e.g. {', '.join(keys[:3])})"
                     for name, keys in (("missing", missing), ("unexpected", unexpected),
                                        ("shape mismatch", mismatched)) if keys]
            raise ValueError(f"{source or 'detector state'}: checkpoint does not fit detector depth={self.cfg.depth} "
                             f"num_classes={self.cfg.num_classes}: " + "; ".join(parts))
        self.detector.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        self.has_heads = not backbone_only


def _select_regions(boxes: Tensor, probs: Tensor, score_thr: float, min_boxes: int, max_boxes: int,
                    nms_iou: float) -> tuple[Tensor, Tensor]:
    """boxes [n, 4], probs [n, K+1] (background last) -> (indices of the kept boxes, best first; their scores)."""
    fg = probs[:, :-1]
    # Pairs far below the threshold cannot decide a box's score; skip them to keep NMS small.
    box_idx, cls_idx = torch.nonzero(fg >= min(score_thr, 0.01), as_tuple=True)
    score = torch.zeros(len(boxes), device=boxes.device)
    if len(box_idx):
        pair_scores = fg[box_idx, cls_idx]
        _, keep = batched_nms(boxes[box_idx], pair_scores, cls_idx, dict(type="nms", iou_threshold=nms_iou))
        score.scatter_reduce_(0, box_idx[keep], pair_scores[keep], reduce="amax")
    # Rank by surviving score, ties (e.g. all suppressed) by the raw best foreground score.
    order = torch.argsort(fg.max(1).values if fg.shape[1] else score, descending=True, stable=True)
    order = order[torch.argsort(score[order], descending=True, stable=True)]
    n = min(max(int((score >= score_thr).sum()), min_boxes), max_boxes, len(boxes))
    keep = order[:n]
    return keep, score[keep]
