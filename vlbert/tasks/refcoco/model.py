"""VL-BERT for RefCOCO+: a score per RoI from its hidden state (DESIGN.md section 7).

Head: dense, GELU, LayerNorm, dropout, linear to 1, started as the reference
starts it (jackroos/VL-BERT refcoco/modules/resnet_vlbert_for_refcoco.py,
``final_mlp``): every linear layer Xavier-uniform with zero bias, then the
transform from the pretrained masked-RoI head's transform
(cfgs/refcoco/base_detected_regions_4x16G.yaml maps
``vlbert.mvrc_head.transform`` to ``final_mlp.0``); a plain-BERT start has no
such head and keeps the Xavier transform. The reference's masked-RoI transform
is dense + GELU; ours (``roi_head.transform``) also has the LayerNorm.
Loss: binary cross-entropy over every real RoI, box 0 (the whole image)
included as in the reference, against IoU > 0.5 labels. Prediction: the
highest-scored RoI; correct when its IoU with the ground-truth box is at least 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig

from vlbert.config import DetectorConfig
from vlbert.tasks.backbone import Backbone, ImageInputs, TaskModel
from vlbert.tasks.config import FinetuneModelConfig
from vlbert.tasks.refcoco.data import RefBatch
from vlbert.tasks.refcoco.metric import HIT_IOU

ROI_TRANSFORM = "roi_head.transform."  # the pretrained masked-RoI head's transform (VLBertForPretraining)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes a [B, 4] and b [B, 4] row by row -> [B]."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)


@dataclass
class RefOutput:
    """scores [B, R] (-inf on padding); loss; acc = fraction with IoU(top box, gt) >= 0.5."""

    loss: torch.Tensor
    acc: torch.Tensor
    scores: torch.Tensor
    top_boxes: torch.Tensor  # [B, 4]

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.detach(), "acc": self.acc.detach()}


class VLBertForRefCOCO(TaskModel):
    pretrained_transform = ROI_TRANSFORM

    def __init__(self, model_cfg: FinetuneModelConfig, detector_cfg: DetectorConfig,
                 bert_config: Optional[BertConfig] = None):
        super().__init__()
        self.backbone = Backbone(model_cfg, detector_cfg, bert_config)
        config = self.backbone.config
        self.transform = self.backbone.new_transform()
        self.dropout = nn.Dropout(model_cfg.head_dropout)
        self.scorer = nn.Linear(config.hidden_size, 1)
        for linear in (self.transform.dense, self.scorer):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def head_transforms(self) -> dict[str, nn.Module]:
        return {"the RefCOCO+ head": self.transform}

    def load_bert(self, state: dict[str, torch.Tensor]) -> None:
        """The encoder only: BERT has no masked-RoI head, so the transform keeps its Xavier start
        (the reference without VL-BERT weights)."""
        self.backbone.vlbert.load_bert_state_dict(state)

    def forward(self, batch: RefBatch) -> RefOutput:
        image = ImageInputs(batch.images, batch.image_sizes, batch.boxes, batch.box_mask)
        types = torch.zeros_like(batch.input_ids)
        out = self.backbone(batch.input_ids, batch.attention_mask, types, image)
        index = out.layout.roi_index  # [B, R]
        hidden = out.last_hidden_state.gather(1, index[..., None].expand(-1, -1, out.last_hidden_state.shape[-1]))
        logits = self.scorer(self.dropout(self.transform(hidden))).squeeze(-1).float()  # [B, R]
        valid = batch.box_mask  # box 0 is always real, so every row has a box
        loss = F.binary_cross_entropy_with_logits(logits[valid], batch.labels[valid].float(), reduction="mean")
        scores = logits.masked_fill(~valid, float("-inf"))
        top = scores.argmax(-1)
        top_boxes = batch.boxes[torch.arange(len(batch), device=top.device), top]
        acc = (pairwise_iou(top_boxes.float(), batch.gt_boxes.float()) >= HIT_IOU).float().mean()
        return RefOutput(loss=loss, acc=acc, scores=scores, top_boxes=top_boxes)
