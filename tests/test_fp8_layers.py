"""FP8 linear layers (docs/FORMATS.md §8): the qdq ops against the NumPy oracle (exact), the
layers' forward and backward against a float64 evaluation of the same quantized math, block
sizes, custom ops, torch.compile, state_dict, bad input, and the native FP8 path (its math
on CPU through torch._scaled_mm's CPU kernel; the layer itself on a GPU with FP8 tensor cores).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_ops.fp8 as P
from reference import fp8 as ref
from reference.codebooks import fp8_map, midpoints
from torch_ops.fp8 import LinearFP8Global, LinearFP8Mixed, matmul_fp8_global, matmul_fp8_mixed

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
E4M3, E5M2 = fp8_map(4, 3), fp8_map(5, 2)



@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One intra-op thread: on a shared, oversubscribed CPU torch's spinning OpenMP workers
    make these small ops 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def definition_global(x: torch.Tensor, code: np.ndarray) -> torch.Tensor:
    """docs/FORMATS.md §2 with one block, spelled out with np.searchsorted."""
    x32 = _np(x).reshape(-1)
    absmax = np.float32(np.max(np.abs(x32)))
    with np.errstate(all="ignore"):
        y = (x32 * (np.float32(1) / absmax)).astype(np.float32)
    y[np.isnan(y)] = 0
    c = np.searchsorted(midpoints(code), y, side="left")
    with np.errstate(all="ignore"):
        out = (code[c] * absmax).astype(np.float32)
    return torch.from_numpy(out).to(x.dtype).reshape(x.shape)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) \
        and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("code", ["e4m3", "e5m2"])
def test_qdq_global_is_exact_on_cpu_and_in_torch_ops(dtype, code):
    """The CPU op (NumPy reference) and the torch-ops version the GPU runs agree bit for bit
    with the definition, including zero, NaN and Inf tensors and tiny / huge scales."""
    torch.manual_seed(0)
    cases = [torch.randn(37, 29) * s for s in (1e-6, 1.0, 1e4)]
    cases += [torch.zeros(5, 3), torch.randn(300).round()]
    nan = torch.randn(4, 8)
    nan[1, 2] = float("nan")
    inf = torch.randn(4, 8)
    inf[0, 0] = float("inf")
    cases += [nan, inf]
    table = {"e4m3": E4M3, "e5m2": E5M2}[code]
    code_t, mid_t = P._tables(code, torch.device("cpu"))
    for x in cases:
        x = x.to(dtype)
        want = definition_global(x, table)
        assert _same(P.qdq_global(x, code), want)
        assert _same(P._qdq_global_torch(x, code_t, mid_t), want)
        assert _same(torch.from_numpy(ref.qdq_global_f32(_np(x), table)).to(dtype).reshape(x.shape), want)
    assert torch.isnan(P.qdq_global(nan.to(dtype), code)).all()


def test_qdq_blockwise_matches_reference():
    torch.manual_seed(1)
    x = torch.randn(7, 300, dtype=torch.bfloat16)
    got = P.qdq_blockwise(x, "e5m2", 256)
    want = ref.qdq_blockwise(_np(x), E5M2, 256)
    assert torch.equal(got.float(), torch.from_numpy(want.astype(np.float32)).bfloat16().float())


def test_block_sizes():
    table = {1: 64, 63: 64, 64: 64, 65: 128, 100: 128, 768: 1024, 1024: 1024, 1025: 2048,
             2048: 2048, 2049: 4096, 16384: 4096}
    for features, want in table.items():
        assert P.fp8_block_sizes(features, 7) == (want, 64)
    layer = LinearFP8Mixed(768, 1025)
    assert (layer.bsz, layer.bsz2) == (1024, 2048)


def reference(kind: str, X, W, b, G, bsz, bsz2, device="cpu"):
    """(Y, dX, dW, dbias): float64 products of the dtype-rounded qdq operands docs/FORMATS.md §8.1 names,
    and the same four as plain torch computes them in X's dtype on ``device``."""
    dt = X.dtype
    B = W.t()
    fp8B = torch.from_numpy(ref.qdq_global(_np(B), E4M3).astype(np.float32)).to(dt)
    if kind == "mixed":
        fp8X = torch.from_numpy(ref.qdq_blockwise(_np(X), E4M3, bsz).astype(np.float32)).to(dt)
        Gq = torch.from_numpy(ref.qdq_blockwise(_np(G), E5M2, bsz2).astype(np.float32)).to(dt)
        Xw, Gw = X, G
    else:
        fp8X = torch.from_numpy(ref.qdq_global(_np(X), E4M3).astype(np.float32)).to(dt)
        Gq = torch.from_numpy(ref.qdq_global(_np(G), E5M2).astype(np.float32)).to(dt)
        Xw, Gw = fp8X, Gq
    d = lambda t: t.double()
    exact = (d(fp8X) @ d(fp8B) + d(b), d(Gq) @ d(fp8B).t(), d(Gw).t() @ d(Xw), d(G).sum(0))
    fp8X, fp8B, b, Gq, Xw, Gw, G = (t.to(device) for t in (fp8X, fp8B, b, Gq, Xw, Gw, G))
    plain = (fp8X @ fp8B + b, Gq @ fp8B.t(), (Xw.t() @ Gw).t(), G.sum(0))
    return exact, tuple(p.cpu() for p in plain)


@pytest.mark.parametrize("kind", ["mixed", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_against_float64_reference(kind, dtype):
    torch.manual_seed(2)
    M, K, N = 80, 200, 136
    layer = (LinearFP8Mixed if kind == "mixed" else LinearFP8Global)(K, N, dtype=dtype)
    X = torch.randn(M, K, dtype=dtype) * 3
    G = torch.randn(M, N, dtype=dtype)
    x = X.clone().requires_grad_()
    Y = layer(x)
    Y.backward(G)
    ours = (Y.detach(), x.grad, layer.weight.grad, layer.bias.grad)
    assert [t.dtype for t in ours] == [dtype] * 4
    exact, plain = reference(kind, X, layer.weight.detach(), layer.bias.detach(), G,
                             layer.bsz, layer.bsz2)
    for name, o, r, p in zip(("Y", "dX", "dW", "dbias"), ours, exact, plain):
        e_plain = (p.double() - r).abs().max().item()
        e_ours = (o.double() - r).abs().max().item()
        assert e_plain > 0 and e_ours <= 2 * e_plain, (name, e_ours, e_plain)


def test_matmul_functions_bnb_signature_and_3d_input():
    torch.manual_seed(3)
    A = torch.randn(2, 5, 64, requires_grad=True)
    W = torch.randn(48, 64, requires_grad=True)
    fw = P.code_tensor("e4m3", "cpu")
    bw = P.code_tensor("e5m2", "cpu")
    y = matmul_fp8_mixed(A, W.t(), fw_code=fw, bw_code=bw, bsz=64, bsz2=64)
    assert y.shape == (2, 5, 48)
    want = torch.from_numpy(ref.matmul_fp8_mixed(_np(A), _np(W.t()), E4M3, E5M2, 64, 64))
    assert ((y.detach() - want).abs().max() <= 2e-5 * want.abs().max())
    y.sum().backward()
    assert A.grad.shape == A.shape and W.grad.shape == W.shape
    y2 = matmul_fp8_global(A.detach(), W.t().detach())
    want2 = torch.from_numpy(ref.matmul_fp8_global(_np(A), _np(W.t()), E4M3))
    assert ((y2 - want2).abs().max() <= 2e-5 * want2.abs().max())
    with pytest.raises(ValueError, match="out="):
        matmul_fp8_mixed(A, W.t(), out=torch.empty(2, 5, 48))
    with pytest.raises(ValueError, match="agree in K"):
        matmul_fp8_global(A, W)
    # a custom codebook (any sorted 256 values) is accepted
    lin = torch.linspace(-1, 1, 256)
    y3 = matmul_fp8_global(A.detach(), W.t().detach(), fw_code=lin)
    assert y3.shape == (2, 5, 48)


def test_state_dict_interchange_and_codes():
    lin = torch.nn.Linear(40, 24)
    for cls in (LinearFP8Mixed, LinearFP8Global):
        layer = cls(40, 24)
        layer.load_state_dict(lin.state_dict(), strict=True)
        assert list(layer.state_dict()) == ["weight", "bias"]
        assert torch.equal(layer.fw_code, torch.from_numpy(E4M3.copy()))
        assert torch.equal(layer.bw_code, torch.from_numpy(E5M2.copy()))
        assert layer.fw_code is layer.fw_code  # one copy per device


def test_empty_input_and_bad_input():
    layer = LinearFP8Mixed(16, 8)
    e = torch.randn(0, 16, requires_grad=True)
    out = layer(e)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(8, 16))
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.randn(3, 17))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 16, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="meta"):
        LinearFP8Global(16, 8, device="meta")(torch.randn(3, 16))


def test_nan_stays_in_its_block_mixed():
    """Mixed scales activations per block of bsz elements: a NaN row poisons only the blocks
    it touches (here bsz = in_features = 64, one row per block); Global has one scale for
    the whole tensor, so every output is NaN. The weight is never modified."""
    torch.manual_seed(4)
    layer = LinearFP8Mixed(64, 32)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 64)
    y0 = layer(x)
    x[3, 7] = float("nan")
    y = layer(x)
    assert torch.isnan(y[3]).all() and torch.equal(y[[0, 1, 2, 4]], y0[[0, 1, 2, 4]])
    assert torch.isnan(LinearFP8Global(64, 32)(x)).all()
    assert torch.equal(layer.weight, w0)


def test_autocast():
    layer = LinearFP8Mixed(32, 16)
    x = torch.randn(4, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32


def test_custom_ops_opcheck():
    torch.manual_seed(5)
    x = torch.randn(6, 70, dtype=torch.float16)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(P.qdq_global, (x, "e4m3"), test_utils=utils)
    torch.library.opcheck(P.qdq_blockwise, (x, "e5m2", 64), test_utils=utils)
    a, sa = P.fp8_rowwise(torch.randn(16, 32), P.E4M3)
    b, sb = P.fp8_rowwise(torch.randn(48, 32), P.E4M3)
    # test_schema compares float8 inputs with a multiply torch's CPU lacks for float8
    torch.library.opcheck(P.fp8_scaled_mm, (a, b, sa, sb, torch.bfloat16),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(6)
    for cls in (LinearFP8Mixed, LinearFP8Global):
        layer = cls(64, 32)
        x = torch.randn(3, 4, 64, requires_grad=True)
        y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        y.square().sum().backward()
        gx, gw = x.grad.clone(), layer.weight.grad.clone()
        x.grad, layer.weight.grad = None, None
        y2 = layer(x)
        y2.square().sum().backward()
        assert torch.equal(y, y2) and torch.equal(gx, x.grad) and torch.equal(gw, layer.weight.grad)


def test_native_needs_fp8_tensor_cores():
    layer = LinearFP8Mixed(32, 16, native=True)
    with pytest.raises(RuntimeError, match=r"compute capability >= 8\.9"):
        layer(torch.randn(4, 32))


def _fp8_value(q, scale):
    return q.double() * scale.double()


@pytest.mark.parametrize("w_rowwise,mem_efficient", [(True, False), (False, False), (False, True)])
def test_native_fp8_math_on_cpu(w_rowwise, mem_efficient):
    """FP8NativeLinearFunction through torch._scaled_mm's CPU kernel: Y and dX equal the
    float64 product of the float8 operands within 2x of plain bf16 torch on them."""
    torch.manual_seed(7)
    M, K, N = 48, 64, 32
    X = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    W = torch.randn(N, K, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(N, dtype=torch.bfloat16, requires_grad=True)
    Y = P.FP8NativeLinearFunction.apply(X, W, b, w_rowwise, mem_efficient)
    G = torch.randn(M, N, dtype=torch.bfloat16)
    Y.backward(G)
    Xq, sX = P.fp8_rowwise(X.detach(), P.E4M3)
    Wq, sW = P.fp8_rowwise(W.detach(), P.E4M3) if w_rowwise else P.fp8_global(W.detach(), P.E4M3)
    Gq, sG = P.fp8_rowwise(G, P.E5M2)
    Wt = W.detach().t()
    WtQ, sWt = P.fp8_rowwise(Wt, P.E4M3) if w_rowwise else P.fp8_global(Wt, P.E4M3)
    x8, w8, g8, wt8 = (_fp8_value(Xq, sX), _fp8_value(Wq, sW), _fp8_value(Gq, sG), _fp8_value(WtQ, sWt))
    exact = (x8 @ w8.t() + b.detach().double(), g8 @ wt8.t())
    bf = lambda t: t.to(torch.bfloat16)
    plain = (bf(x8) @ bf(w8).t() + b.detach(), bf(g8) @ bf(wt8).t())
    for o, r, p in zip((Y.detach(), X.grad), exact, plain):
        e_plain = (p.double() - r).abs().max().item()
        assert (o.double() - r).abs().max().item() <= 2 * e_plain
    Xh = bf(x8) if mem_efficient else X.detach()
    assert torch.equal(W.grad, G.t() @ Xh)
    assert torch.equal(b.grad, G.sum(0))
    # relative to the unquantized product: float8 rounding only
    rel = ((Y.double() - (X.double() @ W.double().t() + b.double())).norm()
           / (X.double() @ W.double().t()).norm()).item()
    assert rel < 0.08


@pytest.mark.parametrize("mem_efficient", [False, True])
def test_native_fp8_weight_grad_on_cpu(mem_efficient):
    """fp8_wgrad: dW = fp8(G^T, e5m2, rows) @ fp8(X^T, e4m3, rows)^T within 2x of plain bf16
    torch on the same float8 operands (against float64); Y and dX are the default path's; a
    token count that is not a multiple of 16 keeps the 16-bit dW."""
    torch.manual_seed(17)
    K, N = 64, 32
    for M, fp8_dw in ((48, True), (40, False)):
        X = torch.randn(M, K, dtype=torch.bfloat16)
        W = torch.randn(N, K, dtype=torch.bfloat16)
        G = torch.randn(M, N, dtype=torch.bfloat16)
        grads = []
        for wgrad in (False, True):
            x, w = X.clone().requires_grad_(), W.clone().requires_grad_()
            Y = P.FP8NativeLinearFunction.apply(x, w, None, True, mem_efficient, wgrad)
            Y.backward(G)
            grads.append((Y.detach(), x.grad, w.grad))
        (Y0, dX0, dW0), (Y1, dX1, dW1) = grads
        assert torch.equal(Y0, Y1) and torch.equal(dX0, dX1)
        if not fp8_dw:
            assert torch.equal(dW1, dW0)
            continue
        GtQ, sGt = P.fp8_rowwise(G.t(), P.E5M2)
        XtQ, sXt = P.fp8_rowwise(X.t(), P.E4M3)   # from X itself, mem_efficient or not
        g8, x8 = _fp8_value(GtQ, sGt), _fp8_value(XtQ, sXt)
        exact = g8 @ x8.t()
        plain = (g8.to(torch.bfloat16) @ x8.to(torch.bfloat16).t()).double()
        e_plain = (plain - exact).abs().max().item()
        assert (dW1.double() - exact).abs().max().item() <= 2 * e_plain
        rel = ((dW1.double() - G.double().t() @ X.double()).norm() / (G.double().t() @ X.double()).norm()).item()
        assert rel < 0.1
    with pytest.raises(ValueError, match="native=True"):
        LinearFP8Mixed(32, 16, fp8_weight_grad=True)


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("code", ["e4m3", "e5m2"])
def test_gpu_qdq_matches_reference(dtype, code):
    torch.manual_seed(8)
    table = {"e4m3": E4M3, "e5m2": E5M2}[code]
    inf = torch.randn(40, 8)
    inf[3, 1] = float("-inf")
    # every midpoint of the codebook exactly (absmax 1): ties go to the lower code
    ties = torch.cat([torch.from_numpy(midpoints(table).copy()), torch.ones(1)]).reshape(-1, 1)
    for x in (torch.randn(1000, 333) * 1e-3, torch.randn(4096, 17) * 1e3, torch.zeros(9, 9), inf,
              ties, torch.randn(3, 5) * 1e-30):
        x = x.to(dtype)
        assert _same(P.qdq_global(x.cuda(), code).cpu(), definition_global(x, table))
        assert _same(P.qdq_blockwise(x.cuda(), code, 1024).cpu(), P.qdq_blockwise(x, code, 1024))
    nan = torch.randn(64, 64, dtype=dtype)
    nan[5, 5] = float("nan")
    assert torch.isnan(P.qdq_global(nan.cuda(), code)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("code", ["e4m3", "e5m2"])
def test_gpu_fused_qdq_blockwise_matches_reference(dtype, code):
    """qdq.cu's qdq_blockwise (the CUDA path of qdq_blockwise) against the NumPy reference, bit
    for bit: every block size, lengths that leave a short last block, blocks of zeros, of tiny
    and huge values, with an Inf or a NaN, the codebook's midpoints (ties), and a view."""
    from qkernels.fp8 import _cupy as K
    g = torch.Generator().manual_seed(10)
    table = {"e4m3": E4M3, "e5m2": E5M2}[code]
    mids = torch.from_numpy(midpoints(table).copy())
    for bs in K.QDQ_BLOCKSIZES:
        n = 3 * bs + 37
        spread = 2.0 if dtype == torch.float16 else 3.0   # float16: stay inside its range
        x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * spread)
        x[:bs] = 0.0                                   # an all-zero block
        x[bs + 5] = float("inf")                       # a block with an infinity
        x[2 * bs: 2 * bs + min(bs, 255)] = mids[:min(bs, 255)]   # ties, absmax 1 ...
        x[2 * bs + bs - 1] = 1.0                       # ... exactly
        if dtype != torch.float16:
            x[-30:] *= 1e-30                           # part of the short block: tiny values
        x[3 * bs + 3] = float("nan") if bs == 64 else x[3 * bs + 3]
        x = x.to(dtype)
        want = torch.from_numpy(ref.qdq_blockwise_f32(_np(x), table, bs)).to(dtype)
        got = P.qdq_blockwise(x.cuda(), code, bs).cpu()
        assert _same(got, want), (bs, (got != want).nonzero()[:5])
    xv = torch.randn(64, 300, dtype=dtype).cuda().t()       # non-contiguous: copied first
    assert _same(P.qdq_blockwise(xv, code, 256).cpu(),
                 torch.from_numpy(ref.qdq_blockwise_f32(_np(xv.cpu().contiguous()), table, 256))
                 .to(dtype).reshape(xv.shape))
    with pytest.raises(ValueError, match="blocksize"):
        K.qdq_blockwise_torch(x.cuda(), *P._tables(code, torch.device("cuda")), 100)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixed", "global"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_layers_against_reference(kind, dtype):
    torch.manual_seed(9)
    M, K, N = 512, 768, 1024
    cls = LinearFP8Mixed if kind == "mixed" else LinearFP8Global
    layer = cls(K, N, dtype=dtype, device="cuda")
    X = torch.randn(M, K, dtype=dtype)
    G = torch.randn(M, N, dtype=dtype)
    x = X.cuda().requires_grad_()
    Y = layer(x)
    Y.backward(G.cuda())
    ours = (Y.detach().cpu(), x.grad.cpu(), layer.weight.grad.cpu(), layer.bias.grad.cpu())
    W, b = layer.weight.detach().cpu(), layer.bias.detach().cpu()
    # plain torch on the GPU: the same dequantized operands through cuBLAS
    exact, plain = reference(kind, X, W, b, G, layer.bsz, layer.bsz2, device="cuda")
    for name, o, r, p in zip(("Y", "dX", "dW", "dbias"), ours, exact, plain):
        e_ours = (o.double() - r).abs().max().item()
        e_plain = (p.double() - r).abs().max().item()
        assert e_plain > 0 and e_ours <= 2 * e_plain, (name, e_ours, e_plain)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_native_layer(dtype):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability >= 8.9")
    torch.manual_seed(10)
    layer = LinearFP8Mixed(1024, 512, native=True, dtype=dtype, device="cuda")
    x = torch.randn(4, 64, 1024, dtype=dtype, device="cuda", requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (4, 64, 512)
    G = torch.randn_like(y)
    y.backward(G)
    W = layer.weight.detach().double()
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()
    assert rel(y, x.detach().double() @ W.t() + layer.bias.detach().double()) < 0.08
    assert rel(x.grad, G.double() @ W) < 0.15
    assert rel(layer.weight.grad, G.double().reshape(-1, 512).t() @ x.detach().double().reshape(-1, 1024)) < 0.01
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x.detach()), y.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_native_fp8_weight_grad(dtype):
    """fp8_weight_grad=True on the GPU: the same forward and input gradient as the default,
    the weight gradient within float8 rounding of the exact product and within 2x of plain
    bf16 torch's error on the same float8 operands."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability >= 8.9")
    torch.manual_seed(18)
    base = LinearFP8Mixed(1024, 512, native=True, dtype=dtype, device="cuda")
    fast = LinearFP8Mixed(1024, 512, native=True, fp8_weight_grad=True, dtype=dtype, device="cuda")
    fast.load_state_dict(base.state_dict())
    x = torch.randn(256, 1024, dtype=dtype, device="cuda")
    G = torch.randn(256, 512, dtype=dtype, device="cuda")
    out = []
    for layer in (base, fast):
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.backward(G)
        out.append((y.detach(), xx.grad, layer.weight.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    # dbias from the fused G quantizer: float32 slabs, as close to the exact sum as G.sum(0)
    exact_db = G.double().sum(0)
    e_fast = (fast.bias.grad.double() - exact_db).abs().max().item()
    e_base = (base.bias.grad.double() - exact_db).abs().max().item()
    assert e_fast <= 2 * e_base + 1e-6 * exact_db.abs().max().item()
    GtQ, sGt = P.fp8_rowwise(G.t(), P.E5M2)
    XtQ, sXt = P.fp8_rowwise(x.t(), P.E4M3)
    g8, x8 = _fp8_value(GtQ, sGt), _fp8_value(XtQ, sXt)
    exact = g8 @ x8.t()
    plain = (g8.to(torch.bfloat16) @ x8.to(torch.bfloat16).t()).double()
    dW = out[1][2].double()
    assert (dW - exact).abs().max().item() <= 2 * (plain - exact).abs().max().item()
    true = G.double().t() @ x.double()
    assert ((dW - true).norm() / true.norm()).item() < 0.1
