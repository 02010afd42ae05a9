"""INT8 family (docs/FORMATS.md §5, §6, §12): the reference against a scalar-by-scalar
definition, the public API on host data, bad input, bitsandbytes where importable, and (GPU)
every backend and the fused-epilogue GEMM against the reference, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qkernels
import qkernels.int8 as Q
from reference import int8 as ref
from reference.dtypes import bf16_bits_to_float32
from tests.conftest import gpu_backends
from tests.strategies import as_numpy, as_torch, float_arrays, round_to

DTYPES = ("float16", "bfloat16", "float32")
dims = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 3, 7, 17, 31, 61, 127, 129]))
shapes2d = st.tuples(dims, dims).filter(lambda s: s[0] * s[1] <= 1500)
shapes2d_gpu = st.tuples(dims, dims).filter(lambda s: s[0] * s[1] <= 6000)


def f32_of(a) -> np.ndarray:
    """float32 values of a NumPy float16 / float32 / ml_dtypes.bfloat16 array."""
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return bf16_bits_to_float32(a.view(np.uint16))
    return a.astype(np.float32)


# --- the definition, one scalar at a time ------------------------------------------------

def scalar_code(x: np.float32, m: np.float32) -> int:
    """docs/FORMATS.md §5.1's quantizer for one element: clip(rint(f32(x) * f32(127 / m))), NaN -> 0."""
    with np.errstate(all="ignore"):
        scale = np.float32(127) / np.float32(m)
        y = np.float32(np.float32(x) * scale)
    if np.isnan(y):
        return 0
    return int(np.clip(np.rint(y), -127, 127))


def definition_rows(x32: np.ndarray, threshold: float = 0.0):
    """Row-wise codes, stats and outlier columns, element by element (small arrays only)."""
    rows, cols = x32.shape
    t = np.float32(threshold)
    outlier = (np.abs(x32) >= t) if threshold > 0 else np.zeros(x32.shape, bool)
    stats = np.zeros(rows, np.float32)
    q = np.zeros((rows, cols), np.int8)
    for i in range(rows):
        m = np.float32(0)
        for j in range(cols):
            if not outlier[i, j]:
                a = np.float32(abs(x32[i, j]))
                m = a if (np.isnan(a) or a > m) and not np.isnan(m) else m
        stats[i] = m
        for j in range(cols):
            q[i, j] = 0 if outlier[i, j] else scalar_code(x32[i, j], m)
    cols_out = np.flatnonzero(outlier.any(axis=0)) if threshold > 0 else None
    if cols_out is not None:
        q[:, cols_out] = 0
    return q, stats, cols_out


# --- reference against the definition -----------------------------------------------------

@given(st.data(), shapes2d, st.sampled_from([0.0, 0.0, 1.5, 6.0]))
def test_vectorwise_and_rowwise_match_definition(data, shape, threshold):
    x32, dtype = data.draw(float_arrays(shape=shape, specials=True))
    q, stats, cols = ref.int8_vectorwise_quant(as_numpy(x32, dtype), threshold)
    wq, wstats, wcols = definition_rows(x32, threshold)
    np.testing.assert_array_equal(q, wq)
    np.testing.assert_array_equal(stats, wstats)
    assert stats.dtype == np.float32 and q.dtype == np.int8
    if threshold == 0:
        assert cols is None
        qr, state = ref.quantize_rowwise(as_numpy(x32, dtype))
        np.testing.assert_array_equal(qr, wq)
        assert state.dtype == as_numpy(x32, dtype).dtype
        np.testing.assert_array_equal(f32_of(state), wstats)
    else:
        assert cols.dtype == np.int64
        np.testing.assert_array_equal(cols, wcols)


@given(st.data(), shapes2d)
def test_global_and_columnwise_match_definition(data, shape):
    x32, dtype = data.draw(float_arrays(shape=shape, specials=True))
    x = as_numpy(x32, dtype)
    q, state = ref.quantize_global(x)
    m = np.float32(np.max(np.abs(x32)))
    want = np.array([[scalar_code(v, m) for v in row] for row in x32], np.int8)
    np.testing.assert_array_equal(q, want)
    np.testing.assert_array_equal(f32_of(state), [m])
    qt, state_t = ref.quantize_global_transpose(x)
    assert qt.shape == shape[::-1] and qt.flags.c_contiguous
    np.testing.assert_array_equal(qt, want.T)
    np.testing.assert_array_equal(f32_of(state_t), [m])
    qc, state_c = ref.quantize_columnwise_and_transpose(x)
    wq, wstats, _ = definition_rows(np.ascontiguousarray(x32.T))
    np.testing.assert_array_equal(qc, wq)
    np.testing.assert_array_equal(f32_of(state_c), wstats)
    assert state_c.dtype == x.dtype


@given(st.data(), shapes2d, st.sampled_from([0.0, 2.0]))
def test_double_quant_matches_definition(data, shape, threshold):
    x32, dtype = data.draw(float_arrays(shape=shape, specials=True))
    CA, CAt, rs, cs, cols = ref.int8_double_quant(as_numpy(x32, dtype), threshold)
    wq, wrs, wcols = definition_rows(x32, threshold)
    np.testing.assert_array_equal(CA, wq)
    np.testing.assert_array_equal(rs, wrs)
    # column part: per-column statistics without the outliers, only the outlier elements
    # zeroed (a zeroed element's code is 0), NOT transposed
    masked = np.where(np.abs(x32) >= np.float32(threshold), np.float32(0), x32) if threshold > 0 else x32
    wqt, wcs, _ = definition_rows(np.ascontiguousarray(masked.T))
    np.testing.assert_array_equal(cs, wcs)
    if threshold > 0:
        np.testing.assert_array_equal(cols, wcols)
    else:
        assert cols is None
    assert CAt.shape == x32.shape
    np.testing.assert_array_equal(CAt, wqt.T)


def test_dequantize_and_constants():
    assert ref.K_DEQUANT.view(np.uint32) == 0x38820610
    assert np.float32(6.200012e-05) == ref.K_DEQUANT
    q = np.array([[-127, 0, 5, 127], [1, 2, 3, 4]], np.int8)
    st32 = np.array([2.5, 0.0], np.float32)
    out = ref.int8_vectorwise_dequant(q, st32)
    want = (q.astype(np.float32) * st32[:, None]).astype(np.float32) * np.float32(1 / 127)
    np.testing.assert_array_equal(out, want.astype(np.float32))
    assert out.dtype == np.float32 and (out[1] == 0).all()
    for dtype in DTYPES:
        s = as_numpy(np.array([2.5, 0.0], np.float32), dtype)
        d = ref.dequantize_rowwise(q, s)
        assert d.dtype == s.dtype
        np.testing.assert_array_equal(f32_of(d), round_to(want.astype(np.float32), dtype))


def test_special_values_stay_in_their_row():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 33)).astype(np.float32)
    x[1] = 0.0                 # zero row: codes 0, stats 0, dequantizes to zeros
    x[2, 4] = np.nan           # NaN row: stats NaN, codes 0, dequantizes to NaN
    x[3, 7] = np.inf           # Inf row: stats Inf, codes 0, dequantizes to NaN
    x[4, 0] = 1e-42            # tiny float32 absmax: 127/m overflows, codes +-127
    x[4, 1:] = 0
    q, stats, _ = ref.int8_vectorwise_quant(x)
    assert (q[1:4] == 0).all() and stats[1] == 0 and np.isnan(stats[2]) and stats[3] == np.inf
    assert q[4, 0] == 127 and (q[4, 1:] == 0).all()
    d = ref.int8_vectorwise_dequant(q, stats)
    assert (d[1] == 0).all() and np.isnan(d[2:4]).all()
    clean = x.copy()
    clean[1:5] = 1.0
    qc, sc, _ = ref.int8_vectorwise_quant(clean)
    np.testing.assert_array_equal(q[[0, 5]], qc[[0, 5]])
    np.testing.assert_array_equal(stats[[0, 5]], sc[[0, 5]])
    # with a threshold the infinity is an outlier: its column is reported and zeroed
    q6, s6, cols = ref.int8_vectorwise_quant(x, 6.0)
    assert 7 in cols and (q6[:, 7] == 0).all() and np.isfinite(s6[3])
    # global: one NaN poisons the one tensor-wide state, as documented
    qg, sg = ref.quantize_global(x)
    assert np.isnan(sg[0]) and (qg == 0).all()


def test_exact_int32_matmul():
    rng = np.random.default_rng(6)
    for M, N, K in [(1, 1, 1), (3, 5, 7), (17, 9, 1023), (4, 3, 1025), (5, 7, 3000)]:
        a = rng.integers(-128, 128, (M, K)).astype(np.int8)
        b = rng.integers(-128, 128, (N, K)).astype(np.int8)
        want = a.astype(np.int64) @ b.astype(np.int64).T
        np.testing.assert_array_equal(ref.int8_linear_matmul(a, b), want.astype(np.int32))
    # extremes: every product 16384; sums past 2^24 are still exact
    K = 5000
    a = np.full((2, K), -128, np.int8)
    b = np.full((3, K), -128, np.int8)
    b[1] = 127
    out = ref.int8_linear_matmul(a, b)
    assert (out[:, 0] == 16384 * K).all() and (out[:, 1] == -128 * 127 * K).all()
    # leading dims of A
    A = rng.integers(-128, 128, (2, 3, 16)).astype(np.int8)
    B = rng.integers(-128, 128, (4, 16)).astype(np.int8)
    assert ref.int8_linear_matmul(A, B).shape == (2, 3, 4)


def test_switchback_matmul_definition():
    rng = np.random.default_rng(7)
    M, N, K = 9, 13, 70
    a = rng.integers(-127, 128, (M, K)).astype(np.int8)
    W = rng.integers(-127, 128, (N, K)).astype(np.int8)
    for dtype in DTYPES:
        sa = as_numpy(rng.uniform(0, 4, M).astype(np.float32), dtype)
        sb = as_numpy(rng.uniform(0, 4, N).astype(np.float32), dtype)
        bias = as_numpy(rng.standard_normal(N).astype(np.float32), dtype)
        C = (a.astype(np.int64) @ W.astype(np.int64).T).astype(np.float32)
        want = C * f32_of(sa)[:, None]
        want = want * f32_of(sb)[None, :]
        want = want * ref.K_DEQUANT + f32_of(bias)[None, :]
        out = ref.int8_matmul_rowwise_dequantize(a, W.T, sa, sb, bias)
        assert out.dtype == sa.dtype and out.shape == (M, N)
        np.testing.assert_array_equal(f32_of(out), round_to(want.astype(np.float32), dtype))
        g = as_numpy(np.array([1.75], np.float32), dtype)
        out = ref.int8_matmul_mixed_dequantize(a, W.T, sa, g, None)
        want = (C * f32_of(sa)[:, None]) * np.float32(1.75) * ref.K_DEQUANT
        np.testing.assert_array_equal(f32_of(out), round_to(want.astype(np.float32), dtype))


# --- the public API on host data ------------------------------------------------------------

QUANTIZERS = ("quantize_rowwise", "quantize_global", "quantize_global_transpose",
              "quantize_columnwise_and_transpose")


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_numpy_and_torch_cpu(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x32 = round_to((rng.standard_normal((19, 45)) * 4).astype(np.float32), dtype)
    x32[3] = 0
    x = as_numpy(x32, dtype)
    t = as_torch(x32, dtype)
    for name in QUANTIZERS:
        want = getattr(ref, name)(x)
        got = getattr(Q, name)(x)
        got_t = getattr(Q, name)(t)
        for w, g, gt in zip(want, got, got_t):
            np.testing.assert_array_equal(f32_of(g), f32_of(w))
            assert isinstance(gt, torch.Tensor) and str(gt.dtype) == f"torch.{w.dtype.name}"
            np.testing.assert_array_equal(gt.float().numpy(), f32_of(w))
    q, s = Q.quantize_rowwise(t)
    d = Q.dequantize_rowwise(q, s)
    assert d.dtype == t.dtype
    want = ref.dequantize_rowwise(q.numpy(), as_numpy(s.float().numpy(), dtype))
    np.testing.assert_array_equal(d.float().numpy(), f32_of(want))
    for threshold in (0.0, 5.0):
        got = Q.int8_vectorwise_quant(t, threshold)
        want = ref.int8_vectorwise_quant(x, threshold)
        for w, g in zip(want, got):
            if w is None:
                assert g is None
            else:
                np.testing.assert_array_equal(g.numpy(), w)
        got = Q.int8_double_quant(x, threshold)
        want = ref.int8_double_quant(x, threshold)
        for w, g in zip(want, got):
            assert (g is None) if w is None else np.array_equal(g, w)
    # non-contiguous input is quantized as its contiguous copy
    np.testing.assert_array_equal(Q.quantize_rowwise(x.T)[0], ref.quantize_rowwise(np.ascontiguousarray(x.T))[0])


def test_public_matmuls_host():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    M, N, K = 21, 11, 77
    a = rng.integers(-127, 128, (M, K)).astype(np.int8)
    W = rng.integers(-127, 128, (N, K)).astype(np.int8)
    sa = rng.uniform(0, 3, M).astype(np.float16)
    sb = rng.uniform(0, 3, N).astype(np.float16)
    bias = rng.standard_normal(N).astype(np.float32)
    want = ref.int8_matmul_rowwise_dequantize(a, W.T, sa, sb, bias)
    np.testing.assert_array_equal(Q.int8_matmul_rowwise_dequantize(a, W.T, sa, sb, bias), want)
    got = Q.int8_matmul_rowwise_dequantize(torch.from_numpy(a), torch.from_numpy(W).t(),
                                           torch.from_numpy(sa), torch.from_numpy(sb),
                                           torch.from_numpy(bias))
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.numpy(), want)
    g = np.array([0.5], np.float16)
    np.testing.assert_array_equal(Q.int8_matmul_mixed_dequantize(a, W.T, sa, g),
                                  ref.int8_matmul_mixed_dequantize(a, W.T, sa, g))
    C = Q.int8_linear_matmul(a, W)
    np.testing.assert_array_equal(C, ref.int8_linear_matmul(a, W))
    rs, cs = rng.uniform(0, 3, M).astype(np.float32), rng.uniform(0, 3, N).astype(np.float32)
    for out_dtype in DTYPES:
        got = Q.int8_mm_dequant(C, rs, cs, bias, out_dtype=out_dtype)
        np.testing.assert_array_equal(f32_of(got), f32_of(ref.int8_mm_dequant(C, rs, cs, bias, out_dtype)))
    assert Q.int8_mm_dequant(C, rs, cs).dtype == np.float16
    np.testing.assert_array_equal(Q.int8_vectorwise_dequant(a, rs), ref.int8_vectorwise_dequant(a, rs))


def test_empty_inputs():
    x = np.zeros((0, 5), np.float16)
    q, s = Q.quantize_rowwise(x)
    assert q.shape == (0, 5) and s.shape == (0,)
    q, s = Q.quantize_global(x)
    assert q.shape == (0, 5) and s.shape == (1,) and s[0] == 0
    q, s = Q.quantize_columnwise_and_transpose(x)
    assert q.shape == (5, 0) and s.shape == (5,) and (s == 0).all()
    q, s, cols = Q.int8_vectorwise_quant(x, 6.0)
    assert q.shape == (0, 5) and cols.shape == (0,)
    a = np.zeros((3, 0), np.int8)
    assert (Q.int8_linear_matmul(a, np.zeros((4, 0), np.int8)) == 0).all()


def test_bad_input_is_rejected_before_work():
    x = np.ones((4, 8), np.float16)
    i8 = np.ones((4, 8), np.int8)
    with pytest.raises(ValueError, match="x must be 2-D"):
        Q.quantize_rowwise(np.ones(8, np.float16))
    with pytest.raises(ValueError, match="w must be 2-D"):
        Q.quantize_global_transpose(np.ones((2, 2, 2), np.float32))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32; got dtype float64"):
        Q.quantize_global(x.astype(np.float64))
    with pytest.raises(TypeError, match="int8"):
        Q.quantize_columnwise_and_transpose(i8)
    with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
        Q.int8_vectorwise_quant(x, -1.0)
    with pytest.raises(ValueError, match="threshold"):
        Q.int8_double_quant(x, float("nan"))
    with pytest.raises(TypeError, match="threshold must be a number"):
        Q.int8_vectorwise_quant(x, "6")
    with pytest.raises(ValueError, match="inner dimensions differ"):
        Q.int8_matmul_rowwise_dequantize(i8, np.ones((9, 4), np.int8), np.ones(4, np.float16),
                                         np.ones(4, np.float16))
    with pytest.raises(ValueError, match="inner dimensions differ"):
        Q.int8_linear_matmul(i8, np.ones((3, 9), np.int8))
    with pytest.raises(TypeError, match="b must be int8; got dtype uint8"):
        Q.int8_matmul_mixed_dequantize(i8, np.ones((8, 3), np.uint8), np.ones(4, np.float16),
                                       np.ones(1, np.float16))
    with pytest.raises(TypeError, match="A must be int8; got dtype float16"):
        Q.int8_linear_matmul(x, i8)
    with pytest.raises(ValueError, match="state_b must hold 3 value"):
        Q.int8_matmul_rowwise_dequantize(i8, np.ones((8, 3), np.int8), np.ones(4, np.float16),
                                         np.ones(2, np.float16))
    with pytest.raises(ValueError, match="state_b must hold 1 value"):
        Q.int8_matmul_mixed_dequantize(i8, np.ones((8, 3), np.int8), np.ones(4, np.float16),
                                       np.ones(3, np.float16))
    with pytest.raises(ValueError, match="state_a must hold 4"):
        Q.int8_matmul_rowwise_dequantize(i8, np.ones((8, 3), np.int8), np.ones(5, np.float16),
                                         np.ones(3, np.float16))
    with pytest.raises(ValueError, match="bias must hold 3"):
        Q.int8_matmul_rowwise_dequantize(i8, np.ones((8, 3), np.int8), np.ones(4, np.float16),
                                         np.ones(3, np.float16), np.ones(4, np.float16))
    with pytest.raises(TypeError, match="state_a must be float16 or bfloat16 or float32; got dtype int32"):
        Q.int8_matmul_rowwise_dequantize(i8, np.ones((8, 3), np.int8), np.ones(4, np.int32),
                                         np.ones(3, np.float16))
    with pytest.raises(TypeError, match="A must be int32; got dtype int8"):
        Q.int8_mm_dequant(i8, np.ones(4, np.float32), np.ones(8, np.float32))
    with pytest.raises(TypeError, match="row_stats must be float32; got dtype float16"):
        Q.int8_mm_dequant(i8.astype(np.int32), np.ones(4, np.float16), np.ones(8, np.float32))
    with pytest.raises(ValueError, match="col_stats must hold 8"):
        Q.int8_mm_dequant(i8.astype(np.int32), np.ones(4, np.float32), np.ones(7, np.float32))
    with pytest.raises(TypeError, match="out_dtype must be float16, bfloat16 or float32"):
        Q.int8_mm_dequant(i8.astype(np.int32), np.ones(4, np.float32), np.ones(8, np.float32),
                          out_dtype="int8")
    with pytest.raises(ValueError, match="stats must hold 4"):
        Q.int8_vectorwise_dequant(i8, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="state must hold 4"):
        Q.dequantize_rowwise(i8, np.ones(3, np.float16))
    with pytest.raises(TypeError, match="x must be int8"):
        Q.dequantize_rowwise(x, np.ones(4, np.float16))
    with pytest.raises(TypeError, match="expected a NumPy"):
        Q.quantize_rowwise([[1.0]])


@pytest.mark.gpu
def test_wrong_device_is_rejected():
    import torch
    a = torch.ones((4, 8), dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        Q.int8_matmul_rowwise_dequantize(a, a.t(), torch.ones(4, dtype=torch.float16),
                                         torch.ones(4, device="cuda", dtype=torch.float16))


# --- bitsandbytes (CPU) ------------------------------------------------------------------------

def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("threshold", [0.0, 4.0])
def test_vectorwise_quant_against_bitsandbytes(threshold):
    import torch
    F = _bnb()
    rng = np.random.default_rng(10)
    x32 = rng.standard_normal((1000, 517)).astype(np.float32)
    x32[:, [3, 100, 511]] *= 3.0   # a few columns with outliers
    A = torch.from_numpy(x32).half()
    A_before = A.clone()
    q, stats, cols = Q.int8_vectorwise_quant(A, threshold)
    qb, sb, cb = F.int8_vectorwise_quant(A.clone(), threshold)
    assert torch.equal(A, A_before)
    assert (q == qb).float().mean().item() >= 0.9999
    assert torch.equal(stats, sb)
    if threshold == 0:
        assert cols is None and cb is None
    else:
        assert torch.equal(cols, cb) and 0 < cols.numel() < 517
    # the same bytes dequantize identically
    assert torch.equal(Q.int8_vectorwise_dequant(qb, sb), F.int8_vectorwise_dequant(qb, sb))


def test_mm_dequant_and_linear_matmul_against_bitsandbytes():
    import torch
    F = _bnb()
    rng = np.random.default_rng(11)
    M, N, K = 300, 200, 256   # small K: bnb's float32 fallback is exact here
    a = torch.from_numpy(rng.integers(-127, 128, (M, K)).astype(np.int8))
    b = torch.from_numpy(rng.integers(-127, 128, (N, K)).astype(np.int8))
    C = Q.int8_linear_matmul(a, b)
    assert torch.equal(C, F.int8_linear_matmul(a, b))
    rs = torch.from_numpy(rng.uniform(0.1, 5, M).astype(np.float32))
    cs = torch.from_numpy(rng.uniform(0.1, 5, N).astype(np.float32))
    ours = Q.int8_mm_dequant(C, rs, cs).float().numpy()
    theirs = F.int8_mm_dequant(C, rs, cs).float().numpy()
    # bnb's CPU K is 6.200124e-05 (a typo, 1.8e-5 relative): at most one fp16 ulp apart
    ulp = np.spacing(np.maximum(np.abs(ours), np.abs(theirs)).astype(np.float16)).astype(np.float32)
    assert (np.abs(ours - theirs) <= ulp).all()
    assert (ours != theirs).mean() < 0.05
    # with a bias the typo's error is relative to the product, before the bias cancels it
    bias = torch.from_numpy(rng.standard_normal(N).astype(np.float16))
    ours = Q.int8_mm_dequant(C, rs, cs, bias).float().numpy()
    theirs = F.int8_mm_dequant(C, rs, cs, bias=bias).float().numpy()
    prod = np.abs(C.numpy().astype(np.float64) * rs.numpy()[:, None] * cs.numpy()[None, :] / 16129)
    ulp = np.spacing(np.maximum(np.abs(ours), np.abs(theirs)).astype(np.float16)).astype(np.float32)
    assert (np.abs(ours - theirs) <= ulp + 2e-5 * prod).all()


# --- GPU backends: bit-identical to the reference -----------------------------------------------

def _cuda(x32, dtype):
    return as_torch(x32, dtype, "cuda")


def _np(t):
    import torch
    return t.float().cpu().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu().numpy()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
@given(data=st.data(), shape=st.one_of(shapes2d_gpu, st.sampled_from([(1, 1), (3, 4096), (2, 8192),
                                                                  (5, 12288), (64, 64), (65, 129),
                                                                  (130, 70), (1, 16), (7, 24)])),
       threshold=st.sampled_from([0.0, 1.0, 6.0]))
def test_gpu_quantizers_match_reference(backend, data, shape, threshold):
    x32, dtype = data.draw(float_arrays(shape=shape, specials=True))
    x = as_numpy(x32, dtype)
    t = _cuda(x32, dtype)
    with qkernels.use_backend(backend):
        for name in QUANTIZERS:
            got = getattr(Q, name)(t)
            want = getattr(ref, name)(x)
            for g, w in zip(got, want):
                assert g.is_cuda
                np.testing.assert_array_equal(_np(g), f32_of(w) if w.dtype != np.int8 else w)
        got = Q.int8_vectorwise_quant(t, threshold)
        want = ref.int8_vectorwise_quant(x, threshold)
        for g, w in zip(got, want):
            assert (g is None) if w is None else np.array_equal(_np(g), w, equal_nan=w.dtype.kind == "f")
        got = Q.int8_double_quant(t, threshold)
        want = ref.int8_double_quant(x, threshold)
        for g, w in zip(got, want):
            assert (g is None) if w is None else np.array_equal(_np(g), w, equal_nan=w.dtype.kind == "f")
        q, s = Q.quantize_rowwise(t)
        np.testing.assert_array_equal(_np(Q.dequantize_rowwise(q, s)),
                                      f32_of(ref.dequantize_rowwise(q.cpu().numpy(), as_numpy(_np(s), dtype))))
        q, s, _ = Q.int8_vectorwise_quant(t)
        np.testing.assert_array_equal(_np(Q.int8_vectorwise_dequant(q, s)),
                                      ref.int8_vectorwise_dequant(q.cpu().numpy(), s.cpu().numpy()))


@pytest.mark.gpu
def test_gpu_quantizers_large_and_misaligned():
    """Rows longer than the register cache, the scalar paths (misaligned bases, odd widths)
    and the 16-byte paths, every GPU backend against one reference per case."""
    import torch
    rng = np.random.default_rng(12)
    for dtype in DTYPES:
        for rows, cols in [(4096, 1024), (257, 16384), (33, 20000), (1000, 1001)]:
            x32 = round_to((rng.standard_normal((rows, cols)) * 3).astype(np.float32), dtype)
            x = as_numpy(x32, dtype)
            wants = {name: getattr(ref, name)(x) for name in QUANTIZERS}
            wants["int8_vectorwise_quant"] = ref.int8_vectorwise_quant(x, 6.0)
            aligned = _cuda(x32, dtype)
            buf = torch.empty(rows * cols + 1, device="cuda", dtype=aligned.dtype)
            misaligned = buf[1:].view(rows, cols)               # 2 or 4 bytes off 16
            misaligned.copy_(aligned)
            for t in (aligned, misaligned):
                for backend in gpu_backends():
                    with qkernels.use_backend(backend):
                        for name in QUANTIZERS:
                            for g, w in zip(getattr(Q, name)(t), wants[name]):
                                np.testing.assert_array_equal(_np(g), f32_of(w) if w.dtype != np.int8 else w)
                        for g, w in zip(Q.int8_vectorwise_quant(t, 6.0), wants["int8_vectorwise_quant"]):
                            np.testing.assert_array_equal(_np(g), w)
            del aligned, buf, misaligned
            torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("rows,cols", [(20000, 256), (9000, 4096), (3000, 20000)])
def test_gpu_outlier_columns_many_rows_per_cta(rows, cols):
    """More rows than row_quant's one wave of CTAs (each CTA walks several rows and zeroes a
    column from its first outlier in it on; outlier_cols zeroes the rows before): a few
    systematic outlier columns, one that appears only in the last rows, and columns past the
    register cache (20000), against the reference; the torch and the array entry points."""
    import torch
    rng = np.random.default_rng(31)
    x32 = rng.standard_normal((rows, cols)).astype(np.float32)
    x32[:, [3, cols // 2, cols - 1]] *= 20.0
    x32[rows - 5:, 17] = 50.0
    x = x32.astype(np.float16)
    want = ref.int8_vectorwise_quant(x, 6.0)
    import cupy
    for arr in (torch.from_numpy(x).cuda(), cupy.asarray(x)):
        with qkernels.use_backend("cupy"):
            got = Q.int8_vectorwise_quant(arr, 6.0)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.get() if hasattr(g, "get") else _np(g), w)


GEMM_SHAPES = [(1, 1, 1), (1, 8, 16), (3, 5, 7), (16, 8, 32), (17, 9, 33), (128, 128, 64),
               (129, 130, 65), (127, 255, 100), (256, 128, 4096), (200, 136, 48), (64, 300, 15),
               (1000, 24, 8), (5, 1000, 2000), (300, 257, 1024), (1, 4096, 4096), (513, 511, 513)]


def _gemm_case(rng, M, N, K, extremes=False):
    if extremes:
        a = rng.choice(np.array([-128, 127], np.int8), (M, K))
        W = rng.choice(np.array([-128, 127], np.int8), (N, K))
    else:
        a = rng.integers(-128, 128, (M, K)).astype(np.int8)
        W = rng.integers(-128, 128, (N, K)).astype(np.int8)
    return a, W


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_gpu_int8_linear_matmul_exact(M, N, K):
    import torch
    rng = np.random.default_rng(M * 7 + N * 3 + K)
    a, W = _gemm_case(rng, M, N, K)
    got = Q.int8_linear_matmul(torch.from_numpy(a).cuda(), torch.from_numpy(W).cuda())
    assert got.dtype == torch.int32 and got.shape == (M, N)
    np.testing.assert_array_equal(got.cpu().numpy(), ref.int8_linear_matmul(a, W))
    # misaligned bases and a non-contiguous B (copied by the API)
    ab = torch.from_numpy(np.concatenate([[0], a.reshape(-1)]).astype(np.int8)).cuda()[1:].view(M, K)
    Wt = torch.from_numpy(np.ascontiguousarray(W.T)).cuda().t()
    got = Q.int8_linear_matmul(ab, Wt)
    np.testing.assert_array_equal(got.cpu().numpy(), ref.int8_linear_matmul(a, W))


@pytest.mark.gpu
def test_gpu_int8_linear_matmul_large_k_extremes():
    import torch
    rng = np.random.default_rng(13)
    for M, N, K in [(256, 256, 16384), (130, 70, 40000), (128, 128, 131000)]:
        a, W = _gemm_case(rng, M, N, K, extremes=True)
        got = Q.int8_linear_matmul(torch.from_numpy(a).cuda(), torch.from_numpy(W).cuda())
        np.testing.assert_array_equal(got.cpu().numpy(), ref.int8_linear_matmul(a, W))


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_switchback_matmuls_match_reference(M, N, K, dtype):
    """The fused epilogue against the reference epilogue on the exact int32 product: bit-equal
    (float32 math in one fixed order, rounded once to the output dtype)."""
    import torch
    rng = np.random.default_rng(M + N + K)
    a, W = _gemm_case(rng, M, N, K)
    sa32 = round_to(rng.uniform(0, 8, M).astype(np.float32), dtype)
    sa32[rng.integers(0, M)] = 0.0                      # a zero row scale: zeros, not NaN
    sb32 = round_to(rng.uniform(0, 8, N).astype(np.float32), dtype)
    g32 = round_to(np.array([3.3], np.float32), dtype)
    ta, tW = torch.from_numpy(a).cuda(), torch.from_numpy(W).cuda()
    for bias_dtype in (None, dtype, "float32"):
        bias32 = None if bias_dtype is None else round_to(rng.standard_normal(N).astype(np.float32) * 10, bias_dtype)
        bias_np = None if bias_dtype is None else as_numpy(bias32, bias_dtype)
        bias_t = None if bias_dtype is None else _cuda(bias32, bias_dtype)
        got = Q.int8_matmul_rowwise_dequantize(ta, tW.t(), _cuda(sa32, dtype), _cuda(sb32, dtype), bias_t)
        want = ref.int8_matmul_rowwise_dequantize(a, W.T, as_numpy(sa32, dtype), as_numpy(sb32, dtype), bias_np)
        assert got.dtype == getattr(torch, dtype) and got.shape == (M, N)
        np.testing.assert_array_equal(_np(got), f32_of(want))
        got = Q.int8_matmul_mixed_dequantize(ta, tW.t(), _cuda(sa32, dtype), _cuda(g32, dtype), bias_t)
        want = ref.int8_matmul_mixed_dequantize(a, W.T, as_numpy(sa32, dtype), as_numpy(g32, dtype), bias_np)
        np.testing.assert_array_equal(_np(got), f32_of(want))
    # the hot-path entry point the layers call: same kernel, raw pointers
    from qkernels.int8 import _cupy
    got = _cupy.int8_matmul_dequant_torch(ta, tW, _cuda(sa32, dtype), _cuda(sb32, dtype))
    want = ref.int8_matmul_rowwise_dequantize(a, W.T, as_numpy(sa32, dtype), as_numpy(sb32, dtype))
    np.testing.assert_array_equal(_np(got), f32_of(want))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,seed", [("sm90", 388), ("sm90_bn128", 259), ("sm90_bk64", 324)])
def test_gpu_sm90_gemm_matches_reference(kernel, seed):
    """The Hopper wgmma GEMM (gemm_sm90.cu) in each tile configuration, forced by name, on
    shapes with more tiles than SMs (the persistent loop), partial tiles in M, N and K, int32
    and every epilogue dtype: bit-equal to the reference, and to the portable int8_gemm
    ("mma_sync") on the same inputs. "sm90" is the default choice on this device."""
    import cupy
    import torch
    from qkernels.int8 import _cupy
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma GEMM runs on compute capability 9.0 only")
    assert _cupy.kernel_choice("gemm", torch.cuda.current_device(), 64, 64, 64, "int8", True) == "sm90"
    rng = np.random.default_rng(seed)
    for M, N, K in [(2051, 2312, 272), (130, 4100, 1008), (3, 9, 16), (1, 4096, 4096)]:
        a, W = _gemm_case(rng, M, N, K)
        ta, tW = torch.from_numpy(a).cuda(), torch.from_numpy(W).cuda()
        C = ref.int8_linear_matmul(a, W)
        raw = cupy.empty((M, N), cupy.int32)
        _cupy.gemm(cupy.from_dlpack(ta), cupy.from_dlpack(tW), raw, out_dtype="int32", kernel=kernel)
        np.testing.assert_array_equal(cupy.asnumpy(raw), C)
        for dtype in DTYPES:
            sa32 = round_to(rng.uniform(0, 8, M).astype(np.float32), dtype)
            sb32 = round_to(rng.uniform(0, 8, N).astype(np.float32), dtype)
            bias32 = round_to(rng.standard_normal(N).astype(np.float32), dtype)
            want = ref.int8_matmul_rowwise_dequantize(a, W.T, as_numpy(sa32, dtype), as_numpy(sb32, dtype),
                                                      as_numpy(bias32, dtype))
            args = (ta, tW, _cuda(sa32, dtype), _cuda(sb32, dtype), _cuda(bias32, dtype))
            got = _cupy.int8_matmul_dequant_torch(*args, kernel=kernel)
            np.testing.assert_array_equal(_np(got), f32_of(want))
            portable = _cupy.int8_matmul_dequant_torch(*args, kernel="mma_sync")
            assert torch.equal(got, portable)


@pytest.mark.gpu
def test_gpu_mm_dequant_nan_scales_and_llm_int8_path():
    import torch
    rng = np.random.default_rng(14)
    M, N, K = 77, 45, 100
    a, W = _gemm_case(rng, M, N, K)
    rs = rng.uniform(0, 5, M).astype(np.float32)
    cs = rng.uniform(0, 5, N).astype(np.float32)
    rs[3], rs[4], cs[5] = np.nan, np.inf, 0.0
    C = ref.int8_linear_matmul(a, W)
    for out_dtype in DTYPES:
        for bias in (None, rng.standard_normal(N).astype(np.float32)):
            want = ref.int8_mm_dequant(C, rs, cs, bias, out_dtype)
            tb = None if bias is None else torch.from_numpy(bias).cuda()
            for backend in gpu_backends():
                with qkernels.use_backend(backend):
                    got = Q.int8_mm_dequant(torch.from_numpy(C).cuda(), torch.from_numpy(rs).cuda(),
                                            torch.from_numpy(cs).cuda(), tb, out_dtype=out_dtype)
                np.testing.assert_array_equal(_np(got), f32_of(want))
    # the NaN / Inf scale rows are the only non-finite ones
    out = f32_of(ref.int8_mm_dequant(C, rs, cs, None, "float32"))
    bad = ~np.isfinite(out)
    assert bad[3].all() and bad[4].all() and not bad[[0, 1, 2] + list(range(5, M))].any()


@pytest.mark.gpu
def test_gpu_stream_and_graph_capture():
    import torch
    from qkernels.int8 import _cupy
    x = torch.randn(512, 1024, device="cuda", dtype=torch.float16)
    W = torch.randint(-127, 128, (768, 1024), device="cuda", dtype=torch.int8)
    sW = torch.rand(768, device="cuda", dtype=torch.float16)
    q, s = _cupy.quantize_rowwise_torch(x)
    _cupy.int8_matmul_dequant_torch(q, W, s, sW)   # compile outside the capture
    want_q1, want_s1 = ref.quantize_rowwise(x.cpu().numpy())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q1, s1 = Q.quantize_rowwise(x)
    side.synchronize()
    np.testing.assert_array_equal(q1.cpu().numpy(), want_q1)
    np.testing.assert_array_equal(s1.cpu().numpy(), want_s1)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        qg, sg = _cupy.quantize_rowwise_torch(x)
        yg = _cupy.int8_matmul_dequant_torch(qg, W, sg, sW)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    wq, ws = ref.quantize_rowwise(x.cpu().numpy())
    np.testing.assert_array_equal(qg.cpu().numpy(), wq)
    want = ref.int8_matmul_rowwise_dequantize(wq, W.cpu().numpy().T, ws, sW.cpu().numpy())
    np.testing.assert_array_equal(yg.cpu().numpy(), want)
    for fn, name in [(lambda: _cupy.quantize_global_torch(x.float()), "quantize_global"),
                     (lambda: _cupy.quantize_global_torch(x.float(), transpose=True), "quantize_global_transpose"),
                     (lambda: _cupy.quantize_columnwise_and_transpose_torch(x), "quantize_columnwise_and_transpose")]:
        src = x.float() if "global" in name else x
        for g_, w_ in zip(fn(), getattr(ref, name)(src.cpu().numpy())):
            np.testing.assert_array_equal(_np(g_), w_.astype(np.float32) if w_.dtype != np.int8 else w_)


# --- the GEMM's fragment and tile index math, emulated on the CPU ---------------------------
# int8.cu's load_tile / swz / ldmatrix addressing / epilogue mapping, transcribed; ldmatrix
# and mma.m16n8k32 replaced by their PTX ISA definitions. One 128 x 128 x 64 CTA tile.

def _swz(row, chunk):
    return row * 64 + ((chunk ^ ((row >> 1) & 3)) << 4)


def _ldmatrix_x4(smem, addr):
    """addr[lane] (32,) -> regs (4, 32) uint32: matrix i's row j comes from lane 8 i + j;
    lane l receives the 4 bytes at that row's address + 4 (l % 4) of row l // 4."""
    regs = np.zeros((4, 32), np.uint32)
    for i in range(4):
        for lane in range(32):
            base = addr[8 * i + lane // 4] + 4 * (lane % 4)
            regs[i, lane] = smem[base:base + 4].view(np.uint32)[0]
    return regs


def _bytes(reg):
    return np.frombuffer(np.uint32(reg).tobytes(), np.int8).astype(np.int64)


def _mma_m16n8k32(a, b, acc):
    """a (4, 32), b (2, 32) uint32 fragments; acc (4, 32) int64 -> acc + A @ B per the PTX ISA
    fragment layouts (g = lane // 4, t = lane % 4)."""
    A = np.zeros((16, 32), np.int64)
    B = np.zeros((32, 8), np.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        A[g, 4 * t:4 * t + 4] = _bytes(a[0, lane])
        A[g + 8, 4 * t:4 * t + 4] = _bytes(a[1, lane])
        A[g, 16 + 4 * t:20 + 4 * t] = _bytes(a[2, lane])
        A[g + 8, 16 + 4 * t:20 + 4 * t] = _bytes(a[3, lane])
        B[4 * t:4 * t + 4, g] = _bytes(b[0, lane])
        B[16 + 4 * t:20 + 4 * t, g] = _bytes(b[1, lane])
    D = A @ B
    out = acc.copy()
    for lane in range(32):
        g, t = lane // 4, lane % 4
        out[:, lane] += [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]
    return out


def test_gemm_fragment_mapping_emulated():
    rng = np.random.default_rng(15)
    A = rng.integers(-128, 128, (128, 64)).astype(np.int8)
    Bnk = rng.integers(-128, 128, (128, 64)).astype(np.int8)
    sa, sb = np.zeros(128 * 64, np.uint8), np.zeros(128 * 64, np.uint8)
    for e in range(512):                                   # load_tile, 256 threads x 2 chunks
        r, ch = e >> 2, e & 3
        sa[_swz(r, ch):_swz(r, ch) + 16] = A[r, ch * 16:ch * 16 + 16].view(np.uint8)
        sb[_swz(r, ch):_swz(r, ch) + 16] = Bnk[r, ch * 16:ch * 16 + 16].view(np.uint8)
    lanes = np.arange(32)
    got = np.zeros((128, 128), np.int64)
    for warp in range(8):
        warp_m, warp_n = warp & 1, warp >> 1
        acc = np.zeros((4, 4, 4, 32), np.int64)
        for kk in range(2):
            a = [_ldmatrix_x4(sa, [_swz(warp_m * 64 + mi * 16 + (l & 15), kk * 2 + (l >> 4)) for l in lanes])
                 for mi in range(4)]
            b = [None] * 4
            for nj in range(2):
                addr = [_swz(warp_n * 32 + nj * 16 + ((l >> 3) >> 1) * 8 + (l & 7), kk * 2 + ((l >> 3) & 1))
                        for l in lanes]
                r = _ldmatrix_x4(sb, addr)
                b[2 * nj], b[2 * nj + 1] = r[0:2], r[2:4]
            for mi in range(4):
                for ni in range(4):
                    acc[mi, ni] = _mma_m16n8k32(a[mi], b[ni], acc[mi, ni])
        for lane in range(32):                              # the epilogue's (row, col) mapping
            g, t = lane >> 2, lane & 3
            for mi in range(4):
                for ni in range(4):
                    row = warp_m * 64 + mi * 16 + g
                    col = warp_n * 32 + ni * 8 + 2 * t
                    got[row, col:col + 2] = acc[mi, ni, 0:2, lane]
                    got[row + 8, col:col + 2] = acc[mi, ni, 2:4, lane]
    np.testing.assert_array_equal(got, A.astype(np.int64) @ Bnk.astype(np.int64).T)
    # every ldmatrix phase (8 lanes' 16-byte rows) covers all 32 banks once: no conflicts
    for rows in (np.arange(8) + 16 * k for k in range(8)):
        for chunk in range(4):
            banks = sorted(((_swz(r, chunk) // 4) + j) % 32 for r in rows for j in range(4))
            assert banks == list(range(32))


def test_backend_entries_refuse_unpaired_arguments():
    """The pointer launchers (no GPU needed to reach their checks) and the NumPy entries refuse
    argument pairs given half: threshold > 0 without a flags buffer (the kernel would write
    through a null pointer), a bias without its dtype (silently dropped, or its bits misread)
    or a dtype without a bias, and the FP8 quantizer's dbias without its column sums."""
    from qkernels.fp8 import _cupy as fp8_cupy
    from qkernels.int8 import _cupy as int8_cupy
    from qkernels.int8 import _numpy_mm_dequant
    with pytest.raises(ValueError, match="flags"):
        int8_cupy.launch_row_quant(1, 2, 3, 4, 5, dtype="float16", stats_dtype="float32", threshold=6.0)
    for kw in (dict(bias=8), dict(bias_dtype="float16")):
        with pytest.raises(ValueError, match="bias and bias_dtype"):
            int8_cupy.launch_mm_dequant(1, 2, 3, 4, 5, 6, out_dtype="float16", **kw)
        with pytest.raises(ValueError, match="bias and bias_dtype"):
            int8_cupy.launch_gemm(1, 2, 3, 4, 5, 6, out_dtype="float16", **kw)
    with pytest.raises(ValueError, match="dbias"):
        fp8_cupy.launch_quant_rows_cols(1, 2, 3, dtype="bfloat16", row_fmt="e4m3", col_fmt="e4m3", row_u32=1,
                                        col_u32=1, q=1, qT=1, srow=1, scol=1, dbias=5)
    C = np.ones((2, 3), np.int32)
    r, c, out = np.ones(2, np.float32), np.ones(3, np.float32), np.empty((2, 3), np.float16)
    with pytest.raises(ValueError, match="go together"):
        _numpy_mm_dequant(C, r, c, out, out_dtype="float16", bias=np.ones(3, np.uint16))
    _numpy_mm_dequant(C, r, c, out, out_dtype="float16", bias=np.ones(3, np.float16), bias_dtype="float16")
    np.testing.assert_array_equal(out, np.float16(np.float32(1 / 127**2) + 1))
