"""The "cpu" backend (Numba CPU kernels, qkernels/blockwise/_cpu.py and qkernels/fourbit/_cpu.py)
against the NumPy reference: codes, absmax and dequantized values bit for bit (NaN positions
exact; a NaN's payload is not defined by the reference), matmul_4bit within the reference's
float64-bounded tolerance; the dispatch's fallback to the reference when Numba fails to
compile; the thread count following torch. The int8 and optimizer ops: test_cpu_backend_int8_optim.py."""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qkernels
import qkernels.blockwise as qb
import qkernels.fourbit as qf
from qkernels import _backend
from reference import blockwise as ref_bw
from reference import fourbit as ref4
from reference.dtypes import from_float32
from tests.strategies import as_numpy, as_torch, float_arrays

pytest.importorskip("numba")

blocksizes_8 = st.sampled_from(ref_bw.BLOCKSIZES)
blocksizes_4 = st.sampled_from(ref4.BLOCKSIZES_4BIT)
quant_types = st.sampled_from(ref4.QUANT_TYPES)
out_dtypes = st.sampled_from(["float32", "float16", "bfloat16"])
kinds = st.sampled_from(["numpy", "torch"])


def _host(a) -> np.ndarray:
    """A NumPy copy of an array of either kind; float16 / bfloat16 as their bits."""
    if hasattr(a, "detach"):
        import torch
        t = a.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 and a.dtype.kind in "fV" else a


def _equal_bits(got, want):
    """Equal element for element, bit for bit except that any NaN matches any NaN."""
    g, w = _host(got), _host(want)
    assert g.shape == w.shape and g.dtype == w.dtype
    if g.dtype == np.uint8:
        np.testing.assert_array_equal(g, w)
        return
    if g.dtype == np.uint16:
        nan_g = (g & 0x7FFF) > (0x7C00 if _is_f16(got) else 0x7F80)
        nan_w = (w & 0x7FFF) > (0x7C00 if _is_f16(want) else 0x7F80)
    else:
        nan_g, nan_w = np.isnan(g), np.isnan(w)
    np.testing.assert_array_equal(nan_g, nan_w)
    np.testing.assert_array_equal(g[~nan_g].view(np.uint8), w[~nan_w].view(np.uint8))


def _is_f16(a) -> bool:
    return str(getattr(a, "dtype", "")).endswith("float16") and "b" not in str(a.dtype)


def _input(xd, kind):
    x32, dtype = xd
    return as_torch(x32, dtype) if kind == "torch" else as_numpy(x32, dtype)


def _both(fn, *args, **kwargs):
    with qkernels.use_backend("numpy"):
        want = fn(*args, **kwargs)
    with qkernels.use_backend("cpu"):
        got = fn(*args, **kwargs)
    return got, want


def _states_equal(got, want):
    _equal_bits(got.absmax, want.absmax)
    assert (got.state2 is None) == (want.state2 is None)
    if want.state2 is not None:
        assert np.float32(float(got.offset)) == np.float32(float(want.offset))
        _equal_bits(got.state2.absmax, want.state2.absmax)


def test_cpu_is_the_host_default():
    assert "cpu" in qkernels.available_backends()
    assert _backend.choose(qb._QUANTIZE, on_gpu=False)[0] == "cpu"
    assert _backend.choose(qf._DEQUANTIZE, on_gpu=False)[0] == "cpu"
    assert _backend.choose(qf._MATMUL_HOST, on_gpu=False)[0] == "cpu"


# --- blockwise 8-bit ------------------------------------------------------------------------

@given(xd=float_arrays(specials=True), blocksize=blocksizes_8, nested=st.booleans(), kind=kinds,
       out_dtype=out_dtypes)
def test_blockwise_bit_identical(xd, blocksize, nested, kind, out_dtype):
    A = _input(xd, kind)
    (codes, state), (want_codes, want_state) = _both(qb.quantize_blockwise, A, blocksize=blocksize,
                                                     nested=nested)
    _equal_bits(codes, want_codes)
    _states_equal(state, want_state)
    got, want = _both(qb.dequantize_blockwise, want_codes, want_state, out_dtype=out_dtype)
    _equal_bits(got, want)


@given(seed=st.integers(0, 2**32 - 1), out_dtype=st.sampled_from(["float16", "bfloat16"]))
def test_float16_and_bfloat16_rounding_of_any_float32(seed, out_dtype):
    """Every float32 bit pattern class (subnormal, near the float16 overflow at 65520, ties,
    infinities, NaN) rounds as the reference: the values are the codebook itself (absmax 1)."""
    from qkernels.blockwise import _cpu
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32)
    # exponents around float16's subnormal and overflow range, and exact ties
    bits[:64] = (bits[:64] & np.uint32(0x807FFFFF)) | (rng.integers(96, 144, 64).astype(np.uint32) << 23)
    bits[64:96] = (bits[64:96] & np.uint32(0xFFFFE000)) | np.uint32(0x1000)
    bits[96:100] = [0x477FF000, 0x477FEFFF, 0x33000000, 0x33000001]
    code = bits.view(np.float32)
    codes = np.arange(256, dtype=np.uint8)
    out = np.empty(256, np.uint16)
    _cpu.dequantize_blockwise(codes, code, np.ones(1, np.float32), 256, out_dtype, out)
    with np.errstate(over="ignore"):
        want = from_float32(code.copy(), out_dtype).view(np.uint16)
    nan = np.isnan(code)
    np.testing.assert_array_equal(out[~nan], want[~nan])
    assert ((out[nan] & 0x7FFF) > (0x7C00 if out_dtype == "float16" else 0x7F80)).all()


def test_blockwise_all_zero_nan_inf_and_empty():
    x = np.zeros(3 * 64 + 5, np.float32)
    x[64] = np.nan
    x[130] = -np.inf
    x[131] = 2.0
    (codes, state), (want_codes, want_state) = _both(qb.quantize_blockwise, x, blocksize=64)
    _equal_bits(codes, want_codes)
    _states_equal(state, want_state)
    got, want = _both(qb.dequantize_blockwise, codes, state)
    _equal_bits(got, want)
    assert np.all(got[:64] == 0) and np.isnan(got[64:192]).all() and np.all(got[192:] == 0)
    (codes, state), _ = _both(qb.quantize_blockwise, np.zeros(0, np.float32))
    assert codes.shape == (0,) and state.absmax.shape == (0,)


# --- 4-bit ------------------------------------------------------------------------------------

@given(xd=float_arrays(specials=True), blocksize=blocksizes_4, quant_type=quant_types,
       nested=st.booleans(), kind=kinds, out_dtype=out_dtypes,
       storage=st.sampled_from(["uint8", "float16", "float32", "int64"]))
def test_4bit_bit_identical(xd, blocksize, quant_type, nested, kind, out_dtype, storage):
    A = _input(xd, kind)
    (packed, state), (want_packed, want_state) = _both(
        qf.quantize_4bit, A, blocksize=blocksize, quant_type=quant_type,
        compress_statistics=nested, quant_storage=storage)
    _equal_bits(_host(packed).view(np.uint8), _host(want_packed).view(np.uint8))
    _states_equal(state, want_state)
    got, want = _both(qf.dequantize_4bit, want_packed, want_state, out_dtype=out_dtype)
    _equal_bits(got, want)


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("packed_offset,out_offset", [(0, 0), (1, 0), (0, 1), (3, 2)])
@pytest.mark.parametrize("avx512_lookup", [True, False])
def test_dequantize_4bit_16bit_words_and_misaligned(out_dtype, packed_offset, out_offset, avx512_lookup,
                                                    monkeypatch):
    """The 16-bit dequantization reads 8 packed bytes and writes 4 values at a time where both
    buffers are 8-byte aligned, else value by value (bfloat16 on an AVX-512 CPU: the vector
    lookup of _cpu_gemv where the output is 4-byte aligned; ``avx512_lookup=False`` takes
    the paths of other CPUs): every alignment, a partial last block and a packed length that
    is not a multiple of 8 give the reference's bits."""
    from qkernels.fourbit import _cpu
    if not avx512_lookup:
        monkeypatch.setattr(_cpu, "_bf16_lookup_fits", lambda *a: False)
    rng = np.random.default_rng(packed_offset * 4 + out_offset)
    for blocksize, n, nested in [(64, 64 * 37 + 10, False), (128, 128 * 9, True), (32, 32 * 5 + 2, False)]:
        x = rng.standard_normal(n).astype(np.float32)
        packed, state = ref4.quantize_4bit(x, blocksize, "nf4", nested)
        want = ref4.dequantize_4bit(packed, state, out_dtype=out_dtype).reshape(-1).view(np.uint16)
        pk = np.empty(packed.size + packed_offset, np.uint8)[packed_offset:]
        pk[:] = packed.reshape(-1)
        out = np.empty(n + out_offset, np.uint16)[out_offset:]
        if nested:
            s2 = state.state2
            args = (None, (np.asarray(state.absmax), np.asarray(s2.code), np.asarray(s2.absmax),
                           np.array([state.offset], np.float32).reshape(-1)))
        else:
            args = (np.asarray(state.absmax), None)
        _cpu.dequantize_4bit(pk, np.asarray(state.code), args[0], blocksize, out_dtype, out, args[1])
        np.testing.assert_array_equal(out, want)


@given(st.integers(1, 5), st.sampled_from([32, 64, 96, 200]), st.integers(1, 40),
       blocksizes_4, quant_types, st.booleans(), st.booleans(), kinds, st.integers(0, 2**31))
def test_matmul_4bit_within_the_reference_bound(rows, k, n_out, blocksize, quant_type, nested,
                                                 with_bias, kind, seed):
    """float32 accumulation of k terms: |got - exact| <= 1.2e-5 * sum |x_i w_i| (k <= 200),
    exact being the float64 product of the reference's dequantized weight."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32) if with_bias else None
    packed, state = ref4.quantize_4bit(w, blocksize, quant_type, nested)
    wd = ref4.dequantize_4bit(packed, state, out_dtype="float32").astype(np.float64)
    exact = x.astype(np.float64) @ wd.T + (0 if bias is None else bias)
    if kind == "torch":
        import torch
        (x, packed, bias) = (torch.from_numpy(a) if a is not None else None for a in (x, packed, bias))
        for part in (state, state.state2):
            if part is not None:
                part.absmax = torch.from_numpy(np.array(part.absmax))
                part.code = torch.from_numpy(np.array(part.code))
    with qkernels.use_backend("cpu"):
        got = qf.matmul_4bit(x, packed, state, bias=bias)
    got = _host(got).astype(np.float64)
    assert got.shape == (rows, n_out)
    magnitude = np.abs(x if kind == "numpy" else x.numpy()).astype(np.float64) @ np.abs(wd).T \
        + (0 if bias is None else np.abs(_host(bias)))
    assert np.all(np.abs(got - exact) <= 1.2e-5 * magnitude + 1e-30)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9])
@pytest.mark.parametrize("N,K,blocksize", [(40, 64, 64), (33, 256, 32), (17, 4096, 4096), (64, 384, 128),
                                           (24, 96, 64)])
@pytest.mark.parametrize("nested,dtype", [(False, "float32"), (True, "bfloat16"), (True, "float16"),
                                          (False, "numpy")])
def test_matmul_4bit_few_rows_fused(rows, N, K, blocksize, nested, dtype):
    """Up to _cpu_gemv.MAX_ROWS rows on an AVX-512 CPU take the fused kernel (K a multiple of
    the blocksize, the blocksize of 32): float32 sums within 1e-6 * K of sum |x w| of the
    float64 product of the reference's dequantized weight, rounded once to x's dtype; every
    other call takes the dequantize route, with the same bound. "numpy": float32 NumPy x."""
    torch = pytest.importorskip("torch")
    from qkernels.fourbit import _cpu, _cpu_gemv
    rng = np.random.default_rng(rows * 1000 + N + K)
    w = rng.standard_normal((N, K)).astype(np.float32)
    packed, state = ref4.quantize_4bit(w, blocksize, "nf4", nested)
    wd = ref4.dequantize_4bit(packed, state, out_dtype="float32").astype(np.float64)
    x = rng.standard_normal((rows, K)).astype(np.float32) * 3
    bias = rng.standard_normal(N).astype(np.float32)
    if dtype != "numpy":
        tdt = getattr(torch, dtype)
        x, bias = torch.from_numpy(x).to(tdt), torch.from_numpy(bias).to(tdt)
        x64, b64 = x.double().numpy(), bias.double().numpy()
    else:
        x64, b64 = x.astype(np.float64), bias.astype(np.float64)
    exact = x64 @ wd.T + b64
    magnitude = np.abs(x64) @ np.abs(wd).T + np.abs(b64)
    with qkernels.use_backend("cpu"):
        got = qf.matmul_4bit(x, packed, state, bias=bias)
    got64 = got.double().numpy() if dtype != "numpy" else got.astype(np.float64)
    assert got64.shape == (rows, N) and (dtype == "numpy" or got.dtype == x.dtype)
    fused = _cpu_gemv.fits(rows, N, K, blocksize)
    assert fused == (_cpu_gemv.available() and rows <= 8 and blocksize % 32 == 0 and K % blocksize == 0)
    half_ulp = {"float32": 2.0 ** -24, "numpy": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[dtype]
    # float32 sums: the fused kernel adds K / 32 fused products in each of 32 lanes, then the
    # lanes (about (K / 32 + 32) roundings a result); any other float32 order at most K. The
    # bfloat16 dequantize route rounds each weight to bfloat16 too (test_matmul_4bit_half_inputs)
    if dtype == "bfloat16" and not fused and _backend.native_bf16_cpu():
        per_term = 2.0 ** -8
    else:
        per_term = 2.0 ** -24 * ((K / 32 + 32) if fused else K)
    assert np.all(np.abs(got64 - exact) <= per_term * magnitude + half_ulp * np.abs(exact) + 1e-30)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_matmul_4bit_half_inputs(dtype):
    """float16 / bfloat16 x against the float64 product of the reference's dequantized weight,
    element by element. float16 (and bfloat16 on a CPU without native bfloat16) computes in
    float32 and rounds once: within K float32 roundings of sum |x w| plus half an ulp of x's
    dtype. bfloat16 on a CPU with native bfloat16 is torch's bfloat16 linear of the weight
    rounded to bfloat16, bit for bit: each weight adds up to 2^-9 of its size, on top."""
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    rng = np.random.default_rng(3)
    K = 128
    w = torch.from_numpy(rng.standard_normal((96, K)).astype(np.float32)).to(tdt)
    x = torch.from_numpy(rng.standard_normal((4, 5, K)).astype(np.float32)).to(tdt)
    bias = torch.ones(96, dtype=tdt)
    packed, state = qf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    got, want = _both(qf.matmul_4bit, x, packed, state, bias=bias)
    assert got.dtype == want.dtype == x.dtype and got.shape == (4, 5, 96)
    with qkernels.use_backend("numpy"):  # the oracle's weight
        w32 = qf.dequantize_4bit(packed, state, out_dtype="float32")
    exact = x.double() @ w32.double().T + bias.double()
    magnitude = x.double().abs() @ w32.double().abs().T + bias.double().abs()
    half_ulp = 2.0 ** (-11 if dtype == "float16" else -8)
    bf16_route = dtype == "bfloat16" and _backend.native_bf16_cpu()
    if bf16_route:
        assert torch.equal(got, torch.nn.functional.linear(x, w32.to(tdt), bias))
    per_term = 2.0 ** -24 * K + (2.0 ** -9 if bf16_route else 0.0)
    for y in (got, want):
        assert ((y.double() - exact).abs() <= per_term * magnitude + half_ulp * exact.abs()).all()


def test_matmul_4bit_transposed_weight():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 32)).astype(np.float32)     # (in, out): quantized transposed
    x = rng.standard_normal((3, 64)).astype(np.float32)
    packed, state = ref4.quantize_4bit(w, 64, "nf4")
    with qkernels.use_backend("cpu"), pytest.warns(DeprecationWarning, match="transposed"):
        got = qf.matmul_4bit(x, packed, state)
    np.testing.assert_allclose(got, x @ ref4.dequantize_4bit(packed, state), rtol=1e-5, atol=1e-4)


def test_linear4bit_layer_on_cpu_backend():
    torch = pytest.importorskip("torch")
    import torch_ops
    torch.manual_seed(0)
    lin = torch.nn.Linear(384, 96)
    layer = torch_ops.LinearNF4(384, 96, compute_dtype=torch.float32)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")
    x = torch.randn(3, 7, 384)
    with torch.no_grad():
        with qkernels.use_backend("numpy"):
            want = layer(x)
        with qkernels.use_backend("cpu"):
            got = layer(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


# --- dispatch: compile failure, errors, threads ----------------------------------------------

@pytest.fixture
def clean_dispatch():
    failed, warned = set(_backend._cpu_failed), set(_backend._warned)
    yield
    _backend._cpu_failed.clear()
    _backend._cpu_failed.update(failed)
    _backend._warned.clear()
    _backend._warned.update(warned)


def test_compile_failure_falls_back_with_one_warning(monkeypatch, clean_dispatch):
    from numba.core.errors import TypingError
    from qkernels.blockwise import _cpu

    def broken(*args):
        raise TypingError("simulated compile failure")

    monkeypatch.setattr(_cpu, "_quantize", broken)
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    with qkernels.use_backend("numpy"):
        want_codes, want_state = qkernels.quantize_blockwise(x, blocksize=64)
    with pytest.warns(RuntimeWarning, match="failed to compile") as record:
        codes, state = qkernels.quantize_blockwise(x, blocksize=64)
    assert len([w for w in record if "failed to compile" in str(w.message)]) == 1
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(state.absmax, want_state.absmax)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # no second warning, still the right result
        codes, _ = qkernels.quantize_blockwise(x, blocksize=64)
    np.testing.assert_array_equal(codes, want_codes)
    assert _backend.choose(qb._QUANTIZE, on_gpu=False)[0] == "numpy"
    assert _backend.choose(qb._DEQUANTIZE, on_gpu=False)[0] == "cpu"  # other ops keep theirs


def test_other_errors_are_not_swallowed(monkeypatch, clean_dispatch):
    from qkernels.fourbit import _cpu

    def failing(*args):
        raise MemoryError("not a compile failure")

    monkeypatch.setattr(_cpu, "_quantize", failing)
    with pytest.raises(MemoryError):
        qkernels.quantize_4bit(np.ones(64, np.float32))
    assert _backend.choose(qf._QUANTIZE, on_gpu=False)[0] == "cpu"


def test_thread_count_follows_torch():
    torch = pytest.importorskip("torch")
    import numba
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        qkernels.quantize_blockwise(np.ones(100, np.float32), blocksize=64)
        assert numba.get_num_threads() == 1
        torch.set_num_threads(before)
        qkernels.quantize_blockwise(np.ones(100, np.float32), blocksize=64)
        assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)
    finally:
        torch.set_num_threads(before)


def _child_quantizes(queue):
    x = np.linspace(-3, 3, 1 << 14, dtype=np.float32)
    with qkernels.use_backend("cpu"):
        codes, _ = qkernels.quantize_blockwise(x, blocksize=256)
    queue.put(int(codes.astype(np.int64).sum()))


def test_a_forked_child_runs_the_cpu_kernels_after_the_parent_did():
    """The Numba threading layer is fork-safe (qkernels/_numba_cpu.py): a child forked after
    the parent ran a parallel kernel runs its own (GNU OpenMP would hang it)."""
    import multiprocessing as mp
    x = np.linspace(-3, 3, 1 << 14, dtype=np.float32)
    with qkernels.use_backend("cpu"):
        want = int(qkernels.quantize_blockwise(x, blocksize=256)[0].astype(np.int64).sum())
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_quantizes, args=(queue,))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=5) == want


def test_threading_layer_is_tbb_where_installed():
    """The CPU kernels' threading layer: TBB where the tbb package is installed (about 2 us a
    parallel region, against about 85 us for workqueue), the layer running is the one chosen,
    and never GNU OpenMP."""
    import importlib.util
    import numba
    from qkernels import _numba_cpu
    x = np.linspace(-3, 3, 1 << 12, dtype=np.float32)
    with qkernels.use_backend("cpu"):
        qkernels.quantize_blockwise(x, blocksize=256)
    assert numba.threading_layer() == _numba_cpu.LAYER != "omp"
    tbb_installed = importlib.util.find_spec("tbb") is not None or \
        any(os.path.exists(os.path.join(p, "lib", "libtbb.so.12")) for p in (sys.prefix, sys.base_prefix))
    if sys.platform.startswith("linux") and tbb_installed and "NUMBA_THREADING_LAYER" not in os.environ:
        assert _numba_cpu.LAYER == "tbb"


_LAYER_PROBE = """
import numpy as np, numba, qkernels
from qkernels import _numba_cpu
with qkernels.use_backend("cpu"):
    qkernels.quantize_blockwise(np.linspace(-1, 1, 4096, dtype=np.float32))
print(_numba_cpu.LAYER, numba.threading_layer(), type(_numba_cpu.PARALLEL_LOCK).__name__)
"""
_EARLY_KERNEL = """
import numba, numpy as np
@numba.njit(parallel=True)
def bump(a):
    for i in numba.prange(a.shape[0]):
        a[i] += 1
bump(np.zeros(8))
"""


@pytest.mark.parametrize("setup,env", [("", {"NUMBA_THREADING_LAYER": "tbb"}),
                                       ("", {"NUMBA_THREADING_LAYER": "workqueue"}),
                                       (_EARLY_KERNEL, {})])
def test_threading_layer_recorded_is_the_one_running(setup, env):
    """LAYER names the layer the kernels run on, whether the user asked for one (TBB is found
    for a requested "tbb" too) or another parallel kernel started Numba's pool before
    qkernels was imported; the launch lock is dropped only under TBB."""
    import importlib.util
    import subprocess
    if env.get("NUMBA_THREADING_LAYER") == "tbb" and not (
            sys.platform.startswith("linux") and (importlib.util.find_spec("tbb") is not None or any(
                os.path.exists(os.path.join(p, "lib", "libtbb.so.12")) for p in (sys.prefix, sys.base_prefix)))):
        pytest.skip("no TBB here")
    full_env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    full_env.update(env, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", setup + _LAYER_PROBE], env=full_env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    layer, running, lock = done.stdout.split()[-3:]
    assert layer == running
    assert lock == ("nullcontext" if running == "tbb" else "RLock")
    if env:
        assert running == env["NUMBA_THREADING_LAYER"]


def test_python_threads_calling_cpu_kernels_together():
    """Threads that call the ops together all get the reference's answer, with no abort of
    the process: TBB runs their parallel kernels side by side, workqueue one at a time
    under PARALLEL_LOCK."""
    import threading
    x = np.random.default_rng(3).standard_normal(1 << 15).astype(np.float32)
    want, _ = ref_bw.quantize_blockwise(x, blocksize=512)
    results, errors = [], []

    def work():
        try:
            with qkernels.use_backend("cpu"):
                for _ in range(5):
                    results.append(qkernels.quantize_blockwise(x, blocksize=512)[0])
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    for codes in results:
        np.testing.assert_array_equal(codes, want)


def test_unnested_absmax_is_kept_per_state_and_never_stale():
    """The fused few-row route keeps a torch state's unnested absmax; writing any statistic
    in place, or another offset, makes it again (the result follows the new statistics)."""
    torch = pytest.importorskip("torch")
    import gc
    from qkernels.fourbit import _cpu
    w = torch.randn(64, 256)
    packed, state = qf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    x = torch.randn(2, 256)
    with qkernels.use_backend("cpu"):
        first = qf.matmul_4bit(x, packed, state)
        assert torch.equal(qf.matmul_4bit(x, packed, state), first)
        state.state2.absmax.mul_(2)   # in place: the kept array must not be used
        want = x @ qf.dequantize_4bit(packed, state).T
        got = qf.matmul_4bit(x, packed, state)
        assert not torch.equal(got, first) and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        state.absmax.copy_(state.absmax.flip(0))   # the nested codes themselves, in place
        want = x @ qf.dequantize_4bit(packed, state).T
        got = qf.matmul_4bit(x, packed, state)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        state.offset = float(state.offset) + 1.0
        want = x @ qf.dequantize_4bit(packed, state).T
        assert torch.allclose(qf.matmul_4bit(x, packed, state), want, rtol=1e-5, atol=1e-5)
    key = id(state.absmax)
    assert key in _cpu._UNNESTED
    del state
    gc.collect()
    assert key not in _cpu._UNNESTED


@pytest.mark.parametrize("rows", [1, 3, 9, 40])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("nested", [False, True])
def test_prepared_host_weight_is_the_public_op(rows, dtype, nested):
    """A layer's host plan (fourbit.HostWeight4bit) gives the public matmul_4bit's bits on
    each host backend, sees in-place writes to the packed bytes and statistics, and refuses
    bad x and bias as the op does."""
    torch = pytest.importorskip("torch")
    from qkernels.fourbit.ops import prepare_matmul_4bit
    tdt = getattr(torch, dtype)
    torch.manual_seed(rows)
    w = torch.randn(48, 256)
    packed, state = qf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    if nested:  # as a loaded checkpoint holds it: a tensor, which can be written in place
        state.offset = torch.tensor(float(state.offset))
    plan = prepare_matmul_4bit(packed, state)
    assert plan._host is not None
    x, bias = torch.randn(rows, 256).to(tdt), torch.randn(48).to(tdt)
    for backend in ("cpu", "numpy"):
        with qkernels.use_backend(backend):
            for b in (None, bias):
                assert torch.equal(plan(x, b), qf.matmul_4bit(x, packed, state, bias=b))
    first = plan(x, bias)
    # new bytes and statistics written in place (as load_state_dict does): the plan follows
    # them; compared with the op on fresh copies, which no cache of the old ones can serve
    packed2, state2 = qf.quantize_4bit(torch.randn(48, 256) * 1.5 + 0.25, blocksize=64, quant_type="nf4",
                                       compress_statistics=nested)
    packed.copy_(packed2)
    state.absmax.copy_(state2.absmax)
    if nested:
        state.state2.absmax.copy_(state2.state2.absmax)
        assert float(state.offset) != float(state2.offset)
        state.offset.copy_(torch.tensor(float(state2.offset)))
    again = plan(x, bias)
    assert not torch.equal(again, first)
    for backend in ("cpu", "numpy"):
        with qkernels.use_backend(backend):
            assert torch.equal(plan(x, bias), qf.matmul_4bit(x, packed2.clone(), state2, bias=bias))
    if dtype == "float32":  # and the oracle's float32 product, within its summation's error
        with qkernels.use_backend("numpy"):
            w32 = qf.dequantize_4bit(packed2, state2, out_dtype="float32").double()
        exact = x.double() @ w32.T + bias.double()
        magnitude = x.double().abs() @ w32.abs().T + bias.double().abs()
        assert ((again.double() - exact).abs() <= 2.0 ** -24 * (256 + 1) * magnitude).all()
    with pytest.raises(ValueError, match="in_features 256"):
        plan(torch.randn(rows, 255), None)
    with pytest.raises(TypeError):
        plan(torch.ones(rows, 256, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="48 elements"):
        plan(x, torch.ones(47, dtype=tdt))
    with pytest.raises(ValueError, match="bias must be on x's device"):  # CI has no GPU: meta
        plan(x, torch.ones(48, dtype=tdt, device="meta"))
