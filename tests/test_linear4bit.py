"""Linear4bit / LinearNF4 / LinearFP4 and Params4bit (docs/FORMATS.md §3, §4, §10): checkpoints
both ways with bitsandbytes, safetensors, moves, memory, errors, accuracy, gradients."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from qkernels.fourbit import dequantize_4bit
from torch_ops._layers import plain
from torch_ops.linear4bit import Linear4bit, LinearFP4, LinearNF4, Params4bit

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
IN, OUT = 128, 64  # bnb's CPU eval kernel needs in % 64 == 0 and out % 32 == 0

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except Exception:  # pragma: no cover
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes not importable")


def _linear(dtype, seed=0, in_f=IN, out_f=OUT):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f).to(dtype)


def _ours(linear, quant_type="nf4", device="cpu", **kw):
    layer = Linear4bit(linear.in_features, linear.out_features, quant_type=quant_type, **kw)
    layer.load_state_dict(linear.state_dict())
    return layer.to(device)


def _f64_error(y, x, w, bias):
    """max |y - x @ w^T - bias| against float64 (w: the dequantized weight)."""
    ref = x.double() @ w.double().T + bias.double()
    return (y.double() - ref).abs().max().item()


# --- bitsandbytes interchange (CPU) ------------------------------------------------------

def _bnb_layer(linear, quant_type, compress):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, quant_type=quant_type,
                              compress_statistics=compress)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def _bnb_from_state_dict(sd, in_f=IN, out_f=OUT, device="cpu"):
    layer = bnb.nn.Linear4bit(in_f, out_f, quant_type="nf4")
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device=device, module=layer)
    layer.bias = torch.nn.Parameter(sd["bias"].clone())
    return layer


def _bnb_dequant(sd, device="cpu"):
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    return bnbF.dequantize_4bit(sd["weight"], bnbF.QuantState.from_dict(stats, device=device))


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [True, False])
def test_bnb_checkpoint_loads_here(quant_type, compress):
    """A checkpoint bnb saved loads with load_state_dict(strict=True) into a fresh layer:
    the same keys, bit-identical dequantized weight, and outputs as accurate as bnb's
    (bnb in train mode runs dequantize + torch F.linear, i.e. plain torch in x's dtype)."""
    lin = _linear(torch.bfloat16)
    b = _bnb_layer(lin, quant_type, compress)
    sd = {k: v.clone() for k, v in b.state_dict().items()}
    ours = Linear4bit(IN, OUT, quant_type=quant_type, compress_statistics=not compress)
    ours.load_state_dict(sd, strict=True)
    assert ours.weight.bnb_quantized and ours.weight.compress_statistics == compress
    w = dequantize_4bit(ours.weight.data, ours.weight.quant_state)
    assert torch.equal(w, _bnb_dequant(sd))
    assert list(ours.state_dict()) == list(sd)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    b.train()
    for dtype in DTYPES:
        x = torch.randn(5, IN, dtype=dtype)
        with torch.no_grad():
            yb, yo = b(x), ours(x)
        assert yo.dtype == dtype
        bias = sd["bias"]
        assert _f64_error(yo, x, w, bias) <= 2 * _f64_error(yb, x, w, bias)


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_our_checkpoint_loads_in_bnb(quant_type):
    """Our state_dict goes into bnb (Params4bit.from_prequantized, as transformers does):
    bnb dequantizes our bytes to exactly our weight, and its forward (train mode: dequantize +
    torch F.linear) is torch's F.linear on that weight, bit for bit."""
    lin = _linear(torch.float16, seed=1)
    ours = _ours(lin, quant_type)
    sd = ours.state_dict()
    assert "weight.quant_state.bitsandbytes__" + quant_type in sd
    b_ours = _bnb_from_state_dict(sd)
    w = dequantize_4bit(ours.weight.data, ours.weight.quant_state)
    assert w.dtype == torch.float16 and torch.equal(_bnb_dequant(sd), w)
    x = torch.randn(3, IN, dtype=torch.float16)
    with torch.no_grad():
        yb = b_ours.train()(x)
        assert torch.equal(yb, torch.nn.functional.linear(x, w, sd["bias"].half()))
        assert _f64_error(ours(x), x, w, sd["bias"]) <= 2 * _f64_error(yb, x, w, sd["bias"])


@needs_bnb
def test_safetensors_round_trip_both_ways(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    load_file, save_file = st.load_file, st.save_file
    lin = _linear(torch.bfloat16, seed=2)
    ours = _ours(lin, "nf4")
    save_file(ours.state_dict(), tmp_path / "ours.safetensors")
    sd = load_file(tmp_path / "ours.safetensors")
    fresh = LinearNF4(IN, OUT)
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(2, IN, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), ours(x))
    assert torch.equal(_bnb_dequant(sd), dequantize_4bit(ours.weight.data, ours.weight.quant_state))
    b = _bnb_layer(lin, "nf4", True)
    bsd = {k: v.contiguous() for k, v in b.state_dict().items()}
    save_file(bsd, tmp_path / "bnb.safetensors")
    fresh.load_state_dict(load_file(tmp_path / "bnb.safetensors"), strict=True)
    assert torch.equal(dequantize_4bit(fresh.weight.data, fresh.weight.quant_state), _bnb_dequant(bsd))


# --- behaviour --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_output_accuracy_and_input_gradient(dtype, quant_type):
    """Output error against float64 (of the dequantized weight) at most 2x plain torch's in
    x's dtype; the gradient reaches x (dx = dout @ W) under the same rule; bias is trainable."""
    lin = _linear(dtype, seed=3)
    layer = _ours(lin, quant_type)
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state, out_dtype=torch.float32)
    x = torch.randn(7, IN, dtype=dtype, requires_grad=True)
    bias_dtype = layer.bias.dtype
    y = layer(x)
    assert y.dtype == dtype and y.shape == (7, OUT)
    plain = torch.nn.functional.linear(x.detach(), w.to(dtype), layer.bias.detach().to(dtype))
    assert _f64_error(y.detach(), x.detach(), w, layer.bias.detach()) <= \
        2 * _f64_error(plain, x.detach(), w, layer.bias.detach())
    g = torch.randn_like(y)
    y.backward(g)
    ref = g.double() @ w.double()
    assert (x.grad.double() - ref).abs().max() <= 2 * ((g @ w.to(dtype)).double() - ref).abs().max() + 1e-12
    assert torch.allclose(layer.bias.grad.double(), g.double().sum(0), rtol=1e-2, atol=1e-2)
    assert layer.bias.dtype == bias_dtype  # never cast in place


def test_compute_dtype_follows_input_unless_set():
    lin = _linear(torch.float32, seed=4)
    follow = _ours(lin, "nf4")
    fixed = _ours(lin, "nf4", compute_dtype=torch.bfloat16)
    x = torch.randn(3, IN)
    y_follow, y_fixed = follow(x), fixed(x)
    assert y_follow.dtype == y_fixed.dtype == torch.float32
    # the bf16 compute path rounds x to bfloat16 first: its output is that of x.bfloat16()
    assert torch.equal(y_fixed, follow(x.bfloat16()).float())
    assert not torch.equal(y_follow, y_fixed)
    with pytest.warns(UserWarning, match="float32"):
        _ours(lin, "nf4", compute_dtype=torch.float32)(x.half())


@pytest.mark.parametrize("native_bf16", [True, False])
def test_cpu_inference_computes_float32_input_in_bfloat16_where_native(monkeypatch, native_bf16):
    """bitsandbytes' CPU rule, with compute_dtype unset: an eval-mode layer on a CPU with
    native bfloat16 computes float32 input that needs no gradient in bfloat16 (the output
    back in float32); training, an input that needs a gradient, an explicit
    compute_dtype=float32 and a CPU without native bfloat16 stay in float32."""
    from torch_ops import linear4bit
    monkeypatch.setattr(linear4bit, "_CPU_BF16", native_bf16)
    lin = _linear(torch.float32, seed=5)
    layer = _ours(lin, "nf4").cpu()
    exact = _ours(lin, "nf4", compute_dtype=torch.float32).cpu().eval()
    x = torch.randn(16, IN)
    with torch.no_grad():
        f32 = exact(x)
        assert torch.equal(layer.train()(x), f32)
        y = layer.eval()(x)
        assert y.dtype == torch.float32
        if native_bf16:
            assert torch.equal(y, layer(x.bfloat16()).float()) and not torch.equal(y, f32)
        else:
            assert torch.equal(y, f32)
    assert torch.equal(layer.eval()(x.clone().requires_grad_()).detach(), f32)


def test_memory_per_weight():
    """compress_statistics: 0.5 byte of codes + 1/64 byte of absmax codes + the nested
    state: at most 0.52 bytes per weight (issue 6)."""
    layer = _ours(_linear(torch.float16, seed=5, in_f=1024, out_f=1024), "nf4")
    assert layer.quantized_bytes() / (1024 * 1024) <= 0.52
    plain = _ours(_linear(torch.float16, seed=5, in_f=1024, out_f=1024), "nf4", compress_statistics=False)
    assert plain.quantized_bytes() / (1024 * 1024) == pytest.approx(0.5 + 4 / 64, abs=1e-3)


def test_moves_and_copies_never_requantize():
    lin = _linear(torch.bfloat16, seed=6)
    layer = _ours(lin, "nf4", quant_storage=torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    weight = layer.weight
    layer.to("cpu").cpu().half().to(torch.float32)  # dtype changes never touch the payload
    assert layer.weight is weight and layer.weight.dtype == torch.bfloat16
    after = layer.state_dict()
    for k in ("weight", "weight.absmax", "weight.nested_absmax"):
        assert torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)), k
    x = torch.randn(2, IN, dtype=torch.bfloat16)
    y = layer(x)
    rebuilt = Params4bit(layer.weight.data, **layer.weight.__dict__)  # accelerate / peft
    assert rebuilt.quant_state is layer.weight.quant_state and rebuilt.bnb_quantized
    clone = copy.deepcopy(layer)
    assert isinstance(clone.weight, Params4bit) and torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.weight, Params4bit) and torch.equal(loaded(x), y)


def test_quantized_on_move_not_before():
    layer = LinearFP4(IN, OUT)
    x = torch.randn(1, IN)
    with pytest.raises(RuntimeError, match="not quantized yet"):
        layer(x)
    layer.to("cpu")
    assert layer.weight.bnb_quantized and layer.weight.dtype == torch.uint8
    assert layer.weight.quant_state.quant_type == "fp4"
    assert layer(x).shape == (1, OUT)


def test_float_checkpoint_into_quantized_layer_quantizes_it():
    lin = _linear(torch.float16, seed=7)
    layer = LinearNF4(IN, OUT).to("cpu")
    layer.load_state_dict(lin.state_dict())
    ref = _ours(lin, "nf4")
    assert torch.equal(layer.weight.data, ref.weight.data)


# --- bad input ----------------------------------------------------------------------------

def _sd():
    return _ours(_linear(torch.float16, seed=8), "nf4").state_dict()


def _unchanged_after(layer, sd, match, exc=RuntimeError):
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(exc, match=match):
        layer.load_state_dict(sd)
    after = layer.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_load_missing_quant_key_names_it_and_changes_nothing():
    sd = _sd()
    del sd["weight.absmax"]
    _unchanged_after(LinearNF4(IN, OUT), sd, "weight.*absmax")
    _unchanged_after(LinearNF4(IN, OUT).to("cpu"), sd, "weight.*absmax")


def test_load_packed_weight_without_state_names_the_keys():
    sd = {k: v for k, v in _sd().items() if not k.startswith("weight.")}
    _unchanged_after(LinearNF4(IN, OUT), sd, "weight.absmax")


def test_load_shape_mismatch_names_weight():
    _unchanged_after(LinearNF4(IN, 2 * OUT), _sd(), r"weight: size mismatch")
    sd = _sd()
    sd["bias"] = torch.zeros(OUT + 1)
    _unchanged_after(LinearNF4(IN, OUT), sd, r"bias: size mismatch")


def test_load_quant_type_mismatch_names_key():
    _unchanged_after(LinearFP4(IN, OUT), _sd(), "bitsandbytes__nf4")


def test_load_missing_and_unexpected_keys_strict():
    """strict=True names the missing / unexpected key; the keys present are loaded first, as
    nn.Linear loads its weight before torch raises for a missing bias."""
    full = _sd()
    for drop, add, match in (("bias", None, 'Missing key.*"bias"'), (None, "extra", 'Unexpected key.*"extra"')):
        sd = {k: v for k, v in full.items() if k != drop}
        if add:
            sd[add] = torch.zeros(1)
        layer = LinearNF4(IN, OUT)
        with pytest.raises(RuntimeError, match=match):
            layer.load_state_dict(sd)
        assert torch.equal(plain(layer.weight), full["weight"])


def test_bad_arguments():
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(IN, OUT, quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        Linear4bit(IN, OUT, blocksize=100)
    layer = _ours(_linear(torch.float32, seed=9), "nf4")
    with pytest.raises(ValueError, match="in_features=128"):
        layer(torch.randn(2, IN + 1))
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        layer(torch.ones(2, IN, dtype=torch.int32))


def test_backward_into_frozen_weight_is_an_error():
    layer = _ours(_linear(torch.float32, seed=10), "nf4")
    with pytest.raises(RuntimeError, match="frozen"):
        layer.weight.requires_grad_(True)
    # a float quant_storage could be flagged by assignment: a forward with grad then refuses
    # (it has no gradient to give); without grad it runs
    layer = _ours(_linear(torch.float32, seed=10), "nf4", quant_storage=torch.float16)
    layer.weight.requires_grad = True
    with pytest.raises(RuntimeError, match="frozen quantized weight"):
        layer(torch.randn(2, IN))
    with torch.no_grad():
        assert layer(torch.randn(2, IN)).shape == (2, OUT)


# --- bitsandbytes' Params4bit surface (issue 23) -------------------------------------------

@pytest.mark.parametrize("nested", [True, False])
def test_params4bit_exposes_quant_state_fields(nested):
    """The QuantState's fields read through the weight under their state_dict names, as
    FSDP's state_dict code resolves "weight.absmax", "weight.quant_state.bitsandbytes__nf4"
    by getattr along the dotted key."""
    layer = LinearNF4(IN, OUT, compress_statistics=nested)
    w = layer.weight
    assert not hasattr(w, "absmax") and not hasattr(w, "quant_map")  # not quantized yet
    layer.to("cpu")
    w, state = layer.weight, layer.weight.quant_state
    assert w.absmax is state.absmax and w.code is state.code and w.quant_map is state.code
    assert w.state2 is state.state2 and w.offset == state.offset
    if nested:
        assert w.nested_absmax is state.state2.absmax and w.nested_quant_map is state.state2.code
        assert w.nested_blocksize == 256 and w.nested_dtype == state.state2.dtype
        assert w.nested_offset == state.offset
    else:
        for name in ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype"):
            assert not hasattr(w, name)
    for key, value in state.as_dict(packed=True).items():
        obj = w
        for part in key.split("."):
            obj = getattr(obj, part)
        assert torch.equal(obj, value), key
    with pytest.raises(AttributeError, match="no_such_field"):
        w.no_such_field


def test_chunk_and_split_keep_params4bit():
    """torch.chunk / torch.split and their Tensor methods give Params4bit pieces carrying the
    weight's attributes (FSDP2 shards parameters with them, as bitsandbytes); other ops give
    plain tensors."""
    layer = LinearFP4(IN, OUT).to("cpu")
    w = layer.weight
    bytes_ = plain(w)
    for pieces in (torch.chunk(w, 2), torch.split(w, 1000), w.chunk(3, dim=0), w.split([96, 4000])):
        assert isinstance(pieces, tuple) and len(pieces) > 1
        start = 0
        for piece in pieces:
            assert type(piece) is Params4bit and piece.bnb_quantized
            assert piece.quant_type == "fp4" and piece.quant_state is w.quant_state
            assert piece.blocksize == w.blocksize and not piece.requires_grad
            assert torch.equal(plain(piece), bytes_[start:start + piece.shape[0]])
            start += piece.shape[0]
        assert start == bytes_.shape[0]
    assert type(w.t()) is torch.Tensor and type(w.view(-1)) is torch.Tensor
    assert type(torch.cat(torch.chunk(w, 2))) is torch.Tensor


def test_params4bit_rebuilt_from_its_dict():
    """Params4bit(data, **old.__dict__) (accelerate, peft) rebuilds the same quantized weight."""
    layer = LinearNF4(IN, OUT).to("cpu")
    old = layer.weight
    old._is_hf_initialized = True  # an attribute set by others is carried too
    x = torch.randn(3, IN)
    y = layer(x)
    for new in (Params4bit(old.data, **old.__dict__),
                Params4bit(old.data, requires_grad=old.requires_grad, **old.__dict__)):
        assert new.__dict__.keys() == old.__dict__.keys()
        assert new.quant_state is old.quant_state and new.bnb_quantized and new._is_hf_initialized
        assert torch.equal(plain(new), plain(old))
        layer.weight = new
        assert torch.equal(layer(x), y)


def test_fp32_bias_with_16bit_compute():
    """bitsandbytes' test_linear_kbit_fp32_bias, our way: a float32 bias with float16 input
    gives a float16 output whose bias was added in float16. bitsandbytes casts the bias
    parameter itself to float16 in place (its test asserts bias.dtype == float16 after the
    forward); docs/FORMATS.md §10 says the bias parameter is never modified, so ours stays
    float32 (and keeps getting float32 gradients)."""
    layer = LinearNF4(32, 64).to("cpu")
    assert layer.weight.dtype == torch.uint8 and layer.bias.dtype == torch.float32
    for _ in range(3):
        x = torch.randn(16, 8, 32, dtype=torch.float16)
        y = layer(x)
        assert y.dtype == torch.float16 and y.shape == (16, 8, 64)
        assert layer.bias.dtype == torch.float32  # bitsandbytes: float16 here
    from qkernels.fourbit import matmul_4bit
    with torch.no_grad():
        expect = matmul_4bit(x, layer.weight, layer.weight.quant_state, bias=layer.bias.half())
    assert torch.equal(y, expect)
    y.float().sum().backward()
    assert layer.bias.grad.dtype == torch.float32
    no_bias = LinearNF4(32, 64, bias=False).to("cpu")
    assert no_bias(torch.randn(4, 32, dtype=torch.float16)).dtype == torch.float16
    assert no_bias.bias is None


def test_float32_compute_warnings():
    """bitsandbytes' slow-path warning: compute_dtype=float32 with 16-bit input runs the
    matmul in float32. "...slow inference." for one row, "...slow inference or training
    speed." for more; each message once (a warnings filter ignores repeats, as bitsandbytes),
    whatever the number of layers."""
    def net(**kw):
        return torch.nn.Sequential(*[LinearNF4(64, 64, **kw) for _ in range(10)]).to("cpu")

    with pytest.warns(UserWarning, match=r"inference or training"):
        net(compute_dtype=torch.float32)(torch.rand(10, 64, dtype=torch.float16))
    with pytest.warns(UserWarning, match=r"slow inference\.") as record:
        net(compute_dtype=torch.float32)(torch.rand(1, 64, dtype=torch.float16))
    assert not any("training" in str(r.message) for r in record)
    with pytest.warns(UserWarning) as record:
        net(compute_dtype=torch.float32)(torch.rand(10, 64, dtype=torch.float16))
        net(compute_dtype=torch.float32)(torch.rand(1, 64, dtype=torch.float16))
    assert len(record) == 2
    # compute_dtype=None follows the input: float16 input computes in float16, there is no
    # slow path and no warning. (bitsandbytes' newer test_4bit_linear_warnings expects one
    # here: bitsandbytes computes in float16 too in that case, so its "float32 (default)"
    # message does not describe what happens; we do not repeat it.)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net()(torch.rand(10, 64, dtype=torch.float16))
        net(compute_dtype=torch.float32)(torch.rand(10, 64))  # float32 input: float32 anyway


def test_weight_fix_after_lost_quant_state():
    """bitsandbytes' test_4bit_linear_weight_fsdp_fix on CPU: a weight whose quant_state was
    lost (FSDP's parameter handling) gets the layer's recorded state back on the next forward;
    so does packed data handed back as a plain tensor (FSDP1 after flattening)."""
    layer = Linear4bit(IN, OUT).to("cpu")
    state = layer.weight.quant_state
    assert layer.quant_state is state
    layer.weight.quant_state = None  # before any forward, as in bitsandbytes' test
    x = torch.randn(1, IN)
    y = layer(x)
    assert layer.weight.quant_state is state
    packed = torch.nn.Parameter(plain(layer.weight), requires_grad=False)
    layer.weight = packed
    x.requires_grad_(True)
    y2 = layer(x)
    assert torch.equal(y2, y) and layer.weight is packed  # the parameter is left as it was set
    y2.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(1, OUT) @ dequantize_4bit(packed.data, state))
    layer.weight = torch.nn.Parameter(torch.zeros(OUT, IN), requires_grad=False)
    with pytest.raises(TypeError, match="expected a Params4bit"):
        layer(x)
    lost = Linear4bit(IN, OUT).to("cpu")
    lost.weight.quant_state = lost.quant_state = None  # nothing left to restore from
    with pytest.raises(RuntimeError, match="no quant_state"):
        lost(x)


@pytest.mark.parametrize("quant_type,compress", [("nf4", True), ("fp4", False)])
def test_compile_with_activation_checkpointing(quant_type, compress):
    """Linear4bit under torch.compile(fullgraph=True) inside torch.utils.checkpoint (no graph
    break from the weight's accessors): outputs and input gradients equal eager's."""
    from torch.utils.checkpoint import checkpoint

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(*[Linear4bit(64, 64, quant_type=quant_type,
                                                           compress_statistics=compress,
                                                           compute_dtype=torch.bfloat16)
                                                for _ in range(3)])

        def forward(self, x):
            return checkpoint(self.layers, x, use_reentrant=False)

    torch.manual_seed(0)
    block = Block().to("cpu")
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    y_ref = block(x)
    y_ref.float().sum().backward()
    g_ref, x.grad = x.grad.clone(), None
    torch.compiler.reset()
    compiled = torch.compile(block, fullgraph=True)
    y = compiled(x)
    y.float().sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, g_ref)


# --- GPU (the lead runs these on the H100) ---------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 256])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gpu_forward_backward_matches_rule(dtype, rows, quant_type):
    """CUDA: fused kernel (rows <= 16) and dequantize + cuBLAS paths; error <= 2x torch's."""
    lin = _linear(dtype, seed=11, in_f=1024, out_f=768)
    layer = _ours(lin, quant_type, device="cuda")
    st = layer.weight.quant_state
    assert layer.weight.is_cuda and st.absmax.is_cuda and st.state2.absmax.is_cuda
    w = dequantize_4bit(layer.weight.data, st, out_dtype=torch.float32)
    x = torch.randn(rows, 1024, dtype=dtype, device="cuda", requires_grad=True)
    y = layer(x)
    plain = torch.nn.functional.linear(x.detach(), w.to(dtype), layer.bias.detach().to(dtype))
    bias = layer.bias.detach()
    assert _f64_error(y.detach(), x.detach(), w, bias) <= 2 * _f64_error(plain, x.detach(), w, bias)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.gpu
def test_gpu_moves_and_cpu_gpu_equality():
    lin = _linear(torch.bfloat16, seed=12)
    cpu = _ours(lin, "nf4")
    gpu = _ours(lin.cuda(), "nf4", device="cuda")
    for k, v in cpu.state_dict().items():
        assert torch.equal(v, gpu.state_dict()[k].cpu()), k  # quantization is bit-identical
    moved = copy.deepcopy(cpu).cuda()
    assert torch.equal(moved.weight.data.cpu(), cpu.weight.data)
    assert moved.weight.quant_state.absmax.is_cuda
    back = moved.cpu()
    assert torch.equal(back.weight.data, cpu.weight.data)
    fresh = LinearNF4(IN, OUT, device="cuda")
    fresh.load_state_dict(cpu.state_dict(), strict=True)
    assert fresh.weight.is_cuda and fresh.weight.quant_state.absmax.is_cuda


@pytest.mark.gpu
@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gpu_bnb_interchange(quant_type):
    lin = _linear(torch.bfloat16, seed=13, in_f=1024, out_f=512)
    b = bnb.nn.Linear4bit(1024, 512, quant_type=quant_type, compute_dtype=torch.bfloat16)
    b.load_state_dict(lin.state_dict())
    b = b.cuda()
    ours = Linear4bit(1024, 512, quant_type=quant_type, device="cuda")
    ours.load_state_dict(b.state_dict(), strict=True)
    w = dequantize_4bit(ours.weight.data, ours.weight.quant_state, out_dtype=torch.float32)
    for rows in (1, 64):
        x = torch.randn(rows, 1024, dtype=torch.bfloat16, device="cuda")
        with torch.no_grad():
            yb, yo = b(x), ours(x)
        bias = b.bias.detach()
        assert _f64_error(yo, x, w, bias) <= 2 * _f64_error(yb, x, w, bias)
    mine = _ours(lin.cuda(), quant_type, device="cuda")
    sd = mine.state_dict()
    theirs = _bnb_dequant(sd, "cuda")  # in the state's dtype (bf16): compare like with like
    assert torch.equal(theirs, dequantize_4bit(mine.weight.data, mine.weight.quant_state,
                                               out_dtype=theirs.dtype))
    b2 = _bnb_from_state_dict(sd, 1024, 512, device="cuda")
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        assert torch.allclose(b2(x).float(), mine(x).float(), rtol=2e-2, atol=2e-2)
