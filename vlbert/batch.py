"""Padded batches: the one contract between the data pipeline and the model (both import it;
it imports neither).

Shapes use B = samples, T = caption tokens, R = RoIs (box slots), C = RoI
classes, H/W = padded image height/width, L = text segment length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

IGNORE_INDEX = -100  # label of tokens/RoIs that take no part in a loss


def _to(obj, device, non_blocking: bool):
    kwargs = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        kwargs[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
    return type(obj)(**kwargs)


@dataclass
class CaptionBatch:
    """Captioned images, ``[CLS] caption [SEP]`` plus their boxes.

    input_ids:      long  [B, T]  caption after MLM masking, padded with 0
    attention_mask: bool  [B, T]  True on real tokens
    mlm_labels:     long  [B, T]  original id where the token was chosen for MLM, else IGNORE_INDEX
    images:         uint8 [B, 3, H, W]  RGB, resized, padded at the bottom/right with 0;
                    None when the batch carries stored box features instead
    image_sizes:    long  [B, 2]  (height, width) of each image before padding (with features:
                    the pixel frame of the boxes, the JSON's height and width)
    boxes:          float [B, R, 4]  (x1, y1, x2, y2) in pixels of the resized image;
                    box 0 is the whole image
    box_mask:       bool  [B, R]  True on real boxes
    roi_masked:     bool  [B, R]  True where the RoI is masked (pixels zeroed, mask token)
    roi_labels_mask bool  [B, R]  True where the RoI takes part in masked-RoI classification
                                  (the chosen 15%, masked or kept)
    roi_targets:    float [B, R, C] class distribution of each box on the unmasked image,
                    or None when the shards carry none (the detector then provides it)
    keys:           B strings ``<shard URL>#<sample key>``: which samples these are
    features:       float16/32 [B, R, D] stored box features (``detector.source: features``),
                    slot 0 and padding 0; None when the batch carries images
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mlm_labels: torch.Tensor
    images: Optional[torch.Tensor]
    image_sizes: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    roi_masked: torch.Tensor
    roi_labels_mask: torch.Tensor
    roi_targets: Optional[torch.Tensor] = None
    keys: list[str] = field(default_factory=list)
    features: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "CaptionBatch":
        return _to(self, device, non_blocking)


@dataclass
class TextBatch:
    """Text-only segments ``[CLS] ... [SEP]`` of ``segment_length`` tokens.

    input_ids:      long [B, L] after MLM masking, padded with 0
    attention_mask: bool [B, L]
    mlm_labels:     long [B, L] original id where chosen for MLM, else IGNORE_INDEX
    keys:           B strings ``<source>:<shard URL>#<document>+<piece offset>`` where each segment starts
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mlm_labels: torch.Tensor
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "TextBatch":
        return _to(self, device, non_blocking)


@dataclass
class PretrainBatch:
    """One micro-batch: captioned images and text segments (either may be absent).
    ``partition``: the canonical data partition it was read from (for audits), if known."""

    captions: Optional[CaptionBatch] = None
    text: Optional[TextBatch] = None
    partition: Optional[int] = None

    def to(self, device, non_blocking: bool = False) -> "PretrainBatch":
        return PretrainBatch(
            captions=self.captions.to(device, non_blocking) if self.captions is not None else None,
            text=self.text.to(device, non_blocking) if self.text is not None else None,
            partition=self.partition,
        )

    @property
    def keys(self) -> dict[str, list[str]]:
        """The keys of the samples in this micro-batch, by kind."""
        return {"captions": list(self.captions.keys) if self.captions is not None else [],
                "text": list(self.text.keys) if self.text is not None else []}

    @property
    def num_samples(self) -> int:
        return (len(self.captions) if self.captions is not None else 0) + (
            len(self.text) if self.text is not None else 0
        )
