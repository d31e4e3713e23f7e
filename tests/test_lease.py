"""The output folder's lease (vlbert/train/lease.py) on a local disk, memory:// and S3 (moto):
a second holder is refused with the first one named, a stale lease is taken over with a
warning, a lease taken over is noticed by its old holder, and two trainers started on one
folder: the second exits within seconds naming the first, which finishes with every
checkpoint intact."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import pytest

from vlbert.train.lease import LEASE, FolderLeases, Lease, LeaseHeld, LeaseLost, run_folders

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "out" / LEASE)
        return
    root = f"memory://lease-{uuid.uuid4().hex}"
    yield f"{root}/{LEASE}"
    fsspec.filesystem("memory").rm(root, recursive=True)


def craft(url: str, **record) -> None:
    """A lease object as another job would have left it."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, json.dumps({"token": "theirs", "acquired_at": time.time(), **record}).encode())


def test_second_holder_is_refused_naming_the_first(url):
    """Fails if the lease object is not created exclusively or its holder not read back."""
    with Lease(url, 600, holder="job-A"):
        with pytest.raises(LeaseHeld, match=r"held by job-A \(host .*, pid %d" % os.getpid()):
            Lease(url, 600, holder="job-B").acquire()
    with Lease(url, 600, holder="job-B") as b:  # released on exit: the next one gets it
        b.check()


def test_live_lease_of_another_host_is_refused(url):
    """A fresh heartbeat from a job elsewhere is respected. Fails if any existing lease is taken."""
    craft(url, holder="slurm-job 77 step 0 task 0", host="elsewhere", pid=1, heartbeat_at=time.time() - 30)
    with pytest.raises(LeaseHeld, match="held by slurm-job 77 step 0 task 0 .*host elsewhere"):
        Lease(url, 600, holder="job-B").acquire()


def test_stale_lease_is_taken_over_with_a_warning(url, caplog):
    """No heartbeat for longer than the limit: taken over, with a warning naming the old holder
    and why. Fails if staleness is not judged (every lease refused)."""
    craft(url, holder="slurm-job 77 step 0 task 0", host="elsewhere", pid=1, heartbeat_at=time.time() - 700)
    with caplog.at_level(logging.WARNING, logger="vlbert.train.lease"):
        with Lease(url, 600, holder="job-B") as lease:
            lease.check()
            fs, path = fsspec.core.url_to_fs(url)
            assert json.loads(fs.cat_file(path))["holder"] == "job-B"
    assert "taking over the lease" in caplog.text and "slurm-job 77" in caplog.text
    assert "no heartbeat for 11.7 min (stale after 10.0 min)" in caplog.text


def test_dead_process_on_this_host_and_earlier_attempt_of_this_job_are_taken_over(url, monkeypatch):
    """Fails if a lease left by a process that is gone (or by this Slurm job's previous attempt)
    blocks the restart until it goes stale."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    craft(url, holder=f"{socket.gethostname()}:{gone.pid}", host=socket.gethostname(), pid=gone.pid,
          heartbeat_at=time.time())
    Lease(url, 600, holder="job-B").acquire().release()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    craft(url, holder="slurm-job 4242 step - task 0", host="elsewhere", pid=1, heartbeat_at=time.time())
    Lease(url, 600).acquire().release()


def test_taken_over_lease_is_noticed_and_refuses_publishing(url):
    """Another job overwrote the lease (it judged ours stale): ``check`` raises naming it, the
    heartbeat stops rewriting it, and release leaves their object alone. Fails if the holder
    keeps writing under a folder it lost."""
    lease = Lease(url, 600, holder="job-A", heartbeat_s=0.05).acquire()
    craft(url, holder="job-C", host="elsewhere", pid=1, heartbeat_at=time.time())
    with pytest.raises(LeaseLost, match="taken over by job-C"):
        lease.check()
    time.sleep(0.2)  # a few heartbeats
    lease.release()
    fs, path = fsspec.core.url_to_fs(url)
    assert json.loads(fs.cat_file(path))["holder"] == "job-C"


def test_lease_on_s3_is_exclusive_and_released(tmp_path):
    """S3's conditional put (moto): the second holder is refused, release removes the object.
    Fails if the object store path is not exclusive."""
    from s3_server import CREDENTIALS, MotoS3, fresh_s3, s3_config

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = MotoS3().start()
    try:
        with s3_config(server.endpoint):
            fresh_s3(server.endpoint).mkdir("lease-bucket")
            url = f"s3://lease-bucket/run/{LEASE}"
            with Lease(url, 600, holder="job-A"):
                with pytest.raises(LeaseHeld, match="held by job-A"):
                    Lease(url, 600, holder="job-B").acquire()
            assert not fresh_s3(server.endpoint).exists(f"lease-bucket/run/{LEASE}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_run_folders_and_folder_leases(tmp_path):
    """The checkpoint folder gets its own lease only when it is outside the output folder."""
    out = str(tmp_path / "out")
    assert run_folders(out, "") == [out]
    assert run_folders(out, f"{out}/ck") == [out]
    assert run_folders(out, "memory://elsewhere/ck") == [out, "memory://elsewhere/ck"]
    with FolderLeases([out, "memory://elsewhere/ck"], 600, rank=0) as held:
        held.check()
        with pytest.raises(LeaseHeld, match=f"{out}/{LEASE} is held by"):
            FolderLeases([out], 600, rank=0).__enter__()
    assert not os.path.exists(f"{out}/{LEASE}")
    fsspec.filesystem("memory").rm("/elsewhere", recursive=True)


# --------------------------------------------------------------------------- two trainers


# The second trainer: ``vlbert-train`` (its ``main``, exit status and stderr as the console script's)
# started beside the first, so that its imports overlap the first one's start-up; it runs once
# the first holds the folder (``sys.argv[1]``, the lease file). It imports only what the command
# itself imports before that.
SECOND = """
import sys, time
from pathlib import Path
import vlbert.train.loop
from vlbert.cli.train import main
lease, argv = Path(sys.argv[1]), sys.argv[2:]
deadline = time.monotonic() + 120
while not lease.exists():
    if time.monotonic() > deadline:
        sys.exit("no lease within 120 s")
    time.sleep(0.05)
print(f"started {time.monotonic():.3f}", flush=True)
sys.exit(main(argv))
"""


@pytest.mark.timeout(300)
def test_two_trainers_on_one_folder(demo_data, tmp_path):
    """The first trainer holds the folder; the second, started on it, exits 1 within seconds of
    its start-up with the first one's id (host:pid); the first finishes, every checkpoint it kept
    verifies, and the lease is gone. Fails without the lease: the second trains into the same
    folder (and deletes the first's step-N.tmp)."""
    from test_train_e2e import clean_env, tiny_config, write_config

    from vlbert.train.checkpoint import Checkpointer

    out = tmp_path / "out"
    cfg = tiny_config(demo_data, out, **{"optim.total_steps": 12, "runtime.checkpoint_every": 4,
                                         "runtime.val_every": 0, "tracking.enabled": False})
    config = write_config(cfg, tmp_path / "c.yaml")
    env = {k: v for k, v in clean_env().items() if not k.startswith("SLURM_")}
    argv = ["--config", str(config)]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "vlbert.cli.train", *argv], env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    second = None
    try:
        second = subprocess.Popen([sys.executable, "-c", SECOND, str(out / LEASE), *argv], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = second.communicate(timeout=240)
        ended = time.monotonic()
        assert first.poll() is None, "the first trainer ended before the second was refused: make it longer"
        assert second.returncode == 1, (second.returncode, stderr[-3000:], (tmp_path / "first.log").read_text()[-3000:])
        seconds = ended - float(stdout.split("started ")[1].split()[0])
        assert f"is held by {socket.gethostname()}:{first.pid}" in stderr
        assert "step 1/" not in stderr and seconds < 60, (seconds, stderr[-2000:])
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    ck = Checkpointer(str(out / "checkpoints"), rank=0, world_size=1)
    assert [c.step for c in ck.complete()] == [8, 12]  # keep_last 2 of 4, 8, 12
    for info in ck.complete():
        ck.verify(info)
    assert not (out / LEASE).exists()
