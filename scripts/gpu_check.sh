#!/usr/bin/env bash
# The GPU run: every GPU test file (TEST_JOBS at a time, each under TEST_LIMIT seconds), then,
# optionally, the demo (DEMO=1), then each benchmark section named in BENCH (default: all) in
# its own process under SECTION_LIMIT seconds, so that one slow section cannot lose the others.
# Logs go to $OUT (default ./out): gpu_tests.log, bench.log, and bench.tgz with each section's
# markdown table and plot (one file, since the device tool returns only a few).
# Wheels in .whl/ (e.g. bitsandbytes for the side-by-side numbers) are installed first into
# a private folder, for machines that cannot reach a package index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/qk_site .whl/*.whl && export PYTHONPATH="/tmp/qk_site:$PYTHONPATH"
fi
python3 -m qkernels doctor 2>&1 | grep -v Warning

run_test_file() {  # $1: test file; writes $WORK/tests/<name>.log and prints one summary line
  local log="$WORK/tests/$(basename "$1" .py).log"
  timeout "${TEST_LIMIT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::Warning \
    --tb=short "$1" > "$log" 2>&1
  echo "$1: rc=$? $(tail -1 "$log")"
}
export -f run_test_file; export WORK TEST_LIMIT
mkdir -p "$WORK/tests"
if [ "${TESTS-all}" != "" ]; then
  grep -l "mark.gpu" ${TESTS:-tests/test_*.py} | xargs -P "${TEST_JOBS:-1}" -I{} bash -c 'run_test_file {}'
  for f in "$WORK"/tests/*.log; do echo "=== $f"; cat "$f"; done > "$OUT/gpu_tests.log"
fi

if [ -n "${DEMO:-}" ]; then
  timeout "${DEMO_LIMIT:-150}" python3 -m torch_ops demo --out "$WORK/demo" ${DEMO_ARGS:-} \
    > "$OUT/demo.log" 2>&1; echo "demo rc=$?"; tail -15 "$OUT/demo.log"
fi

if [ -n "${BENCH-all}" ]; then
  for section in $(echo "${BENCH:-blockwise,fourbit,int8,optim,layers,layers4bit8bit}" | tr , ' '); do
    timeout "${SECTION_LIMIT:-120}" python3 -m benchmarks --ops "$section" --sizes "${SIZES:-full}" \
      --out "$WORK/bench/$section" >> "$OUT/bench.log" 2>&1
    echo "bench $section rc=$?"
  done
  grep -E "^\| [a-z]" "$OUT/bench.log" | tail -80
fi
tar -czf "$OUT/bench.tgz" -C "$WORK" $(cd "$WORK" && ls -d bench demo 2>/dev/null) 2>/dev/null
exit 0
