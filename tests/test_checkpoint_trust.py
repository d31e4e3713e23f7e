"""Damaged and crafted checkpoints (vlbert/train/checkpoint.py, manifest.py), made by the test
on a local disk and on fsspec's memory:// store: a flipped bit in any file, a corrupt
``meta.json``, a ``COMPLETE`` without a file list, unsafe manifest names, and pruning in a
folder that holds another run's checkpoints. Each is refused or handled, never loaded."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid

import fsspec
import pytest

from test_checkpoint import FakeEngine
from vlbert.train.checkpoint import COMPLETE, FORMAT_VERSION, META, CheckpointError, Checkpointer, step_name
from vlbert.train.manifest import ManifestError, local_target, safe_name

pytestmark = [pytest.mark.timeout(120)]

FILES = ["ds/weights.json", "ds/optim.json", "rank-00000.json", META]


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ckpt")
        return
    url = f"memory://trust-{uuid.uuid4().hex}"
    yield url
    fsspec.filesystem("memory").rm(url, recursive=True)


def two_checkpoints(root: str) -> Checkpointer:
    ck = Checkpointer(root, keep_last=5, rank=0, world_size=1)
    for step in (1, 2):
        ck.save(FakeEngine(step), step, {"samples_seen": step}, {"data": {"cursor": step}})
    return ck


def flip_bit(ck: Checkpointer, path: str, byte: int = 3, bit: int = 2) -> None:
    data = bytearray(ck.fs.cat_file(path))
    data[byte] ^= 1 << bit
    ck.fs.pipe_file(path, bytes(data))


def rewrite_manifest(ck: Checkpointer, step: int, edit) -> None:
    """Change step's COMPLETE marker as someone with write access to the store could."""
    path = f"{ck.root}/{step_name(step)}/{COMPLETE}"
    raw = json.loads(ck.fs.cat_file(path))
    ck.fs.pipe_file(path, json.dumps(edit(raw)).encode())


@pytest.mark.parametrize("name", FILES)
def test_one_flipped_bit_in_any_file_is_refused_and_resume_takes_the_previous(root, name, caplog):
    """Fails if a file is checked by size only (the old COMPLETE), or if the warning does not name it."""
    ck = two_checkpoints(root)
    flip_bit(ck, f"{ck.root}/step-000002/{name}")
    engine = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="vlbert.train.checkpoint"):
        loaded = Checkpointer(root, rank=0, world_size=1).load_latest(engine)
    assert loaded.info.step == 1 and engine.value == 1 and loaded.rank_state == {"data": {"cursor": 1}}
    assert f"step-000002: {name} does not match its sha256" in caplog.text


def test_corrupt_meta_json_with_a_matching_hash_falls_back(root, caplog):
    """meta.json that is not JSON, its manifest entry rewritten to match: refused as unreadable,
    not a bare JSONDecodeError. Fails if meta.json is parsed only after the checkpoint is chosen."""
    ck = two_checkpoints(root)
    bad = b'{"format": 1, "step": 2,'
    ck.fs.pipe_file(f"{ck.root}/step-000002/{META}", bad)
    rewrite_manifest(ck, 2, lambda m: {**m, "files": {**m["files"], META: {
        "size": len(bad), "sha256": hashlib.sha256(bad).hexdigest()}}})
    with caplog.at_level(logging.WARNING, logger="vlbert.train.checkpoint"):
        info, meta = Checkpointer(root, rank=0, world_size=1).peek_latest()
    assert info.step == 1 and meta["samples_seen"] == 1
    assert f"step-000002: {META} is not valid JSON" in caplog.text


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None])
def test_another_format_version_is_a_clear_error_not_a_fallback(root, version):
    """The newest checkpoint's meta.json names another format version (a later release's, an
    earlier one's, or none), its manifest entry rewritten to match so the file is intact:
    resuming raises CheckpointError naming the checkpoint, the version found and the one
    expected; it neither loads it nor falls back silently to the step before (which would resume
    a run from an older state than its newest).
    Fails if the format check is deleted (step 2 is loaded), or if a mismatch only skips the
    checkpoint (step 1 is loaded)."""
    ck = two_checkpoints(root)
    path = f"{ck.root}/step-000002/{META}"
    meta = json.loads(ck.fs.cat_file(path))
    assert meta["format"] == FORMAT_VERSION == 1
    if version is None:
        del meta["format"]
    else:
        meta["format"] = version
    data = json.dumps(meta).encode()
    ck.fs.pipe_file(path, data)
    rewrite_manifest(ck, 2, lambda m: {**m, "files": {**m["files"], META: {
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}})
    engine = FakeEngine(99)
    with pytest.raises(CheckpointError, match=rf"step-000002: format {version!r}, expected {FORMAT_VERSION}$"):
        Checkpointer(root, rank=0, world_size=1).load_latest(engine)
    assert engine.value == 99  # nothing loaded


@pytest.mark.parametrize("marker", [b'{"step": 999999}', b'{"step": 999999, "files": {}}', b"", b"[]"])
def test_complete_without_a_file_list_is_not_a_checkpoint(root, marker):
    """A stray step-999999 whose COMPLETE lists no files is never resumed from (nor pruned as ours).
    Fails if a marker without files counts as complete (the old all() over an empty list)."""
    ck = two_checkpoints(root)
    ck.fs.makedirs(f"{ck.root}/step-999999", exist_ok=True)
    ck.fs.pipe_file(f"{ck.root}/step-999999/{COMPLETE}", marker)
    ck2 = Checkpointer(root, rank=0, world_size=1)
    assert [c.step for c in ck2.complete()] == [1, 2]
    engine = FakeEngine()
    assert ck2.load_latest(engine).info.step == 2 and engine.value == 2


def test_sizes_only_manifest_is_unverifiable(root, caplog):
    """The manifest of step 2 rewritten to the old sizes-only form (no hashes to check): refused.
    Fails if an entry without sha256 is accepted."""
    ck = two_checkpoints(root)
    rewrite_manifest(ck, 2, lambda m: {**m, "files": {k: v["size"] for k, v in m["files"].items()}})
    with caplog.at_level(logging.WARNING, logger="vlbert.train.checkpoint"):
        assert Checkpointer(root, rank=0, world_size=1).find_latest().step == 1
    assert "has no sha256 in the manifest" in caplog.text


def test_every_checkpoint_damaged_is_an_error_naming_the_files(root):
    """Fails if resume quietly starts a fresh run (None) when every checkpoint is damaged."""
    ck = two_checkpoints(root)
    flip_bit(ck, f"{ck.root}/step-000001/ds/optim.json")
    ck.fs.rm(f"{ck.root}/step-000002/rank-00000.json")
    with pytest.raises(CheckpointError, match=r"every checkpoint is damaged.*step-000002: rank-00000.json is "
                                              r"missing.*step-000001: ds/optim.json does not match"):
        Checkpointer(root, rank=0, world_size=1).load_latest(FakeEngine())


@pytest.mark.parametrize("name", ["../escape.json", "ds/../../escape.json", "/etc/passwd", "ds//x", "./meta.json",
                                  "ds\\..\\x", "C:/x"])
def test_unsafe_manifest_name_refuses_the_checkpoint(root, name, caplog):
    """A listed name that leaves the checkpoint folder: the checkpoint is refused before any file
    is read. Fails if manifest names are not checked."""
    ck = two_checkpoints(root)
    rewrite_manifest(ck, 2, lambda m: {**m, "files": {**m["files"], name: {"size": 0, "sha256": "0" * 64}}})
    with caplog.at_level(logging.WARNING, logger="vlbert.train.checkpoint"):
        assert Checkpointer(root, rank=0, world_size=1).find_latest().step == 1
    assert repr(name) in caplog.text


def test_unlisted_file_in_a_local_ds_folder_refuses_it(tmp_path, caplog):
    """DeepSpeed reads a local ds/ folder itself (the universal conversion globs it): a file the
    manifest does not list there refuses the checkpoint. Fails without the listing check."""
    ck = two_checkpoints(str(tmp_path))
    (tmp_path / "step-000002" / "ds" / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="vlbert.train.checkpoint"):
        assert Checkpointer(str(tmp_path), rank=0, world_size=1).find_latest().step == 1
    assert "ds/zero_pp_rank_9_mp_rank_00_optim_states.pt is not in the manifest" in caplog.text


def test_local_target_never_leaves_its_folder(tmp_path):
    """Fails if a name with '..' or a link inside the folder could point outside it."""
    inside = tmp_path / "in"
    inside.mkdir()
    (inside / "link").symlink_to(tmp_path)
    assert local_target(str(inside), "ds/a.pt") == str(inside / "ds" / "a.pt")
    for bad in ("../x", "ds/../../x", "/abs", "link/x", ""):
        with pytest.raises(ManifestError):
            local_target(str(inside), bad)
    assert safe_name("ds/mp_rank_00_model_states.pt") == "ds/mp_rank_00_model_states.pt"


def test_fresh_run_keeps_its_own_checkpoints_and_leaves_another_runs_alone(root):
    """A fresh run (nothing loaded) in a folder that holds an older run's step-004000..005000:
    pruning touches only its own checkpoints, never the one just written, and a resume takes
    up this run (the one that saved last), not the older run's higher steps. Fails with the
    old pruning, which kept the highest three steps and deleted step-000100 on the spot."""
    old = Checkpointer(root, keep_last=3, rank=0, world_size=1)
    for step in (4000, 4500, 5000):
        old.save(FakeEngine(step), step, {}, {})
    new = Checkpointer(root, keep_last=2, rank=0, world_size=1)
    new.save(FakeEngine(100), 100, {}, {})
    steps = lambda: [c.step for c in Checkpointer(root, rank=0, world_size=1).complete()]  # noqa: E731
    assert steps() == [100, 4000, 4500, 5000]
    for step in (200, 300):
        new.save(FakeEngine(step), step, {}, {})
    assert steps() == [200, 300, 4000, 4500, 5000]  # this run's newest two, the old run's three

    resumed = Checkpointer(root, keep_last=2, rank=0, world_size=1)
    engine = FakeEngine()
    assert resumed.load_latest(engine).info.step == 300 and engine.value == 300
    resumed.save(FakeEngine(400), 400, {}, {})  # the resumed run is the same run: it prunes step 200
    assert steps() == [300, 400, 4000, 4500, 5000]


def test_resumed_old_run_prunes_its_own_checkpoints_only(root):
    """Resuming a run keeps its run id, so its
    next saves prune its own oldest checkpoints. Fails if the run id is not taken from the loaded one."""
    first = Checkpointer(root, keep_last=2, rank=0, world_size=1)
    for step in (10, 20):
        first.save(FakeEngine(step), step, {}, {})
    second = Checkpointer(root, keep_last=2, rank=0, world_size=1)
    second.load_latest(FakeEngine())
    second.save(FakeEngine(30), 30, {}, {})
    assert [c.step for c in second.complete()] == [20, 30]
    assert len({c.run_id for c in second.complete()}) == 1
