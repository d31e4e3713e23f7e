"""VL-BERT for VCR: four ``[CLS] context [SEP] response [SEP] RoIs [END]`` sequences per
question, scored from ``[CLS]`` (jackroos/VL-BERT, vcr/modules/resnet_vlbert_for_vcr.py).

- The detector runs once per image, its RoI features multiplied by each object's mask
  (``RegionFeatureExtractor(region_masks=...)``); the four sequences share them.
- A word that names an object takes that object's region feature as its visual
  feature (``VisualInputs.text_regions``), plain words the whole image's.
- Score: BERT's pooler (dense + tanh on ``[CLS]``; from BERT when the run starts from
  BERT, else BERT-initialised: our pretraining exports no pooler) -> dropout 0.1 ->
  linear -> 1 logit per choice (the reference's ``CLASSIFIER_TYPE: 1fc``).
- Loss: binary cross-entropy with logits, mean over the B x 4 logits, the right
  choice 1 and the others 0 (``CLASSIFIER_SIGMOID: true``, positive weight 1).
- Auxiliary loss (``CNN_LOSS_TOP: true``, weight 1): cross-entropy over the detection
  classes (``vcr.categories``, 81 for the release; the whole image is class 0) from the
  hidden state of every real RoI in each of the four sequences, through a head
  (transform, dropout 0 as the reference's ``CNN_REG_DROPOUT``, linear) whose transform
  starts from the pretrained masked-RoI head's (``roi_head.transform.*``). The reference
  classifies the RoI elements, not the words that name objects, and so does this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertPooler

from vlbert.config import DetectorConfig
from vlbert.model.embeddings import VisualInputs
from vlbert.model.vlbert import init_bert_weights
from vlbert.tasks.backbone import Backbone, TaskModel, load_pretrained_state, mean_whole_image
from vlbert.tasks.config import FinetuneModelConfig
from vlbert.tasks.vcr.data import VCRBatch

ROI_TRANSFORM = "roi_head.transform."
BERT_POOLER = "bert.pooler."


def choice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy with logits over the B x 4 logits; labels long [B] (float32)."""
    target = F.one_hot(labels, logits.shape[1]).float()
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="mean")


@dataclass
class VCROutput:
    """logits float [B, 4]; loss = choice_loss + aux_weight x aux_loss (0 without labels); acc: the
    fraction of questions whose highest logit is the right choice."""

    loss: torch.Tensor
    choice_loss: torch.Tensor
    aux_loss: torch.Tensor
    acc: torch.Tensor
    logits: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach() for k in ("loss", "choice_loss", "aux_loss", "acc")}


class ObjectClassificationHead(nn.Module):
    def __init__(self, transform: nn.Module, hidden_size: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.transform = transform
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.transform(hidden)))


class VLBertForVCR(TaskModel):
    def __init__(self, model_cfg: FinetuneModelConfig, detector_cfg: DetectorConfig, num_classes: int,
                 aux_weight: float = 1.0, bert_config: Optional[BertConfig] = None):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = Backbone(model_cfg, detector_cfg, bert_config)
        config = self.backbone.config
        self.pooler = BertPooler(config)
        init_bert_weights(self.pooler, config.initializer_range)
        self.dropout = nn.Dropout(model_cfg.head_dropout)
        self.scorer = nn.Linear(config.hidden_size, 1)
        # The reference initialises its final linear layer with Xavier uniform and a zero bias.
        nn.init.xavier_uniform_(self.scorer.weight)
        nn.init.zeros_(self.scorer.bias)
        self.object_head = ObjectClassificationHead(self.backbone.new_transform(), config.hidden_size, num_classes)
        init_bert_weights(self.object_head.classifier, config.initializer_range)
        self.aux_weight = aux_weight

    def head_transforms(self) -> dict[str, nn.Module]:
        return {}  # no head starts from the MLM transform

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Detector and encoder, and the object head's transform from the masked-RoI head's."""
        load_pretrained_state(self, state)
        transform = {k[len(ROI_TRANSFORM):]: v for k, v in state.items() if k.startswith(ROI_TRANSFORM)}
        if not transform:
            raise ValueError(f"the pretrained state dict has no {ROI_TRANSFORM}* weights for the VCR object head")
        self.object_head.transform.load_state_dict(transform)

    def load_bert(self, state: dict[str, torch.Tensor]) -> None:
        """The encoder, and BERT's pooler when the checkpoint has one."""
        super().load_bert(state)
        pooler = {k[len(BERT_POOLER):]: v for k, v in state.items() if k.startswith(BERT_POOLER)}
        if pooler:
            self.pooler.load_state_dict(pooler)

    def forward(self, batch: VCRBatch) -> VCROutput:
        b, c, t = batch.input_ids.shape
        appearance = self.backbone.detector(batch.images, batch.boxes, batch.box_mask,
                                            region_masks=batch.region_masks)  # [B, R, A]: one CNN pass per image
        if self.backbone.whole_image == "mean":
            appearance = mean_whole_image(appearance, batch.box_mask)

        def per_choice(x: torch.Tensor) -> torch.Tensor:  # [B, ...] -> [B * 4, ...]
            return x.repeat_interleave(c, dim=0)

        visual = VisualInputs(per_choice(appearance), per_choice(batch.boxes), per_choice(batch.image_sizes),
                              per_choice(batch.box_mask), text_regions=batch.text_regions.reshape(b * c, t))
        out = self.backbone.vlbert(batch.input_ids.reshape(b * c, t), batch.attention_mask.reshape(b * c, t), visual,
                                   batch.token_type_ids.reshape(b * c, t))
        hidden = out.last_hidden_state
        rows = torch.arange(b * c, device=hidden.device)
        cls = hidden[rows, out.layout.text_index[:, 0]][:, None]  # [B * 4, 1, H]: the pooler reads position 0
        logits = self.scorer(self.dropout(self.pooler(cls))).view(b, c).float()
        if batch.labels is None:
            zero = logits.new_zeros(())
            return VCROutput(zero, zero, zero, zero, logits)
        loss_choice = choice_loss(logits, batch.labels)
        roi_hidden = hidden.gather(1, out.layout.roi_index[..., None].expand(-1, -1, hidden.shape[-1]))
        classes = per_choice(batch.classes)  # -1 on padded box slots
        obj_logits = self.object_head(roi_hidden).float()
        aux = F.cross_entropy(obj_logits.flatten(0, 1), classes.flatten(), ignore_index=-1)
        acc = (logits.argmax(-1) == batch.labels).float().mean()
        return VCROutput(loss_choice + self.aux_weight * aux, loss_choice, aux, acc, logits)

