"""Read a pretraining run's exported weights: ``model.safetensors`` and ``model.json``.

The trainer (``vlbert-train``) writes both into the run's output folder at the end of
training; ``model.json`` holds the step and the MLflow run id, which the
fine-tuning run records as a tag (``vlbert.pretrain_run_id``).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors


@dataclass
class PretrainedWeights:
    state: dict[str, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)  # model.json: step, mlflow_run_id (empty if absent)
    url: str = ""


def read_pretrained(url: str) -> PretrainedWeights:
    """The state dict (plain tensors, no unpickling) and the ``model.json`` beside it."""
    try:
        with fsspec.open(url, "rb") as f:
            state = load_safetensors(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"model.pretrained: {url} not found (the model.safetensors of a pretraining "
                                "run, written when its training finished)") from None
    return PretrainedWeights(state, read_pretrained_info(url), url)


def read_pretrained_info(url: str) -> dict[str, Any]:
    """The ``model.json`` beside a pretraining run's ``model.safetensors`` (step, MLflow run id);
    empty when it is absent or unreadable."""
    info_url = posixpath.join(posixpath.dirname(url), "model.json") if "/" in url else "model.json"
    try:
        with fsspec.open(info_url, "r") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
