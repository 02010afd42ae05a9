"""qkernels._numba_util.numpy_row_stack_shim: np.row_stack comes back (as np.vstack) only for
a NumPy without it and the numba-cuda releases that need it (0.30.x), and Numba is loaded
only when a Numba op first runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def shim():
    pytest.importorskip("numba")
    from qkernels._numba_util import numpy_row_stack_shim
    return numpy_row_stack_shim


def test_numpy_with_row_stack_is_left_alone(shim, monkeypatch):
    sentinel = object()
    monkeypatch.setattr(np, "row_stack", sentinel, raising=False)
    assert shim("0.30.4") is False
    assert np.row_stack is sentinel


@pytest.mark.parametrize("version,aliased", [("0.30.0", True), ("0.30.4", True), ("0.31.0", False),
                                             ("0.3.1", False), ("1.30.0", False)])
def test_alias_only_for_numba_cuda_0_30(shim, monkeypatch, version, aliased):
    monkeypatch.delattr(np, "row_stack", raising=False)  # NumPy >= 2.5
    assert shim(version) is aliased
    assert (getattr(np, "row_stack", None) is np.vstack) is aliased


def test_import_qkernels_loads_no_numba():
    """The shim runs when qkernels._numba_util is first imported, which only a Numba op's
    first call does: importing the package and its families patches nothing."""
    code = ("import sys, qkernels, qkernels.int8, qkernels.blockwise, qkernels.fourbit, "
            "qkernels.optim, qkernels.fp8; print(sorted(m for m in sys.modules "
            "if m == 'numba' or m == 'qkernels._numba_util'))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
