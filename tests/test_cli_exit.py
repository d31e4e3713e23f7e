"""A command's quick exit (``skip_garbage_collection_at_exit`` in vlbert/cli/common.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(60)

# An exit handler registered before the command's (so run after it: last in, first out) records
# how many objects the collector no longer reaches, which also shows that it still ran.
CHILD = """
import atexit, gc, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(str(gc.get_freeze_count())))
from vlbert.cli.common import skip_garbage_collection_at_exit
skip_garbage_collection_at_exit()
skip_garbage_collection_at_exit()  # once per process
"""


def test_exit_handlers_run_after_the_heap_is_taken_out_of_the_collectors_reach(tmp_path):
    """Fails if the command does not freeze the heap at exit (the count is 0) or if that stops
    the exit handlers registered before it."""
    out = tmp_path / "exit.txt"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=50, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(out.read_text()) > 1000  # the interpreter's own modules alone hold thousands
