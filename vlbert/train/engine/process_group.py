"""The process group: NCCL on GPUs, gloo on CPUs; one process when no launcher set it up."""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import deepspeed
import torch

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def disable_shm_comm() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about two
    minutes of C++ on 2 cores) when it sets up communication; that op serves only
    inference all-reduce, which training never calls. On CPU we use no DeepSpeed
    op at all (torch AdamW, gloo), so mark every op unavailable, which also skips
    DeepSpeed's compiler probes."""
    if "__compatible_ops__" not in vars(deepspeed.ops):
        from deepspeed.ops.op_builder.all_ops import ALL_OPS

        vars(deepspeed.ops)["__compatible_ops__"] = dict.fromkeys(ALL_OPS, False)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the process group; idempotent.

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (torchrun, the
    deepspeed launcher). Under ``srun`` without a launcher, SLURM_PROCID /
    SLURM_STEP_NUM_TASKS / SLURM_LOCALID stand in when MASTER_ADDR and
    MASTER_PORT are exported. Without any of these: one process.
    """
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
            env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_STEP_NUM_TASKS"]
            env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        else:
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        disable_shm_comm()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)
