"""``train(cfg)``: build, resume, fit, checkpoint. Read it top to bottom.

One optimizer step = ``optim.grad_accum`` micro-batches on every rank; each
micro-batch holds ``captions_per_step / (world x accum)`` captioned images and
``text_per_step / (world x accum)`` text segments. After every step the ranks
all-reduce (stop flag, loss) in one call, so they all stop at the same step
when any of them received SIGTERM/SIGUSR1.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vlbert.config import Config, check_deepspeed_config, flatten, save_config
from vlbert.train import dist
from vlbert.train.checkpoint import Checkpointer, rng_state, set_rng_state
from vlbert.train.engine import (Engine, count_parameters, init_distributed, micro_batch_counts,
                                 resolve_deepspeed_config)
from vlbert.train.metrics import Meter, batch_counts, memory_metrics, peak_flops
from vlbert.train.environment import environment_tags
from vlbert.train.signals import StopRequest
from vlbert.tracking import build_tracker

log = logging.getLogger("vlbert.train")


@dataclass
class TrainResult:
    step: int  # optimizer steps completed (including those of earlier attempts)
    preempted: bool = False
    signal: Optional[str] = None
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks), this attempt
    checkpoint: Optional[str] = None  # the last checkpoint written
    resumed_from: Optional[str] = None
    run_id: Optional[str] = None
    samples_seen: int = 0
    tokens_seen: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def export_weights(engine: Engine, out_dir: Path, rank: int, info: dict) -> None:
    """Write the trained model as ``<out_dir>/model.safetensors`` (plain tensors: loads without
    unpickling) and ``<out_dir>/model.json`` (step, MLflow run id). Collective under ZeRO-3."""
    from safetensors.torch import save_file

    state = engine.full_state_dict()  # every rank takes part in the gather
    if rank == 0:
        # Tied weights are separate copies here; safetensors refuses shared storage.
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
        (out_dir / "model.json").write_text(json.dumps(info, indent=2) + "\n")


def _setup_logging(rank: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def train(cfg: Config, on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Pretrain until ``optim.total_steps`` (or a stop signal). ``on_step(step, loss)``
    is called on every rank after each step (and its checkpoint, if any).

    SIGTERM/SIGUSR1 are caught from here on (a signal during start-up stops the
    run after its first step, with a checkpoint); the previous handlers come back
    on return.
    """
    stop = StopRequest()
    try:
        return _train(cfg, stop, on_step)
    finally:
        stop.restore()


def _train(cfg: Config, stop: StopRequest, on_step: Optional[Callable[[int, float], None]]) -> TrainResult:
    from transformers import AutoTokenizer

    from vlbert.data.mixture import build_pretrain_stream, build_validation_stream
    from vlbert.model.pretraining import VLBertForPretraining

    o, r = cfg.optim, cfg.runtime
    info = init_distributed()
    rank, world = info.rank, info.world_size
    _setup_logging(rank)
    ds_json = resolve_deepspeed_config(check_deepspeed_config(cfg), cfg.data, o, world, r.deepspeed_config)
    captions_mb, text_mb = micro_batch_counts(cfg.data, o, world)
    out_dir = Path(r.output_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "deepspeed.json").write_text(json.dumps(ds_json, indent=2) + "\n")

    # ---- build: the same initial weights on every rank (ZeRO-3 partitions each rank's copy)
    seed_everything(r.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or cfg.model.bert)
    model = VLBertForPretraining(cfg.model, cfg.detector)
    flops_params = count_parameters(model, skip_prefixes=("detector.",))
    engine = Engine(model, o, ds_json)
    stream = build_pretrain_stream(cfg.data, cfg.masking, tokenizer, rank, world, captions_mb, text_mb)
    val_data = None
    if r.val_every and cfg.data.validation.urls:
        val_data = build_validation_stream(cfg.data, cfg.masking, tokenizer, rank, world, max(1, captions_mb))
    checkpointer = Checkpointer(r.checkpoint_dir or str(out_dir / "checkpoints"), r.keep_last, rank, world)

    # ---- resume: weights, optimizer, schedule, data position, RNG, counters, MLflow run
    seed_everything(r.seed + rank)  # masking and dropout differ per rank
    step, samples_seen, tokens_local, run_id, run_key, resumed_from = 0, 0, 0, None, None, None
    loaded = checkpointer.load_latest(engine) if r.resume else None
    if loaded is not None:
        step, samples_seen = loaded.meta["step"], loaded.meta["samples_seen"]
        tokens_local, run_id = loaded.rank_state["tokens_local"], loaded.meta.get("mlflow_run_id")
        run_key = loaded.meta.get("mlflow_run_key")
        stream.load_state_dict(loaded.rank_state["data"])
        set_rng_state(loaded.rank_state["rng"])
        resumed_from = loaded.info.url
        if engine.global_step != step:
            raise RuntimeError(f"{resumed_from}: DeepSpeed is at step {engine.global_step}, the metadata says {step}")

    # ---- tracking (rank 0): config, environment, artifacts
    # The MLflow run may not exist yet (store down): the checkpoint keeps its key until it does.
    tracker = build_tracker(cfg.tracking, rank, run_id=run_id, run_key=run_key,
                            spool_dir=cfg.tracking.spool_dir or str(out_dir / "mlflow_spool"))
    if rank == 0:
        tracker.log_params(flatten(cfg.to_dict()))
        tracker.set_tags({**environment_tags(world), "vlbert.zero_stage": str(engine.zero_stage),
                          "vlbert.precision": engine.precision, "vlbert.flops_params": str(flops_params)})
        tracker.log_text((out_dir / "config.yaml").read_text(), "config/config.yaml")
        tracker.log_text(json.dumps(ds_json, indent=2), "config/deepspeed.json")
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None

    def save() -> str:
        tokens_seen = int(dist.all_sum([tokens_local])[0])
        meta = {"samples_seen": samples_seen, "tokens_seen": tokens_seen, "mlflow_run_id": tracker.run_id,
                "mlflow_run_key": tracker.run_key, "zero_stage": engine.zero_stage, "precision": engine.precision,
                "config": cfg.to_dict()}
        rank_state = {"data": stream.state_dict(), "rng": rng_state(), "tokens_local": tokens_local}
        return checkpointer.save(engine, step, meta, rank_state)

    def log_metrics(lr: float, seconds: float, steps: int) -> dict[str, float]:
        """Means over the interval and ranks, throughput, counters (collective)."""
        means, counts = meter.reduce()
        tokens_seen = dist.all_sum([tokens_local])[0]
        skips: dict[str, int] = {}
        for counter in dist.all_gather_object(stream.skip_counts()):
            for reason, n in counter.items():
                skips[reason] = skips.get(reason, 0) + n
        seconds = max(seconds, 1e-9)
        metrics = {**means, "lr": lr, "loss_scale": engine.loss_scale, "skipped_steps": engine.skipped_steps,
                   "samples_per_s": counts["samples"] / seconds, "tokens_per_s": counts["tokens"] / seconds,
                   "images_per_s": counts["images"] / seconds, "step_time_s": seconds / max(steps, 1),
                   "samples_seen": samples_seen, "tokens_seen": tokens_seen, **memory_metrics()}
        if engine.grad_norm is not None:
            metrics["grad_norm"] = engine.grad_norm
        if peak:
            metrics["mfu"] = 6 * flops_params * metrics["tokens_per_s"] / (peak * world)
        metrics.update({"data_skips/" + re.sub(r"[^\w.\- /]", "_", k): v for k, v in skips.items()})
        return metrics

    def validate() -> dict[str, float]:
        """Mean validation metrics over up to ``val_batches`` batches per rank, in lockstep."""
        vmeter, it = Meter(), iter(val_data)
        with engine.eval_mode():
            for _ in range(r.val_batches):
                batch = next(it, None)
                if dist.any_rank(batch is None):  # every rank runs the same number of forwards
                    break
                vmeter.add(engine.evaluate(batch), batch)
        means, _ = vmeter.reduce()
        return {"val_" + k: v for k, v in means.items()}

    def train_step() -> float:
        """One optimizer step: ``grad_accum`` micro-batches; this rank's mean loss."""
        nonlocal tokens_local
        loss = 0.0
        for _ in range(o.grad_accum):
            batch = next(stream)
            output = engine.step(batch)
            meter.add(output, batch)
            tokens_local += batch_counts(batch)[1]
            loss += float(output.loss.detach()) / o.grad_accum
        return loss

    # ---- fit
    result = TrainResult(step=step, resumed_from=resumed_from)
    meter = Meter()
    bar = tqdm(total=o.total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    train_seconds, interval_steps, status, batch_size = 0.0, 0, "FAILED", cfg.global_batch_size
    try:
        with logging_redirect_tqdm():  # log lines go above the bar
            while step < o.total_steps:
                t0, lr = time.perf_counter(), engine.lr
                local_loss = train_step()
                step += 1
                samples_seen += cfg.global_batch_size
                stop_votes, loss_sum = dist.all_sum([float(stop.requested), local_loss])  # ranks agree
                loss = result.losses[step] = loss_sum / world
                train_seconds += time.perf_counter() - t0
                interval_steps += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{interval_steps * batch_size / train_seconds:.1f}")

                if step % r.log_every == 0 or step % cfg.tracking.log_every == 0 or step == o.total_steps:
                    metrics = log_metrics(lr, train_seconds, interval_steps)
                    train_seconds, interval_steps = 0.0, 0
                    if step % cfg.tracking.log_every == 0 or step == o.total_steps:
                        tracker.log_metrics(metrics, step)
                    if rank == 0 and step % r.log_every == 0:
                        log.info("step %d/%d loss %.4f lr %.3g %.1f samples/s", step, o.total_steps,
                                 metrics.get("loss", loss), lr, metrics["samples_per_s"])
                if val_data is not None and step % r.val_every == 0:
                    tracker.log_metrics(validate(), step)
                if step % r.checkpoint_every == 0 or step == o.total_steps or stop_votes > 0:
                    result.checkpoint = save()
                if on_step is not None:
                    on_step(step, loss)
                if stop_votes > 0:
                    result.preempted, result.signal = True, stop.signal or "peer"
                    log.warning("stopped at step %d on %s; checkpoint %s", step, result.signal, result.checkpoint)
                    break
        if not result.preempted:
            export_weights(engine, out_dir, rank, {"step": step, "mlflow_run_id": tracker.run_id,
                                                     "mlflow_run_key": tracker.run_key})
        status = "KILLED" if result.preempted else "FINISHED"
    finally:
        bar.close()
        stream.close()
        # Preempted: the requeued attempt sends what is left in the spool; do not spend the grace time on it.
        tracker.close(status, timeout_s=min(5.0, cfg.tracking.drain_timeout_s) if result.preempted else None)
        engine.close()
    result.step, result.run_id, result.samples_seen = step, tracker.run_id, samples_seen
    result.tokens_seen = int(dist.all_sum([tokens_local])[0])
    return result
