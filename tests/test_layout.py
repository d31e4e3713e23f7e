"""An attempt's layout (vlbert/train/layout.py): the global batch kept on another world size by
adapting the accumulation, and the refusals with the world sizes that work."""

from __future__ import annotations

import pytest

from vlbert.config import ConfigError, DataConfig, OptimConfig
from vlbert.train.layout import describe, plan_layout, world_sizes_that_keep

pytestmark = pytest.mark.timeout(30)


def data(captions=6, text=6, workers=2, partitions=0):
    return DataConfig(captions_per_step=captions, text_per_step=text, num_workers=workers, partitions=partitions)


def test_a_fresh_run_takes_the_config_and_fixes_the_partitions():
    layout = plan_layout(data(), OptimConfig(grad_accum=1), 2)
    assert (layout.grad_accum, layout.captions, layout.text, layout.partitions) == (1, 3, 3, 4)
    assert plan_layout(data(partitions=12), OptimConfig(), 2).partitions == 12
    assert describe(layout.to_dict()) == "2 rank(s) x 2 worker(s), grad_accum 1, micro-batch 3+3"


def test_another_world_size_adapts_the_accumulation_to_keep_the_global_batch():
    saved = plan_layout(data(), OptimConfig(), 2).to_dict()
    one = plan_layout(data(workers=3), OptimConfig(), 1, saved)  # half the ranks: accumulation doubled
    assert (one.grad_accum, one.captions, one.text, one.partitions, one.num_workers) == (2, 3, 3, 4, 3)
    assert one.changed_from(saved) and not plan_layout(data(), OptimConfig(), 2, saved).changed_from(saved)
    three = plan_layout(data(workers=1), OptimConfig(), 3, one.to_dict())  # a smaller micro-batch fits too
    assert (three.grad_accum, three.captions, three.text) == (1, 2, 2)
    # Back on the saved world size the config's accumulation applies as written.
    again = plan_layout(data(), OptimConfig(grad_accum=3), 2, one.to_dict() | {"world_size": 2})
    assert (again.grad_accum, again.captions, again.text) == (3, 1, 1)
    # The budget is the saved micro-batch: 16 + 16 on 2 ranks x accumulation 4 is 4 + 4 a rank.
    big = data(captions=32, text=32, workers=0, partitions=8)
    saved = plan_layout(big, OptimConfig(grad_accum=4), 2).to_dict()
    assert plan_layout(big, OptimConfig(grad_accum=4), 1, saved).grad_accum == 8
    assert plan_layout(big, OptimConfig(grad_accum=4), 8, saved).grad_accum == 1


def test_a_world_size_that_cannot_keep_the_batch_is_refused_with_the_sizes_that_work():
    saved = plan_layout(data(), OptimConfig(), 2).to_dict()
    assert world_sizes_that_keep(6, 6, 4) == [1, 2, 3]
    assert world_sizes_that_keep(128, 128, 64) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ConfigError, match=r"world size 4 cannot keep this run's global batch of 6 captions \+ 6 "
                                          r"text segments per step over its 4 data partitions.*"
                                          r"World sizes that work: 1, 2, 3$"):
        plan_layout(data(), OptimConfig(), 4, saved)
    with pytest.raises(ConfigError, match="World sizes that work: 1, 2, 4$"):  # 8 ranks: more than the partitions
        plan_layout(data(captions=8, text=8), OptimConfig(), 8, plan_layout(data(8, 8), OptimConfig(), 2).to_dict())
    with pytest.raises(ConfigError, match=r"the global batch is part of the run: it was started with 6 captions \+ "
                                          r"6 text segments per step, the config now says 4 \+ 6"):
        plan_layout(data(captions=4), OptimConfig(), 2, saved)
    with pytest.raises(ConfigError, match="data.partitions = 8, but the run was started with 4 partitions"):
        plan_layout(data(partitions=8), OptimConfig(), 2, saved)


def test_a_checkpoint_that_recorded_only_ranks_and_workers_still_resumes_elsewhere():
    old = {"world_size": 2, "num_workers": 2}  # before layouts were recorded
    layout = plan_layout(data(), OptimConfig(), 1, old)
    assert (layout.partitions, layout.grad_accum, layout.captions) == (4, 2, 3)
    assert describe(old) == "2 rank(s) x 2 worker(s), grad_accum ?, micro-batch ?+?"
