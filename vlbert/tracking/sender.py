"""Send spooled records to the MLflow store, in order, exactly once (the trainer's sending thread and the
replay CLI both use this).

Runs. Each record belongs to a client-side run key (``spool.runs``). The first
time a key is needed its MLflow run is found or made: the id from the
checkpoint or the spool if it has one, else a run tagged ``vlbert.run_key=<key>``
(made by an attempt that died before it could write the id down), else a new
run created with that tag and the time of the first call as its start time.

Once each. Every ``log_batch`` also sets ``vlbert.spool_seq`` to
``<spool id>:<last seq in the batch>``; reaching a run, the sender deletes the
spooled records at or below it, so a crash between the store taking a batch
and the spool forgetting it does not send it twice. Metrics of a training step
that an earlier attempt of the run already logged are dropped
(``vlbert.logged_through_step``): each attempt's threshold is the last step the
run held (tag, or sent from this spool) when the sender first reached that
attempt's records, since everything spooled before them was sent by then.
Summary metrics (``log_summary``) are never dropped.

Errors. A store that cannot be reached, times out, answers 5xx/429 or reports a
locked database raises ``StoreUnavailable`` and nothing is lost (the caller
retries later). A record the store rejects for good (4xx: a bad value) is
dropped and counted in ``rejected``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from vlbert.tracking.common import (DROPPED_TAG, LOGGED_THROUGH_TAG, RUN_KEY_TAG, SPOOL_SEQ_TAG, artifact_location,
                                    set_http_defaults)
from vlbert.tracking.spool import Record, Spool

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 900  # MLflow's log_batch takes 1000 entities, leave room for the tags
MAX_PARAMS_PER_BATCH = 99


class StoreUnavailable(RuntimeError):
    """The store did not take a call; try again later."""


@dataclass
class _Run:
    run_id: str
    client: object
    logged_through: int
    params: dict[str, str]


def _permanent(e: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return False  # connection errors, OSError, ...: the store may come back
    status = e.get_http_status_code()
    return 400 <= status < 500 and status != 429


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


class Sender:
    """Drains a ``Spool`` into MLflow. ``uri``: send every run there instead of the URI it was logged for.
    ``own_key``: the run of the live trainer (marked RUNNING when reached). ``on_run(key, run_id)``:
    called when a run is reached."""

    def __init__(self, spool: Spool, uri: Optional[str] = None, own_key: Optional[str] = None,
                 on_run: Optional[Callable[[str, str], None]] = None):
        set_http_defaults()
        self.spool = spool
        self.uri = uri
        self.own_key = own_key
        self.on_run = on_run
        self.sent = 0  # records the store took
        self.skipped = 0  # metric records already logged by an earlier attempt
        self.rejected = 0  # records the store refused for good
        self._runs: dict[str, _Run] = {}
        self._skip: dict[str, int] = {}

    # ----------------------------------------------------------------- public

    def reach(self, key: str) -> str:
        """The run of ``key`` (found or created); its id. Raises ``StoreUnavailable``."""
        try:
            return self._run(key).run_id
        except StoreUnavailable:
            raise
        except Exception as e:
            raise StoreUnavailable(f"{type(e).__name__}: {e}") from e

    def send_pending(self, deadline: Optional[float] = None, page: int = 500) -> bool:
        """Send records in order until the spool is empty (True) or ``deadline`` (monotonic) passes
        (False). Raises ``StoreUnavailable`` at the first call the store does not take."""
        while True:
            records = self.spool.pending(page)
            if not records:
                return True
            new_runs = [k for k in dict.fromkeys(r.run_key for r in records) if k not in self._runs]
            if new_runs:
                for key in new_runs:
                    self.reach(key)
                continue  # reaching a run forgets the records it already has: read them again
            i = 0
            while i < len(records):
                group = self._group(records, i)
                self._send_group(group)
                i += len(group)
                if deadline is not None and time.monotonic() > deadline:
                    return not self.spool.count()

    # ----------------------------------------------------------------- runs

    def _run(self, key: str) -> _Run:
        if key in self._runs:
            return self._runs[key]
        from mlflow import MlflowClient

        entry = self.spool.run(key)
        if entry is None:
            raise RuntimeError(f"spool {self.spool.directory} has records of an unknown run key {key}")
        uri = self.uri or entry.uri
        client = MlflowClient(uri)
        run = None
        if entry.run_id:
            try:
                run = client.get_run(entry.run_id)
            except Exception as e:
                if not _permanent(e):
                    raise
                log.warning("MLflow run %s is not in %s (%s); looking for run key %s or starting a new run",
                            entry.run_id, uri, e, key)
        if run is None:
            exp = client.get_experiment_by_name(entry.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                entry.experiment, artifact_location=artifact_location(uri))
            found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
            if found:
                run = found[0]
            else:
                run = client.create_run(exp_id, start_time=entry.created_ms, tags={RUN_KEY_TAG: key},
                                        run_name=entry.run_name or None)
                log.info("MLflow run %s in %s (experiment %s)", run.info.run_id, uri, entry.experiment)
            self.spool.set_run_id(key, run.info.run_id)
        state = _Run(run.info.run_id, client, int(run.data.tags.get(LOGGED_THROUGH_TAG, -1)), dict(run.data.params))
        if key == self.own_key and run.info.status != "RUNNING":
            client.update_run(state.run_id, status="RUNNING")
        spool_id, _, seq = run.data.tags.get(SPOOL_SEQ_TAG, "").partition(":")
        if spool_id == self.spool.id and seq.isdigit():
            self.spool.delete_range(0, int(seq), run_key=key)  # sent before a crash, not yet forgotten
        if state.logged_through >= 0 and key == self.own_key:
            log.info("continuing MLflow run %s (metrics logged through step %d)", state.run_id, state.logged_through)
        self._runs[key] = state
        if self.on_run is not None:
            self.on_run(key, state.run_id)
        return state

    # ----------------------------------------------------------------- records

    @staticmethod
    def _group(records: list[Record], i: int) -> list[Record]:
        """Consecutive metric records of one run, up to a batch; any other record alone."""
        first = records[i]
        if first.kind != "metrics":
            return [first]
        group, n = [first], len(first.payload)
        for r in records[i + 1:]:
            if r.kind != "metrics" or r.run_key != first.run_key or n + len(r.payload) > MAX_METRICS_PER_BATCH:
                break
            group.append(r)
            n += len(r.payload)
        return group

    def _send_group(self, group: list[Record]) -> None:
        key = group[0].run_key
        try:
            run = self._run(key)
            self._send(run, group)
        except Exception as e:
            if _not_found(e) and key in self._runs:
                self._runs.pop(key)  # the run went away: find or make it again on the next try
                raise StoreUnavailable(f"run {key} vanished from the store: {e}") from e
            if not _permanent(e) or key not in self._runs:
                raise StoreUnavailable(f"{type(e).__name__}: {e}") from e
            self.rejected += len(group)
            log.warning("MLflow rejected %d %s record(s) of run %s (%s); dropped", len(group), group[0].kind,
                        self._runs[key].run_id, e)
        self.spool.delete_range(group[0].seq, group[-1].seq)
        self.sent += len(group)

    def _threshold(self, run: _Run, r: Record) -> int:
        skip = self._skip.get(r.attempt)
        if skip is None:
            skip = self.spool.attempt_skip(r.attempt)
            if skip is None:  # the first record of this attempt: all earlier ones were sent
                skip = run.logged_through
                self.spool.set_attempt_skip(r.attempt, r.run_key, skip)
            self._skip[r.attempt] = skip
        return skip

    def _send(self, run: _Run, group: list[Record]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        seq_tag = RunTag(SPOOL_SEQ_TAG, f"{self.spool.id}:{group[-1].seq}")
        first = group[0]
        if first.kind == "metrics":
            entries, through = [], run.logged_through
            for r in group:
                if not r.summary and r.step <= self._threshold(run, r):
                    self.skipped += 1
                    continue
                entries += [Metric(k, float(v), r.ts, r.step) for k, v in r.payload.items()]
                through = max(through, r.step)
            for i in range(0, max(len(entries), 1), MAX_METRICS_PER_BATCH):  # one call unless a record is huge
                run.client.log_batch(run.run_id, metrics=entries[i:i + MAX_METRICS_PER_BATCH],
                                     tags=[RunTag(LOGGED_THROUGH_TAG, str(through)), seq_tag])
            run.logged_through = through
        elif first.kind == "params":
            new = {}
            for k, v in first.payload.items():
                old = run.params.get(k)
                if old is None:
                    new[k] = v
                elif old != v:
                    log.warning("param %s was %r in this run and is now %r; MLflow keeps the old value", k, old, v)
            plist = [Param(k, v) for k, v in new.items()]
            for i in range(0, max(len(plist), 1), MAX_PARAMS_PER_BATCH):
                run.client.log_batch(run.run_id, params=plist[i:i + MAX_PARAMS_PER_BATCH], tags=[seq_tag])
            run.params.update(new)
        elif first.kind == "tags":
            tlist = [RunTag(k, v) for k, v in first.payload.items()]
            for i in range(0, max(len(tlist), 1), MAX_PARAMS_PER_BATCH):
                run.client.log_batch(run.run_id, tags=tlist[i:i + MAX_PARAMS_PER_BATCH] + [seq_tag])
        elif first.kind == "text":
            text, artifact_file = first.payload
            run.client.log_text(run.run_id, text, artifact_file)  # idempotent: the same file again
        elif first.kind == "status":
            entry = self.spool.run(first.run_key)
            tags = [seq_tag] + ([RunTag(DROPPED_TAG, str(entry.dropped))] if entry and entry.dropped else [])
            run.client.log_batch(run.run_id, tags=tags)
            run.client.set_terminated(run.run_id, status=first.payload, end_time=first.ts)
