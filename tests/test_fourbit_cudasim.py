"""The Numba 4-bit kernels under the CUDA simulator, against the reference, at small sizes
(1-4 blocks of 32-64 elements, 32-64 threads). Run in its own process with
NUMBA_ENABLE_CUDASIM=1 (the variable must be set before numba is imported)."""
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

pytestmark = [
    pytest.mark.cudasim,
    # the simulator runs float32 math as NumPy scalars, which warn on 0 * inf (NaN by design)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                       reason="needs NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it)"),
]


def _raw(x32, dtype):
    from reference.dtypes import float32_to_bf16_bits
    return float32_to_bf16_bits(x32) if dtype == "bfloat16" else x32.astype(dtype)


@given(st.integers(1, 4 * 32), st.sampled_from(["float16", "bfloat16", "float32"]),
       st.sampled_from([32, 64]), st.sampled_from(["nf4", "fp4"]), st.integers(0, 2**31),
       st.booleans())
def test_numba_kernels_match_reference(n, dtype, blocksize, quant_type, seed, specials):
    from numba import cuda
    from qkernels.fourbit import _numba
    from reference import fourbit as ref
    from tests.strategies import round_to
    rng = np.random.default_rng(seed)
    x32 = round_to((rng.standard_normal(n) * 10.0 ** rng.uniform(-5, 3)).astype(np.float32), dtype)
    x32[rng.integers(0, n, 3)] = 0.0
    if specials:
        x32[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
    want_packed, want_absmax = ref.quantize_4bit_f32(x32, quant_type, blocksize)
    packed = cuda.device_array(want_packed.size + 3, np.uint8)   # + quant_storage padding
    absmax = cuda.device_array(want_absmax.size, np.float32)
    _numba.quantize_4bit(cuda.to_device(_raw(x32, dtype)), dtype, quant_type, blocksize, packed,
                         absmax, threads=32)
    got = packed.copy_to_host()
    np.testing.assert_array_equal(got[:want_packed.size], want_packed)
    assert (got[want_packed.size:] == 0).all()
    np.testing.assert_array_equal(absmax.copy_to_host(), want_absmax)
    code = ref.code_4bit(quant_type)
    out = cuda.device_array(n, np.uint16 if dtype == "bfloat16" else dtype)
    _numba.dequantize_4bit(cuda.to_device(want_packed), cuda.to_device(code), cuda.to_device(want_absmax),
                           blocksize, dtype, out, threads=32)
    want = ref.dequantize_4bit_f32(want_packed, want_absmax, code, blocksize, n)
    np.testing.assert_array_equal(out.copy_to_host().view(np.uint8), _raw(want, dtype).view(np.uint8))


def test_numba_nested_dequantize():
    from numba import cuda
    from qkernels.fourbit import _numba
    from reference import fourbit as ref
    x = np.random.default_rng(0).standard_normal(3 * 43).astype(np.float32)
    want, ws = ref.quantize_4bit(x, 32, "fp4", compress_statistics=True)
    s2 = ws.state2
    nested = (cuda.to_device(ws.absmax), cuda.to_device(s2.code), cuda.to_device(s2.absmax),
              cuda.to_device(np.array([ws.offset], np.float32)))
    out = cuda.device_array(x.size, np.float32)
    _numba.dequantize_4bit(cuda.to_device(want.reshape(-1)), cuda.to_device(ws.code), None, 32,
                           "float32", out, nested=nested, threads=32)
    np.testing.assert_array_equal(out.copy_to_host(), ref.dequantize_4bit(want, ws))


def test_public_api_under_numba_backend():
    import qkernels
    import qkernels.fourbit as qf
    from reference import fourbit as ref
    x = np.random.default_rng(1).standard_normal((3, 21)).astype(np.float16)
    want, wstate = ref.quantize_4bit(x, 32, "nf4")
    with qkernels.use_backend("numba"):
        packed, state = qf.quantize_4bit(x, 32, "nf4", quant_storage="float32")
        out = qf.dequantize_4bit(packed, state)
    assert packed.dtype == np.float32 and packed.shape == (-(-want.size // 4), 1)
    np.testing.assert_array_equal(packed.view(np.uint8).reshape(-1)[:want.size], want.reshape(-1))
    np.testing.assert_array_equal(state.absmax, wstate.absmax)
    np.testing.assert_array_equal(out, ref.dequantize_4bit(want, wstate))


def test_public_api_nested_state_under_numba_backend():
    """Double quantization through qkernels.fourbit on the Numba backend: the nested absmax
    is dequantized into a workspace the public API allocates (not the launcher)."""
    import qkernels
    import qkernels.fourbit as qf
    from reference import fourbit as ref
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    want, wstate = ref.quantize_4bit(x, 32, "fp4", compress_statistics=True)
    with qkernels.use_backend("numba"):
        packed, state = qf.quantize_4bit(x, 32, "fp4", compress_statistics=True)
        out = qf.dequantize_4bit(packed, state)
    np.testing.assert_array_equal(np.asarray(packed).reshape(-1), want.reshape(-1))
    np.testing.assert_array_equal(out, ref.dequantize_4bit(want, wstate))
