"""4-bit NF4/FP4: the reference against the definition, every backend against the
reference, matmul_4bit, and bitsandbytes where it is importable (docs/FORMATS.md §3, §4, §12)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qkernels.fourbit as qf
from reference import fourbit as ref
from reference.codebooks import fp4_map, midpoints, nf4_map
from reference.state import QuantState
from tests.conftest import gpu_backends
from tests.strategies import as_numpy, as_torch, float_arrays

blocksizes = st.sampled_from(ref.BLOCKSIZES_4BIT)
quant_types = st.sampled_from(ref.QUANT_TYPES)
ZERO = {"nf4": 7, "fp4": 0}


def definition(x32: np.ndarray, quant_type: str, blocksize: int):
    """docs/FORMATS.md §4 spelled out: searchsorted over the NF4 midpoints, the literal FP4
    decision tree; packed bytes (ceil(n/2),) and absmax. The slow, obvious oracle."""
    x = x32.reshape(-1)
    n = x.size
    xb = np.concatenate([x, np.zeros((-n) % blocksize, np.float32)]).reshape(-1, blocksize)
    absmax = np.max(np.abs(xb), axis=1).astype(np.float32)
    with np.errstate(all="ignore"):
        y = (xb * (np.float32(1) / absmax)[:, None]).astype(np.float32)
    y[np.isnan(y)] = 0.0
    if quant_type == "nf4":
        c = np.searchsorted(midpoints(nf4_map()), y, side="left")
    else:
        a, t = np.abs(y), [np.float32(v) for v in (0.00260417, 0.0859375, 0.20833333, 0.29166667,
                                                   0.4166667, 0.583333, 0.8333333)]
        mag = np.where(a > t[3], np.where(a > t[5], np.where(a > t[6], 3, 2), np.where(a > t[4], 5, 4)),
                       np.where(a > t[1], np.where(a > t[2], 7, 6), np.where(a > t[0], 1, 0)))
        c = mag | np.where(y < 0, 8, 0)
    c = c.reshape(-1)[:n].astype(np.uint8)
    if n % 2:
        c = np.append(c, np.uint8(ZERO[quant_type]))
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8), absmax


def unpack(packed_bytes: np.ndarray, n: int) -> np.ndarray:
    p = packed_bytes.reshape(-1).view(np.uint8)
    return np.stack([p >> 4, p & 15], axis=1).reshape(-1)[:n]


# --- the reference ------------------------------------------------------------------------

@given(float_arrays(specials=True), blocksizes, quant_types)
def test_reference_matches_definition(xd, blocksize, quant_type):
    x32, dtype = xd
    packed, state = ref.quantize_4bit(as_numpy(x32, dtype), blocksize, quant_type)
    want_packed, want_absmax = definition(x32, quant_type, blocksize)
    assert packed.shape == (want_packed.size, 1) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed.reshape(-1), want_packed)
    np.testing.assert_array_equal(state.absmax, want_absmax)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type) == \
        (x32.shape, dtype, blocksize, quant_type)
    # dequantization is exactly code[nibble] * absmax[block], rounded once to the dtype
    code = nf4_map() if quant_type == "nf4" else fp4_map()
    block = np.arange(x32.size) // blocksize
    with np.errstate(invalid="ignore"):
        want = (code[unpack(want_packed, x32.size)] * want_absmax[block]).astype(np.float32)
    out = ref.dequantize_4bit(packed, state, out_dtype="float32")
    np.testing.assert_array_equal(out.reshape(-1), want)
    assert ref.dequantize_4bit(packed, state).dtype == as_numpy(x32[:0], dtype).dtype


@given(float_arrays(), blocksizes)
def test_nf4_codes_are_nearest(xd, blocksize):
    x32, dtype = xd
    packed, state = ref.quantize_4bit(as_numpy(x32, dtype), blocksize, "nf4")
    c = unpack(packed, x32.size).astype(int)
    absmax = state.absmax[np.arange(x32.size) // blocksize]
    with np.errstate(all="ignore"):
        y = x32.reshape(-1) * (np.float32(1) / absmax)
    y = np.where(np.isfinite(y), y, 0).astype(np.float64)
    code = nf4_map().astype(np.float64)
    err = np.abs(code[c] - y)
    for step in (-1, 1):
        assert (err <= np.abs(code[np.clip(c + step, 0, 15)] - y)).all()


@pytest.mark.parametrize("quant_type", ref.QUANT_TYPES)
def test_special_values_stay_in_their_block(quant_type):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64 * 6).astype(np.float32)
    x[64:128] = 0.0            # all-zero block
    x[130] = np.nan            # NaN block
    x[200] = np.inf            # Inf blocks
    x[260] = -np.inf
    packed, state = ref.quantize_4bit(x, 64, quant_type)
    out = ref.dequantize_4bit(packed, state)
    assert (out[64:128] == 0).all() and not np.signbit(out[64:128]).any()
    assert (unpack(packed, x.size)[64:128] == ZERO[quant_type]).all()
    assert np.isnan(state.absmax[2]) and state.absmax[3] == np.inf and state.absmax[4] == np.inf
    assert np.isnan(out[128:320]).all()   # the non-finite blocks dequantize to NaN
    clean = x.copy()
    clean[64:320] = 1.0
    p2, _ = ref.quantize_4bit(clean, 64, quant_type)
    np.testing.assert_array_equal(packed[:32], p2[:32])
    np.testing.assert_array_equal(packed[160:], p2[160:])
    assert np.isfinite(out[:64]).all() and np.isfinite(out[320:]).all()


def test_special_values_with_double_quant_stay_in_their_nested_block():
    """A NaN block poisons only the 256 blocks that share its nested block (the offset is
    the mean of the finite absmax values), never the rest of the tensor."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(64 * 256 * 3).astype(np.float32)
    x[64 * 256 + 5] = np.nan
    packed, state = ref.quantize_4bit(x, 64, "nf4", compress_statistics=True)
    out = ref.dequantize_4bit(packed, state)
    assert np.isfinite(state.offset)
    assert np.isnan(out[64 * 256:2 * 64 * 256]).all()
    assert np.isfinite(out[:64 * 256]).all() and np.isfinite(out[2 * 64 * 256:]).all()
    x[64 * 256 + 5] = 0.0
    _, clean = ref.quantize_4bit(x[:64 * 256], 64, "nf4", compress_statistics=True)
    assert np.isfinite(ref.dequantize_4bit(*ref.quantize_4bit(x, 64, "nf4", True))).all()


@pytest.mark.parametrize("quant_type", ref.QUANT_TYPES)
def test_double_quant_matches_definition(quant_type):
    from reference.blockwise import quantize_blockwise
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((300, 77)) * rng.uniform(0.1, 10, (300, 1))).astype(np.float32)
    packed, state = ref.quantize_4bit(x, 32, quant_type, compress_statistics=True)
    plain_packed, plain = ref.quantize_4bit(x, 32, quant_type)
    np.testing.assert_array_equal(packed, plain_packed)
    offset = np.float32(plain.absmax.mean(dtype=np.float64))
    codes, s2 = quantize_blockwise(plain.absmax - offset, blocksize=256)
    assert state.offset == float(offset) and state.state2.blocksize == 256
    np.testing.assert_array_equal(state.absmax, codes)
    np.testing.assert_array_equal(state.state2.absmax, s2.absmax)
    got = ref.dequantize_4bit(packed, state)
    want = ref.dequantize_4bit(plain_packed, plain)
    assert np.abs(got - want).max() <= 0.02 * np.abs(x).max()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 63, 64, 65, 127])
@pytest.mark.parametrize("storage,itemsize", [("uint8", 1), ("float16", 2), ("bfloat16", 2),
                                              ("float32", 4), ("int32", 4), ("int64", 8)])
def test_quant_storage_and_odd_sizes(n, storage, itemsize):
    x = np.linspace(-3, 2, n, dtype=np.float32)
    p8, s8 = ref.quantize_4bit(x, 32, "nf4")
    p, s = ref.quantize_4bit(x, 32, "nf4", quant_storage=storage)
    m = (n + 1) // 2
    assert p8.shape == (m, 1)
    assert p.shape == (-(-m // itemsize), 1) and p.dtype.name == storage
    raw = np.ascontiguousarray(p).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(raw[:m], p8.reshape(-1))
    assert (raw[m:] == 0).all()
    if n % 2:
        assert raw[m - 1] & 15 == 7                     # the pad nibble is the code of 0.0
    np.testing.assert_array_equal(ref.dequantize_4bit(p, s), ref.dequantize_4bit(p8, s8))
    np.testing.assert_array_equal(ref.dequantize_4bit(p8.reshape(1, -1), s8), ref.dequantize_4bit(p8, s8))
    got = qf.dequantize_4bit(*qf.quantize_4bit(x, 32, "nf4", quant_storage=storage))
    np.testing.assert_array_equal(got, ref.dequantize_4bit(p8, s8))
    assert s.absmax.shape == (-(-n // 32),)


def test_empty_noncontiguous_bf16_and_shorthands():
    packed, state = qf.quantize_nf4(np.zeros((0, 5), np.float16))
    assert packed.shape == (0, 1) and state.absmax.shape == (0,)
    assert qf.dequantize_nf4(packed, state).shape == (0, 5)
    x = np.random.default_rng(4).standard_normal((50, 30)).astype(np.float32)
    a, _ = qf.quantize_fp4(x.T, 64)
    b, _ = qf.quantize_fp4(np.ascontiguousarray(x.T), 64)
    np.testing.assert_array_equal(a, b)
    import ml_dtypes
    xb = x.astype(ml_dtypes.bfloat16)
    pb, sb = qf.quantize_nf4(xb, 64)
    back = qf.dequantize_nf4(pb, sb)
    assert back.dtype == xb.dtype and sb.dtype == "bfloat16" and back.shape == x.shape
    with pytest.raises(ValueError, match="needs an fp4 state"):
        qf.dequantize_fp4(pb, sb)


@pytest.mark.parametrize("quant_type", ref.QUANT_TYPES)
def test_error_bounds_from_bitsandbytes_tests(quant_type):
    """docs/FORMATS.md §14: randn 1024^2, blocksize 64: mean abs error NF4 <= 0.0728, FP4 <= 0.0965."""
    x = np.random.default_rng(5).standard_normal((1024, 1024)).astype(np.float32)
    out = ref.dequantize_4bit(*ref.quantize_4bit(x, 64, quant_type))
    assert np.abs(out - x).mean() <= {"nf4": 0.0728, "fp4": 0.0965}[quant_type]


def test_bad_input_is_rejected_before_work():
    x = np.ones(100, np.float32)
    with pytest.raises(ValueError, match="blocksize must be one of 32, 64"):
        qf.quantize_4bit(x, blocksize=100)
    with pytest.raises(ValueError, match="blocksize must be one of .*got 63"):
        qf.quantize_4bit(x, blocksize=63)
    with pytest.raises(ValueError, match="blocksize must be one of .*got 16"):
        qf.quantize_4bit(x, blocksize=16)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'; got 'int4'"):
        qf.quantize_4bit(x, quant_type="int4")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32; got dtype float64"):
        qf.quantize_4bit(x.astype(np.float64))
    with pytest.raises(TypeError, match="got dtype int32"):
        qf.quantize_4bit(x.astype(np.int32))
    with pytest.raises(TypeError, match="quant_storage must be one of"):
        qf.quantize_4bit(x, quant_storage="complex64")
    with pytest.raises(TypeError, match="expected a NumPy"):
        qf.quantize_4bit([1.0, 2.0])
    packed, state = qf.quantize_4bit(x, blocksize=64, quant_type="nf4")
    with pytest.raises(ValueError, match="packed holds 51 bytes"):
        qf.dequantize_4bit(np.zeros(51, np.uint8), state)
    with pytest.raises(TypeError, match="packed must hold uint8"):
        qf.dequantize_4bit(packed.astype(np.float64).astype(np.complex64), state)
    with pytest.raises(TypeError, match="QuantState"):
        qf.dequantize_4bit(packed, {"absmax": state.absmax})
    for field, value, match in [("blocksize", 128, "absmax has 2 blocks but 100 elements"),
                                ("blocksize", 48, "blocksize must be one of"),
                                ("shape", (10, 11), "needs 55"),
                                ("quant_type", None, "quant_type must be"),
                                ("dtype", "float64", "state.dtype must be float16"),
                                ("code", np.zeros(256, np.float32), r"code must have shape \(16,\)")]:
        bad = QuantState(**{**state.__dict__, field: value})
        with pytest.raises((ValueError, TypeError), match=match):
            qf.dequantize_4bit(packed, bad)
    bad = QuantState(**{**state.__dict__, "absmax": state.absmax.astype(np.float16)})
    with pytest.raises(TypeError, match="state.absmax must be float32"):
        qf.dequantize_4bit(packed, bad)
    with pytest.raises(ValueError, match="matches neither dimension"):
        w, ws = qf.quantize_4bit(np.ones((8, 32), np.float32), 32, "nf4")
        qf.matmul_4bit(np.ones((2, 31), np.float32), w, ws)
    with pytest.raises(ValueError, match="bias must have 8 elements"):
        qf.matmul_4bit(np.ones((2, 32), np.float32), w, ws, bias=np.ones(7, np.float32))
    with pytest.raises(TypeError, match="x must be float16"):
        qf.matmul_4bit(np.ones((2, 32), np.float64), w, ws)


def test_state_on_another_device_is_rejected():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    packed, state = qf.quantize_4bit(torch.randn(64, 64), 64, "nf4")
    with pytest.raises(ValueError, match="on the host but packed is on cuda:0"):
        qf.dequantize_4bit(packed.cuda(), state)


def test_torch_cpu_in_torch_out():
    torch = pytest.importorskip("torch")
    x32 = np.random.default_rng(6).standard_normal((33, 17)).astype(np.float32)
    for dtype in ("float16", "bfloat16", "float32"):
        t = as_torch(x32, dtype)
        for nested in (False, True):
            packed, state = qf.quantize_4bit(t, 64, "nf4", compress_statistics=nested,
                                             quant_storage="bfloat16")
            assert isinstance(packed, torch.Tensor) and packed.dtype == torch.bfloat16
            want, wstate = ref.quantize_4bit(as_numpy(t.float().numpy(), dtype), 64, "nf4", nested)
            np.testing.assert_array_equal(packed.view(torch.uint8).numpy().reshape(-1)[:want.size],
                                          want.reshape(-1))
            out = qf.dequantize_4bit(packed, state)
            assert out.dtype == getattr(torch, dtype) and out.shape == t.shape
            f32 = ref.dequantize_4bit(want, wstate, out_dtype="float32")
            np.testing.assert_array_equal(out.float().numpy(), as_torch(f32, dtype).float().numpy())


def test_state_dict_roundtrip_ours():
    x = np.random.default_rng(7).standard_normal((64, 96)).astype(np.float32)
    for nested in (False, True):
        packed, state = ref.quantize_4bit(x, 64, "fp4", nested)
        back = QuantState.from_dict({"weight." + k: v for k, v in state.as_dict(packed=True).items()})
        np.testing.assert_array_equal(ref.dequantize_4bit(packed, back), ref.dequantize_4bit(packed, state))


# --- matmul_4bit --------------------------------------------------------------------------

@given(st.integers(1, 5), st.sampled_from([32, 64, 96, 200]), st.integers(1, 40), blocksizes,
       quant_types, st.booleans(), st.booleans(), st.integers(0, 2**31))
def test_matmul_4bit_reference(rows, k, n_out, blocksize, quant_type, nested, with_bias, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    packed, state = ref.quantize_4bit(w, blocksize, quant_type, nested)
    wd = ref.dequantize_4bit(packed, state, out_dtype="float32").astype(np.float64)
    exact = x.astype(np.float64) @ wd.T + (0 if bias is None else bias)
    got = qf.matmul_4bit(x, packed, state, bias)
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    # float32 accumulation over k terms: the error scales with sum |x_i w_i| (k * eps32 <= 1.2e-5
    # of it for k <= 200), not with the result, which cancellation can make arbitrarily small
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(wd).T + (0 if bias is None else np.abs(bias))
    assert np.all(np.abs(got - exact) <= 1.2e-5 * magnitude + 1e-30)
    x16 = x.reshape(1, rows, k).astype(np.float16)
    got16 = ref.matmul_4bit(x16, packed, state)
    assert got16.shape == (1, rows, n_out) and got16.dtype == np.float16


def test_matmul_4bit_transposed_weight_warns():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 32)).astype(np.float32)     # (in, out): quantized transposed
    x = rng.standard_normal((3, 64)).astype(np.float32)
    packed, state = ref.quantize_4bit(w, 64, "nf4")
    with pytest.warns(DeprecationWarning, match="transposed"):
        got = qf.matmul_4bit(x, packed, state)
    np.testing.assert_allclose(got, x @ ref.dequantize_4bit(packed, state), rtol=1e-5, atol=1e-4)


def test_matmul_4bit_torch_cpu():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    w = torch.from_numpy(rng.standard_normal((48, 64)).astype(np.float32)).bfloat16()
    x = torch.from_numpy(rng.standard_normal((2, 3, 64)).astype(np.float32)).bfloat16()
    packed, state = qf.quantize_4bit(w, 64, "nf4", compress_statistics=True)
    got = qf.matmul_4bit(x, packed, state, bias=torch.ones(48, dtype=torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 48)
    wd = qf.dequantize_4bit(packed, state, out_dtype="float32").double()
    exact = x.double() @ wd.T + 1
    assert (got.double() - exact).abs().max() <= 0.5 * 2 ** -7 * exact.abs().max() + 1e-6


# --- GPU backends: bit-identical to the reference ------------------------------------------

def _check_state_equal(state, want):
    np.testing.assert_array_equal(state.absmax.cpu().numpy(), want.absmax)
    assert (state.state2 is None) == (want.state2 is None)
    if want.state2 is not None:
        assert np.float32(float(state.offset)) == np.float32(want.offset)
        np.testing.assert_array_equal(state.state2.absmax.cpu().numpy(), want.state2.absmax)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
@given(xd=float_arrays(specials=True), blocksize=blocksizes, quant_type=quant_types,
       nested=st.booleans())
def test_gpu_backend_matches_reference(backend, xd, blocksize, quant_type, nested):
    import qkernels
    x32, dtype = xd
    want, wstate = ref.quantize_4bit(as_numpy(x32, dtype), blocksize, quant_type, nested)
    want_out = ref.dequantize_4bit(want, wstate, out_dtype="float32")
    t = as_torch(x32, dtype, "cuda")
    with qkernels.use_backend(backend):
        packed, state = qf.quantize_4bit(t, blocksize, quant_type, nested)
        out = qf.dequantize_4bit(packed, state)
        out_of_ref = qf.dequantize_4bit(as_torch_bytes(want), to_cuda_state(wstate))
    assert packed.is_cuda and out.is_cuda and out.dtype == t.dtype and out.shape == t.shape
    np.testing.assert_array_equal(packed.cpu().numpy(), want)
    _check_state_equal(state, wstate)
    want_t = as_torch(want_out, dtype).float().numpy()
    np.testing.assert_array_equal(out.float().cpu().numpy(), want_t)
    np.testing.assert_array_equal(out_of_ref.float().cpu().numpy(), want_t)


def as_torch_bytes(packed_np):
    import torch
    return torch.from_numpy(np.ascontiguousarray(packed_np)).cuda()


def to_cuda_state(state: QuantState) -> QuantState:
    """A reference state on the GPU (offset stays a Python float, as after from_dict)."""
    import torch
    cu = lambda a: torch.from_numpy(np.ascontiguousarray(a)).cuda()  # noqa: E731
    s2 = state.state2
    return QuantState(absmax=cu(state.absmax), shape=state.shape, code=cu(state.code),
                      dtype=state.dtype, blocksize=state.blocksize, quant_type=state.quant_type,
                      offset=state.offset, state2=None if s2 is None else QuantState(
                          absmax=cu(s2.absmax), code=cu(s2.code), dtype=s2.dtype,
                          blocksize=s2.blocksize))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
def test_gpu_large_misaligned_all_blocksizes(backend):
    import torch
    import qkernels
    rng = np.random.default_rng(10)
    x32 = (rng.standard_normal(3 * 4096 * 5 + 1001) * 3).astype(np.float32)
    x32[4096:8192] = 0.0
    x32[9000] = np.nan
    for dtype in ("float16", "bfloat16", "float32"):
        base = as_torch(x32, dtype, "cuda")
        for t in (base, base[1:]):   # base[1:] is 2 or 4 bytes off alignment: the scalar path
            host = as_numpy(t.float().cpu().numpy(), dtype)
            # every blocksize for bfloat16; the extremes for the others (each template
            # instance is one NVRTC compile)
            for blocksize in ref.BLOCKSIZES_4BIT if dtype == "bfloat16" else (32, 64, 4096):
                for quant_type in ref.QUANT_TYPES:
                    want, ws = ref.quantize_4bit(host, blocksize, quant_type)
                    with qkernels.use_backend(backend):
                        packed, state = qf.quantize_4bit(t, blocksize, quant_type)
                        out = qf.dequantize_4bit(packed, state)
                        out32 = qf.dequantize_4bit(packed, state, out_dtype="float32")
                    np.testing.assert_array_equal(packed.cpu().numpy(), want)
                    np.testing.assert_array_equal(state.absmax.cpu().numpy(), ws.absmax)
                    wo = ref.dequantize_4bit(want, ws, out_dtype="float32")
                    np.testing.assert_array_equal(out.float().cpu().numpy(),
                                                  as_torch(wo, dtype).float().numpy())
                    np.testing.assert_array_equal(out32.cpu().numpy(), wo)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
def test_gpu_tiny_absmax_blocks(backend):
    """Blocks whose absmax is subnormal (1 / absmax = inf: a zero in them codes as 0.0 via
    NaN) or barely normal, beside ordinary blocks: the kernels' fast path (no NaN check)
    must not take them. float32 and bfloat16 (float32's exponent range)."""
    import torch
    import qkernels
    tiny = np.float32(1e-40)  # subnormal
    blocks = [np.full(64, tiny), np.full(64, np.float32(2e-38)), np.linspace(-1, 1, 64)]
    x32 = np.concatenate(blocks).astype(np.float32)
    x32[1::3] = 0.0
    x32[64 + 5] = -np.float32(3e-39)
    for dtype in ("float32", "bfloat16"):
        host = as_numpy(as_torch(x32, dtype).float().numpy(), dtype)
        t = as_torch(x32, dtype, "cuda")
        for quant_type in ref.QUANT_TYPES:
            want, ws = ref.quantize_4bit(host, 64, quant_type)
            with qkernels.use_backend(backend):
                packed, state = qf.quantize_4bit(t, 64, quant_type)
            np.testing.assert_array_equal(packed.cpu().numpy(), want)
            np.testing.assert_array_equal(state.absmax.cpu().numpy(), ws.absmax)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
def test_gpu_quant_storage_and_misaligned_packed(backend):
    import torch
    import qkernels
    x = torch.randn(4097, device="cuda", dtype=torch.float16)
    want, ws = ref.quantize_4bit(x.cpu().numpy(), 64, "fp4")
    for storage in (torch.uint8, torch.bfloat16, torch.float32, torch.int64):
        with qkernels.use_backend(backend):
            packed, state = qf.quantize_4bit(x, 64, "fp4", quant_storage=storage)
            out = qf.dequantize_4bit(packed, state)
        assert packed.dtype == storage and packed.shape[1] == 1
        raw = packed.view(torch.uint8).reshape(-1).cpu().numpy()
        np.testing.assert_array_equal(raw[:want.size], want.reshape(-1))
        assert (raw[want.size:] == 0).all()
        np.testing.assert_array_equal(out.cpu().numpy(), ref.dequantize_4bit(want, ws))
    # packed bytes at an odd address (a view into a larger buffer): the scalar path
    buf = torch.zeros(want.size + 1, dtype=torch.uint8, device="cuda")
    buf[1:] = torch.from_numpy(want.reshape(-1)).cuda()
    with qkernels.use_backend(backend):
        out = qf.dequantize_4bit(buf[1:], to_cuda_state(ws))
    np.testing.assert_array_equal(out.cpu().numpy(), ref.dequantize_4bit(want, ws))


@pytest.mark.gpu
def test_gpu_stream_graph_capture_and_device():
    """Quantize (with double quant) and dequantize run on torch's current stream without a
    host sync, so a CUDA graph captures them."""
    import torch
    x = torch.randn(1 << 16, device="cuda", dtype=torch.bfloat16)
    for nested in (False, True):
        qf.quantize_4bit(x, 64, "nf4", nested)  # compile outside the capture
        packed, state = qf.quantize_4bit(x, 64, "nf4", nested)
        qf.dequantize_4bit(packed, state)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            packed, state = qf.quantize_4bit(x, 64, "nf4", nested)
            out = qf.dequantize_4bit(packed, state)
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        want, ws = ref.quantize_4bit(as_numpy(x.float().cpu().numpy(), "bfloat16"), 64, "nf4", nested)
        np.testing.assert_array_equal(packed.cpu().numpy(), want)
        want_out = ref.dequantize_4bit(want, ws, out_dtype="float32")
        np.testing.assert_array_equal(out.float().cpu().numpy(),
                                      as_torch(want_out, "bfloat16").float().numpy())
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        packed, state = qf.quantize_4bit(x, 128, "fp4")
        out = qf.dequantize_4bit(packed, state)
    side.synchronize()
    want, _ = ref.quantize_4bit(as_numpy(x.float().cpu().numpy(), "bfloat16"), 128, "fp4")
    np.testing.assert_array_equal(packed.cpu().numpy(), want)
    if torch.cuda.device_count() > 1:
        x1 = x.to("cuda:1")
        p1, s1 = qf.quantize_4bit(x1, 128, "fp4")
        assert p1.device == x1.device and s1.absmax.device == x1.device
        np.testing.assert_array_equal(p1.cpu().numpy(), want)


def _linear_errors(x, w_f32, bias, got):
    """(max |ours - exact|, max |torch low precision - exact|, half an output ulp at the
    largest |exact|): FlashAttention's rule compares the first with twice the second; the
    third is the rounding every output in x's dtype carries."""
    import torch
    exact = x.double() @ w_f32.double().T + (0 if bias is None else bias.double())
    plain = torch.nn.functional.linear(x, w_f32.to(x.dtype), bias)
    ulp = {torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8, torch.float32: 2 ** -24}[x.dtype]
    return ((got.double() - exact).abs().max().item(), (plain.double() - exact).abs().max().item(),
            ulp * exact.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(256, 4096), (96, 96), (4096 + 8, 320), (64, 64 + 32), (40, 200)])
@pytest.mark.parametrize("fused_max_rows", [8, 16])
def test_gpu_matmul_4bit(dtype, shape, fused_max_rows, monkeypatch):
    """Fused kernel (rows <= FUSED_MAX_ROWS, K % 32 == 0) and the dequantize + GEMM path
    against the float64 product of the same dequantized weight; blocks that span rows
    (K < blocksize or K not a multiple of it), nested statistics, bias. One row of x takes
    gemv_4bit; up to FUSED_MAX_ROWS (8 or 16) rows the CUDA-core matmul_4bit, except where
    choose_kernel prefers the tensor-core kernel (16-bit x from 8 rows; forced runs of both
    kernels at 2-64 rows: tests/test_fourbit_mma.py test_gpu_mma_configs)."""
    import torch
    monkeypatch.setattr(qf, "FUSED_MAX_ROWS", fused_max_rows)
    tdt = getattr(torch, dtype)
    n_out, k = shape
    rng = np.random.default_rng(n_out * 7 + k)
    w = torch.from_numpy(rng.standard_normal((n_out, k)).astype(np.float32)).cuda().to(tdt)
    for blocksize, quant_type, nested in [(64, "nf4", False), (32, "fp4", True), (256, "nf4", True),
                                          (4096, "fp4", False)]:
        packed, state = qf.quantize_4bit(w, blocksize, quant_type, nested)
        w32 = qf.dequantize_4bit(packed, state, out_dtype="float32")
        for rows in (1, 2, 3, 5, 8, 13, 16, 17, 64):
            x = torch.randn(rows, k, device="cuda", dtype=tdt)
            bias = torch.randn(n_out, device="cuda", dtype=tdt) if rows % 2 else None
            got = qf.matmul_4bit(x, packed, state, bias)
            assert got.shape == (rows, n_out) and got.dtype == tdt
            ours, plain, half_ulp = _linear_errors(x, w32, bias, got)
            assert ours <= 2 * plain + half_ulp, (blocksize, quant_type, nested, rows, ours, plain)
        x3 = torch.randn(2, 3, k, device="cuda", dtype=tdt)
        got3 = qf.matmul_4bit(x3, packed, state)
        assert got3.shape == (2, 3, n_out)
        torch.testing.assert_close(got3.reshape(6, n_out), qf.matmul_4bit(x3.reshape(6, k), packed, state))


@pytest.mark.gpu
def test_gpu_matmul_4bit_torch_hot_path_graph_and_stream():
    import torch
    from qkernels.blockwise import dequantize_blockwise
    from qkernels.fourbit import _cupy
    w = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    packed, state = qf.quantize_4bit(w, 64, "nf4", compress_statistics=True)
    # the float32 absmax of the nested state, as bitsandbytes' dequantize_4bit forms it
    absmax = (dequantize_blockwise(state.absmax, state.state2, out_dtype="float32") + state.offset).contiguous()
    w32 = qf.dequantize_4bit(packed, state, out_dtype="float32")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    y = _cupy.matmul_4bit_torch(x, packed, absmax, state.code, blocksize=64, out_features=4096, bias=bias)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = _cupy.matmul_4bit_torch(x, packed, absmax, state.code, blocksize=64, out_features=4096, bias=bias)
    x2 = torch.randn_like(x)
    x.copy_(x2)
    g.replay()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ys = _cupy.matmul_4bit_torch(x, packed, absmax, state.code, blocksize=64, out_features=4096, bias=bias)
    side.synchronize()
    torch.cuda.synchronize()
    ours, plain, half_ulp = _linear_errors(x, w32, bias, yg)
    assert ours <= 2 * plain + half_ulp
    assert torch.equal(yg, ys)
    assert not torch.equal(y, yg)


@pytest.mark.gpu
def test_gpu_matmul_4bit_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(11)
    w = rng.standard_normal((128, 256)).astype(np.float32)
    packed, state = qf.quantize_4bit(cupy.asarray(w), 64, "nf4")
    x = cupy.asarray(rng.standard_normal((4, 256)).astype(np.float32))
    got = qf.matmul_4bit(x, packed, state)
    assert isinstance(got, cupy.ndarray) and got.shape == (4, 128)
    wd = ref.dequantize_4bit(packed.get(), QuantState(**{**state.__dict__, "absmax": state.absmax.get(),
                                                        "code": state.code.get()}))
    np.testing.assert_allclose(got.get(), x.get() @ wd.T, rtol=1e-4, atol=1e-4)


# --- bitsandbytes: formats interchange ------------------------------------------------------

@pytest.fixture
def F():
    """bitsandbytes.functional with torch.compile off: its CPU fallbacks are wrapped in
    torch.compile, which costs tens of seconds per new shape on 2 cores and changes nothing."""
    functional = pytest.importorskip("bitsandbytes.functional")
    import torch
    with torch._dynamo.config.patch(disable=True):
        yield functional


def _good_full_blocks(x32, blocksize):
    """Per element: in a full block that is finite and not all zero (docs/FORMATS.md §12-§13: byte
    comparisons with bitsandbytes mask the blocks where it is undefined; its CPU path divides
    instead of multiplying by the reciprocal in a partial last block)."""
    n = x32.size
    xb = np.concatenate([x32.reshape(-1), np.zeros((-n) % blocksize, np.float32)]).reshape(-1, blocksize)
    ok = np.isfinite(xb).all(1) & (np.abs(xb).max(1) > 0)
    ok[n // blocksize:] = False
    return np.repeat(ok, blocksize)[:n]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_against_bitsandbytes(F, dtype, blocksize, quant_type):
    import torch
    rng = np.random.default_rng(blocksize + len(dtype))
    x32 = (rng.standard_normal(blocksize * 24 + 34) * rng.uniform(0.01, 50)).astype(np.float32)
    x32[:blocksize] = 0.0
    t = as_torch(x32, dtype)
    q_bnb, s_bnb = F.quantize_4bit(t, blocksize=blocksize, quant_type=quant_type)
    ours, state = qf.quantize_4bit(t, blocksize, quant_type)
    assert ours.shape == q_bnb.shape and ours.dtype == q_bnb.dtype
    ok = _good_full_blocks(t.float().numpy(), blocksize)
    a, b = unpack(ours.numpy(), x32.size)[ok], unpack(q_bnb.numpy(), x32.size)[ok]
    if quant_type == "nf4":
        np.testing.assert_array_equal(a, b)       # NF4: bit-identical
    else:
        same = (a == b) | ((a & 7) == 0) & ((b & 7) == 0)   # nibbles 0 and 8 are both zero
        assert same.mean() >= 0.999
        code = fp4_map()
        absmax = np.repeat(state.absmax.numpy(), blocksize)[:x32.size][ok]
        y = t.float().numpy()[ok] / absmax
        ulp = np.spacing(np.abs(y).astype(np.float32))
        assert (np.abs(code[a] - y) <= np.abs(code[b] - y) + ulp).all()   # never farther
    full = x32.size // blocksize
    np.testing.assert_array_equal(s_bnb.absmax.numpy()[1:full], state.absmax.numpy()[1:full])
    # the same bytes and state dequantize identically in both libraries (bitsandbytes' CPU
    # path returns (1, n) for even-length 1-D input; we return state.shape)
    theirs = QuantState.from_dict(s_bnb.as_dict(packed=True))
    got = qf.dequantize_4bit(q_bnb, theirs)
    assert got.shape == t.shape
    assert torch.equal(got, F.dequantize_4bit(q_bnb, s_bnb).reshape(-1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
# (64, 96) is left out: bitsandbytes' native CPU dequantizer restarts blocks at every row
# when the last dimension is not a multiple of the blocksize (its CUDA kernel and the format
# are flat, as ours), so it disagrees with its own quantizer there.
@pytest.mark.parametrize("shape", [(64, 128), (7, 33)])
def test_state_dict_interchange_with_bitsandbytes(F, quant_type, nested, shape):
    import torch
    rng = np.random.default_rng(12)
    t = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).bfloat16()
    # bitsandbytes -> ours
    q_bnb, s_bnb = F.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    d_bnb = {"weight." + k: v for k, v in s_bnb.as_dict(packed=True).items()}
    ours_state = QuantState.from_dict(d_bnb)
    assert ours_state.quant_type == quant_type and ours_state.shape == shape
    assert torch.equal(qf.dequantize_4bit(q_bnb, ours_state), F.dequantize_4bit(q_bnb, s_bnb))
    # ours -> bitsandbytes
    packed, state = qf.quantize_4bit(t, 64, quant_type, compress_statistics=nested)
    d_ours = state.as_dict(packed=True)
    assert set(d_ours) == set(s_bnb.as_dict(packed=True))
    key = f"quant_state.bitsandbytes__{quant_type}"
    rec_ours = bytes(d_ours[key].numpy().tolist()).decode()
    rec_bnb = bytes(s_bnb.as_dict(packed=True)[key].tolist()).decode()
    import json
    r_ours, r_bnb = json.loads(rec_ours), json.loads(rec_bnb)
    assert list(r_ours) == list(r_bnb)
    assert {k: v for k, v in r_ours.items() if k != "nested_offset"} == \
        {k: v for k, v in r_bnb.items() if k != "nested_offset"}
    bnb_state = F.QuantState.from_dict(dict(d_ours), device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(packed, bnb_state), qf.dequantize_4bit(packed, state))
