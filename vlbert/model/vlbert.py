"""VLBertModel: VL-BERT embeddings -> BERT encoder with Hugging Face parameter names.

Parameter names are those of ``transformers.BertModel`` (``embeddings.*``,
``encoder.layer.N.*``), so a BERT checkpoint loads without renaming; the
encoder is transformers' own ``BertEncoder`` run with PyTorch
scaled-dot-product attention.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertForMaskedLM
from transformers.models.bert.modeling_bert import BertEncoder

from vlbert.config import ModelConfig
from vlbert.model.embeddings import NUM_SEGMENTS, SequenceLayout, VisualInputs, VLBertEmbeddings


def bert_config_from_model_config(cfg: ModelConfig) -> BertConfig:
    """A BertConfig of the sizes in ``cfg`` (used when ``cfg.bert`` is empty)."""
    config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=NUM_SEGMENTS,
    )
    return _with_run_settings(config, cfg)


def _with_run_settings(config: BertConfig, cfg: ModelConfig) -> BertConfig:
    """Dropouts come from the run config; attention is always SDPA."""
    config.hidden_dropout_prob = cfg.hidden_dropout
    config.attention_probs_dropout_prob = cfg.attention_dropout
    config._attn_implementation = "sdpa"
    return config


def bert_architecture(cfg: ModelConfig) -> Optional[BertConfig]:
    """The BertConfig of ``cfg.bert`` (its ``config.json`` only, no weights), or None when it is
    empty (the sizes in ``cfg`` then apply). For building a model whose trained weights come
    from elsewhere (a finished run's state dict) with the architecture they were trained in."""
    return BertConfig.from_pretrained(cfg.bert) if cfg.bert else None


def load_bert_checkpoint(name_or_folder: str) -> tuple[BertConfig, dict[str, torch.Tensor]]:
    """Read a BERT checkpoint (hub name or folder; safetensors or pytorch_model.bin).

    Loading goes through transformers (``BertForMaskedLM.from_pretrained``), which
    accepts both bare ``BertModel`` keys and ``bert.``-prefixed ones. Returns the
    checkpoint's BertConfig and a state dict with ``bert.*`` keys plus the
    ``cls.predictions.*`` keys that the checkpoint really holds (a sentence-encoder
    checkpoint has no MLM head; those keys are then absent, not random).
    """
    model, info = BertForMaskedLM.from_pretrained(name_or_folder, output_loading_info=True)
    missing = set(info["missing_keys"])
    state = {k: v for k, v in model.state_dict().items() if k not in missing}
    if any(k.startswith("cls.predictions.transform.") for k in missing) or "cls.predictions.bias" in missing:
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
    return model.config, state


def extend_token_types(weight: torch.Tensor, num_types: int = NUM_SEGMENTS) -> torch.Tensor:
    """Token-type table of ``num_types`` rows: copy the checkpoint's rows, new rows start as row 0."""
    if weight.shape[0] >= num_types:
        return weight[:num_types].clone()
    extra = weight[:1].expand(num_types - weight.shape[0], -1)
    return torch.cat([weight, extra], dim=0)


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@dataclass
class VLBertOutput:
    """last_hidden_state: [B, S, H]; layout: where text tokens and RoIs sit in S."""

    last_hidden_state: torch.Tensor
    layout: SequenceLayout


class VLBertModel(nn.Module):
    """VL-BERT encoder. ``appearance_dim`` is the detector's RoI feature size.

    ``bert_config`` gives the architecture (from a checkpoint); without it the
    sizes come from ``cfg``. The constructor reads no file: the weights start
    random (BERT init); ``from_config`` loads the checkpoint ``cfg.bert`` names.
    """

    def __init__(self, cfg: ModelConfig, appearance_dim: int = 2048, bert_config: Optional[BertConfig] = None):
        super().__init__()
        if bert_config is not None:
            config = _with_run_settings(copy.deepcopy(bert_config), cfg)
        else:
            config = bert_config_from_model_config(cfg)
        self.config = config
        self.activation_checkpointing = cfg.activation_checkpointing
        self.embeddings = VLBertEmbeddings(config, appearance_dim, cfg.geometry_freqs, cfg.visual_dropout)
        self.encoder = BertEncoder(config)
        init_bert_weights(self, config.initializer_range)
        self.embeddings.reset_visual_parameters(config.initializer_range)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, cfg: ModelConfig, appearance_dim: int = 2048) -> "VLBertModel":
        """Build with the architecture of ``cfg.bert`` and load its weights; random init when it is empty."""
        if not cfg.bert:
            return cls(cfg, appearance_dim)
        bert_config, state = load_bert_checkpoint(cfg.bert)
        model = cls(cfg, appearance_dim, bert_config)
        model.load_bert_state_dict(state)
        return model

    def load_bert_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load BERT weights (bare or ``bert.``-prefixed keys; pooler and heads ignored).

        Every embedding and encoder weight of BERT must be present; the visual
        parameters keep their initialisation. A 2-type token-type table is
        extended to 3 (row 2, the visual segment, starts as row 0).
        """
        prefixed = any(k.startswith("bert.") for k in state_dict)
        state = {}
        for k, v in state_dict.items():
            if prefixed:
                if not k.startswith("bert."):
                    continue
                k = k[len("bert."):]
            if k.startswith(("embeddings.", "encoder.")) and not k.endswith("position_ids"):
                state[k] = v
        key = "embeddings.token_type_embeddings.weight"
        if key in state:
            state[key] = extend_token_types(state[key])
        missing, unexpected = self.load_state_dict(state, strict=False)
        visual = {f"embeddings.{n}" for n, _ in self.embeddings.named_parameters() if not _is_text_param(n)}
        missing = [k for k in missing if k not in visual]
        if missing or unexpected:
            raise ValueError(f"BERT state dict does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: Optional[VisualInputs] = None,
        token_type_ids: Optional[torch.Tensor] = None,
    ) -> VLBertOutput:
        """input_ids/attention_mask/token_type_ids: [B, T]; visual: RoI inputs or None (text-only)."""
        hidden, layout = self.embeddings(input_ids, attention_mask, visual, token_type_ids)
        # Boolean key-padding mask, True = attend; SDPA broadcasts it over heads and queries.
        # Without padding no mask at all, as transformers does: SDPA then takes its faster paths.
        mask = None if bool(layout.attention_mask.all()) else layout.attention_mask[:, None, None, :]
        use_checkpoint = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layer:
            if use_checkpoint:
                hidden = checkpoint(layer, hidden, mask, use_reentrant=False)
            else:
                hidden = layer(hidden, mask)
        return VLBertOutput(last_hidden_state=hidden, layout=layout)


_TEXT_EMBEDDING_PARAMS = ("word_embeddings.", "position_embeddings.", "token_type_embeddings.", "LayerNorm.")


def _is_text_param(name: str) -> bool:
    return name.startswith(_TEXT_EMBEDDING_PARAMS)
