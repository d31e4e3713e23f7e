"""Which rank and worker reads which canonical data partition (vlbert/data/partitions.py), on
hand-worked layouts. Only the partitions module is imported, so the file runs in a second
(mutation testing runs it once per mutant: docs/development.md, "Mutation testing")."""

from __future__ import annotations

import pytest

from vlbert.data.partitions import LayoutError, assignment, read_rates

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
