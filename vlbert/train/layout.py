"""An attempt's layout: ranks, loader workers, accumulation and micro-batch, given the run's fixed parts.

What a run fixes at its start and keeps on every resume: the global batch
(``data.captions_per_step`` + ``data.text_per_step``) and the number of canonical
data partitions (``vlbert.data.partitions``). What each attempt may choose: the
world size, ``data.num_workers``, and so the gradient accumulation and each rank's
micro-batch.

On the saved world size (or a fresh run) ``optim.grad_accum`` applies as written.
On another world size the accumulation adapts: the smallest one whose micro-batch
is no larger than the saved attempt's (what fitted in memory), with world size x
accumulation dividing both global counts, because every rank takes the same share
of every micro-batch. A world size for which none exists is refused
(``LayoutError``), naming the world sizes that work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from vlbert.config import DataConfig, OptimConfig
from vlbert.data.partitions import LayoutError, default_partitions
from vlbert.train.ds_config import micro_batch_counts


@dataclass(frozen=True)
class Layout:
    """One attempt's layout; ``captions``/``text``: per micro-batch on each rank."""

    world_size: int
    num_workers: int
    grad_accum: int
    captions: int
    text: int
    partitions: int
    captions_per_step: int
    text_per_step: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return describe(self.to_dict())

    def changed_from(self, saved: dict[str, Any]) -> bool:
        """Whether ranks, workers or accumulation differ from ``saved`` (keys it lacks are not compared)."""
        return any(k in saved and saved[k] != getattr(self, k) for k in ("world_size", "num_workers", "grad_accum"))


def describe(layout: dict[str, Any]) -> str:
    """``2 rank(s) x 2 worker(s), grad_accum 1, micro-batch 4+4`` (older checkpoints record less)."""
    def get(key):
        return layout.get(key, "?")

    return (f"{get('world_size')} rank(s) x {get('num_workers')} worker(s), grad_accum {get('grad_accum')}, "
            f"micro-batch {get('captions')}+{get('text')}")


def world_sizes_that_keep(captions_per_step: int, text_per_step: int, partitions: int) -> list[int]:
    """World sizes that can keep the global batch (and give every rank a partition)."""
    g = math.gcd(captions_per_step, text_per_step)
    return [w for w in range(1, min(g, partitions) + 1) if g % w == 0]


def plan_layout(data: DataConfig, optim: OptimConfig, world_size: int,
                saved: Optional[dict[str, Any]] = None) -> Layout:
    """The layout of this attempt; ``saved``: the layout recorded in the checkpoint it resumes
    from (``TrainState.layout``), None for a fresh run. Raises ``LayoutError`` for a global
    batch or partition count that differs from the run's, or a world size that cannot keep them."""
    c, t = data.captions_per_step, data.text_per_step
    if not saved:
        captions, text = micro_batch_counts(data, optim, world_size)
        partitions = data.partitions or default_partitions(world_size, data.num_workers)
        if partitions < world_size:
            raise LayoutError(f"data.partitions = {partitions} is fewer than the {world_size} ranks: every rank "
                              "reads at least one partition")
        return Layout(world_size, data.num_workers, optim.grad_accum, captions, text, partitions, c, t)

    saved_c, saved_t = saved.get("captions_per_step", c), saved.get("text_per_step", t)
    if (saved_c, saved_t) != (c, t):
        raise LayoutError(
            f"the global batch is part of the run: it was started with {saved_c} captions + {saved_t} text "
            f"segments per step, the config now says {c} + {t} (data.captions_per_step, data.text_per_step); "
            "set them back to resume, or start a new run")
    saved_world = int(saved["world_size"])
    partitions = int(saved.get("partitions") or default_partitions(saved_world, int(saved.get("num_workers", 0))))
    if data.partitions and data.partitions != partitions:
        raise LayoutError(f"data.partitions = {data.partitions}, but the run was started with {partitions} "
                          f"partitions; the number of partitions is fixed at a run's start (set it to 0 or to "
                          f"{partitions})")
    works = world_sizes_that_keep(c, t, partitions)
    if world_size not in works:
        raise LayoutError(
            f"world size {world_size} cannot keep this run's global batch of {c} captions + {t} text segments "
            f"per step over its {partitions} data partitions: every rank takes the same share of every "
            "micro-batch (world size x accumulation must divide both counts) and reads at least one partition. "
            f"World sizes that work: {', '.join(map(str, works))}")
    if world_size == saved_world:
        captions, text = micro_batch_counts(data, optim, world_size)
        return Layout(world_size, data.num_workers, optim.grad_accum, captions, text, partitions, c, t)
    budget = int(saved.get("captions", 0)) + int(saved.get("text", 0))
    if budget <= 0:  # a checkpoint from before layouts were recorded: the config's micro-batch there
        budget = sum(micro_batch_counts(data, optim, saved_world))
    per_rank = math.gcd(c, t) // world_size  # accumulations that divide both counts divide this
    accum = next((a for a in range(1, per_rank + 1)
                  if per_rank % a == 0 and (c + t) // (world_size * a) <= budget), per_rank)
    return Layout(world_size, data.num_workers, accum, c // (world_size * accum), t // (world_size * accum),
                  partitions, c, t)
