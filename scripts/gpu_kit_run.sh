#!/usr/bin/env bash
# Run on the GPU host (no network): install the kit, build mmcv's CUDA ops, smoke-check, benchmark.
#
#   bash scripts/gpu_kit_run.sh KIT_DIR OUT_DIR [STAGES]       # STAGES: comma list, default install,mmcv,smoke,bench
#
# Every figure lands as JSON in OUT_DIR (at most 8 files: what the host returns of a run):
#   install.json      wheels installed, seconds                 mmcv_build.json  seconds, exit status, size of _ext
#   mmcv_build.log    the whole compile log                     smoke.json       scripts/gpu_kit_smoke.py's checks
#   e2e_base.json     bench/gpu_e2e.py BASE, checkpointing off and on (bf16, ZeRO-2)
#   e2e_options.json  the same with --channels-last --compile --ablate, in what time is left
#   run.log           this script's own lines
#
# Environment: KIT_PY (python3: the host's Python with torch), KIT_TARGET (/tmp/vlbert-site: the packages go
# there, then on PYTHONPATH), KIT_DEVICE (cuda; cpu rehearses everything but the CUDA parts),
# MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (9.0), KIT_BENCH_ARGS (extra arguments for both bench runs).
# Time: KIT_TOTAL_S (560: the host stops a command at 600 s) bounds the whole run; within it the
# mmcv build gets at most KIT_MMCV_TIMEOUT_S (330) and the smoke check KIT_SMOKE_TIMEOUT_S (180), each
# only while KIT_BENCH_MIN_S (150) stays for the benchmark, which takes the rest.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 2 ] || { sed -n '2,4p' "$0" >&2; exit 2; }
KIT="$(realpath "$1")"
OUT="$(realpath -m "$2")"
STAGES=",${3:-install,mmcv,smoke,bench},"
PY="${KIT_PY:-python3}"
TARGET="${KIT_TARGET:-/tmp/vlbert-site}"
DEVICE="${KIT_DEVICE:-cuda}"
read -r -a BENCH_EXTRA <<<"${KIT_BENCH_ARGS:-}"
mkdir -p "$OUT"
START=$SECONDS
TOTAL="${KIT_TOTAL_S:-560}"
left() { echo $((TOTAL - (SECONDS - START))); }
limit() {  # limit WANTED: WANTED seconds, or less so that the benchmark keeps KIT_BENCH_MIN_S
  local cap=$(( $(left) - ${KIT_BENCH_MIN_S:-150} ))
  [ "$cap" -lt "$1" ] && echo "$cap" || echo "$1"
}
say() { printf '[gpu-kit %4ss] %s\n' "$((SECONDS - START))" "$*" | tee -a "$OUT/run.log"; }
json() {  # json k=v ...: one JSON object; integers, true and false as such
  "$PY" -c 'import json, sys
conv = lambda v: int(v) if v.lstrip("-").isdigit() else {"true": True, "false": False}.get(v, v)
print(json.dumps({k: conv(v) for k, v in (a.split("=", 1) for a in sys.argv[1:])}))' "$@"
}
export PYTHONPATH="$TARGET:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DS_ACCELERATOR="${DS_ACCELERATOR:-$([ "$DEVICE" = cpu ] && echo cpu || echo cuda)}"
status=0

if [[ $STAGES == *,install,* ]]; then
  t=$SECONDS
  wheels=("$KIT"/wheels/*.whl)
  [ -e "${wheels[0]}" ] || { say "no wheels in $KIT/wheels"; exit 1; }
  say "installing ${#wheels[@]} wheels into $TARGET"
  # --no-deps: the lock (scripts/gpu_kit.lock) already is the closure, less what the host has.
  if "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" \
       "${wheels[@]}" >>"$OUT/run.log" 2>&1; then rc=0; else rc=$?; fi
  json stage=install rc="$rc" wheels="${#wheels[@]}" seconds="$((SECONDS - t))" target="$TARGET" >"$OUT/install.json"
  [ "$rc" = 0 ] || { say "pip install failed (run.log)"; exit 1; }
fi

if [[ $STAGES == *,mmcv,* ]]; then
  mmcv_file="$("$PY" -c 'import mmcv.ops, mmcv; print(mmcv.__file__)' 2>/dev/null)"
  if [ -n "$mmcv_file" ]; then
    say "mmcv with its ops imports already ($mmcv_file: a wheel was carried): no build"
    json stage=mmcv built=false mmcv_file="$mmcv_file" >"$OUT/mmcv_build.json"
  else
    sdist=("$KIT"/sdist/mmcv-*.tar.gz)
    [ -e "${sdist[0]}" ] || { say "no mmcv wheel and no mmcv sdist in $KIT"; exit 1; }
    cap="$(limit "${KIT_MMCV_TIMEOUT_S:-330}")"
    # scripts/mmcv_build.sh compiles the op list the CPU install compiles (scripts/patches/mmcv-2.1.0-ops.txt),
    # with its CUDA kernels; MMCV_OPS=all compiles every op.
    say "compiling mmcv's ops (${MMCV_OPS:-scripts/patches/mmcv-2.1.0-ops.txt}; MAX_JOBS=${MAX_JOBS:-16}, arch ${TORCH_CUDA_ARCH_LIST:-9.0}, limit $cap s)"
    t=$SECONDS
    MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHON="$PY" \
      timeout --kill-after=10 "$cap" \
      bash "$ROOT/scripts/mmcv_build.sh" "${sdist[0]}" "$TARGET" "$OUT/mmcv_build.log"
    rc=$?
    ext="$(ls "$TARGET"/mmcv/_ext*.so 2>/dev/null | head -n 1)"
    json stage=mmcv built=true rc="$rc" seconds="$((SECONDS - t))" limit_s="$cap" max_jobs="${MAX_JOBS:-16}" \
      ops="${MMCV_OPS:-$ROOT/scripts/patches/mmcv-2.1.0-ops.txt}" \
      ext_bytes="$([ -n "$ext" ] && stat -c %s "$ext" || echo 0)" \
      objects="$(grep -cE '^ *\[[0-9]+/[0-9]+\]' "$OUT/mmcv_build.log")" >"$OUT/mmcv_build.json"
    [ "$rc" = 0 ] || { say "the mmcv build failed (rc $rc; 124 = time limit): $OUT/mmcv_build.log"; exit 1; }
    say "mmcv built in $((SECONDS - t)) s"
  fi
fi

if [[ $STAGES == *,smoke,* ]]; then
  cap="$(limit "${KIT_SMOKE_TIMEOUT_S:-180}")"
  say "smoke check on $DEVICE (limit $cap s)"
  timeout --kill-after=10 "$cap" "$PY" "$ROOT/scripts/gpu_kit_smoke.py" --device "$DEVICE" \
    --json-out "$OUT/smoke.json" >>"$OUT/run.log" 2>&1 || { say "the smoke check failed: $OUT/smoke.json, run.log"; exit 1; }
fi

if [[ $STAGES == *,bench,* ]]; then
  budget="$(( $(left) - 10 ))"
  t=$SECONDS
  if [ "$DEVICE" = cpu ]; then BENCH=(--tiny --device cpu); else BENCH=(--device "$DEVICE"); fi
  say "bench: BASE, checkpointing off and on (limit $budget s for both runs)"
  timeout --kill-after=10 "$budget" "$PY" "$ROOT/bench/gpu_e2e.py" "${BENCH[@]}" --checkpointing both \
    --time-budget-s "$((budget * 6 / 10))" --json-out "$OUT/e2e_base.json" "${BENCH_EXTRA[@]}" >>"$OUT/run.log" 2>&1 \
    || { say "the base bench failed or ran out of time (rc $?)"; status=1; }
  rest=$((budget - (SECONDS - t) - 20))
  if [ "$rest" -gt 60 ]; then
    say "bench: speed options (--channels-last --compile --ablate), $rest s"
    timeout --kill-after=10 "$rest" "$PY" "$ROOT/bench/gpu_e2e.py" "${BENCH[@]}" --checkpointing off --channels-last \
      --compile --ablate --time-budget-s "$((rest - 30))" --json-out "$OUT/e2e_options.json" "${BENCH_EXTRA[@]}" \
      >>"$OUT/run.log" 2>&1 || { say "the options bench failed or ran out of time (rc $?)"; status=1; }
  else
    say "no time left for the speed options"
  fi
fi
say "done (status $status)"
exit "$status"
