#!/usr/bin/env bash
# Mutation testing (not in CI): mutmut mutates one module at a time, in place, runs the fast
# tests that cover it against each mutant and restores the file. A surviving mutant is a change
# of the code that no test notices. Scores and survivors: docs/development.md, "Mutation testing".
#
#   bash scripts/mutation.sh                                           # vlbert/tasks/vqa/metric.py
#   bash scripts/mutation.sh vlbert/data/masking.py tests/test_masking.py
#   bash scripts/mutation.sh vlbert/model/embeddings.py "tests/test_embeddings.py -k 'not bert'"
#
# The second argument is pytest's arguments, as one string: one or more test files (or
# file::test ids), optionally with -k / -m; every file it names must exist.
#
# Afterwards `"$MUTMUT_VENV/bin/mutmut" results` lists the survivors and `... show <id>` shows one.
# mutmut lives in its own virtual environment ($MUTMUT_VENV, default .venv-mutmut), never in the
# project's; the tests run with the project's interpreter ($VLBERT_PY, default .venv/bin/python).
# Knobs: MUTMUT_VERSION (default 2.5.1: plain in-place mutation with a runner command),
# MUTMUT_TEST_LIMIT (seconds a mutant's test run may take; default ten times the unmutated run),
# MUTMUT_RERUN=1 (test again only the survivors of the last run of the same module).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODULE="${1:-vlbert/tasks/vqa/metric.py}"
TESTS="${2:-tests/test_vqa_metric.py}"
MUTMUT_VENV="${MUTMUT_VENV:-$ROOT/.venv-mutmut}"
MUTMUT_VERSION="${MUTMUT_VERSION:-2.5.1}"
VLBERT_PY="${VLBERT_PY:-$ROOT/.venv/bin/python}"

[ -f "$MODULE" ] || { echo "mutation.sh: $MODULE: no such file" >&2; exit 2; }
[ -x "$VLBERT_PY" ] || { echo "mutation.sh: $VLBERT_PY: no interpreter (run scripts/test.sh once, or set VLBERT_PY)" >&2; exit 2; }
# Split the tests argument as a shell would (and as mutmut splits its runner command).
mapfile -t TEST_ARGS < <("$VLBERT_PY" -c 'import shlex, sys; print("\n".join(shlex.split(sys.argv[1])))' "$TESTS")
files=0
for a in "${TEST_ARGS[@]}"; do
  case "$a" in
    *.py|*.py::*) [ -f "${a%%::*}" ] || { echo "mutation.sh: ${a%%::*}: no such file" >&2; exit 2; }
                  files=$((files + 1)) ;;
  esac
done
[ "$files" -gt 0 ] || { echo "mutation.sh: no test file in '$TESTS'" >&2; exit 2; }
# mutmut edits the module in place: refuse to start on uncommitted edits, keep a copy, and put it
# back however the run ends. While it runs, the module on disk is a mutant: run nothing else from
# this checkout and commit nothing (`git commit -a` would commit a mutant).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 && ! git diff --quiet HEAD -- "$MODULE"; then
  echo "mutation.sh: $MODULE has uncommitted changes; commit or stash them first" >&2; exit 2
fi
ORIGINAL="$(mktemp)"
RUNNER="$(mktemp)"
cp "$MODULE" "$ORIGINAL"
restore() {
  rm -f "$RUNNER"
  [ -f "$ORIGINAL" ] || return 0
  if ! cmp -s "$ORIGINAL" "$MODULE"; then
    echo "mutation.sh: $MODULE left mutated; restoring it" >&2
    cp "$ORIGINAL" "$MODULE"
  fi
  rm -f "$ORIGINAL" "$MODULE.bak"  # mutmut's own copy, left behind when it is stopped
}
trap restore EXIT
if [ ! -x "$MUTMUT_VENV/bin/mutmut" ]; then
  "$VLBERT_PY" -m venv "$MUTMUT_VENV"
  "$MUTMUT_VENV/bin/python" -m pip install --quiet "mutmut==$MUTMUT_VERSION"
fi

# A fresh cache per module, so that `mutmut results` speaks of this run only. MUTMUT_RERUN=1 keeps
# the last run's cache (run it on the same module, after adding tests): mutmut then tests again
# only the mutants that were not killed, since a killed mutant stays killed when tests are added.
[ "${MUTMUT_RERUN:-0}" = 1 ] || rm -f .mutmut-cache
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# No bytecode written: two mutants of the same size written within a second would otherwise share a
# stale .pyc (its check is mtime in seconds and size), and the tests would run the wrong code. The
# module's own .pyc, if an earlier run left one, is removed, so every run compiles the module from
# its source; the other modules (torch, ...) are still read from their existing caches (pointing
# PYTHONPYCACHEPREFIX at an empty folder would compile them all on every run: twice the time).
export PYTHONDONTWRITEBYTECODE=1
unset PYTHONPYCACHEPREFIX
rm -f "$(dirname "$MODULE")/__pycache__/$(basename "$MODULE" .py)".*.pyc
# -x: a mutant is killed at the first failing test; -p no:cacheprovider: no test reordering between mutants.
# mutmut 2.5.1 takes every exit status but 1 for "the tests pass": a mutant that breaks the
# module's import (pytest exits 2, a collection error) or leaves no test to run (5) would count
# as a survivor. The runner turns every failure into 1.
# A mutant can turn a loop into one that never ends, and mutmut's own time limit stops only the
# runner's shell, not the pytest under it: so each run of the tests is under `timeout`,
# MUTMUT_TEST_LIMIT seconds (default: ten times the unmutated run, at least 30), and a mutant
# that runs past it counts as killed.
{
  printf '#!/usr/bin/env bash\n'
  printf 'timeout -k 10 "${MUTATION_TEST_LIMIT:-3600}" '
  printf '%q ' "$VLBERT_PY" -m pytest -x -q -p no:cacheprovider -p no:randomly "${TEST_ARGS[@]}"
  printf '|| exit 1\n'
} >"$RUNNER"
start=$(date +%s)
bash "$RUNNER" >/dev/null 2>&1 || {
  echo "mutation.sh: the tests fail on the unmutated module ($VLBERT_PY -m pytest $TESTS)" >&2; exit 1; }
baseline=$(( $(date +%s) - start ))
export MUTATION_TEST_LIMIT="${MUTMUT_TEST_LIMIT:-$(( baseline * 10 > 30 ? baseline * 10 : 30 ))}"
echo "mutation.sh: the tests take ${baseline} s on the unmutated module; a mutant's run is stopped after ${MUTATION_TEST_LIMIT} s"
status=0
"$MUTMUT_VENV/bin/mutmut" run --paths-to-mutate "$MODULE" --tests-dir tests --no-progress \
  --runner "bash $RUNNER" || status=$?
restore
# mutmut's exit status is a bit field (2 survivors, 4 timeouts, 8 suspicious); 1 is its own failure.
"$MUTMUT_VENV/bin/mutmut" results || true
[ $((status & 1)) -eq 0 ] || exit 1
