"""matmul_4bit as bitsandbytes' top-level differentiable function (issue 23):
``matmul_4bit(A, B, quant_state, out=None, bias=None)`` and qkernels' ``matmul_4bit(x, packed,
state, bias=None)`` in one function (qkernels.matmul_4bit = torch_ops.matmul_4bit).

Gradients reach A and bias (none the packed weight), checked against float64 products of the
dequantized weight: our error is at most 2x that of the same product done by plain torch in
the input's dtype. Also: an empty batch, bitsandbytes' ``weight.t()`` and transposed-weight
forms, ``out=``, the argument forms of both orders, NumPy callers unchanged, torch.compile.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qkernels
import torch_ops
from qkernels.fourbit import dequantize_4bit, matmul_4bit, quantize_4bit
from reference import fourbit as ref4

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
K, N = 128, 96


def _weight(quant_type="nf4", nested=False, shape=(N, K), dtype=torch.float32, seed=0, device="cpu"):
    """(packed, state, W float32 = the dequantized values) of a random weight."""
    torch.manual_seed(seed)
    w = (torch.randn(shape) * 0.05).to(dtype).to(device)
    packed, state = quantize_4bit(w, quant_type=quant_type, compress_statistics=nested)
    return packed, state, dequantize_4bit(packed, state, out_dtype=torch.float32)


def _err(a, ref):
    return (a.double() - ref).abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type,nested", [("nf4", False), ("nf4", True), ("fp4", True)])
@pytest.mark.parametrize("form", ["packed", "bnb_t"])
@pytest.mark.parametrize("lead", [(7,), (2, 3)])
def test_gradients_to_A_and_bias(dtype, quant_type, nested, form, lead):
    packed, state, w = _weight(quant_type, nested)
    B = packed if form == "packed" else packed.t()  # bitsandbytes passes weight.t(): (1, n/2)
    torch.manual_seed(1)
    x = torch.randn(*lead, K, dtype=dtype, requires_grad=True)
    bias = torch.randn(N, dtype=dtype, requires_grad=True)
    y = matmul_4bit(x, B, state, bias=bias)
    assert y.dtype == dtype and y.shape == (*lead, N) and y.requires_grad

    xd, wd, bd = x.detach().double(), w.double(), bias.detach().double()
    y_ref = xd @ wd.T + bd
    plain_y = torch.nn.functional.linear(x.detach(), w.to(dtype), bias.detach())
    assert _err(y.detach(), y_ref) <= 2 * _err(plain_y, y_ref) + 1e-12

    g = torch.randn_like(y)
    y.backward(g)
    gx_ref = g.double() @ wd
    assert _err(x.grad, gx_ref) <= 2 * _err(g @ w.to(dtype), gx_ref) + 1e-12
    gb_ref = g.double().reshape(-1, N).sum(0)
    assert _err(bias.grad, gb_ref) <= 2 * _err(g.reshape(-1, N).sum(0), gb_ref) + 1e-12
    assert x.grad.dtype == dtype and bias.grad.dtype == dtype


def test_gradient_to_A_only_and_to_bias_only():
    packed, state, w = _weight()
    x = torch.randn(4, K, requires_grad=True)
    matmul_4bit(x, packed, state).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, N) @ w)
    xs = torch.randn(4, K)
    bias = torch.zeros(N, requires_grad=True)
    y = matmul_4bit(xs, packed, state, bias=bias)
    y.sum().backward()
    assert torch.equal(bias.grad, torch.full((N,), 4.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_grad_and_grad_paths_agree(dtype):
    """The autograd route (the declared op) computes the same numbers as the direct one."""
    packed, state, _ = _weight(nested=True)
    x = torch.randn(5, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    with torch.no_grad():
        direct = matmul_4bit(x, packed, state, bias=bias)
    routed = matmul_4bit(x.clone().requires_grad_(), packed, state, bias=bias)
    assert routed.grad_fn is not None and direct.grad_fn is None
    assert torch.equal(direct, routed.detach())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transposed", [False, True])
def test_empty_batch(dtype, transposed):
    """0 rows: a (0, N) result, and gradients of the right shapes (zero for the bias)."""
    packed, state, _ = _weight(shape=(K, N) if transposed else (N, K))
    x = torch.randn(0, K, dtype=dtype, requires_grad=True)
    bias = torch.randn(N, dtype=dtype, requires_grad=True)
    with pytest.warns(DeprecationWarning) if transposed else _no_warning():
        y = matmul_4bit(x, packed, state, bias=bias)
    assert y.shape == (0, N) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == (0, K) and torch.equal(bias.grad, torch.zeros(N, dtype=dtype))
    with torch.no_grad(), pytest.warns(DeprecationWarning) if transposed else _no_warning():
        assert matmul_4bit(x, packed, state, bias=bias).shape == (0, N)


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", DeprecationWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_weight_warns_and_differentiates(dtype):
    """A weight quantized as (in, out) (bitsandbytes' deprecated orientation): x @ W + bias,
    with a DeprecationWarning; gradients as for the normal orientation."""
    packed, state, w = _weight(shape=(K, N))  # w: (K, N)
    x = torch.randn(6, K, dtype=dtype, requires_grad=True)
    bias = torch.randn(N, dtype=dtype, requires_grad=True)
    with pytest.warns(DeprecationWarning, match="transposed"):
        y = matmul_4bit(x, packed, state, bias=bias)
    y_ref = x.detach().double() @ w.double() + bias.detach().double()
    plain_y = torch.nn.functional.linear(x.detach(), w.to(dtype).T, bias.detach())
    assert _err(y.detach(), y_ref) <= 2 * _err(plain_y, y_ref) + 1e-12
    g = torch.randn_like(y)
    y.backward(g)
    gx_ref = g.double() @ w.double().T
    assert _err(x.grad, gx_ref) <= 2 * _err(g @ w.to(dtype).T, gx_ref) + 1e-12
    torch.testing.assert_close(bias.grad.double(), g.double().sum(0), rtol=1e-2, atol=1e-2)


def test_out_argument():
    packed, state, _ = _weight()
    x = torch.randn(3, K)
    bias = torch.randn(N)
    expected = matmul_4bit(x, packed, state, bias=bias)
    out = torch.zeros(3, N)
    got = matmul_4bit(x, packed, state, out=out, bias=bias)
    assert got is out and torch.equal(out, expected)
    # with gradients: out holds the result and the graph runs through it
    xg = x.clone().requires_grad_()
    out = torch.zeros(3, N)
    got = matmul_4bit(xg, packed, state, out=out)
    assert got is out and got.grad_fn is not None
    got.sum().backward()
    assert xg.grad.shape == (3, K)
    # NumPy
    xn, pn, sn = x.numpy(), packed.numpy(), _numpy_state(state)
    outn = np.zeros((3, N), np.float32)
    assert matmul_4bit(xn, pn, sn, out=outn) is outn
    assert np.array_equal(outn, matmul_4bit(xn, pn, sn))
    with pytest.raises(ValueError, match="out must have the result's shape"):
        matmul_4bit(x, packed, state, out=torch.zeros(3, N + 1))
    with pytest.raises(TypeError, match="out must be a torch array"):
        matmul_4bit(x, packed, state, out=np.zeros((3, N), np.float32))


def _numpy_state(state):
    from reference.state import QuantState
    return QuantState(absmax=state.absmax.numpy(), shape=state.shape, code=state.code.numpy(),
                      dtype=str(state.dtype).replace("torch.", ""), blocksize=state.blocksize,
                      quant_type=state.quant_type)


def test_argument_forms_of_both_orders():
    """bitsandbytes' (A, B, quant_state, out, bias) and qkernels' (x, packed, state, bias)."""
    packed, state, _ = _weight()
    x = torch.randn(3, K)
    bias = torch.randn(N)
    ref = matmul_4bit(x, packed, state, bias=bias)
    assert torch.equal(matmul_4bit(x, packed, state, bias), ref)  # qkernels' positional bias
    out = torch.empty(3, N)
    assert matmul_4bit(x, packed, state, out) is out  # bitsandbytes' positional out
    assert torch.equal(out, matmul_4bit(x, packed, state))
    out = torch.empty(3, N)
    assert matmul_4bit(x, packed, state, out, bias) is out and torch.equal(out, ref)
    assert torch.equal(matmul_4bit(x, packed, state, None, bias), ref)
    assert torch.equal(matmul_4bit(x, packed, quant_state=state, bias=bias), ref)
    assert torch.equal(matmul_4bit(x, packed, state=state, bias=bias), ref)
    x1 = x[0]
    torch.testing.assert_close(matmul_4bit(x1, packed, state, bias=bias), ref[0])
    with pytest.raises(TypeError, match="ambiguous"):  # a 1-D A: out and bias are both (N,)
        matmul_4bit(x1, packed, state, bias)
    with pytest.raises(TypeError, match="not both"):
        matmul_4bit(x, packed, state, bias, bias=bias)
    with pytest.raises(TypeError, match="at most 5 positional"):
        matmul_4bit(x, packed, state, None, bias, None)
    with pytest.raises(TypeError, match="both quant_state and state"):
        matmul_4bit(x, packed, state, state=state)
    with pytest.raises(ValueError, match="quant_state is required"):
        matmul_4bit(x, packed, None)


def test_one_function_behind_every_name():
    assert torch_ops.matmul_4bit is qkernels.matmul_4bit is matmul_4bit
    from torch_ops.linear4bit import matmul_4bit as from_layers
    assert from_layers is matmul_4bit


def test_numpy_callers_unchanged():
    """NumPy in, NumPy out, positional bias as before; the reference's numbers within its
    float64-bounded tolerance (the CPU backend's fused few-row kernel sums in another order)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    packed, state = quantize_4bit(w, quant_type="nf4")
    x = rng.standard_normal((4, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    got = matmul_4bit(x, packed, state, bias)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    wd = ref4.dequantize_4bit(packed, state, out_dtype="float32").astype(np.float64)
    exact = x.astype(np.float64) @ wd.T + bias
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(wd).T + np.abs(bias)
    assert np.all(np.abs(got - exact) <= 1e-6 * K * magnitude)
    assert np.all(np.abs(ref4.matmul_4bit(x, packed, state, bias) - exact) <= 1e-6 * K * magnitude)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear4bit_weight_in_bitsandbytes_form(dtype):
    """bitsandbytes' Linear4bit calls matmul_4bit(x, weight.t(), weight.quant_state, bias=b)
    with the Params4bit itself: the same output and input gradient as our layer."""
    layer = torch_ops.LinearNF4(K, N, compute_dtype=dtype).to("cpu")
    w = layer.weight
    x = torch.randn(5, K, dtype=dtype, requires_grad=True)
    y = matmul_4bit(x, w.t(), w.quant_state, bias=layer.bias.to(dtype))
    x2 = x.detach().clone().requires_grad_()
    y2 = layer(x2)
    assert torch.equal(y.detach(), y2.detach())
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    assert torch.equal(x.grad, x2.grad)


def test_under_torch_compile():
    packed, state, _ = _weight(nested=True)

    def f(x, bias):
        return torch.relu(qkernels.matmul_4bit(x, packed, state, bias=bias))

    torch.compiler.reset()
    compiled = torch.compile(f, backend="inductor")
    x = torch.randn(4, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    y_eager = f(x, bias)
    y_eager.sum().backward()
    gx, gb = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    y = compiled(x, bias)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(bias.grad, gb)


# --- GPU (the lead runs these on the H100) ---------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 8, 64])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("form", ["packed", "bnb_t"])
def test_gpu_gradients_to_A_and_bias(dtype, rows, nested, form):
    """CUDA: the fused kernel (rows <= 8) and dequantize + cuBLAS, through the declared op:
    output and gradients under the same 2x rule as on the CPU; an empty batch."""
    packed, state, w = _weight("nf4", nested, device="cuda")
    B = packed if form == "packed" else packed.t()
    x = torch.randn(rows, K, dtype=dtype, device="cuda", requires_grad=True)
    bias = torch.randn(N, dtype=dtype, device="cuda", requires_grad=True)
    y = matmul_4bit(x, B, state, bias=bias)
    assert y.shape == (rows, N) and y.dtype == dtype and y.requires_grad
    with torch.no_grad():
        assert torch.equal(y.detach(), matmul_4bit(x, B, state, bias=bias))
    g = torch.randn_like(y)
    y.backward(g)
    if rows == 0:
        assert x.grad.shape == (0, K) and torch.equal(bias.grad, torch.zeros_like(bias))
        return
    xd, wd, bd = x.detach().double(), w.double(), bias.detach().double()
    y_ref = xd @ wd.T + bd
    plain_y = torch.nn.functional.linear(x.detach(), w.to(dtype), bias.detach())
    assert _err(y.detach(), y_ref) <= 2 * _err(plain_y, y_ref) + 1e-12
    gx_ref = g.double() @ wd
    assert _err(x.grad, gx_ref) <= 2 * _err(g @ w.to(dtype), gx_ref) + 1e-12
    gb_ref = g.double().sum(0)
    assert _err(bias.grad, gb_ref) <= 2 * _err(g.sum(0), gb_ref) + 1e-12


@pytest.mark.gpu
def test_gpu_transposed_weight_and_out():
    packed, state, w = _weight(shape=(K, N), device="cuda")
    x = torch.randn(4, K, device="cuda", requires_grad=True)
    out = torch.empty(4, N, device="cuda")
    with pytest.warns(DeprecationWarning):
        y = matmul_4bit(x, packed, state, out=out)
    assert y is out
    torch.testing.assert_close(y, x.detach() @ w)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(4, N, device="cuda") @ w.T)
