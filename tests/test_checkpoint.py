"""Checkpoints (vlbert/train/checkpoint.py): atomic publication on a local disk and on an
object store (fsspec memory://), keep-last pruning, never resuming from a partial
checkpoint, RNG states as JSON, and a DeepSpeed engine round trip through memory://."""

from __future__ import annotations

import json
import logging
import os
import random
import uuid

import fsspec
import numpy as np
import pytest
import torch

from vlbert.train.checkpoint import COMPLETE, CheckpointError, Checkpointer
from vlbert.train.rng import rng_state, set_rng_state

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::FutureWarning")]


class FakeEngine:
    """Stands in for Engine: ``save_state`` writes ``ds/weights.json`` (and optionally dies midway)."""

    def __init__(self, value=0, fail_midway=False):
        self.value, self.fail_midway = value, fail_midway

    def save_state(self, directory):
        os.makedirs(os.path.join(directory, "ds"), exist_ok=True)
        with open(os.path.join(directory, "ds", "weights.json"), "w") as f:
            f.write(json.dumps({"value": self.value}) + " " * 1000)
        if self.fail_midway:
            raise KeyboardInterrupt("killed while writing")  # what a kill mid-save leaves behind
        with open(os.path.join(directory, "ds", "optim.json"), "w") as f:
            json.dump({"value": self.value * 2}, f)

    def load_state(self, directory):
        with open(os.path.join(directory, "ds", "weights.json")) as f:
            self.value = json.loads(f.read())["value"]


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    url = f"memory://ckpt-{uuid.uuid4().hex}"
    yield url
    fsspec.filesystem("memory").rm(url, recursive=True)


def names(ck: Checkpointer) -> list[str]:
    return sorted(os.path.basename(p.rstrip("/")) for p in ck.fs.ls(ck.root, detail=False))


def test_rng_state_is_json_and_restores_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    before = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), np.random.randn(), torch.rand(3).tolist()) == before


def test_save_publishes_atomically_keeps_last_and_loads(root):
    ck = Checkpointer(root, keep_last=2, rank=0, world_size=1)
    for step in (10, 20, 30):
        url = ck.save(FakeEngine(step), step, {"samples_seen": step * 4, "mlflow_run_id": "abc"},
                      {"data": {"cursor": step}, "rng": {"x": 1}})
        assert url.endswith(f"step-0000{step}")
    assert names(ck) == ["latest", "step-000020", "step-000030"]
    with ck.fs.open(f"{ck.root}/latest") as f:
        assert f.read().decode().strip() == "step-000030"
    manifest = json.loads(ck.fs.cat_file(f"{ck.root}/step-000030/{COMPLETE}"))
    assert set(manifest["files"]) == {"ds/weights.json", "ds/optim.json", "rank-00000.json", "meta.json"}

    engine = FakeEngine()
    loaded = ck.load_latest(engine)
    assert loaded.info.step == 30 and engine.value == 30
    assert loaded.meta["samples_seen"] == 120 and loaded.meta["mlflow_run_id"] == "abc"
    assert loaded.rank_state == {"data": {"cursor": 30}, "rng": {"x": 1}}


def test_checkpoint_cut_off_mid_write_is_never_chosen(root, caplog):
    ck = Checkpointer(root, keep_last=5, rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {})
    with pytest.raises(KeyboardInterrupt):
        ck.save(FakeEngine(2, fail_midway=True), 2, {}, {})
    if not ck.local:  # an upload that died after some files: the step folder exists, without COMPLETE
        real_put, uploaded = ck.fs.put_file, []

        def put_then_die(src, dst, **kw):
            if len(uploaded) == 2:
                raise ConnectionError("upload cut off")
            uploaded.append(dst)
            return real_put(src, dst, **kw)

        ck.fs.put_file = put_then_die
        with pytest.raises(ConnectionError):
            ck.save(FakeEngine(3), 3, {}, {})
        ck.fs.put_file = real_put
        assert all(ck.fs.exists(p) for p in uploaded) and "step-000003" in uploaded[0]
    # A folder with a COMPLETE whose files do not match (a truncated file), pointed to by latest.
    ck.save(FakeEngine(4), 4, {}, {})
    with ck.fs.open(f"{ck.root}/step-000004/ds/weights.json", "wb") as f:
        f.write(b"{")
    with ck.fs.open(f"{ck.root}/latest", "wb") as f:
        f.write(b"step-000004\n")

    engine = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="vlbert.train.checkpoint"):
        loaded = ck.load_latest(engine)
    assert loaded.info.step == 1 and engine.value == 1
    assert "step-000004: ds/weights.json has 1 bytes" in caplog.text and "latest names step-000004" in caplog.text
    assert [c.step for c in ck.complete()] == [1, 4]  # 2 and 3 never count

    # The next save at a step that was cut off replaces the leftover and publishes normally.
    ck.save(FakeEngine(2), 2, {}, {})
    assert ck.find_latest().step == 2  # 4 is still corrupt


def test_resume_with_a_different_world_size_is_refused(tmp_path):
    Checkpointer(str(tmp_path), rank=0, world_size=1).save(FakeEngine(1), 5, {}, {})
    with pytest.raises(CheckpointError, match="written by 1 ranks; this run has 2"):
        Checkpointer(str(tmp_path), rank=0, world_size=2).load_latest(FakeEngine())


def test_no_checkpoint_gives_none(tmp_path):
    assert Checkpointer(str(tmp_path / "none"), rank=0, world_size=1).load_latest(FakeEngine()) is None


def test_deepspeed_engine_round_trip_through_an_object_store():
    from test_engine import fixed_batch, make_engine

    from vlbert.train.engine import init_distributed

    init_distributed()
    url = f"memory://ds-{uuid.uuid4().hex}"
    a = make_engine(stage=2)
    for _ in range(2):
        a.step(fixed_batch())
    ck = Checkpointer(url, keep_last=1)
    ck.save(a, 2, {"samples_seen": 16}, {"tokens_local": 7})
    b = make_engine(stage=2, seed=5)
    loaded = ck.load_latest(b)
    assert loaded.rank_state == {"tokens_local": 7} and b.global_step == 2
    sa, sb = a.full_state_dict(), b.full_state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.step(fixed_batch()).loss.item() == b.step(fixed_batch()).loss.item()
    fsspec.filesystem("memory").rm(url, recursive=True)
