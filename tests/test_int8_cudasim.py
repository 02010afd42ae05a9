"""The Numba INT8 kernels under the CUDA simulator, against the reference, at tiny sizes
(1-3 rows, up to ~70 columns, 32 threads). Run in its own process with NUMBA_ENABLE_CUDASIM=1
(the variable must be set before numba is imported)."""
import os

import numpy as np
import pytest
from hypothesis import given, strategies as st

pytestmark = [
    pytest.mark.cudasim,
    pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "1",
                       reason="needs NUMBA_ENABLE_CUDASIM=1 (scripts/test.sh sets it)"),
]

DTYPES = ["float16", "bfloat16", "float32"]


def _case(rng, rows, cols, dtype, specials):
    from tests.strategies import round_to
    x32 = round_to((rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32), dtype)
    x32[rng.integers(0, rows)] = 0.0                        # a zero row
    x32[rng.integers(0, rows), rng.integers(0, cols)] = 3.0  # an outlier for threshold 2
    if specials:
        x32[rng.integers(0, rows), rng.integers(0, cols)] = rng.choice([np.nan, np.inf, -np.inf])
    return x32


def _raw(x32, dtype):
    from reference.dtypes import float32_to_bf16_bits
    return float32_to_bf16_bits(x32) if dtype == "bfloat16" else x32.astype(dtype)


def _f32(raw, dtype):
    from reference.dtypes import bf16_bits_to_float32
    return bf16_bits_to_float32(raw) if dtype == "bfloat16" else raw.astype(np.float32)


@given(st.integers(1, 3), st.integers(1, 70), st.sampled_from(DTYPES), st.sampled_from([0.0, 2.0]),
       st.integers(0, 2**31), st.booleans())
def test_numba_row_quant_matches_reference(rows, cols, dtype, threshold, seed, specials):
    from numba import cuda
    from qkernels.int8 import _numba
    from reference import int8 as ref
    x32 = _case(np.random.default_rng(seed), rows, cols, dtype, specials)
    q = cuda.device_array((rows, cols), np.int8)
    stats = cuda.device_array(rows, np.float32)
    flags = cuda.device_array(cols, np.uint8)
    _numba.quantize_rows(cuda.to_device(_raw(x32, dtype)), q, stats, dtype=dtype, stats_dtype="float32",
                         threshold=threshold, flags=flags, threads=32)
    want_stats, want_flags = ref.absmax_rows(x32, threshold)
    np.testing.assert_array_equal(q.copy_to_host(), ref.quantize_rows_f32(x32, want_stats, threshold))
    np.testing.assert_array_equal(stats.copy_to_host(), want_stats)
    np.testing.assert_array_equal(flags.copy_to_host().astype(bool), want_flags)
    # the SwitchBack state in the input's dtype, and the dequantizer
    sraw = cuda.device_array(rows, np.uint16 if dtype == "bfloat16" else dtype)
    _numba.quantize_rows(cuda.to_device(_raw(x32, dtype)), q, sraw, dtype=dtype, stats_dtype=dtype,
                         threads=32)
    s0, _ = ref.absmax_rows(x32)
    np.testing.assert_array_equal(_f32(sraw.copy_to_host(), dtype), s0)
    out = cuda.device_array((rows, cols), np.float32)
    _numba.dequant_rows(q, sraw, out, stats_dtype=dtype, out_dtype="float32", threads=32)
    np.testing.assert_array_equal(out.copy_to_host(),
                                  ref.int8_vectorwise_dequant(q.copy_to_host(), s0))


@given(st.integers(1, 3), st.integers(1, 40), st.sampled_from(DTYPES), st.integers(0, 2**31),
       st.booleans())
def test_numba_global_and_columnwise_match_reference(rows, cols, dtype, seed, specials):
    from numba import cuda
    from qkernels.int8 import _numba
    from reference import int8 as ref
    from tests.strategies import as_numpy
    x32 = _case(np.random.default_rng(seed), rows, cols, dtype, specials)
    x = cuda.to_device(_raw(x32, dtype))
    sdt = np.uint16 if dtype == "bfloat16" else dtype
    for name, transpose in (("quantize_global", False), ("quantize_global_transpose", True)):
        q = cuda.device_array((cols, rows) if transpose else (rows, cols), np.int8)
        state = cuda.device_array(1, sdt)
        _numba.quantize_global(x, q, state, dtype=dtype, transpose=transpose, threads=32)
        wq, ws = getattr(ref, name)(as_numpy(x32, dtype))
        np.testing.assert_array_equal(q.copy_to_host(), wq)
        np.testing.assert_array_equal(_f32(state.copy_to_host(), dtype), ws.astype(np.float32))
    q = cuda.device_array((cols, rows), np.int8)
    state = cuda.device_array(cols, sdt)
    _numba.quantize_columns(x, q, dtype=dtype, transpose=True, state=state, threads=32)
    wq, ws = ref.quantize_columnwise_and_transpose(as_numpy(x32, dtype))
    np.testing.assert_array_equal(q.copy_to_host(), wq)
    np.testing.assert_array_equal(_f32(state.copy_to_host(), dtype), ws.astype(np.float32))
    q = cuda.device_array((rows, cols), np.int8)
    cs = cuda.device_array(cols, np.float32)
    _numba.quantize_columns(x, q, dtype=dtype, transpose=False, threshold=2.0, col_stats=cs, threads=32)
    _, wqt, _, wcs, _ = ref.int8_double_quant(x32, 2.0)
    np.testing.assert_array_equal(q.copy_to_host(), wqt)
    np.testing.assert_array_equal(cs.copy_to_host(), wcs)


def test_numba_mm_dequant_and_zero_cols():
    from numba import cuda
    from qkernels.int8 import _numba
    from reference import int8 as ref
    rng = np.random.default_rng(3)
    C = rng.integers(-2**20, 2**20, (3, 11)).astype(np.int32)
    r = rng.uniform(0, 4, 3).astype(np.float32)
    c = rng.uniform(0, 4, 11).astype(np.float32)
    r[1] = 0.0
    for out_dtype in DTYPES:
        for bias in (None, rng.standard_normal(11).astype(np.float16)):
            out = cuda.device_array((3, 11), np.uint16 if out_dtype == "bfloat16" else out_dtype)
            _numba.mm_dequant(cuda.to_device(C), cuda.to_device(r), cuda.to_device(c), out,
                              out_dtype=out_dtype, bias=None if bias is None else cuda.to_device(bias),
                              bias_dtype=None if bias is None else "float16", threads=32)
            want = ref.int8_mm_dequant(C, r, c, bias, "float32")
            from tests.strategies import round_to
            np.testing.assert_array_equal(_f32(out.copy_to_host(), out_dtype), round_to(want, out_dtype))
    q = cuda.to_device(np.ones((3, 7), np.int8))
    _numba.zero_cols(q, cuda.to_device(np.array([1, 5], np.int64)), threads=32)
    host = q.copy_to_host()
    assert (host[:, [1, 5]] == 0).all() and (host[:, [0, 2, 3, 4, 6]] == 1).all()


def test_public_api_under_numba_backend():
    import qkernels
    import qkernels.int8 as Q
    from reference import int8 as ref
    x = (np.random.default_rng(0).standard_normal((2, 24)) * 3).astype(np.float16)
    with qkernels.use_backend("numba"):
        got = Q.int8_vectorwise_quant(x, 4.0)
        gq, gs = Q.quantize_rowwise(x)
        d = Q.dequantize_rowwise(gq, gs)
    want = ref.int8_vectorwise_quant(x, 4.0)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    wq, ws = ref.quantize_rowwise(x)
    np.testing.assert_array_equal(gq, wq)
    np.testing.assert_array_equal(gs, ws)
    np.testing.assert_array_equal(d, ref.dequantize_rowwise(wq, ws))
