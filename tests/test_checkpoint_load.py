"""Loading checkpoints (vlbert/train/checkpoint.py) in exact terms: what ``verify``, ``peek_latest``
and ``load`` refuse when a checkpoint changed after it was chosen or carries a crafted
``meta.json``, a load across a change of world size, the download of an object store's ``ds/``
files, what a rank other than 0 does, and every log line and error word for word. Helpers:
tests/test_checkpoint_layout.py; the local/memory ``root`` fixture: tests/test_checkpoint.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid

import pytest

from test_checkpoint import FakeEngine, root  # noqa: F401 (root: the local/memory fixture)
from test_checkpoint_layout import LOGGER, messages
from vlbert.train.checkpoint import CheckpointError, Checkpointer
from vlbert.train.manifest import ManifestError

pytestmark = [pytest.mark.timeout(120)]


class ReshardEngine(FakeEngine):
    """Records the ``resharded`` flag it is loaded with; its saves also write a second rank's
    file into the folder, as rank 1 of a two-rank job would."""

    def save_state(self, directory):
        super().save_state(directory)
        with open(os.path.join(directory, "rank-00001.json"), "w") as f:
            json.dump({"cursor": "rank one"}, f)

    def load_state(self, directory, resharded=False):
        super().load_state(directory)
        self.resharded = resharded


def test_a_rank_file_changed_after_the_checks_is_refused_by_load(root):
    """``load`` reads each rank file once more against the manifest (it may have changed since
    ``peek_latest`` verified it): longer, shorter, gone, or not an object. Fails if a message
    changes or a file is read past its manifest size."""
    ck = Checkpointer(root, rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {"cursor": 1})
    info, meta = ck.peek_latest()
    path = f"{info.path}/rank-00000.json"
    good = ck.fs.cat_file(path)
    assert good == b'{"cursor": 1}'
    for data, message in ((good + b" ", "rank-00000.json is over 13 bytes"),
                          (good[:-1], "rank-00000.json has 12 bytes, the manifest says 13"),
                          (None, "rank-00000.json is missing"),
                          (b'["cursor", 1]', "rank-00000.json does not match its sha256 in the manifest")):
        if data is None:
            ck.fs.rm(path)
        else:
            ck.fs.pipe_file(path, data)
        with pytest.raises(CheckpointError) as e:
            ck.load(FakeEngine(), info, meta)
        assert str(e.value) == f"{info.url}: {message}"
    # A list, listed with its own size and hash: read, then refused as not an object.
    data = b'["cursor", 1]'
    marker = json.loads(ck.fs.cat_file(f"{info.path}/COMPLETE"))
    marker["files"]["rank-00000.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ck.fs.pipe_file(f"{info.path}/COMPLETE", json.dumps(marker).encode())
    with pytest.raises(CheckpointError) as e:
        ck.load(FakeEngine(), info, meta)
    assert str(e.value) == f"{info.url}: rank-00000.json is not a JSON object"
    with pytest.raises(CheckpointError) as e:  # load's own default refuses another world size too
        ck.load(FakeEngine(), info, {**meta, "world_size": 2})
    assert str(e.value) == (f"{info.url} was written by 2 ranks; this run has 1. The data pipeline state is "
                            "per rank: resume with the same number of ranks")


def test_resharded_load_reads_every_saved_ranks_file(root, caplog):
    """A checkpoint of two ranks loaded by one with ``allow_reshard``: the engine is told it is
    resharded, ``rank_state`` is None and ``rank_states`` holds both files in rank order; the
    log names both world sizes. The same world size: not resharded, ``rank_states`` is
    ``[rank_state]``. Fails if the flag, the list or the message changes."""
    two = Checkpointer(root, rank=0, world_size=2)
    two.save(ReshardEngine(5), 5, {}, {"cursor": "rank zero"})
    engine = ReshardEngine()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = Checkpointer(root, rank=0, world_size=1).load_latest(engine, allow_reshard=True)
    assert engine.value == 5 and engine.resharded is True
    assert loaded.resharded and loaded.rank_state is None
    assert loaded.rank_states == [{"cursor": "rank zero"}, {"cursor": "rank one"}]
    url = two.fs.unstrip_protocol(f"{two.root}/step-000005")
    assert messages(caplog, logging.INFO) == [f"resuming from {url} (step 5, written by 2 ranks, now 1)"]

    caplog.clear()
    engine = ReshardEngine()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = Checkpointer(root, rank=0, world_size=2).load_latest(engine)
    assert engine.resharded is False and not loaded.resharded
    assert loaded.rank_states == [loaded.rank_state] == [{"cursor": "rank zero"}]
    assert messages(caplog, logging.INFO) == [f"resuming from {url} (step 5)"]


def test_download_takes_the_ds_files_in_any_manifest_order():
    """On an object store only the manifest's ``ds/`` files are fetched, whatever order the
    manifest lists them in (here meta.json and the rank file first). Fails if the walk stops at
    the first file that is not under ``ds/`` (``continue`` as ``break``)."""
    ck = Checkpointer(f"memory://layout-{uuid.uuid4().hex}", rank=0, world_size=1)
    try:
        ck.save(FakeEngine(4), 4, {}, {})
        path = f"{ck.root}/step-000004/COMPLETE"
        marker = json.loads(ck.fs.cat_file(path))
        marker["files"] = dict(sorted(marker["files"].items(), reverse=True))
        assert list(marker["files"])[-1].startswith("ds/")
        ck.fs.pipe_file(path, json.dumps(marker).encode())
        engine = FakeEngine()
        assert Checkpointer(ck.url(ck.root), rank=0, world_size=1).load_latest(engine).info.step == 4
        assert engine.value == 4
    finally:
        ck.fs.rm(ck.url(ck.root), recursive=True)


def test_every_log_message_in_full(root, caplog):
    """The save's info line, the warning for a damaged checkpoint and for a stale ``latest``, a
    clean resume without a warning, and the error when every checkpoint is damaged (the newest
    three named, newest first). Fails if any of their words change, or if more or fewer than
    three are named."""
    ck = Checkpointer(root, keep_last=5, rank=0, world_size=1)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ck.save(FakeEngine(1), 1, {}, {})
    url = lambda step: ck.fs.unstrip_protocol(f"{ck.root}/step-{step:06d}")  # noqa: E731
    [saved] = messages(caplog, logging.INFO)
    assert re.fullmatch(rf"saved checkpoint {re.escape(url(1))} \(\d+\.\d s\)", saved)
    for step in (2, 3, 4):
        ck.save(FakeEngine(step), step, {}, {})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ck.find_latest().step == 4
    assert messages(caplog) == []

    ck.fs.rm(f"{ck.root}/step-000004/ds/optim.json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ck.find_latest().step == 3
    root_url = ck.fs.unstrip_protocol(ck.root)
    assert messages(caplog) == [
        f"checkpoint damaged, falling back to an earlier one: {url(4)}: ds/optim.json is missing",
        f"{root_url}/latest names step-000004, which is not the newest usable checkpoint ({url(3)})"]

    for step in (1, 2, 3):
        ck.fs.rm(f"{ck.root}/step-{step:06d}/ds/optim.json")
    with pytest.raises(CheckpointError) as e:
        ck.find_latest()
    assert str(e.value) == (f"{root_url}: every checkpoint is damaged ("
                            + "; ".join(f"{url(s)}: ds/optim.json is missing" for s in (4, 3, 2)) + ")")


def test_a_checkpoint_changed_after_it_was_chosen(root, monkeypatch):
    """``verify`` and ``peek_latest`` read the manifest again: a COMPLETE removed, or rewritten
    without ``meta.json``, after the checkpoint was listed is refused with the checkpoint's URL
    and what is wrong. Fails if a message changes."""
    ck = Checkpointer(root, rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {})
    [info] = ck.complete()
    path = f"{info.path}/COMPLETE"
    marker = ck.fs.cat_file(path)
    without_meta = json.loads(marker)
    del without_meta["files"]["meta.json"]
    monkeypatch.setattr(ck, "find_latest", lambda: info)  # chosen before the change
    for data, message in ((None, "COMPLETE is missing or lists no files"),
                          (json.dumps(without_meta).encode(), "meta.json is not in the manifest")):
        if data is None:
            ck.fs.rm(path)
        else:
            ck.fs.pipe_file(path, data)
        with pytest.raises(ManifestError) as e:
            ck.verify(info)
        assert str(e.value) == f"{info.url}: {message}"
        with pytest.raises(CheckpointError) as e:
            ck.peek_latest()
        assert str(e.value) == f"{info.url}: {message}"
        ck.fs.pipe_file(path, marker)
    assert ck.peek_latest()[0] == info


def test_an_unlisted_file_in_a_local_ds_folder_is_named(tmp_path):
    """Fails if the message for a file the manifest does not list changes."""
    ck = Checkpointer(str(tmp_path), rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {})
    (tmp_path / "step-000001" / "ds" / "extra.bin").write_bytes(b"x")
    [info] = ck.complete()
    with pytest.raises(ManifestError) as e:
        ck.verify(info)
    assert str(e.value) == f"{info.url}: ds/extra.bin is not in the manifest"


@pytest.mark.parametrize("world_size", ["missing", None, "2", "two", 2.0, 0, -1, True])
def test_a_meta_json_without_a_valid_world_size_is_refused(root, world_size):
    """meta.json whose ``world_size`` is missing, not a whole number, or below 1 (its manifest entry
    rewritten to match): the load is refused with the checkpoint's URL and the value found, before
    any file is read, with or without ``allow_reshard``. Fails with the old ``int(meta.get(
    "world_size", -1))``, which read "2" and 2.0 as 2, raised a bare ValueError on "two" and,
    with ``allow_reshard``, loaded a missing one as a resharded checkpoint with no rank file."""
    ck = Checkpointer(root, rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {})
    path = f"{ck.root}/step-000001/meta.json"
    meta = json.loads(ck.fs.cat_file(path))
    if world_size == "missing":
        del meta["world_size"]
    else:
        meta["world_size"] = world_size
    data = json.dumps(meta).encode()
    ck.fs.pipe_file(path, data)
    marker = json.loads(ck.fs.cat_file(f"{ck.root}/step-000001/COMPLETE"))
    marker["files"]["meta.json"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    ck.fs.pipe_file(f"{ck.root}/step-000001/COMPLETE", json.dumps(marker).encode())
    found = None if world_size == "missing" else world_size
    for allow in (False, True):
        engine = FakeEngine(99)
        with pytest.raises(CheckpointError) as e:
            Checkpointer(root, rank=0, world_size=1).load_latest(engine, allow_reshard=allow)
        assert str(e.value) == f"{ck.url(ck.root)}/step-000001: meta.json has no valid world_size ({found!r})"
        assert engine.value == 99


def test_a_rank_other_than_0_takes_rank_0s_choice(root, monkeypatch):
    """``peek_latest`` on rank 1: it lists and verifies nothing itself, sends ``(None, None)`` to
    the broadcast, and reads meta.json of the checkpoint rank 0 chose. Fails if rank 1 sends
    anything else (``found = None``) or chooses on its own."""
    from vlbert.train import dist

    zero = Checkpointer(root, rank=0, world_size=2)
    zero.save(FakeEngine(1), 1, {"samples_seen": 8}, {})
    info = zero.find_latest()
    sent = []
    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: sent.append(obj) or (info, None))
    one = Checkpointer(root, rank=1, world_size=2)
    monkeypatch.setattr(one, "find_latest", lambda: pytest.fail("rank 1 chose a checkpoint itself"))
    got, meta = one.peek_latest()
    assert sent == [(None, None)] and got == info and meta["samples_seen"] == 8


def test_a_ds_file_changed_before_its_download_is_refused():
    """On an object store ``load`` checks each downloaded ``ds/`` file against the manifest again:
    one changed after ``peek_latest`` verified it is refused with the checkpoint's URL and the file.
    Fails if the message changes or the downloaded copy is not checked."""
    ck = Checkpointer(f"memory://layout-{uuid.uuid4().hex}", rank=0, world_size=1)
    try:
        ck.save(FakeEngine(2), 2, {}, {})
        info, meta = ck.peek_latest()
        path = f"{info.path}/ds/weights.json"
        data = bytearray(ck.fs.cat_file(path))
        data[-1:] = b"!"
        ck.fs.pipe_file(path, bytes(data))
        engine = FakeEngine(99)
        with pytest.raises(CheckpointError) as e:
            ck.load(engine, info, meta)
        assert str(e.value) == f"{info.url}: ds/weights.json does not match its sha256 in the manifest"
        assert engine.value == 99
    finally:
        ck.fs.rm(ck.url(ck.root), recursive=True)
