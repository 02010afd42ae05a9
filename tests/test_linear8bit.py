"""Linear8bitLt and Int8Params (docs/FORMATS.md §5 and §9): the LLM.int8() forward against its
definition, bitsandbytes checkpoints both ways, memory, training, errors."""
from __future__ import annotations

import copy

import pytest
import torch

from qkernels.int8 import int8_vectorwise_dequant, int8_vectorwise_quant
from qkernels.int8.ops import quantize_weight
from torch_ops.linear8bit import Int8Params, Linear8bitLt

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
IN, OUT = 128, 64

try:
    import bitsandbytes as bnb
except Exception:  # pragma: no cover
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes not importable")


def _linear(dtype=torch.float16, seed=0, in_f=IN, out_f=OUT):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f).to(dtype)


def _ours(linear, threshold=0.0, has_fp16_weights=False, device="cpu"):
    layer = Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=has_fp16_weights,
                         threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)


def _x(dtype, rows=6, seed=1, outlier_col=5):
    torch.manual_seed(seed)
    x = torch.randn(rows, IN).to(dtype)
    if outlier_col is not None:
        x[:, outlier_col] *= 25  # |x| >= 6 in most rows: an outlier column for threshold 6
    return x


def _definition(x, CB, SCB, bias, threshold):
    """docs/FORMATS.md §9's forward in float64, from the int8 codes our quantizer produced."""
    CA, SCA, cols = int8_vectorwise_quant(x, threshold)
    out = (CA.double() @ CB.double().T) * SCA.double()[:, None] * SCB.double()[None, :] / (127 * 127)
    out = out + bias.double()
    if cols is not None and cols.numel():
        w = int8_vectorwise_dequant(CB[:, cols].contiguous(), SCB).double()
        out = out + x[:, cols].double() @ w.T
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_forward_is_the_definition(dtype, threshold):
    """The output is docs/FORMATS.md §9's computation on the int8 codes, rounded once to x's dtype (the
    error against the float64 evaluation is at most one rounding: 2^-8 relative for bf16)."""
    layer = _ours(_linear(), threshold)
    x = _x(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (6, OUT)
    ref = _definition(x, layer.weight.CB, layer.weight.SCB, layer.bias.detach(), threshold)
    eps = {torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8, torch.float32: 2 ** -20}[dtype]
    assert ((y.double() - ref).abs() <= eps * ref.abs() + 1e-6).all()
    if threshold:
        _, _, cols = int8_vectorwise_quant(x, threshold)
        assert 5 in cols.tolist()


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_fp32_bias_with_fp16_input(threshold):
    """bitsandbytes' test_linear_kbit_fp32_bias for Linear8bitLt, our way: a float32 bias
    with float16 input gives a float16 output, the bias added before the one rounding, and
    the bias parameter stays float32 (it keeps float32 gradients). bitsandbytes casts the
    parameter itself to float16 in place on the first forward; docs/FORMATS.md §9 says the
    bias is never modified. Both ways where bitsandbytes imports."""
    layer = _ours(_linear(torch.float32), threshold)
    assert layer.weight.dtype == torch.int8 and layer.bias.dtype == torch.float32
    x = _x(torch.float16)
    for _ in range(3):
        y = layer(x)
        assert y.dtype == torch.float16 and layer.bias.dtype == torch.float32
    ref = _definition(x, layer.weight.CB, layer.weight.SCB, layer.bias.detach(), threshold)
    assert ((y.double() - ref).abs() <= 2 ** -11 * ref.abs() + 1e-6).all()
    x.requires_grad_(True)
    layer(x).float().sum().backward()
    assert layer.bias.grad.dtype == torch.float32
    assert torch.equal(layer.bias.grad, torch.full((OUT,), float(x.shape[0])))
    if bnb is not None:
        theirs = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=threshold)
        theirs.load_state_dict(_linear(torch.float32).state_dict())
        theirs = theirs.to("cpu")
        theirs(x.detach())
        assert theirs.bias.dtype == torch.float16


def test_outlier_decomposition_is_more_accurate():
    lin = _linear(torch.float32)
    x = _x(torch.float32)
    exact = x.double() @ lin.weight.double().T + lin.bias.double()
    err = {t: (_ours(lin, t)(x).double() - exact).abs().max().item() for t in (0.0, 6.0)}
    assert err[6.0] < err[0.0] / 2


def test_input_gradient_inference_mode():
    """has_fp16_weights=False: dx = dout @ (CB * SCB / 127), within 2x of torch's own rounding."""
    layer = _ours(_linear(torch.float16), 6.0)
    x = _x(torch.float16).requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    w = int8_vectorwise_dequant(layer.weight.CB, layer.weight.SCB)
    ref = g.double() @ w.double()
    assert (x.grad.double() - ref).abs().max() <= 2 * ((g @ w.half()).double() - ref).abs().max()
    assert layer.weight.grad is None and layer.bias.grad is not None


def test_training_weight_gradient_and_refresh():
    """has_fp16_weights=True: dW is the int8 product, close to dout^T @ x (quantization error
    of two 8-bit factors: a few percent in norm), and the int8 copy follows weight updates."""
    lin = _linear(torch.float32, seed=2)
    layer = _ours(lin, 6.0, has_fp16_weights=True)
    x = _x(torch.float32, rows=64)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref = g.double().T @ x.double()
    assert ((layer.weight.grad.double() - ref).norm() / ref.norm()).item() < 0.03
    y0 = layer(x).detach()
    with torch.no_grad():
        layer.weight.mul_(2)
    layer.eval()
    assert not torch.equal(layer(x), y0)  # no stale int8 copy (bnb's eval-mode bug)


def test_memory_inference():
    layer = _ours(_linear(torch.float16, in_f=1024, out_f=512))
    assert layer.quantized_bytes() / (1024 * 512) <= 1.01
    assert layer.weight.dtype == torch.int8 and layer.weight.CB.data_ptr() == layer.weight.data_ptr()


def test_quantized_on_move_and_moves_keep_codes():
    layer = Linear8bitLt(IN, OUT, has_fp16_weights=False)
    with pytest.raises(RuntimeError, match="not quantized yet"):
        layer(torch.randn(1, IN))
    layer.load_state_dict(_linear().state_dict())
    layer.to("cpu")
    CB, SCB = layer.weight.CB.clone(), layer.weight.SCB.clone()
    weight = layer.weight
    layer.cpu().half().to(torch.float32)
    assert layer.weight is weight and torch.equal(layer.weight.CB, CB) and torch.equal(layer.weight.SCB, SCB)
    clone = copy.deepcopy(layer)
    assert isinstance(clone.weight, Int8Params) and torch.equal(clone(_x(torch.float16)), layer(_x(torch.float16)))
    rebuilt = Int8Params(layer.weight.data, **layer.weight.__dict__)
    assert rebuilt.SCB is layer.weight.SCB and rebuilt.quantized


# --- bitsandbytes interchange ----------------------------------------------------------------

def _bnb_layer(linear, threshold):
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False,
                                threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


@needs_bnb
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_bnb_checkpoint_loads_here(threshold):
    """bnb's int8 checkpoint loads strictly into a fresh layer (bnb itself refuses that),
    keeps its exact CB/SCB, and reproduces bnb's eval-mode output within 1 fp16 ulp (bnb-CPU's
    dequantization constant differs by 1.8e-5 relative, docs/FORMATS.md §13.11)."""
    lin = _linear(seed=3)
    b = _bnb_layer(lin, threshold).eval()
    sd = b.state_dict()
    assert set(sd) == {"weight", "bias", "SCB", "weight_format"}
    ours = Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=threshold)
    ours.load_state_dict(sd, strict=True)
    assert torch.equal(ours.weight.CB, sd["weight"]) and torch.equal(ours.weight.SCB, sd["SCB"])
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = _x(torch.float16)
    with torch.no_grad():
        yb, yo = b(x), ours(x)
    ulp = torch.finfo(torch.float16).eps * yb.float().abs().clamp(min=2 ** -14)
    assert ((yb.float() - yo.float()).abs() <= 1.01 * ulp + 1e-3 * threshold).all()


@needs_bnb
def test_our_checkpoint_loads_in_bnb(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    load_file, save_file = st.load_file, st.save_file
    lin = _linear(seed=4)
    ours = _ours(lin)
    save_file(ours.state_dict(), tmp_path / "int8.safetensors")
    sd = load_file(tmp_path / "int8.safetensors")
    b = _bnb_layer(_linear(seed=99), 0.0)  # bnb loads only into an already-quantized layer
    b.load_state_dict(sd)
    assert torch.equal(b.weight.data, ours.weight.CB) and torch.equal(b.weight.SCB, ours.weight.SCB)
    x = _x(torch.float16, outlier_col=None)
    with torch.no_grad():
        yb, yo = b.eval()(x), ours(x)
    ulp = torch.finfo(torch.float16).eps * yb.float().abs().clamp(min=2 ** -14)
    assert ((yb.float() - yo.float()).abs() <= 1.01 * ulp).all()
    fresh = Linear8bitLt(IN, OUT, has_fp16_weights=False)
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh(x), yo)


# --- bad input ----------------------------------------------------------------------------

def _unchanged_after(layer, sd, match, exc=RuntimeError):
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(exc, match=match):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_load_errors_name_the_key_and_change_nothing():
    sd = _ours(_linear(seed=5)).state_dict()
    target = _ours(_linear(seed=6))
    no_scb = {k: v for k, v in sd.items() if k != "SCB"}
    _unchanged_after(target, no_scb, "SCB")
    _unchanged_after(Linear8bitLt(IN, OUT, has_fp16_weights=False), no_scb, "SCB")
    _unchanged_after(_ours(_linear(seed=6, in_f=IN + 64)), sd, "weight: size mismatch")
    bad_scb = dict(sd, SCB=torch.ones(OUT + 1))
    _unchanged_after(target, bad_scb, "SCB")
    _unchanged_after(target, dict(sd, weight_format=torch.tensor(1, dtype=torch.uint8)),
                     "weight_format", ValueError)
    _unchanged_after(target, dict(sd, weight_format="col_turing"), "weight_format", ValueError)
    target.load_state_dict(dict(sd, weight_format="row"))  # accepted, as is a missing key
    target.load_state_dict({k: v for k, v in sd.items() if k != "weight_format"})


def test_bad_arguments_and_frozen_weight():
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(IN, OUT, threshold=-1.0)
    layer = _ours(_linear(seed=7))
    with pytest.raises(ValueError, match="in_features=128"):
        layer(torch.randn(2, IN - 1, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="frozen"):
        layer.weight.requires_grad_(True)


# --- bitsandbytes' attributes: state, has_fp16_weights, tied weights ------------------------

def test_state_and_has_fp16_weights_attributes():
    """``layer.state`` is bitsandbytes' MatmulLtState of the layer (tests/test_matmul_lt.py has
    the rest); ``weight.has_fp16_weights`` reads on the weight."""
    from qkernels.int8.matmul_lt import MatmulLtState
    layer = _ours(_linear(), 6.0)
    assert isinstance(layer.state, MatmulLtState) and layer.state.CB is layer.weight.CB
    assert layer.weight.has_fp16_weights is False and layer.state.has_fp16_weights is False
    fp = Linear8bitLt(IN, OUT)  # bitsandbytes' default: has_fp16_weights=True
    assert fp.weight.has_fp16_weights is True and fp.state.has_fp16_weights is True
    assert fp.state.CB is None  # its int8 copy exists once a forward made it
    fp(_x(torch.float32))
    assert fp.state.CB.dtype == torch.int8


def _tied():
    layer = Linear8bitLt(IN, OUT, bias=False, has_fp16_weights=False)
    torch.manual_seed(12)
    layer.weight = torch.nn.Parameter(torch.randn(OUT, IN) / 8)  # e.g. lm_head tied to an embedding
    return layer


def test_tied_weight_forward_and_state_dict():
    """A plain float Parameter as the weight (a tied weight, bitsandbytes #1634): the layer
    computes with its int8 copy like has_fp16_weights=True, stays tied, and saves as
    nn.Linear (no SCB, no weight_format; bitsandbytes skips them too)."""
    layer = _tied()
    assert layer.has_fp16_weights and layer.state.has_fp16_weights
    x = _x(torch.float32, outlier_col=None).requires_grad_()
    y = layer(x)
    CB, SCB = quantize_weight(layer.weight)
    assert torch.equal(y, torch.ops.qkernels.int8_linear(x.detach(), CB, SCB, None, 0.0))
    y.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    assert type(layer.weight) is torch.nn.Parameter
    sd = layer.state_dict()
    assert set(sd) == {"weight"} and sd["weight"].dtype == torch.float32
    assert layer.quantized_bytes() == OUT * IN * 4


def test_tied_weight_refuses_an_int8_checkpoint():
    """Loading a checkpoint with SCB into a tied (plain float) weight raises bitsandbytes'
    RuntimeError, also with strict=False, and changes nothing; a float one loads."""
    layer = _tied()
    before = layer.weight.detach().clone()
    sd = dict(layer.state_dict(), SCB=torch.ones(OUT))
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="Loading a quantized checkpoint into non-quantized Linear8bitLt"):
            layer.load_state_dict(sd, strict=strict)
    assert torch.equal(layer.weight, before)
    layer.load_state_dict({"weight": before * 2})
    assert torch.equal(layer.weight, before * 2) and type(layer.weight) is torch.nn.Parameter


def test_fresh_layer_loads_int8_checkpoint_unlike_bitsandbytes():
    """bitsandbytes' test_linear_serialization expects a RuntimeError when an int8 state_dict
    is loaded into a layer that was not moved yet; docs/FORMATS.md §9 (and bitsandbytes #1946) make that
    load work here: the codes load as they are and the layer gives the saved layer's output.
    Both ways: bitsandbytes refuses, ours loads."""
    src = _ours(_linear(seed=13), 6.0)
    x = _x(torch.float16)
    fresh = Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=6.0)
    fresh.load_state_dict(src.state_dict(), strict=True)
    assert torch.equal(fresh.to("cpu")(x), src(x))
    if bnb is not None:
        theirs = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=6.0)
        with pytest.raises(RuntimeError, match="non-quantized"):
            theirs.load_state_dict(src.state_dict(), strict=True)


def test_fp16_weights_training_follows_float_training():
    """Linear8bitLt(has_fp16_weights=True) trains as bitsandbytes' does: the float weight gets
    int8 gradients (docs/FORMATS.md §9: a few percent from G^T X in norm) and an optimizer's updates are
    seen by the next forward. Against nn.Linear with the same optimizer, after 10 steps."""
    torch.manual_seed(14)
    ref = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 32))
    ours = torch.nn.Sequential(Linear8bitLt(32, 32), Linear8bitLt(32, 32))
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(10):
        x = torch.randn(64, 32)
        for net, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert ((b.grad - a.grad).norm() / a.grad.norm()).item() < 0.05
        opt_ref.step()
        opt_ours.step()
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert ((b - a).norm() / a.norm()).item() < 0.01
    assert isinstance(ours[0].weight, Int8Params) and ours[0].weight.dtype == torch.float32


@pytest.mark.parametrize("has_fp16_weights", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_compile_with_activation_checkpointing(has_fp16_weights, threshold):
    """torch.compile of Linear8bitLt layers under activation checkpointing (CPU): the eager
    outputs and gradients, exactly."""
    from torch.utils.checkpoint import checkpoint
    torch._dynamo.reset()
    torch.manual_seed(15)
    net = torch.nn.Sequential(*[Linear8bitLt(64, 64, has_fp16_weights=has_fp16_weights, threshold=threshold)
                                for _ in range(2)]).to("cpu")
    run = lambda x: checkpoint(net, x, use_reentrant=False)  # noqa: E731
    x = torch.randn(8, 64, dtype=torch.float16)
    x[:, 3] *= 20
    x.requires_grad_(True)
    ref = run(x)
    ref.float().sum().backward()
    ref_grads = [t.grad.clone() for t in [x, *net.parameters()] if t.grad is not None]
    x.grad = None
    net.zero_grad()
    out = torch.compile(run)(x)
    out.float().sum().backward()
    grads = [t.grad for t in [x, *net.parameters()] if t.grad is not None]
    assert torch.equal(out, ref) and len(grads) == len(ref_grads) == (5 if has_fp16_weights else 3)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


# --- GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_gpu_forward_matches_cpu(dtype, threshold, rows):
    """CUDA (fused int8 GEMM + epilogue) gives the CPU reference's output: same codes, same
    float32 epilogue; only the outlier matmul (cuBLAS vs NumPy order) may differ in the
    last bits."""
    lin = _linear(dtype, seed=8, in_f=512, out_f=384)
    cpu = _ours(lin, threshold)
    gpu = copy.deepcopy(cpu).cuda()
    assert gpu.weight.CB.is_cuda and gpu.weight.SCB.is_cuda
    torch.manual_seed(9)
    x = torch.randn(rows, 512).to(dtype)
    x[:, 7] *= 25
    y_cpu, y_gpu = cpu(x), gpu(x.cuda()).cpu()
    if threshold == 0.0:
        assert torch.equal(y_cpu, y_gpu)
    else:
        assert torch.allclose(y_cpu.float(), y_gpu.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    xg = x.cuda().requires_grad_()
    gpu(xg).sum().backward()
    assert xg.grad.shape == xg.shape


@pytest.mark.gpu
@needs_bnb
def test_gpu_bnb_interchange():
    lin = _linear(seed=10, in_f=1024, out_f=512)
    b = bnb.nn.Linear8bitLt(1024, 512, has_fp16_weights=False, threshold=6.0)
    b.load_state_dict(lin.state_dict())
    b = b.cuda().eval()
    ours = Linear8bitLt(1024, 512, has_fp16_weights=False, threshold=6.0, device="cuda")
    ours.load_state_dict(b.state_dict(), strict=True)
    torch.manual_seed(11)
    x = torch.randn(8, 1024, dtype=torch.float16, device="cuda")
    x[:, 3] *= 25
    with torch.no_grad():
        yb, yo = b(x), ours(x)
    assert torch.allclose(yb.float(), yo.float(), rtol=2e-3, atol=2e-2)


def _reference_forward(x, CB, SCB, bias):
    """The threshold-0 forward on CPU through the NumPy oracle (docs/FORMATS.md §5)."""
    from qkernels.int8 import int8_linear_matmul, int8_mm_dequant
    CA, SCA, _ = int8_vectorwise_quant(x, 0.0)
    out_dtype = str(x.dtype).replace("torch.", "")
    return int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias, out_dtype=out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,in_f,out_f", [(1, 4096, 96), (3, 520, 67), (16, 203, 130),
                                             (7, 64, 1), (16, 4096, 64)])
@pytest.mark.parametrize("kernel", [None, "gemv_staged", "gemv_dp4a", "gemv_mma"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, "x"])
def test_gpu_small_batch_gemv_is_the_reference(dtype, rows, in_f, out_f, kernel, bias_dtype):
    """The fused small-batch kernels (qkernels/int8/gemv.cu: dp4a in both launch forms, and
    the tensor-core form; None: the one kernel_choice takes) give the reference path's bits:
    same codes, exact int32 sums, the same float32 epilogue. Odd K (byte loads), odd N, a
    zero row (codes 0) and a row holding Inf (NaN outputs) included."""
    from qkernels.int8 import _cupy_gemv
    from qkernels.int8.ops import int8_linear_small_batch
    if kernel == "gemv_staged" and rows * -(-in_f // 16) * 16 > 46 * 1024:
        pytest.skip("x too large to stage in shared memory")
    if kernel == "gemv_mma" and in_f % 16:
        pytest.skip("the tensor-core form needs K % 16 == 0 (the dispatch sends the rest to dp4a)")
    torch.manual_seed(rows * 1000 + in_f + out_f)
    W = torch.randn(out_f, in_f, dtype=torch.float16)
    CB, SCB, _ = int8_vectorwise_quant(W, 0.0)
    x = (torch.randn(rows, in_f) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)
    if rows >= 3:
        x[1] = 0
        x[2, in_f // 2] = float("inf")
    bias = None
    if bias_dtype is not None:
        bias = torch.randn(out_f).to(dtype if bias_dtype == "x" else bias_dtype)
    ref = _reference_forward(x, CB, SCB, bias)
    xg, CBg, SCBg = x.cuda(), CB.cuda(), SCB.cuda()
    bg = None if bias is None else bias.cuda()
    assert _cupy_gemv.gemv_ok(xg, CBg, SCBg, bg)
    got = _cupy_gemv.int8_linear_gemv_torch(xg, CBg, SCBg, bg, kernel=kernel).cpu()
    assert got.dtype == dtype and got.shape == (rows, out_f)
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    if kernel is None:  # the layer's dispatch takes this kernel
        via_layer = int8_linear_small_batch(xg, CBg, SCBg, bg)
        assert via_layer is not None
        torch.testing.assert_close(via_layer.cpu(), ref, rtol=0, atol=0, equal_nan=True)


def _outlier_x(rows, in_f, n_outliers, dtype, seed):
    """x (rows, in_f) with ``n_outliers`` columns scaled past 6 (|x| >= 6 in most of their rows),
    a zero row and, from 3 rows, one large in-range value."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g)
    cols = torch.randperm(in_f, generator=g)[:n_outliers]
    x[:, cols] *= 30
    if rows >= 3:
        x[1] = 0
        x[2, 0] = 5.5
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,in_f,out_f,n_outliers", [
    (1, 512, 384, 3), (3, 256, 67, 0), (5, 1024, 130, 40), (16, 512, 96, 17),
    (17, 512, 384, 3), (300, 512, 257, 40), (700, 1024, 1000, 300), (129, 256, 512, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_gpu_fused_outliers_are_the_definition(dtype, rows, in_f, out_f, n_outliers, bias):
    """threshold 6, CUDA, K % 16 == 0: the fused sync-free forward (outlier product in the
    GEMV's or the Hopper GEMM's epilogue) is docs/FORMATS.md §9's computation on the same int8 codes,
    rounded once: |y - ref| <= eps |ref| + 2^-20 * (the same sum over absolute values), the
    second term bounding the float32 sums. Covers the small-batch kernels (<= 16 rows, dp4a and
    tensor-core), one and several 16-column chunks of outliers (up to 300), none, rows and
    columns that do not fill a tile, with and without bias."""
    from qkernels.int8.ops import int8_linear_outliers
    from qkernels.int8 import _choice
    torch.manual_seed(rows + in_f + out_f)
    lin = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    x = _outlier_x(rows, in_f, n_outliers, dtype, seed=rows)
    CB, SCB, _ = int8_vectorwise_quant(lin.weight.detach().half(), 0.0)
    b = None if lin.bias is None else lin.bias.detach()
    if rows > 16 and not _choice._is_sm90(0):
        pytest.skip("the fused form above 16 rows is the Hopper GEMM's")
    got = int8_linear_outliers(x.cuda(), CB.cuda(), SCB.cuda(), None if b is None else b.cuda(), 6.0)
    assert got is not None, "the fused form must take K % 16 == 0"
    y, idx, count = got
    CA, SCA, cols = int8_vectorwise_quant(x, 6.0)
    assert int(count.item()) == cols.numel() and torch.equal(idx[:cols.numel()].cpu(), cols)
    ref = _definition(x, CB, SCB, torch.zeros(out_f) if b is None else b, 6.0)
    w = int8_vectorwise_dequant(CB, SCB).double()
    mag = (CA.double().abs() @ CB.double().abs().T) * SCA.double()[:, None] * SCB.double()[None, :] / 127 ** 2
    mag = mag + x[:, cols].double().abs() @ w[:, cols].abs().T + (0 if b is None else b.double().abs())
    eps = {torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8, torch.float32: 2 ** -24}[dtype]
    err = (y.cpu().double() - ref).abs()
    assert y.dtype == dtype and (err <= eps * ref.abs() + 2 ** -20 * mag + 1e-30).all(), err.max()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 1024])
def test_gpu_threshold_forward_is_graph_safe(rows):
    """The threshold path has no host synchronization: it captures in a CUDA graph, and the
    replay with new inputs (new outlier columns) gives the eager result; training through the
    fused forward reads the outlier columns only in backward."""
    from qkernels.int8 import _choice
    if rows > 16 and not _choice._is_sm90(0):
        pytest.skip("the fused form above 16 rows is the Hopper GEMM's")
    layer = _ours(_linear(torch.float16, seed=12, in_f=512, out_f=256), 6.0, device="cuda")
    static_x = _outlier_x(rows, 512, 5, torch.float16, seed=1).cuda()
    with torch.no_grad():
        layer(static_x)  # compile the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        new = _outlier_x(rows, 512, 9, torch.float16, seed=2).cuda()
        static_x.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, layer(new))
    train = _ours(_linear(torch.float32, seed=2, in_f=512, out_f=256), 6.0, has_fp16_weights=True)
    x = _outlier_x(64, 512, 5, torch.float32, seed=3)
    cpu_y = train(x)
    cpu_y.backward(torch.ones_like(cpu_y))
    gpu = copy.deepcopy(train).cuda()
    gpu.zero_grad()
    gpu_y = gpu(x.cuda())
    gpu_y.backward(torch.ones_like(gpu_y))
    assert torch.allclose(gpu_y.cpu(), cpu_y, rtol=1e-5, atol=1e-4)
    assert torch.allclose(gpu.weight.grad.cpu(), train.weight.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 64, 300])
def test_gpu_state_idx_records_the_outlier_columns(rows):
    """bitsandbytes' ``state.idx`` after a threshold forward on CUDA: the fused small-batch
    kernels and the large-batch route keep the columns on the device (no synchronization in
    the forward); reading ``state.idx`` gives them, ascending, for the last input."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    layer = Linear8bitLt(64, 48, has_fp16_weights=False, threshold=6.0).cuda()
    x = torch.randn(rows, 64, device="cuda", dtype=torch.float16)
    x[rows // 2, 41] = 9.0
    x[0, 3] = -12.0
    with torch.no_grad():
        layer(x)
    assert layer.state.idx.tolist() == [3, 41]
    with torch.no_grad():
        layer(torch.randn(rows, 64, device="cuda", dtype=torch.float16).clamp(-5, 5))
    assert layer.state.idx.numel() == 0
