"""Training metrics: per-task means over micro-batches and ranks, throughput, MFU, memory.

MFU (model FLOPs utilisation) = achieved FLOP/s / (peak FLOP/s x GPUs), with
the usual estimate of 6 x N x tokens FLOPs per training step (forward 2N,
backward 4N per token, attention's extra term left out), N = parameters of
the encoder and heads, tokens = every sequence element (words, RoIs). The
detector's convolutions are not counted, so MFU is a lower bound. Peaks are
dense bf16/fp16 tensor-core figures from the vendors' data sheets; unknown
devices (and CPUs) get no MFU.
"""

from __future__ import annotations

import re
import resource
from typing import Any, Iterable, Optional

import torch

from vlbert.train import dist

# (substring of torch.cuda.get_device_name(), dense bf16/fp16 FLOP/s); first match wins.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),
)


def peak_flops(device_name: str) -> Optional[float]:
    for key, flops in PEAK_FLOPS:
        if key in device_name:
            return flops
    return None


def batch_counts(batch) -> tuple[int, int, int]:
    """(samples, sequence elements, images) of a PretrainBatch, counted on the host."""
    samples = tokens = images = 0
    if batch.captions is not None:
        c = batch.captions
        samples += len(c)
        images += len(c)
        tokens += int(c.attention_mask.sum()) + int(c.box_mask.sum())
    if batch.text is not None:
        samples += len(batch.text)
        tokens += int(batch.text.attention_mask.sum())
    return samples, tokens, images


def _scalars(output: Any) -> dict[str, torch.Tensor]:
    if hasattr(output, "metrics"):
        return output.metrics()
    return {"loss": output.loss.detach()}


class Meter:
    """Sums of a model output's scalars between two ``reduce`` calls.

    ``X_loss``/``X_acc`` are weighted by ``X_count`` when the output has one
    (a mean over masked tokens), so the reduced value is the mean over all
    masked tokens of the interval on all ranks; other values are plain means
    over micro-batches. Sums stay on the device until ``reduce``.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.samples = self.tokens = self.images = 0

    def add(self, output: Any, batch) -> None:
        values = _scalars(output)
        for key, v in values.items():
            if key.endswith("_count"):
                continue
            w = values.get(key.rsplit("_", 1)[0] + "_count")
            w = w.float() if w is not None else torch.ones((), device=v.device)
            self._acc(key, v.float() * w)
            self._acc(key + "#w", w)
        self.micro_batches += 1
        s, t, i = batch_counts(batch)
        self.samples += s
        self.tokens += t
        self.images += i

    def _acc(self, key: str, v: torch.Tensor) -> None:
        self.sums[key] = self.sums[key] + v.detach() if key in self.sums else v.detach().clone()

    def reduce(self) -> tuple[dict[str, float], dict[str, int]]:
        """(means over ranks, global counts: samples, tokens, images); collective; resets."""
        keys = sorted(self.sums)
        local = [float(x) for x in torch.stack([self.sums[k] for k in keys]).cpu().tolist()] if keys else []
        totals = dist.all_sum(local + [self.samples, self.tokens, self.images])
        sums = dict(zip(keys, totals[:len(keys)]))
        # A task absent from the whole interval (no masked tokens anywhere) is left out, not reported as 0.
        means = {k: sums[k] / sums[k + "#w"] for k in keys if not k.endswith("#w") and sums[k + "#w"] > 0}
        counts = {"samples": int(totals[-3]), "tokens": int(totals[-2]), "images": int(totals[-1])}
        self.__init__()
        return means, counts


def memory_metrics() -> dict[str, float]:
    """Peak memory of this process: GPU allocator peak, or host RSS peak on CPU."""
    if torch.cuda.is_available():
        return {"peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def metric_name(key: str) -> str:
    """A name MLflow accepts: letters, digits, ``_ - . / space``; anything else becomes ``_``."""
    return re.sub(r"[^\w.\- /]", "_", key)


def total_skips(per_rank: Iterable[dict[str, int]]) -> dict[str, int]:
    """Skip counts by reason, summed over ranks."""
    out: dict[str, int] = {}
    for counts in per_rank:
        for reason, n in counts.items():
            out[reason] = out.get(reason, 0) + n
    return dict(sorted(out.items()))


def mfu(flops_params: int, tokens_per_s: float, peak: Optional[float], world: int) -> Optional[float]:
    """Model FLOPs utilisation (module docstring); None without a known peak."""
    return 6 * flops_params * tokens_per_s / (peak * world) if peak else None


def interval_metrics(means: dict[str, float], counts: dict[str, int], seconds: float, steps: int,
                     extra: dict[str, float], skips: dict[str, int], flops_params: int, peak: Optional[float],
                     world: int) -> dict[str, float]:
    """The metrics logged once per interval: the task means, throughput, MFU, memory,
    ``extra`` (lr, counters, engine figures) and ``data_skips/<reason>``."""
    seconds = max(seconds, 1e-9)
    metrics = {**means, **extra, "samples_per_s": counts["samples"] / seconds,
               "tokens_per_s": counts["tokens"] / seconds, "images_per_s": counts["images"] / seconds,
               "step_time_s": seconds / max(steps, 1), **memory_metrics()}
    value = mfu(flops_params, metrics["tokens_per_s"], peak, world)
    if value is not None:
        metrics["mfu"] = value
    metrics.update({"data_skips/" + metric_name(k): v for k, v in skips.items()})
    return metrics
