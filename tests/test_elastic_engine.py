"""Model and optimizer on another number of ranks (vlbert/train/engine/, ``load_state(resharded=True)``).

Two gloo processes train a tiny module (with a tied decoder, a frozen layer and a running
statistic, as the real model) under ZeRO 1, 2 and 3, in fp32 and bf16, and save; the checkpoints are then
loaded by one process and by three (DeepSpeed universal checkpoints, converted on the fly). After loading, the
whole weights and the whole optimizer state (fp32 master weights, both Adam moments), gathered
from the new partitions, equal what the two ranks held when they saved, and the next step runs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.timeout(420), pytest.mark.filterwarnings("ignore::FutureWarning")]

SETUPS = [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]  # (ZeRO stage, bf16)
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TiedTiny(nn.Module):
    """Like the real model in what resharding must keep: a decoder tied to the embedding
    (one optimizer entry, two names), a frozen layer (no optimizer state) and a running
    statistic (a buffer, as BatchNorm's)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.register_buffer("running_mean", torch.zeros(8))  # a statistic, as BatchNorm keeps
        self.body = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.decoder = nn.Linear(8, 10)
        self.decoder.weight = self.emb.weight

    def forward(self, batch):
        from test_engine import Out

        e = self.emb(batch.x)
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * e.detach().mean((0, 1)).to(self.running_mean.dtype))
        logits = self.decoder(self.body(e) + self.frozen(e)).float()  # [n, 5, 10]
        mlm = nn.functional.cross_entropy(logits.flatten(0, 1), batch.x.flatten())
        return Out(mlm + ((logits.mean((1, 2)) - batch.y) ** 2).mean())


def _engine(stage: int, bf16: bool, world: int, seed: int):
    from vlbert.config import DataConfig, OptimConfig
    from vlbert.train.ds_config import resolve_deepspeed_config
    from vlbert.train.engine import Engine

    torch.manual_seed(seed)
    data = DataConfig(captions_per_step=12, text_per_step=12)  # divisible by 1, 2 and 3 ranks
    optim = OptimConfig(lr=1e-2, warmup_steps=1, total_steps=50, weight_decay=0.01, grad_clip=1.0)
    ds = {"zero_optimization": {"stage": stage}}
    if bf16:
        ds["bf16"] = {"enabled": True}
    return Engine(TiedTiny(), optim, resolve_deepspeed_config(ds, data, optim, world_size=world, cuda=False))


def _phase(rank: int, world: int, port: int, root: str, save: bool, errors) -> None:
    """One rank of one phase: ``save`` trains and saves every setup; otherwise loads them resharded."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        torch.set_num_threads(1)
        from test_engine import fixed_batch

        from vlbert.launch import skip_garbage_collection_at_exit

        skip_garbage_collection_at_exit()  # as the trainer does: no seconds of collection at exit

        from vlbert.train.engine import init_distributed

        init_distributed()
        for stage, bf16 in SETUPS:
            name = f"zero{stage}_{'bf16' if bf16 else 'fp32'}"
            folder = Path(root, name)
            if save:
                engine = _engine(stage, bf16, world, seed=0)
                for step in range(STEPS):
                    engine.step(fixed_batch(seed=10 * step + rank))
                engine.save_state(str(folder))
                optim, weights = engine.full_optimizer_state(), engine.full_state_dict()
                if rank == 0:
                    torch.save({"optim": optim, "weights": weights, "step": engine.global_step},
                               folder / "gathered.pt")
            else:
                engine = _engine(stage, bf16, world, seed=1)  # other initial weights: the load must replace them
                engine.load_state(str(folder), resharded=True)
                optim, weights = engine.full_optimizer_state(), engine.full_state_dict()
                saved = torch.load(folder / "gathered.pt", weights_only=True)
                assert engine.global_step == saved["step"] == STEPS, (name, engine.global_step)
                assert weights.keys() == saved["weights"].keys(), name
                for k, v in saved["weights"].items():
                    assert torch.equal(weights[k], v), f"{name}: weight {k} differs after resharding"
                assert optim.keys() == saved["optim"].keys(), name
                for param, states in saved["optim"].items():
                    assert set(states) == {"fp32", "exp_avg", "exp_avg_sq"}, (name, param, sorted(states))
                    assert optim[param].keys() == states.keys(), (name, param)
                    for key, v in states.items():
                        assert torch.equal(optim[param][key], v), f"{name}: {param} {key} differs after resharding"
                loss = engine.step(fixed_batch(seed=99)).loss  # and training goes on
                assert torch.isfinite(loss), name
            engine.close()
        torch.distributed.barrier()
        # Torn down here, not at interpreter exit, where gloo's threads can abort the process.
        torch.distributed.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}/{world}: {traceback.format_exc()}")
        raise


def _run(*phases: tuple[int, bool], root: Path) -> None:
    """Each phase (world size, save) as that many spawned ranks; the phases run at the same time
    (the two loads only read the saved folders and convert them in their own temporary folders)."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = []
    for world, save in phases:
        port = _free_port()
        procs += [ctx.Process(target=_phase, args=(r, world, port, str(root), save, errors)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 300
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not alive, f"{len(alive)} rank(s) still running after 300 s"
    assert not messages and all(p.exitcode == 0 for p in procs), "\n".join(messages) or [p.exitcode for p in procs]


def test_zero_1_2_3_fp32_and_bf16_checkpoints_of_two_ranks_load_on_one_and_on_three(tmp_path):
    _run((2, True), root=tmp_path)
    for setup in SETUPS:
        name = f"zero{setup[0]}_{'bf16' if setup[1] else 'fp32'}"
        assert (tmp_path / name / "gathered.pt").exists(), name
    _run((1, False), (3, False), root=tmp_path)
