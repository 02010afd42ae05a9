#!/usr/bin/env bash
# Run the test suite: everything that runs here (NumPy reference, torch CPU paths, the
# backends this machine has), then the Numba kernels under the CUDA simulator in their
# own process (NUMBA_ENABLE_CUDASIM must be set before numba is imported). GPU tests skip
# cleanly without a GPU. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
$VPY -m pytest -q -m "not cudasim" "$@"
NUMBA_ENABLE_CUDASIM=1 $VPY -m pytest -q -m cudasim "$@"
