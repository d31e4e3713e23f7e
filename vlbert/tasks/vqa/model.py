"""VL-BERT for VQA: the answer from the hidden state at ``[MASK]`` (DESIGN.md section 7).

Head: the MLM head's transform (dense, GELU, LayerNorm; started from the
pretrained MLM head), dropout, a linear layer over the answer vocabulary
(Xavier-uniform, as jackroos/VL-BERT vqa/modules/resnet_vlbert_for_vqa.py starts it).
Loss: binary cross-entropy with logits against the soft scores, summed over
the vocabulary and averaged over questions (= the mean BCE x vocabulary size,
as the reference scales it).
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
from vlbert.tasks.vqa.data import VQABatch


@dataclass
class VQAOutput:
    """logits: [B, A]. loss: scalar (0 without targets). soft_acc: mean soft score of the
    arg-max answer (the VQA accuracy on questions whose answers are in the vocabulary)."""

    loss: torch.Tensor
    soft_acc: torch.Tensor
    logits: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {"loss": self.loss.detach(), "soft_acc": self.soft_acc.detach()}


class VQAHead(nn.Module):
    def __init__(self, transform: nn.Module, hidden_size: int, num_answers: int, dropout: float):
        super().__init__()
        self.transform = transform
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_answers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] -> logits [B, A]."""
        return self.classifier(self.dropout(self.transform(hidden)))


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE with logits summed over the A answers, mean over the B questions (float32)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]


class VLBertForVQA(TaskModel):
    def __init__(self, model_cfg: FinetuneModelConfig, detector_cfg: DetectorConfig, num_answers: int,
                 bert_config: Optional[BertConfig] = None):
        super().__init__()
        if num_answers < 1:
            raise ValueError(f"num_answers must be >= 1, got {num_answers}")
        self.backbone = Backbone(model_cfg, detector_cfg, bert_config)
        config = self.backbone.config
        self.head = VQAHead(self.backbone.new_transform(), config.hidden_size, num_answers, model_cfg.head_dropout)
        # Xavier-uniform weights and zero bias, as the reference starts its answer classifier
        # (jackroos/VL-BERT vqa/modules/resnet_vlbert_for_vqa.py, init_weight).
        nn.init.xavier_uniform_(self.head.classifier.weight)
        nn.init.zeros_(self.head.classifier.bias)

    def head_transforms(self) -> dict[str, nn.Module]:
        return {"the VQA head": self.head.transform}

    def forward(self, batch: VQABatch) -> VQAOutput:
        image = ImageInputs(batch.images, batch.image_sizes, batch.boxes, batch.box_mask, batch.features)
        out = self.backbone(batch.input_ids, batch.attention_mask, batch.token_type_ids, image)
        rows = torch.arange(len(batch), device=batch.input_ids.device)
        slot = out.layout.text_index[rows, batch.mask_position]
        logits = self.head(out.last_hidden_state[rows, slot])
        if batch.targets is None:
            zero = logits.new_zeros((), dtype=torch.float32)
            return VQAOutput(loss=zero, soft_acc=zero, logits=logits)
        loss = vqa_loss(logits, batch.targets)
        soft_acc = batch.targets.gather(1, logits.argmax(-1, keepdim=True)).float().mean()
        return VQAOutput(loss=loss, soft_acc=soft_acc, logits=logits)
