"""Blockwise 8-bit quantization: the reference against the definition, every backend against
the reference, and bitsandbytes where it is importable (docs/FORMATS.md §2)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qkernels
from reference import blockwise as ref
from reference.codebooks import get_code, midpoints
from reference.state import QuantState
from tests.conftest import gpu_backends
from tests.strategies import as_numpy, as_torch, float_arrays

MAPS = ("dynamic_signed", "dynamic_unsigned", "linear_signed", "fp8_e4m3", "fp8_e5m2")
blocksizes = st.sampled_from(ref.BLOCKSIZES)


def definition(x32: np.ndarray, code: np.ndarray, blocksize: int):
    """docs/FORMATS.md §2 spelled out with np.searchsorted: the slow, obvious oracle."""
    x = x32.reshape(-1)
    n = x.size
    pad = (-n) % blocksize
    xb = np.concatenate([x, np.zeros(pad, np.float32)]).reshape(-1, blocksize)
    absmax = np.max(np.abs(xb), axis=1).astype(np.float32)
    with np.errstate(all="ignore"):
        y = (xb * (np.float32(1) / absmax)[:, None]).astype(np.float32)
    y[np.isnan(y)] = 0.0
    codes = np.searchsorted(midpoints(code), y, side="left").astype(np.uint8)
    return codes.reshape(-1)[:n], absmax


@given(float_arrays(specials=True), blocksizes, st.sampled_from(MAPS))
def test_reference_matches_definition(xd, blocksize, code_name):
    x32, dtype = xd
    code = get_code(code_name)
    codes, state = ref.quantize_blockwise(as_numpy(x32, dtype), code=code, blocksize=blocksize)
    want_codes, want_absmax = definition(x32, code, blocksize)
    assert codes.shape == x32.shape and codes.dtype == np.uint8
    np.testing.assert_array_equal(codes.reshape(-1), want_codes)
    np.testing.assert_array_equal(state.absmax, want_absmax)
    assert state.dtype == dtype and state.blocksize == blocksize and state.shape == x32.shape


@given(float_arrays(), blocksizes)
def test_codes_are_nearest_and_dequantize_is_exact(xd, blocksize):
    x32, dtype = xd
    code = get_code("dynamic_signed")
    codes, state = ref.quantize_blockwise(as_numpy(x32, dtype), blocksize=blocksize)
    flat, absmax = codes.reshape(-1), state.absmax
    block = np.arange(flat.size) // blocksize
    with np.errstate(all="ignore"):
        y = x32.reshape(-1) * (np.float32(1) / absmax)[block]
    y = np.where(np.isfinite(y), y, 0).astype(np.float64)
    err = np.abs(code[flat] - y)
    # the rule decides by float32 midpoints, which may sit half an ulp off the exact middle:
    # a value on one goes to the lower code, at most one float32 ulp of y farther (docs/FORMATS.md §2.3)
    ulp = np.spacing(np.abs(y).astype(np.float32)).astype(np.float64)
    for step in (-1, 1):
        other = np.clip(flat.astype(int) + step, 0, 255)
        assert (err <= np.abs(code[other] - y) + ulp).all()
    out = ref.dequantize_blockwise(codes, state, out_dtype="float32")
    np.testing.assert_array_equal(out.reshape(-1), (code[flat] * absmax[block]).astype(np.float32))


def test_special_values_stay_in_their_block():
    rng = np.random.default_rng(1)
    x = rng.standard_normal(64 * 6).astype(np.float32)
    x[64:128] = 0.0            # all-zero block
    x[130] = np.nan            # NaN block
    x[200] = np.inf            # Inf block
    x[260] = -np.inf
    codes, state = ref.quantize_blockwise(x, blocksize=64)
    out = ref.dequantize_blockwise(codes, state)
    assert (out[64:128] == 0).all() and (codes[64:128] == 127).all()
    assert np.isnan(state.absmax[2]) and state.absmax[3] == np.inf and state.absmax[4] == np.inf
    assert np.isnan(out[128:320]).all()   # the three non-finite blocks dequantize to NaN
    clean = x.copy()
    clean[64:320] = 1.0
    c2, s2 = ref.quantize_blockwise(clean, blocksize=64)
    np.testing.assert_array_equal(codes[:64], c2[:64])
    np.testing.assert_array_equal(codes[320:], c2[320:])
    assert np.isfinite(out[:64]).all() and np.isfinite(out[320:]).all()


# --- special values with nested statistics (docs/FORMATS.md §2.5 and §12) ------------------
#
# Nesting quantizes the absmax vector itself, in blocks of ``blocksize`` absmax values that
# share one float32 scale. A NaN/Inf absmax has to stay non-finite (else its block would
# dequantize to finite garbage, the silent corruption docs/FORMATS.md §12 forbids), and no finite scale
# and offset can make one uint8 code of bitsandbytes' nested format NaN: the special value
# therefore reaches the other absmax values of its *nested* block (blocksize blocks, as the
# 4-bit path's 256), and nothing beyond it. The offset is the mean of the finite absmax
# values, so the rest of the tensor (all-zero blocks included) stays finite.

NEST = 64                                   # blocksize; one nested block = NEST * NEST elements


def _specials_for_nesting(seed: int = 5) -> tuple[np.ndarray, dict]:
    """float32 (4 nested blocks + a partial one) and, per special value, its element index:
    NaN in nested block 0, +Inf in 1, -Inf in 2, nested block 3 clean with two all-zero
    blocks, a partial clean tail with an all-zero block."""
    group = NEST * NEST
    x = np.random.default_rng(seed).standard_normal(4 * group + 1000).astype(np.float32)
    where = {"nan": 100, "+inf": group + 777, "-inf": 2 * group + 4000}
    x[where["nan"]], x[where["+inf"]], x[where["-inf"]] = np.nan, np.inf, -np.inf
    x[3 * group + 64:3 * group + 192] = 0.0          # two all-zero blocks
    x[4 * group + 128:4 * group + 192] = 0.0         # an all-zero block in the partial tail
    return x, where


def _check_nested_specials(x, codes, state, out):
    """What nesting guarantees with NaN/Inf/zero blocks (see the comment above)."""
    group = NEST * NEST
    plain_codes, plain_state = ref.quantize_blockwise(x, blocksize=NEST)
    np.testing.assert_array_equal(np.asarray(codes), plain_codes)   # codes do not depend on nesting
    absmax = plain_state.absmax
    finite = absmax[np.isfinite(absmax)]
    assert state.offset == float(np.float32(finite.mean(dtype=np.float64)))
    out = np.asarray(out, np.float32)
    for g in range(3):                       # each special value's block is non-finite
        assert np.isnan(out[g * group:(g + 1) * group].reshape(-1, NEST)[np.isnan(
            plain_state.absmax[g * NEST:(g + 1) * NEST]) | np.isinf(
            plain_state.absmax[g * NEST:(g + 1) * NEST])]).all()
    clean = out[3 * group:]
    assert np.isfinite(clean).all()          # nothing past the special values' nested blocks
    assert (clean[64:192] == 0).all() and (clean[group + 128:group + 192] == 0).all()
    plain = ref.dequantize_blockwise(plain_codes, plain_state)[3 * group:]
    # nested absmax error: one step of the signed dynamic map around the offset, < 2% of it
    assert np.abs(clean - plain).max() <= 0.02 * np.abs(x[3 * group:]).max()


def test_special_values_with_nesting_stay_in_their_nested_block():
    x, _ = _specials_for_nesting()
    codes, state = ref.quantize_blockwise(x, blocksize=NEST, nested=True)
    assert state.state2.blocksize == NEST and state.absmax.dtype == np.uint8
    _check_nested_specials(x, codes, state, ref.dequantize_blockwise(codes, state))


@pytest.mark.parametrize("backend", ["numpy"])   # GPU backends: test_gpu_nested_special_values
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_public_nested_special_values_stay_in_their_nested_block(backend, kind):
    x, _ = _specials_for_nesting(6)
    data = x if kind == "numpy" else pytest.importorskip("torch").from_numpy(x.copy())
    with qkernels.use_backend(backend):
        codes, state = qkernels.quantize_blockwise(data, blocksize=NEST, nested=True)
        out = qkernels.dequantize_blockwise(codes, state)
    if kind == "torch":
        codes, out = codes.numpy(), out.numpy()
    assert isinstance(state.offset, float)
    _check_nested_specials(x, codes, state, out)
    want_codes, want_state = ref.quantize_blockwise(x, blocksize=NEST, nested=True)
    assert state.offset == want_state.offset
    np.testing.assert_array_equal(np.asarray(state.absmax), want_state.absmax)
    np.testing.assert_array_equal(out, ref.dequantize_blockwise(want_codes, want_state))


@given(float_arrays(specials=True), st.sampled_from([64, 128]))
def test_nesting_keeps_special_values_in_their_nested_block(xd, blocksize):
    """Property form of the rule above, on Hypothesis' arrays with NaN/Inf and zero runs."""
    x32, dtype = xd
    a = as_numpy(x32, dtype)
    codes, state = ref.quantize_blockwise(a, blocksize=blocksize, nested=True)
    plain_codes, plain = ref.quantize_blockwise(a, blocksize=blocksize)
    np.testing.assert_array_equal(codes, plain_codes)
    out = ref.dequantize_blockwise(codes, state, out_dtype="float32").reshape(-1)
    block = np.arange(out.size) // blocksize
    special = ~np.isfinite(plain.absmax)
    group_special = np.zeros(-(-special.size // blocksize), bool)
    np.logical_or.at(group_special, np.arange(special.size) // blocksize, special)
    touched = group_special[block // blocksize]
    assert np.isnan(out[special[block]]).all()            # never silently finite
    assert np.isfinite(out[~touched]).all()               # nothing past its nested block
    assert (out[~touched & (plain.absmax[block] == 0)] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
def test_gpu_nested_special_values(backend):
    import torch
    x, _ = _specials_for_nesting(9)
    with qkernels.use_backend(backend):
        codes, state = qkernels.quantize_blockwise(torch.from_numpy(x).cuda(), blocksize=NEST,
                                                   nested=True)
        out = qkernels.dequantize_blockwise(codes, state)
    _check_nested_specials(x, codes.cpu().numpy(), state, out.cpu().numpy())
    want_codes, want_state = ref.quantize_blockwise(x, blocksize=NEST, nested=True)
    np.testing.assert_array_equal(state.absmax.cpu().numpy(), want_state.absmax)
    np.testing.assert_array_equal(out.cpu().numpy(),
                                  ref.dequantize_blockwise(want_codes, want_state))


def test_nested_all_zero_and_all_special_tensors():
    for x, fine in ((np.zeros(300, np.float32), True),
                    (np.full(300, np.nan, np.float32), False),
                    (np.full(300, -np.inf, np.float32), False)):
        for quantize, dequantize in ((ref.quantize_blockwise, ref.dequantize_blockwise),
                                     (qkernels.quantize_blockwise, qkernels.dequantize_blockwise)):
            codes, state = quantize(x, blocksize=64, nested=True)
            out = dequantize(codes, state)
            assert state.offset == 0.0       # no finite absmax: offset 0
            if fine:
                assert (out == 0).all()
            else:
                assert np.isnan(out).all()


def test_nested_state_without_offset_is_rejected():
    x = np.random.default_rng(7).standard_normal(500).astype(np.float32)
    for quantize, dequantize in ((ref.quantize_blockwise, ref.dequantize_blockwise),
                                 (qkernels.quantize_blockwise, qkernels.dequantize_blockwise)):
        codes, state = quantize(x, blocksize=64, nested=True)
        state.offset = None
        with pytest.raises(ValueError, match=r"state.offset is None but state is nested"):
            dequantize(codes, state)


def test_empty_noncontiguous_bf16_and_nested():
    codes, state = ref.quantize_blockwise(np.zeros((0, 5), np.float16), blocksize=64)
    assert codes.shape == (0, 5) and state.absmax.shape == (0,)
    assert ref.dequantize_blockwise(codes, state).shape == (0, 5)
    x = np.random.default_rng(2).standard_normal((50, 30)).astype(np.float32)
    c_t, s_t = ref.quantize_blockwise(x.T, blocksize=128)
    c_c, s_c = ref.quantize_blockwise(np.ascontiguousarray(x.T), blocksize=128)
    np.testing.assert_array_equal(c_t, c_c)
    import ml_dtypes
    xb = x.astype(ml_dtypes.bfloat16)
    cb, sb = ref.quantize_blockwise(xb, blocksize=64)
    back = ref.dequantize_blockwise(cb, sb)
    assert back.dtype == xb.dtype and sb.dtype == "bfloat16"
    assert np.abs(back.astype(np.float32) - xb.astype(np.float32)).max() < 0.05 * np.abs(x).max()
    cn, sn = ref.quantize_blockwise(x, blocksize=64, nested=True)
    assert sn.absmax.dtype == np.uint8 and sn.state2.blocksize == 64
    plain = ref.dequantize_blockwise(*ref.quantize_blockwise(x, blocksize=64))
    assert np.abs(ref.dequantize_blockwise(cn, sn) - plain).max() < 0.02 * np.abs(x).max()


def test_bad_input_is_rejected_before_work():
    x = np.ones(100, np.float32)
    with pytest.raises(ValueError, match="blocksize must be one of 64, 128"):
        qkernels.quantize_blockwise(x, blocksize=100)
    with pytest.raises(ValueError, match="blocksize"):
        qkernels.quantize_blockwise(x, blocksize=32)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32; got dtype float64"):
        qkernels.quantize_blockwise(x.astype(np.float64))
    with pytest.raises(TypeError, match="int32"):
        qkernels.quantize_blockwise(x.astype(np.int32))
    with pytest.raises(ValueError, match="sorted"):
        qkernels.quantize_blockwise(x, code=get_code("dynamic_signed")[::-1])
    with pytest.raises(ValueError, match=r"shape \(256,\)"):
        qkernels.quantize_blockwise(x, code=np.linspace(-1, 1, 16))
    with pytest.raises(TypeError, match="A must be a NumPy"):
        qkernels.quantize_blockwise([1.0, 2.0])
    codes, state = qkernels.quantize_blockwise(x, blocksize=64)
    with pytest.raises(ValueError, match="2 blocks but codes of size 200"):
        qkernels.dequantize_blockwise(np.zeros(200, np.uint8), state)
    with pytest.raises(TypeError, match="codes must be uint8"):
        qkernels.dequantize_blockwise(codes.astype(np.int8), state)
    with pytest.raises(TypeError, match="QuantState"):
        qkernels.dequantize_blockwise(codes, {"absmax": state.absmax})


def test_python_lists_and_wrong_types_are_named():
    """Lists where arrays belong: a TypeError naming the argument and what it accepts (not an
    AttributeError from deep inside)."""
    x = np.random.default_rng(8).standard_normal(300).astype(np.float32)
    code = get_code("dynamic_signed")
    with pytest.raises(TypeError, match=r"code must be .*array.*tensor.*; got list"):
        qkernels.quantize_blockwise(x, code=code.tolist(), blocksize=64)
    with pytest.raises(TypeError, match=r"A must be a NumPy.*got list"):
        qkernels.quantize_blockwise(x.tolist(), blocksize=64)
    with pytest.raises(TypeError, match=r"nested must be a bool; got 'yes'"):
        qkernels.quantize_blockwise(x, blocksize=64, nested="yes")
    codes, state = qkernels.quantize_blockwise(x, blocksize=64)
    with pytest.raises(TypeError, match=r"codes must be a NumPy.*got list"):
        qkernels.dequantize_blockwise(codes.tolist(), state)
    for field in ("code", "absmax"):
        bad = QuantState(**{**vars(state), field: getattr(state, field).tolist()})
        with pytest.raises(TypeError, match=rf"state.{field} must be .*array.*; got list"):
            qkernels.dequantize_blockwise(codes, bad)
    codes, nested = qkernels.quantize_blockwise(x, blocksize=64, nested=True)
    for field in ("code", "absmax"):
        s2 = QuantState(**{**vars(nested.state2), field: getattr(nested.state2, field).tolist()})
        with pytest.raises(TypeError, match=rf"state.state2.{field} must be .*array.*; got list"):
            qkernels.dequantize_blockwise(codes, QuantState(**{**vars(nested), "state2": s2}))
    with pytest.raises(TypeError, match=r"state.offset must be a number.*; got list"):
        qkernels.dequantize_blockwise(codes, QuantState(**{**vars(nested), "offset": [0.5]}))
    with pytest.raises(TypeError, match=r"state.state2 must be a QuantState; got dict"):
        qkernels.dequantize_blockwise(codes, QuantState(**{**vars(nested), "state2": {}}))


def test_torch_cpu_in_torch_out():
    torch = pytest.importorskip("torch")
    x32 = np.random.default_rng(3).standard_normal((33, 17)).astype(np.float32)
    for dtype in ("float16", "bfloat16", "float32"):
        t = as_torch(x32, dtype)
        codes, state = qkernels.quantize_blockwise(t, blocksize=64)
        assert isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
        assert isinstance(state.absmax, torch.Tensor)
        want, wstate = ref.quantize_blockwise(as_numpy(t.float().numpy(), dtype), blocksize=64)
        np.testing.assert_array_equal(codes.numpy(), want)
        out = qkernels.dequantize_blockwise(codes, state)
        assert out.dtype == getattr(torch, dtype) and out.shape == t.shape
        f32 = ref.dequantize_blockwise(want, wstate, out_dtype="float32")
        np.testing.assert_array_equal(out.float().numpy(), as_torch(f32, dtype).float().numpy())


# --- GPU backends: bit-identical to the reference ---------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
@given(xd=float_arrays(specials=True), blocksize=blocksizes)
def test_gpu_backend_matches_reference(backend, xd, blocksize):
    x32, dtype = xd
    want_codes, want_state = ref.quantize_blockwise(as_numpy(x32, dtype), blocksize=blocksize)
    want_out = ref.dequantize_blockwise(want_codes, want_state, out_dtype="float32")
    t = as_torch(x32, dtype, "cuda")
    with qkernels.use_backend(backend):
        codes, state = qkernels.quantize_blockwise(t, blocksize=blocksize)
        out = qkernels.dequantize_blockwise(codes, state)
    assert codes.is_cuda and out.is_cuda and out.dtype == t.dtype
    np.testing.assert_array_equal(codes.cpu().numpy(), want_codes)
    np.testing.assert_array_equal(state.absmax.cpu().numpy(), want_state.absmax)
    np.testing.assert_array_equal(out.float().cpu().numpy(),
                                  as_torch(want_out, dtype).float().numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends() or ["cupy"])
def test_gpu_large_misaligned_and_host_inputs(backend):
    rng = np.random.default_rng(4)
    x32 = rng.standard_normal(3 * 4096 * 17 + 1001).astype(np.float32)
    for dtype in ("float16", "bfloat16", "float32"):
        base = as_torch(x32, dtype, "cuda")
        t = base[1:]  # 2 or 4 bytes off 16-byte alignment: the scalar path
        for blocksize in (64, 4096):
            want, ws = ref.quantize_blockwise(as_numpy(t.float().cpu().numpy(), dtype), blocksize=blocksize)
            with qkernels.use_backend(backend):
                codes, state = qkernels.quantize_blockwise(t, blocksize=blocksize)
                host_codes, _ = qkernels.quantize_blockwise(as_numpy(t.float().cpu().numpy(), dtype),
                                                            blocksize=blocksize)
            np.testing.assert_array_equal(codes.cpu().numpy(), want)
            np.testing.assert_array_equal(host_codes, want)
            np.testing.assert_array_equal(state.absmax.cpu().numpy(), ws.absmax)


@pytest.mark.gpu
def test_gpu_stream_zero_copy_and_device():
    import torch
    x = torch.randn(1 << 20, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        codes, state = qkernels.quantize_blockwise(x, blocksize=256)
        out = qkernels.dequantize_blockwise(codes, state)
    side.synchronize()
    want, _ = ref.quantize_blockwise(x.cpu().numpy(), blocksize=256)
    np.testing.assert_array_equal(codes.cpu().numpy(), want)
    assert out.device == x.device
    if torch.cuda.device_count() > 1:
        x1 = x.to("cuda:1")
        c1, s1 = qkernels.quantize_blockwise(x1, blocksize=256)
        assert c1.device == x1.device and s1.absmax.device == x1.device
        np.testing.assert_array_equal(c1.cpu().numpy(), want)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """The kernels run on torch's current stream, so a CUDA graph captures them."""
    import torch
    x = torch.randn(1 << 16, device="cuda", dtype=torch.bfloat16)
    qkernels.quantize_blockwise(x, blocksize=256)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        codes, state = qkernels.quantize_blockwise(x, blocksize=256)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    want, _ = ref.quantize_blockwise(as_numpy(x.float().cpu().numpy(), "bfloat16"), blocksize=256)
    np.testing.assert_array_equal(codes.cpu().numpy(), want)


# --- bitsandbytes: formats interchange ---------------------------------------------------

def _bnb():
    return pytest.importorskip("bitsandbytes.functional")


def _finite_nonzero_blocks(x32, blocksize):
    xb = np.concatenate([x32.reshape(-1), np.zeros((-x32.size) % blocksize, np.float32)])
    xb = xb.reshape(-1, blocksize)
    return np.isfinite(xb).all(1) & (np.abs(xb).max(1) > 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_against_bitsandbytes(dtype, blocksize):
    import torch
    F = _bnb()
    rng = np.random.default_rng(blocksize)
    # the same 86k elements for every blocksize: enough that the agreement rate is measured,
    # not sampled (at 1.4k elements one code is 0.07%)
    x32 = (rng.standard_normal(3 * 4096 * 7 + 77) * rng.uniform(0.01, 50)).astype(np.float32)
    t = as_torch(x32, dtype)
    q_bnb, s_bnb = F.quantize_blockwise(t, blocksize=blocksize)
    ours, state = qkernels.quantize_blockwise(t, blocksize=blocksize)
    ok = np.repeat(_finite_nonzero_blocks(t.float().numpy(), blocksize), blocksize)[:x32.size]
    a, b = ours.numpy()[ok], q_bnb.numpy()[ok]
    # bnb's CPU quantizer is a lookup-table approximation: docs/FORMATS.md §13 says up to 4 codes
    # off on ~0.2% of elements. Measured with bnb 0.50.2 on these inputs over 8 seeds: float16
    # and float32 differ on 0.13-0.21% (at most 3 codes), bfloat16 on 0.20-0.44% (its coarser
    # values put more of them near a midpoint): hence 0.25% and 0.5%, not a blanket 0.5%.
    differ = (a != b).mean()
    assert differ <= (0.005 if dtype == "bfloat16" else 0.0025), differ
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 4
    code = get_code("dynamic_signed")
    absmax = state.absmax.numpy()
    # y as docs/FORMATS.md §2.2 defines it (times the float32 reciprocal, not divided)
    rcp = (np.float32(1) / np.repeat(absmax, blocksize)[:x32.size][ok]).astype(np.float32)
    y = (t.float().numpy()[ok] * rcp).astype(np.float32)
    ulp = np.spacing(np.abs(y).astype(np.float32))
    assert (np.abs(code[a] - y) <= np.abs(code[b] - y) + ulp).all()
    np.testing.assert_array_equal(s_bnb.absmax.numpy(), absmax)
    # the same bytes dequantize identically in both libraries
    ours_of_bnb = qkernels.dequantize_blockwise(q_bnb, state)
    bnb_of_bnb = F.dequantize_blockwise(q_bnb, s_bnb)
    assert torch.equal(ours_of_bnb, bnb_of_bnb)
