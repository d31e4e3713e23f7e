"""scripts/pytest_forkserver.py: pytest runs forked from a process that imported modules once
(mutation runs, scripts/mutation.sh with MUTMUT_PRELOAD)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = str(Path(__file__).resolve().parents[1] / "scripts" / "pytest_forkserver.py")

pytestmark = pytest.mark.timeout(120)


def test_each_run_reads_the_files_afresh_and_reports_pytests_status(tmp_path):
    """A passing run exits 0 with pytest's report on the client's stdout; a failing one 1; a
    module the tests import is read as it is at each run (the server never imported it), also
    when it changes between two runs; a run past its limit is killed and exits 1. Fails if the
    child's status is not passed on (tried: the client always exiting 0), or if the module under
    test were imported by the server (tried: preloading it; the second run then saw the old value)."""
    (tmp_path / "value.py").write_text("VALUE = 1\n")
    (tmp_path / "test_value.py").write_text("import value\n\ndef test_value():\n    assert value.VALUE == 1\n")
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(60)\n")
    socket_path = str(tmp_path / "server.sock")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    server = subprocess.Popen([sys.executable, SCRIPT, "serve", socket_path, "json"], cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(socket_path):
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

        def run(limit_s, *args):
            return subprocess.run([sys.executable, SCRIPT, "run", socket_path, str(limit_s), "-q", "-p",
                                   "no:cacheprovider", *args], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=90)

        ok = run(30, "test_value.py")
        assert ok.returncode == 0 and "1 passed" in ok.stdout, ok.stdout + ok.stderr
        (tmp_path / "value.py").write_text("VALUE = 2\n")  # the same size, within the same second
        changed = run(30, "test_value.py")
        assert changed.returncode == 1 and "1 failed" in changed.stdout, changed.stdout + changed.stderr
        start = time.monotonic()
        slow = run(1, "test_slow.py")
        assert slow.returncode == 1 and time.monotonic() - start < 30
        assert server.poll() is None  # it serves the next run
    finally:
        server.kill()
        server.wait()
