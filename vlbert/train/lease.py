"""An exclusive lease on an output folder (or any one path), on local disk or an object store.

The lease is one small JSON object, e.g. ``<output_dir>/LEASE`` or ``NAME.tar.partial.lease``::

    {"holder": "slurm-job 1234 task 0", "host": "node7", "pid": 4242, "token": "9f...",
     "acquired_at": 1700000000.0, "heartbeat_at": 1700000060.0}

``acquire`` creates it atomically where the store can (``O_EXCL`` on a local disk,
S3's conditional put through fsspec's ``"xb"`` mode), otherwise writes it and reads
it back after a pause; either way the lease is held only when the object read back
carries this holder's random token. A thread rewrites ``heartbeat_at`` every
``heartbeat_s``. A second job finds the object and stops with ``LeaseHeld``, which
names the holder. The lease is taken over, with a warning, when it is stale: no
heartbeat for ``stale_after_s`` (wall clocks of different hosts are compared, so
keep that well above their skew), its holder is an earlier attempt of this same
Slurm job (Slurm runs one at a time), or a process of this host that is gone.
``release`` removes the object if it still carries our token.

A holder that finds another token in the object (it was taken over while this
process stalled) records it; ``check`` then raises ``LeaseLost`` so that nothing
more is published under the folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

LEASE = "LEASE"
READ_BACK_PAUSE_S = 2.0  # stores without an atomic create: how long a racing writer has to show up


class LeaseHeld(RuntimeError):
    """Another live job holds the lease."""


class LeaseLost(RuntimeError):
    """This job's lease was taken over by another job."""


def job_id() -> str:
    """Who we are: the Slurm job, step and task when under Slurm, else ``host:pid``."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-job {job} step {os.environ.get('SLURM_STEP_ID', '-')} task {os.environ.get('SLURM_PROCID', '0')}"
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


class Lease:
    """An exclusive lease on ``url`` (the lock object's own URL). Use as a context manager or
    ``acquire()`` / ``release()``. ``heartbeat_s`` defaults to a fifth of ``stale_after_s``."""

    def __init__(self, url: str, stale_after_s: float, holder: Optional[str] = None,
                 heartbeat_s: Optional[float] = None):
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.fs, self.path = fsspec.core.url_to_fs(url)
        self.url = self.fs.unstrip_protocol(self.path)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(1.0, stale_after_s / 5)
        self.holder = holder or job_id()
        self.token = uuid.uuid4().hex
        self.lost: Optional[str] = None  # the holder that took it over
        self._held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ----------------------------------------------------------------- the object

    def _record(self, acquired_at: float) -> dict[str, Any]:
        return {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "acquired_at": acquired_at, "heartbeat_at": time.time()}

    def _read(self) -> Optional[dict[str, Any]]:
        """The lease object, ``{}`` when it is unreadable or not ours to parse, None when absent."""
        try:
            with self.fs.open(self.path, "rb") as f:
                data = f.read(65536)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return {}
        return record if isinstance(record, dict) else {}

    def _create(self, record: dict[str, Any]) -> bool:
        """Write the object only if absent; False when it exists. Without an atomic create on
        this store, a plain write (the read-back decides)."""
        data = json.dumps(record).encode()
        self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError):  # no exclusive mode on this store
            if self.fs.exists(self.path):
                return False
            self._overwrite(record)
            time.sleep(READ_BACK_PAUSE_S)
            return True

    def _overwrite(self, record: dict[str, Any]) -> None:
        data = json.dumps(record).encode()
        if isinstance(self.fs, LocalFileSystem):  # readers never see a half-written object
            tmp = f"{self.path}.{self.token}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:  # an object store's put replaces the object whole
            with self.fs.open(self.path, "wb") as f:
                f.write(data)

    def _describe(self, record: dict[str, Any]) -> str:
        if not record:
            return "an unreadable lease object"
        age = time.time() - float(record.get("heartbeat_at", 0) or 0)
        return (f"{record.get('holder', '?')} (host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
                f"last heartbeat {age:.0f} s ago)")

    def _stale_reason(self, record: dict[str, Any]) -> Optional[str]:
        """Why ``record``'s holder is gone, or None when it may be alive."""
        if not record:
            return "its lease object is unreadable"
        try:
            age = time.time() - float(record.get("heartbeat_at"))
        except (TypeError, ValueError):
            return "its lease object has no heartbeat time"
        if age > self.stale_after_s:
            return f"no heartbeat for {age / 60:.1f} min (stale after {self.stale_after_s / 60:.1f} min)"
        if record.get("holder") == self.holder and self.holder.startswith("slurm-job "):
            return "it is an earlier attempt of this Slurm job"
        if (record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int)
                and record["pid"] != os.getpid() and not _pid_alive(record["pid"])):
            return f"its process {record['pid']} on this host is gone"
        return None

    # ----------------------------------------------------------------- acquire / release

    def acquire(self) -> "Lease":
        """Take the lease, or raise ``LeaseHeld`` naming the holder."""
        now = time.time()
        for _ in range(3):
            if self._create(self._record(now)) and self._mine():
                return self._start()
            current = self._read()
            if current is None:  # released between our create and read: try again
                continue
            if current.get("token") == self.token:
                return self._start()
            reason = self._stale_reason(current)
            if reason is None:
                raise LeaseHeld(f"{self.url} is held by {self._describe(current)}: another job is using this "
                                f"folder. Stop it, or wait: a lease without a heartbeat for "
                                f"{self.stale_after_s / 60:g} min is taken over")
            log.warning("taking over the lease %s from %s: %s", self.url, self._describe(current), reason)
            self._overwrite(self._record(now))
            time.sleep(min(READ_BACK_PAUSE_S, self.heartbeat_s))  # a racing taker writes in this window
            if self._mine():
                return self._start()
        current = self._read() or {}
        raise LeaseHeld(f"{self.url}: could not take the lease; it is held by {self._describe(current)}")

    def _mine(self) -> bool:
        record = self._read()
        return bool(record) and record.get("token") == self.token

    def _start(self) -> "Lease":
        self._held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="vlbert-lease", daemon=True)
        self._thread.start()
        log.info("holding the lease %s as %s", self.url, self.holder)
        return self

    def _beat(self) -> None:
        acquired_at = time.time()
        while not self._stop.wait(self.heartbeat_s):
            try:
                record = self._read()
                if not record or record.get("token") != self.token:
                    self.lost = self._describe(record or {})
                    log.error("the lease %s was taken over by %s; nothing more is published there",
                              self.url, self.lost)
                    return
                self._overwrite({**self._record(record.get("acquired_at", acquired_at))})
            except Exception as e:  # a store that fails now and then: the next beat tries again
                log.warning("lease heartbeat on %s failed: %s: %s", self.url, type(e).__name__, e)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the lease object still carries our token."""
        if not self._held:
            raise LeaseLost(f"{self.url}: the lease is not held")
        record = self._read()
        if self.lost is None and (not record or record.get("token") != self.token):
            self.lost = self._describe(record or {})
        if self.lost is not None:
            raise LeaseLost(f"{self.url} was taken over by {self.lost}: not publishing under it")

    def release(self) -> None:
        """Stop the heartbeat and remove the object if it is still ours."""
        if not self._held:
            return
        self._held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if self._mine():
                self.fs.rm(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------- a run's folders


def run_folders(output_dir: str, checkpoint_dir: str) -> list[str]:
    """The folders a training run writes: ``output_dir``, and ``checkpoint_dir`` when it is
    set and not inside ``output_dir`` (another disk, an object store)."""
    folders = [output_dir]
    if checkpoint_dir:
        out = os.path.abspath(output_dir)
        fs, path = fsspec.core.url_to_fs(checkpoint_dir)
        inside = isinstance(fs, LocalFileSystem) and os.path.commonpath([out, os.path.abspath(path)]) == out
        if not inside:
            folders.append(checkpoint_dir)
    return folders


class FolderLeases:
    """The leases on a run's folders (``<folder>/LEASE``), held by rank 0 for the run (collective:
    every rank enters; all raise ``LeaseHeld`` when rank 0 could not take one). ``check`` is the
    checkpointer's guard: ``LeaseLost`` on rank 0 once another job took a folder over."""

    def __init__(self, folders: list[str], stale_after_s: float, rank: int):
        self.folders, self.stale_after_s, self.rank = folders, stale_after_s, rank
        self.leases: list[Lease] = []

    def __enter__(self) -> "FolderLeases":
        from vlbert.train import dist

        error = None
        if self.rank == 0:
            try:
                for folder in self.folders:
                    self.leases.append(Lease(folder.rstrip("/") + "/" + LEASE, self.stale_after_s).acquire())
            except Exception as e:  # every rank must leave the broadcast below, then fail together
                self.release()
                error = (type(e) is LeaseHeld, str(e) if isinstance(e, LeaseHeld) else
                         f"could not take the lease on {folder}: {type(e).__name__}: {e}")
        error = dist.broadcast_object(error)
        if error:
            held, message = error
            raise (LeaseHeld if held else RuntimeError)(message)
        return self

    def check(self) -> None:
        for lease in self.leases:
            lease.check()

    def release(self) -> None:
        for lease in self.leases:
            lease.release()
        self.leases = []

    def __exit__(self, *exc) -> None:
        self.release()
