"""Detector + VL-BERT encoder for fine-tuning, and where their weights come from.

Two starting points:
- a pretraining run: ``load_pretrained_state`` takes the run's exported state
  dict (``model.safetensors`` of ``VLBertForPretraining``: ``detector.*``,
  ``vlbert.*``, ``mlm_head.*``, ``roi_head.*``) and loads the detector and the
  encoder; task heads take the MLM head's transform from it;
- plain BERT (``model.bert``): the encoder's text weights and, when the
  checkpoint has them, the MLM transform; the detector from its own checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from vlbert.config import DetectorConfig, ModelConfig
from vlbert.model.detector import RegionFeatureExtractor
from vlbert.model.embeddings import VisualInputs
from vlbert.model.vlbert import VLBertModel, VLBertOutput, init_bert_weights, load_bert_checkpoint

PRETRAINED_TRANSFORM = "mlm_head.predictions.transform."
BERT_TRANSFORM = "cls.predictions.transform."


@dataclass
class ImageInputs:
    """images uint8 [B, 3, H, W]; image_sizes [B, 2]; boxes float [B, R, 4]; box_mask bool [B, R]."""

    images: torch.Tensor
    image_sizes: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor


class Backbone(nn.Module):
    """Detector + encoder. ``bert`` non-empty: the encoder starts from that checkpoint
    (``bert_transform`` then holds its MLM transform weights, if any, for the heads)."""

    def __init__(self, model_cfg: ModelConfig, detector_cfg: DetectorConfig):
        super().__init__()
        self.detector = RegionFeatureExtractor(detector_cfg)
        bert_config, state = load_bert_checkpoint(model_cfg.bert) if model_cfg.bert else (None, {})
        self.vlbert = VLBertModel(model_cfg, self.detector.out_channels, bert_config)
        if state:
            self.vlbert.load_bert_state_dict(state)
        self.bert_transform = {k[len(BERT_TRANSFORM):]: v for k, v in state.items() if k.startswith(BERT_TRANSFORM)}

    @property
    def config(self):
        return self.vlbert.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                image: ImageInputs) -> VLBertOutput:
        appearance = self.detector(image.images, image.boxes, image.box_mask)
        visual = VisualInputs(appearance, image.boxes, image.image_sizes, image.box_mask)
        return self.vlbert(input_ids, attention_mask, visual, token_type_ids)

    def new_transform(self) -> BertPredictionHeadTransform:
        """A head transform (dense, GELU, LayerNorm) started from BERT's MLM transform when known."""
        transform = BertPredictionHeadTransform(self.config)
        init_bert_weights(transform, self.config.initializer_range)
        if self.bert_transform:
            transform.load_state_dict(self.bert_transform)
        return transform


def load_pretrained_state(model: nn.Module, state: dict[str, torch.Tensor],
                          transforms: Optional[dict[str, nn.Module]] = None) -> None:
    """Load a pretraining run's weights into ``model.backbone`` (every ``detector.*`` and
    ``vlbert.*`` key must be there, with matching shapes) and its MLM transform into each
    module of ``transforms`` (name -> module, for the error message)."""
    backbone = {k: v for k, v in state.items() if k.startswith(("detector.", "vlbert."))}
    if not backbone:
        raise ValueError("the pretrained state dict has no detector.* or vlbert.* weights "
                         "(expected the model.safetensors of a pretraining run)")
    try:
        missing, unexpected = model.backbone.load_state_dict(backbone, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"pretrained weights do not fit the model config (model/detector sections): {e}") from None
    if missing or unexpected:
        raise ValueError(f"pretrained weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    head = {k[len(PRETRAINED_TRANSFORM):]: v for k, v in state.items() if k.startswith(PRETRAINED_TRANSFORM)}
    for name, module in (transforms or {}).items():
        if not head:
            raise ValueError(f"the pretrained state dict has no {PRETRAINED_TRANSFORM}* weights for {name}")
        module.load_state_dict(head)
