"""Resumable epoch sampling for map-style fine-tuning sets.

Each epoch the example indices are permuted from ``(seed, epoch)``; rank r
takes positions r, r + world, ... and cuts them into micro-batches (the tail
that does not fill a micro-batch on every rank is dropped, so all ranks run
the same number of steps). The order is a function of the micro-batch
number alone, so the only state is how many micro-batches the trainer has
*consumed* (a data loader prefetches ahead; its sampler position is not the
trainer's): a run resumed from that count sees exactly the batches it would have.

Items are ``(index, epoch)`` pairs, so that a dataset can seed per-example
randomness (flips) from them whatever the worker layout.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import numpy as np
import torch

from vlbert.data.captions import BadSample

log = logging.getLogger(__name__)


class EpochBatchSampler:
    """Endless micro-batches of ``(index, epoch)`` for one rank (a ``batch_sampler``)."""

    def __init__(self, num_examples: int, micro_batch: int, rank: int, world_size: int, seed: int):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.batches_per_epoch = num_examples // world_size // micro_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_examples} examples do not fill one micro-batch of {micro_batch} "
                             f"on each of {world_size} ranks")
        self.num_examples, self.micro_batch = num_examples, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start = 0  # global micro-batch number to start from

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch]).permutation(self.num_examples)
        mine = order[self.rank::self.world_size][: self.batches_per_epoch * self.micro_batch]
        return [mine[i:i + self.micro_batch].tolist() for i in range(0, len(mine), self.micro_batch)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = divmod(self.start, self.batches_per_epoch)
        while True:
            for b in self.epoch_batches(epoch)[batch:]:
                yield [(i, epoch) for i in b]
            epoch, batch = epoch + 1, 0

    def resume_from(self, consumed: int) -> None:
        """Start at micro-batch number ``consumed`` (call before iterating)."""
        self.start = int(consumed)


def eval_batches(num_examples: int, batch_size: int, rank: int, world_size: int) -> list[list[tuple[int, int]]]:
    """Every example once, in order, rank r taking r, r + world, ...; no flips (epoch -1)."""
    mine = list(range(rank, num_examples, world_size))
    return [[(i, -1) for i in mine[j:j + batch_size]] for j in range(0, len(mine), batch_size)]


def flips(seed: int, epoch: int, index: int, prob: float) -> bool:
    """Whether example ``index`` is flipped in ``epoch`` (a draw owned by the example, so the
    same whatever the worker layout); never for ``epoch`` < 0 (evaluation) or ``prob`` 0."""
    if epoch < 0 or prob <= 0:
        return False
    return bool(np.random.default_rng([seed & 0xFFFFFFFF, epoch, index]).random() < prob)


class ItemBatchDataset(torch.utils.data.Dataset):
    """A task dataset whose items are lists of ``(index, epoch)`` pairs (``EpochBatchSampler``;
    epoch -1 = evaluation). Subclasses give ``sample(index, epoch)`` (raising ``BadSample`` for an
    item it cannot read) and ``collate(samples)``; a list becomes ``(batch or None, skips by
    reason)``."""

    def sample(self, index: int, epoch: int):
        raise NotImplementedError

    def collate(self, samples: list):
        raise NotImplementedError

    def get_batch(self, items: list[tuple[int, int]]) -> tuple[Optional[object], dict[str, int]]:
        samples, skipped = [], {}
        for index, epoch in items:
            try:
                samples.append(self.sample(index, epoch))
            except BadSample as e:
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                log.debug("%s item %d skipped: %s", type(self).__name__, index, e)
        return (self.collate(samples) if samples else None), skipped

    def __getitem__(self, items: list[tuple[int, int]]):
        return self.get_batch(items)
