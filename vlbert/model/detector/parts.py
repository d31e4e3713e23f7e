"""The detector's building blocks: the mmdet model dict shaped by ``DetectorConfig``, and the
parts of the Caffe network that mmdet lacks (anchor geometry and order; RoIPool: roi_pool.py) or
that freezing needs (BatchNorm as a fixed scale and shift). ``extractor.py`` assembles them."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmdet.models.backbones import ResNet
from mmdet.models.task_modules.prior_generators import AnchorGenerator
from mmengine.config import ConfigDict

from vlbert.config import DetectorConfig
from vlbert.model.detector.convert import BOX_DELTA_STDS


def mmdet_config(cfg: DetectorConfig) -> ConfigDict:
    """The faster-rcnn_r50-caffe-c4 model dict, shaped by ``cfg``."""
    expansion = ResNet.arch_settings[cfg.depth][0].expansion
    res4, res5 = 256 * expansion, 512 * expansion
    norm_cfg = dict(type="BN", requires_grad=not cfg.freeze_batchnorm)
    dilated = cfg.res5_dilation == 2
    rpn_coder = "LegacyDeltaXYWHBBoxCoder" if cfg.caffe_boxes else "DeltaXYWHBBoxCoder"
    if cfg.roi_op == "align":
        roi_layer = dict(type="RoIAlign", output_size=cfg.roi_size, sampling_ratio=cfg.roi_sampling_ratio,
                         aligned=cfg.roi_aligned)
    else:  # replaced by CaffeRoIPool after the build (mmcv's op does not round the corners, as Caffe does)
        roi_layer = dict(type="RoIPool", output_size=cfg.roi_size)
    return ConfigDict(
        type="FasterRCNN",
        backbone=dict(
            type="ResNet", depth=cfg.depth, num_stages=3, strides=(1, 2, 2), dilations=(1, 1, 1),
            out_indices=(2,), frozen_stages=-1,  # freezing is ours (``_frozen_modules``), incl. res5
            norm_cfg=norm_cfg, norm_eval=cfg.freeze_batchnorm, style="caffe"),
        rpn_head=dict(
            type="RPNHead", in_channels=res4, feat_channels=cfg.rpn_channels or res4,
            anchor_generator=dict(type="AnchorGenerator", scales=list(cfg.anchor_scales),
                                  ratios=list(cfg.anchor_ratios), strides=[16]),
            bbox_coder=dict(type=rpn_coder, target_means=[0.0] * 4, target_stds=[1.0] * 4),
            loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
            loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(
            type="StandardRoIHead",
            shared_head=dict(type="ResLayer", depth=cfg.depth, stage=3, stride=1 if dilated else 2,
                             dilation=cfg.res5_dilation, style="caffe", norm_cfg=norm_cfg,
                             norm_eval=cfg.freeze_batchnorm),
            bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=roi_layer, out_channels=res4,
                                    featmap_strides=[16]),
            bbox_head=dict(
                type="BBoxHead", with_avg_pool=True, roi_feat_size=cfg.roi_size if dilated else cfg.roi_size // 2,
                in_channels=res5, num_classes=cfg.num_classes - 1,
                # Deltas are predicted divided by these (Detectron convention); the converter
                # rescales checkpoints whose deltas are raw (Caffe).
                bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=list(BOX_DELTA_STDS)),
                reg_class_agnostic=False,
                loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0))),
        train_cfg=None,
        test_cfg=dict(
            rpn=dict(nms_pre=6000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)),
    )


class CaffeAnchorGenerator(AnchorGenerator):
    """Anchors exactly as py-faster-rcnn's ``generate_anchors`` (the Caffe network's).

    Base box (0, 0, base-1, base-1); per ratio r (height / width) the width is
    round(sqrt(base^2 / r)) and the height round(width * r), both then times each
    scale; corners centre -/+ (size - 1) / 2. Ratio-major order, as mmdet's.
    """

    def gen_single_level_base_anchors(self, base_size, scales: Tensor, ratios: Tensor, center=None) -> Tensor:
        size = float(base_size) ** 2
        ctr = (float(base_size) - 1) / 2
        ws = torch.round(torch.sqrt(size / ratios.double()))
        hs = torch.round(ws * ratios.double())
        ws = (ws[:, None] * scales.double()[None, :]).reshape(-1)
        hs = (hs[:, None] * scales.double()[None, :]).reshape(-1)
        half_w, half_h = 0.5 * (ws - 1), 0.5 * (hs - 1)
        anchors = torch.stack([ctr - half_w, ctr - half_h, ctr + half_w, ctr + half_h], -1)
        return anchors.float()


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all held as buffers.

    Frozen BatchNorm as a per-channel scale and shift computed in the input's
    dtype: nothing to train, no float32 statistics beside bf16/fp16 weights
    (DeepSpeed casts parameters, not buffers), and the same state-dict names
    (weight, bias, running_mean, running_var) as ``nn.BatchNorm2d``.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        n = bn.num_features
        self.eps = bn.eps
        for name, default in (("weight", torch.ones(n)), ("bias", torch.zeros(n)),
                              ("running_mean", torch.zeros(n)), ("running_var", torch.ones(n))):
            value = getattr(bn, name, None)
            self.register_buffer(name, (value.detach().clone() if value is not None else default).float())

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm's counter means nothing here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def freeze_batchnorms(root: nn.Module) -> None:
    """Replace every BatchNorm under ``root`` by a FrozenBatchNorm2d with its current values."""
    for name, child in list(root.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(root, name, FrozenBatchNorm2d(child))
        else:
            freeze_batchnorms(child)
