"""VL-BERT input embeddings: token + visual + segment + position (docs/design.md section 5.1).

One sequence per sample::

    [CLS] caption [SEP] RoI_1 ... RoI_k [END] <padding>

Shapes: B = samples, T = text slots, R = box slots, S = T + R + 1 sequence
slots, A = appearance feature size, H = hidden size.

The text part keeps Hugging Face BERT's parameter names (``word_embeddings``,
``position_embeddings``, ``token_type_embeddings``, ``LayerNorm``) so BERT
checkpoints load as they are. The visual part is added to every element after
its own LayerNorm, whose weight starts at 0: at initialisation the model is
exactly the text BERT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import BertConfig

# Segments (token types).
SEGMENT_A, SEGMENT_B, SEGMENT_VISUAL = 0, 1, 2
NUM_SEGMENTS = 3

# What occupies each sequence slot (SequenceLayout.kind).
KIND_PAD, KIND_TEXT, KIND_ROI, KIND_END = 0, 1, 2, 3


def geometry_embedding(boxes: torch.Tensor, image_sizes: torch.Tensor, freqs: int = 256) -> torch.Tensor:
    """Sinusoidal embedding of box corners, as the VL-BERT paper describes (the reference
    code embeds centre and size instead; docs/design.md section 5.1).

    boxes:       float [B, R, 4] (x1, y1, x2, y2) in pixels
    image_sizes: [B, 2] (height, width) in pixels
    returns:     float32 [B, R, 8 * freqs]

    Each corner is normalised by the image size (x1/W, y1/H, x2/W, y2/H),
    scaled by 100 and divided by 1000^(i/freqs) for i = 0..freqs-1. Ordering:
    coordinate-major, then sin before cos, then frequency::

        out[..., c * 2F + i]     = sin(100 * v_c / 1000^(i/F))
        out[..., c * 2F + F + i] = cos(100 * v_c / 1000^(i/F))

    with c = 0..3 for (x1, y1, x2, y2) and F = freqs. Computed in float32 on
    purpose: the arguments reach 100 and lose their phase in half precision.
    """
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must end in 4 coordinates, got shape {tuple(boxes.shape)}")
    sizes = image_sizes.to(device=boxes.device, dtype=torch.float32)
    h, w = sizes[:, 0], sizes[:, 1]
    scale = torch.stack([w, h, w, h], dim=-1)[:, None, :]  # [B, 1, 4]
    rel = boxes.float() / scale  # [B, R, 4]
    i = torch.arange(freqs, device=boxes.device, dtype=torch.float32)
    inv_wavelength = 1000.0 ** (-i / freqs)  # [F]
    angles = (100.0 * rel)[..., None] * inv_wavelength  # [B, R, 4, F]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # [B, R, 4, 2F]
    return emb.flatten(-2)


@dataclass
class VisualInputs:
    """What the detector gives the embeddings for captioned images.

    appearance: [B, R, A] RoI features (box 0 = whole image)
    boxes:      float [B, R, 4] pixels
    image_sizes:[B, 2] (height, width)
    box_mask:   bool [B, R] real boxes
    roi_masked: bool [B, R] masked RoIs (their token is the masked-RoI embedding), or None
    text_regions: long [B, T] the box whose visual feature each text slot takes, or None
                (every text slot takes box 0, the whole image). VCR points a word that
                names an object at that object's box (jackroos/VL-BERT,
                vcr/modules/resnet_vlbert_for_vcr.py, ``_collect_obj_reps``).
    """

    appearance: torch.Tensor
    boxes: torch.Tensor
    image_sizes: torch.Tensor
    box_mask: torch.Tensor
    roi_masked: Optional[torch.Tensor] = None
    text_regions: Optional[torch.Tensor] = None


@dataclass
class SequenceLayout:
    """Where each input ended up in the packed sequence.

    attention_mask: bool [B, S]  True on real elements (text, RoIs, [END]); padding at the end
    text_index:     long [B, T]  sequence slot of each text slot (padding slots point into the padding)
    roi_index:      long [B, R]  sequence slot of each box slot, or None without images
    position_ids:   long [B, S]
    token_type_ids: long [B, S]
    kind:           long [B, S]  KIND_PAD / KIND_TEXT / KIND_ROI / KIND_END
    """

    attention_mask: torch.Tensor
    text_index: torch.Tensor
    roi_index: Optional[torch.Tensor]
    position_ids: torch.Tensor
    token_type_ids: torch.Tensor
    kind: torch.Tensor


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, ...] gathered along dim 1 with index [B, M] -> [B, M, ...]."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, *x.shape[2:]))


class VLBertEmbeddings(nn.Module):
    """Token + visual + segment + position embeddings, LayerNorm, dropout.

    ``bert_config`` gives the text sizes (vocab, hidden, positions, LayerNorm
    eps, hidden dropout); ``appearance_dim`` is the detector's feature size.
    """

    def __init__(
        self,
        bert_config: BertConfig,
        appearance_dim: int,
        geometry_freqs: int = 256,
        visual_dropout: float = 0.1,
    ):
        super().__init__()
        hidden = bert_config.hidden_size
        self.geometry_freqs = geometry_freqs
        self.appearance_dim = appearance_dim
        # Text part: Hugging Face BertEmbeddings names.
        self.word_embeddings = nn.Embedding(bert_config.vocab_size, hidden, padding_idx=bert_config.pad_token_id)
        self.position_embeddings = nn.Embedding(bert_config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(NUM_SEGMENTS, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=bert_config.layer_norm_eps)
        self.dropout = nn.Dropout(bert_config.hidden_dropout_prob)
        # Visual part.
        self.img_token = nn.Parameter(torch.zeros(hidden))  # [IMG]: token of every RoI
        self.masked_roi_token = nn.Parameter(torch.zeros(hidden))  # token of a masked RoI
        self.end_token = nn.Parameter(torch.zeros(hidden))  # [END]
        self.visual_dropout = nn.Dropout(visual_dropout)
        self.visual_projection = nn.Linear(appearance_dim + 8 * geometry_freqs, hidden)
        self.visual_layer_norm = nn.LayerNorm(hidden, eps=bert_config.layer_norm_eps)
        # Stands in for the (pre-LayerNorm) image feature of text-only samples.
        self.aux_visual_embedding = nn.Parameter(torch.zeros(hidden))
        self.reset_visual_parameters(bert_config.initializer_range)

    def reset_visual_parameters(self, std: float = 0.02) -> None:
        """BERT-style init of the visual part; the visual LayerNorm weight starts at 0."""
        for p in (self.img_token, self.masked_roi_token, self.end_token, self.aux_visual_embedding):
            nn.init.normal_(p, std=std)
        nn.init.normal_(self.visual_projection.weight, std=std)
        nn.init.zeros_(self.visual_projection.bias)
        nn.init.zeros_(self.visual_layer_norm.weight)
        nn.init.zeros_(self.visual_layer_norm.bias)

    # ----------------------------------------------------------------- visual features

    def visual_features(self, visual: VisualInputs) -> torch.Tensor:
        """[B, R, H]: visual LayerNorm(ReLU(Linear(Dropout(appearance ⊕ geometry))))."""
        dtype = self.visual_projection.weight.dtype
        geometry = geometry_embedding(visual.boxes, visual.image_sizes, self.geometry_freqs)
        x = torch.cat([visual.appearance.to(dtype), geometry.to(dtype)], dim=-1)
        return self.visual_layer_norm(torch.relu(self.visual_projection(self.visual_dropout(x))))

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: Optional[VisualInputs] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, SequenceLayout]:
        """Embed a batch; returns (embeddings [B, S, H], layout).

        input_ids, attention_mask: [B, T] text (real tokens need not be a prefix;
        positions count real tokens only). token_type_ids: [B, T] segments of
        the text (default all A). With ``visual`` the sequence is
        ``text RoIs [END]`` with S = T + R + 1; without, it is the text alone
        (S = T) with the auxiliary visual embedding.
        """
        if input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ"
            )
        text_mask = attention_mask.bool()
        if token_type_ids is None:
            token_type_ids = torch.full_like(input_ids, SEGMENT_A)
        # Position of a text token = number of real tokens before it (padding: its slot, as in BERT).
        slots = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        text_pos = torch.where(text_mask, text_mask.long().cumsum(1) - 1, slots)
        n_text = text_mask.sum(1, keepdim=True)  # [B, 1]
        token = self.word_embeddings(input_ids)

        if visual is None:
            emb = token + self.aux_visual_embedding_normed()
            emb = emb + self.token_type_embeddings(token_type_ids) + self.position_embeddings(text_pos)
            layout = SequenceLayout(
                attention_mask=text_mask,
                text_index=slots,
                roi_index=None,
                position_ids=text_pos,
                token_type_ids=token_type_ids,
                kind=torch.where(text_mask, KIND_TEXT, KIND_PAD),
            )
            return self.dropout(self.LayerNorm(emb)), layout

        return self._embed_with_image(input_ids, text_mask, token_type_ids, text_pos, n_text, token, visual)

    def aux_visual_embedding_normed(self) -> torch.Tensor:
        return self.visual_layer_norm(self.aux_visual_embedding)

    def _embed_with_image(self, input_ids, text_mask, token_type_ids, text_pos, n_text, token, visual):
        B, T = input_ids.shape
        R = visual.box_mask.shape[1]
        if visual.appearance.shape[:2] != (B, R) or visual.boxes.shape != (B, R, 4):
            raise ValueError(
                f"visual inputs disagree: appearance {tuple(visual.appearance.shape)}, boxes "
                f"{tuple(visual.boxes.shape)}, box_mask {tuple(visual.box_mask.shape)}, batch {B}"
            )
        device = input_ids.device
        box_mask = visual.box_mask.bool()
        roi_masked = visual.roi_masked.bool() if visual.roi_masked is not None else torch.zeros_like(box_mask)
        n_roi = box_mask.sum(1, keepdim=True)

        vis = self.visual_features(visual)  # [B, R, H]
        image_vis = vis[:, :1]  # whole-image box: visual feature of text and [END]

        # Build every element in "source order" (text slots, box slots, [END]), then
        # move each to its sequence slot: real elements in sequence order, padding after.
        roi_tok = torch.where(roi_masked[..., None], self.masked_roi_token, self.img_token).to(vis.dtype)
        end_tok = self.end_token.to(vis.dtype).expand(B, 1, -1)
        tokens = torch.cat([token.to(vis.dtype), roi_tok, end_tok], dim=1)  # [B, S, H]
        if visual.text_regions is None:
            text_vis = image_vis.expand(B, T, -1)
        else:
            if visual.text_regions.shape != (B, T):
                raise ValueError(f"text_regions must be [B, T] = {(B, T)}, got {tuple(visual.text_regions.shape)}")
            text_vis = _gather_seq(vis, visual.text_regions.long().clamp(0, R - 1))
        visuals = torch.cat([text_vis, vis, image_vis], dim=1)
        seg = torch.cat(
            [token_type_ids, torch.full((B, R + 1), SEGMENT_VISUAL, dtype=token_type_ids.dtype, device=device)], 1
        )
        pos = torch.cat([text_pos, n_text.expand(B, R), n_text + 1], dim=1)
        kind = torch.cat(
            [
                torch.where(text_mask, KIND_TEXT, KIND_PAD),
                torch.where(box_mask, KIND_ROI, KIND_PAD),
                torch.full((B, 1), KIND_END, device=device),
            ],
            dim=1,
        )
        real = kind != KIND_PAD
        n_real = n_text + n_roi + 1
        # dest[b, j]: sequence slot of source element j (a permutation of 0..S-1 per sample).
        dest = torch.where(real, real.long().cumsum(1) - 1, n_real + (~real).long().cumsum(1) - 1)
        src = torch.empty_like(dest).scatter_(1, dest, torch.arange(dest.shape[1], device=device).expand_as(dest))

        emb = tokens + visuals + self.token_type_embeddings(seg) + self.position_embeddings(pos)
        emb = self.dropout(self.LayerNorm(_gather_seq(emb, src)))
        layout = SequenceLayout(
            attention_mask=_gather_seq(real, src),
            text_index=dest[:, :T],
            roi_index=dest[:, T : T + R],
            position_ids=_gather_seq(pos, src),
            token_type_ids=_gather_seq(seg, src),
            kind=_gather_seq(kind, src),
        )
        return emb, layout

