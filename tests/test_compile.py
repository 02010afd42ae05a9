"""torch.compile over the quantized layers, and the declared op layer behind it.

A model mixing LinearNF4, LinearFP4, Linear4bit (compress_statistics), Linear8bitLt (threshold
0 and 6), SwitchBackLinear and LinearFP8Mixed compiles with ``fullgraph=True`` and no graph
break; the compiled outputs and gradients equal eager's (bit for bit for the int8 and 4-bit
layers, whose ops are the same functions; simulated FP8 within float32 rounding on CPU, where
inductor regroups its arithmetic); a bad input meets the layer's own error, compiled or not;
the ops pass torch.library.opcheck; a layer's prepared launch arguments follow the weight.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_ops
from qkernels.fourbit import ops as ops4
from qkernels.int8 import ops as ops8
from reference import fourbit as ref4

IN = 64


def _mixed_model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(
        torch_ops.LinearNF4(IN, 96), nn.ReLU(),
        torch_ops.LinearFP4(96, IN, compress_statistics=False),
        torch_ops.Linear4bit(IN, IN, quant_type="nf4", compress_statistics=True),
        torch_ops.Linear8bitLt(IN, IN, has_fp16_weights=False, threshold=0.0),
        torch_ops.Linear8bitLt(IN, IN, has_fp16_weights=False, threshold=6.0),
        torch_ops.SwitchBackLinear(IN, IN),
        torch_ops.LinearFP8Mixed(IN, 32)).to(device)


def _input(device="cpu", dtype=torch.float32):
    torch.manual_seed(1)
    x = torch.randn(5, IN, device=device, dtype=dtype) * 2
    x[:, 3] = 9.0  # an outlier column for the threshold-6 layer
    return x


def test_mixed_model_compiles_fullgraph_without_breaks():
    m = _mixed_model()
    x = _input()
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        want, got = m(x), compiled(x)
    # everything up to the FP8 layer is bit-equal; the simulated FP8 layer's float32 arithmetic
    # is regrouped by inductor: within a few float32 ulps of the values it produces
    with torch.no_grad():
        head_want = m[:-1](x)
        head_got = torch.compile(m[:-1], fullgraph=True)(x)
    assert torch.equal(head_want, head_got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # training: gradients to the input and every trainable parameter
    xg = x.clone().requires_grad_()
    compiled(xg).square().sum().backward()
    grads_c = [xg.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.requires_grad]
    m.zero_grad()
    xg.grad = None
    m(xg).square().sum().backward()
    grads_e = [xg.grad] + [p.grad for p in m.parameters() if p.requires_grad]
    for c, e in zip(grads_c, grads_e):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


def test_int8_fp16_weights_compiled_gradients_equal_eager():
    torch.manual_seed(2)
    layer = torch_ops.Linear8bitLt(IN, 48, has_fp16_weights=True, threshold=6.0).to("cpu")
    x = _input().requires_grad_()
    compiled = torch.compile(layer, fullgraph=True)
    compiled(x).sum().backward()
    got = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    x.grad = None
    layer(x).sum().backward()
    for g, w in zip(got, (x.grad, layer.weight.grad, layer.bias.grad)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("make", [lambda: torch_ops.LinearNF4(IN, 32).to("cpu"),
                                  lambda: torch_ops.Linear8bitLt(IN, 32, has_fp16_weights=False,
                                                                 threshold=6.0).to("cpu")])
def test_compiled_layer_raises_the_eager_error(make):
    layer = make()
    compiled = torch.compile(layer, fullgraph=True)
    compiled(_input())  # compiled for the good input first; the bad ones recompile
    for bad, err, match in ((torch.randn(5, IN - 1), ValueError, r"in_features=64\); got shape \(5, 63\)"),
                            (torch.ones(5, IN, dtype=torch.int32), TypeError, "floating-point"),
                            (torch.randn(2, 3, IN - 2), ValueError, r"got shape \(2, 3, 62\)")):
        with pytest.raises(err, match=match):
            layer(bad)
        with pytest.raises(err, match=match):
            compiled(bad)


def test_compiled_layer_with_unquantized_weight_raises_the_eager_error():
    layer = torch_ops.LinearNF4(IN, 32)  # never moved: not quantized
    with pytest.raises(RuntimeError, match="not quantized yet"):
        layer(_input())
    with pytest.raises(RuntimeError, match="not quantized yet"):
        torch.compile(layer, fullgraph=True)(_input())


def _nf4_op_args(nested: bool, N=24, K=IN):
    torch.manual_seed(3)
    packed, state = ref4.quantize_4bit(torch.randn(N, K).numpy(), 64, "nf4", nested)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    state.absmax, state.code = t(state.absmax), t(state.code)
    if nested:
        state.state2.absmax, state.state2.code = t(state.state2.absmax), t(state.state2.code)
    absmax, code, code2, absmax2, offset = ops4.state_tensors(state, "cpu")
    return t(packed), absmax, code, code2, absmax2, offset, N, K


@pytest.mark.parametrize("nested", [False, True])
def test_fourbit_ops_opcheck(nested):
    packed, absmax, code, code2, absmax2, offset, N, K = _nf4_op_args(nested)
    x = torch.randn(3, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    torch.library.opcheck(torch.ops.qkernels.matmul_4bit.default,
                          (x, packed, absmax, code, code2, absmax2, offset, bias, 64, "nf4", N))
    torch.library.opcheck(torch.ops.qkernels.dequantize_4bit.default,
                          (packed, absmax, code, code2, absmax2, offset, 64, "nf4", N, K, torch.bfloat16))


def test_int8_ops_opcheck():
    torch.manual_seed(4)
    W = torch.randn(24, IN)
    CB, SCB = ops8.quantize_weight(W)
    x2 = _input()
    for threshold in (0.0, 6.0):
        torch.library.opcheck(torch.ops.qkernels.int8_linear.default, (x2, CB, SCB, torch.randn(24), threshold))
        torch.library.opcheck(torch.ops.qkernels.int8_weight_grad.default, (torch.randn(5, 24), x2, threshold))
    torch.library.opcheck(torch.ops.qkernels.int8_quantize_weight.default, (W,))


def test_matmul_4bit_op_gradients_match_the_dequantized_product():
    """dx = grad @ W and dbias = sum(grad), W the dequantized weight (float64 gradcheck is not
    possible: the op computes in the activation's dtype)."""
    packed, absmax, code, code2, absmax2, offset, N, K = _nf4_op_args(True)
    x = torch.randn(2, 3, K, requires_grad=True)
    bias = torch.randn(N, requires_grad=True)
    y = torch.ops.qkernels.matmul_4bit(x, packed, absmax, code, code2, absmax2, offset, bias, 64, "nf4", N)
    g = torch.randn_like(y)
    y.backward(g)
    W = torch.ops.qkernels.dequantize_4bit(packed, absmax, code, code2, absmax2, offset, 64, "nf4", N, K,
                                           torch.float32)
    torch.testing.assert_close(x.grad, g @ W, rtol=0, atol=0)
    torch.testing.assert_close(bias.grad, g.reshape(-1, N).sum(0), rtol=0, atol=0)


_KINDS = {"nf4": torch_ops.LinearNF4, "int8": torch_ops.Linear8bitLt}


def _quantized(kind: str, device: str):
    return _KINDS[kind].from_linear(nn.Linear(IN, 32).to(device))


def test_layer_prepares_again_when_the_weight_changes():
    """The eager plan follows the weight: a move drops it, a load of other bytes replaces it."""
    torch.manual_seed(5)
    for kind in _KINDS:
        layer, other = _quantized(kind, "cpu"), _quantized(kind, "cpu")
        x = _input()
        with torch.no_grad():
            first = layer(x)
            plan = layer._plan
            assert plan is not None
            layer.cpu()
            assert layer._plan is None  # moved: prepared again on the next call
            assert torch.equal(layer(x), first)
            layer.load_state_dict(other.state_dict())
            assert torch.equal(layer(x), other(x))
            assert layer._plan is not plan


# --- GPU --------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_compiled_equals_eager_bitwise(dtype):
    m = _mixed_model("cuda").to(dtype)  # quantized weights keep their bytes; the rest casts
    x = _input("cuda", dtype)
    compiled = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        want = m(x)
        got = compiled(x)
    assert torch.equal(got, want)
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_gpu_reduce_overhead_decode_step(rows):
    """A decode-like step compiled with mode="reduce-overhead" (CUDA graphs) replays with the
    eager layer's values, fresh inputs each step."""
    torch.manual_seed(6)
    m = nn.Sequential(torch_ops.LinearNF4(256, 512), nn.SiLU(),
                      torch_ops.Linear8bitLt(512, 256, has_fp16_weights=False, threshold=6.0),
                      torch_ops.Linear8bitLt(256, 256, has_fp16_weights=False)).cuda()
    step = torch.compile(m, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for i in range(5):
            x = torch.randn(rows, 256, device="cuda", dtype=torch.float16)
            x[:, 7] = 10.0 * (i % 2)
            assert torch.equal(step(x).clone(), m(x))


@pytest.mark.gpu
def test_gpu_layer_moved_after_preparing_uses_new_pointers():
    torch.manual_seed(7)
    for kind in _KINDS:
        layer = _quantized(kind, "cuda")
        x = _input("cuda", torch.float16)
        with torch.no_grad():
            first = layer(x)
            old = layer._plan
            layer.cpu()
            filler = torch.full((1 << 20,), 7, dtype=torch.uint8, device="cuda")  # reuse the old memory
            layer.cuda()
            assert layer._plan is None
            assert torch.equal(layer(x), first)
            assert layer._plan is not old
            del filler


def test_prepared_launch_argument_block():
    """The ctypes argument block a prepared launch hands to cuLaunchKernel: one slot per
    kernel argument of the declared width, fixed values written once, the rest per call
    (no GPU needed to build it)."""
    import ctypes

    from qkernels._cuda.launch import PreparedLaunch

    class Function:  # stands in for cupy.cuda.Function (only .ptr is read)
        ptr = 1234

    launch = PreparedLaunch(Function(), "pifl", {1: -7, 2: 0.5}, (0, 3), (3,), (128,))
    slots = launch._slots
    assert [type(s) for s in slots] == [ctypes.c_uint64, ctypes.c_int32, ctypes.c_float, ctypes.c_int64]
    assert (slots[1].value, slots[2].value) == (-7, 0.5)
    params = ctypes.cast(launch._params, ctypes.POINTER(ctypes.c_void_p))
    assert [params[i] for i in range(4)] == [ctypes.addressof(s) for s in slots]
    assert launch.grid == (3, 1, 1) and launch.block == (128, 1, 1)
    with pytest.raises(ValueError, match="unknown argument types"):
        PreparedLaunch(Function(), "pxq", {}, (0, 1, 2), (1,), (1,))
    with pytest.raises(ValueError, match="either fixed or variable"):
        PreparedLaunch(Function(), "pp", {0: 1}, (0,), (1,), (1,))


@pytest.mark.parametrize("kind", list(_KINDS))
def test_load_state_dict_not_strict_loads_the_keys_present(kind):
    """load_state_dict(strict=False) with the bias missing and one extra key loads the weight
    (as nn.Linear does) and reports both keys; strict=True reports them as an error. Torch
    passes strict=True to _load_from_state_dict whatever the user asked, so a layer that
    returned early on missing keys loaded nothing (issue 25, item 1)."""
    torch.manual_seed(8)
    layer, source = _quantized(kind, "cpu"), _quantized(kind, "cpu")
    sd = {k: v for k, v in source.state_dict().items() if k != "bias"}
    sd["extra"] = torch.zeros(1)
    x = _input()
    report = layer.load_state_dict(sd, strict=False)
    assert report.missing_keys == ["bias"] and report.unexpected_keys == ["extra"]
    with torch.no_grad():
        bias = layer.bias.detach().clone()
        source.bias.copy_(bias)  # the bias was not loaded: the layers now differ only if the weight did not load
        assert torch.equal(layer(x), source(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict(sd, strict=True)


def test_int8_plans_of_the_op_cache_keep_no_memory_between_calls():
    """A layer's int8 plan keeps the last input's outlier columns (bitsandbytes' state.idx); a
    plan for the declared op's cache (hold=False, CUDA only: refused elsewhere) keeps none, as
    torch.compile's reduce-overhead CUDA graphs refuse memory that outlives a call (on the
    GPU: test_gpu_reduce_overhead_decode_step)."""
    torch.manual_seed(8)
    CB, SCB = ops8.quantize_weight(torch.randn(32, IN))
    held, x = ops8.Int8LinearPlan(CB, SCB, 6.0), _input()
    held(x)
    assert torch.equal(held.cols, (x.abs() >= 6.0).any(0).nonzero().reshape(-1)) and 3 in held.cols.tolist()
    with pytest.raises(ValueError, match="hold=False"):
        ops8.Int8LinearPlan(CB, SCB, 6.0, hold=False)


@pytest.mark.gpu
def test_gpu_int8_op_cache_plan_keeps_no_workspace():
    """On CUDA, a plan of the op cache (hold=False) gives the layer plan's bits and keeps no
    outlier workspace, where the layer plan keeps it and reads its columns from it."""
    torch.manual_seed(8)
    CB, SCB = ops8.quantize_weight(torch.randn(32, IN, device="cuda"))
    x = _input("cuda", torch.float16)
    held, free = ops8.Int8LinearPlan(CB, SCB, 6.0), ops8.Int8LinearPlan(CB, SCB, 6.0, hold=False)
    assert held._cuda is not None and free._cuda is not None and free._cuda.usable(x.shape[0])
    assert torch.equal(free(x), held(x))
    want_cols = (x.abs() >= 6.0).any(0).nonzero().reshape(-1)
    assert held._cuda.last_ws is not None and torch.equal(held.cols, want_cols)
    assert free._kept is None and free.cols is None and free._cuda.last_ws is None
