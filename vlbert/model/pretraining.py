"""VL-BERT pretraining: detector + encoder + MLM head (tied) + masked-RoI head -> losses.

Tasks (docs/design.md section 5.2), summed with equal weight when present in a batch:
- masked language modelling on captions, with the image in the sequence;
- masked RoI classification: soft cross-entropy against the detector's class
  distribution of each chosen box on the unmasked image;
- masked language modelling on text-only segments.

Captions and text segments run through the encoder as two separate sequences.
The heads run over every text position / box slot and the losses are masked means: selecting
the labelled positions first would make the host wait for the device to count them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertOnlyMLMHead, BertPredictionHeadTransform

from typing import TYPE_CHECKING

from vlbert.config import DetectorConfig, ModelConfig
from vlbert.batch import IGNORE_INDEX, CaptionBatch, PretrainBatch, TextBatch
from vlbert.model.embeddings import VisualInputs
from vlbert.model.regions import PrecomputedRegions

if TYPE_CHECKING:  # the detector (mmdet) is imported only when the pixel path is built
    from vlbert.model.detector import RegionFeatureExtractor
from vlbert.model.vlbert import VLBertModel, init_bert_weights, load_bert_checkpoint


@dataclass
class PretrainingOutput:
    """Losses, accuracies and counts of one micro-batch (all 0-dim tensors).

    ``loss`` is the sum of the losses of the tasks present in the batch and
    carries the graph. The task losses are means over their masked tokens /
    RoIs (0, not NaN, when there are none or the task is absent). Accuracies:
    argmax of the prediction equals the label (MLM) or the argmax of the target
    distribution (RoIs). Counts (long) are the numbers of masked tokens / RoIs,
    so that a trainer can weight means when aggregating over steps and ranks.
    """

    loss: torch.Tensor
    mlm_caption_loss: torch.Tensor
    roi_loss: torch.Tensor
    mlm_text_loss: torch.Tensor
    mlm_caption_acc: torch.Tensor
    roi_acc: torch.Tensor
    mlm_text_acc: torch.Tensor
    mlm_caption_count: torch.Tensor
    roi_count: torch.Tensor
    mlm_text_count: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        """Every field, detached (for logging; no host sync)."""
        return {f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)}


class RoIClassificationHead(nn.Module):
    """Hidden state of a RoI -> logits over the detector's classes (transform + linear)."""

    def __init__(self, bert_config, num_classes: int):
        super().__init__()
        self.transform = BertPredictionHeadTransform(bert_config)
        self.classifier = nn.Linear(bert_config.hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.transform(hidden))


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy over the labelled tokens (float32; 0 when there are none), and their count.

    logits: [N, V]; labels: long [N], ``IGNORE_INDEX`` where a token takes no part. No host sync.
    """
    labelled = labels != IGNORE_INDEX
    count = labelled.sum()
    denom = count.clamp(min=1).float()
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum") / denom
    acc = ((logits.argmax(-1) == labels) & labelled).sum().float() / denom
    return loss, acc, count


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean over the chosen RoIs of -sum_c q_c log softmax(p)_c, argmax agreement (float32; 0 when none), count.

    logits, targets: [N, C] (targets distributions); chosen: bool [N]. Rows not chosen take no part,
    whatever their targets hold (padding may be anything, NaN included). No host sync.
    """
    count = chosen.sum()
    denom = count.clamp(min=1).float()
    log_probs = F.log_softmax(logits.float(), dim=-1)
    q = torch.where(chosen[:, None], targets.float(), 0.0)
    loss = -(q * log_probs).sum() / denom
    acc = ((logits.argmax(-1) == q.argmax(-1)) & chosen).sum().float() / denom
    return loss, acc, count


def _gather_slots(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H], index long [B, K] of sequence slots -> [B, K, H]."""
    return hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))


class VLBertForPretraining(nn.Module):
    """Detector + VL-BERT + pretraining heads.

    The constructor builds every module with random weights and reads no file;
    ``bert_config`` (a checkpoint's architecture) replaces the sizes in ``model_cfg``.
    ``from_config`` builds and then loads what the configs name: the BERT checkpoint
    ``model_cfg.bert`` (encoder, and the MLM head's transform and bias when the checkpoint
    has them) and the detector checkpoint ``detector_cfg.checkpoint``.

    Masked-RoI targets are the detector's class distributions on the unmasked image,
    fixed for the whole run. Batches carry them (``regions.npy``); for batches without,
    ``detector_cfg.roi_targets`` decides: "precomputed" raises, "frozen_copy" uses
    ``target_detector``, a frozen copy of the detector as loaded (retaken by
    ``load_detector_checkpoint``; part of the state dict, so a resumed run keeps the
    initial weights), and "detector" the detector itself (only allowed when it is frozen).
    The moving detector never gives targets.

    With ``detector_cfg.source == "features"`` there is no detector (``detector`` and
    ``target_detector`` are None, mmdet is not imported): ``regions`` (``PrecomputedRegions``)
    turns the batch's stored box features into the appearance input, and the masked-RoI targets
    are the batch's stored class scores.
    """

    def __init__(self, model_cfg: ModelConfig, detector_cfg: DetectorConfig,
                 bert_config: Optional[BertConfig] = None):
        super().__init__()
        self.features = detector_cfg.source == "features"
        self.roi_targets = detector_cfg.roi_targets
        self.detector: Optional["RegionFeatureExtractor"] = None
        self.regions: Optional[PrecomputedRegions] = None
        self.target_detector: Optional["RegionFeatureExtractor"] = None
        if self.features:
            self.regions = PrecomputedRegions(detector_cfg.feature_dim)
            appearance_dim = self.regions.out_channels
        else:
            from vlbert.model.detector import RegionFeatureExtractor
            self.detector = RegionFeatureExtractor(detector_cfg)
            if self.roi_targets == "detector" and detector_cfg.trainable:
                raise ValueError("detector.roi_targets 'detector' with a trainable detector: the targets would drift")
            if self.roi_targets == "frozen_copy" and detector_cfg.trainable:
                self.target_detector = self._frozen_copy()
            appearance_dim = self.detector.out_channels
        self.vlbert = VLBertModel(model_cfg, appearance_dim, bert_config)
        config = self.vlbert.config
        self.mlm_head = BertOnlyMLMHead(config)
        self.roi_head = RoIClassificationHead(config, detector_cfg.num_classes)
        init_bert_weights(self.mlm_head, config.initializer_range)
        init_bert_weights(self.roi_head, config.initializer_range)
        # Tie: the decoder is the word embedding matrix; its bias is the head's bias.
        predictions = self.mlm_head.predictions
        predictions.decoder.weight = self.vlbert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, detector_cfg: DetectorConfig) -> "VLBertForPretraining":
        """Build with the architecture of ``model_cfg.bert``, then load the BERT and detector
        checkpoints the configs name (each stays randomly initialised when its entry is empty)."""
        bert_config, state = load_bert_checkpoint(model_cfg.bert) if model_cfg.bert else (None, {})
        model = cls(model_cfg, detector_cfg, bert_config)
        if state:
            model.load_bert_state_dict(state)
        if detector_cfg.checkpoint and not model.features:
            model.load_detector_checkpoint(detector_cfg.checkpoint)
        return model

    def load_bert_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """BERT weights (``load_bert_checkpoint``'s keys) into the encoder, and ``cls.predictions.*``,
        when present, into the MLM head (its decoder stays tied to the word embeddings)."""
        self.vlbert.load_bert_state_dict(state)
        head = {k[len("cls."):]: v for k, v in state.items() if k.startswith("cls.predictions.")}
        head.pop("predictions.decoder.weight", None)
        head.pop("predictions.decoder.bias", None)
        if head:
            self.mlm_head.load_state_dict(head, strict=False)

    def load_detector_checkpoint(self, url: str) -> None:
        """Load the detector's weights; the frozen target copy is retaken from them, so that
        masked-RoI targets come from the loaded detector, not from a random one."""
        if self.detector is None:
            raise ValueError("detector.source is 'features': there is no detector to load a checkpoint into")
        self.detector.load_checkpoint(url)
        if self.target_detector is not None:
            self.target_detector = self._frozen_copy()

    def _frozen_copy(self) -> "RegionFeatureExtractor":
        return copy.deepcopy(self.detector).requires_grad_(False).eval()

    # ----------------------------------------------------------------- tasks

    def mlm_loss(self, hidden: torch.Tensor, text_index: torch.Tensor, labels: torch.Tensor):
        """MLM on encoder output: hidden [B, S, H]; text_index, labels [B, T] -> (loss, acc, count).

        Every text slot goes through the head (logits [B, T, V]); unlabelled ones are masked out of the loss.
        """
        logits = self.mlm_head(_gather_slots(hidden, text_index))
        return masked_lm_loss(logits.flatten(0, 1), labels.flatten())

    def _appearance(self, c: CaptionBatch) -> torch.Tensor:
        """[B, R, A]: from the stored features (``regions``) or the detector on the pixels."""
        if self.regions is not None:
            if c.features is None:
                raise ValueError("detector.source is 'features' but the caption batch carries no box features "
                                 "(the shards need <key>.features.npy: vlbert-extract-regions --features or "
                                 "vlbert-import-features)")
            return self.regions(c.features, c.box_mask, c.roi_masked)
        if c.images is None:
            raise ValueError("the caption batch carries features, not images: set detector.source: features")
        return self.detector(c.images, c.boxes, c.box_mask, c.roi_masked)

    def _captions(self, c: CaptionBatch):
        appearance = self._appearance(c)
        visual = VisualInputs(appearance, c.boxes, c.image_sizes, c.box_mask, c.roi_masked)
        out = self.vlbert(c.input_ids, c.attention_mask, visual)
        hidden = out.last_hidden_state
        mlm = self.mlm_loss(hidden, out.layout.text_index, c.mlm_labels)

        logits = self.roi_head(_gather_slots(hidden, out.layout.roi_index))  # [B, R, C]
        targets = c.roi_targets if c.roi_targets is not None else self._online_targets(c)
        if targets.shape[:2] != c.box_mask.shape or targets.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"roi_targets {tuple(targets.shape)} do not match boxes {tuple(c.box_mask.shape)} "
                f"and {logits.shape[-1]} detector classes"
            )
        chosen = c.roi_labels_mask & c.box_mask
        return mlm, soft_cross_entropy(logits.flatten(0, 1), targets.flatten(0, 1), chosen.flatten())

    def _online_targets(self, c: CaptionBatch) -> torch.Tensor:
        """Class distributions of a batch without ``regions.npy``, from a detector that does not train."""
        if self.features and self.roi_targets != "precomputed":
            # Configs allow this only with masking.roi_prob 0 (vlbert.config.validate): no RoI is
            # chosen, so the targets take no part in the loss.
            return torch.zeros(*c.box_mask.shape, self.roi_head.classifier.out_features, device=c.box_mask.device)
        if self.features:
            raise ValueError(
                "a caption batch has no masked-RoI targets (some sample lacks <key>.regions.npy) and with "
                "detector.source: features there is no detector to compute them: give the shards the "
                "detector's class scores, or set masking.roi_prob: 0")
        if self.roi_targets == "precomputed":
            raise ValueError(
                "a caption batch has no masked-RoI targets (some sample lacks regions.npy) and "
                "detector.roi_targets is 'precomputed': run vlbert-extract-regions over the shards, "
                "or set detector.roi_targets: frozen_copy")
        source = self.target_detector if self.target_detector is not None else self.detector
        return source.class_probs(c.images, c.boxes, c.box_mask)  # unmasked image, no grad

    def train(self, mode: bool = True) -> "VLBertForPretraining":
        super().train(mode)
        if self.target_detector is not None:
            self.target_detector.eval()
        return self

    def _text(self, t: TextBatch):
        out = self.vlbert(t.input_ids, t.attention_mask)
        return self.mlm_loss(out.last_hidden_state, out.layout.text_index, t.mlm_labels)

    # ----------------------------------------------------------------- forward

    def forward(self, batch: PretrainBatch) -> PretrainingOutput:
        if batch.captions is None and batch.text is None:
            raise ValueError("PretrainBatch holds neither captions nor text")
        device = self.vlbert.embeddings.word_embeddings.weight.device
        zero = torch.zeros((), device=device)
        none = (zero, zero, torch.zeros((), dtype=torch.long, device=device))
        terms = []
        mlm_c, roi = none, none
        if batch.captions is not None:
            mlm_c, roi = self._captions(batch.captions)
            terms += [mlm_c[0], roi[0]]
        mlm_t = none
        if batch.text is not None:
            mlm_t = self._text(batch.text)
            terms.append(mlm_t[0])
        return PretrainingOutput(
            loss=torch.stack(terms).sum(),
            mlm_caption_loss=mlm_c[0],
            roi_loss=roi[0],
            mlm_text_loss=mlm_t[0],
            mlm_caption_acc=mlm_c[1],
            roi_acc=roi[1],
            mlm_text_acc=mlm_t[1],
            mlm_caption_count=mlm_c[2],
            roi_count=roi[2],
            mlm_text_count=mlm_t[2],
        )
