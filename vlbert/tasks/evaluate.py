"""Evaluate a fine-tuned model: accuracy on an annotated split, or the submission file.

The weights are a fine-tuning run's ``model.safetensors``; the task's
vocabulary (``answers.txt``) and the network (``model.json``: encoder and detector
sections, ``vlbert.network``) are read from beside them, so the model built is the
one trained and the indices mean what they meant in training.
"""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import Optional

import fsspec
import torch
from safetensors.torch import load as load_safetensors

from vlbert.data.vocabulary import check_vocabulary
from vlbert.tasks.config import FinetuneConfig
from vlbert.tasks.finetune import build_task, run_evaluation
from vlbert.network import resolve_network
from vlbert.tasks.pretrained import read_pretrained_info
from vlbert.train.engine import init_distributed

log = logging.getLogger(__name__)


def load_finetuned(task, weights_url: str) -> torch.nn.Module:
    """The task's model with a fine-tuning run's weights (every key must match)."""
    with fsspec.open(weights_url, "rb") as f:
        state = load_safetensors(f.read())
    model = task.build_model(starting_weights=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights_url} does not fit the config's model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def evaluate_finetuned(cfg: FinetuneConfig, weights_url: str, out_dir: Optional[str] = None,
                       split: Optional[str] = None) -> dict[str, float]:
    """Predict the config's evaluation split(s) (``vqa.val``) with the fine-tuned weights;
    returns the accuracies (empty for an unannotated split such as test-dev) and, with
    ``out_dir``, writes ``<split>_predictions.json`` there (rank 0). ``split`` names the
    split for tasks that keep several (VCR: ``val`` or ``test``, whose leaderboard CSV
    is written too)."""
    if split is not None and cfg.vcr is None:
        raise ValueError(f"--split applies to vcr; for {cfg.task_name} point its val section at the split")
    from transformers import AutoTokenizer

    # The network the fine-tuned weights were trained in (the model.json beside them).
    cfg = resolve_network(cfg, read_pretrained_info(weights_url), f"{weights_url} (model.json)")
    info = init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    vocab = None
    if cfg.vqa is not None:
        from vlbert.tasks.vqa.answers import AnswerVocab
        from vlbert.tasks.vqa.task import ANSWERS_FILE

        vocab = AnswerVocab.load(posixpath.join(posixpath.dirname(weights_url) or ".", ANSWERS_FILE))
        cfg.vqa.train = []  # evaluation reads no training data
    task = build_task(cfg, tokenizer, vocab)
    model = load_finetuned(task, weights_url).to(info.device).eval()
    check_vocabulary(tokenizer, model.backbone.vlbert.embeddings.word_embeddings.num_embeddings, "tokenizer",
                     expected_fingerprint=read_pretrained_info(weights_url).get("tokenizer_vocab_sha256", ""))

    def forward(batch):
        return model(batch.to(info.device))

    path = Path(out_dir) if out_dir else None
    if path is not None and info.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        return run_evaluation(task, forward, info.rank, info.world_size, path, split)
