"""Native float8 quantizers (qkernels.fp8, reference/fp8.py's quantize_fp8_*): the reference's
float8 rounding against torch's own conversion, the reference quantizers against the torch
expression the layers used, the public API and the torch ops on the CPU, and (GPU) the CuPy
kernels and torch hot paths against the reference bit for bit, on odd shapes, misaligned
inputs, rows longer than the register cache, and zero / NaN / Inf / subnormal rows."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qkernels.fp8 as F
from reference import fp8 as ref
from tests.conftest import gpu_backends

FMTS = ("e4m3", "e5m2")
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def torch_rowwise(x: torch.Tensor, fmt: str):
    """The layers' torch expression (amax / fmax as CUDA torch computes it: times f32(1/fmax))."""
    fmax, inv = float(ref.FP8_MAX[fmt]), float(ref.FP8_INV_MAX[fmt])
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax * inv, torch.ones_like(amax))
    scale = torch.where(torch.isnan(amax), amax, scale)
    q = (x.float() / scale).clamp(-fmax, fmax).to(TORCH_FP8[fmt])
    return q.view(torch.uint8), scale.reshape(-1)


def torch_global(x: torch.Tensor, fmt: str):
    fmax, inv = float(ref.FP8_MAX[fmt]), float(ref.FP8_INV_MAX[fmt])
    amax = x.abs().amax().float().reshape(1)
    scale = torch.where(amax > 0, amax * inv, torch.ones_like(amax))
    return (x.float() / scale).clamp(-fmax, fmax).to(TORCH_FP8[fmt]).view(torch.uint8), scale


def special_rows(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows over 10 decades, and rows that are zero, hold a NaN, +-Inf, subnormals, ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 4, rows)[:, None]
    if rows > 6:
        x[1] = 0
        x[2, cols // 2] = float("nan")
        x[3, cols - 1] = float("inf")
        x[4, 0] = -float("inf")
        x[5] = torch.randn(cols, generator=g) * (1e-39 if dtype != torch.float16 else 1e-6)
        x[6] = torch.randint(-3, 4, (cols,), generator=g).float()  # many exact ties
    return x.to(dtype)


def nan_codes_positive(codes):
    """Float8 NaN codes with the sign cleared (0x7F): a NaN quotient's sign is the machine's
    (x86's Inf / Inf is a negative NaN, the GPU's is positive); the reference writes 0x7F."""
    return np.where((codes & 0x7F) == 0x7F, np.uint8(0x7F), codes)


def same_scales(a, b) -> bool:
    a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


def f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy()


# --- the reference -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FMTS)
def test_float8_rounding_matches_torch(fmt):
    """Every 997th float32 bit pattern, and each float8 value and midpoint +-3 ulps, both signs:
    the reference's rounding is torch's for |y| <= fmax (the quantizers clamp first)."""
    u = np.arange(0, 2 ** 32, 997, dtype=np.uint64).astype(np.uint32)
    vals = ref.fp8_bits_to_float32(np.arange(256, dtype=np.uint8), fmt).astype(np.float64)
    fs = np.unique(vals[np.isfinite(vals)])
    pts = np.concatenate([fs, (fs[1:] + fs[:-1]) / 2]).astype(np.float32).view(np.uint32)
    near = (pts[:, None].astype(np.int64) + np.arange(-3, 4)).ravel()
    near = near[(near >= 0) & (near < 2 ** 32)].astype(np.uint32)
    y = np.concatenate([u, near, near | np.uint32(0x80000000)]).view(np.float32)
    y = y[~np.isnan(y) & (np.abs(y) <= ref.FP8_MAX[fmt])]
    want = torch.from_numpy(y.copy()).to(TORCH_FP8[fmt]).view(torch.uint8).numpy()
    assert np.array_equal(ref.float32_to_fp8_bits(y, fmt), want)
    assert np.all(ref.float32_to_fp8_bits(np.float32([np.nan, -np.nan]), fmt) == 0x7F)
    codes = np.arange(256, dtype=np.uint8)
    dec = torch.from_numpy(codes).view(TORCH_FP8[fmt]).float().numpy()
    assert same_scales(ref.fp8_bits_to_float32(codes, fmt), dec)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FMTS)
def test_reference_matches_torch_expression(fmt, dtype):
    x = special_rows(40, 77, dtype)
    q, s = torch_rowwise(x, fmt)
    rq, rs = ref.quantize_fp8_rowwise_f32(f32(x), fmt)
    assert np.array_equal(rq, nan_codes_positive(q.numpy())) and same_scales(rs, s.numpy())
    assert np.all(rq[2] == 0x7F)  # a NaN row scale makes every quotient NaN
    finite = x.clone()
    finite[~torch.isfinite(finite)] = 1
    gq, gs = torch_global(finite, fmt)
    rgq, rgs = ref.quantize_fp8_global_f32(f32(finite), fmt)
    assert np.array_equal(rgq, nan_codes_positive(gq.numpy())) and same_scales(rgs, gs.numpy())
    rgq, rgs = ref.quantize_fp8_global_f32(f32(x), fmt)  # NaN: the global scale stays 1
    assert rgs[0] == 1 and rgq[2, 77 // 2] == 0x7F


def test_dequantized_error_and_scales():
    x = np.random.default_rng(1).standard_normal((8, 300)).astype(np.float32)
    for fmt, tol in (("e4m3", 2.0 ** -4), ("e5m2", 2.0 ** -3)):
        q, s = ref.quantize_fp8_rowwise_f32(x, fmt)
        back = ref.fp8_bits_to_float32(q, fmt) * s[:, None]
        big = np.abs(x) > np.abs(x).max(axis=1, keepdims=True) * 2.0 ** -6
        assert np.all(np.abs(back - x)[big] <= tol * np.abs(x)[big] * 1.0001)
        assert np.array_equal(np.abs(ref.fp8_bits_to_float32(q, fmt)).max(axis=1),
                              np.full(8, ref.FP8_MAX[fmt]))


# --- public API and torch ops on the CPU ---------------------------------------------------------

@pytest.mark.parametrize("fmt", FMTS)
def test_public_api_on_host(fmt):
    x = special_rows(9, 37, torch.bfloat16, seed=2)
    q, s = F.quantize_fp8_rowwise(x, fmt)
    rq, rs = ref.quantize_fp8_rowwise_f32(f32(x), fmt)
    assert q.dtype == torch.uint8 and np.array_equal(q.numpy(), rq) and same_scales(s, rs)
    qn, sn = F.quantize_fp8_rowwise(x.float().numpy().astype(np.float16), fmt)
    assert qn.dtype == np.uint8 and qn.shape == (9, 37)
    qt, st = F.quantize_fp8_columnwise_and_transpose(x, fmt)
    rq, rs = ref.quantize_fp8_rowwise_f32(f32(x).T, fmt)
    assert qt.shape == (37, 9) and np.array_equal(qt.numpy(), rq) and same_scales(st, rs)
    w = x.float().nan_to_num(0.0, 1.0, -1.0)
    qg, sg = F.quantize_fp8_global_transpose(w, fmt)
    rq, rs = ref.quantize_fp8_global_f32(f32(w), fmt)
    assert np.array_equal(qg.numpy(), rq.T) and same_scales(sg, rs)
    q3, s3 = F.quantize_fp8_global(w.reshape(3, 3, 37), fmt)
    assert q3.shape == (3, 3, 37) and np.array_equal(q3.numpy().reshape(9, 37), rq)
    with pytest.raises(ValueError, match="fp8 format"):
        F.quantize_fp8_rowwise(x, "e3m4")
    with pytest.raises(ValueError, match="2-D"):
        F.quantize_fp8_rowwise(x.reshape(-1), fmt)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        F.quantize_fp8_rowwise(x.to(torch.float64), fmt)


def test_torch_ops_on_cpu_are_the_reference():
    import torch_ops.fp8 as P
    x = special_rows(12, 48, torch.bfloat16, seed=3)
    for fmt, dt in TORCH_FP8.items():
        q, s = P.fp8_rowwise(x, dt)
        rq, rs = ref.quantize_fp8_rowwise_f32(f32(x), fmt)
        assert q.dtype == dt and s.shape == (12, 1)
        assert np.array_equal(q.view(torch.uint8).numpy(), rq) and same_scales(s, rs)
        qt, st = P.fp8_rowwise(x.t(), dt)  # a transposed view: per column of x
        rq, rs = ref.quantize_fp8_rowwise_f32(f32(x).T, fmt)
        assert qt.is_contiguous() and np.array_equal(qt.view(torch.uint8).numpy(), rq)
        w = x.nan_to_num(0.0, 1.0, -1.0)
        qg, sg = P.fp8_global(w.t(), dt)
        rq, rs = ref.quantize_fp8_global_f32(f32(w).T, fmt)
        assert sg.shape == (1, 1) and np.array_equal(qg.view(torch.uint8).numpy(), rq)


# --- GPU ---------------------------------------------------------------------------------------

GPU_SHAPES = [(1, 1), (3, 5), (7, 33), (17, 1000), (40, 77), (5, 4096), (3, 20000), (130, 257)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_gpu_quantizers_match_reference(backend, fmt, dtype):
    import qkernels
    for shape in GPU_SHAPES:
        x = special_rows(*shape, dtype, seed=shape[0] * 7 + shape[1])
        xs = x.cuda()
        with qkernels.use_backend(backend):
            q, s = F.quantize_fp8_rowwise(xs, fmt)
            qt, st = F.quantize_fp8_columnwise_and_transpose(xs, fmt)
            qg, sg = F.quantize_fp8_global(xs, fmt)
            qgt, sgt = F.quantize_fp8_global_transpose(xs, fmt)
        rq, rs = ref.quantize_fp8_rowwise_f32(f32(x), fmt)
        assert np.array_equal(q.cpu().numpy(), rq) and same_scales(s.cpu(), rs), shape
        rq, rs = ref.quantize_fp8_rowwise_f32(f32(x).T, fmt)
        assert np.array_equal(qt.cpu().numpy(), rq) and same_scales(st.cpu(), rs), shape
        rq, rs = ref.quantize_fp8_global_f32(f32(x), fmt)
        assert np.array_equal(qg.cpu().numpy(), rq) and same_scales(sg.cpu(), rs), shape
        assert np.array_equal(qgt.cpu().numpy(), rq.T) and same_scales(sgt.cpu(), rs), shape


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
def test_gpu_torch_paths_misaligned_and_against_torch_expression(fmt):
    """The layers' entry points (torch_ops.fp8.fp8_rowwise / fp8_global, transposed views
    included) on misaligned slices equal the reference, and, on finite rows, the torch
    expression run on the GPU."""
    import torch_ops.fp8 as P
    dt = TORCH_FP8[fmt]
    base = special_rows(66, 4104, torch.bfloat16, seed=5).cuda()
    shifted = base.reshape(-1)[3:3 + 65 * 4097].view(65, 4097)  # contiguous, 6 bytes off
    for x in (base, shifted, base[1:, 3:4099], base[:, :1000].float(), base[:64, 8:].half()):
        q, s = P.fp8_rowwise(x, dt)
        rq, rs = ref.quantize_fp8_rowwise_f32(f32(x), fmt)
        assert np.array_equal(q.view(torch.uint8).cpu().numpy(), rq) and same_scales(s.cpu(), rs)
        tq, ts = torch_rowwise(x, fmt)
        # the torch expression keeps a NaN quotient's sign: compare NaN codes without it
        nan_code = (tq & 0x7F) == 0x7F
        assert torch.equal(torch.where(nan_code, 0x7F, tq), q.view(torch.uint8))
        assert same_scales(s.cpu(), ts.cpu())
        w = x.contiguous()
        qt, st = P.fp8_rowwise(w.t(), dt)
        rq, rs = ref.quantize_fp8_rowwise_f32(f32(w).T, fmt)
        assert np.array_equal(qt.view(torch.uint8).cpu().numpy(), rq) and same_scales(st.cpu(), rs)
        wf = w.nan_to_num(0.0, 1.0, -1.0)
        for v, r in ((wf, f32(wf)), (wf.t(), f32(wf).T)):
            qg, sg = P.fp8_global(v, dt)
            rq, rs = ref.quantize_fp8_global_f32(r, fmt)
            assert np.array_equal(qg.view(torch.uint8).cpu().numpy(), rq) and same_scales(sg.cpu(), rs)
            tq, ts = torch_global(v, fmt)
            assert torch.equal(qg.view(torch.uint8), tq.reshape(qg.shape)) and same_scales(sg.cpu(), ts.cpu())


def boundary_rows(fmt: str, dtype: torch.dtype, cols: int = 3000, seed: int = 0) -> torch.Tensor:
    """Rows whose quotients x / scale sit on or beside float8 rounding boundaries, where the
    kernels' multiply-by-reciprocal shortcut must fall back to the division: scales that are
    powers of two (amax = fmax * 2^k) with every float8 midpoint and grid value, and (float32)
    the same nudged by 1 to 4 ulps; a row of one random scale with midpoints times it; a row of
    signed zeros and values down to 2^-60 of its amax; (not float16) a row of amax 2^-70."""
    g = np.random.default_rng(seed)
    grid = ref.fp8_bits_to_float32(np.arange(0, 0x7F, dtype=np.uint8), fmt).astype(np.float64)
    grid = grid[np.isfinite(grid)]
    mids = (grid[:-1] + grid[1:]) / 2
    fmax = float(ref.FP8_MAX[fmt])
    rows = []
    for k in ((-6, 0) if dtype == torch.float16 else (-20, 0, 7)):  # inside float16's range
        v = g.choice(np.concatenate([mids, grid]), cols) * g.choice([-1.0, 1.0], cols)
        v[0] = fmax
        row = (v * 2.0 ** k).astype(np.float32)
        rows.append(row)
        if dtype == torch.float32:
            nudged = (row.view(np.int32) + g.integers(-4, 5, cols).astype(np.int32)).view(np.float32)
            nudged = np.where(row == 0, row, nudged)
            nudged[0] = row[0]
            rows.append(nudged)
    s = ref.fp8_scale(np.float32(3.7e3), fmt)
    row = (g.choice(mids, cols) * np.float64(s)).astype(np.float32)
    row[0] = 3.7e3
    rows.append(row)
    # signed zeros and values 2^-1 .. 2^-60 of the row's amax (float8 subnormals, underflow)
    row = (g.uniform(1, 2, cols) * 2.0 ** -g.integers(1, 61, cols) * g.choice([-1.0, 1.0], cols))
    row[:3] = (1.5, -0.0, 0.0)
    rows.append(row.astype(np.float32))
    if dtype != torch.float16:  # amax 2^-70: a scale below fp8x4's 2^-60, which divides
        rows.append((g.choice(np.concatenate([mids, grid]), cols) * 2.0 ** -70 / fmax * 1.75).astype(np.float32))
        rows[-1][0] = 1.75 * 2.0 ** -70
    return torch.from_numpy(np.stack(rows)).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_gpu_quantizers_at_float8_rounding_boundaries(fmt, dtype):
    """Every quantizer, fused one included, equals the reference's IEEE division on quotients
    that are float8 ties or lie a few ulps from them."""
    x = boundary_rows(fmt, dtype, seed=TORCH_DTYPES.index(dtype))
    xs = x.cuda()
    for v, r in ((xs, f32(x)), (xs.t().contiguous(), f32(x).T.copy())):
        q, s = F.quantize_fp8_rowwise(v, fmt)
        rq, rs = ref.quantize_fp8_rowwise_f32(r, fmt)
        assert np.array_equal(q.cpu().numpy(), rq) and same_scales(s.cpu(), rs)
        qt, st = F.quantize_fp8_columnwise_and_transpose(v, fmt)
        rq, rs = ref.quantize_fp8_rowwise_f32(r.T, fmt)
        assert np.array_equal(qt.cpu().numpy(), rq) and same_scales(st.cpu(), rs)
        qg, sg = F.quantize_fp8_global(v, fmt)
        rq, rs = ref.quantize_fp8_global_f32(r, fmt)
        assert np.array_equal(qg.cpu().numpy(), rq) and same_scales(sg.cpu(), rs)
        qgt, _ = F.quantize_fp8_global_transpose(v, fmt)
        assert np.array_equal(qgt.cpu().numpy(), rq.T)
    _check_rows_cols(xs, TORCH_FP8[fmt], TORCH_FP8[fmt], with_colsum=False)


def _check_rows_cols(x: torch.Tensor, row_fp8, col_fp8, with_colsum: bool):
    """quantize_rows_cols_torch(x) against the reference (codes, scales) and a float64 sum."""
    from qkernels.fp8 import _cupy as K
    q, sq, qT, sqT, dbias = K.quantize_rows_cols_torch(x, row_fp8, col_fp8, with_colsum)
    names = {v: k for k, v in TORCH_FP8.items()}
    xf = f32(x)
    rq, rs = ref.quantize_fp8_rowwise_f32(xf, names[row_fp8])
    assert q.dtype == row_fp8 and sq.shape == (x.shape[0], 1)
    assert np.array_equal(q.view(torch.uint8).cpu().numpy(), rq) and same_scales(sq.cpu(), rs)
    rq, rs = ref.quantize_fp8_rowwise_f32(xf.T, names[col_fp8])
    assert qT.dtype == col_fp8 and qT.shape == (x.shape[1], x.shape[0]) and sqT.shape == (x.shape[1], 1)
    assert np.array_equal(qT.view(torch.uint8).cpu().numpy(), rq) and same_scales(sqT.cpu(), rs)
    if not with_colsum:
        assert dbias is None
        return
    assert dbias.dtype == x.dtype and dbias.shape == (x.shape[1],)
    exact = x.double().sum(0).cpu()
    got = dbias.double().cpu()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(got), torch.isnan(exact))
    assert torch.equal(got[torch.isinf(exact)], exact[torch.isinf(exact)])
    # float32 accumulation of M terms, then one rounding to x's dtype
    eps = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[x.dtype]
    bound = exact.abs() * eps + x.double().abs().sum(0).cpu() * x.shape[0] * 2.0 ** -24 + 1e-30
    fin = finite & torch.isfinite(got)
    assert torch.all((got - exact)[fin].abs() <= bound[fin] * 1.0001)
    bits = lambda t: t.view(torch.int32 if t.element_size() == 4 else torch.int16)
    assert torch.equal(bits(K.quantize_rows_cols_torch(x, row_fp8, col_fp8, True)[4]), bits(dbias))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_gpu_rows_cols_fused_matches_reference(dtype):
    """The fused backward quantizer (G's row codes, G^T's row codes, dbias) on odd shapes,
    rows and columns past a tile and a slab, misaligned rows, and zero / NaN / Inf rows."""
    shapes = GPU_SHAPES + [(129, 130), (300, 4100), (1030, 33), (16, 9000)]
    for i, shape in enumerate(shapes):
        x = special_rows(*shape, dtype, seed=100 + i).cuda()
        _check_rows_cols(x, torch.float8_e5m2, torch.float8_e5m2, with_colsum=True)
        _check_rows_cols(x, torch.float8_e4m3fn, torch.float8_e5m2, with_colsum=i % 2 == 0)
    base = special_rows(70, 4104, dtype, seed=9).cuda()
    shifted = base.reshape(-1)[3:3 + 69 * 4097].view(69, 4097)  # contiguous, 6 bytes off
    _check_rows_cols(shifted, torch.float8_e5m2, torch.float8_e5m2, with_colsum=True)
    _check_rows_cols(base.t().contiguous(), torch.float8_e5m2, torch.float8_e5m2, with_colsum=True)
