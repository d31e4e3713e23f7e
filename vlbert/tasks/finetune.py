"""``finetune(cfg)``: build, resume, fit, evaluate, export. Read it top to bottom.

The same machinery as pretraining: the DeepSpeed ``Engine``, atomic
``Checkpointer`` checkpoints (weights, optimizer, schedule, data position,
RNG, MLflow run id), SIGTERM/SIGUSR1 stop with a checkpoint, MLflow tracking
with a tag naming the pretraining run the weights came from
(``vlbert.pretrain_run_id``, read from the ``model.json`` beside
``model.pretrained``).

Data position: the training order depends only on the micro-batch number
(``EpochBatchSampler``), so a checkpoint stores how many micro-batches were
consumed and a resumed run continues with exactly the next ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from vlbert.config import flatten
from vlbert.data.prefetch import Prefetcher, wait_for_item
from vlbert.data.vocabulary import check_vocabulary, checkpoint_tokenizer, vocabulary_fingerprint
from vlbert.tasks.config import FinetuneConfig, batch_as_data_config
from vlbert.network import network_info, resolve_network
from vlbert.tasks.pretrained import read_pretrained_info
from vlbert.tasks.sampling import EpochBatchSampler
from vlbert.train import dist
from vlbert.train.checkpoint import Checkpointer
from vlbert.train.rng import rng_state, set_rng_state
from vlbert.train.ds_config import deepspeed_config
from vlbert.train.engine import Engine, init_distributed
from vlbert.train.environment import environment_tags
from vlbert.train.lease import FolderLeases, run_folders
from vlbert.train.loop import export_weights, seed_everything
from vlbert.train.progress import Progress
from vlbert.train.signals import StopRequest
from vlbert.tracking import build_tracker

log = logging.getLogger("vlbert.finetune")


@dataclass
class FinetuneResult:
    step: int
    total_steps: int
    preempted: bool = False
    signal: Optional[str] = None
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks), this attempt
    checkpoint: Optional[str] = None
    resumed_from: Optional[str] = None
    run_id: Optional[str] = None
    eval_metrics: dict[str, float] = field(default_factory=dict)  # final evaluation (empty when preempted)


def build_task(cfg: FinetuneConfig, tokenizer, vocab=None):
    """The task object for the config's task section."""
    if cfg.vqa is not None:
        from vlbert.tasks.vqa.task import VQATask

        return VQATask(cfg, tokenizer, vocab)
    if cfg.vcr is not None:
        from vlbert.tasks.vcr.task import VCRTask

        return VCRTask(cfg, tokenizer)
    from vlbert.tasks.refcoco.task import RefCOCOTask

    return RefCOCOTask(cfg, tokenizer)


def _identity(x):
    return x


def _setup_logging(rank: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def run_evaluation(task, forward: Callable, rank: int, world: int, out_dir: Optional[Path],
                   split: Optional[str] = None) -> dict[str, float]:
    """Predict and score every evaluation set (or the named ``split``, for tasks that take one: VCR's
    ``test``); rank 0 writes ``<name>_predictions.json``."""
    metrics: dict[str, float] = {}
    for eval_set in (task.eval_sets() if split is None else task.eval_sets(split)):
        predictions = task.predict(forward, eval_set, rank, world)
        metrics.update(task.score(eval_set, predictions))
        if rank == 0 and out_dir is not None:
            task.write_predictions(str(out_dir / f"{eval_set.name}_predictions.json"), predictions)
    return metrics


def finetune(cfg: FinetuneConfig, on_step: Optional[Callable[[int, float], None]] = None) -> FinetuneResult:
    """Fine-tune until the schedule's last step (or a stop signal), then evaluate and export."""
    stop = StopRequest()
    try:
        r = cfg.runtime
        rank = init_distributed().rank
        with FolderLeases(run_folders(r.output_dir, r.checkpoint_dir), r.lease_stale_minutes * 60, rank) as leases:
            return _finetune(cfg, stop, on_step, leases)
    finally:
        stop.restore()


def _finetune(cfg: FinetuneConfig, stop: StopRequest, on_step, leases: FolderLeases) -> FinetuneResult:
    from transformers import AutoTokenizer

    # The network the starting weights were trained in (their model.json): built exactly.
    pretrained_info = read_pretrained_info(cfg.model.pretrained) if cfg.model.pretrained else {}
    cfg = resolve_network(cfg, pretrained_info, f"{cfg.model.pretrained} (model.json)")
    r, task_cfg = cfg.runtime, cfg.task
    info = init_distributed()
    rank, world = info.rank, info.world_size
    _setup_logging(rank)
    out_dir = Path(r.output_dir)

    # ---- data and schedule
    seed_everything(r.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    task = build_task(cfg, tokenizer)
    train_set = task.train_set()
    per_rank = world * cfg.optim.grad_accum
    if task_cfg.batch_size % per_rank:
        raise ValueError(f"batch_size {task_cfg.batch_size} must be divisible by world size x optim.grad_accum "
                         f"= {per_rank}")
    sampler = EpochBatchSampler(len(train_set), task_cfg.batch_size // per_rank, rank, world, task_cfg.seed)
    steps_per_epoch = sampler.batches_per_epoch // cfg.optim.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training examples do not fill one step of {task_cfg.batch_size}")
    total_steps = cfg.optim.total_steps or cfg.epochs * steps_per_epoch
    optim = dataclasses.replace(cfg.optim, total_steps=total_steps, warmup_steps=min(cfg.optim.warmup_steps,
                                                                                       total_steps))
    ds_json = deepspeed_config(r.deepspeed_config, batch_as_data_config(cfg), optim, world)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        task.save_artifacts(out_dir)

    # ---- model: the same initial weights on every rank
    seed_everything(r.seed)
    model = task.build_model()
    check_vocabulary(tokenizer, model.backbone.vlbert.embeddings.word_embeddings.num_embeddings, "tokenizer",
                     reference=None if cfg.model.pretrained else checkpoint_tokenizer(cfg.model.bert, cfg.tokenizer),
                     expected_fingerprint=pretrained_info.get("tokenizer_vocab_sha256", ""))
    engine = Engine(model, optim, ds_json)
    checkpointer = Checkpointer(r.checkpoint_dir or str(out_dir / "checkpoints"), r.keep_last, rank, world,
                                guard=leases.check)

    # ---- resume
    seed_everything(r.seed + rank)
    step, consumed, run_id, run_key, resumed_from = 0, 0, None, None, None
    loaded = checkpointer.load_latest(engine) if r.resume else None
    if loaded is not None:
        step, run_id, run_key = loaded.meta["step"], loaded.meta.get("mlflow_run_id"), loaded.meta.get("mlflow_run_key")
        consumed = loaded.rank_state["consumed"]
        set_rng_state(loaded.rank_state["rng"])
        resumed_from = loaded.info.url
    sampler.resume_from(consumed)

    # ---- tracking
    tracker = build_tracker(cfg.tracking, rank, run_id=run_id, run_key=run_key,
                            spool_dir=cfg.tracking.spool_dir or str(out_dir / "mlflow_spool"))
    if rank == 0:
        tracker.log_params(flatten(cfg.to_dict()))
        tracker.set_tags({**environment_tags(world), "vlbert.task": task.name,
                          "vlbert.pretrained": cfg.model.pretrained or f"bert:{cfg.model.bert or 'random'}",
                          "vlbert.pretrain_run_id": str(pretrained_info.get("mlflow_run_id") or ""),
                          "vlbert.steps_per_epoch": str(steps_per_epoch)})

    def save() -> str:
        meta = {"mlflow_run_id": tracker.run_id, "mlflow_run_key": tracker.run_key, "total_steps": total_steps, "config": cfg.to_dict()}
        return checkpointer.save(engine, step, meta, {"consumed": consumed, "rng": rng_state()})

    # Its own generator: a loader draws a worker seed when iterated, which must not shift the global
    # RNG that the checkpoint restores (dropout would then differ from an uninterrupted run).
    loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=None, collate_fn=_identity,
                                         num_workers=task_cfg.num_workers,
                                         generator=torch.Generator().manual_seed(task_cfg.seed),
                                         prefetch_factor=2 if task_cfg.num_workers else None)
    # Made in a background thread, so that a step waiting on a slow store still sees a stop request.
    batches = Prefetcher(iter(loader), name="vlbert-finetune-data")
    skips: dict[str, int] = {}

    def next_batch():
        """The next usable micro-batch, or None when a stop is requested while waiting for one."""
        nonlocal consumed
        while True:
            got, item = wait_for_item(batches, lambda: stop.requested, task_cfg.wait_warn_s, task_cfg.wait_timeout_s,
                                      lambda: f"rank {rank}; skips so far: {skips}", f"{task.name}.wait_timeout_s")
            if not got:
                return None
            batch, skipped = item
            consumed += 1
            for k, n in skipped.items():
                skips[k] = skips.get(k, 0) + n
            if batch is not None:
                return batch

    result = FinetuneResult(step=step, total_steps=total_steps, resumed_from=resumed_from)
    saved_step = step if resumed_from is not None else -1
    sums: dict[str, float] = {}  # the model output's metrics (loss, accuracy), summed over the interval
    interval, t0, status = 0, time.perf_counter(), "FAILED"
    bar = Progress(total_steps, f"finetune {task.name}", initial=step, enabled=rank == 0)
    try:
        while step < total_steps:
            step_start = consumed
            micro = []
            while len(micro) < cfg.optim.grad_accum and (batch := next_batch()) is not None:
                micro.append(batch)
            # The ranks agree before the step's first collective: a rank that gave up waiting for
            # data on a stop request never leaves the others inside one.
            if dist.any_rank(len(micro) < cfg.optim.grad_accum or stop.requested):
                consumed = step_start  # this step's batches were not used
                result.preempted, result.signal = True, stop.signal or "peer"
                if saved_step != step:
                    result.checkpoint, saved_step = save(), step
                log.warning("stopped at step %d on %s; checkpoint %s", step, result.signal, result.checkpoint)
                break
            lr, local = engine.lr, {}
            for batch in micro:
                for k, v in engine.step(batch).metrics().items():
                    local[k] = local.get(k, 0.0) + float(v) / cfg.optim.grad_accum
            step += 1
            keys = sorted(local)  # the same on every rank: one model
            means = dist.all_sum([local[k] for k in keys])
            for k, v in zip(keys, means):
                sums[k] = sums.get(k, 0.0) + v / world
            loss = result.losses[step] = means[keys.index("loss")] / world
            interval += 1
            bar.update(1, loss=f"{loss:.4f}")
            if step % r.log_every == 0 or step == total_steps:
                seconds = time.perf_counter() - t0
                tracker.log_metrics({**{k: v / interval for k, v in sums.items()}, "lr": lr,
                                     "epoch": step / steps_per_epoch, "step_time_s": seconds / interval,
                                     **{f"data_skips/{k}": v for k, v in skips.items()}}, step)
                if rank == 0:
                    log.info("step %d/%d %s lr %.3g", step, total_steps,
                             " ".join(f"{k} {v / interval:.4f}" for k, v in sums.items()), lr)
                sums, interval, t0 = {}, 0, time.perf_counter()
            if r.val_every and step % r.val_every == 0 and step < total_steps:
                with engine.eval_mode():
                    tracker.log_metrics(run_evaluation(task, engine.evaluate, rank, world, None), step)
            if step % r.checkpoint_every == 0 or step == total_steps:
                result.checkpoint, saved_step = save(), step
            if on_step is not None:
                on_step(step, loss)
        if not result.preempted:
            with engine.eval_mode():
                result.eval_metrics = run_evaluation(task, engine.evaluate, rank, world, out_dir)
            if result.eval_metrics:
                tracker.log_summary(result.eval_metrics, step)
                if rank == 0:
                    log.info("evaluation: %s", json.dumps(result.eval_metrics, sort_keys=True))
                    (out_dir / "eval_metrics.json").write_text(json.dumps(result.eval_metrics, indent=2) + "\n")
            export_weights(engine, out_dir, rank, {"step": step, "mlflow_run_id": tracker.run_id, "task": task.name,
                                                   "pretrain_run_id": pretrained_info.get("mlflow_run_id"),
                                                   "tokenizer_vocab_sha256": vocabulary_fingerprint(tokenizer),
                                                   **network_info(cfg.model, cfg.detector)})
        status = "KILLED" if result.preempted else "FINISHED"
    finally:
        bar.close()
        batches.close(wait_s=5.0)  # lets the loader's workers go before the process exits
        # Preempted: the requeued attempt sends what is left in the spool.
        tracker.close(status, timeout_s=min(5.0, cfg.tracking.drain_timeout_s) if result.preempted else None)
        engine.close()
    result.step, result.run_id = step, tracker.run_id
    return result
