"""Atomic, resumable checkpoints on any fsspec store.

Layout under ``root`` (a local folder or a URL such as ``s3://bucket/run/ckpt``)::

    step-000123/
      ds/             DeepSpeed's files: model, ZeRO-partitioned optimizer, schedule, step counters
      rank-00000.json one per rank: data pipeline state, RNG states, rank-local counters
      meta.json       step, samples/tokens seen, MLflow run id and key, world size, ...
      COMPLETE        written last: {"step", "files": {relative path: size}}
    latest            "step-000123", written after the folder is published

Publishing. On a local file system every rank writes into ``step-000123.tmp/``;
rank 0 writes ``meta.json`` and ``COMPLETE`` and renames the folder, then writes
``latest`` (a rename too). On an object store (no rename) DeepSpeed writes into
a local temporary folder on each rank, each rank uploads its files with fsspec,
and rank 0 writes ``COMPLETE`` last. Either way a checkpoint counts only when
its folder is named ``step-<n>`` and holds a ``COMPLETE`` whose file list
matches what is there: resume takes the newest such checkpoint, whatever
``latest`` says, so a copy cut off mid-write is never chosen.

A local ``root`` must be one file system for all ranks (a shared one across
nodes), as DeepSpeed's own checkpointing assumes; use a URL otherwise.

Safety. Our own files are JSON; DeepSpeed's are loaded through
``Engine.load_state`` with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import posixpath
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem

from vlbert.train import dist

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"
_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to resume this run."""


class StatefulEngine(Protocol):
    def save_state(self, directory: str) -> None: ...

    def load_state(self, directory: str, resharded: bool = False) -> None: ...


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: str  # fs path (no protocol) of the step folder
    url: str  # the same, as a URL for messages


@dataclass
class Loaded:
    """A restored checkpoint. ``rank_state``: this rank's own file (None when the checkpoint
    was written by another number of ranks); ``rank_states``: the files of every rank that
    wrote it when that number differs (else ``[rank_state]``)."""

    info: CheckpointInfo
    meta: dict[str, Any]
    rank_state: Optional[dict[str, Any]]
    rank_states: list[dict[str, Any]]

    @property
    def resharded(self) -> bool:
        return self.rank_state is None


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Python, NumPy (global) and torch (CPU and current CUDA device) RNG states, as JSON data."""
    version, internal, gauss = random.getstate()
    npst = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": npst["bit_generator"], "key": npst["state"]["key"].tolist(),
                  "pos": int(npst["state"]["pos"]), "has_gauss": int(npst["has_gauss"]),
                  "gauss": float(npst["gauss"])},
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and finds checkpoints under ``root``; ``save``/``load_latest`` are
    collective (every rank calls them), the rest is plain listing."""

    def __init__(self, root: str, keep_last: int = 3, rank: Optional[int] = None, world_size: Optional[int] = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")
        self.keep_last = keep_last
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        self.local = isinstance(self.fs, LocalFileSystem)

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    # ----------------------------------------------------------------- listing

    def _read_json(self, path: str) -> Any:
        with self.fs.open(path, "r") as f:
            return json.load(f)

    def _entries(self) -> list[tuple[int, str, str]]:
        """(step, name, path) of every ``step-*`` entry under root (complete or not)."""
        try:
            paths = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for p in paths:
            name = posixpath.basename(p.rstrip("/"))
            m = re.match(r"^step-(\d+)(\.tmp)?$", name)
            if m:
                out.append((int(m.group(1)), name, p.rstrip("/")))
        return sorted(out)

    def _is_complete(self, path: str, verify_files: bool) -> bool:
        marker = posixpath.join(path, COMPLETE)
        try:
            manifest = self._read_json(marker)
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return False
        if not verify_files:
            return True
        try:
            found = {posixpath.relpath(p, path): int(info["size"])
                     for p, info in self.fs.find(path, detail=True).items()}
        except FileNotFoundError:
            return False
        return all(found.get(rel) == size for rel, size in manifest.get("files", {}).items())

    def complete(self, verify_files: bool = False) -> list[CheckpointInfo]:
        """Published checkpoints, oldest first."""
        return [CheckpointInfo(step, path, self.url(path)) for step, name, path in self._entries()
                if _NAME.match(name) and self._is_complete(path, verify_files)]

    def find_latest(self) -> Optional[CheckpointInfo]:
        """The newest complete checkpoint whose files are all there (logs if ``latest`` disagrees)."""
        candidates = self.complete(verify_files=False)
        chosen = None
        for info in reversed(candidates):
            if self._is_complete(info.path, verify_files=True):
                chosen = info
                break
            log.warning("checkpoint %s has a COMPLETE marker but its files do not match it; skipped", info.url)
        pointer = None
        try:
            with self.fs.open(posixpath.join(self.root, LATEST), "r") as f:
                pointer = f.read().strip()
        except FileNotFoundError:
            pass
        if pointer and (chosen is None or pointer != posixpath.basename(chosen.path)):
            log.warning("%s/latest names %s, which is not the newest complete checkpoint (%s)",
                        self.url(self.root), pointer, chosen.url if chosen else "none")
        return chosen

    # ----------------------------------------------------------------- saving

    def save(self, engine: StatefulEngine, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Write checkpoint ``step`` (collective). ``meta`` is rank 0's; ``rank_state``
        each rank's own (JSON data). Returns the published URL."""
        t0 = time.perf_counter()
        name = step_name(step)
        final = posixpath.join(self.root, name)
        staging = final + ".tmp" if self.local else tempfile.mkdtemp(prefix=f"vlbert-{name}-")
        if self.rank == 0:
            for leftover in ([final, final + ".tmp"]):  # an earlier attempt at this step
                if self.fs.exists(leftover):
                    self.fs.rm(leftover, recursive=True)
            if self.local:
                os.makedirs(staging, exist_ok=True)
        dist.barrier()

        try:
            engine.save_state(staging)
            with open(os.path.join(staging, rank_file(self.rank)), "w") as f:
                json.dump(rank_state, f)
            if not self.local:
                self._upload(staging, final)
        finally:
            if not self.local:
                shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()

        if self.rank == 0:
            folder = staging if self.local else final
            full_meta = {"format": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                         "saved_at": time.time(), **meta}
            with self.fs.open(posixpath.join(folder, META), "w") as f:
                json.dump(full_meta, f, indent=1)
            files = {posixpath.relpath(p, folder): int(info["size"])
                     for p, info in self.fs.find(folder, detail=True).items()}
            with self.fs.open(posixpath.join(folder, COMPLETE), "w") as f:
                json.dump({"step": step, "files": files}, f)
            if self.local:
                os.replace(staging, final)
                _fsync_dir(self.root)
            self._write_latest(name)
            self._prune(step)
            log.info("saved checkpoint %s (%.1f s)", self.url(final), time.perf_counter() - t0)
        dist.barrier()
        return self.url(final)

    def _upload(self, local_dir: str, remote: str) -> None:
        for dirpath, _, filenames in os.walk(local_dir):
            for fn in filenames:
                src = os.path.join(dirpath, fn)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                dst = posixpath.join(remote, rel)
                self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
                self.fs.put_file(src, dst)

    def _write_latest(self, name: str) -> None:
        path = posixpath.join(self.root, LATEST)
        if self.local:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write(name + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as f:
                f.write(name + "\n")

    def _prune(self, newest: int) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; drop leftovers of
        unfinished saves at or below ``newest``."""
        published = self.complete()
        complete = {c.path for c in published}
        keep = {c.path for c in published[-self.keep_last:]}
        for step, _, path in self._entries():
            older = path in complete and path not in keep
            stale_partial = path not in complete and step <= newest
            if older or stale_partial:
                try:
                    self.fs.rm(path, recursive=True)
                except FileNotFoundError:
                    pass

    # ----------------------------------------------------------------- loading

    def peek_latest(self) -> Optional[tuple[CheckpointInfo, dict[str, Any]]]:
        """The newest complete checkpoint and its metadata, without loading it (collective;
        rank 0 chooses). None when there is none."""
        info = self.find_latest() if self.rank == 0 else None
        info = dist.broadcast_object(info)
        if info is None:
            return None
        meta = self._read_json(posixpath.join(info.path, META))
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{info.url}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        return info, meta

    def load_latest(self, engine: StatefulEngine, allow_reshard: bool = False) -> Optional[Loaded]:
        """Restore the newest complete checkpoint into ``engine`` (collective). None when there is none."""
        peeked = self.peek_latest()
        return self.load(engine, *peeked, allow_reshard=allow_reshard) if peeked is not None else None

    def load(self, engine: StatefulEngine, info: CheckpointInfo, meta: dict[str, Any],
             allow_reshard: bool = False) -> Loaded:
        """Restore checkpoint ``info`` (from ``peek_latest``) into ``engine`` (collective).

        Written by another number of ranks: refused unless ``allow_reshard``; then the engine
        reshards it and every rank reads every saved rank's file (``Loaded.rank_states``)."""
        saved_world = int(meta.get("world_size", -1))
        resharded = saved_world != self.world_size
        if resharded and not allow_reshard:
            raise CheckpointError(
                f"{info.url} was written by {meta.get('world_size')} ranks; this run has {self.world_size}. "
                "The data pipeline state is per rank: resume with the same number of ranks")
        if resharded:
            rank_state = None
            rank_states = [self._read_json(posixpath.join(info.path, rank_file(r))) for r in range(saved_world)]
        else:
            rank_state = self._read_json(posixpath.join(info.path, rank_file(self.rank)))
            rank_states = [rank_state]
        if self.rank == 0:
            log.info("resuming from %s (step %d%s)", info.url, info.step,
                     f", written by {saved_world} ranks, now {self.world_size}" if resharded else "")
        kwargs = {"resharded": True} if resharded else {}
        if self.local:
            engine.load_state(info.path, **kwargs)
        else:
            tmp = tempfile.mkdtemp(prefix="vlbert-resume-")
            try:
                ds_remote = posixpath.join(info.path, "ds")
                for src in self.fs.find(ds_remote):
                    dst = os.path.join(tmp, "ds", posixpath.relpath(src, ds_remote))
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    self.fs.get_file(src, dst)
                engine.load_state(tmp, **kwargs)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return Loaded(info, meta, rank_state, rank_states)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
