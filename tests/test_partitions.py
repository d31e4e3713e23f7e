"""Which rank and worker reads which canonical data partition (vlbert/data/partitions.py), on
hand-worked layouts. Only the partitions module is imported, so the file runs in a second
(mutation testing runs it once per mutant: docs/development.md, "Mutation testing")."""

from __future__ import annotations

import pytest

from vlbert.config import ConfigError
from vlbert.data.partitions import LayoutError, assignment, default_partitions, rank_partitions, read_rates, \
    worker_partitions

pytestmark = pytest.mark.timeout(60)


def test_assignment_keeps_the_first_layout_and_balances_others():
    # The first layout (P = ranks x workers): rank r, worker w reads partition r * n + w.
    assert [assignment(8, 2, r, 4) for r in range(2)] == [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]
    # Fewer ranks: contiguous blocks, workers round-robin over them.
    assert assignment(4, 1, 0, 3) == [[0, 3], [1], [2]]
    assert [assignment(4, 3, r, 1) for r in range(3)] == [[[0]], [[1]], [[2, 3]]]
    # More workers than partitions on a rank: one worker per partition; no workers: one in process.
    assert assignment(4, 2, 1, 8) == [[2], [3]] and assignment(4, 2, 0, 0) == [[0, 1]]
    every = sorted(p for r in range(3) for w in assignment(7, 3, r, 2) for p in w)
    assert every == list(range(7))
    assert read_rates(4, 2, 2) == {p: 0.5 for p in range(4)}
    assert read_rates(4, 1, 3) == {0: 1 / 6, 3: 1 / 6, 1: 1 / 3, 2: 1 / 3}
    with pytest.raises(LayoutError, match="split into 4 partition.*5 ranks cannot each read one.*at most 4 ranks"):
        assignment(4, 5, 0, 1)


def test_as_many_partitions_as_ranks_gives_one_each():
    """P == W is a valid layout: rank r reads partition r alone. Fails if P == W were refused
    (``<=`` for ``<``) or the blocks were cut elsewhere."""
    assert [rank_partitions(3, 3, r) for r in range(3)] == [[0], [1], [2]]
    assert [rank_partitions(5, 2, r) for r in range(2)] == [[0, 1], [2, 3, 4]]  # floor(r * 5 / 2)


def test_a_rank_outside_the_world_is_an_error():
    """Ranks are 0 .. W - 1. Fails if rank W or -1 were accepted, rank 0 or W - 1 refused, or the
    message lost its words."""
    assert rank_partitions(4, 2, 0) == [0, 1] and rank_partitions(4, 2, 1) == [2, 3]
    for rank in (2, -1):
        with pytest.raises(ValueError) as e:
            rank_partitions(4, 2, rank)
        assert str(e.value) == f"rank {rank} out of range for world size 2"


def test_too_few_partitions_names_the_setting():
    """The whole message of the layout error: the partitions, the ranks, what to do. Fails if a word
    of it changed."""
    with pytest.raises(LayoutError) as e:
        rank_partitions(2, 3, 0)
    assert str(e.value) == (
        "the run's data is split into 2 partition(s) (data.partitions, fixed at the run's start); 3 ranks "
        "cannot each read one: resume on at most 2 ranks, or start a run with a larger data.partitions")
    assert issubclass(LayoutError, ConfigError)  # reported as a configuration error


def test_workers_round_robin_and_a_rank_without_partitions():
    """Worker w takes the block's w-th, w+n-th, ... partitions; 0 workers is one (in process), more
    workers than partitions is one per partition; no partitions is an error. Fails if the worker
    count were floored at 2, not capped at the partitions, or the empty case passed."""
    assert worker_partitions([4, 5, 6, 7, 8], 2) == [[4, 6, 8], [5, 7]]
    assert worker_partitions([4, 5], 0) == [[4, 5]] and worker_partitions([4, 5], 1) == [[4, 5]]
    assert worker_partitions([4, 5], 5) == [[4], [5]]
    with pytest.raises(LayoutError) as e:
        worker_partitions([], 2)
    assert str(e.value) == "a rank needs at least one data partition"


def test_default_partitions_is_one_per_slot():
    """``data.partitions`` 0 means ranks x workers of the first attempt, a rank without worker
    processes counting as one slot. Fails if the product or the floor at one changed."""
    assert default_partitions(2, 4) == 8 and default_partitions(3, 1) == 3
    assert default_partitions(3, 0) == 3 and default_partitions(1, 0) == 1


def test_read_rates_of_an_uneven_layout():
    """5 partitions on 2 ranks x 2 workers: rank 0 reads [0, 1] (one worker each: rate 1/2), rank 1
    reads [2, 3, 4] as workers [2, 4] and [3]: 2 and 4 at 1/(2 x 2), 3 at 1/2. Fails if a rate's
    numerator or either factor of its denominator changed."""
    assert read_rates(5, 2, 2) == {0: 0.5, 1: 0.5, 2: 0.25, 4: 0.25, 3: 0.5}
