#!/usr/bin/env bash
# Run the test suite: everything that runs here (NumPy reference, torch CPU paths, the
# backends this machine has, the 2-process gloo checks), and the Numba kernels under the
# CUDA simulator in a second pytest process (NUMBA_ENABLE_CUDASIM must be set before numba
# is imported), the two side by side: the simulator run is one Python thread at a time, so
# it shares two cores well. GPU tests skip cleanly without a GPU. Extra arguments go to
# both pytest runs; the exit status is non-zero when either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
simlog=$(mktemp)
trap 'rm -f "$simlog"' EXIT
NUMBA_ENABLE_CUDASIM=1 $VPY -m pytest -q -m cudasim -p no:cacheprovider "$@" >"$simlog" 2>&1 &
sim=$!
main_rc=0
$VPY -m pytest -q -m "not cudasim" "$@" || main_rc=$?
sim_rc=0
wait "$sim" || sim_rc=$?
echo "--- Numba kernels under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) ---"
cat "$simlog"
echo "main run: exit $main_rc; simulator run: exit $sim_rc"
[ "$main_rc" -eq 0 ] && [ "$sim_rc" -eq 0 ]
