"""A new, empty MLflow SQLite store in a moment, for tests that train into one.

MLflow builds a new SQLite store's schema by running its migrations, which takes seconds
(2-6 s on a 2-core machine) each time a test's trainer opens a new store. The stores are
copies of one store MLflow created in this process (its own schema, its "Default"
experiment, nothing else), made once per test session.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

_LOCK = threading.Lock()
_TEMPLATE: Optional[Path] = None


def _template() -> Path:
    global _TEMPLATE
    with _LOCK:
        if _TEMPLATE is None:
            from mlflow import MlflowClient

            folder = tempfile.mkdtemp(prefix="vlbert-mlflow-template-")
            atexit.register(shutil.rmtree, folder, True)
            path = Path(folder) / "mlflow.db"
            MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the schema
            _TEMPLATE = path
        return _TEMPLATE


def new_sqlite_store(path: Path) -> str:
    """``sqlite:///path``, with an empty store there unless one already is."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_template(), path)
    return f"sqlite:///{path}"
