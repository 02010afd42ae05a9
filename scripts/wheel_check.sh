#!/usr/bin/env bash
# The install check (CI): build the wheel, check what it holds (every .cu / .cuh source, a
# py.typed marker in each package, no benchmarks or tests), install it with no extras into a
# fresh virtual environment, and from outside the source tree run an NF4 and an int8 layer on
# bfloat16 and float16 input, replace_linear with its progress bar (ml_dtypes and tqdm must
# come as core dependencies), the qkernels command's help and doctor, and check that bench,
# which needs the source tree, is not offered.
#
# Fast on purpose: torch is pinned to 2.13.0 as scripts/setup.sh pins it (pip's find-links,
# where a machine has them, supply the on-disk CPU wheel), and pip's cache is kept. The build
# runs on a copy of the package sources, so no build/ or stale files touch the checkout.
# PYTHON picks the interpreter for the new environment (default: the one behind .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
start=$SECONDS
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  PYTHON=$(.venv/bin/python -c "import sys; print(sys._base_executable)")
fi
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. build from a clean copy of what the wheel is made of
mkdir -p "$WORK/src"
tar --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - \
  pyproject.toml README.md $(ls -d LICENSE* 2>/dev/null) qkernels reference torch_ops \
  | tar -xf - -C "$WORK/src"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
wheel=$(ls "$WORK"/dist/qkernels-*.whl)
echo "built $(basename "$wheel") in $((SECONDS - start)) s"

# 2. its contents against the source tree
"$PY" - "$wheel" "$ROOT" <<'EOF'
import pathlib, sys, zipfile
wheel, root = sys.argv[1], pathlib.Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
sources = {p.relative_to(root).as_posix() for pattern in ("*.cu", "*.cuh")
           for p in (root / "qkernels").rglob(pattern)}
missing = sorted(sources - names)
assert sources and not missing, f"CUDA sources missing from the wheel: {missing}"
for package in ("qkernels", "reference", "torch_ops"):
    assert f"{package}/py.typed" in names, f"{package}/py.typed missing from the wheel"
stray = sorted(n for n in names if n.split("/")[0] in ("benchmarks", "tests", "scripts"))
assert not stray, f"the wheel holds files that are not the library's: {stray[:5]}"
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(wheel).read(meta).decode()
for line in ("License-Expression: MIT", "Requires-Dist: ml_dtypes", "Requires-Dist: tqdm"):
    assert line in text, f"METADATA lacks {line!r}"
print(f"wheel contents: {len(sources)} CUDA sources, py.typed x3, metadata ok")
EOF

# 3. a fresh environment with the wheel and its core dependencies only
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
$VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q "$wheel"
echo "installed into a fresh environment at $((SECONDS - start)) s"

# 4. use it from outside the source tree (so that only the installed package is importable)
cd "$WORK"
$VPY - <<'EOF'
import pathlib, sys

import torch
from torch import nn

import qkernels
import torch_ops

here = pathlib.Path(sys.prefix)
for module in (qkernels, torch_ops):
    assert here in pathlib.Path(module.__file__).parents, (module.__name__, module.__file__)

torch.manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    x = torch.randn(8, 256, dtype=dtype)
    # NF4: against a float64 product with the layer's own dequantized weight
    linear = nn.Linear(256, 128).to(dtype)
    layer = torch_ops.Linear4bit(256, 128, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")  # quantizes
    with torch.no_grad():
        y = layer(x)
    w = qkernels.dequantize_4bit(layer.weight.data, layer.weight.quant_state,
                                 out_dtype=torch.float32)
    ref = x.double() @ w.double().T + layer.bias.double()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert y.dtype == dtype and y.shape == (8, 128) and rel < 1e-2, ("nf4", dtype, y.dtype, rel)
    # int8 (LLM.int8() without outliers): against the float layer it replaced
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).to(dtype)
    with torch.no_grad():
        ref = model(x).double()
        report = torch_ops.replace_linear(model, "int8", progress=True)  # tqdm's bar
        y = model(x)
    assert type(model[0]).__name__ == "Linear8bitLt" and len(report.replaced) == 2
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert y.dtype == dtype and y.shape == (8, 64) and rel < 3e-2, ("int8", dtype, y.dtype, rel)
    print(f"{str(dtype):15s} NF4 and int8 layers ok")
EOF
qk="$WORK/venv/bin/qkernels"
"$qk" --help > help.txt
grep -q "^  demo " help.txt
grep -q "^  doctor " help.txt
if grep -q "^  bench " help.txt; then
  echo "qkernels --help offers bench, which the wheel does not hold" >&2; exit 1
fi
"$qk" demo --help > /dev/null
"$qk" doctor --help > /dev/null
rc=0; "$qk" bench 2> bench.txt || rc=$?
if [ "$rc" -ne 2 ] || ! grep -q "python -m benchmarks" bench.txt; then
  echo "qkernels bench: exit status $rc, not 2 with a pointer to python -m benchmarks" >&2
  cat bench.txt >&2; exit 1
fi
"$qk" doctor
$VPY -m qkernels --help > /dev/null
echo "wheel check passed in $((SECONDS - start)) s"
