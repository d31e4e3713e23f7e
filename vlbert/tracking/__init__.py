"""Run tracking with MLflow: the only package that imports ``mlflow`` (always inside functions, so
importing this package is cheap).

- ``writer``: the trainer's tracker (``build_tracker``); calls go through a local spool on disk.
- ``spool``: that spool (SQLite), bounded and crash-safe.
- ``sender``: sends a spool to MLflow in order, once each.
- ``replay``: ``vlbert-replay-tracking <spool_dir>`` sends what a run left unsent.
- ``reader``: runs and metric histories for the comparison tool.
"""

from vlbert.tracking.common import (LOGGED_THROUGH_TAG, RUN_KEY_TAG, SPOOL_SEQ_TAG, TrackingError,
                                    resolve_tracking_uri)
from vlbert.tracking.reader import (MetricHistory, RunRecord, fetch_metric_histories, fetch_metric_histories_bulk,
                                    fetch_runs)
from vlbert.tracking.writer import MlflowTracker, NullTracker, build_tracker

__all__ = ["LOGGED_THROUGH_TAG", "RUN_KEY_TAG", "SPOOL_SEQ_TAG", "MetricHistory", "MlflowTracker", "NullTracker",
           "RunRecord", "TrackingError", "build_tracker", "fetch_metric_histories", "fetch_metric_histories_bulk",
           "fetch_runs", "resolve_tracking_uri"]
