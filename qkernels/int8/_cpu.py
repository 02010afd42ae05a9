"""Numba CPU kernels for the LLM.int8() forward on host data. Reference: reference/int8.py.

The forward of a host Linear8bitLt (qkernels/int8/ops.py calls the ``*_torch`` functions):
- ``quantize_rows_torch``: one pass per row (parallel over rows): NaN-propagating absmax
  without outliers, then the codes ``clip(rint(x * f32(127 / m)), -127, 127)`` (NaN -> 0),
  outliers (``|x| >= f32(threshold)``) code 0 and their columns flagged; flagged columns are
  then zeroed in every row. Codes and row statistics are bit-identical to the reference.
- ``gemm_dequant_torch``: the exact int32 product ``CA @ CB^T`` by torch's own int8 GEMM
  (``torch._int_mm``, VNNI on AVX-512 CPUs) or, where that is slow or missing, float32 GEMMs
  over K-chunks of 1024 (every partial sum an integer below 2^24: exact in any order); then
  the epilogue ``((f32(C) * r) * c) * K (+ bias)`` in one parallel pass, each operation
  rounded in float32 as the reference does (``fastmath=False``: no contraction).
The int8 weight is the only copy of the weight kept: no dequantized weight is cached.

The table functions (``quantize_rows``, ``zero_cols``, ``mm_dequant``, ``gemm``) take the
NumPy backend's raw arrays and arguments (qkernels/int8/__init__.py), bfloat16 as uint16 bits.
Threads: ``torch.get_num_threads()`` when torch is loaded, capped by Numba's pool.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
from numba import njit, prange

from .._numba_cpu import PARALLEL_LOCK  # noqa: F401  (sets the threading layer; ops.py locks with it)
import numba

_K = np.float32(1.0 / (127.0 * 127.0))
_KCHUNK = 1024

_JIT = dict(parallel=True, fastmath=False, cache=True, error_model="numpy")


@njit(**_JIT)
def _quant_rows_kernel(x, threshold, q, stats, flags):
    """x float32 (M, K) C-contiguous -> q int8 (M, K), stats float32 (M,); flags uint8 (K,)
    set to 1 at outlier columns (threshold > 0; a benign race: every writer stores 1)."""
    M, K = x.shape
    t = np.float32(threshold)
    use_t = threshold > 0
    for i in prange(M):
        m = np.float32(0.0)
        for j in range(K):
            a = abs(x[i, j])
            if use_t and a >= t:
                flags[j] = 1
            elif a > m or a != a:
                m = a  # once NaN, m stays NaN (a > NaN is false; only a NaN a replaces it)
        stats[i] = m
        scale = np.float32(127.0) / m
        for j in range(K):
            v = x[i, j]
            if use_t and abs(v) >= t:
                q[i, j] = 0
                continue
            y = v * scale
            if y != y:
                q[i, j] = 0
            else:
                y = np.rint(y)
                if y > 127.0:
                    y = np.float32(127.0)
                elif y < -127.0:
                    y = np.float32(-127.0)
                q[i, j] = np.int8(y)


@njit(**_JIT)
def _zero_cols_kernel(q, idx):
    """q int8 (M, K): columns idx (int64) set to 0."""
    for i in prange(q.shape[0]):
        for k in range(idx.shape[0]):
            q[i, idx[k]] = 0


@njit(**_JIT)
def _epilogue_kernel(C, r, c, c_global, bias, has_bias, out):
    """out float32 (M, N) = ((f32(C) * r[m]) * c[n]) * K (+ bias[n]), left to right; c (N,)
    or, with c_global, one value c[0]; bias float32 (N,) when has_bias."""
    M, N = C.shape
    for i in prange(M):
        ri = r[i]
        for j in range(N):
            cj = c[0] if c_global else c[j]
            v = np.float32(C[i, j]) * ri
            v = v * cj
            v = v * _K
            if has_bias:
                v = v + bias[j]
            out[i, j] = v


# --- threads, readiness ----------------------------------------------------------------------

_state: dict = {}


def _set_threads() -> None:
    """Numba's thread count = torch's (when torch is loaded), at most Numba's pool."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    n = max(1, min(int(torch.get_num_threads()), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:  # Numba's setting is per calling thread: ask, not cache
        numba.set_num_threads(n)


def ready() -> bool:
    """Whether the kernels compile (or load from the on-disk cache); tried once per process.
    On a failure: one RuntimeWarning, then False (callers take the reference path)."""
    ok = _state.get("ready")
    if ok is None:
        try:
            x = np.zeros((2, 3), np.float32)
            q = np.empty((2, 3), np.int8)
            s = np.empty(2, np.float32)
            f = np.zeros(3, np.uint8)
            _quant_rows_kernel(x, 0.0, q, s, f)
            _zero_cols_kernel(q, np.zeros(1, np.int64))
            _epilogue_kernel(np.zeros((2, 3), np.int32), s, np.ones(3, np.float32), False,
                             np.zeros(3, np.float32), True, np.empty((2, 3), np.float32))
            ok = True
        except Exception as exc:  # a Numba compile or load failure
            warnings.warn(f"qkernels: the Numba CPU int8 kernels failed to compile ({type(exc).__name__}: "
                          f"{exc}); using the NumPy reference", RuntimeWarning, stacklevel=3)
            ok = False
        _state["ready"] = ok
    return ok


# --- NumPy-level core ------------------------------------------------------------------------

def quantize_rows_f32(x: np.ndarray, threshold: float, q: np.ndarray, stats: np.ndarray):
    """Row-wise codes of float32 x (M, K) C-contiguous into q int8 (M, K), stats float32 (M,).
    Returns the outlier columns (int64, ascending; threshold > 0, those columns of q zeroed)
    or None (threshold 0)."""
    _set_threads()
    t = float(threshold)
    flags = np.zeros(x.shape[1] if t > 0 else 1, np.uint8)
    _quant_rows_kernel(x, t, q, stats, flags)
    if t <= 0:
        return None
    idx = np.flatnonzero(flags).astype(np.int64)
    if idx.size:
        _zero_cols_kernel(q, idx)
    return idx


def epilogue_f32(C: np.ndarray, r: np.ndarray, c: np.ndarray, bias, out: np.ndarray) -> None:
    """The GEMM epilogue into float32 out (M, N); C int32 (M, N), r (M,), c (N,) or (1,),
    bias float32 (N,) or None; every array C-contiguous."""
    _set_threads()
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(1, np.float32)
    _epilogue_kernel(C, r, c, c.shape[0] == 1 and C.shape[1] != 1, b, has_bias, out)


# --- torch level (the host Linear8bitLt forward) ----------------------------------------------

def _int_mm_fast() -> bool:
    """Whether torch._int_mm is exact and fast here: torch >= 2.6 (earlier CPU versions could
    overflow without VNNI) on an AVX-512 CPU (elsewhere it is a scalar loop)."""
    fast = _state.get("int_mm")
    if fast is None:
        import torch
        version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
        fast = (hasattr(torch, "_int_mm") and version >= (2, 6)
                and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
        _state["int_mm"] = fast
    return fast


def int32_matmul_torch(CA, CB):
    """Exact int32 (M, N) = CA (M, K) int8 @ CB (N, K) int8 ^T on the CPU."""
    import torch
    M, K = CA.shape
    N = CB.shape[0]
    # K == 1: CB.t() is (1, N) with unit strides both ways, which _int_mm misreads (torch 2.13)
    if _int_mm_fast() and M > 0 and N > 0 and K > 1:
        return torch._int_mm(CA, CB.t())
    if K <= _KCHUNK:
        return (CA.float() @ CB.float().t()).to(torch.int32)
    acc = torch.zeros((M, N), dtype=torch.int64)
    for k in range(0, K, _KCHUNK):
        acc += (CA[:, k:k + _KCHUNK].float() @ CB[:, k:k + _KCHUNK].float().t()).to(torch.int64)
    return acc.to(torch.int32)  # wraps modulo 2^32, as int32 accumulation does


def quantize_rows_torch(x2, threshold: float):
    """int8_vectorwise_quant(x2, threshold) for a 2-D float CPU tensor: (CA int8, SCA float32,
    cols int64 tensor (threshold > 0) or None)."""
    import torch
    xf = x2.detach()
    if xf.dtype != torch.float32:
        xf = xf.float()  # exact for float16 / bfloat16
    xf = xf.contiguous()
    M, K = xf.shape
    q = torch.empty((M, K), dtype=torch.int8)
    stats = torch.empty((M,), dtype=torch.float32)
    idx = quantize_rows_f32(xf.numpy(), threshold, q.numpy(), stats.numpy())
    return q, stats, None if idx is None else torch.from_numpy(idx)


def gemm_dequant_torch(CA, CB, SCA, SCB, bias, out_dtype):
    """int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias) in out_dtype (torch dtype)
    on the CPU: CA int8 (M, K), CB int8 (N, K), SCA float32 (M,), SCB float32 (N,), bias (N,)
    float or None. float16 / bfloat16 outputs are the float32 values rounded once as the
    reference rounds them."""
    import torch
    C = int32_matmul_torch(CA.contiguous(), CB.contiguous())
    M, N = C.shape
    out = torch.empty((M, N), dtype=torch.float32)
    b = None if bias is None else bias.detach().float().contiguous().numpy()
    epilogue_f32(C.contiguous().numpy(), SCA.float().contiguous().numpy(),
                 SCB.float().contiguous().numpy(), b, out.numpy())
    if out_dtype == torch.float32:
        return out
    from reference.dtypes import float32_to_bf16_bits
    f = out.numpy()
    if out_dtype == torch.float16:
        with np.errstate(over="ignore"):  # beyond float16's range: Inf, as the reference
            return torch.from_numpy(f.astype(np.float16))
    return torch.from_numpy(float32_to_bf16_bits(f).view(np.int16)).view(torch.bfloat16)


# --- the op-table functions (qkernels/int8/__init__.py; raw NumPy arrays) ---------------------

def _as_f32(raw, dtype):
    from . import _f32
    return np.ascontiguousarray(_f32(raw, dtype))


def quantize_rows(x, q, stats, *, dtype, stats_dtype, threshold=0.0, flags=None):
    """As the NumPy backend's: x (M, K) raw of ``dtype``, q int8 (M, K), stats (M,) raw of
    stats_dtype, flags uint8 (K,) or None. Outlier columns are flagged, not zeroed (the caller
    zeroes)."""
    from . import _raw
    f = _as_f32(x, dtype)
    qq = q if q.flags.c_contiguous else np.empty(q.shape, np.int8)
    s = np.empty(f.shape[0], np.float32)
    fl = np.zeros(f.shape[1] if threshold > 0 else 1, np.uint8)
    _set_threads()
    _quant_rows_kernel(f, float(threshold), qq, s, fl)
    if qq is not q:
        q[...] = qq
    stats[...] = s if stats_dtype == "float32" else _raw(s, stats_dtype)
    if flags is not None:
        flags[...] = fl[: flags.shape[0]] if threshold > 0 else 0


def zero_cols(q, idx):
    """q[:, idx] = 0 (q int8 (M, K), idx int64)."""
    if q.flags.c_contiguous:
        _set_threads()
        _zero_cols_kernel(q, np.ascontiguousarray(idx, np.int64))
    else:
        q[:, idx] = 0


def mm_dequant(C, r, c, out, *, out_dtype, bias=None, bias_dtype=None):
    """As the NumPy backend's: the epilogue of C int32 (M, N) with r float32 (M,), c float32
    (N,) and bias (N,) raw of bias_dtype or None, into out (M, N) raw of out_dtype."""
    from . import _f32, _raw
    M, N = C.shape
    f = np.empty((M, N), np.float32)
    b = None if bias is None else np.ascontiguousarray(_f32(bias, bias_dtype))
    epilogue_f32(np.ascontiguousarray(C), np.ascontiguousarray(r, np.float32),
                 np.ascontiguousarray(c, np.float32), b, f)
    out[...] = f if out_dtype == "float32" else _raw(f, out_dtype)


def gemm(a, bt, out, *, out_dtype, r=None, r_dtype="float32", c=None, c_dtype="float32",
         c_global=False, bias=None, bias_dtype=None):
    """As the NumPy backend's: out (M, N) = a int8 (M, K) @ bt int8 (N, K)^T, exact in int32,
    then (unless out_dtype is "int32") the epilogue with r (M,) of r_dtype, c of c_dtype ((N,),
    or one global value (1,) with c_global) and bias (N,) of bias_dtype or None."""
    from . import _f32, _raw
    try:
        import torch
    except ImportError:  # qkernels without torch: the reference's exact float32-chunked GEMM
        from reference.int8 import matmul_int32
        C = matmul_int32(np.ascontiguousarray(a), np.ascontiguousarray(bt))
    else:
        C = int32_matmul_torch(torch.from_numpy(np.ascontiguousarray(a)),
                               torch.from_numpy(np.ascontiguousarray(bt))).numpy()
    if out_dtype == "int32":
        out[...] = C
        return
    M, N = C.shape
    f = np.empty((M, N), np.float32)
    b = None if bias is None else np.ascontiguousarray(_f32(bias, bias_dtype))
    cc = np.ascontiguousarray(_f32(c, c_dtype)).reshape(-1)
    _set_threads()
    _epilogue_kernel(np.ascontiguousarray(C), np.ascontiguousarray(_f32(r, r_dtype)), cc,
                     bool(c_global), b if b is not None else np.zeros(1, np.float32), b is not None, f)
    out[...] = f if out_dtype == "float32" else _raw(f, out_dtype)
