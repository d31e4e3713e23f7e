#!/usr/bin/env bash
# Compile mmcv 2.1.0 with the ops vlbert uses from the source archive, with our patches, into a target folder.
#
#   bash scripts/mmcv_build.sh SDIST [TARGET_DIR [LOG]]    # PYTHON (python3) must import torch
#
# Without TARGET_DIR (or with "-") mmcv goes into PYTHON's own environment; with MMCV_WHEEL_DIR set, a wheel
# is written there instead and nothing is installed. LOG defaults to mmcv_build.log beside TARGET_DIR (in the
# working folder without one).
# The ops: those named in MMCV_OPS (default scripts/patches/mmcv-2.1.0-ops.txt: nms, roi_align, roi_pool, the
# functions vlbert's detector calls, docs/install.md), CPU sources and, with CUDA, their .cu files; the other
# ops' functions are stubs that raise "not built in this install: <function>". MMCV_OPS=all compiles all.
# The patches (scripts/patches/mmcv-2.1.0-*.patch): setup.py builds with the C++ standard the installed
# torch's headers need (C++20 from PyTorch 2.14 on, C++17 before) and no longer imports pkg_resources
# (removed from setuptools 81); setup.py compiles only the ops of vlbert_ops.txt when the source holds one
# (vlbert_subset.py; mmcv/utils/ext_loader.py makes the stubs). With torch CUDA: FORCE_CUDA=1 and
# TORCH_CUDA_ARCH_LIST (default 9.0, the
# H100/H200) unless set; when $CUDA_HOME/include lacks the CUDA libraries' headers that torch's headers
# include (cusparse.h: a toolkit with only nvcc and the runtime), those of torch's pip wheels (nvidia/cu13)
# are put on CPATH. MAX_JOBS defaults to the number of cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SDIST="$(realpath "$1")"
TARGET="${2:--}"
TARGET_ARGS=()
if [ "$TARGET" != - ]; then
  TARGET="$(realpath -m "$TARGET")"
  TARGET_ARGS=(--target "$TARGET")
  mkdir -p "$TARGET"
fi
LOG="$(realpath -m "${3:-$([ "$TARGET" = - ] && echo . || echo "$TARGET/..")/mmcv_build.log}")"
PY="${PYTHON:-python3}"
missing="$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "setuptools", "wheel", "packaging", "ninja") if u.find_spec(m) is None))')"
[ -z "$missing" ] || { echo "mmcv_build.sh: $PY lacks: $missing (pip install them first)" >&2; exit 1; }

# The source tree and its objects stay in MMCV_BUILD_DIR: a build stopped by a time limit continues
# where it stopped when run again (ninja skips what is up to date).
OPS="${MMCV_OPS:-$ROOT/scripts/patches/mmcv-2.1.0-ops.txt}"
[ "$OPS" = all ] || [ -f "$OPS" ] || { echo "mmcv_build.sh: no op list $OPS" >&2; exit 1; }
WORK="${MMCV_BUILD_DIR:-${TMPDIR:-/tmp}/vlbert-mmcv-build}"
SRC="$WORK/$(basename "$SDIST" .tar.gz)"
# The patched tree is reused only when made by the same patches (a changed patch starts afresh).
STAMP="$(cat "$ROOT"/scripts/patches/mmcv-2.1.0-*.patch | sha256sum | cut -c1-16)"
if [ "$(cat "$SRC/.vlbert-patched" 2>/dev/null)" != "$STAMP" ]; then
  rm -rf "$SRC"
  mkdir -p "$WORK"
  tar -xzf "$SDIST" -C "$WORK"
  for p in "$ROOT"/scripts/patches/mmcv-2.1.0-*.patch; do
    patch -d "$SRC" -p1 --forward --quiet <"$p"
  done
  echo "$STAMP" >"$SRC/.vlbert-patched"
fi
if [ "$OPS" = all ]; then rm -f "$SRC/vlbert_ops.txt"; else cp "$OPS" "$SRC/vlbert_ops.txt"; fi

export MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if "$PY" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
  export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
  if [ ! -f "$CUDA_HOME/include/cusparse.h" ]; then
    wheels_include="$("$PY" -c 'import os, torch
base = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
print(next((os.path.join(base, d, "include") for d in sorted(os.listdir(base))
            if os.path.isfile(os.path.join(base, d, "include", "cusparse.h"))), ""))' 2>/dev/null || true)"
    [ -n "$wheels_include" ] || { echo "no cusparse.h in $CUDA_HOME/include nor in torch's nvidia wheels" >&2; exit 1; }
    export CPATH="$wheels_include${CPATH:+:$CPATH}"
  fi
fi

mkdir -p "$(dirname "$LOG")"
{
  echo "mmcv build: $(date -u +%FT%TZ) $(nproc) cores, MAX_JOBS=$MAX_JOBS FORCE_CUDA=${FORCE_CUDA:-0} ops=$OPS" \
       "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} CUDA_HOME=${CUDA_HOME:-} CPATH=${CPATH:-}"
  "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
} >"$LOG"
# --no-build-isolation: setup.py compiles against the torch that is installed; --no-index: nothing is fetched.
if [ -n "${MMCV_WHEEL_DIR:-}" ]; then
  mkdir -p "$MMCV_WHEEL_DIR"
  "$PY" -m pip wheel -v --no-index --no-deps --no-build-isolation -w "$MMCV_WHEEL_DIR" "$SRC" >>"$LOG" 2>&1
else
  "$PY" -m pip install -v --no-index --no-deps --no-build-isolation --no-compile "${TARGET_ARGS[@]}" "$SRC" >>"$LOG" 2>&1
fi
