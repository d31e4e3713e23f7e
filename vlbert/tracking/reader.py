"""Reading runs and metric histories back (the comparison tool, tests): plain records, no MLflow objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from vlbert.tracking.common import TrackingError, resolve_tracking_uri


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
                    known = sorted(e.name for e in client.search_experiments())
                    raise TrackingError(f"experiment {name!r} not found in {tracking_uri}; experiments there: "
                                        f"{', '.join(known) or 'none'}")
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
