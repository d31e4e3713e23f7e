"""MLflow tracking (vlbert/tracking) against the embedded SQLite store: what a run
records, one value per step after a resume, a stopped server never blocking training,
and the read side used by the comparison tool."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from vlbert.config import Config, TrackingConfig, flatten
from vlbert.tracking import (LOGGED_THROUGH_TAG, MlflowTracker, NullTracker, TrackingError, build_tracker,
                                   fetch_metric_histories, fetch_runs)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def cfg(store, experiment, **kw) -> TrackingConfig:
    kw.setdefault("system_metrics", False)
    return TrackingConfig(experiment=experiment, tracking_uri=store, **kw)


def test_rank_zero_only():
    assert isinstance(build_tracker(TrackingConfig(), rank=1), NullTracker)
    assert not isinstance(build_tracker(TrackingConfig(), rank=1), MlflowTracker)
    assert isinstance(build_tracker(TrackingConfig(enabled=False), rank=0), NullTracker)


def test_run_records_config_tags_metrics_artifacts_and_system_metrics(store):
    t = MlflowTracker(cfg(store, "record", run_name="first", system_metrics=True), system_metrics_interval_s=0.2)
    params = flatten(Config().to_dict())
    t.log_params(params)
    t.set_tags({"vlbert.world_size": "2"})
    for step in (1, 2, 3):
        t.log_metrics({"loss": 10.0 - step, "samples_seen": 8.0 * step}, step)
    assert t.flush()
    t.log_metrics({"val_loss": 5.0}, 3)  # a second batch at a step already logged (validation)
    t.log_text("optim:\n  lr: 0.1\n", "config/config.yaml")
    time.sleep(1.0)  # a few system-metric samples
    t.close()

    (run,) = fetch_runs(store, experiment="record")
    assert run.run_id == t.run_id and run.name == "first" and run.status == "FINISHED"
    assert run.params["optim.lr"] == str(Config().optim.lr) and len(run.params) == len(params)
    assert run.tags["vlbert.world_size"] == "2" and run.tags[LOGGED_THROUGH_TAG] == "3"
    assert any(k.startswith("system/") for k in run.metrics), sorted(run.metrics)
    hist = fetch_metric_histories(store, run.run_id, ["loss", "samples_seen", "absent"])
    assert set(hist) == {"loss", "samples_seen"}
    assert hist["loss"].steps == [1, 2, 3] and hist["loss"].values == [9.0, 8.0, 7.0]
    assert fetch_metric_histories(store, run.run_id, ["val_loss"])["val_loss"].steps == [3]
    artifact = Path(store[len("sqlite:///"):]).parent / "mlartifacts"
    assert [p.read_text() for p in artifact.rglob("config.yaml")] == ["optim:\n  lr: 0.1\n"]


def test_resumed_run_continues_with_one_value_per_step(store):
    crashed = MlflowTracker(cfg(store, "resume"))
    crashed.log_params({"optim.lr": 0.1, "optim.total_steps": 8})
    for step in range(1, 6):  # checkpoint at 3; crash after step 5 was logged
        crashed.log_metrics({"loss": float(step)}, step)
    assert crashed.flush()  # then SIGKILL: no close, the run stays RUNNING
    run_id = crashed.run_id

    resumed = MlflowTracker(cfg(store, "resume"), run_id=run_id)
    assert resumed.run_id == run_id
    resumed.log_params({"optim.lr": 0.1, "optim.total_steps": 8, "new.key": 1})
    for step in range(4, 9):  # from the checkpoint at 3
        resumed.log_metrics({"loss": step + 0.5}, step)
    resumed.close()

    (run,) = fetch_runs(store, run_ids=[run_id])
    assert run.status == "FINISHED" and run.params["new.key"] == "1"
    loss = fetch_metric_histories(store, run_id, ["loss"])["loss"]
    assert loss.steps == list(range(1, 9))  # one value per step
    assert loss.values == [1, 2, 3, 4, 5, 6.5, 7.5, 8.5]


def test_a_stopped_server_never_blocks_training(caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # How long a call takes is measured in bench/tracking_spool.py; here: 2000 calls, more than the
    # queue holds, all return while nothing answers (a call that waited on the store would wait for
    # ever: the test's time limit ends it), and the tracker says so.
    with caplog.at_level(logging.WARNING, logger="vlbert.tracking"):
        t = MlflowTracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", experiment="x"), queue_size=50)
        for step in range(2000):
            t.log_metrics({"loss": 1.0}, step)
        t.log_params({"a": 1})
        t.close(timeout_s=10)
    assert t.run_id is None and "tracking unavailable" in caplog.text


def test_fetch_runs_by_name_filter_and_errors(store):
    ids = {}
    for name, lr in (("a", "0.1"), ("b", "0.2"), ("c", "0.2")):
        t = MlflowTracker(cfg(store, "fetch", run_name=name))
        t.log_params({"optim.lr": lr})
        t.close()
        ids[name] = t.run_id
    assert [r.name for r in fetch_runs(store, experiment="fetch")] == ["a", "b", "c"]
    assert [r.name for r in fetch_runs(store, experiment="fetch", names=["c", "a"])] == ["a", "c"]
    assert [r.name for r in fetch_runs(store, "fetch", filter_string="params.`optim.lr` = '0.2'")] == ["b", "c"]
    assert [r.run_id for r in fetch_runs(store, run_ids=[ids["c"], ids["a"]])] == [ids["c"], ids["a"]]
    with pytest.raises(TrackingError, match="experiment 'nope' not found"):
        fetch_runs(store, experiment="nope")
    with pytest.raises(TrackingError, match="not found"):
        fetch_runs(store, run_ids=["0" * 32])
