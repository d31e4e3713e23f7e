# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse the virtual
# environment in $VLBERT_VENV (default .venv) and install what is missing.
#
# Environment knobs:
#   VLBERT_PYTHON      interpreter to build the venv with (default: python3.11, else python3 if it is 3.11)
#   VLBERT_VENV        venv folder (default: .venv in the repository)
#   VLBERT_TORCH       pip requirement(s) for torch (default: "torch==2.13.0", the CPU build on CPU hosts).
#                      GPU hosts: install a CUDA build of torch 2.13 into the venv first (PyTorch's
#                      install selector gives the pip line), then run this; see docs/install.md.
#   VLBERT_WHEELS      folder of prebuilt wheels, used only when set: an mmcv 2.1.0 wheel there (and torch
#                      2.13.0+cpu) is installed instead of compiling mmcv, e.g. VLBERT_WHEELS=../shared/wheels
#                      (every mmcv op, CPU only). Unset, mmcv is compiled with only the ops vlbert uses.
#   VLBERT_CACHE       where the compiled mmcv wheel and mmcv's source are kept, so that later installs (a new
#                      venv, a fresh clone) reuse them (default: ${XDG_CACHE_HOME:-~/.cache}/vlbert)
#   VLBERT_MMCV_OPS    the op list to compile (default scripts/patches/mmcv-2.1.0-ops.txt; "all": every op)
set -euo pipefail

VLBERT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$VLBERT_ROOT"
VLBERT_VENV="${VLBERT_VENV:-$VLBERT_ROOT/.venv}"
VLBERT_TORCH="${VLBERT_TORCH:-torch==2.13.0}"
VLBERT_WHEELS="${VLBERT_WHEELS:-}"
VLBERT_CACHE="${VLBERT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlbert}"
VLBERT_MMCV_OPS="${VLBERT_MMCV_OPS:-$VLBERT_ROOT/scripts/patches/mmcv-2.1.0-ops.txt}"

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
# _HB_LOG: a log the command writes itself, read for ninja's progress instead.
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
    local last; last="$(grep -oE '^ *\[[0-9]+/[0-9]+\]' "${_HB_LOG:-$log}" 2>/dev/null | tail -n 1 | tr -d ' ')"
    [ -n "$last" ] && last="files compiled $last" || last="$(tail -n 1 "${_HB_LOG:-$log}" 2>/dev/null | cut -c1-100)"
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
    # mmcv has no wheel for current torch: compile it (scripts/mmcv_build.sh: our patches, only the ops of
    # VLBERT_MMCV_OPS, CPU and with CUDA torch its CUDA kernels) into a wheel kept in VLBERT_CACHE under a key
    # of everything the binary depends on, so the next install reuses it.
    _mmcv_key="$("$VLBERT_VENV/bin/python" -c 'import sys, sysconfig, torch
print(sys.implementation.cache_tag, sysconfig.get_platform(), torch.__version__, torch.version.cuda)')"
    _mmcv_key="$( { echo "$_mmcv_key ${TORCH_CUDA_ARCH_LIST:-}"; cat scripts/patches/mmcv-2.1.0-*.patch
              [ "$VLBERT_MMCV_OPS" = all ] && echo all || cat "$VLBERT_MMCV_OPS"; } | sha256sum | cut -c1-16)"
    _mmcv_wheels="$VLBERT_CACHE/mmcv-2.1.0-$_mmcv_key"
    if ! ls "$_mmcv_wheels"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
      _mmcv_sdist="$VLBERT_CACHE/mmcv-2.1.0.tar.gz"
      if [ ! -f "$_mmcv_sdist" ]; then
        _say "downloading mmcv 2.1.0's source"
        "${PIP[@]}" download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$VLBERT_CACHE" mmcv==2.1.0
      fi
      if [ "$VLBERT_MMCV_OPS" = all ]; then
        _say "compiling mmcv 2.1.0 with all its ops: 30-45 minutes on 2 cores"
      else
        _mmcv_ops="$(sed 's/#.*//' "$VLBERT_MMCV_OPS" | awk 'NF {print $1}' | xargs)"
        _say "compiling mmcv 2.1.0 with the ops vlbert uses ($_mmcv_ops): about 3.5 CPU-minutes (docs/install.md)"
      fi
      rm -rf "$VLBERT_CACHE/mmcv_build.log" "$_mmcv_wheels.tmp"
      _HB_LOG="$VLBERT_CACHE/mmcv_build.log" MMCV_OPS="$VLBERT_MMCV_OPS" MMCV_BUILD_DIR="$VLBERT_CACHE/mmcv-build" \
        MMCV_WHEEL_DIR="$_mmcv_wheels.tmp" PYTHON="$VLBERT_VENV/bin/python" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        _with_heartbeat "compiling mmcv (log: $VLBERT_CACHE/mmcv_build.log)" \
        bash scripts/mmcv_build.sh "$_mmcv_sdist" - "$VLBERT_CACHE/mmcv_build.log" || exit 1
      rm -rf "$_mmcv_wheels" "$VLBERT_CACHE/mmcv-build"
      mv "$_mmcv_wheels.tmp" "$_mmcv_wheels"
    else
      _say "installing mmcv 2.1.0 compiled earlier ($_mmcv_wheels)"
    fi
    "${PIP[@]}" install --quiet --no-deps "$_mmcv_wheels"/mmcv-2.1.0-*.whl
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
export VLBERT_PY="$VLBERT_VENV/bin/python" VLBERT_CACHE
