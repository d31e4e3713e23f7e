"""Data position independent of the layout (vlbert/data/partitions.py, mixture.py): canonical
partitions keep their cursors when a run resumes on other ranks or workers, with another
micro-batch; every sample is consumed once, in each partition's own order. Which rank and worker
reads which partition: tests/test_partitions.py."""

from __future__ import annotations

import json

import pytest
from test_mixture import assert_batches_equal, make_data, take, tokenizer  # noqa: F401 (fixture)

from elastic_audit import assert_exactly_once
from vlbert.config import MaskingConfig
from vlbert.data.mixture import build_pretrain_stream

pytestmark = pytest.mark.timeout(300)


def _phase(cfg, tok, world, workers, captions, text, batches_per_rank, saved):
    """Run ``world`` ranks from ``saved`` (every rank's state, or None); returns the consumed
    ``(partition, caption keys, text keys)`` and every rank's state."""
    cfg.num_workers = workers
    consumed, states = [], []
    for rank in range(world):
        stream = build_pretrain_stream(cfg, MaskingConfig(), tok, rank, world, captions, text)
        if saved is not None:
            stream.load_state_dicts(saved)
        n = batches_per_rank(rank) if callable(batches_per_rank) else batches_per_rank
        for b in take(stream, n):
            assert len(b.captions) == captions and len(b.text) == text
            consumed.append((b.partition, b.captions.keys, b.text.keys))
        states.append(json.loads(json.dumps(stream.state_dict())))  # through JSON, as the checkpoint does
        stream.close()
    return consumed, states


def test_two_by_two_then_one_by_three_then_three_ranks_consume_every_sample_once(tmp_path, tokenizer):
    """Partitions carried over three layouts: each consumed a gap-free prefix of its order, and the
    partitions split the tar files' captions (read with ``tarfile``) exactly once per epoch.
    Fails if partitions overlap (tried: ``slot_plan`` giving each slot its neighbour's first
    shard too)."""
    cfg = make_data(str(tmp_path))  # 8 caption shards x 6: 4 partitions of 12 captions per epoch
    # 2 ranks x 2 workers, 3 captions + 2 text segments per micro-batch.
    a, states = _phase(cfg, tokenizer, 2, 2, 3, 2, 2, None)
    assert states[0]["partitions"] == 4 and [w["partitions"] for w in states[1]["workers"]] == [[2], [3]]
    # 1 rank x 3 workers (the same micro-batch: accumulation doubled): workers hold {0, 3}, {1}, {2}.
    b, states = _phase(cfg, tokenizer, 1, 3, 3, 2, 6, states)
    assert [p for p, _, _ in b] == [0, 1, 2, 3, 1, 2]
    # 3 ranks x 1 worker with a smaller micro-batch, until every partition is past its first epoch.
    c, states = _phase(cfg, tokenizer, 3, 1, 2, 2, {0: 3, 1: 2, 2: 8}.get, states)
    counts = assert_exactly_once(cfg, tokenizer, 4, a + b + c, full_epoch=True)
    assert counts == {0: 12, 1: 13, 2: 17, 3: 14}  # 1, 2 and 3 into their second epoch
    # And back to the first layout: the partitions go on from where they are.
    d, _ = _phase(cfg, tokenizer, 2, 2, 3, 2, 2, states)
    assert_exactly_once(cfg, tokenizer, 4, a + b + c + d, full_epoch=True)


def test_resume_on_the_same_layout_is_exact_and_fewer_workers_continue_each_partition(tmp_path, tokenizer):
    """Resumes continue each partition exactly; the audit runs before any partition finishes an
    epoch, yet still fails if partitions overlap (tried: ``slot_plan`` giving each slot its
    neighbour's first shard too; the old audit, whose reference came from the same stream, passed)."""
    cfg = make_data(str(tmp_path), n_caption_shards=4)
    cfg.num_workers = 2
    whole = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, 2, 2)
    first = take(whole, 3)
    state = json.loads(json.dumps(whole.state_dict()))
    rest = take(whole, 4)
    whole.close()
    same = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, 2, 2)
    same.load_state_dict(state)
    assert_batches_equal(take(same, 4), rest)
    same.close()
    cfg.num_workers = 0  # the same two partitions, read in process
    fewer = build_pretrain_stream(cfg, MaskingConfig(), tokenizer, 0, 1, 2, 2)
    fewer.load_state_dict(state)
    more = take(fewer, 4)
    fewer.close()
    assert [b.partition for b in more] == [0, 1, 0, 1]
    batches = [(b.partition, b.captions.keys, b.text.keys) for b in first + more]
    assert_exactly_once(cfg, tokenizer, 2, batches, full_epoch=False)
