"""The trainer's tracker: every call is kept on disk until MLflow has it; training never waits.

``build_tracker`` gives rank 0 an ``MlflowTracker`` and every other rank a
``NullTracker`` (same methods, no effect).

Store. ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the
embedded SQLite store ``mlflow.db`` in the working folder; artifacts of a new
experiment in a SQLite store go to ``mlartifacts/`` next to the database.

Path of a call. The training thread puts it on a bounded in-memory queue (a
full queue drops the newest call and counts it) and returns. A *spooling*
thread appends queued calls to the spool (``spool.py``: SQLite on disk,
bounded by ``tracking.spool_max_records``) with their original steps and
timestamps. A *sending* thread sends the spool in order (``sender.py``) and
deletes what the store took; when the store fails (down, timing out, locked)
it retries with exponential backoff (1 s doubling to ``tracking.retry_max_s``),
and the spool grows meanwhile. A run whose store is down at the start is
created when the store answers and receives everything logged until then;
``run_id`` is ``None`` until that moment and the id then, so the next
checkpoint records it. The checkpoint also records ``run_key`` (client-side,
made before the run exists): a resumed attempt handed that key continues the
same run whether or not the run was created yet.

Resumed runs. A resumed attempt re-logs the steps between its checkpoint and
the crash; those steps were logged (or spooled) by the crashed attempt, and the
first value wins: metrics at steps up to ``vlbert.logged_through_step`` as it
stood when the earlier attempts' records were all sent are dropped (see
``sender.py``), so the run keeps one value per step. Spooled records an
earlier attempt left are replayed first, in order, whether or not they belong
to the run being resumed.

End. ``close`` waits up to ``tracking.drain_timeout_s`` for the spool to
empty, then logs what is still unsent and the command that sends it later
(``vlbert-replay-tracking``). The final status is a record too, so
the replay also ends the run.

System metrics: MLflow's monitor, started once the run exists; its samples
during an outage are lost (they are not spooled). If it cannot start, psutil
CPU/RAM values are added to the training metrics, sampled when spooled.
"""

from __future__ import annotations

import logging
import queue
import random
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from vlbert.config import TrackingConfig
from vlbert.tracking.common import param_value, replay_command, resolve_tracking_uri, set_http_defaults
from vlbert.tracking.sender import Sender, StoreUnavailable
from vlbert.tracking.spool import Record, Spool, SpoolBusy, SpoolLock

log = logging.getLogger(__name__)

FIRST_RETRY_S = 1.0


class NullTracker:
    """What ranks other than 0 (and disabled tracking) get."""

    run_id: Optional[str] = None
    run_key: Optional[str] = None

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

    def close(self, status: str = "FINISHED", timeout_s: Optional[float] = None) -> None:
        pass


class _Control:
    """A flush or close request travelling through the queue behind the calls before it."""

    def __init__(self, kind: str, status: str = "", deadline: float = 0.0):
        self.kind, self.status, self.deadline = kind, status, deadline
        self.seq = -1  # the last spooled seq before it, set by the spooling thread
        self.done = threading.Event()


class MlflowTracker(NullTracker):
    """Rank 0's tracker; see the module docstring.

    ``run_id``/``run_key``: the run to continue (from a checkpoint). ``spool_dir``:
    else ``tracking.spool_dir``, else a new temporary folder. ``start_wait_s``: the
    constructor waits this long for the first try to reach the run (so that
    ``run_id`` is known at once when the store is up).
    """

    def __init__(self, cfg: TrackingConfig, run_id: Optional[str] = None, run_key: Optional[str] = None,
                 spool_dir: Optional[str] = None, queue_size: int = 10000, system_metrics_interval_s: float = 10.0,
                 start_wait_s: float = 30.0):
        set_http_defaults()
        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg.tracking_uri)
        self.run_key = run_key or uuid.uuid4().hex
        self.attempt = uuid.uuid4().hex
        self.spool_dir = self._lock_spool(spool_dir or cfg.spool_dir)
        self.dropped = 0  # calls lost: in-memory queue full, or metric records past the spool's bound
        self._lost_in_queue = 0  # of those, lost to a full queue and not yet counted in the spool
        self.unsent = 0  # records still in the spool after close
        self._run_id = run_id
        self._monitor = None
        self._sys_interval = system_metrics_interval_s
        self._last_warning: dict[str, float] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._wake = threading.Event()  # the sending thread has something to do
        self._reached = threading.Event()  # the first try to reach the run is over
        self._flushes: list[_Control] = []
        self._closing: Optional[_Control] = None
        self._lock = threading.Lock()
        self._closed = False
        self._unsent_text = ""
        spool = Spool(self.spool_dir)
        known = spool.run_by_id(run_id) if run_id and not run_key else None
        if known is not None:  # a checkpoint without a key: the spool knows the run under one
            self.run_key = known.key
        entry = spool.ensure_run(self.run_key, self.uri, cfg.experiment, cfg.run_name, run_id,
                                 int(time.time() * 1000))
        if run_id and entry.run_id != run_id:
            log.warning("spool %s knows run key %s as MLflow run %s, the checkpoint says %s; using %s",
                        self.spool_dir, self.run_key, entry.run_id, run_id, run_id)
            spool.set_run_id(self.run_key, run_id)
        if spool.count():
            log.warning("tracking spool %s holds records an earlier attempt did not send (%s); sending them first",
                        self.spool_dir, spool.describe())
        spool.close()
        self._spooler = threading.Thread(target=self._spool_loop, name="mlflow-spool", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-send", daemon=True)
        self._spooler.start()
        self._sender.start()
        self._reached.wait(start_wait_s)

    @property
    def run_id(self) -> Optional[str]:
        return self._run_id

    def _lock_spool(self, wanted: str) -> Path:
        directory = Path(wanted) if wanted else Path(tempfile.mkdtemp(prefix="vlbert-mlflow-spool-"))
        try:
            self._spool_lock = SpoolLock(directory)
        except SpoolBusy as e:  # another trainer in the same output folder: keep tracking, apart
            directory = Path(tempfile.mkdtemp(prefix="vlbert-mlflow-spool-"))
            log.warning("%s; spooling to %s instead", e, directory)
            self._spool_lock = SpoolLock(directory)
        return directory

    # ----------------------------------------------------------------- training thread

    def _put(self, item: Any) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped += 1
                self._lost_in_queue += 1  # written to the spool's count by the spooling thread
            self._warn("full", "tracking queue full (the spool cannot keep up): dropped %d calls so far", self.dropped)

    def _record(self, kind: str, payload: Any, step: int = 0, summary: bool = False) -> None:
        self._put(Record(self.run_key, self.attempt, kind, payload, step, int(time.time() * 1000), summary))

    def log_params(self, params: dict[str, Any]) -> None:
        self._record("params", {k: param_value(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._record("tags", {k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._record("metrics", {k: float(v) for k, v in metrics.items()}, step)

    def log_summary(self, metrics: dict[str, float], step: int) -> None:
        """Metrics computed after training (evaluations, probes) at ``step``, which
        the training attempts may already have logged other metrics at."""
        self._record("metrics", {k: float(v) for k, v in metrics.items()}, step, summary=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._record("text", [text, artifact_file])

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far reached the store; False on timeout (it stays spooled)."""
        control = _Control("flush")
        self._put(control)
        return control.done.wait(timeout_s)

    def close(self, status: str = "FINISHED", timeout_s: Optional[float] = None) -> None:
        """Mark the run ``status`` (a spooled record too), wait up to ``timeout_s`` (default
        ``tracking.drain_timeout_s``) for the spool to empty, report what is left."""
        if self._closed:
            return
        self._closed = True
        timeout_s = self.cfg.drain_timeout_s if timeout_s is None else timeout_s
        control = _Control("close", status, time.monotonic() + timeout_s)
        try:
            self._queue.put(control, timeout=max(timeout_s, 5.0))
        except queue.Full:
            log.warning("tracking queue still full after %.0f s; closing without the last calls", timeout_s)
            control.deadline = time.monotonic()
            self._closing = control
            self._wake.set()
        self._spooler.join(10.0 + timeout_s)
        self._sender.join(10.0 + max(0.0, control.deadline - time.monotonic()))
        if self._sender.is_alive():  # stuck in a call to the store: what it holds stays spooled
            log.warning("MLflow store %s did not answer within %.0f s; closing without it", self.uri, timeout_s)
            spool = Spool(self.spool_dir)
            self.unsent, self._unsent_text = spool.count(), spool.describe()
            spool.close()
        self._report()
        self._spool_lock.release()

    # ----------------------------------------------------------------- spooling thread

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_warning.get(key, -1e9) >= 60.0:
            self._last_warning[key] = now
            log.warning(msg, *args)

    def _spool_loop(self) -> None:
        spool = Spool(self.spool_dir)
        try:
            while True:
                items = [self._queue.get()]
                while len(items) < 1000:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                records = []
                for item in items:
                    if isinstance(item, _Control):
                        if item.kind == "close":
                            records.append(Record(self.run_key, self.attempt, "status", item.status, 0,
                                                  int(time.time() * 1000)))
                        self._append(spool, records)
                        records = []
                        item.seq = spool.last_seq()
                        with self._lock:
                            if item.kind == "close":
                                self._closing = item
                            else:
                                self._flushes.append(item)
                        self._wake.set()
                        if item.kind == "close":
                            return
                    else:
                        if item.kind == "metrics" and self._monitor is None and self.cfg.system_metrics \
                                and not item.summary:
                            item.payload.update(_psutil_metrics())
                        records.append(item)
                self._append(spool, records)
                self._wake.set()
        except Exception:  # a broken disk must not stop training; what was queued is lost
            log.exception("tracking spool %s failed; tracking stops", self.spool_dir)
            with self._lock:
                self._closing = self._closing or _Control("close", deadline=time.monotonic())
            self._wake.set()
        finally:
            spool.close()

    def _append(self, spool: Spool, records: list[Record]) -> None:
        with self._lock:
            lost, self._lost_in_queue = self._lost_in_queue, 0
        if lost:  # before the records that came after them (the final status reads the count)
            spool.add_dropped(self.run_key, lost)
        dropped = spool.append(records, self.cfg.spool_max_records)
        if dropped:
            with self._lock:
                self.dropped += dropped
            self._warn("bound", "tracking spool full (%d metric records, tracking.spool_max_records): dropped %d "
                       "metric records so far", self.cfg.spool_max_records, self.dropped)

    # ----------------------------------------------------------------- sending thread

    def _on_run(self, key: str, run_id: str) -> None:
        if key != self.run_key:
            return
        first = self._run_id is None or self._run_id != run_id
        self._run_id = run_id
        if first and self._monitor is None and self.cfg.system_metrics:
            self._start_system_metrics(run_id)

    def _send_loop(self) -> None:
        spool = Spool(self.spool_dir)
        sender = Sender(spool, own_key=self.run_key, on_run=self._on_run)
        failures, next_try, own_reached, closing_seen = 0, 0.0, False, False
        try:
            while True:
                with self._lock:
                    closing = self._closing
                if closing is not None and not closing_seen:
                    closing_seen, next_try = True, 0.0  # one more try at once, whatever the backoff
                if time.monotonic() >= next_try:
                    try:
                        if not own_reached:
                            sender.reach(self.run_key)
                            own_reached = True
                        sender.send_pending(deadline=closing.deadline if closing else None)
                        failures = 0
                    except StoreUnavailable as e:
                        failures += 1
                        pause = min(self.cfg.retry_max_s, FIRST_RETRY_S * 2 ** (failures - 1))
                        next_try = time.monotonic() + pause * random.uniform(0.8, 1.0)
                        self._warn("send", "MLflow tracking unavailable at %s (%s); training continues, %d records "
                                   "spooled in %s, retrying (every %.0f s at most)", self.uri, e, spool.count(),
                                   self.spool_dir, self.cfg.retry_max_s)
                    self._reached.set()
                first = spool.first_seq()
                with self._lock:
                    for control in [c for c in self._flushes if first is None or first > c.seq]:
                        control.done.set()
                        self._flushes.remove(control)
                if closing is not None and (first is None or time.monotonic() >= closing.deadline):
                    return
                wait = next_try - time.monotonic() if failures else None
                if closing is not None:
                    wait = min(wait if wait is not None else 1.0, closing.deadline - time.monotonic())
                self._wake.wait(timeout=None if wait is None else max(0.0, wait))
                self._wake.clear()
        except Exception:
            log.exception("tracking sender failed; what is unsent stays in %s", self.spool_dir)
        finally:
            self._reached.set()
            self._finish(spool)

    def _finish(self, spool: Spool) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:
                pass
        self.unsent = spool.count()
        self._unsent_text = spool.describe()
        spool.close()

    def _report(self) -> None:
        if self.dropped:
            log.warning("tracking lost %d calls (metric records past tracking.spool_max_records=%d, or the "
                        "in-memory queue full)", self.dropped, self.cfg.spool_max_records)
        if self.unsent:
            log.warning("tracking: %d records not sent to %s (%s); they are kept in %s. Send them with:\n  %s",
                        self.unsent, self.uri, self._unsent_text, self.spool_dir,
                        replay_command(str(self.spool_dir), self.uri))

    def _start_system_metrics(self, run_id: str) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=self._sys_interval,
                                                 resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:
            self._monitor = None
            log.info("MLflow system metrics unavailable (%s); logging psutil CPU/RAM instead", e)


def _psutil_metrics() -> dict[str, float]:
    try:
        import psutil

        mem = psutil.virtual_memory()
        return {"system/cpu_percent": psutil.cpu_percent(), "system/ram_used_gb": mem.used / 2**30,
                "system/ram_percent": mem.percent}
    except Exception:
        return {}


def build_tracker(cfg: TrackingConfig, rank: int, run_id: Optional[str] = None, run_key: Optional[str] = None,
                  spool_dir: Optional[str] = None) -> NullTracker:
    """``MlflowTracker`` on rank 0 when enabled, else ``NullTracker``. ``run_id``/``run_key``:
    the run to continue (from a checkpoint). ``spool_dir``: where unsent calls wait."""
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    return MlflowTracker(cfg, run_id=run_id, run_key=run_key, spool_dir=spool_dir)

