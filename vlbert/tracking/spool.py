"""The local spool: what the tracking store has not taken yet, on disk, in order (no mlflow import).

Every params/tags/metrics/text/status call of the tracker becomes one *record*
here (with its original step and timestamp) before anything is sent; the sender
deletes records once the store has them. So the spool is a write-ahead log whose
length is whatever the store is behind by: empty while the store keeps up, the
whole outage when it is down.

Why SQLite (``<dir>/spool.sqlite``, stdlib ``sqlite3``) rather than JSON lines:
a record is written in one transaction, so a crash (SIGKILL) can never leave
half a record; sent records are deleted without rewriting a file; the run
table, the per-attempt skip rule and the records change together; and the
trainer's two threads (one appending, one sending) share it safely. WAL
journal with ``synchronous=NORMAL``: a committed record survives the process
being killed at any point; an OS crash or power cut may lose the last few
commits (the ones since the last WAL checkpoint), which is the fsync cost we
do not pay per logged step.

Tables: ``runs`` (one row per client-side run key: the store URI, experiment,
run name, the MLflow run id once it exists, the metric records dropped by the
bound), ``attempts`` (the step threshold below which an attempt's metrics were
already logged by an earlier attempt, fixed when the sender first reaches
that attempt), ``records`` (``seq`` increasing, never reused: the order).

Bound: at most ``max_metric_records`` metric records wait here; past that new
metric records are dropped (the spool keeps the start of an outage, so a
replay leaves one hole at its end rather than many) and counted per run.
Params, tags, texts and statuses are few and always kept.

One process at a time: ``SpoolLock`` (``flock`` on ``<dir>/lock``), held by the
trainer for its whole life and by the replay CLI.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

DB_NAME = "spool.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (key TEXT PRIMARY KEY, uri TEXT NOT NULL, experiment TEXT NOT NULL,
    run_name TEXT NOT NULL, run_id TEXT, created_ms INTEGER NOT NULL, dropped INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS attempts (attempt TEXT PRIMARY KEY, run_key TEXT NOT NULL, skip_through INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, run_key TEXT NOT NULL,
    attempt TEXT NOT NULL, kind TEXT NOT NULL, step INTEGER NOT NULL, ts INTEGER NOT NULL,
    summary INTEGER NOT NULL, payload TEXT NOT NULL);
"""
KINDS = ("params", "tags", "metrics", "text", "status")


class SpoolBusy(RuntimeError):
    """Another process holds the spool."""


@dataclass
class Record:
    """One tracker call. ``payload``: params/tags ``{name: str}``, metrics ``{name: float}``,
    text ``[text, artifact_file]``, status ``"FINISHED"`` etc."""

    run_key: str
    attempt: str
    kind: str
    payload: Any
    step: int = 0
    ts: int = 0  # milliseconds since the epoch, when the call was made
    summary: bool = False  # metrics logged even at a step an earlier attempt logged
    seq: int = 0  # set by the spool


@dataclass
class RunEntry:
    key: str
    uri: str
    experiment: str
    run_name: str
    run_id: Optional[str]
    created_ms: int
    dropped: int


class SpoolLock:
    """Exclusive, non-blocking ``flock`` on ``<dir>/lock``; released by ``release`` or process exit."""

    def __init__(self, directory: str | os.PathLike):
        Path(directory).mkdir(parents=True, exist_ok=True)
        self._fd = os.open(Path(directory) / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise SpoolBusy(f"{directory} is in use by another process (a trainer or a replay)") from None

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


class Spool:
    """One connection to the spool in ``directory``; one per thread."""

    def __init__(self, directory: str | os.PathLike, create: bool = True):
        self.directory = Path(directory)
        path = self.directory / DB_NAME
        if not create and not path.is_file():
            raise FileNotFoundError(f"no tracking spool at {path}")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None)  # explicit transactions
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._tx():
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(statement)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('spool_id', ?)", (uuid.uuid4().hex,))
        self.id: str = self._db.execute("SELECT value FROM meta WHERE key = 'spool_id'").fetchone()[0]
        self._metric_count: Optional[int] = None

    def _tx(self):
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()

    # ----------------------------------------------------------------- runs

    def ensure_run(self, key: str, uri: str, experiment: str, run_name: str, run_id: Optional[str],
                   created_ms: int) -> RunEntry:
        """The entry of ``key``, made if new; ``run_id`` (from a checkpoint) fills a missing id."""
        with self._tx():
            self._db.execute("INSERT OR IGNORE INTO runs (key, uri, experiment, run_name, run_id, created_ms) "
                             "VALUES (?, ?, ?, ?, ?, ?)", (key, uri, experiment, run_name, run_id, created_ms))
            if run_id:
                self._db.execute("UPDATE runs SET run_id = ? WHERE key = ? AND run_id IS NULL", (run_id, key))
        return self.run(key)

    def run(self, key: str) -> Optional[RunEntry]:
        row = self._db.execute("SELECT key, uri, experiment, run_name, run_id, created_ms, dropped FROM runs "
                               "WHERE key = ?", (key,)).fetchone()
        return RunEntry(*row) if row else None

    def run_by_id(self, run_id: str) -> Optional[RunEntry]:
        row = self._db.execute("SELECT key FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return self.run(row[0]) if row else None

    def set_run_id(self, key: str, run_id: str) -> None:
        with self._tx():
            self._db.execute("UPDATE runs SET run_id = ? WHERE key = ?", (run_id, key))

    def attempt_skip(self, attempt: str) -> Optional[int]:
        row = self._db.execute("SELECT skip_through FROM attempts WHERE attempt = ?", (attempt,)).fetchone()
        return None if row is None else int(row[0])

    def set_attempt_skip(self, attempt: str, run_key: str, skip_through: int) -> None:
        with self._tx():
            self._db.execute("INSERT OR REPLACE INTO attempts VALUES (?, ?, ?)", (attempt, run_key, skip_through))

    # ----------------------------------------------------------------- records

    def append(self, records: list[Record], max_metric_records: int) -> int:
        """Append ``records`` in order (one transaction); returns how many metric records the bound dropped."""
        if not records:
            return 0
        dropped: dict[str, int] = {}
        rows = []
        n_metrics = sum(r.kind == "metrics" for r in records)
        if self._metric_count is None or self._metric_count + n_metrics > max_metric_records:
            self._metric_count = self.count("metrics")  # the sender deletes; refresh only near the bound
        for r in records:
            if r.kind not in KINDS:
                raise ValueError(f"unknown record kind {r.kind!r}")
            if r.kind == "metrics":
                if self._metric_count >= max_metric_records:
                    dropped[r.run_key] = dropped.get(r.run_key, 0) + 1
                    continue
                self._metric_count += 1
            rows.append((r.run_key, r.attempt, r.kind, int(r.step), int(r.ts), int(r.summary), json.dumps(r.payload)))
        with self._tx():
            self._db.executemany("INSERT INTO records (run_key, attempt, kind, step, ts, summary, payload) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            for key, n in dropped.items():
                self._db.execute("UPDATE runs SET dropped = dropped + ? WHERE key = ?", (n, key))
        return sum(dropped.values())

    def add_dropped(self, run_key: str, n: int) -> None:
        """Count ``n`` calls of ``run_key`` lost before they reached the spool (a full queue)."""
        with self._db:
            self._db.execute("UPDATE runs SET dropped = dropped + ? WHERE key = ?", (n, run_key))

    def pending(self, limit: int) -> list[Record]:
        rows = self._db.execute("SELECT seq, run_key, attempt, kind, step, ts, summary, payload FROM records "
                                "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [Record(run_key=k, attempt=a, kind=kind, payload=json.loads(p), step=step, ts=ts, summary=bool(s),
                       seq=seq) for seq, k, a, kind, step, ts, s, p in rows]

    def delete_range(self, first_seq: int, last_seq: int, run_key: Optional[str] = None) -> None:
        """Forget records ``first_seq..last_seq`` (of ``run_key`` only, when given): the store has them."""
        sql, args = "DELETE FROM records WHERE seq BETWEEN ? AND ?", [first_seq, last_seq]
        if run_key is not None:
            sql, args = sql + " AND run_key = ?", args + [run_key]
        with self._tx():
            self._db.execute(sql, args)

    def count(self, kind: Optional[str] = None) -> int:
        if kind is None:
            return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM records WHERE kind = ?", (kind,)).fetchone()[0]

    def last_seq(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        return int(row[0]) if row else 0

    def first_seq(self) -> Optional[int]:
        return self._db.execute("SELECT MIN(seq) FROM records").fetchone()[0]

    def describe(self) -> str:
        """What is waiting, per run, in words: '300 metric records (steps 62-159), 1 params, ...'."""
        parts = []
        for key, kind, n, lo, hi in self._db.execute(
                "SELECT run_key, kind, COUNT(*), MIN(step), MAX(step) FROM records GROUP BY run_key, kind "
                "ORDER BY run_key, kind"):
            entry = self.run(key)
            who = (entry.run_id if entry and entry.run_id else f"not yet created, key {key}")
            steps = f" (steps {lo}-{hi})" if kind == "metrics" else ""
            parts.append(f"{n} {kind} records{steps} of run {who}")
        return "; ".join(parts) or "nothing"


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False
