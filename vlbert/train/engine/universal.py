"""Checkpoint files loaded safely, and resharded: DeepSpeed's universal checkpoint conversion,
with every ``torch.load`` held to ``weights_only`` and an allowlist of DeepSpeed's plain types."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from argparse import Namespace
from typing import Iterator

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

log = logging.getLogger(__name__)

# The only non-tensor types in DeepSpeed 0.16-0.19 checkpoint files (found with
# torch.serialization.get_unsafe_globals_in_checkpoint over ZeRO 0-3 x fp32/bf16/fp16).
DEEPSPEED_SAFE_GLOBALS = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True``."""

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def weights_only_torch_load() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's universal conversion and loading call it
    with ``weights_only=False``) loads with ``weights_only=True`` and the DeepSpeed
    allowlist: a checkpoint file can hold tensors and plain data, never code."""
    original = torch.load

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return original(f, map_location=map_location, weights_only=True, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def convert_to_universal(ds_dir: str, out_dir: str) -> float:
    """DeepSpeed's ``ds_to_universal`` over one checkpoint folder (``<step>/ds``), in this
    process; returns the seconds it took. ``out_dir`` becomes a folder that
    ``load_checkpoint`` reads with ``checkpoint.load_universal``."""
    from deepspeed.checkpoint import ds_to_universal

    t0 = time.perf_counter()
    parent = os.path.dirname(out_dir.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    args = Namespace(input_folder=ds_dir, output_folder=out_dir, num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    # Its prints and per-parameter progress bars (stderr) would flood the training log.
    with weights_only_torch_load(), contextlib.redirect_stdout(_LogWriter()), \
            contextlib.redirect_stderr(_LogWriter()):
        ds_to_universal.main(args)
    return time.perf_counter() - t0


class _LogWriter:
    """What ds_to_universal prints goes to the debug log instead."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("ds_to_universal: %s", text.strip())

    def flush(self) -> None:
        pass
