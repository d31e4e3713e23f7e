"""A real ``mlflow server`` on loopback for tests: started, stopped and started again on the same port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional


def free_port() -> int:
    """A loopback port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` with one worker on ``127.0.0.1:port`` over a SQLite store in ``folder``.

    ``start`` returns at once (the server takes seconds to import); ``wait`` blocks until
    ``/health`` answers. ``stop`` kills the whole process group; ``start`` again reuses the
    port and the store, as a restarted tracking server would.
    """

    def __init__(self, folder: Path, port: Optional[int] = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend = f"sqlite:///{self.folder}/mlflow.db"
        self.log_path = self.folder / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "MlflowServer":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", self.backend,
                 "--default-artifact-root", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner processes
        return self

    def wait(self, timeout_s: float = 120) -> "MlflowServer":
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=2).close()
                return self
            except OSError:
                if self.proc is None or self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start within {timeout_s} s:\n"
                                       + self.log_path.read_text()[-3000:])
                time.sleep(0.3)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: one process group
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:  # nothing to save: do not wait for a graceful shutdown
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def __enter__(self) -> "MlflowServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
