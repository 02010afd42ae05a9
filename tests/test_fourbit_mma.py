"""The tensor-core 4-bit matmul (qkernels/fourbit/fourbit_mma.cu, matmul_4bit_mma) for 1-64
rows of float16 / bfloat16 x, and the kernel choice (qkernels.fourbit._cupy.choose_kernel).

Every product is held to the float64-referenced bound of the other 4-bit matmul tests: the
error against x @ W^T in float64 (W the float32 dequantized weight) is at most twice that of
torch's own linear(x, W.to(x.dtype)) plus half an output ulp (tests/test_fourbit.py
_linear_errors). The kernel's index work is also checked on the CPU by
tests/test_fourbit_mma_emulated.py."""
from __future__ import annotations

import numpy as np
import pytest

import qkernels.fourbit as qf
from qkernels.fourbit import _cupy
from tests.test_fourbit import _linear_errors

CONFIGS = [  # (blocksize, quant_type, nested)
    (64, "nf4", False), (64, "fp4", True), (4096, "nf4", True), (4096, "fp4", False), (32, "nf4", False),
    (256, "fp4", True),
]


# --- the choice and the split-K plan (CPU) ------------------------------------------------

@pytest.mark.parametrize("row_blocks", [1, 2, 7, 32, 64, 112, 500])
@pytest.mark.parametrize("chunks", [1, 2, 3, 16, 31, 32, 57])
@pytest.mark.parametrize("slots", [132, 264])
def test_split_plan_covers_k_once(row_blocks, chunks, slots):
    """Every split gets at least one chunk, together exactly the chunks of K, and a second
    wave is never taken when one would do the same chunks per CTA."""
    cps, splits = _cupy.mma_splits(row_blocks, chunks, slots)
    assert 1 <= splits <= chunks and cps >= 1
    assert (splits - 1) * cps < chunks <= splits * cps  # the last split is not empty
    if row_blocks * chunks <= slots:  # one chunk per CTA fits in one wave: at most 2 chunks each
        assert cps <= 2


def test_launch_shape_rows_and_workspace(monkeypatch):
    monkeypatch.setattr(_cupy, "multiprocessor_count", lambda device: 132)
    _cupy.mma_launch_shape.cache_clear()
    try:
        for M, nt in [(1, 1), (8, 1), (9, 2), (16, 2), (17, 4), (32, 4), (33, 8), (64, 8)]:
            shape = _cupy.mma_launch_shape(M, 8192, 8192, 0)
            rows_per_cta = 128 if nt <= 2 else 256
            assert shape.nt == nt and shape.grid[0] == 8192 // rows_per_cta
            splits = shape.grid[1]
            assert (splits - 1) * shape.cps < 32 <= splits * shape.cps
            if splits > 1:
                assert shape.counter_bytes >= 4 * shape.grid[0] and shape.counter_bytes % 256 == 0
                assert shape.ws_bytes == shape.counter_bytes + 4 * shape.grid[0] * splits * M * rows_per_cta
            else:
                assert shape.ws_bytes == 0
        # 16 rows of an 8192 x 8192 weight: 64 row blocks x 4 splits = 256 CTAs, one wave of 2 per SM
        assert _cupy.mma_launch_shape(16, 8192, 8192, 0).grid == (64, 4)
        assert _cupy.mma_launch_shape(64, 8192, 8192, 0).grid == (32, 4)
    finally:
        _cupy.mma_launch_shape.cache_clear()


def test_choose_kernel(monkeypatch):
    """The choice by rows, dtype, K and alignment; a forced kernel that cannot take the call
    is a ValueError before any launch."""
    monkeypatch.setattr(_cupy, "_compute_capability", lambda device: 90)
    ch = lambda rows, dtype="bfloat16", K=4096, x=0, p=0, kernel=None, N=4096: _cupy.choose_kernel(  # noqa: E731
        rows, N, K, 0, dtype, x, p, kernel)
    assert ch(1) == "gemv" and ch(1, "float32") == "gemv"
    # 16-bit x: the CUDA-core kernel for 2-7 rows of a weight under 2^25 elements, the
    # tensor-core kernel from 8 rows, and from 2 rows on larger weights
    assert all(ch(m) == "fused" and ch(m, "float16") == "fused" for m in range(2, 8))
    assert all(ch(m, N=8192, K=8192) == "mma" and ch(m, "float16", N=14336) == "mma" for m in range(2, 9))
    assert ch(1, N=8192, K=8192) == "gemv"
    assert all(ch(m, "float32", N=8192, K=8192) == "fused" for m in range(2, 9))
    assert ch(4, N=8192, K=4096) == "mma" and ch(4, N=8160, K=4096) == "fused"  # MMA_FROM_ELEMENTS = 2^25
    assert ch(4, N=8192, K=8192, x=2) == "mma"  # misaligned x: staged by the tensor-core kernel
    assert all(ch(m) == "mma" and ch(m, "float16") == "mma" for m in range(8, 65))
    assert all(ch(m, "float32") == "dequantize" for m in range(9, 65))
    assert ch(65) == "dequantize" and ch(4096) == "dequantize"
    assert ch(8, "float32") == "fused" and ch(9, "float32") == "dequantize"  # FUSED_MAX_ROWS = 8
    assert ch(4, K=4096 + 16) == "dequantize"  # K % 32
    assert ch(4, x=2) == "dequantize" and ch(1, x=2) == "dequantize"  # misaligned x
    assert ch(16, x=2) == "mma"   # the tensor-core kernel stages misaligned x
    assert ch(16, K=4096 + 16) == "dequantize"
    assert ch(4, p=8) == "dequantize"           # misaligned packed weight
    assert ch(1, kernel="mma") == "mma" and ch(4, "float32", kernel="fused") == "fused"
    for bad in [dict(rows=65, kernel="mma"), dict(rows=16, dtype="float32", kernel="mma"),
                dict(rows=2, kernel="gemv"), dict(rows=17, kernel="fused"), dict(rows=4, K=48, kernel="mma"),
                dict(rows=4, kernel="tensor")]:
        with pytest.raises(ValueError):
            ch(**bad)
    monkeypatch.setattr(_cupy, "_compute_capability", lambda device: 75)
    with pytest.raises(ValueError, match="compute capability"):
        ch(16, kernel="mma")
    assert ch(16) == "dequantize" and ch(4, N=8192, K=8192) == "fused" and ch(8) == "fused"


# --- the kernel on the GPU ------------------------------------------------------------------

def _weight(N, K, tdt, blocksize, quant_type, nested, seed):
    import torch
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32)).cuda().to(tdt)
    packed, state = qf.quantize_4bit(w, blocksize, quant_type, nested)
    return packed, state, qf.dequantize_4bit(packed, state, out_dtype="float32")


def _mma(x, packed, state, N, bias=None, kernel="mma"):
    """matmul_4bit_torch with the state's tensors (nested statistics in the kernel)."""
    return _cupy.matmul_4bit_torch(x, packed, state.absmax.contiguous(), state.code.contiguous(),
                                   blocksize=int(state.blocksize), out_features=N, bias=bias,
                                   nested=qf._nested_args(state, x.device), kernel=kernel)


def _check(x, w32, bias, got, what):
    ours, plain, half_ulp = _linear_errors(x, w32, bias, got)
    assert ours <= 2 * plain + half_ulp, (what, ours, plain, half_ulp)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_mma_every_row_count(dtype):
    """Rows 1-64 through the tensor-core kernel (forced) and through the public choice, on a
    weight whose K is no multiple of the 256-column chunk or of the blocksize (blocks span
    rows) and whose N is no multiple of a CTA's rows; bias on odd row counts."""
    import torch
    tdt = getattr(torch, dtype)
    N, K = 520, 1056
    packed, state, w32 = _weight(N, K, tdt, 64, "nf4", True, seed=1)
    for rows in range(1, 65):
        x = torch.randn(rows, K, device="cuda", dtype=tdt)
        bias = torch.randn(N, device="cuda", dtype=tdt) if rows % 2 else None
        got = _mma(x, packed, state, N, bias)
        assert got.shape == (rows, N) and got.dtype == tdt
        _check(x, w32, bias, got, ("mma", rows))
        auto = qf.matmul_4bit(x, packed, state, bias)
        _check(x, w32, bias, auto, ("auto", rows))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(4096, 4096), (96, 96), (4096 + 8, 320), (64, 64 + 32), (300, 8192 + 32)])
def test_gpu_mma_configs(dtype, shape):
    """NF4 and FP4, plain and nested absmax, blocksizes 32 to 4096, K below one chunk and
    not a multiple of it, split-K (long K, few rows of W), 2 to 64 rows, bias; the CUDA-core
    matmul_4bit on the same calls up to 16 rows."""
    import torch
    tdt = getattr(torch, dtype)
    N, K = shape
    for i, (blocksize, quant_type, nested) in enumerate(CONFIGS):
        packed, state, w32 = _weight(N, K, tdt, blocksize, quant_type, nested, seed=N + K + i)
        for rows in (2, 7, 16, 23, 40, 64):
            x = torch.randn(rows, K, device="cuda", dtype=tdt)
            bias = torch.randn(N, device="cuda", dtype=tdt) if (rows + i) % 2 else None
            _check(x, w32, bias, _mma(x, packed, state, N, bias), (blocksize, quant_type, nested, rows))
            if rows <= 16:  # the CUDA-core kernel, now chosen for float32 x only
                _check(x, w32, bias, _mma(x, packed, state, N, bias, kernel="fused"), ("fused", rows))


@pytest.mark.gpu
def test_gpu_mma_large_weight_16_rows():
    """The benchmark's shape: 16 rows of an NF4 8192 x 8192 weight (split-K on every SM)."""
    import torch
    packed, state, w32 = _weight(8192, 8192, torch.bfloat16, 64, "nf4", True, seed=3)
    for rows in (16, 64):
        x = torch.randn(rows, 8192, device="cuda", dtype=torch.bfloat16)
        _check(x, w32, None, _mma(x, packed, state, 8192), rows)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_mma_misaligned_and_strided_x(dtype):
    """x at an address 2 bytes off 16-byte alignment (element staging) gives the aligned
    call's bits; a transposed view is copied, never read as contiguous."""
    import torch
    tdt = getattr(torch, dtype)
    N, K = 384, 2048
    packed, state, w32 = _weight(N, K, tdt, 64, "fp4", False, seed=4)
    for rows in (3, 16, 37, 64):
        x = torch.randn(rows, K, device="cuda", dtype=tdt)
        buf = torch.empty(rows * K + 8, device="cuda", dtype=tdt)
        for off in (1, 3, 4):
            xm = buf[off:off + rows * K].view(rows, K)
            xm.copy_(x)
            assert xm.data_ptr() % 16 != 0
            assert torch.equal(_mma(xm, packed, state, N), _mma(x, packed, state, N))
            if rows >= 8:  # the default route of 8-64 rows of a small weight (choose_kernel)
                assert torch.equal(qf.matmul_4bit(xm, packed, state), _mma(x, packed, state, N))
            else:
                _check(xm, w32, None, qf.matmul_4bit(xm, packed, state), ("misaligned", rows))
        xt = torch.randn(K, rows, device="cuda", dtype=tdt).t()
        _check(xt, w32, None, qf.matmul_4bit(xt, packed, state), ("strided", rows))


@pytest.mark.gpu
def test_gpu_split_k_is_deterministic():
    """Few rows of W and a long K: many splits, summed in split order by the last CTA, so
    two calls give the same bits."""
    import torch
    N, K = 256, 16384
    packed, state, w32 = _weight(N, K, torch.bfloat16, 128, "nf4", True, seed=5)
    assert _cupy.mma_launch_shape(8, N, K, 0).grid[1] > 1
    for rows in (5, 16, 64):
        x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
        a, b = _mma(x, packed, state, N), _mma(x, packed, state, N)
        assert torch.equal(a, b)
        _check(x, w32, None, a, rows)


@pytest.mark.gpu
def test_gpu_float32_x_and_forced_kernels():
    """float32 x keeps float32 FMA (matmul_4bit up to FUSED_MAX_ROWS rows, then dequantize +
    cuBLAS); the tensor-core kernel refuses it, and a forced kernel that cannot take a call
    raises before any launch."""
    import torch
    N, K = 512, 1024
    packed, state, w32 = _weight(N, K, torch.float32, 64, "nf4", False, seed=6)
    for rows in (2, 8, 9, 40):
        x = torch.randn(rows, K, device="cuda")
        _check(x, w32, None, qf.matmul_4bit(x, packed, state), rows)
        with pytest.raises(ValueError, match="float16 or bfloat16"):
            _mma(x, packed, state, N)
    xb = torch.randn(65, K, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 64 rows"):
        _mma(xb, packed, state, N)
    with pytest.raises(ValueError):
        _mma(xb[:4], packed, state, N, kernel="dequantize")


@pytest.mark.gpu
def test_gpu_bad_input():
    """0 rows: an empty result and no launch; x whose last dimension is not the weight's:
    ValueError, in the public call and in a prepared plan; K % 32 != 0: dequantize + cuBLAS."""
    import torch
    from qkernels.fourbit.ops import prepare_matmul_4bit
    N, K = 256, 512
    packed, state, w32 = _weight(N, K, torch.bfloat16, 64, "nf4", True, seed=7)
    plan = prepare_matmul_4bit(packed, state)
    x0 = torch.randn(0, K, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    for y in (qf.matmul_4bit(x0, packed, state), plan(x0), _mma(x0, packed, state, N)):
        assert y.shape == (0, N)
    for bad in (torch.randn(4, K - 32, device="cuda", dtype=torch.bfloat16),
                torch.randn(2, 2 * K, device="cuda", dtype=torch.bfloat16)):
        with pytest.raises(ValueError):
            qf.matmul_4bit(bad, packed, state)
        with pytest.raises(ValueError):
            plan(bad)
    with pytest.raises(ValueError):
        plan(torch.randn(4, K, device="cuda", dtype=torch.bfloat16), kernel="gemv")
    p2, s2, w2 = _weight(96, 200, torch.bfloat16, 64, "fp4", False, seed=8)  # K % 32 == 8
    x = torch.randn(16, 200, device="cuda", dtype=torch.bfloat16)
    _check(x, w2, None, qf.matmul_4bit(x, p2, s2), "K % 32")
    with pytest.raises(ValueError, match="% 32"):
        _mma(x, p2, s2, 96)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_gpu_plan_routes_and_graph_capture(dtype):
    """The op layer's plan caches its route per row count (nothing above 64 rows), takes the
    tensor-core kernel for 8-64 rows (this weight is small) and when forced, and that launch (workspace, counter memset, kernel) is
    captured by a CUDA graph and replayed on new x."""
    import torch
    from qkernels.fourbit.ops import prepare_matmul_4bit
    tdt = getattr(torch, dtype)
    N, K = 1024, 4096
    packed, state, w32 = _weight(N, K, tdt, 64, "nf4", True, seed=9)
    plan = prepare_matmul_4bit(packed, state)
    bias = torch.randn(N, device="cuda", dtype=tdt)
    for rows in (1, 2, 16, 64, 65):
        x = torch.randn(rows, K, device="cuda", dtype=tdt)
        y = plan(x, bias)
        _check(x, w32, bias, y, ("plan", rows))
        want = "gemv" if rows == 1 else "fused" if rows < 8 else "mma" if rows <= 64 else "dequantize"
        assert plan._cuda.route(x.dtype, rows) == want
        if 1 < rows <= 64:
            _check(x, w32, bias, plan(x, bias, kernel="mma"), ("plan, forced mma", rows))
    assert (tdt, 65) not in plan._cuda._routes
    for rows in (16, 48):
        assert _cupy.mma_launch_shape(rows, N, K, 0).grid[1] > 1  # the capture includes the memset
        x = torch.randn(rows, K, device="cuda", dtype=tdt)
        plan(x, bias)
        _mma(x, packed, state, N, bias)  # compile and allocate outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            with torch.cuda.graph(g, stream=side):
                yg = plan(x, bias)
                yk = _mma(x, packed, state, N, bias)
        torch.cuda.current_stream().wait_stream(side)
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            g.replay()
            torch.cuda.synchronize()
            want = plan(x, bias)
            assert torch.equal(yg, want) and torch.equal(yk, want)
            _check(x, w32, bias, yg, ("graph", rows))
