"""qkernels.int8._choice.kernel_choice: the int8 family's one kernel-choice function (CPU: the
device's compute capability is stubbed; the kernels themselves run in the gpu tests of
test_int8.py and test_linear8bit.py)."""
from __future__ import annotations

import pytest

from qkernels.int8 import _choice


@pytest.fixture(params=[True, False], ids=["sm90", "other"])
def sm90(request, monkeypatch):
    """kernel_choice on a device of compute capability 9.0 (True) or another (False)."""
    monkeypatch.setattr(_choice, "_is_sm90", lambda device: request.param)
    _choice.kernel_choice.cache_clear()
    yield request.param
    _choice.kernel_choice.cache_clear()


def test_gemm_takes_the_hopper_kernel_only_where_it_runs(sm90):
    choice = _choice.kernel_choice
    assert choice("gemm", 0, 2051, 2312, 272, "int8", True) == ("sm90" if sm90 else "mma_sync")
    assert choice("gemm", 0, 2051, 2312, 270, "int8", False) == "mma_sync"
    assert choice("gemm", 0, 3, 9, 16, "int8", True, "mma_sync") == "mma_sync"
    for name in ("sm90", "sm90_bn128", "sm90_bk64"):
        if sm90:
            assert choice("gemm", 0, 3, 9, 16, "int8", True, name) == name
        else:
            with pytest.raises(ValueError, match="compute capability 9.0"):
                choice("gemm", 0, 3, 9, 16, "int8", True, name)
        with pytest.raises(ValueError, match="16-byte aligned"):
            choice("gemm", 0, 3, 9, 20, "int8", False, name)
    with pytest.raises(ValueError, match="must be one of"):
        choice("gemm", 0, 3, 9, 16, "int8", True, "gemv_mma")


@pytest.mark.parametrize("dtype,M,K,aligned,want", [
    ("float16", 1, 4096, True, "gemv_staged"),      # 8 KB of x: one launch
    ("float16", 3, 4096, True, "gemv_staged"),
    ("float16", 4, 4096, True, "gemv_mma"),         # tensor cores from 4 rows on aligned weights
    ("float16", 4, 4095, False, "gemv_staged"),     # 32,760 bytes: still staged
    ("float32", 4, 4095, False, "gemv_dp4a"),       # 65,520 bytes: two launches
    ("float16", 16, 520, False, "gemv_staged"),
    ("float16", 16, 1100, False, "gemv_dp4a"),      # 35,200 bytes
    ("bfloat16", 1, 23000, True, "gemv_dp4a"),      # x fits 32 KB, its codes not shared memory
])
def test_linear_gemv_form(sm90, dtype, M, K, aligned, want):
    assert _choice.kernel_choice("linear", 0, M, 64, K, dtype, aligned) == want


def test_linear_forced_forms_and_their_limits(sm90):
    choice = _choice.kernel_choice
    for name in _choice.GEMV_KERNELS:
        assert choice("linear", 0, 3, 64, 512, "float16", True, name) == name
    with pytest.raises(ValueError, match="tensor-core"):
        choice("linear", 0, 3, 64, 520, "float16", False, "gemv_mma")
    with pytest.raises(ValueError, match="too large to stage"):
        choice("linear", 0, 16, 64, 4096, "float16", True, "gemv_staged")
    with pytest.raises(ValueError, match="1 to 16 rows"):
        choice("linear", 0, 17, 64, 512, "float16", True)
    with pytest.raises(ValueError, match="must be one of"):
        choice("linear", 0, 3, 64, 512, "float16", True, "sm90")


def test_linear_outliers(sm90):
    """Never staged (the GEMV reads the codes row_quant made); above 16 rows the Hopper GEMM's
    OUTL epilogue, or None (the synchronizing form) elsewhere."""
    choice = _choice.kernel_choice
    assert choice("linear_outliers", 0, 1, 64, 512, "float16", True) == "gemv_dp4a"
    assert choice("linear_outliers", 0, 4, 64, 512, "float16", True) == "gemv_mma"
    assert choice("linear_outliers", 0, 17, 64, 512, "float16", True) == ("sm90" if sm90 else None)
    with pytest.raises(ValueError, match="must be one of"):
        choice("linear_outliers", 0, 1, 64, 512, "float16", True, "gemv_staged")
    with pytest.raises(ValueError, match="must be one of"):
        choice("linear_outliers", 0, 17, 64, 512, "float16", True, "mma_sync")
    if sm90:
        assert choice("linear_outliers", 0, 300, 64, 512, "float16", True, "sm90_bn128") == "sm90_bn128"


def test_unknown_op():
    with pytest.raises(ValueError, match="op must be"):
        _choice.kernel_choice("conv", 0, 1, 1, 16, "float16", True)
