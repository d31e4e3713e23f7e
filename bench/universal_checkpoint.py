"""What a resume on another number of ranks costs: DeepSpeed's universal-checkpoint conversion
at VL-BERT BASE width, on the CPU, parameters only (no data), against the ordinary save and load.

The model of configs/base_e2e.yaml (BERT-base encoder, ResNet-101 C4 detector, random weights)
under our Engine on one gloo process, one optimizer step on a loss that touches every
trainable parameter (so Adam has both moments), then, in this process:

- baseline: ``save_state`` (DeepSpeed's own checkpoint) and ``load_state`` of it;
- ours: ``convert_to_universal`` of that checkpoint (what a resume on another world size runs
  once per node) and ``load_state(resharded=True)`` (conversion + universal load).

Printed: parameter count, seconds and bytes of each, and the ratios. The conversion reads the
ZeRO partitions of every rank and writes one file per parameter and state, so its cost grows
with the parameter count, not with the number of ranks that wrote the checkpoint.

    python bench/universal_checkpoint.py                  # BASE, ZeRO-2 fp32 (minutes, ~10 GB of memory)
    python bench/universal_checkpoint.py --stage 3 --bf16
    python bench/universal_checkpoint.py --tiny           # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlbert.config import DataConfig, DetectorConfig, ModelConfig, OptimConfig, load_config
from vlbert.model.pretraining import VLBertForPretraining
from vlbert.train.ds_config import resolve_deepspeed_config
from vlbert.train.engine import Engine, convert_to_universal, count_parameters, init_distributed

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Out:
    loss: torch.Tensor


class ParametersOnly(nn.Module):
    """The model's parameters under a loss that gives each a (tiny) gradient: no data needed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> Out:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return Out(sum(p.float().square().mean() for p in params) * 1e-6)


class NoBatch:
    def to(self, device, non_blocking=False):
        return self


def build(tiny: bool) -> nn.Module:
    if tiny:
        return VLBertForPretraining(ModelConfig(vocab_size=68, hidden_size=32, num_layers=2, num_heads=2,
                                                intermediate_size=64, max_position_embeddings=64),
                                    DetectorConfig(depth=18, num_classes=15))
    cfg = load_config(REPO / "configs/base_e2e.yaml", ["model.bert=", "detector.checkpoint="])
    return VLBertForPretraining(cfg.model, cfg.detector)


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model (seconds)")
    p.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    args = p.parse_args(argv)

    init_distributed()
    torch.manual_seed(0)
    model = ParametersOnly(build(args.tiny))
    n_params = count_parameters(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data, optim = DataConfig(captions_per_step=1, text_per_step=1), OptimConfig(warmup_steps=0, total_steps=10)
    ds = {"zero_optimization": {"stage": args.stage}}
    if args.bf16:
        ds["bf16"] = {"enabled": True}
    engine = Engine(model, optim, resolve_deepspeed_config(ds, data, optim, world_size=1, cuda=False))
    engine.step(NoBatch())

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="vlbert-bench-universal-") as root:
        saved, universal = os.path.join(root, "saved"), os.path.join(root, "universal", "ds")
        t0 = time.perf_counter()
        engine.save_state(saved)
        save_s = time.perf_counter() - t0
        convert_s = convert_to_universal(os.path.join(saved, "ds"), universal)
        t0 = time.perf_counter()
        engine.load_state(saved)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.load_state(saved, resharded=True)
        reshard_load_s = time.perf_counter() - t0
        ds_bytes, universal_bytes = folder_bytes(os.path.join(saved, "ds")), folder_bytes(universal)
    engine.close()

    precision = "bf16" if args.bf16 else "fp32"
    print(f"{'tiny' if args.tiny else 'BASE'} model: {n_params / 1e6:.1f} M parameters "
          f"({n_trainable / 1e6:.1f} M trainable), ZeRO-{args.stage} {precision}, 1 process, "
          f"{torch.get_num_threads()} threads")
    print(f"baseline  save_state             {save_s:8.2f} s   checkpoint {ds_bytes / 2**30:6.2f} GiB")
    print(f"baseline  load_state             {load_s:8.2f} s")
    print(f"ours      convert_to_universal   {convert_s:8.2f} s   universal  {universal_bytes / 2**30:6.2f} GiB")
    print(f"ours      load_state(resharded)  {reshard_load_s:8.2f} s   (conversion + universal load)")
    print(f"ratio conversion / save = {convert_s / save_s:.2f}; resharded load / load = "
          f"{reshard_load_s / load_s:.2f}; universal / checkpoint bytes = {universal_bytes / ds_bytes:.2f}")
    return {"params": n_params, "save_s": save_s, "load_s": load_s, "convert_s": convert_s,
            "reshard_load_s": reshard_load_s, "ds_bytes": ds_bytes, "universal_bytes": universal_bytes}


if __name__ == "__main__":
    main()
