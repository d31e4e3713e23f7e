"""Detector + VL-BERT encoder for fine-tuning, and where their weights come from.

``TaskModel.from_config`` builds a task's model and loads one of two starting points:
- a pretraining run: ``load_pretrained_state`` takes the run's exported state
  dict (``model.safetensors`` of ``VLBertForPretraining``: ``detector.*``,
  ``vlbert.*``, ``mlm_head.*``, ``roi_head.*``) and loads the detector and the
  encoder; task heads take the MLM head's transform from it. A run trained on stored
  region features carries no detector: on pixels, the detector comes from
  ``detector.checkpoint`` (the one that made the features);
- plain BERT (``model.bert``): the encoder's text weights and, when the
  checkpoint has them, the MLM transform; the detector from its own checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from vlbert.config import DetectorConfig, ModelConfig
from vlbert.model.embeddings import VisualInputs
from vlbert.model.regions import PrecomputedRegions
from vlbert.model.vlbert import (VLBertModel, VLBertOutput, bert_architecture, init_bert_weights,
                                 load_bert_checkpoint)
from vlbert.tasks.config import FinetuneModelConfig
from vlbert.tasks.pretrained import read_pretrained

if TYPE_CHECKING:  # the detector (mmdet) is imported only when the pixel path is built
    from vlbert.model.detector import RegionFeatureExtractor

PRETRAINED_TRANSFORM = "mlm_head.predictions.transform."
BERT_TRANSFORM = "cls.predictions.transform."


@dataclass
class ImageInputs:
    """images uint8 [B, 3, H, W] (None with stored features); image_sizes [B, 2]; boxes float [B, R, 4];
    box_mask bool [B, R]; features float [B, R, D] stored box features (``detector.source: features``)."""

    images: Optional[torch.Tensor]
    image_sizes: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    features: Optional[torch.Tensor] = None


class Backbone(nn.Module):
    """Detector (or, with ``detector.source: features``, ``PrecomputedRegions`` as ``regions``) +
    encoder, randomly initialised (no file is read); ``bert_config``, a checkpoint's architecture,
    replaces the sizes in ``model_cfg``."""

    def __init__(self, model_cfg: ModelConfig, detector_cfg: DetectorConfig,
                 bert_config: Optional[BertConfig] = None):
        super().__init__()
        self.detector: Optional["RegionFeatureExtractor"] = None
        self.regions: Optional[PrecomputedRegions] = None
        if detector_cfg.source == "features":
            self.regions = PrecomputedRegions(detector_cfg.feature_dim)
            appearance_dim = self.regions.out_channels
        else:
            from vlbert.model.detector import RegionFeatureExtractor
            self.detector = RegionFeatureExtractor(detector_cfg)
            appearance_dim = self.detector.out_channels
        self.vlbert = VLBertModel(model_cfg, appearance_dim, bert_config)
        self.whole_image = getattr(model_cfg, "whole_image", "pooled")

    @property
    def config(self):
        return self.vlbert.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                image: ImageInputs) -> VLBertOutput:
        if self.regions is not None:
            if image.features is None:
                raise ValueError("detector.source is 'features' but the batch carries no box features")
            appearance = self.regions(image.features, image.box_mask)
        else:
            if image.images is None:
                raise ValueError("the batch carries box features, not images: set detector.source: features")
            appearance = self.detector(image.images, image.boxes, image.box_mask)
        if self.whole_image == "mean":
            appearance = mean_whole_image(appearance, image.box_mask)
        visual = VisualInputs(appearance, image.boxes, image.image_sizes, image.box_mask)
        return self.vlbert(input_ids, attention_mask, visual, token_type_ids)

    def new_transform(self) -> BertPredictionHeadTransform:
        """A head transform (dense, GELU, LayerNorm), BERT-initialised; the starting weights
        (``TaskModel.from_config``) replace it with the MLM head's transform when there is one."""
        transform = BertPredictionHeadTransform(self.config)
        init_bert_weights(transform, self.config.initializer_range)
        return transform


def mean_whole_image(appearance: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """Box 0's feature replaced by the mean of the image's other real boxes' features (the
    reference's precomputed path: jackroos/VL-BERT vqa/data/datasets/vqa.py, ``boxes_features.mean``
    when the JSON has no ``image_box_feature``). appearance [B, R, A], box_mask bool [B, R];
    an image with no other box keeps its pooled box 0."""
    others = box_mask.clone()
    others[:, 0] = False
    count = others.sum(1, keepdim=True)  # [B, 1]
    mean = (appearance * others[..., None].to(appearance.dtype)).sum(1) / count.clamp(min=1).to(appearance.dtype)
    first = torch.where(count > 0, mean, appearance[:, 0])
    return torch.cat([first[:, None], appearance[:, 1:]], 1)


class TaskModel(nn.Module):
    """A fine-tuning model: ``self.backbone`` plus task heads, built by the subclass's
    constructor with random weights (no file read). ``head_transforms`` names the head
    transforms that start from the MLM head's transform."""

    backbone: Backbone
    # Where the head transforms start in a pretraining run's state dict: the MLM head's transform
    # (VQA, as the reference), or another pretrained head's (RefCOCO+: the masked-RoI head's).
    pretrained_transform: str = PRETRAINED_TRANSFORM

    def head_transforms(self) -> dict[str, nn.Module]:
        """Description (for error messages) -> transform module."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, model_cfg: FinetuneModelConfig, detector_cfg: DetectorConfig, *args) -> "TaskModel":
        """``cls(model_cfg, detector_cfg, *args)`` in the architecture of ``model_cfg.bert`` (when
        named), then the starting weights the config names: a pretraining run's (``model.pretrained``:
        detector, encoder, MLM transform), else BERT's (``model.bert``: encoder, and the MLM transform
        when the checkpoint has one) and the detector's (``detector.checkpoint``)."""
        if model_cfg.pretrained:
            model = cls(model_cfg, detector_cfg, *args, bert_config=bert_architecture(model_cfg))
            state = read_pretrained(model_cfg.pretrained).state
            if model.backbone.detector is not None and trained_on_features(state):
                state = _with_detector_checkpoint(model, state, detector_cfg, model_cfg.pretrained)
            model.load_pretrained(state)
            return model
        bert_config, state = load_bert_checkpoint(model_cfg.bert) if model_cfg.bert else (None, {})
        model = cls(model_cfg, detector_cfg, *args, bert_config=bert_config)
        if state:
            model.load_bert(state)
        if detector_cfg.checkpoint and model.backbone.detector is not None:
            model.backbone.detector.load_checkpoint(detector_cfg.checkpoint)
        return model

    @classmethod
    def for_weights(cls, model_cfg: FinetuneModelConfig, detector_cfg: DetectorConfig, *args) -> "TaskModel":
        """Random weights in the architecture the fine-tuned weights were trained in (``model.bert``'s
        ``config.json`` when named): what a fine-tuned state dict is loaded into."""
        return cls(model_cfg, detector_cfg, *args, bert_config=bert_architecture(model_cfg))

    def load_pretrained(self, state: dict[str, torch.Tensor]) -> None:
        """Detector, encoder and the head transforms from a pretraining run's state dict."""
        load_pretrained_state(self, state, self.head_transforms(), self.pretrained_transform)

    def load_bert(self, state: dict[str, torch.Tensor]) -> None:
        """A BERT checkpoint (``load_bert_checkpoint``'s state): the encoder, and the MLM transform,
        when the checkpoint has one, into every head transform."""
        self.backbone.vlbert.load_bert_state_dict(state)
        transform = {k[len(BERT_TRANSFORM):]: v for k, v in state.items() if k.startswith(BERT_TRANSFORM)}
        if transform:
            for module in self.head_transforms().values():
                module.load_state_dict(transform)


def trained_on_features(state: dict[str, torch.Tensor]) -> bool:
    """Whether a pretraining export was trained on stored region features: it holds the learned
    mask embedding (``regions.*``) and no detector."""
    return any(k.startswith("regions.") for k in state) and not any(k.startswith("detector.") for k in state)


def _with_detector_checkpoint(model: "TaskModel", state: dict[str, torch.Tensor], detector_cfg: DetectorConfig,
                              source: str) -> dict[str, torch.Tensor]:
    """A features-trained export fine-tuned on pixels: the stored features were the frozen
    detector's pooled RoI outputs, so the encoder sees the same inputs when that detector runs
    on the pixels. Its weights are not in the export: they come from ``detector.checkpoint``
    (the file the features were made with). Returns ``state`` with the detector's weights in
    place of the mask embedding (which only masked-RoI pretraining uses)."""
    if not detector_cfg.checkpoint:
        raise ValueError(
            f"{source} was pretrained on stored region features, so it carries no detector: to fine-tune on "
            f"pixels set detector.checkpoint to the detector that made those features, or fine-tune on "
            f"features (detector.source: features)")
    width = state["regions.mask_embedding"].shape[-1]
    if width != model.backbone.detector.out_channels:
        raise ValueError(
            f"{source} was pretrained on {width}-wide region features but the detector of this config gives "
            f"{model.backbone.detector.out_channels}-wide ones (detector.depth {detector_cfg.depth}): the features "
            f"must come from this detector")
    model.backbone.detector.load_checkpoint(detector_cfg.checkpoint)
    detector = {f"detector.{k}": v for k, v in model.backbone.detector.state_dict().items()}
    return {**{k: v for k, v in state.items() if not k.startswith("regions.")}, **detector}


def load_pretrained_state(model: nn.Module, state: dict[str, torch.Tensor],
                          transforms: Optional[dict[str, nn.Module]] = None,
                          transform_prefix: str = PRETRAINED_TRANSFORM) -> None:
    """Load a pretraining run's weights into ``model.backbone`` (every ``detector.*`` and
    ``vlbert.*`` key must be there, with matching shapes) and the transform under
    ``transform_prefix`` (default: the MLM head's) into each module of ``transforms``
    (name -> module, for the error message)."""
    backbone = {k: v for k, v in state.items() if k.startswith(("detector.", "regions.", "vlbert."))}
    if not backbone:
        raise ValueError("the pretrained state dict has no detector.* or vlbert.* weights "
                         "(expected the model.safetensors of a pretraining run)")
    try:
        missing, unexpected = model.backbone.load_state_dict(backbone, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"pretrained weights do not fit the model config (model/detector sections): {e}") from None
    if missing or unexpected:
        hint = ""
        if any(k.startswith("regions.") for k in missing + unexpected):
            hint = (" (one side was trained on stored region features, the other on pixels: "
                    "set detector.source to what the pretraining run used)")
        raise ValueError(f"pretrained weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}{hint}")
    head = {k[len(transform_prefix):]: v for k, v in state.items() if k.startswith(transform_prefix)}
    for name, module in (transforms or {}).items():
        if not head:
            raise ValueError(f"the pretrained state dict has no {transform_prefix}* weights for {name}")
        module.load_state_dict(head)
