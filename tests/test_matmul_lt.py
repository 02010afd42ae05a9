"""bitsandbytes' LLM.int8() autograd API (qkernels/int8/matmul_lt.py): ``MatmulLtState`` and
``matmul(A, B, out=None, state=None, threshold=0.0, bias=None)``, and ``Linear8bitLt.state``.

The forward is checked bit for bit against the declared op ``qkernels::int8_linear`` (the
layer's forward, itself checked against docs/FORMATS.md §9 in test_linear8bit.py); gradients against a
float64 evaluation with the project's rule (at most 2x the error of plain torch in the same
precision), the weight gradient exactly against its definition (``int8_weight_grad``)."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import pickle
import warnings

import pytest
import torch

import qkernels
import torch_ops
from qkernels.int8 import int8_vectorwise_dequant
from qkernels.int8.matmul_lt import MatmulArgError, MatmulLtState, matmul
from qkernels.int8.ops import quantize_weight

try:
    import bitsandbytes as bnb
except Exception:  # pragma: no cover
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes not importable")

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
K, N = 64, 48


def _inputs(dtype, rows=10, seed=0, outliers=(3, 17), device="cpu"):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, K, generator=g).to(dtype)
    for c in outliers:
        A[::2, c] = 9.0  # |a| >= 6 in half the rows: outlier columns for threshold 6
    W = (torch.randn(N, K, generator=g) / 8).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    return A.to(device), W.to(device), bias.to(device)


def _cols(A, threshold):
    return (A.reshape(-1, A.shape[-1]).abs() >= threshold).any(0).nonzero().reshape(-1)


# --- the state object ---------------------------------------------------------------------------

def test_state_fields_defaults_and_deprecated_names():
    s = MatmulLtState()
    assert [f.name for f in dataclasses.fields(s)] == ["force_no_igemmlt", "CB", "SB", "SCB", "SBt", "CBt",
                                                      "subB", "outlier_pool", "idx"]
    assert (s.threshold, s.has_fp16_weights, s.is_training, s.use_pool, s.has_accumulated_gradients) == \
        (0.0, True, True, False, False)
    assert s.CB is None and s.SCB is None and s.idx is None
    with pytest.warns(FutureWarning, match="CxB"):
        assert s.CxB is None
    with pytest.raises(AttributeError, match="memory_efficient_backward"):
        s.memory_efficient_backward
    s.CB, s.SCB, s.SB = torch.ones(2, 2, dtype=torch.int8), torch.ones(2), torch.ones(1)
    s.reset_grads()
    assert s.CB is None and s.SCB is None and s.SB is None
    # equality compares tensors by value (bitsandbytes' raises "ambiguous" for these)
    a, b = MatmulLtState(CB=torch.arange(6, dtype=torch.int8)), MatmulLtState(CB=torch.arange(6, dtype=torch.int8))
    assert a == b and a != MatmulLtState()


def test_top_level_names_are_lazy_and_shared():
    assert qkernels.matmul is matmul and qkernels.MatmulLtState is MatmulLtState
    assert torch_ops.matmul is matmul and torch_ops.MatmulLtState is MatmulLtState
    assert "matmul" not in qkernels.__all__  # star-import stays torch-free


@needs_bnb
def test_signature_and_fields_are_bitsandbytes():
    ours, theirs = inspect.signature(matmul), inspect.signature(bnb.matmul)
    assert [(p.name, p.default) for p in ours.parameters.values()] == \
        [(p.name, p.default) for p in theirs.parameters.values()]
    assert [f.name for f in dataclasses.fields(MatmulLtState)] == \
        [f.name for f in dataclasses.fields(bnb.MatmulLtState)]
    for name in ("threshold", "has_fp16_weights", "is_training", "use_pool", "has_accumulated_gradients"):
        assert getattr(MatmulLtState, name) == getattr(bnb.MatmulLtState, name), name


# --- forward -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("has_fp16_weights", [True, False])
@pytest.mark.parametrize("has_bias", [True, False])
def test_forward_is_the_layer_op(dtype, threshold, has_fp16_weights, has_bias):
    """Bit for bit the layer's forward (the declared op) on the weight's int8 codes, in A's
    dtype; state.CB/SCB are the weight's codes; state.idx the outlier columns."""
    A, W, bias = _inputs(dtype)
    bias = bias if has_bias else None
    state = MatmulLtState()
    state.threshold, state.has_fp16_weights = threshold, has_fp16_weights
    CB, SCB = quantize_weight(W)
    if not has_fp16_weights:
        state.CB, state.SCB = CB, SCB
    y = matmul(A, W if has_fp16_weights else state.CB, state=state, bias=bias)
    assert y.dtype == dtype and y.shape == (A.shape[0], N)
    assert torch.equal(state.CB, CB) and torch.equal(state.SCB, SCB)
    assert torch.equal(y, torch.ops.qkernels.int8_linear(A, CB, SCB, bias, threshold))
    if threshold:
        assert state.idx.tolist() == _cols(A, threshold).tolist() == [3, 17]
    else:
        assert state.idx is None


def test_threshold_argument_sets_the_state():
    A, W, _ = _inputs(torch.float16)
    state = MatmulLtState()
    y = matmul(A, W, state=state, threshold=6.0)
    assert state.threshold == 6.0 and state.idx.tolist() == [3, 17]
    assert torch.equal(matmul(A, W, state=state), y)  # 0 keeps the state's threshold (bitsandbytes)


def test_transposed_weight_views_and_leading_dims():
    """B may be W.t() of a (K, N) tensor (the (N, K) weight it shows), or with
    has_fp16_weights=False the int8 CB or its transpose; A may have any leading dimensions."""
    A, W, bias = _inputs(torch.float16, rows=12)
    ref = matmul(A, W, bias=bias)
    assert torch.equal(matmul(A, W.t().contiguous().t(), bias=bias), ref)
    state = MatmulLtState()
    state.has_fp16_weights = False
    state.CB, state.SCB = quantize_weight(W)
    assert torch.equal(matmul(A, state.CB.t(), state=state, bias=bias), ref)
    y3 = matmul(A.reshape(3, 4, K), W, bias=bias)
    assert y3.shape == (3, 4, N) and torch.equal(y3.reshape(12, N), ref)
    assert torch.equal(matmul(A[0], W, bias=bias), ref[0])


def test_float_weight_is_requantized_only_when_it_changes():
    A, W, _ = _inputs(torch.float32)
    state = MatmulLtState()
    matmul(A, W, state=state)
    CB = state.CB
    matmul(A, W, state=state)
    assert state.CB is CB  # unchanged weight: the cached codes are reused
    with torch.no_grad():
        W.mul_(2)
    y = matmul(A, W, state=state)
    assert state.CB is not CB and torch.equal(state.SCB, quantize_weight(W)[1])
    assert torch.equal(y, torch.ops.qkernels.int8_linear(A, *quantize_weight(W), None, 0.0))
    state.is_training = False  # bitsandbytes would now serve a stale copy; the key still decides
    with torch.no_grad():
        W.add_(1)
    matmul(A, W, state=state)
    assert torch.equal(state.SCB, quantize_weight(W)[1])


def test_out_argument():
    A, W, bias = _inputs(torch.bfloat16)
    out = torch.empty(A.shape[0], N, dtype=torch.bfloat16)
    r = matmul(A, W, out=out, bias=bias)
    assert r is out and torch.equal(out, matmul(A, W, bias=bias))
    with pytest.raises(ValueError, match="out must have shape"):
        matmul(A, W, out=torch.empty(3, N, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out must have A's dtype"):
        matmul(A, W, out=torch.empty(A.shape[0], N))


# --- backward ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_gradients(dtype, threshold):
    """grad_A = G @ (CB * SCB / 127) in A's dtype and grad_bias = sum(G) in the bias dtype,
    each within 2x plain torch's error in that dtype (float64 references); grad_B (B a float
    weight requiring grad) is int8_weight_grad(G, A) exactly, in B's dtype."""
    A, W, bias = _inputs(dtype, rows=24)
    A.requires_grad_(True)
    W.requires_grad_(True)
    bias.requires_grad_(True)
    state = MatmulLtState()
    state.threshold = threshold
    y = matmul(A, W, state=state, bias=bias)
    G = torch.randn_like(y)
    y.backward(G)
    Wd = int8_vectorwise_dequant(state.CB, state.SCB)
    ref_a = G.double() @ Wd.double()
    torch_a = (G @ Wd.to(dtype)).double()
    assert (A.grad.double() - ref_a).abs().max() <= 2 * (torch_a - ref_a).abs().max()
    ref_b = G.double().sum(0)
    assert (bias.grad.double() - ref_b).abs().max() <= 2 * (G.sum(0).double() - ref_b).abs().max()
    assert A.grad.dtype == W.grad.dtype == bias.grad.dtype == dtype
    dW = torch.ops.qkernels.int8_weight_grad(G, A.detach(), threshold).to(dtype)
    assert torch.equal(W.grad, dW)
    # and dW is G^T A up to the two 8-bit factors' quantization (a few percent in norm, docs/FORMATS.md §9)
    ref_w = G.double().T @ A.detach().double()
    assert ((W.grad.double() - ref_w).norm() / ref_w.norm()).item() < 0.03


def test_gradient_reaches_a_transposed_view_and_not_a_frozen_weight():
    A, W, _ = _inputs(torch.float32)
    base = W.t().contiguous().requires_grad_(True)  # (K, N); base.t() is the (N, K) weight
    A.requires_grad_(True)
    matmul(A, base.t()).sum().backward()
    assert base.grad.shape == (K, N) and base.grad.abs().sum() > 0
    A.grad = None
    state = MatmulLtState()
    state.has_fp16_weights = False
    state.CB, state.SCB = quantize_weight(W)
    y = matmul(A, state.CB, state=state)
    y.sum().backward()
    assert A.grad is not None


def test_empty_input():
    A, W, bias = _inputs(torch.float16)
    A = A[:0].clone().requires_grad_(True)
    W.requires_grad_(True)
    bias.requires_grad_(True)
    y = matmul(A, W, bias=bias)
    assert y.shape == (0, N) and y.dtype == torch.float16
    y.sum().backward()
    assert A.grad.shape == (0, K)
    assert torch.equal(W.grad, torch.zeros_like(W)) and torch.equal(bias.grad, torch.zeros_like(bias))


# --- bad input ---------------------------------------------------------------------------------

def test_bad_arguments_name_the_argument():
    A, W, bias = _inputs(torch.float16)
    with pytest.raises(TypeError, match="A must be float16"):
        matmul(A.to(torch.int32), W)
    with pytest.raises(TypeError, match="A must be a torch.Tensor"):
        matmul(A.numpy(), W)
    with pytest.raises(TypeError, match="state must be a MatmulLtState") as info:
        matmul(A, W, state=3)
    assert isinstance(info.value, AttributeError)  # what bitsandbytes raises there
    with pytest.raises(TypeError, match="threshold must be a number"):
        matmul(A, W, threshold="x")
    with pytest.raises(ValueError, match="threshold"):
        matmul(A, W, threshold=-1.0)
    with pytest.raises(MatmulArgError, match="in_features=64") as info:
        matmul(A, W[:, :-1])
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    with pytest.raises(MatmulArgError, match="bias must have shape"):
        matmul(A, W, bias=bias[:-1])
    with pytest.raises(MatmulArgError, match="B must be the 2-D weight"):
        matmul(A, W[0])
    state = MatmulLtState()
    state.has_fp16_weights = False
    state.CB = quantize_weight(W)[0]
    with pytest.raises(ValueError, match="state.SCB"):
        matmul(A, state.CB, state=state)
    with pytest.raises(TypeError, match="B must be the float weight"):
        matmul(A, W.to(torch.int8))


@needs_bnb
def test_bad_arguments_raise_what_bitsandbytes_raises():
    """Where bitsandbytes rejects a call, ours raises an exception of the same type (and a
    ValueError / TypeError naming the argument)."""
    A, W, bias = _inputs(torch.float16)
    calls = {
        "K mismatch": lambda m: m(A, W[:, :-1]),
        "bias shape": lambda m: m(A, W, bias=bias[:-1]),
        "state type": lambda m: m(A, W, state=3),
        "threshold type": lambda m: m(A, W, threshold="x"),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, call in calls.items():
            with pytest.raises(Exception) as theirs:
                call(bnb.matmul)
            with pytest.raises(Exception) as ours:
                call(matmul)
            assert isinstance(ours.value, type(theirs.value)), (name, ours.value, theirs.value)
            assert isinstance(ours.value, (TypeError, ValueError)), name


# --- Linear8bitLt.state -------------------------------------------------------------------------

def _layer(threshold=6.0, has_fp16_weights=False):
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    layer = torch_ops.Linear8bitLt(K, N, has_fp16_weights=has_fp16_weights, threshold=threshold)
    layer.load_state_dict(lin.state_dict())
    return layer.to("cpu")


def test_layer_state_reads_the_layer():
    layer = _layer()
    s = layer.state
    assert isinstance(s, MatmulLtState)
    assert s.CB is layer.weight.CB and s.SCB is layer.weight.SCB
    assert (s.threshold, s.has_fp16_weights, s.is_training, s.use_pool) == (6.0, False, True, True)
    assert s.idx is None
    A, _, _ = _inputs(torch.float16)
    y = layer(A)
    assert layer.state.idx.tolist() == [3, 17]
    layer.eval()
    assert layer.state.is_training is False
    layer.state.threshold = 0.0  # the layer's threshold
    assert layer.threshold == 0.0 and not torch.equal(layer(A), y)
    with pytest.raises(ValueError, match="threshold"):
        layer.state.threshold = -2.0
    layer.state.force_no_igemmlt = True  # kept with the layer, unused (as in bitsandbytes)
    assert layer.state.force_no_igemmlt is True
    with pytest.raises(AttributeError):
        layer.state.has_fp16_weights = True  # the weight's, not the state's


def test_layer_state_drives_matmul_and_copies():
    """bnb.matmul(x, layer.weight, state=layer.state, bias=layer.bias) is the layer's forward;
    copies, pickles and deep copies of the layer keep equal states."""
    for has_fp16_weights in (False, True):
        layer = _layer(has_fp16_weights=has_fp16_weights)
        A, _, _ = _inputs(torch.float16)
        y = layer(A)
        assert torch.equal(matmul(A, layer.weight, state=layer.state, bias=layer.bias), y)
        assert layer.state.CB is not None
        assert copy.deepcopy(layer).state == layer.state
        assert pickle.loads(pickle.dumps(layer)).state == layer.state
        snap = pickle.loads(pickle.dumps(layer.state))
        assert type(snap) is MatmulLtState and snap == layer.state and snap.threshold == 6.0


# --- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("rows", [4, 40])
def test_gpu_matmul_is_the_layer_op(dtype, threshold, rows):
    A, W, bias = _inputs(dtype, rows=rows, device="cuda")
    A.requires_grad_(True)
    state = MatmulLtState()
    state.threshold = threshold
    y = matmul(A, W, state=state, bias=bias)
    CB, SCB = quantize_weight(W)
    assert torch.equal(state.CB, CB)
    assert torch.equal(y, torch.ops.qkernels.int8_linear(A.detach(), CB, SCB, bias, threshold))
    if threshold:
        assert state.idx.tolist() == [3, 17]
    y.sum().backward()
    assert A.grad.shape == A.shape and torch.isfinite(A.grad).all()
