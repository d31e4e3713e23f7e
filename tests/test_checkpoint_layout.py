"""Saving checkpoints (vlbert/train/checkpoint.py) in exact terms: the files and names of the
layout its docstring gives, the contents of ``meta.json``, ``COMPLETE`` and ``latest``, the size
caps on the files it reads, the leftovers of cut-off saves, pruning, the lease guard, and what
the ranks of a save tell each other. Expected values are written out by hand or computed here
with hashlib and json from the files on disk. Loading: tests/test_checkpoint_load.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import time
import uuid
from dataclasses import FrozenInstanceError

import pytest

from test_checkpoint import FakeEngine, root  # noqa: F401 (root: the local/memory fixture)
from vlbert.train.checkpoint import MAX_MARKER_BYTES, CheckpointError, CheckpointInfo, Checkpointer

pytestmark = [pytest.mark.timeout(120)]

LOGGER = "vlbert.train.checkpoint"


def listing(ck: Checkpointer, path: str = "") -> list[str]:
    folder = posixpath.join(ck.root, path) if path else ck.root
    return sorted(posixpath.basename(p.rstrip("/")) for p in ck.fs.ls(folder, detail=False))


def put(ck: Checkpointer, path: str, data: bytes) -> None:
    ck.fs.makedirs(posixpath.dirname(f"{ck.root}/{path}"), exist_ok=True)
    ck.fs.pipe_file(f"{ck.root}/{path}", data)


def messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


def test_layout_meta_complete_and_latest_are_the_documented_ones(root):
    """One save of step 7: the folder holds exactly ``latest`` and ``step-000007/``; that holds
    ``COMPLETE``, ``meta.json``, ``rank-00000.json`` and ``ds/``; ``latest`` reads
    ``step-000007\\n``; ``meta.json`` is format 1 with the step, the world size, the save time, a
    32-hex run id and the caller's keys; ``COMPLETE`` lists every file with the size and sha256
    computed here from its bytes. Fails if a name, a key, the format version (1) or the line
    written to ``latest`` changes (e.g. ``LATEST = "XXlatestXX"``, ``FORMAT_VERSION = 2``)."""
    ck = Checkpointer(root, keep_last=2, rank=0, world_size=1)
    before = time.time()
    url = ck.save(FakeEngine(7), 7, {"samples_seen": 28}, {"cursor": [1, 2]})
    after = time.time()
    assert url == ck.fs.unstrip_protocol(f"{ck.root}/step-000007")
    assert listing(ck) == ["latest", "step-000007"]
    assert listing(ck, "step-000007") == ["COMPLETE", "ds", "meta.json", "rank-00000.json"]
    assert ck.fs.cat_file(f"{ck.root}/latest") == b"step-000007\n"

    meta = json.loads(ck.fs.cat_file(f"{ck.root}/step-000007/meta.json"))
    assert re.fullmatch(r"[0-9a-f]{32}", meta["run_id"]) and meta["run_id"] == ck.run_id
    assert before <= meta["saved_at"] <= after
    assert meta == {"format": 1, "step": 7, "world_size": 1, "saved_at": meta["saved_at"],
                    "run_id": ck.run_id, "samples_seen": 28}
    assert json.loads(ck.fs.cat_file(f"{ck.root}/step-000007/rank-00000.json")) == {"cursor": [1, 2]}

    marker = json.loads(ck.fs.cat_file(f"{ck.root}/step-000007/COMPLETE"))
    names = ["ds/optim.json", "ds/weights.json", "meta.json", "rank-00000.json"]
    blobs = {n: ck.fs.cat_file(f"{ck.root}/step-000007/{n}") for n in names}
    assert marker == {"manifest": 2, "step": 7, "run_id": ck.run_id, "saved_at": meta["saved_at"],
                      "files": {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                                for n, b in blobs.items()}}
    [info] = ck.complete()
    assert info == CheckpointInfo(7, f"{ck.root}/step-000007", url, ck.run_id, meta["saved_at"])


def test_checkpoint_info_is_a_frozen_record_with_plain_defaults():
    """Fails if CheckpointInfo is no longer frozen (``frozen=False``) or its defaults change."""
    info = CheckpointInfo(3, "/x/step-000003", "file:///x/step-000003")
    assert info.run_id is None and info.saved_at == 0.0
    with pytest.raises(FrozenInstanceError):
        info.step = 4  # type: ignore[misc]
    assert hash(info) == hash(CheckpointInfo(3, "/x/step-000003", "file:///x/step-000003", None, 0.0))


def test_markers_without_run_id_or_saved_at(root):
    """A COMPLETE without ``run_id`` and ``saved_at`` (or with values of the wrong type) is
    listed with ``run_id`` None and ``saved_at`` 0.0, and a load then takes the run id from
    ``meta.json``. Fails if the defaults change (e.g. ``else 1.0``) or the meta fallback goes."""
    ck = Checkpointer(root, rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {})
    ck.save(FakeEngine(2), 2, {}, {})
    run_id = ck.run_id
    for step, edit in ((1, lambda m: {k: v for k, v in m.items() if k not in ("run_id", "saved_at")}),
                       (2, lambda m: {**m, "run_id": 5, "saved_at": "yesterday"})):
        path = f"{ck.root}/step-{step:06d}/COMPLETE"
        ck.fs.pipe_file(path, json.dumps(edit(json.loads(ck.fs.cat_file(path)))).encode())
    fresh = Checkpointer(root, rank=0, world_size=1)
    assert [(c.step, c.run_id, c.saved_at) for c in fresh.complete()] == [(1, None, 0.0), (2, None, 0.0)]
    assert fresh.load_latest(FakeEngine()).info.step == 2
    assert fresh.run_id == run_id


def test_default_keeps_three_and_keep_last_one_is_allowed(root):
    """Fails if the default ``keep_last`` is not 3 or if ``keep_last=1`` is refused (``< 1`` as
    ``<= 1``); 0 is refused with its message."""
    ck = Checkpointer(root, rank=0, world_size=1)
    for step in range(1, 6):
        ck.save(FakeEngine(step), step, {}, {})
    assert [c.step for c in ck.complete()] == [3, 4, 5]
    one = Checkpointer(root, keep_last=1, rank=0, world_size=1)
    one.load_latest(FakeEngine())
    one.save(FakeEngine(6), 6, {}, {})
    assert [c.step for c in one.complete()] == [6]
    with pytest.raises(ValueError, match=r"^keep_last must be >= 1, got 0$"):
        Checkpointer(root, keep_last=0, rank=0, world_size=1)


def test_names_ending_in_x_are_kept(tmp_path):
    """A root whose name ends in X (given with a slash): only trailing slashes are taken off. A
    folder ``step-000001X`` beside the checkpoints is not a checkpoint folder: neither listed nor
    pruned. Fails if ``rstrip("/")`` strips other characters (``rstrip("XX/XX")`` in ``__init__``
    or on the listed names: ``step-000001X`` would be read as step 1 and deleted as a leftover)."""
    ck = Checkpointer(str(tmp_path / "runX") + "/", rank=0, world_size=1)
    assert ck.root == str(tmp_path / "runX")
    (tmp_path / "runX" / "step-000001X").mkdir(parents=True)
    (tmp_path / "runX" / "step-000001X" / "notes.txt").write_text("not a checkpoint")
    ck.save(FakeEngine(2), 2, {}, {})
    assert sorted(os.listdir(tmp_path / "runX")) == ["latest", "step-000001X", "step-000002"]
    assert [c.step for c in ck.complete()] == [2]


def test_cut_off_saves_leave_leftovers_that_the_next_saves_remove(root):
    """A save killed while the engine writes leaves ``step-000002.tmp`` on a local disk (nothing on
    an object store, where the staging folder is local and removed); a stray unfinished
    ``step-000003`` (no COMPLETE) stays until a save at or above its step. The next save at step
    2 starts from an empty folder (an extra file left in the leftover does not enter its
    manifest); a save at step 3 removes the stray folder at its own step, and one above ``newest``
    stays. Fails if leftovers are not removed at the start of a save, if pruning stops at the first
    kept checkpoint (``continue`` as ``break``) or keeps a leftover at exactly the newest step
    (``<=`` as ``<``)."""
    ck = Checkpointer(root, keep_last=5, rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {})
    with pytest.raises(KeyboardInterrupt):
        ck.save(FakeEngine(2, fail_midway=True), 2, {}, {})
    if ck.local:
        assert listing(ck) == ["latest", "step-000001", "step-000002.tmp"]
        put(ck, "step-000002.tmp/ds/partial.bin", b"half")
    else:
        assert listing(ck) == ["latest", "step-000001"]
    for stray in ("step-000003", "step-9"):
        put(ck, f"{stray}/ds/partial.bin", b"half")
    ck.save(FakeEngine(2), 2, {}, {})
    assert listing(ck) == ["latest", "step-000001", "step-000002", "step-000003", "step-9"]
    marker = json.loads(ck.fs.cat_file(f"{ck.root}/step-000002/COMPLETE"))
    assert sorted(marker["files"]) == ["ds/optim.json", "ds/weights.json", "meta.json", "rank-00000.json"]
    put(ck, "step-3/ds/partial.bin", b"half")  # unpadded, at the step of the next save
    ck.save(FakeEngine(3), 3, {}, {})
    assert listing(ck) == ["latest", "step-000001", "step-000002", "step-000003", "step-9"]
    assert [c.step for c in ck.complete()] == [1, 2, 3]


def test_a_guard_that_raises_publishes_nothing(root):
    """A lost lease (the guard raises): the save fails before COMPLETE, ``latest`` still names the
    previous checkpoint and a resume takes it. Fails if the guard is not called."""
    calls = []

    def guard():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("lease lost")

    ck = Checkpointer(root, rank=0, world_size=1, guard=guard)
    ck.save(FakeEngine(1), 1, {}, {})
    with pytest.raises(RuntimeError, match="lease lost"):
        ck.save(FakeEngine(2), 2, {}, {})
    assert calls == [1, 1]
    assert ck.fs.cat_file(f"{ck.root}/latest") == b"step-000001\n"
    assert not ck.fs.exists(f"{ck.root}/step-000002/COMPLETE")
    assert Checkpointer(root, rank=0, world_size=1).find_latest().step == 1


def test_latest_pointer_is_read_up_to_256_bytes(root, caplog):
    """``latest`` of exactly 256 bytes (a wrong name) is read and warned about; 257 bytes is
    ignored as no pointer; bytes that are not UTF-8 are read with replacement characters.
    Fails if the cap moves (256 as 257, ``limit + 1`` as ``limit - 1``, ``>`` as ``>=``) or
    the decoding errors on bad bytes."""
    ck = Checkpointer(root, rank=0, world_size=1)
    ck.save(FakeEngine(1), 1, {}, {})
    url = ck.fs.unstrip_protocol(f"{ck.root}/step-000001")
    for data, expected in ((b"s" * 255 + b"\n", "s" * 255), (b"s" * 256 + b"\n", None),
                           (b"step-\xff\n", "step-\ufffd")):
        ck.fs.pipe_file(f"{ck.root}/latest", data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert ck.find_latest().step == 1
        want = [] if expected is None else [
            f"{ck.fs.unstrip_protocol(ck.root)}/latest names {expected}, which is not the newest usable "
            f"checkpoint ({url})"]
        assert messages(caplog) == want


def test_a_marker_over_64_mib_is_not_read(caplog):
    """A COMPLETE of 64 MiB + 1 byte (the manifest padded with spaces) does not count: the
    checkpoint before it is resumed. Fails if ``MAX_MARKER_BYTES`` grows (65 << 20, 64 << 21)."""
    assert MAX_MARKER_BYTES == 64 * 1024 * 1024
    ck = Checkpointer(f"memory://layout-{uuid.uuid4().hex}", rank=0, world_size=1)
    try:
        ck.save(FakeEngine(1), 1, {}, {})
        ck.save(FakeEngine(2), 2, {}, {})
        path = f"{ck.root}/step-000002/COMPLETE"
        marker = ck.fs.cat_file(path)
        ck.fs.pipe_file(path, marker + b" " * (64 * 1024 * 1024 + 1 - len(marker)))
        assert [c.step for c in ck.complete()] == [1]
        assert ck.find_latest().step == 1
    finally:
        ck.fs.rm(ck.url(ck.root), recursive=True)


def test_a_rank_other_than_0_writes_its_own_file_only(root):
    """Rank 1 of two (no process group here: its collectives act locally) writes its rank file
    into the staging folder and publishes nothing: no ``COMPLETE``, no ``latest``, no meta.json.
    Fails if the given rank is replaced by the process group's (``rank is None`` as ``is not
    None``: rank 0 without a group)."""
    ck = Checkpointer(root, rank=1, world_size=2)
    assert ck.rank == 1 and ck.world_size == 2
    url = ck.save(FakeEngine(3), 3, {}, {"cursor": "one"})
    assert url == ck.fs.unstrip_protocol(f"{ck.root}/step-000003")
    assert not ck.fs.exists(f"{ck.root}/latest") and ck.complete() == []
    folder = "step-000003.tmp" if ck.local else "step-000003"
    assert listing(ck) == [folder]
    assert listing(ck, folder) == ["ds", "rank-00001.json"]
    assert json.loads(ck.fs.cat_file(f"{ck.root}/{folder}/rank-00001.json")) == {"cursor": "one"}


def test_a_failed_publish_is_told_to_every_rank(root, monkeypatch):
    """The collectives stand in for a two-rank job: rank 0, whose guard raises, broadcasts
    ``rank 0 could not publish <url>: RuntimeError: lease lost`` and raises its own error; rank 1,
    given that text by the broadcast, raises CheckpointError with it. Fails if the text changes or
    rank 1 ignores what it receives (``error = dist.broadcast_object(error)`` dropped)."""
    from vlbert.train import dist

    sent = []

    def guard():
        raise RuntimeError("lease lost")

    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: sent.append(obj) or obj)
    zero = Checkpointer(root, rank=0, world_size=2, guard=guard)
    with pytest.raises(RuntimeError, match="^lease lost$"):
        zero.save(FakeEngine(3), 3, {}, {})
    told = f"rank 0 could not publish {zero.fs.unstrip_protocol(f'{zero.root}/step-000003')}: RuntimeError: lease lost"
    assert sent == [told]

    monkeypatch.setattr(dist, "broadcast_object", lambda obj, src=0: told)
    with pytest.raises(CheckpointError) as e:
        Checkpointer(root, rank=1, world_size=2).save(FakeEngine(3), 3, {}, {})
    assert str(e.value) == told


def test_two_ranks_uploading_different_bytes_under_one_name_is_refused(monkeypatch):
    """On an object store rank 0 merges the hashes every rank uploaded: the same name with another
    hash from a second rank refuses the publish, naming the file; the same hash is accepted.
    Fails if the message changes or the comparison is inverted."""
    from vlbert.train import dist
    from vlbert.train.manifest import Entry

    real_gather = dist.all_gather_object
    for other, ok in ((Entry(3, "0" * 64), False), (None, True)):
        def gather(obj):
            [mine] = real_gather(obj)
            twin = dict(mine) if other is None else {**mine, "ds/weights.json": other}
            return [mine, twin]

        monkeypatch.setattr(dist, "all_gather_object", gather)
        ck = Checkpointer(f"memory://layout-{uuid.uuid4().hex}", rank=0, world_size=2)
        try:
            if ok:
                ck.save(FakeEngine(1), 1, {}, {})
                assert [c.step for c in ck.complete()] == [1]
            else:
                with pytest.raises(CheckpointError) as e:
                    ck.save(FakeEngine(1), 1, {}, {})
                assert str(e.value) == "two ranks wrote different ds/weights.json"
                assert ck.complete() == []
        finally:
            ck.fs.rm(ck.url(ck.root), recursive=True)


def test_saved_line_gives_the_seconds_the_save_took(tmp_path, caplog):
    """The logged duration is at most the wall time around the call. Fails if it is computed
    as anything but now minus the start (``- t0`` as ``+ t0``)."""
    ck = Checkpointer(str(tmp_path), rank=0, world_size=1)
    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        ck.save(FakeEngine(1), 1, {}, {})
    took = time.perf_counter() - start
    [line] = messages(caplog, logging.INFO)
    seconds = float(re.fullmatch(r"saved checkpoint .* \((\d+\.\d) s\)", line).group(1))
    assert 0.0 <= seconds <= took + 0.05
