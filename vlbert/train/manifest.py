"""A checkpoint's manifest: the relative names of its files with their sizes and sha256.

Written as the checkpoint's ``COMPLETE`` marker::

    {"manifest": 2, "step": 123, "run_id": "4f1c...", "saved_at": 1700000000.0,
     "files": {"ds/mp_rank_00_model_states.pt": {"size": 123456, "sha256": "ab12..."}, ...}}

A checkpoint is trusted only through its manifest: a name is refused unless it is a
plain relative POSIX path (no ``..``, ``.``, empty, absolute, drive or backslash
part), only the files it lists are read or downloaded, and each is read back with its
size and sha256 checked. A marker whose ``files`` is missing or empty does not make a
checkpoint complete (``read_manifest`` returns None); one whose entries carry sizes
only (written before checkpoints carried hashes) is refused as unverifiable.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Optional

MANIFEST_VERSION = 2
CHUNK = 1 << 20


class ManifestError(ValueError):
    """A manifest that cannot be trusted, or a file that does not match it."""


@dataclass(frozen=True)
class Entry:
    size: int
    sha256: str


def safe_name(name: Any) -> str:
    """``name`` if it is a plain relative POSIX path inside its folder, else ManifestError."""
    if not isinstance(name, str) or not name or len(name) > 1024:
        raise ManifestError(f"file name {name!r} is not a relative path")
    if "\\" in name or "\x00" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ManifestError(f"file name {name!r} is absolute or not a POSIX path")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise ManifestError(f"file name {name!r} has an empty, '.' or '..' part")
    return name


def local_target(root: str, name: str) -> str:
    """Where manifest entry ``name`` goes under the local folder ``root``; ManifestError when the
    result would resolve outside ``root`` (a link inside it included)."""
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, *safe_name(name).split("/")))
    if os.path.commonpath([base, target]) != base or target == base:
        raise ManifestError(f"file name {name!r} resolves outside {root}")
    return target


def hash_stream(f: BinaryIO) -> Entry:
    h, size = hashlib.sha256(), 0
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return Entry(size, h.hexdigest())
        h.update(chunk)
        size += len(chunk)


def hash_local_tree(folder: str) -> dict[str, Entry]:
    """Every file under the local ``folder``, by relative POSIX name."""
    out = {}
    for dirpath, _, filenames in os.walk(folder):
        for fn in filenames:
            path = os.path.join(dirpath, fn)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder).replace(os.sep, "/")] = hash_stream(f)
    return out


def manifest_json(step: int, run_id: str, saved_at: float, files: dict[str, Entry]) -> str:
    return json.dumps({"manifest": MANIFEST_VERSION, "step": step, "run_id": run_id, "saved_at": saved_at,
                       "files": {k: {"size": e.size, "sha256": e.sha256} for k, e in sorted(files.items())}})


def read_manifest(data: bytes) -> Optional[dict[str, Any]]:
    """The marker's JSON when it lists files (the checkpoint counts as complete), else None.
    Its entries are checked by ``entries``."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict) or not raw["files"]:
        return None
    return raw


def entries(raw: dict[str, Any]) -> dict[str, Entry]:
    """The checked entries of a marker from ``read_manifest``; ManifestError names the first bad one."""
    out = {}
    for name, entry in raw["files"].items():
        safe_name(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise ManifestError(f"{name} has no sha256 in the manifest (written before checkpoints carried "
                                "hashes, or altered): it cannot be verified")
        size, digest = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or size < 0 or not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"{name} has a malformed manifest entry {entry!r}")
        out[name] = Entry(size, digest.lower())
    return out


def check(name: str, expected: Entry, got: Entry) -> None:
    if got.size != expected.size:
        raise ManifestError(f"{name} has {got.size} bytes, the manifest says {expected.size}")
    if got.sha256 != expected.sha256:
        raise ManifestError(f"{name} does not match its sha256 in the manifest")
