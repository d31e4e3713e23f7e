"""Resuming from an S3 bucket (moto's server, tests/s3_server.py) that someone else can write:
keys crafted by the test to climb out of the resume folder, listed in the manifest or not,
never land outside it, and files the manifest does not list are never downloaded."""

from __future__ import annotations

import json
import logging
import tempfile

import pytest

from s3_server import FaultProxy, clear_s3_caches, fresh_s3, object_reads, s3_config
from test_checkpoint import FakeEngine
from test_object_store import Bucket, moto  # noqa: F401 (the module's moto server fixture)
from vlbert.train.checkpoint import COMPLETE, Checkpointer

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]


@pytest.fixture
def resume_tmp(tmp_path, monkeypatch):
    """The resume's temporary folders go under ``tmp_path/t``, three levels below ``tmp_path``
    for ``t/vlbert-resume-*/ds/``: ``../../../escaped/`` from there is ``tmp_path/escaped/``."""
    (tmp_path / "t").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "t"))
    return tmp_path


def saved(moto, steps=(1, 2)):  # noqa: F811
    with s3_config(moto.endpoint):
        bucket = Bucket(moto.endpoint)
        ck = Checkpointer(f"{bucket.url}/ckpt", keep_last=5, rank=0, world_size=1)
        for step in steps:
            ck.save(FakeEngine(step), step, {}, {"cursor": step})
    return bucket


def test_unlisted_keys_are_never_downloaded_nor_written_outside(moto, resume_tmp):  # noqa: F811
    """Keys beside a good checkpoint, one climbing out of ``ds/``, none in its manifest: resume
    loads the checkpoint, fetches only the listed files (the server's request log), and nothing
    appears outside the temporary folder. Fails with the old download of every key under ``ds/``."""
    bucket = saved(moto)
    fs = fresh_s3(moto.endpoint)
    fs.pipe_file(f"{bucket.name}/ckpt/step-000002/ds/../../../escaped/pwned", b"evil")
    fs.pipe_file(f"{bucket.name}/ckpt/step-000002/ds/extra.bin", b"not listed")
    listed = set(json.loads(fs.cat_file(f"{bucket.name}/ckpt/step-000002/{COMPLETE}"))["files"])

    with FaultProxy(moto.endpoint) as proxy, s3_config(proxy.endpoint):
        engine = FakeEngine()
        loaded = Checkpointer(f"{bucket.url}/ckpt", rank=0, world_size=1).load_latest(engine)
        read = {r.path.partition("?")[0].split("/ckpt/step-000002/", 1)[-1]
                for r in proxy.requests if object_reads(r) and "/step-000002/" in r.path}
    assert loaded.info.step == 2 and engine.value == 2
    assert not (resume_tmp / "escaped").exists()
    assert read and read <= listed | {COMPLETE}  # the listed files only (verified, then downloaded)
    assert not any("extra.bin" in p or ".." in p for p in read)


def test_listed_traversal_name_refuses_the_checkpoint(moto, resume_tmp, caplog):  # noqa: F811
    """The attacker also lists the climbing key in the manifest, with its true size and hash: the
    name is refused, the checkpoint with it, resume takes step 1, and nothing is written outside.
    Fails if manifest names are joined onto the temporary folder unchecked."""
    import hashlib

    bucket = saved(moto)
    fs = fresh_s3(moto.endpoint)
    evil, name = b"evil", "ds/../../../escaped/pwned"
    fs.pipe_file(f"{bucket.name}/ckpt/step-000002/{name}", evil)
    marker = f"{bucket.name}/ckpt/step-000002/{COMPLETE}"
    manifest = json.loads(fs.cat_file(marker))
    manifest["files"][name] = {"size": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    fs.pipe_file(marker, json.dumps(manifest).encode())

    with s3_config(moto.endpoint), caplog.at_level(logging.WARNING, logger="vlbert.train.checkpoint"):
        clear_s3_caches()
        engine = FakeEngine()
        loaded = Checkpointer(f"{bucket.url}/ckpt", rank=0, world_size=1).load_latest(engine)
    assert loaded.info.step == 1 and engine.value == 1
    assert not (resume_tmp / "escaped").exists()
    assert "step-000002: file name 'ds/../../../escaped/pwned' has an empty, '.' or '..' part" in caplog.text
