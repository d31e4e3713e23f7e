"""DeepSpeed, the only module that imports it (see the package docstring): the process group,
``Engine`` (the model, AdamW and the schedule under DeepSpeed: ZeRO 1-3, bf16/fp16, accumulation,
clipping) and its checkpoints, BERT's parameter groups, and checkpoint files loaded safely and
resharded through DeepSpeed's universal checkpoints."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from argparse import Namespace
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import deepspeed
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from torch import nn

from vlbert.config import OptimConfig
from vlbert.train.ds_config import offload_device
from vlbert.train.schedule import lr_factor

log = logging.getLogger(__name__)


# ----------------------------------------------------------------- the process group

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


# ----------------------------------------------------------------- safe checkpoint files

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


# ----------------------------------------------------------------- the engine

# Beside DeepSpeed's files: the frozen parameters and buffers, which a universal checkpoint leaves out.
FROZEN_FILE = "vlbert_frozen.safetensors"


# Name prefix of the detector's parameters (``VLBertForPretraining.detector``): lr x optim.detector_lr_mult.
DETECTOR_PREFIX = "detector."


def param_groups(model: nn.Module, weight_decay: float,
                 lr_mults: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    """Trainable parameters in AdamW groups: with weight decay, and without it for
    biases and the weights of normalisation layers (BERT's convention; embeddings
    keep weight decay). Tied parameters appear once.

    ``lr_mults`` maps a parameter-name prefix to a learning-rate multiplier: the
    parameters under it form their own (decay, no decay) pair of groups. Every
    group carries its multiplier as ``"lr_mult"`` (1.0 for the rest). Order: the
    unprefixed groups first (so group 0 holds the encoder), then each prefix in
    the mapping's order; empty groups are left out.
    """
    lr_mults = dict(lr_mults or {})
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    exempt: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norm_types) or name == "bias":
                exempt.add(id(p))
    keys = [None, *lr_mults]  # None: no prefix matched
    buckets: dict[Any, tuple[list, list]] = {k: ([], []) for k in keys}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = next((k for k in lr_mults if name.startswith(k)), None)
            decay, no_decay = buckets[key]
            (no_decay if id(p) in exempt else decay).append(p)
    groups = []
    for key in keys:
        mult = 1.0 if key is None else float(lr_mults[key])
        decay, no_decay = buckets[key]
        groups += [{"params": decay, "weight_decay": weight_decay, "lr_mult": mult},
                   {"params": no_decay, "weight_decay": 0.0, "lr_mult": mult}]
    return [g for g in groups if g["params"]]


def count_parameters(model: nn.Module, skip_prefixes: tuple[str, ...] = ()) -> int:
    """Number of parameters (whole, also when ZeRO-3 has partitioned them)."""
    return sum(getattr(p, "ds_numel", p.numel()) for n, p in model.named_parameters()
               if not n.startswith(skip_prefixes))


def _broadcast_token() -> str:
    box = [uuid.uuid4().hex]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class Engine:
    """One model under DeepSpeed. ``step(batch)`` runs one micro-batch (forward,
    backward, and the optimizer step on the last micro-batch of an accumulation
    window); ``boundary`` says whether that call stepped the optimizer.

    ``model(batch)`` must return an object with a scalar ``loss``.
    """

    def __init__(self, model: nn.Module, optim: OptimConfig, ds_config: dict[str, Any]):
        if not torch.cuda.is_available():
            disable_shm_comm()
        self.optim_cfg = optim
        groups = param_groups(model, optim.weight_decay, {DETECTOR_PREFIX: optim.detector_lr_mult})
        for group in groups:  # each group's peak; LambdaLR scales every group's own initial lr
            group["lr"] = optim.lr * group["lr_mult"]
        self._lr_mults = [group["lr_mult"] for group in groups]
        kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
        if optim.optimizer == "sgd":  # VL-BERT's VCR recipe
            optimizer = torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                                        weight_decay=optim.weight_decay)
        elif offload_device(ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # the optimizer ZeRO-Offload requires

            optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
        else:
            optimizer = torch.optim.AdamW(groups, **kwargs)

        def schedule(opt):  # built on DeepSpeed's wrapper of the optimizer
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, optim))

        self._ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
        self.device: torch.device = self._ds.device
        self.boundary = False
        if type(self._ds.checkpoint_engine) is TorchCheckpointEngine:
            self._ds.checkpoint_engine.__class__ = SafeTorchCheckpointEngine  # same state, safe load()

    # ----------------------------------------------------------------- training

    @property
    def module(self) -> nn.Module:
        return self._ds.module

    def step(self, batch) -> Any:
        """Forward, backward and (at the end of an accumulation window) optimizer step."""
        batch = batch.to(self.device, non_blocking=True)
        output = self._ds(batch)
        self.boundary = self._ds.is_gradient_accumulation_boundary()
        self._ds.backward(output.loss)
        self._ds.step()
        return output

    @torch.no_grad()
    def evaluate(self, batch) -> Any:
        """Forward only (call inside ``eval_mode()``)."""
        return self._ds(batch.to(self.device, non_blocking=True))

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        self._ds.eval()
        try:
            yield
        finally:
            self._ds.train()

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers (they keep the model alive otherwise)."""
        self._ds.destroy()

    # ----------------------------------------------------------------- state

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (including those skipped for fp16 overflow)."""
        return int(self._ds.global_steps)

    @property
    def skipped_steps(self) -> int:
        return int(self._ds.skipped_steps)

    @property
    def lr(self) -> float:
        """The learning rate of the next step in group 0 (the encoder's)."""
        return float(self._ds.get_lr()[0])

    @property
    def group_lrs(self) -> list[float]:
        """The learning rate of the next step in every parameter group (see ``param_groups``)."""
        return [float(group["lr"]) for group in self.scheduler.optimizer.param_groups]

    @property
    def grad_norm(self) -> Optional[float]:
        """Global gradient norm of the last optimizer step (before clipping), if DeepSpeed measured it."""
        norm = self._ds.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if isinstance(norm, torch.Tensor) else norm)

    @property
    def loss_scale(self) -> float:
        """The fp16 loss scale (1.0 with bf16/fp32)."""
        opt = self._ds.optimizer
        for attr in ("cur_scale", "loss_scale"):
            value = getattr(opt, attr, None)
            if isinstance(value, (int, float, torch.Tensor)):
                return float(value)
        return 1.0

    @property
    def zero_stage(self) -> int:
        return int(self._ds.zero_optimization_stage())

    @property
    def precision(self) -> str:
        return "bf16" if self._ds.bfloat16_enabled() else "fp16" if self._ds.fp16_enabled() else "fp32"

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, whole, as CPU copies (collective under ZeRO-3)."""
        module = self._ds.module
        gather = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                  if self.zero_stage == 3 else contextlib.nullcontext())
        with gather:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def save_state(self, directory: str) -> None:
        """DeepSpeed's checkpoint under ``directory/ds`` (collective: every rank writes its part),
        with the frozen parameters and buffers whole in ``ds/{FROZEN_FILE}`` (rank 0)."""
        from safetensors.torch import save_file

        self._ds.save_checkpoint(directory, tag="ds", client_state={}, save_latest=False)
        frozen = self._frozen_state()  # every rank takes part in the gather
        if torch.distributed.get_rank() == 0:
            save_file(frozen, os.path.join(directory, "ds", FROZEN_FILE))

    def _frozen_state(self) -> dict[str, torch.Tensor]:
        """What a universal checkpoint does not restore: the parameters without gradients and the
        buffers (BatchNorm statistics), whole, as CPU copies (collective under ZeRO-3)."""
        module, names = self._ds.module, set(self._frozen_state_names())
        frozen = [p for p in module.parameters() if not p.requires_grad]
        gather = (deepspeed.zero.GatheredParameters(frozen, modifier_rank=None)
                  if self.zero_stage == 3 and frozen else contextlib.nullcontext())
        with gather:
            return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items() if k in names}

    def _load_frozen_state(self, directory: str) -> None:
        """Restore what ``_frozen_state`` saved (after a universal load; collective under ZeRO-3)."""
        from safetensors.torch import load_file

        path = os.path.join(directory, "ds", FROZEN_FILE)
        module = self._ds.module
        expected = set(self._frozen_state_names())
        if not os.path.exists(path):
            if expected:
                raise RuntimeError(f"{path} is missing: this checkpoint predates elastic resume and its frozen "
                                   "parameters and buffers can only be restored on the world size that wrote it")
            return
        saved = load_file(path)
        if set(saved) != expected:
            missing, unexpected = sorted(expected - set(saved))[:5], sorted(set(saved) - expected)[:5]
            raise RuntimeError(f"{path}: the frozen parameters and buffers differ from this model's "
                               f"(missing {missing}, unexpected {unexpected})")
        frozen = [p for p in module.parameters() if not p.requires_grad]
        gather = (deepspeed.zero.GatheredParameters(frozen, modifier_rank=0)
                  if self.zero_stage == 3 and frozen else contextlib.nullcontext())
        with gather, torch.no_grad():
            module.load_state_dict(saved, strict=False)

    def _frozen_state_names(self) -> list[str]:
        module = self._ds.module
        trainable = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
        return [k for k in module.state_dict() if k not in trainable]

    def load_state(self, directory: str, resharded: bool = False) -> None:
        """Restore what ``save_state`` wrote (collective). Never unpickles arbitrary objects.

        ``resharded``: the checkpoint was written by another number of ranks; it is
        converted to a universal checkpoint (once per node, in a temporary folder) and
        cut into this world's ZeRO partitions. Every rank must pass the same value."""
        if not isinstance(self._ds.checkpoint_engine, SafeTorchCheckpointEngine):
            raise RuntimeError(
                f"DeepSpeed checkpoint engine {type(self._ds.checkpoint_engine).__name__} loads with "
                "weights_only=False; only the default torch checkpoint engine is supported")
        if not resharded or (self.zero_stage == 0 and self.precision != "bf16"):
            # Without ZeRO every rank holds the whole optimizer state: any world size loads it
            # (bf16 without ZeRO uses DeepSpeed's BF16_Optimizer, which partitions like ZeRO-1).
            self._load(directory)
            return
        token = _broadcast_token()
        universal = os.path.join(tempfile.gettempdir(), f"vlbert-universal-{token}")
        local_leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
        try:
            error = None
            if local_leader:
                try:
                    convert_to_universal(os.path.join(directory, "ds"), os.path.join(universal, "ds"))
                except Exception as e:  # every rank must leave the barrier below, then fail together
                    error = f"{type(e).__name__}: {e}"
            errors = [e for e in _all_gather(error) if e]
            if errors:
                raise RuntimeError(f"converting {directory}/ds to a universal checkpoint failed: {errors[0]}")
            self._ds._config.load_universal_checkpoint = True
            try:
                with weights_only_torch_load():
                    self._load(universal)
            finally:
                self._ds._config.load_universal_checkpoint = False
            self._load_frozen_state(directory)
        finally:
            torch.distributed.barrier()
            if local_leader:
                shutil.rmtree(universal, ignore_errors=True)

    def _load(self, directory: str) -> None:
        path, _ = self._ds.load_checkpoint(directory, tag="ds", load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}/ds")
        self._apply_schedule()

    def full_optimizer_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter name, the whole fp32 master weight and Adam moments as CPU copies:
        ``{name: {"fp32": t, "exp_avg": t, "exp_avg_sq": t}}``, each shaped like the
        parameter, whatever the ZeRO partitioning (collective under ZeRO-3). Parameters the
        optimizer has no state for yet (no step taken) give only ``fp32``."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        out: dict[str, dict[str, torch.Tensor]] = {}
        inner = self._ds.optimizer
        if getattr(inner, "_hp_optimizer_states_linked", None) is not None:
            # ZeRO 1/2 link each parameter to its Adam moments after the first step of the
            # first parameter group only, when the other groups have no moments yet
            # (DeepSpeed 0.19): link them again now that every group has them.
            inner._hp_optimizer_states_linked = False
            inner._lazy_init_hp_params_optimizer_state()
        for name, p in self._ds.module.named_parameters():
            if not p.requires_grad:
                continue
            entry: dict[str, torch.Tensor] = {}
            if self.zero_stage == 0 and not hasattr(p, "_hp_mapping"):  # torch's own optimizer
                entry["fp32"] = p.detach().float().cpu().clone()
                for key, value in getattr(inner, "state", {}).get(p, {}).items():
                    if key in ("exp_avg", "exp_avg_sq"):
                        entry[key] = value.detach().float().cpu().clone()
            else:
                entry["fp32"] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    value = safe_get_full_optimizer_state(p, key)
                    if value is not None:
                        entry[key] = value.detach().float().cpu().clone()
            out[name] = entry
        return out

    def _apply_schedule(self) -> None:
        """Set the learning rate of the restored step from *our* schedule: the
        checkpoint gives the position, the config (peak lr, detector multiplier,
        warmup, decay and total steps) the shape, so a resumed run may change them."""
        sched, o = self.scheduler, self.optim_cfg
        groups = sched.optimizer.param_groups
        if len(groups) != len(self._lr_mults):
            raise RuntimeError(f"the checkpoint's optimizer has {len(groups)} parameter groups, "
                               f"this model {len(self._lr_mults)}")
        factor = lr_factor(sched.last_epoch, o)
        sched.base_lrs = [o.lr * mult for mult in self._lr_mults]
        for group, base, mult in zip(groups, sched.base_lrs, self._lr_mults):
            group["lr"], group["initial_lr"], group["lr_mult"] = base * factor, base, mult
        sched._last_lr = [group["lr"] for group in groups]
