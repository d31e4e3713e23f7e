"""Run tracking with MLflow: the only module that imports ``mlflow``.

``build_tracker`` gives rank 0 an ``MlflowTracker`` and every other rank a
``NullTracker`` (same methods, no effect).

Store. ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the
embedded SQLite store ``mlflow.db`` in the working folder (MLflow 3 deprecates
the file store); artifacts of a new experiment in a SQLite store go to
``mlartifacts/`` next to the database.

Never in the way of training. The run is set up in the constructor (so that
its id is known to the first checkpoint) with short HTTP timeouts
(``MLFLOW_HTTP_REQUEST_TIMEOUT``/``MAX_RETRIES``/``BACKOFF_FACTOR`` default to
10 s / 1 / 1 here unless set): a refused connection costs nothing, a server
that accepts and never answers delays start-up by about 25 s. Everything after that goes through a
bounded queue to one background thread; a full queue drops the newest item
with a warning, a failed call warns (at most once a minute) and is dropped. If
the setup failed (server down) the thread tries again at most every
``SETUP_RETRY_S`` seconds; metrics logged meanwhile are lost, params and tags
are kept for when it succeeds.

Resumed runs. The checkpoint records the MLflow run id, and a resumed attempt
continues that run. Each metric batch also sets the tag
``vlbert.logged_through_step`` (in the same ``log_batch`` call) to the last
step logged so far. On resume the tracker reads that tag and drops metrics at
steps up to it: the steps between the checkpoint and the crash were logged by
the crashed attempt and are not logged again, so the history keeps one value
per step (from the attempt that logged it first; training is deterministic
given the checkpoint, so the training metrics agree up to GPU nondeterminism;
a metric of the crash step that had not been logged yet, e.g. validation,
stays missing). MLflow has no API to delete single metric values, which rules
out overwriting.
System metrics continue their own step counter (``resume_logging``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from vlbert.config import TrackingConfig

log = logging.getLogger(__name__)

LOGGED_THROUGH_TAG = "vlbert.logged_through_step"
SETUP_RETRY_S = 300.0
MAX_PARAM_CHARS = 5000
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(RuntimeError):
    """The tracking store could not be read (for the comparison tool)."""


def resolve_tracking_uri(cfg_uri: str = "") -> str:
    uri = cfg_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{os.path.abspath('mlflow.db')}"


def _artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment in a SQLite store keeps its artifacts: ``mlartifacts/`` next to the DB."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= MAX_PARAM_CHARS else s[:MAX_PARAM_CHARS] + f"...({len(s)} chars)"


# --------------------------------------------------------------------------- trackers


class NullTracker:
    """What ranks other than 0 (and disabled tracking) get."""

    run_id: Optional[str] = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_summary(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def flush(self, timeout_s: float = 30.0) -> bool:
        return True

    def close(self, status: str = "FINISHED", timeout_s: float = 30.0) -> None:
        pass


@dataclass
class _Item:
    kind: str  # params, tags, metrics, text, flush, close
    payload: Any = None
    step: int = 0
    timestamp_ms: int = 0
    done: Optional[threading.Event] = None
    summary: bool = False  # logged even at a step an earlier attempt already logged


class MlflowTracker(NullTracker):
    """Rank 0's tracker; see the module docstring."""

    def __init__(self, cfg: TrackingConfig, run_id: Optional[str] = None, queue_size: int = 10000,
                 system_metrics_interval_s: float = 10.0):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg.tracking_uri)
        self.run_id = run_id
        self.skip_through = -1  # metrics at steps <= this were logged by an earlier attempt of the run
        self.logged_through = -1  # the last step logged (the tag's value)
        self.dropped = 0
        self._resume_id = run_id
        self._client = None
        self._monitor = None
        self._sys_interval = system_metrics_interval_s
        self._last_setup = 0.0
        self._last_warning: dict[str, float] = {}
        self._pending: list[_Item] = []  # params/tags/texts waiting for a working store
        self._existing_params: dict[str, str] = {}
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=queue_size)
        self._setup()
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- main thread API

    def _put(self, item: _Item) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            self._warn("full", "tracking queue full (store slow or down): dropped %d items so far", self.dropped)

    def log_params(self, params: dict[str, Any]) -> None:
        self._put(_Item("params", {k: _param_value(v) for k, v in params.items()}))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._put(_Item("tags", {k: str(v) for k, v in tags.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._put(_Item("metrics", {k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000)))

    def log_summary(self, metrics: dict[str, float], step: int) -> None:
        """Metrics computed after training (evaluations, probes) at ``step``, which
        the training attempts may already have logged other metrics at."""
        self._put(_Item("metrics", {k: float(v) for k, v in metrics.items()}, step, int(time.time() * 1000),
                        summary=True))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(_Item("text", (text, artifact_file)))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far was handled; False on timeout."""
        done = threading.Event()
        self._put(_Item("flush", done=done))
        return done.wait(timeout_s)

    def close(self, status: str = "FINISHED", timeout_s: float = 30.0) -> None:
        """Flush, stop system metrics, mark the run ``status``; gives up after ``timeout_s``."""
        if not self._thread.is_alive():
            return
        try:
            self._queue.put(_Item("close", status), timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("tracking store did not answer within %.0f s; closing without it", timeout_s)

    # ----------------------------------------------------------------- worker

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, -1e9) >= 60.0:
            self._last_warning[key] = now
            log.warning(msg, *args)

    def _setup(self) -> None:
        """Open the store, find or create the experiment and run (resume: the same run)."""
        from mlflow import MlflowClient

        self._last_setup = time.monotonic()
        try:
            client = MlflowClient(self.uri)
            exp = client.get_experiment_by_name(self.cfg.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                self.cfg.experiment, artifact_location=_artifact_location(self.uri))
            run = None
            if self._resume_id:
                try:
                    run = client.get_run(self._resume_id)
                except Exception:
                    log.warning("MLflow run %s (from the checkpoint) is not in %s; starting a new run",
                                self._resume_id, self.uri)
            if run is not None:
                client.update_run(run.info.run_id, status="RUNNING")
                self.skip_through = self.logged_through = int(run.data.tags.get(LOGGED_THROUGH_TAG, -1))
                self._existing_params = dict(run.data.params)
                log.info("continuing MLflow run %s (metrics logged through step %d)", run.info.run_id,
                         self.skip_through)
            else:
                run = client.create_run(exp_id, run_name=self.cfg.run_name or None)
                self._existing_params = {}
                log.info("MLflow run %s in %s (experiment %s)", run.info.run_id, self.uri, self.cfg.experiment)
            self.run_id = run.info.run_id
            self._client = client
        except Exception as e:  # a down or broken store must not stop training
            self._warn("setup", "MLflow tracking unavailable at %s (%s: %s); training continues untracked",
                       self.uri, type(e).__name__, e)
            return
        if self.cfg.system_metrics:
            self._start_system_metrics(resume=self._resume_id == self.run_id)

    def _start_system_metrics(self, resume: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self._sys_interval,
                                                 resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:
            self._monitor = None
            log.info("MLflow system metrics unavailable (%s); logging psutil CPU/RAM instead", e)

    def _psutil_metrics(self) -> dict[str, float]:
        try:
            import psutil

            mem = psutil.virtual_memory()
            return {"system/cpu_percent": psutil.cpu_percent(), "system/ram_used_gb": mem.used / 2**30,
                    "system/ram_percent": mem.percent}
        except Exception:
            return {}

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            batch = [item]
            while item.kind == "metrics" and len(batch) < 100:  # coalesce consecutive metric items
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(item)
            metrics = [b for b in batch if b.kind == "metrics"]
            if metrics:
                self._handle_metrics(metrics)
            last = batch[-1]
            if last.kind != "metrics":
                if self._handle(last):
                    return

    def _ready(self) -> bool:
        if self._client is None and time.monotonic() - self._last_setup >= SETUP_RETRY_S:
            self._setup()
        if self._client is not None and self._pending:
            pending, self._pending = self._pending, []
            for item in pending:
                self._handle(item)
        return self._client is not None

    def _handle_metrics(self, items: list[_Item]) -> None:
        from mlflow.entities import Metric, RunTag

        if not self._ready():
            return
        entries = []
        for it in items:
            if it.step <= self.skip_through and not it.summary:
                continue  # logged by an earlier attempt of this run
            values = dict(it.payload)
            if self._monitor is None and self.cfg.system_metrics and not it.summary:
                values.update(self._psutil_metrics())
            entries += [Metric(k, v, it.timestamp_ms, it.step) for k, v in values.items()]
        for i in range(0, len(entries), 900):
            chunk = entries[i:i + 900]
            self.logged_through = max(self.logged_through, max(m.step for m in chunk))
            tags = [RunTag(LOGGED_THROUGH_TAG, str(self.logged_through))]
            try:
                self._client.log_batch(self.run_id, metrics=chunk, tags=tags)
            except Exception as e:
                self._warn("metrics", "MLflow log_batch failed (%s: %s); metrics dropped", type(e).__name__, e)

    def _handle(self, item: _Item) -> bool:
        """Handle a non-metric item; True when the worker should stop."""
        if item.kind == "flush":
            item.done.set()
            return False
        if item.kind == "close":
            self._finish(item.payload)
            return True
        if not self._ready():
            self._pending.append(item)
            return False
        from mlflow.entities import Param, RunTag

        try:
            if item.kind == "params":
                params = {}
                for k, v in item.payload.items():
                    old = self._existing_params.get(k)
                    if old is None:
                        params[k] = v
                    elif old != v:
                        self._warn("param:" + k, "param %s was %r in this run and is now %r; MLflow keeps the old "
                                   "value", k, old, v)
                plist = [Param(k, v) for k, v in params.items()]
                for i in range(0, len(plist), 100):
                    self._client.log_batch(self.run_id, params=plist[i:i + 100])
                self._existing_params.update(params)
            elif item.kind == "tags":
                tlist = [RunTag(k, v) for k, v in item.payload.items()]
                for i in range(0, len(tlist), 100):
                    self._client.log_batch(self.run_id, tags=tlist[i:i + 100])
            elif item.kind == "text":
                text, artifact_file = item.payload
                self._client.log_text(self.run_id, text, artifact_file)
        except Exception as e:
            self._warn(item.kind, "MLflow %s failed (%s: %s); dropped", item.kind, type(e).__name__, e)
        return False

    def _finish(self, status: str) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
        if self._client is not None:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as e:
                self._warn("close", "could not mark MLflow run %s %s (%s)", self.run_id, status, e)


def build_tracker(cfg: TrackingConfig, rank: int, run_id: Optional[str] = None) -> NullTracker:
    """``MlflowTracker`` on rank 0 when enabled, else ``NullTracker``. ``run_id``: the
    run to continue (from a checkpoint)."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_id=run_id)


# --------------------------------------------------------------------------- reading (compare tool)


@dataclass
class RunRecord:
    run_id: str
    name: str
    experiment_id: str
    status: str  # FINISHED, RUNNING, FAILED, KILLED, SCHEDULED
    start_ms: Optional[int]
    end_ms: Optional[int]
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value per key


@dataclass
class MetricHistory:
    """Every logged value of one metric, in store order (may hold repeated steps)."""

    key: str
    steps: list[int]
    values: list[float]
    timestamps: list[int]


def _record(run) -> RunRecord:
    info = run.info
    return RunRecord(run_id=info.run_id, name=info.run_name or "", experiment_id=info.experiment_id,
                     status=info.status, start_ms=info.start_time, end_ms=info.end_time,
                     params=dict(run.data.params), tags=dict(run.data.tags), metrics=dict(run.data.metrics))


def fetch_runs(tracking_uri: str, experiment: Union[str, Sequence[str], None] = None,
               run_ids: Optional[Sequence[str]] = None, names: Optional[Sequence[str]] = None,
               filter_string: Optional[str] = None) -> list[RunRecord]:
    """Runs by id (in the order given), or the runs of ``experiment`` (name or names;
    all experiments when None) matching ``filter_string`` (MLflow search syntax)
    and, when given, whose name is in ``names``; oldest first."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        if run_ids:
            out = []
            for rid in run_ids:
                try:
                    out.append(_record(client.get_run(rid)))
                except MlflowException as e:
                    raise TrackingError(f"run {rid} not found in {tracking_uri}: {e.message}") from None
            return out
        if experiment is None:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        else:
            exp_names = [experiment] if isinstance(experiment, str) else list(experiment)
            exp_ids = []
            for name in exp_names:
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise TrackingError(f"experiment {name!r} not found in {tracking_uri}")
                exp_ids.append(exp.experiment_id)
        runs, token = [], None
        while exp_ids:
            page = client.search_runs(exp_ids, filter_string=filter_string or "", max_results=1000,
                                      order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as e:
        raise TrackingError(f"cannot read runs from {tracking_uri}: {e.message}") from None
    records = [_record(r) for r in runs]
    if names:
        wanted = set(names)
        records = [r for r in records if r.name in wanted]
    return records


def fetch_metric_histories(tracking_uri: str, run_id: str, keys: Optional[Sequence[str]] = None
                           ) -> dict[str, MetricHistory]:
    """Full histories of ``keys`` (all of the run's metrics when None); keys the run lacks are left out."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        if keys is None:
            keys = sorted(client.get_run(run_id).data.metrics)
        out = {}
        for key in keys:
            hist = client.get_metric_history(run_id, key)
            if hist:
                out[key] = MetricHistory(key, [m.step for m in hist], [m.value for m in hist],
                                         [m.timestamp for m in hist])
        return out
    except MlflowException as e:
        raise TrackingError(f"cannot read metrics of run {run_id} from {tracking_uri}: {e.message}") from None



# --------------------------------------------------------------------------- bulk reading (compare tool)
# Added by the compare-tool helper. ``fetch_metric_histories`` above builds one ORM object
# (SQL store) or one protobuf message (server) per point: 1-2 s per metric of 20k points on
# a 2-core machine. This reads the same rows in bulk: one Core SELECT on SQL stores; plain
# JSON from ``get-history`` (or, with ``max_points``, the server-sampled
# ``get-history-bulk-interval``) in parallel on servers; other stores go through the client.

_HISTORY_PAGE = 25000  # the page size MlflowClient uses for get-history
_BULK_INTERVAL_MAX = 2500  # the server's cap on max_results of get-history-bulk-interval


def fetch_metric_histories_bulk(tracking_uri: str, keys_by_run: dict[str, Sequence[str]],
                                max_points: Optional[int] = None, workers: int = 8
                                ) -> dict[str, dict[str, MetricHistory]]:
    """``{run_id: [key, ...]}`` -> ``{run_id: {key: MetricHistory}}`` (keys a run lacks left out).

    ``max_points``: on a tracking server, the server samples each history to at most
    that many points (<= 2500; first and last kept). SQL stores always give everything.
    """
    from concurrent.futures import ThreadPoolExecutor

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    out: dict[str, dict[str, MetricHistory]] = {rid: {} for rid in keys_by_run}
    jobs = [(rid, key) for rid, keys in keys_by_run.items() for key in keys]

    def one(job: tuple[str, str]) -> MetricHistory:
        if isinstance(store, RestStore):
            return _rest_history(store, *job, max_points)
        hist = client.get_metric_history(*job)
        return MetricHistory(job[1], [m.step for m in hist], [m.value for m in hist], [m.timestamp for m in hist])

    try:
        if isinstance(store, SqlAlchemyStore):
            _sql_histories(store, keys_by_run, out)
        elif jobs:
            with ThreadPoolExecutor(min(workers, len(jobs))) as pool:
                for (rid, key), hist in zip(jobs, pool.map(one, jobs)):
                    if hist.steps:
                        out[rid][key] = hist
    except MlflowException as e:
        raise TrackingError(f"cannot read metric histories from {uri}: {e.message}") from None
    return out


def _sql_histories(store, keys_by_run: dict[str, Sequence[str]], out: dict[str, dict[str, MetricHistory]]) -> None:
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import select

    cols = (SqlMetric.run_uuid, SqlMetric.key, SqlMetric.step, SqlMetric.timestamp, SqlMetric.value,
            SqlMetric.is_nan)
    run_ids = list(keys_by_run)
    keys = sorted(set().union(*keys_by_run.values())) if run_ids else []
    with store.ManagedSessionMaker() as session:
        conn = session.connection()
        for i in range(0, len(run_ids), 500):  # bounded IN lists
            query = select(*cols).where(SqlMetric.run_uuid.in_(run_ids[i:i + 500]), SqlMetric.key.in_(keys))
            # Straight to the DB-API cursor: SQLAlchemy's row objects would double the time.
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(str(query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})))
                rows = cursor.fetchall()
            finally:
                cursor.close()
            for rid, key, step, ts, value, is_nan in rows:
                if key in keys_by_run[rid]:
                    hist = out[rid].setdefault(key, MetricHistory(key, [], [], []))
                    hist.steps.append(int(step))
                    hist.values.append(float("nan") if is_nan else float(value))
                    hist.timestamps.append(int(ts))


def _rest_history(store, run_id: str, key: str, max_points: Optional[int]) -> MetricHistory:
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    hist = MetricHistory(key, [], [], [])
    if max_points:
        endpoint = "/api/2.0/mlflow/metrics/get-history-bulk-interval"
        params = {"run_ids": run_id, "metric_key": key, "max_results": min(int(max_points), _BULK_INTERVAL_MAX)}
    else:
        endpoint = "/api/2.0/mlflow/metrics/get-history"
        params = {"run_id": run_id, "metric_key": key, "max_results": _HISTORY_PAGE}
    while params:
        resp = verify_rest_response(http_request(store.get_host_creds(), endpoint, "GET", params=params), endpoint)
        body = resp.json()
        for m in body.get("metrics", ()):
            hist.steps.append(int(m.get("step", 0)))
            hist.values.append(float(m.get("value", 0.0)))  # NaN and Infinity arrive as strings
            hist.timestamps.append(int(m.get("timestamp", 0)))
        token = body.get("next_page_token")
        params = dict(params, page_token=token) if token else None
    return hist
