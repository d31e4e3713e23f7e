"""The DeepSpeed JSON: loaded, checked against our config and completed, in one place.

Batch sizes, accumulation and clipping live in our config (``data``,
``optim``); the JSON may leave them out or say ``"auto"`` and is completed
from the config and the world size; where it states them they must agree. The
optimizer and schedule are ours, so the JSON must not define them. This module
does not import ``deepspeed``; ``engine.py`` hands the result to it.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Optional

import torch

from vlbert.config import ConfigError, DataConfig, OptimConfig


def load_deepspeed_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return ds


def micro_batch_counts(data: DataConfig, optim: OptimConfig, world_size: int) -> tuple[int, int]:
    """(captions, text segments) per micro-batch on each rank."""
    per = world_size * optim.grad_accum
    for key, n in (("data.captions_per_step", data.captions_per_step), ("data.text_per_step", data.text_per_step)):
        if n % per:
            raise ConfigError(
                f"{key} = {n} must be divisible by world size x optim.grad_accum = {world_size} x "
                f"{optim.grad_accum} = {per} (each rank takes the same share of every micro-batch)"
            )
    return data.captions_per_step // per, data.text_per_step // per


def resolve_deepspeed_config(ds: dict[str, Any], data: DataConfig, optim: OptimConfig, world_size: int,
                             source: str = "deepspeed config", cuda: Optional[bool] = None) -> dict[str, Any]:
    """A checked copy of the DeepSpeed JSON ``ds`` with batch sizes, accumulation and
    clipping filled in from the config where missing or ``"auto"``. Raises ``ConfigError``
    naming ``source`` for a value that disagrees, an optimizer or schedule in the JSON, a
    ZeRO stage outside 0-3, bf16 and fp16 together, or (``cuda`` False; default: whether a
    GPU is visible) fp16 or offload without a GPU."""
    ds = copy.deepcopy(ds)
    captions, text = micro_batch_counts(data, optim, world_size)
    wanted = {
        "train_batch_size": data.captions_per_step + data.text_per_step,
        "train_micro_batch_size_per_gpu": captions + text,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.grad_clip,
    }
    for key, want in wanted.items():
        got = ds.get(key, "auto")
        if got == "auto":
            ds[key] = want
        elif got != want:
            raise ConfigError(
                f"{source}: {key} is {got} but the config and world size ({world_size}) give {want} "
                "(data.captions_per_step + data.text_per_step, optim.grad_accum, optim.grad_clip); "
                'remove it from the JSON or set it to "auto"')
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{source}: defines '{key}'; the optimizer and schedule come from the optim section")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0-3, got {stage}")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{source}: bf16 and fp16 are both enabled")
    ds.setdefault("zero_allow_untested_optimizer", True)  # our client AdamW under ZeRO
    ds.setdefault("steps_per_print", 10**9)  # progress is ours
    if not (torch.cuda.is_available() if cuda is None else cuda):
        if ds.get("fp16", {}).get("enabled"):
            raise ConfigError(f"{source}: fp16 needs a GPU; on CPU use an fp32 or bf16 DeepSpeed config")
        if offload_device(ds):
            raise ConfigError(f"{source}: ZeRO offload needs a GPU; on CPU use a config without offload")
    return ds


def deepspeed_config(path: str, data: DataConfig, optim: OptimConfig, world_size: int,
                     cuda: Optional[bool] = None) -> dict[str, Any]:
    """The run's DeepSpeed config: the JSON at ``path`` (runtime.deepspeed_config), resolved."""
    return resolve_deepspeed_config(load_deepspeed_json(path), data, optim, world_size,
                                    source=f"runtime.deepspeed_config ({path})", cuda=cuda)


def offload_device(ds: dict[str, Any]) -> Optional[str]:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
    return device if device in ("cpu", "nvme") else None
