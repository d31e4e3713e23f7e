# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse the virtual
# environment in $VLBERT_VENV (default .venv) and install what is missing.
#
# Environment knobs:
#   VLBERT_PYTHON      interpreter to build the venv with (default: python3.11, else python3 if it is 3.11)
#   VLBERT_VENV        venv folder (default: .venv in the repository)
#   VLBERT_TORCH       pip requirement(s) for torch (default: "torch==2.13.0", the CPU build on CPU hosts).
#                      GPU hosts: install a CUDA build of torch 2.13 into the venv first (PyTorch's
#                      install selector gives the pip line), then run this; see docs/install.md.
#   VLBERT_WHEELS      folder of prebuilt wheels (default: ../shared/wheels when it exists); set it to
#                      an empty string to force compiling mmcv.
set -euo pipefail

VLBERT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$VLBERT_ROOT"
VLBERT_VENV="${VLBERT_VENV:-$VLBERT_ROOT/.venv}"
VLBERT_TORCH="${VLBERT_TORCH:-torch==2.13.0}"
if [ -z "${VLBERT_WHEELS+set}" ] && [ -d "$VLBERT_ROOT/../shared/wheels" ]; then
  VLBERT_WHEELS="$VLBERT_ROOT/../shared/wheels"
fi
VLBERT_WHEELS="${VLBERT_WHEELS:-}"

_say() { printf '\033[1m[vlbert]\033[0m %s\n' "$*"; }

_find_python() {
  if [ -n "${VLBERT_PYTHON:-}" ]; then echo "$VLBERT_PYTHON"; return; fi
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$p"; return
    fi
  done
  echo "vlbert needs Python 3.11 (set VLBERT_PYTHON)" >&2; return 1
}

# Run a long command with its output in a log file and a heartbeat line every
# 30 s (elapsed time and the log's last line), so a long compile is never silent.
_with_heartbeat() {
  local label="$1"; shift
  local log; log="$(mktemp -t vlbert-install.XXXXXX.log)"
  local start=$SECONDS
  "$@" >"$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 30
    kill -0 "$pid" 2>/dev/null || break
    # ninja prints "[n/N] c++ ..." per compiled file: show that count when there is one.
    local last; last="$(grep -oE '^ *\[[0-9]+/[0-9]+\]' "$log" | tail -n 1 | tr -d ' ')"
    [ -n "$last" ] && last="files compiled $last" || last="$(tail -n 1 "$log" | cut -c1-100)"
    _say "$label: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s ... $last"
  done
  if ! wait "$pid"; then
    tail -n 40 "$log" >&2
    _say "$label failed after $(( SECONDS - start )) s; full log: $log"
    return 1
  fi
  _say "$label done in $(( SECONDS - start )) s"
  rm -f "$log"
}

if [ ! -x "$VLBERT_VENV/bin/python" ]; then
  PY="$(_find_python)"
  _say "creating the virtual environment $VLBERT_VENV with $PY"
  "$PY" -m venv "$VLBERT_VENV"
  "$VLBERT_VENV/bin/python" -m pip install --quiet --upgrade pip setuptools wheel
fi
PIP=("$VLBERT_VENV/bin/python" -m pip)
FIND_LINKS=()
[ -n "$VLBERT_WHEELS" ] && FIND_LINKS=(--find-links "$VLBERT_WHEELS")

if ! "$VLBERT_VENV/bin/python" -c 'import torch' 2>/dev/null; then
  _say "installing $VLBERT_TORCH"
  # shellcheck disable=SC2086
  "${PIP[@]}" install --progress-bar on $VLBERT_TORCH
fi

if ! "$VLBERT_VENV/bin/python" -c 'import mmcv.ops' 2>/dev/null; then
  # mmcv 2.1's setup.py imports pkg_resources, which setuptools 81 removed.
  "${PIP[@]}" install --quiet ninja psutil 'setuptools<81' wheel
  if [ -n "$VLBERT_WHEELS" ] && ls "$VLBERT_WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1 \
     && "$VLBERT_VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.13.0+cpu")'; then
    _say "installing mmcv 2.1.0 from the prebuilt wheel in $VLBERT_WHEELS"
    "${PIP[@]}" install --no-deps "${FIND_LINKS[@]}" mmcv==2.1.0
  else
    # mmcv has no wheel for current torch: pip compiles it, with its C++ (and, with CUDA, GPU) ops.
    _say "compiling mmcv 2.1.0 with its ops: the first install takes 30-45 minutes on 2 cores"
    if "$VLBERT_VENV/bin/python" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
      export FORCE_CUDA=1
    fi
    MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" _with_heartbeat "compiling mmcv" \
      "${PIP[@]}" install -v --no-build-isolation --no-deps mmcv==2.1.0 || exit 1
  fi
fi

STAMP="$VLBERT_VENV/.vlbert-installed"
WANT="$(cat setup.py | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  _say "installing vlbert and its dependencies (first time: a few minutes)"
  "${PIP[@]}" install --progress-bar on "${FIND_LINKS[@]}" -e ".[test]"
  echo "$WANT" >"$STAMP"
fi
export PATH="$VLBERT_VENV/bin:$PATH"
export VLBERT_PY="$VLBERT_VENV/bin/python"
