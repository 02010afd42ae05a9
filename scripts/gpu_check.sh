#!/usr/bin/env bash
# The GPU run: every GPU test file in turn (each under its own time limit), then the
# benchmark sections named in BENCH (default: all). Logs go to $OUT (default ./out).
# Wheels in .whl/ (e.g. bitsandbytes for the side-by-side numbers) are installed first into
# a private folder, for machines that cannot reach a package index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/qk_site .whl/*.whl && export PYTHONPATH="/tmp/qk_site:$PYTHONPATH"
fi
python3 -m qkernels doctor 2>&1 | grep -v Warning
for f in ${TESTS:-tests/test_*.py}; do
  grep -q "mark.gpu" "$f" || continue
  timeout "${TEST_LIMIT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider -W ignore::Warning \
    --tb=short "$f" > "$OUT/one.log" 2>&1
  echo "$f: rc=$? $(tail -1 "$OUT/one.log")"
  { echo "=== $f"; cat "$OUT/one.log"; } >> "$OUT/gpu_tests.log"; rm -f "$OUT/one.log"
done
if [ -n "${BENCH-all}" ]; then
  ops=${BENCH:-blockwise,fourbit,int8,optim}
  timeout "${BENCH_LIMIT:-300}" python3 -m benchmarks --ops "$ops" --sizes "${SIZES:-full}" --out "$OUT" \
    > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; grep -E "^\| [a-z]" "$OUT/bench.log" | tail -60
fi
