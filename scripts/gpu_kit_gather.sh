#!/usr/bin/env bash
# Gather the GPU kit on a host with PyPI: every file of scripts/gpu_kit.lock, for CPython 3.12 on
# manylinux x86-64, into an ignored folder that the GPU host's run (scripts/gpu_kit_run.sh) installs from.
#
#   bash scripts/gpu_kit_gather.sh [KIT_DIR]        # default .gpu_kit; then: python scripts/gpu_kit.py check KIT_DIR
#
#   KIT_DIR/wheels/   the lock's wheels (pip download --no-deps), and deepspeed built here (pure Python, ops JIT)
#   KIT_DIR/sdist/    mmcv's source archive; its CUDA ops are compiled on the GPU host (scripts/mmcv_build.sh)
#   KIT_DIR/MANIFEST  name, size and sha256 of each file
#
# Knobs: KIT_PYTHON_VERSION (3.12; 3.11 gathers the same lock for a CPU rehearsal on this host),
#        KIT_MMCV_WHEEL (a prebuilt mmcv wheel to carry instead of compiling there; copied into wheels/).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KIT="$(realpath -m "${1:-$ROOT/.gpu_kit}")"
PYVER="${KIT_PYTHON_VERSION:-3.12}"
say() { printf '[gpu-kit] %s\n' "$*"; }
# A throwaway venv: pip fetching mmcv's sdist runs its setup.py, which needs setuptools<81 (pkg_resources)
# and wheel; deepspeed's wheel is built here too. Nothing is installed anywhere else.
BUILDENV="$(mktemp -d -t vlbert-gpu-kit.XXXXXX)"
trap 'rm -rf "$BUILDENV"' EXIT
"${KIT_BUILD_PYTHON:-python3}" -m venv "$BUILDENV"
PY="$BUILDENV/bin/python"
"$PY" -m pip install --quiet 'setuptools<81' wheel packaging

mkdir -p "$KIT/wheels" "$KIT/sdist"
rm -f "$KIT"/wheels/*.whl "$KIT"/sdist/*.tar.gz
TAG="cp${PYVER/./}"
PLATFORM_ARGS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  PLATFORM_ARGS+=(--platform "$p")
done

mapfile -t WHEELS < <("$PY" "$ROOT/scripts/gpu_kit.py" list wheel)
say "downloading ${#WHEELS[@]} wheels for CPython $PYVER"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --abi "$TAG" "${PLATFORM_ARGS[@]}" -d "$KIT/wheels" "${WHEELS[@]}"

# deepspeed publishes only an sdist. DS_BUILD_OPS=0: a pure-Python wheel whose CUDA ops (none of which
# vlbert's ZeRO-2 with a torch optimizer uses) would be JIT-compiled on first use.
mapfile -t BUILT < <("$PY" "$ROOT/scripts/gpu_kit.py" list build)
for req in "${BUILT[@]}"; do
  say "building the wheel of $req"
  DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-binary :all: -w "$KIT/wheels" "$req"
done

mapfile -t SDISTS < <("$PY" "$ROOT/scripts/gpu_kit.py" list sdist)
for req in "${SDISTS[@]}"; do
  say "downloading the source of $req"
  # --no-build-isolation --no-deps: pip only fetches the archive (mmcv's setup.py would need torch to run).
  "$PY" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$KIT/sdist" "$req"
done

if [ -n "${KIT_MMCV_WHEEL:-}" ]; then
  say "carrying the prebuilt $KIT_MMCV_WHEEL"
  cp "$KIT_MMCV_WHEEL" "$KIT/wheels/"
fi

(cd "$KIT" && find wheels sdist -type f -printf '%s %p\n' | sort -k2 | while read -r size f; do
   printf '%s %s %s\n' "$(sha256sum "$f" | cut -c1-64)" "$size" "$f"; done) >"$KIT/MANIFEST"
say "$(wc -l <"$KIT/MANIFEST") files, $(du -sh "$KIT" | cut -f1) in $KIT"
"$PY" "$ROOT/scripts/gpu_kit.py" check "$KIT" --python "$PYVER"
