"""Canonical data partitions and their assignment to the ranks and workers of an attempt.

A run's sample order is split once, at its start, into ``P`` canonical partitions
(``data.partitions``; 0 = the first attempt's ranks x workers). Partition ``p`` reads
what slot ``p`` of ``P`` reads (``shards.slot_plan``) and keeps its own exact cursor,
so its samples, their order and their randomness never depend on who reads it.

Each attempt hands the partitions to the rank x worker slots it has:

- rank ``r`` of ``W`` takes the contiguous block ``[r*P//W, (r+1)*P//W)``;
- its ``n`` workers take that block round-robin (worker ``w``: the block's ``w``-th,
  ``w+n``-th, ... partitions); a rank with fewer partitions than workers runs one
  worker per partition;
- a worker makes one batch from each of its partitions in turn.

With ``P = W x n`` (the first attempt, or a resume on the same layout) every worker holds
exactly the partition it always had: rank ``r`` worker ``w`` reads partition ``r*n + w``.
Within a partition no sample repeats within an epoch and none is skipped; partitions that
share a worker are read more slowly than those that have one to themselves, so when ``P``
is not a multiple of the new layout's slots their epochs end at different steps.
"""

from __future__ import annotations

from vlbert.config import ConfigError


class LayoutError(ConfigError):
    """A layout (world size, global batch, partitions) that cannot continue the run."""


def rank_partitions(num_partitions: int, world_size: int, rank: int) -> list[int]:
    """The partitions rank ``rank`` of ``world_size`` reads (a contiguous, balanced block)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    if num_partitions < world_size:
        raise LayoutError(
            f"the run's data is split into {num_partitions} partition(s) (data.partitions, fixed at the run's "
            f"start); {world_size} ranks cannot each read one: resume on at most {num_partitions} ranks, or "
            "start a run with a larger data.partitions")
    return list(range(rank * num_partitions // world_size, (rank + 1) * num_partitions // world_size))


def worker_partitions(partitions: list[int], num_workers: int) -> list[list[int]]:
    """The partitions of each logical worker of a rank (``num_workers`` 0 = one, in process)."""
    if not partitions:
        raise LayoutError("a rank needs at least one data partition")
    n = max(1, min(num_workers, len(partitions)))
    return [partitions[w::n] for w in range(n)]


def assignment(num_partitions: int, world_size: int, rank: int, num_workers: int) -> list[list[int]]:
    """``[logical worker] -> [partition, ...]`` of one rank."""
    return worker_partitions(rank_partitions(num_partitions, world_size, rank), num_workers)


def read_rates(num_partitions: int, world_size: int, num_workers: int) -> dict[int, float]:
    """Batches per partition per rank batch: how fast each partition is read on a layout
    (equal everywhere when ``P`` is a multiple of the slots)."""
    rates = {}
    for rank in range(world_size):
        workers = assignment(num_partitions, world_size, rank, num_workers)
        for parts in workers:
            for p in parts:
                rates[p] = 1.0 / (len(workers) * len(parts))
    return rates


def default_partitions(world_size: int, num_workers: int) -> int:
    """``data.partitions`` 0: one partition per slot of the first attempt."""
    return world_size * max(1, num_workers)
