"""DeepSpeed behind a small interface: ``core`` is the only module that imports ``deepspeed``
(the process group, ``Engine`` and the parameter groups, safe loading and resharding of
checkpoints); this package sets DeepSpeed's accelerator before it is imported.

- ``init_distributed()``: the process group (NCCL on GPUs, gloo on CPUs). Under
  ``torchrun``/``deepspeed``/``srun`` it reads the usual environment; a plain
  ``vlbert-train`` in one process gets a one-process group on a free loopback port.
- ``Engine``: AdamW with BERT's parameter groups (no weight decay on biases and
  normalisation weights) and the detector's parameters in groups of their own
  (peak learning rate ``optim.lr * optim.detector_lr_mult``), linear warmup then
  linear decay to 0 applied to every group's own peak, and DeepSpeed
  for ZeRO 1-3, bf16/fp16 (dynamic loss scaling as the JSON says), gradient
  accumulation and clipping.

The optimizer is PyTorch's own ``torch.optim.AdamW`` handed to DeepSpeed as a
client optimizer: DeepSpeed's fused/CPU Adam are JIT-compiled on first use,
which takes minutes (and needs a compiler) on CPU hosts. Only ZeRO optimizer
offload, which requires it, uses ``DeepSpeedCPUAdam``.

Checkpoints are DeepSpeed's own (``save_checkpoint``/``load_checkpoint``:
ZeRO-partitioned optimizer state, schedule, step counters), but loading never
unpickles arbitrary objects: DeepSpeed's torch checkpoint engine is replaced by
one that calls ``torch.load(weights_only=True)`` with an allowlist of the four
plain DeepSpeed types its files hold (``DEEPSPEED_SAFE_GLOBALS``).

A checkpoint written by another number of ranks is loaded through DeepSpeed's
*universal checkpoint*: ``ds_to_universal`` turns the ZeRO partitions into one
file per parameter and state (fp32 weights, Adam moments), which
``load_checkpoint`` with ``checkpoint.load_universal`` cuts into this world's
partitions (ZeRO 1-3, fp32 or bf16). The conversion runs once per node, into a
temporary folder, with every ``torch.load`` it makes held to ``weights_only``.
A universal checkpoint restores only what the optimizer holds, so every save also
writes the frozen parameters and the buffers whole (``FROZEN_FILE``, safetensors).
"""

import os
import warnings

import torch

if not torch.cuda.is_available():  # must be set before deepspeed picks its accelerator
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed 0.19's ZeRO calls collectives that torch 2.13 marks deprecated, warning at every call.
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                        category=FutureWarning)

from vlbert.train.engine.core import (DEEPSPEED_SAFE_GLOBALS, DETECTOR_PREFIX, FROZEN_FILE, DistInfo,  # noqa: E402
                                      Engine, SafeTorchCheckpointEngine, convert_to_universal, count_parameters,
                                      init_distributed, param_groups, weights_only_torch_load)

__all__ = ["DEEPSPEED_SAFE_GLOBALS", "DETECTOR_PREFIX", "FROZEN_FILE", "DistInfo", "Engine", "SafeTorchCheckpointEngine",
           "convert_to_universal", "count_parameters", "init_distributed", "param_groups", "weights_only_torch_load"]
