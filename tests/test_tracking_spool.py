"""Tracking through outages (vlbert/tracking: writer, spool, sender, replay): a real ``mlflow server``
on loopback stopped and started again on the same port, a server down at the start, a tracker
killed with SIGKILL while the server is down, a server that never comes back (the spool's
bound), a locked SQLite store, a file store that goes away; each ends with every step in the
run once, in order, with the time it was logged (or the loss counted and reported)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from mlflow_server import MlflowServer, free_port

from vlbert.config import TrackingConfig
from vlbert.tracking import LOGGED_THROUGH_TAG, MlflowTracker, fetch_metric_histories, fetch_runs
from vlbert.tracking.common import DROPPED_TAG, RUN_KEY_TAG
from vlbert.tracking.sender import Sender
from vlbert.tracking.spool import Record, Spool

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sqlite_db(tmp_path_factory) -> Path:
    """One SQLite store for the module (creating its tables takes seconds)."""
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def tracker(uri: str, spool: Path, experiment: str, run_key=None, start_wait_s: float = 30.0, **cfg) -> MlflowTracker:
    cfg.setdefault("retry_max_s", 0.5)  # come back within a second of the store
    cfg.setdefault("drain_timeout_s", 60.0)
    t = TrackingConfig(experiment=experiment, tracking_uri=uri, system_metrics=False, **cfg)
    return MlflowTracker(t, run_key=run_key, spool_dir=str(spool), start_wait_s=start_wait_s)


def loss(step: int, attempt: int = 0) -> float:
    return 100.0 - step + 0.5 * attempt


def assert_every_step_once(uri: str, run_id: str, steps: list[int], logged_ms: dict[int, float]) -> None:
    hist = fetch_metric_histories(uri, run_id, ["loss"])["loss"]
    assert hist.steps == steps  # once each, in order
    assert hist.values == [loss(s) for s in steps]
    for step, ts in zip(hist.steps, hist.timestamps):  # the time of the call, not of the (late) send
        assert abs(ts - logged_ms[step]) < 1000, (step, ts, logged_ms[step])


@pytest.mark.mlflow_server
def test_server_stopped_mid_run_and_restarted_loses_no_step(tmp_path):
    with MlflowServer(tmp_path / "server").start() as server:
        server.wait()
        t = tracker(server.uri, tmp_path / "spool", "outage")
        assert t.run_id is not None
        t.log_params({"optim.lr": 0.1})
        logged, spooled_during_outage = {}, 0
        for step in range(1, 61):
            if step == 20:
                assert t.flush(30)
                server.stop()
            if step == 40:
                spooled_during_outage = Spool(tmp_path / "spool").count("metrics")
                server.start()  # the same port and store: a restarted tracking server
            t.log_metrics({"loss": loss(step)}, step)
            logged[step] = time.time() * 1000
            time.sleep(0.05)
        server.wait()
        t.close()
        # The outage was real and training went on through it: steps 20-39 were logged while the
        # server was down and waited on disk (a call that waited on the store would never have
        # reached step 40, which restarts it). Call times: bench/tracking_spool.py.
        assert spooled_during_outage >= 15
        assert t.unsent == 0 and t.dropped == 0
        (run,) = fetch_runs(server.uri, experiment="outage")
        assert run.run_id == t.run_id and run.status == "FINISHED" and run.params == {"optim.lr": "0.1"}
        assert run.tags[LOGGED_THROUGH_TAG] == "60"
        assert_every_step_once(server.uri, run.run_id, list(range(1, 61)), logged)


@pytest.mark.mlflow_server
def test_server_down_at_start_gets_one_run_with_every_step(tmp_path):
    server = MlflowServer(tmp_path / "server")  # its port is chosen; nothing listens there yet
    started_ms = time.time() * 1000
    t = tracker(server.uri, tmp_path / "spool", "late", start_wait_s=5.0, run_name="late-run")
    assert t.run_id is None
    t.log_params({"optim.lr": 0.1, "data.seed": 3})
    t.set_tags({"vlbert.world_size": "1"})
    t.log_text("optim:\n  lr: 0.1\n", "config/config.yaml")
    logged = {}
    with server:
        for step in range(1, 41):
            if step == 10:
                server.start().wait()
                came_up = time.monotonic()
            t.log_metrics({"loss": loss(step)}, step)
            logged[step] = time.time() * 1000
            time.sleep(0.02)
        while t.run_id is None and time.monotonic() - came_up < 30:  # what the next checkpoint records
            time.sleep(0.1)
        assert t.run_id is not None, "the run was not created after the server came back"
        t.close()
        assert t.unsent == 0
        (run,) = fetch_runs(server.uri, experiment="late")
        assert run.run_id == t.run_id and run.name == "late-run" and run.status == "FINISHED"
        assert run.params == {"optim.lr": "0.1", "data.seed": "3"} and run.tags["vlbert.world_size"] == "1"
        assert run.tags[RUN_KEY_TAG] == t.run_key
        assert abs(run.start_ms - started_ms) < 2000  # started when training did, not when the server came up
        assert_every_step_once(server.uri, run.run_id, list(range(1, 41)), logged)
        artifacts = list((tmp_path / "server" / "artifacts").rglob("config.yaml"))
        assert [p.read_text() for p in artifacts] == ["optim:\n  lr: 0.1\n"]


_KILLED_ATTEMPT = """
import json, os, signal, sys, time
from vlbert.config import TrackingConfig
from vlbert.tracking import MlflowTracker
from vlbert.tracking.spool import Spool
uri, spool, ckpt = sys.argv[1:4]
t = MlflowTracker(TrackingConfig(experiment="killed", tracking_uri=uri, system_metrics=False, retry_max_s=0.5),
                  spool_dir=spool, start_wait_s=5)
t.log_params({"optim.lr": 0.1})
logged = {}
for step in range(1, 6):
    t.log_metrics({"loss": 100.0 - step}, step)
    logged[step] = time.time() * 1000
    if step == 3:  # the checkpoint: no run id yet, but the key
        json.dump({"step": 3, "mlflow_run_id": t.run_id, "mlflow_run_key": t.run_key, "logged": logged},
                  open(ckpt, "w"))
deadline = time.monotonic() + 30
while Spool(spool).count("metrics") < 5 and time.monotonic() < deadline:  # on disk, then die
    time.sleep(0.05)
json.dump(logged, open(ckpt + ".logged", "w"))
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.mlflow_server
def test_killed_while_server_down_then_resumed_logs_every_step_once(tmp_path):
    server = MlflowServer(tmp_path / "server")
    spool, ckpt = tmp_path / "spool", tmp_path / "ckpt.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", _KILLED_ATTEMPT, server.uri, str(spool), str(ckpt)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    meta = json.loads(ckpt.read_text())
    logged = {int(k): v for k, v in json.loads(Path(str(ckpt) + ".logged").read_text()).items()}
    assert meta["mlflow_run_id"] is None and meta["mlflow_run_key"]
    assert Spool(spool).count("metrics") == 5  # steps 1-5 survived the kill

    with server:
        server.start().wait()
        # Resume from the step-3 checkpoint: steps 4 and 5 run (and are logged) again.
        t = tracker(server.uri, spool, "killed", run_key=meta["mlflow_run_key"])
        t.log_params({"optim.lr": 0.1})
        for step in range(4, 9):
            t.log_metrics({"loss": loss(step, attempt=1 if step <= 5 else 0)}, step)
            logged.setdefault(step, time.time() * 1000)
        t.close()
        assert t.unsent == 0
        (run,) = fetch_runs(server.uri, experiment="killed")  # ONE run
        assert run.run_id == t.run_id and run.status == "FINISHED" and run.tags[LOGGED_THROUGH_TAG] == "8"
        # 4 and 5 from the attempt that logged them first (the killed one), each once
        assert_every_step_once(server.uri, run.run_id, list(range(1, 9)), logged)


@pytest.mark.mlflow_server
def test_server_that_never_returns_bounds_the_spool_counts_the_loss_and_replay_sends_the_rest(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there during training
    spool = tmp_path / "spool"
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, logger="vlbert.tracking"):
            t = tracker(uri, spool, "bounded", start_wait_s=5.0, spool_max_records=50, drain_timeout_s=1.0)
            t.log_params({"optim.lr": 0.1})
            base = None
            for step in range(20000):
                t.log_metrics({"loss": loss(step), "acc": 0.5}, step)
                if step == 1000:
                    base = tracemalloc.get_traced_memory()[0]
            deadline = time.monotonic() + 60
            while not t._queue.empty() and time.monotonic() < deadline:  # all spooled (or dropped)
                time.sleep(0.05)
            grown = tracemalloc.get_traced_memory()[0] - base
            t.close()
    finally:
        tracemalloc.stop()
    # Keeping 19000 more calls in memory would take ~10 MB; the spool kept 50 on disk.
    assert grown < 1.5e6, grown
    assert t.run_id is None and t.dropped == 20000 - 50
    assert Spool(spool).count("metrics") == 50 and t.unsent == 50 + 2  # and the params, the status
    text = caplog.text
    assert "dropped 19950" in text or "lost 19950" in text
    assert f"vlbert-replay-tracking {spool} --tracking-uri {uri}" in text

    port = int(uri.rsplit(":", 1)[1])
    with MlflowServer(tmp_path / "server", port=port) as server:
        server.start().wait()
        res = subprocess.run([sys.executable, "-m", "vlbert.tracking.replay", str(spool), "--tracking-uri", uri],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert res.returncode == 0 and "sent 52 records; 0 left" in res.stdout, res.stdout + res.stderr
        (run,) = fetch_runs(uri, experiment="bounded")
        assert run.status == "FINISHED" and run.params == {"optim.lr": "0.1"} and run.tags[DROPPED_TAG] == "19950"
        assert fetch_metric_histories(uri, run.run_id, ["loss"])["loss"].steps == list(range(50))
    assert Spool(spool).count() == 0


def test_locked_sqlite_store_never_blocks_training_and_loses_nothing(tmp_path, sqlite_db):
    uri = f"sqlite:///{sqlite_db}"
    t = tracker(uri, tmp_path / "spool", "locked")
    logged, spooled_while_locked = {}, 0
    lock = sqlite3.connect(sqlite_db, isolation_level=None)
    for step in range(1, 41):
        if step == 10:
            assert t.flush(30)
            lock.execute("BEGIN EXCLUSIVE")  # another writer holds the database
        if step == 30:
            spooled_while_locked = Spool(tmp_path / "spool").count("metrics")
            lock.execute("COMMIT")
        t.log_metrics({"loss": loss(step)}, step)
        logged[step] = time.time() * 1000
        time.sleep(0.1)
    lock.close()
    t.close()
    # Logged while another writer held the database (a call that waited for it would never have
    # reached step 30, which releases it); call times: bench/tracking_spool.py.
    assert spooled_while_locked >= 15, spooled_while_locked
    assert t.unsent == 0
    assert_every_step_once(uri, t.run_id, list(range(1, 41)), logged)


def test_file_store_that_goes_away_and_returns(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
    root = tmp_path / "mlruns"
    uri = root.as_uri()
    t = tracker(uri, tmp_path / "spool", "files")
    logged = {}
    for step in range(1, 31):
        if step == 10:
            assert t.flush(30)
            root.rename(tmp_path / "away")  # an unmounted share: the path is there, the store is not
            root.write_text("")
        if step == 20:
            root.unlink()
            (tmp_path / "away").rename(root)
        t.log_metrics({"loss": loss(step)}, step)
        logged[step] = time.time() * 1000
        time.sleep(0.05)
    t.close()
    assert t.unsent == 0
    assert_every_step_once(uri, t.run_id, list(range(1, 31)), logged)


class _Killed(BaseException):
    pass


def test_crash_after_the_store_took_a_batch_does_not_send_it_twice(tmp_path, sqlite_db):
    """The store has a batch, the spool still has it (killed before forgetting): the next
    sender finds ``vlbert.spool_seq`` on the run and forgets those records instead of sending."""
    uri = f"sqlite:///{sqlite_db}"
    spool = Spool(tmp_path / "spool")
    spool.ensure_run("k", uri, "dup", "", None, int(time.time() * 1000))
    spool.append([Record("k", "a1", "metrics", {"loss": loss(s)}, s, 1000 + s) for s in range(1, 6)], 100)
    first = Sender(spool)

    def crash(*args, **kwargs):  # killed after the store took the batch, before the spool forgot it
        raise _Killed

    spool.delete_range = crash
    with pytest.raises(_Killed):
        first.send_pending()
    del spool.delete_range
    assert spool.count() == 5
    spool.append([Record("k", "a1", "metrics", {"loss": loss(s)}, s, 1000 + s) for s in range(6, 8)], 100)
    second = Sender(Spool(tmp_path / "spool"))
    assert second.send_pending() and second.sent == 2
    run_id = spool.run("k").run_id
    assert fetch_metric_histories(uri, run_id, ["loss"])["loss"].steps == list(range(1, 8))


def test_replay_refuses_a_spool_in_use_or_missing(tmp_path, capsys):
    from vlbert.tracking.replay import main
    from vlbert.tracking.spool import SpoolLock

    Spool(tmp_path / "spool").close()
    held = SpoolLock(tmp_path / "spool")  # a trainer still running there
    try:
        assert main([str(tmp_path / "spool")]) == 2
        assert "in use by another process" in capsys.readouterr().err
    finally:
        held.release()
    assert main([str(tmp_path / "nothing")]) == 2
    assert "no tracking spool" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    assert main([str(tmp_path / "spool")]) == 0  # free and empty: nothing to send
    assert "sent 0 records; 0 left" in capsys.readouterr().out
