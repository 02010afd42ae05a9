"""The Numba blockwise kernels under the CUDA simulator, against the reference, at small
sizes (1-4 blocks of 64 elements, 32-64 threads). Run by scripts/test.sh in its own process
with NUMBA_ENABLE_CUDASIM=1 (the variable must be set before numba is imported)."""
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                       reason="needs NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it)"),
]


@given(st.integers(1, 4 * 64), st.sampled_from(["float16", "bfloat16", "float32"]),
       st.sampled_from([32, 64]), st.integers(0, 2**31), st.booleans())
def test_numba_kernels_match_reference(n, dtype, threads, seed, specials):
    from numba import cuda
    from qkernels.blockwise import _numba
    from reference import blockwise as ref
    from reference.codebooks import dynamic_map
    from reference.dtypes import float32_to_bf16_bits
    from tests.strategies import round_to
    rng = np.random.default_rng(seed)
    x32 = round_to((rng.standard_normal(n) * 10.0 ** rng.uniform(-5, 3)).astype(np.float32), dtype)
    x32[rng.integers(0, n, 3)] = 0.0
    if specials:
        x32[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
    raw = float32_to_bf16_bits(x32) if dtype == "bfloat16" else x32.astype(dtype)
    code = dynamic_map()
    want_codes, want_absmax = ref.quantize_blockwise_f32(x32, code, 64)
    codes = cuda.device_array(n, np.uint8)
    absmax = cuda.device_array(want_absmax.size, np.float32)
    _numba.quantize_blockwise(cuda.to_device(raw), dtype, code, 64, codes, absmax, threads=threads)
    np.testing.assert_array_equal(codes.copy_to_host(), want_codes)
    np.testing.assert_array_equal(absmax.copy_to_host(), want_absmax)
    out = cuda.device_array(n, np.uint16 if dtype == "bfloat16" else dtype)
    _numba.dequantize_blockwise(codes, cuda.to_device(code), absmax, 64, dtype, out, threads=threads)
    want = ref.dequantize_blockwise_f32(want_codes, want_absmax, code, 64)
    want_raw = float32_to_bf16_bits(want) if dtype == "bfloat16" else want.astype(dtype)
    np.testing.assert_array_equal(out.copy_to_host().view(np.uint8), want_raw.view(np.uint8))


def test_public_api_under_numba_backend():
    import qkernels
    x = np.random.default_rng(0).standard_normal((3, 50)).astype(np.float16)
    with qkernels.use_backend("numba"):
        codes, state = qkernels.quantize_blockwise(x, blocksize=64)
        out = qkernels.dequantize_blockwise(codes, state)
    want, wstate = qkernels.quantize_blockwise(x, blocksize=64)
    np.testing.assert_array_equal(codes, want)
    np.testing.assert_array_equal(out, qkernels.dequantize_blockwise(want, wstate))


def test_public_nested_special_values_under_numba_backend():
    """Nesting with NaN/+Inf/all-zero blocks on the numba backend: bit-identical to the
    reference, whose offset is the mean of the finite absmax values (a NaN/Inf block spoils
    only its own nested block of 64 blocks; the other nested block stays finite, zeros 0)."""
    import qkernels
    from reference import blockwise as ref
    group = 64 * 64
    x = np.random.default_rng(3).standard_normal(group + 200).astype(np.float32)
    x[5], x[70] = np.nan, np.inf            # both in nested block 0
    x[group + 64:group + 128] = 0.0         # an all-zero block in nested block 1 (partial)
    with qkernels.use_backend("numba"):
        codes, state = qkernels.quantize_blockwise(x, blocksize=64, nested=True)
        out = qkernels.dequantize_blockwise(codes, state)
    want_codes, want_state = ref.quantize_blockwise(x, blocksize=64, nested=True)
    np.testing.assert_array_equal(codes, want_codes)
    assert state.offset == want_state.offset and np.isfinite(state.offset)
    np.testing.assert_array_equal(state.absmax, want_state.absmax)
    np.testing.assert_array_equal(state.state2.absmax, want_state.state2.absmax)
    np.testing.assert_array_equal(out, ref.dequantize_blockwise(want_codes, want_state))
    assert np.isnan(out[:128]).all() and np.isfinite(out[group:]).all()
    assert (out[group + 64:group + 128] == 0).all()
