#!/usr/bin/env bash
# Set up qkernels on a fresh machine: a virtual environment in .venv with the package and
# its test dependencies. Pins torch==2.13.0 only when no torch is installed (an unpinned
# torch would pull a multi-GB CUDA build onto a CPU machine). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip
if ! $VPY -c "import torch" 2>/dev/null; then
  $VPY -m pip install -q "torch==2.13.0"
fi
$VPY -m pip install -q -e ".[test,plot]"
# On a machine with an NVIDIA driver, also install the CUDA extra matching it.
if command -v nvidia-smi >/dev/null 2>&1; then
  major=$(nvidia-smi | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p' | head -1)
  if [ "${major:-0}" -ge 13 ]; then $VPY -m pip install -q -e ".[cuda13]";
  elif [ "${major:-0}" -ge 12 ]; then $VPY -m pip install -q -e ".[cuda12]"; fi
fi
echo "qkernels is set up in .venv"
