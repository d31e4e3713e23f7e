"""Atomic, verified, resumable checkpoints on any fsspec store.

Layout under ``root`` (a local folder or a URL such as ``s3://bucket/run/ckpt``)::

    step-000123/
      ds/             DeepSpeed's files: model, ZeRO-partitioned optimizer, schedule, step counters
      rank-00000.json one per rank: data pipeline state, RNG states, rank-local counters
      meta.json       step, samples/tokens seen, run id, MLflow run id and key, world size, ...
      COMPLETE        written last: the manifest (manifest.py): run id and, per relative
                      file name, its size and sha256
    latest            "step-000123", written after the folder is published

Publishing. On a local file system every rank writes into ``step-000123.tmp/``;
rank 0 hashes the files, writes ``meta.json`` and ``COMPLETE`` and renames the
folder, then writes ``latest`` (a rename too). On an object store (no rename)
DeepSpeed writes into a local temporary folder on each rank, each rank hashes and
uploads its files with fsspec, and rank 0 writes ``COMPLETE`` last.

Resuming. A checkpoint counts only when its folder is named ``step-<n>`` and holds a
``COMPLETE`` that lists files. Rank 0 reads back every listed file and checks its size
and sha256, and that ``meta.json`` parses; a checkpoint that fails is skipped with a
warning naming the file, and the one before it is tried (of the run that
saved last first, then by step), so a copy cut off mid-write or damaged later is never
loaded; when every one fails, ``CheckpointError``. Only the manifest's files are
read or downloaded, under names checked to stay inside the checkpoint (and, when
downloaded, inside a fresh temporary folder), each checked against its hash again.

Pruning. Each run has an id (kept in ``meta.json`` and ``COMPLETE``; a resumed run
keeps it); a save keeps that run's newest ``keep_last`` checkpoints, never the one
it just wrote, and never deletes another run's.

A local ``root`` must be one file system for all ranks (a shared one across
nodes), as DeepSpeed's own checkpointing assumes; use a URL otherwise. Nothing
stops two jobs from writing one ``root`` here: that is the output folder's lease
(lease.py, taken by the training loops).

Safety. Our own files are JSON; DeepSpeed's are loaded through
``Engine.load_state`` with ``torch.load(weights_only=True)``. docs/trust.md has
the whole trust model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from vlbert.train import dist
from vlbert.train.manifest import (Entry, ManifestError, check, entries, hash_local_tree, hash_stream,
                                   local_target, manifest_json, read_manifest)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE = "COMPLETE"
META = "meta.json"
LATEST = "latest"
_NAME = re.compile(r"^step-(\d+)$")
MAX_MARKER_BYTES = 64 << 20  # a manifest of 100k files is ~15 MB


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
    run_id: Optional[str] = None  # from its COMPLETE marker
    saved_at: float = 0.0  # the same (seconds since the epoch on the saving host)


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


# --------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Saves and finds checkpoints under ``root``; ``save``/``load_latest`` are
    collective (every rank calls them), the rest is plain listing.

    ``run_id`` names the run whose checkpoints ``save`` prunes: taken from the checkpoint
    ``load`` restores, else made on the first save. ``guard`` (rank 0, before a checkpoint
    is published) raises when this job may no longer write under ``root`` (a lost lease)."""

    def __init__(self, root: str, keep_last: int = 3, rank: Optional[int] = None, world_size: Optional[int] = None,
                 guard: Optional[Callable[[], None]] = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.fs, self.root = fsspec.core.url_to_fs(root)
        self.root = self.root.rstrip("/")
        self.keep_last = keep_last
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        self.local = isinstance(self.fs, LocalFileSystem)
        self.guard = guard
        self.run_id: Optional[str] = None

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    # ----------------------------------------------------------------- listing

    def _read_bytes(self, path: str, limit: int) -> bytes:
        """At most ``limit`` bytes of ``path``; ManifestError when it is longer."""
        with self.fs.open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ManifestError(f"{posixpath.basename(path)} is over {limit} bytes")
        return data

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

    def _marker(self, path: str) -> Optional[dict[str, Any]]:
        """The folder's COMPLETE marker when it lists files, else None (not complete)."""
        try:
            return read_manifest(self._read_bytes(posixpath.join(path, COMPLETE), MAX_MARKER_BYTES))
        except (FileNotFoundError, ManifestError):
            return None

    def complete(self) -> list[CheckpointInfo]:
        """Checkpoints whose COMPLETE marker lists their files, oldest first (not verified)."""
        out = []
        for step, name, path in self._entries():
            raw = self._marker(path) if _NAME.match(name) else None
            if raw is not None:
                run_id = raw.get("run_id") if isinstance(raw.get("run_id"), str) else None
                saved_at = raw.get("saved_at") if isinstance(raw.get("saved_at"), (int, float)) else 0.0
                out.append(CheckpointInfo(step, path, self.url(path), run_id, float(saved_at)))
        return out

    def _pointer(self) -> Optional[str]:
        try:
            return self._read_bytes(posixpath.join(self.root, LATEST), 256).decode("utf-8", "replace").strip()
        except (FileNotFoundError, ManifestError):
            return None

    def verify(self, info: CheckpointInfo) -> dict[str, Entry]:
        """Every file the manifest lists, read back with its size and sha256 checked, and
        ``meta.json`` parsed; ManifestError naming the checkpoint and the damaged file."""
        try:
            raw = self._marker(info.path)
            if raw is None:
                raise ManifestError(f"{COMPLETE} is missing or lists no files")
            files = entries(raw)
            if META not in files:
                raise ManifestError(f"{META} is not in the manifest")
            for name, expected in files.items():
                try:
                    with self.fs.open(posixpath.join(info.path, name), "rb") as f:
                        got = hash_stream(f)
                except FileNotFoundError:
                    raise ManifestError(f"{name} is missing") from None
                check(name, expected, got)
            if self.local:  # DeepSpeed reads the folder itself: nothing there but what was hashed
                ds = posixpath.join(info.path, "ds")
                for p in self.fs.find(ds) if self.fs.exists(ds) else []:
                    name = posixpath.relpath(p, info.path)
                    if name not in files:
                        raise ManifestError(f"{name} is not in the manifest")
            self._json(info, META, files)
        except ManifestError as e:
            raise ManifestError(f"{info.url}: {e}") from None
        return files

    def _json(self, info: CheckpointInfo, name: str, files: Optional[dict[str, Entry]] = None) -> Any:
        """File ``name`` of the checkpoint, checked against its manifest, as JSON."""
        if files is None:
            raw = self._marker(info.path)
            if raw is None:
                raise ManifestError(f"{COMPLETE} is missing or lists no files")
            files = entries(raw)
        if name not in files:
            raise ManifestError(f"{name} is not in the manifest")
        try:
            data = self._read_bytes(posixpath.join(info.path, name), files[name].size)
        except FileNotFoundError:
            raise ManifestError(f"{name} is missing") from None
        check(name, files[name], Entry(len(data), hashlib.sha256(data).hexdigest()))
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"{name} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ManifestError(f"{name} is not a JSON object")
        return value

    def find_latest(self) -> Optional[CheckpointInfo]:
        """The newest checkpoint that verifies: of the run that saved last (a fresh run in a
        folder holding an older run's higher steps is the one to resume), then by step. A
        damaged one is skipped with a warning; CheckpointError when every one is damaged."""
        published = self.complete()
        pointer = self._pointer()
        run_saved: dict[Optional[str], float] = {}
        for c in published:
            run_saved[c.run_id] = max(run_saved.get(c.run_id, 0.0), c.saved_at)
        candidates = sorted(published, key=lambda c: (run_saved[c.run_id], c.step), reverse=True)
        damaged = []
        for info in candidates:
            try:
                self.verify(info)
            except ManifestError as e:
                damaged.append(str(e))
                log.warning("checkpoint damaged, falling back to an earlier one: %s", e)
                continue
            if pointer and pointer != posixpath.basename(info.path):
                log.warning("%s/latest names %s, which is not the newest usable checkpoint (%s)",
                            self.url(self.root), pointer, info.url)
            return info
        if damaged:
            raise CheckpointError(f"{self.url(self.root)}: every checkpoint is damaged ({'; '.join(damaged[:3])})")
        return None

    # ----------------------------------------------------------------- saving

    def save(self, engine: StatefulEngine, step: int, meta: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Write checkpoint ``step`` (collective). ``meta`` is rank 0's; ``rank_state``
        each rank's own (JSON data). Returns the published URL."""
        t0 = time.perf_counter()
        name = step_name(step)
        final = posixpath.join(self.root, name)
        staging = final + ".tmp" if self.local else tempfile.mkdtemp(prefix=f"vlbert-{name}-")
        if self.rank == 0:
            if self.run_id is None:
                self.run_id = uuid.uuid4().hex
            for leftover in ([final, final + ".tmp"]):  # an earlier attempt at this step
                if self.fs.exists(leftover):
                    self.fs.rm(leftover, recursive=True)
            if self.local:
                os.makedirs(staging, exist_ok=True)
        dist.barrier()

        hashed: dict[str, Entry] = {}
        try:
            engine.save_state(staging)
            with open(os.path.join(staging, rank_file(self.rank)), "w") as f:
                json.dump(rank_state, f)
            if not self.local:  # hashed here, before the upload: the manifest vouches for these bytes
                hashed = hash_local_tree(staging)
                self._upload(staging, final)
        finally:
            if not self.local:
                shutil.rmtree(staging, ignore_errors=True)
        parts = dist.all_gather_object(hashed)  # also the barrier: every rank's files are written

        error = None
        if self.rank == 0:
            try:
                self._publish(step, final, staging, parts, meta)
                log.info("saved checkpoint %s (%.1f s)", self.url(final), time.perf_counter() - t0)
            except BaseException as e:
                error = f"rank 0 could not publish {self.url(final)}: {type(e).__name__}: {e}"
                dist.broadcast_object(error)
                raise
        error = dist.broadcast_object(error)
        if error:
            raise CheckpointError(error)
        return self.url(final)

    def _publish(self, step: int, final: str, staging: str, parts: list[dict[str, Entry]],
                 meta: dict[str, Any]) -> None:
        """Rank 0: meta.json, the manifest (COMPLETE), the rename (local disk), ``latest``, pruning."""
        folder = staging if self.local else final
        saved_at = time.time()
        full_meta = {"format": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                     "saved_at": saved_at, "run_id": self.run_id, **meta}
        meta_bytes = json.dumps(full_meta, indent=1).encode()
        with self.fs.open(posixpath.join(folder, META), "wb") as f:
            f.write(meta_bytes)
        if self.local:
            files = hash_local_tree(staging)
        else:
            files = {META: Entry(len(meta_bytes), hashlib.sha256(meta_bytes).hexdigest())}
            for part in parts:
                for rel, entry in part.items():
                    if files.get(rel, entry) != entry:
                        raise CheckpointError(f"two ranks wrote different {rel}")
                    files[rel] = entry
        if self.guard is not None:
            self.guard()
        with self.fs.open(posixpath.join(folder, COMPLETE), "w") as f:
            f.write(manifest_json(step, self.run_id, saved_at, files))
        if self.local:
            os.replace(staging, final)
            _fsync_dir(self.root)
        self._write_latest(posixpath.basename(final))
        self._prune(step, final)

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

    def _prune(self, newest: int, written: str) -> None:
        """Keep the newest ``keep_last`` complete checkpoints of this run (and always ``written``);
        never touch another run's; drop leftovers of unfinished saves at or below ``newest``."""
        published = self.complete()
        complete = {c.path for c in published}
        mine = [c.path for c in published if c.run_id == self.run_id]
        keep = set(mine[-self.keep_last:]) | {written}
        for step, _, path in self._entries():
            if path in keep:
                continue
            if path in mine or (path not in complete and step <= newest):
                try:
                    self.fs.rm(path, recursive=True)
                except FileNotFoundError:
                    pass

    # ----------------------------------------------------------------- loading

    def peek_latest(self) -> Optional[tuple[CheckpointInfo, dict[str, Any]]]:
        """The newest usable checkpoint and its metadata, without loading it (collective;
        rank 0 chooses and verifies every file's hash). None when there is none."""
        found: tuple[Optional[CheckpointInfo], Optional[str]] = (None, None)
        if self.rank == 0:
            try:
                found = (self.find_latest(), None)
            except CheckpointError as e:
                found = (None, str(e))
        info, error = dist.broadcast_object(found)
        if error:
            raise CheckpointError(error)
        if info is None:
            return None
        try:
            meta = self._json(info, META)
        except ManifestError as e:
            raise CheckpointError(f"{info.url}: {e}") from None
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{info.url}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        return info, meta

    def load_latest(self, engine: StatefulEngine, allow_reshard: bool = False) -> Optional[Loaded]:
        """Restore the newest usable checkpoint into ``engine`` (collective). None when there is none."""
        peeked = self.peek_latest()
        return self.load(engine, *peeked, allow_reshard=allow_reshard) if peeked is not None else None

    def load(self, engine: StatefulEngine, info: CheckpointInfo, meta: dict[str, Any],
             allow_reshard: bool = False) -> Loaded:
        """Restore checkpoint ``info`` (from ``peek_latest``) into ``engine`` (collective).
        Only the files its manifest lists are read, each checked against its hash.

        Written by another number of ranks: refused unless ``allow_reshard``; then the engine
        reshards it and every rank reads every saved rank's file (``Loaded.rank_states``)."""
        saved_world = _saved_world_size(info, meta)
        resharded = saved_world != self.world_size
        if resharded and not allow_reshard:
            raise CheckpointError(
                f"{info.url} was written by {meta.get('world_size')} ranks; this run has {self.world_size}. "
                "The data pipeline state is per rank: resume with the same number of ranks")
        try:
            raw = self._marker(info.path)
            files = entries(raw) if raw is not None else {}
            if resharded:
                rank_state = None
                rank_states = [self._json(info, rank_file(r), files) for r in range(saved_world)]
            else:
                rank_state = self._json(info, rank_file(self.rank), files)
                rank_states = [rank_state]
        except ManifestError as e:
            raise CheckpointError(f"{info.url}: {e}") from None
        self.run_id = info.run_id or meta.get("run_id") or self.run_id
        if self.rank == 0:
            log.info("resuming from %s (step %d%s)", info.url, info.step,
                     f", written by {saved_world} ranks, now {self.world_size}" if resharded else "")
        kwargs = {"resharded": True} if resharded else {}
        if self.local:  # rank 0 verified the folder (peek_latest)
            engine.load_state(info.path, **kwargs)
        else:
            tmp = tempfile.mkdtemp(prefix="vlbert-resume-")
            try:
                self._download(info, files, tmp)
                engine.load_state(tmp, **kwargs)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return Loaded(info, meta, rank_state, rank_states)

    def _download(self, info: CheckpointInfo, files: dict[str, Entry], tmp: str) -> None:
        """The manifest's ``ds/`` files into the local folder ``tmp``, each checked against its hash;
        nothing else is fetched and nothing lands outside ``tmp``."""
        for name, expected in files.items():
            if not name.startswith("ds/"):
                continue
            try:
                dst = local_target(tmp, name)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                self.fs.get_file(posixpath.join(info.path, name), dst)
                with open(dst, "rb") as f:
                    check(name, expected, hash_stream(f))
            except ManifestError as e:
                raise CheckpointError(f"{info.url}: {e}") from None


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


def _saved_world_size(info: CheckpointInfo, meta: dict[str, Any]) -> int:
    """The number of ranks that wrote checkpoint ``info``, from its ``meta.json``; CheckpointError
    when it is missing or not a positive whole number (a resharded load would read no rank file)."""
    n = meta.get("world_size")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise CheckpointError(f"{info.url}: {META} has no valid world_size ({n!r})")
    return n
