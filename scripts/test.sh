#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every test (integration ones included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slurm"`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [ "${VLBERT_SKIP_SYSTEM_DEPS:-0}" != 1 ]; then
  bash scripts/system_deps.sh
fi
exec "$VLBERT_PY" -m pytest "$@"
