"""Precomputed region features: the appearance part of the visual input without a CNN.

With ``detector.source: features`` each box comes with the feature a detector made for it
once (``<key>.features.npy``, docs/features.md); this module turns a batch of them into the
appearance input of ``VLBertEmbeddings``, as the reference's precomputed ("prec") variant does:

- the whole-image region (box slot 0) gets the mean of the box features; during masked-RoI
  pretraining, the mean over the boxes that are not masked (jackroos/VL-BERT,
  pretrain/data/datasets/conceptual_captions.py, ``with_precomputed_visual_feat``: the sum of
  all box features minus the masked ones, divided by the number left; vqa/data/datasets/vqa.py:
  ``boxes_features.mean(0)``);
- a masked region's feature is replaced by a learned mask embedding of the feature's width,
  started at 0 (pretrain/modules/resnet_vlbert_for_pretraining.py,
  ``object_mask_visual_embedding``, ``weight.data.fill_(0.0)``);
- the result then joins the same geometry embedding and projection as the end-to-end path
  (common/fast_rcnn.py: with ``IMAGE_FEAT_PRECOMPUTED`` the stored features take the place of
  the pooled res5 output before ``obj_downsample``).

Shapes: B samples, R box slots (slot 0 = whole image), D = ``feature_dim``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class PrecomputedRegions(nn.Module):
    """Stored box features -> appearance features [B, R, D]; holds the learned mask embedding."""

    def __init__(self, feature_dim: int = 2048):
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.out_channels = feature_dim
        self.mask_embedding = nn.Parameter(torch.zeros(feature_dim))

    def forward(self, features: torch.Tensor, box_mask: torch.Tensor,
                roi_masked: Optional[torch.Tensor] = None) -> torch.Tensor:
        """features: float [B, R, D] (any float dtype; slot 0 and padded slots are ignored);
        box_mask: bool [B, R] real boxes (slot 0 included); roi_masked: bool [B, R] or None.

        Returns [B, R, D] in the mask embedding's dtype: slot 0 = mean of the real, unmasked
        boxes 1..R-1 (0 when there are none), masked boxes = the mask embedding, other real
        boxes = their feature, padded slots 0.
        """
        if features.dim() != 3 or features.shape[:2] != box_mask.shape:
            raise ValueError(f"features must be [B, R, D] with [B, R] = box_mask {tuple(box_mask.shape)}, "
                             f"got {tuple(features.shape)}")
        if features.shape[-1] != self.out_channels:
            raise ValueError(
                f"the stored region features are {features.shape[-1]} wide but detector.feature_dim is "
                f"{self.out_channels} (the visual projection's appearance input): set detector.feature_dim: "
                f"{features.shape[-1]}, or use features of the width the model was trained with")
        box_mask = box_mask.bool()
        masked = roi_masked.bool() & box_mask if roi_masked is not None else torch.zeros_like(box_mask)
        boxes = box_mask.clone()
        boxes[:, 0] = False  # slot 0 is the whole image: never part of its own mean
        keep = (boxes & ~masked).float()[..., None]  # [B, R, 1]
        x = features.float()
        # Zero the slots that take no part first: padding may hold anything, NaN included.
        mean = torch.where(keep > 0, x, 0.0).sum(1) / keep.sum(1).clamp(min=1.0)  # [B, D]
        dtype = self.mask_embedding.dtype
        out = torch.where(masked[..., None], self.mask_embedding.float(), x)
        out = torch.where(box_mask[..., None], out, 0.0)
        out = torch.cat([mean[:, None], out[:, 1:]], dim=1)
        return out.to(dtype)
