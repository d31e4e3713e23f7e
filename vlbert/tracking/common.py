"""Names and helpers shared by the writer, the sender, the reader and the replay CLI (no mlflow import)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

# Tags vlbert sets on its runs.
LOGGED_THROUGH_TAG = "vlbert.logged_through_step"  # the last training step whose metrics the run holds
SPOOL_SEQ_TAG = "vlbert.spool_seq"  # "<spool id>:<seq>": the last spool record the run received
RUN_KEY_TAG = "vlbert.run_key"  # the client-side key the run was created under (finds it again after a crash)
DROPPED_TAG = "vlbert.tracking_dropped_records"  # calls lost: past the spool's bound, or to a full queue

MAX_PARAM_CHARS = 5000
# Short HTTP timeouts unless the user set them: a refused connection costs ~1 s, not minutes.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(RuntimeError):
    """The tracking store could not be read (for the comparison tool)."""


def resolve_tracking_uri(cfg_uri: str = "") -> str:
    """``cfg_uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` (SQLite) in the working folder."""
    uri = cfg_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{os.path.abspath('mlflow.db')}"


def artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment in a SQLite store keeps its artifacts: ``mlartifacts/`` next to the DB."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= MAX_PARAM_CHARS else s[:MAX_PARAM_CHARS] + f"...({len(s)} chars)"


def set_http_defaults() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def replay_command(spool_dir: str, uri: str) -> str:
    return f"vlbert-replay-tracking {spool_dir} --tracking-uri {uri}"
