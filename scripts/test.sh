#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every test (integration ones included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slurm"`.
# The tests run in parallel worker processes, one per core up to 4 (VLBERT_TEST_WORKERS sets the
# number; `-n 0` among the arguments runs them in this process). A test file stays on one worker: the
# Slurm tests share one cluster per file, and a file's tests were written to run in order. Files go
# out in collection order (longest first: tests/conftest.py), not by their number of tests.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [ "${VLBERT_SKIP_SYSTEM_DEPS:-0}" != 1 ]; then
  bash scripts/system_deps.sh
fi
cores="$(nproc)"
exec "$VLBERT_PY" -m pytest -n "${VLBERT_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}" --dist loadfile --no-loadscope-reorder "$@"
