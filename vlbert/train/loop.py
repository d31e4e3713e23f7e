"""``train(cfg)``: build, resume, fit, checkpoint. Read it top to bottom.

One optimizer step = ``accum`` micro-batches on every rank (``optim.grad_accum``;
on a resume with another world size the accumulation adapts to keep the global
batch: ``layout.py``); each micro-batch holds ``captions_per_step / (world x
accum)`` captioned images and ``text_per_step / (world x accum)`` text segments. Before every step each rank
fetches the step's micro-batches (giving up the wait if SIGTERM/SIGUSR1
arrives) and the ranks all-reduce their stop flags, so they all stop at the
same step boundary, with a checkpoint, within seconds of the signal even while
the data pipeline is waiting on a store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from vlbert.config import Config, ConfigError, flatten, save_config
from vlbert.train import dist
from vlbert.train.checkpoint import Checkpointer
from vlbert.train.rng import rng_state, set_rng_state
from vlbert.train.ds_config import deepspeed_config
from vlbert.train.engine import Engine, count_parameters, init_distributed
from vlbert.train.progress import Progress
from vlbert.train.metrics import Meter, batch_counts, interval_metrics, peak_flops, total_skips
from vlbert.data.partitions import read_rates
from vlbert.data.vocabulary import check_vocabulary, checkpoint_tokenizer, vocabulary_fingerprint
from vlbert.network import network_info
from vlbert.train.layout import describe as describe_layout, plan_layout
from vlbert.train.lease import FolderLeases, run_folders
from vlbert.train.state import TrainState
from vlbert.train.sample_keys import SampleKeyLog
from vlbert.train.environment import environment_tags
from vlbert.train.signals import StopRequest
from vlbert.tracking import build_tracker

log = logging.getLogger("vlbert.train")

STREAM_CLOSE_WAIT_S = 5.0  # for the loader's thread to shut its workers down before the process exits


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
    unpickling) and ``<out_dir>/model.json`` (``info``: step, MLflow run id and the network's
    ``model`` and ``detector`` sections, ``vlbert.network``). Collective under ZeRO-3."""
    from safetensors.torch import save_file

    state = engine.full_state_dict()  # every rank takes part in the gather
    if rank == 0:
        # Tied weights are separate copies here; safetensors refuses shared storage.
        save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
        (out_dir / "model.json").write_text(json.dumps(info, indent=2) + "\n")


def validate(engine: Engine, val_data, max_batches: int) -> dict[str, float]:
    """Mean validation metrics over up to ``max_batches`` batches per rank, in lockstep."""
    meter, it = Meter(), iter(val_data)
    with engine.eval_mode():
        for _ in range(max_batches):
            batch = next(it, None)
            if dist.any_rank(batch is None):  # every rank runs the same number of forwards
                break
            meter.add(engine.evaluate(batch), batch)
    means, _ = meter.reduce()
    return {"val_" + k: v for k, v in means.items()}


def fetch_step(stream, micro_batches: int, stop: StopRequest) -> Optional[list]:
    """One step's micro-batches, or None if a stop was requested while waiting for them."""
    batches = []
    for _ in range(micro_batches):
        batch = stream.next_batch(should_stop=lambda: stop.requested)
        if batch is None:
            return None
        batches.append(batch)
    return batches


def train_step(engine: Engine, meter: Meter, batches: list) -> tuple[float, float]:
    """One optimizer step over the micro-batches: (this rank's mean loss, its tokens)."""
    loss = tokens = 0.0
    for batch in batches:
        output = engine.step(batch)
        meter.add(output, batch)
        tokens += batch_counts(batch)[1]
        loss += float(output.loss.detach()) / len(batches)
    return loss, tokens


def resume(engine: Engine, stream, checkpointer: Checkpointer, latest, seed: int, rank: int
           ) -> tuple[TrainState, Optional[str]]:
    """Load the latest checkpoint (``peek_latest()``'s answer, or None for a fresh run) into the
    engine, the data stream and the RNGs, on this world size or another one; returns the run's
    counters and the checkpoint's URL (None when nothing was loaded)."""
    if latest is None:
        return TrainState(), None
    saved_engine = (latest[1].get("zero_stage"), latest[1].get("precision"))
    if None not in saved_engine and saved_engine != (engine.zero_stage, engine.precision):
        raise ConfigError(f"{latest[0].url} was written under ZeRO-{saved_engine[0]} {saved_engine[1]}; this run "
                          f"uses ZeRO-{engine.zero_stage} {engine.precision}: keep the DeepSpeed config's ZeRO "
                          "stage and precision when resuming (runtime.deepspeed_config)")
    loaded = checkpointer.load(engine, *latest, allow_reshard=True)
    state = TrainState.from_meta(loaded.meta)
    stream.load_state_dicts([s["data"] for s in loaded.rank_states])
    if loaded.resharded:  # no saved generator belongs to this rank now: one keyed on rank and step
        seed_everything(int(np.random.SeedSequence([seed, rank, state.step]).generate_state(1)[0]))
    else:
        set_rng_state(loaded.rank_state["rng"])
    if engine.global_step != state.step:
        raise RuntimeError(f"{loaded.info.url}: DeepSpeed is at step {engine.global_step}, "
                           f"the metadata says {state.step}")
    return state, loaded.info.url


def warn_layout_change(layout, was: str, step: int, world: int, num_workers: int) -> None:
    log.warning("resuming step %d on a new layout: %s (was %s)", step, layout.describe(), was)
    if len(set(read_rates(layout.partitions, world, num_workers).values())) > 1:
        log.warning("this layout reads the %d data partitions at unequal rates, so their epochs will end at "
                    "different steps (each partition still gives every sample once per epoch); ranks x "
                    "workers that divide %d read them evenly", layout.partitions, layout.partitions)


def start_tracking(cfg: Config, rank: int, world: int, state: TrainState, engine: Engine, layout,
                   layout_change: Optional[str], flops_params: int, ds_json: dict):
    """The run's tracker; rank 0 logs the config, environment, layout (and its change, if any:
    ``layout_change`` is the earlier layout's description) and the config files. The MLflow run
    may not exist yet (store down): the checkpoint keeps its key until it does."""
    out_dir = Path(cfg.runtime.output_dir)
    tracker = build_tracker(cfg.tracking, rank, run_id=state.mlflow_run_id, run_key=state.mlflow_run_key,
                            spool_dir=cfg.tracking.spool_dir or str(out_dir / "mlflow_spool"))
    if rank == 0:
        tracker.log_params(flatten(cfg.to_dict()))
        tracker.set_tags({**environment_tags(world), "vlbert.zero_stage": str(engine.zero_stage),
                          "vlbert.precision": engine.precision, "vlbert.flops_params": str(flops_params),
                          "vlbert.layout": layout.describe(), "vlbert.data_partitions": str(layout.partitions)})
        if layout_change is not None:  # one tag per change, named by the step the new layout starts from
            tracker.set_tags({f"vlbert.layout_change.step_{state.step:07d}": f"{layout_change} -> {layout.describe()}"})
        tracker.log_text((out_dir / "config.yaml").read_text(), "config/config.yaml")
        tracker.log_text(json.dumps(ds_json, indent=2), "config/deepspeed.json")
    return tracker


def _setup_logging(rank: int) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")


def train(cfg: Config, on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Pretrain until ``optim.total_steps`` (or a stop signal). ``on_step(step, loss)``
    is called on every rank after each step (and its checkpoint, if any).

    SIGTERM/SIGUSR1 are caught from here on (a signal during start-up stops the
    run before its first step, with a checkpoint); the previous handlers come back
    on return.

    The run holds the lease on its output and checkpoint folders throughout (``lease.py``):
    raises ``LeaseHeld``, naming the holder, when another job has them.
    """
    stop = StopRequest()
    try:
        r = cfg.runtime
        rank = init_distributed().rank
        with FolderLeases(run_folders(r.output_dir, r.checkpoint_dir), r.lease_stale_minutes * 60, rank) as leases:
            return _train(cfg, stop, on_step, leases)
    finally:
        stop.restore()


def _train(cfg: Config, stop: StopRequest, on_step: Optional[Callable[[int, float], None]],
           leases: FolderLeases) -> TrainResult:
    from transformers import AutoTokenizer

    from vlbert.data.mixture import build_pretrain_stream, build_validation_stream
    from vlbert.model.pretraining import VLBertForPretraining

    r = cfg.runtime
    info = init_distributed()
    rank, world = info.rank, info.world_size
    _setup_logging(rank)
    out_dir = Path(r.output_dir)
    checkpointer = Checkpointer(r.checkpoint_dir or str(out_dir / "checkpoints"), r.keep_last, rank, world,
                                guard=leases.check)
    # The layout comes first: on another world size the accumulation adapts to keep the global batch.
    latest = checkpointer.peek_latest() if r.resume else None
    saved_layout = TrainState.from_meta(latest[1]).layout if latest is not None else None
    layout = plan_layout(cfg.data, cfg.optim, world, saved_layout)
    o = dataclasses.replace(cfg.optim, grad_accum=layout.grad_accum)
    ds_json = deepspeed_config(r.deepspeed_config, cfg.data, o, world)
    captions_mb, text_mb = layout.captions, layout.text
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "deepspeed.json").write_text(json.dumps(ds_json, indent=2) + "\n")

    # ---- build: the same initial weights on every rank (ZeRO-3 partitions each rank's copy)
    seed_everything(r.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.data.tokenizer or cfg.model.bert)
    model = VLBertForPretraining.from_config(cfg.model, cfg.detector)
    check_vocabulary(tokenizer, model.vlbert.embeddings.word_embeddings.num_embeddings, "data.tokenizer",
                     reference=checkpoint_tokenizer(cfg.model.bert, cfg.data.tokenizer))
    flops_params = count_parameters(model, skip_prefixes=("detector.", "target_detector."))
    engine = Engine(model, o, ds_json)
    features = cfg.detector.source == "features"  # stored box features instead of pixels
    stream = build_pretrain_stream(cfg.data, cfg.masking, tokenizer, rank, world, captions_mb, text_mb,
                                   num_partitions=layout.partitions, features=features)
    val_data = None
    if r.val_every and cfg.data.validation.urls:
        val_data = build_validation_stream(cfg.data, cfg.masking, tokenizer, rank, world, max(1, captions_mb),
                                           features=features)

    # ---- resume: weights, optimizer, schedule, data position, RNG, counters, MLflow run
    seed_everything(r.seed + rank)  # masking and dropout differ per rank
    state, resumed_from = resume(engine, stream, checkpointer, latest, r.seed, rank)
    change = describe_layout(saved_layout) if saved_layout is not None and layout.changed_from(saved_layout) else None
    if change is not None and rank == 0:
        warn_layout_change(layout, change, state.step, world, cfg.data.num_workers)
    state.layout = layout.to_dict()

    # ---- tracking (rank 0): config, environment, artifacts
    tracker = start_tracking(cfg, rank, world, state, engine, layout, change, flops_params, ds_json)
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    meter, key_log = Meter(), SampleKeyLog(out_dir, rank, state.step) if r.log_sample_keys else None

    def save() -> str:
        state.mlflow_run_id, state.mlflow_run_key = tracker.run_id, tracker.run_key
        meta = {**state.to_meta(), "zero_stage": engine.zero_stage, "precision": engine.precision,
                "config": cfg.to_dict()}
        return checkpointer.save(engine, state.step, meta, {"data": stream.state_dict(), "rng": rng_state()})

    def interval(lr: float, seconds: float, steps: int) -> dict[str, float]:
        """The interval's metrics, reduced over ranks (collective)."""
        means, counts = meter.reduce()
        extra = {"lr": lr, "loss_scale": engine.loss_scale, "skipped_steps": engine.skipped_steps,
                 "samples_seen": state.samples_seen, "tokens_seen": state.tokens_seen}
        if engine.grad_norm is not None:
            extra["grad_norm"] = engine.grad_norm
        skips = total_skips(dist.all_gather_object(stream.skip_counts()))
        return interval_metrics(means, counts, seconds, steps, extra, skips, flops_params, peak, world)

    # ---- fit
    result = TrainResult(step=state.step, resumed_from=resumed_from)
    # Off a terminal the bar stays silent: the log line every runtime.log_every steps is the progress.
    bar = Progress(o.total_steps, "train", initial=state.step, enabled=rank == 0)
    seconds, steps_in_interval, status = 0.0, 0, "FAILED"
    saved_step = state.step if resumed_from is not None else -1
    try:
        with logging_redirect_tqdm():  # log lines go above the bar
            while state.step < o.total_steps:
                data_start = stream.state_dict()
                batches = fetch_step(stream, layout.grad_accum, stop)
                # The ranks agree before the step's first collective, so a rank that gave up waiting
                # for data on a stop request never leaves the others inside a collective.
                if dist.any_rank(batches is None or stop.requested):
                    stream.load_state_dict(data_start)  # this step's batches were not used
                    result.preempted, result.signal = True, stop.signal or "peer"
                    if saved_step != state.step:
                        result.checkpoint, saved_step = save(), state.step
                    log.warning("stopped at step %d on %s; checkpoint %s", state.step, result.signal,
                                result.checkpoint)
                    break
                t0, lr = time.perf_counter(), engine.lr
                local_loss, local_tokens = train_step(engine, meter, batches)
                loss_sum, tokens = dist.all_sum([local_loss, local_tokens])
                state.advance(cfg.global_batch_size, int(tokens))
                loss = result.losses[state.step] = loss_sum / world
                seconds += time.perf_counter() - t0
                steps_in_interval += 1
                bar.update(1, loss=f"{loss:.4f}", samples_s=f"{steps_in_interval * cfg.global_batch_size / seconds:.1f}")
                if key_log is not None:
                    key_log.write(state.step, batches)

                if state.step % r.log_every == 0 or state.step == o.total_steps:
                    metrics = interval(lr, seconds, steps_in_interval)
                    seconds, steps_in_interval = 0.0, 0
                    tracker.log_metrics(metrics, state.step)
                    if rank == 0:
                        log.info("step %d/%d loss %.4f lr %.3g %.1f samples/s", state.step, o.total_steps,
                                 metrics.get("loss", loss), lr, metrics["samples_per_s"])
                if val_data is not None and state.step % r.val_every == 0:
                    tracker.log_metrics(validate(engine, val_data, r.val_batches), state.step)
                if state.step % r.checkpoint_every == 0 or state.step == o.total_steps:
                    result.checkpoint, saved_step = save(), state.step
                if on_step is not None:
                    on_step(state.step, loss)
        if not result.preempted:
            export_weights(engine, out_dir, rank, {"step": state.step, "mlflow_run_id": tracker.run_id,
                                                     "mlflow_run_key": tracker.run_key,
                                                     "tokenizer_vocab_sha256": vocabulary_fingerprint(tokenizer),
                                                     **network_info(cfg.model, cfg.detector)})
        status = "KILLED" if result.preempted else "FINISHED"
    finally:
        bar.close()
        stream.close(wait_s=STREAM_CLOSE_WAIT_S)
        if key_log is not None:
            key_log.close()
        # Preempted: the requeued attempt sends what is left in the spool; do not spend the grace time on it.
        tracker.close(status, timeout_s=min(5.0, cfg.tracking.drain_timeout_s) if result.preempted else None)
        engine.close()
    result.step, result.run_id = state.step, tracker.run_id
    result.samples_seen, result.tokens_seen = state.samples_seen, state.tokens_seen
    return result
