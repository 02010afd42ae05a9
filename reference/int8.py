"""INT8 quantization and int8 GEMMs, the NumPy oracle (docs/FORMATS.md §5, §6 and §12).

GPU versions: qkernels/int8/int8.cu (CuPy, including the fused-epilogue GEMM) and
qkernels/int8/_numba.py (every op but the GEMMs).

LLM.int8() family (vector-wise; leading dimensions of A are flattened into rows):
    int8_vectorwise_quant(A, threshold=0.0) -> (q int8 A.shape, row_stats f32 (rows,), outlier_cols)
    int8_vectorwise_dequant(q, stats) -> float32
    int8_linear_matmul(A int8 (..., K), B int8 (N, K)) -> int32 (..., N) = A @ B^T, exact
    int8_mm_dequant(C int32, row_stats, col_stats, bias=None, out_dtype="float16")
    int8_double_quant(A, threshold=0.0) -> (CA, CAt, row_stats, col_stats, outlier_cols)
SwitchBack family (2-D row-major input):
    quantize_rowwise(x) -> (q (M, K), state (M,))            state in x's dtype
    quantize_global(w) -> (q (N, K), state (1,))
    quantize_global_transpose(w) -> (q^T (K, N), state (1,))
    quantize_columnwise_and_transpose(w) -> (q^T (K, N), state (K,))
    dequantize_rowwise(q, state) -> state's dtype
    int8_matmul_rowwise_dequantize(a (M, K), b (K, N), state_a (M,), state_b (N,), bias=None)
    int8_matmul_mixed_dequantize(a (M, K), b (K, N), state_a (M,), state_b (1,), bias=None)

The quantizer (one rule for every op): with ``m`` the float32 absmax of the row, column or
tensor, ``scale = f32(127 / m)`` (one IEEE division) and
``q = clip(rint(f32(x) * scale), -127, 127)`` with ties to even; a NaN product gives code 0.
Consequences, which the kernels reproduce (docs/FORMATS.md §12): an all-zero row has m = 0,
scale = +Inf, 0 * Inf = NaN -> codes 0, and dequantizes to zeros. A row holding NaN has
m = NaN and all codes 0; it dequantizes to NaN. A row holding +-Inf has m = Inf,
scale = 0, codes 0 (Inf * 0 is NaN), and dequantizes to NaN (0 * Inf). Other rows are
unaffected. A tiny float32 m whose 127 / m overflows gives scale Inf and codes +-127.

Outliers (``threshold > 0``): an element with ``|a| >= threshold`` (an infinity too; a NaN
never) is left out of the statistics and gets code 0; ``outlier_cols`` lists (int64,
ascending) the columns holding one, and the row-wise codes of those whole columns are
zeroed (bnb zeroes them when rows > 1; with one row every element of such a column is an
outlier, so the two rules agree).

GEMM epilogue: ``out = f32(C) * r[m] * c[n] * K + bias[n]`` evaluated left to right in
float32, each operation rounded (no fused multiply-add), ``K = f32(1 / (127 * 127))``, then
rounded once to the output dtype. The int32 product is exact (it wraps modulo 2^32 only
past K = 131072 products of -128 * -128, as int32 accumulation does).
"""
from __future__ import annotations

import numpy as np

from .dtypes import check_float_dtype, dtype_name, from_float32, to_float32

__all__ = [
    "K_DEQUANT", "RCP_127",
    "quantize_rowwise", "quantize_global", "quantize_global_transpose",
    "quantize_columnwise_and_transpose", "dequantize_rowwise",
    "int8_matmul_rowwise_dequantize", "int8_matmul_mixed_dequantize",
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul",
    "int8_mm_dequant", "int8_double_quant",
    "check_threshold", "check_int8", "check_2d", "check_stats", "check_matmul_shapes",
    "quantize_with_scale", "absmax_rows", "absmax_cols", "matmul_int32", "mm_dequant_f32",
    "quantize_rows_f32", "quantize_cols_f32",
]

K_DEQUANT = np.float32(1.0 / (127.0 * 127.0))   # 6.200012e-05, bits 0x38820610
RCP_127 = np.float32(1.0 / 127.0)
assert K_DEQUANT.view(np.uint32) == 0x38820610
_CHUNK = 1 << 16           # elements per vectorized step (temporaries stay in L2)
_KCHUNK = 1024             # float32 matmul chunk: every partial sum stays below 2^24


# --- argument checks (shared by qkernels' public API) ----------------------------------

def check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise TypeError(f"threshold must be a number; got {threshold!r}")
    t = float(threshold)
    if not t >= 0.0 or t == np.inf:
        raise ValueError(f"threshold must be finite and >= 0 (0 disables outliers); got {threshold!r}")
    return t


def check_int8(dtype, argname: str) -> None:
    name = dtype_name(dtype)
    if name != "int8":
        raise TypeError(f"{argname} must be int8; got dtype {name}")


def check_2d(shape, argname: str) -> None:
    if len(shape) != 2:
        raise ValueError(f"{argname} must be 2-D (callers flatten leading dimensions); "
                         f"got shape {tuple(shape)}")


def check_stats(shape, dtype, n: int, argname: str, dtypes=("float16", "bfloat16", "float32")) -> None:
    name = dtype_name(dtype)
    if name not in dtypes:
        raise TypeError(f"{argname} must be {' or '.join(dtypes)}; got dtype {name}")
    size = int(np.prod(shape, dtype=np.int64))
    if size != n:
        raise ValueError(f"{argname} must hold {n} value(s); got shape {tuple(shape)}")


def check_matmul_shapes(a_shape, b_shape, a_name="a", b_name="b", b_is_nk=False) -> tuple[int, int, int]:
    """(M, N, K) of a (M, K) times b (K, N), or of A (..., K) times B^T for B (N, K)."""
    if b_is_nk:
        if len(a_shape) < 1:
            raise ValueError(f"{a_name} must have at least 1 dimension; got shape {tuple(a_shape)}")
        check_2d(b_shape, b_name)
        K = a_shape[-1]
        M = int(np.prod(a_shape[:-1], dtype=np.int64))
        N, Kb = b_shape
    else:
        check_2d(a_shape, a_name)
        check_2d(b_shape, b_name)
        M, K = a_shape
        Kb, N = b_shape
    if K != Kb:
        raise ValueError(f"inner dimensions differ: {a_name} has shape {tuple(a_shape)} and "
                         f"{b_name} has shape {tuple(b_shape)}")
    return int(M), int(N), int(K)


def _check_float(A, argname: str) -> str:
    name = dtype_name(A.dtype)
    check_float_dtype(name, argname)
    return name


# --- the quantizer core ------------------------------------------------------------------

def quantize_with_scale(x: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``clip(rint(x * scale), -127, 127)`` as int8 for float32 x and broadcastable float32
    scale; NaN products give 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        y = x * scale
        y = np.rint(y, out=y)
        np.clip(y, -127, 127, out=y)
    y[np.isnan(y)] = 0
    if out is None:
        return y.astype(np.int8)
    out[...] = y
    return out


def _scale_of(m: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return (np.float32(127.0) / m.astype(np.float32)).astype(np.float32)


def _masked_abs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray | None]:
    """(|x| with outliers set to 0, outlier mask or None)."""
    a = np.abs(x)
    if threshold > 0:
        mask = a >= np.float32(threshold)
        a[mask] = 0
        return a, mask
    return a, None


def absmax_rows(x: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(row absmax float32 (rows,) without outliers, NaN-propagating; per-column outlier flags (cols,))."""
    rows, cols = x.shape
    stats = np.zeros(rows, np.float32)
    flags = np.zeros(cols, bool)
    step = max(1, _CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        a, mask = _masked_abs(x[r:r + step], threshold)
        stats[r:r + step] = np.max(a, axis=1, initial=np.float32(0))
        if mask is not None:
            flags |= mask.any(axis=0)
    return stats, flags


def absmax_cols(x: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Column absmax float32 (cols,) without outliers, NaN-propagating."""
    rows, cols = x.shape
    stats = np.zeros(cols, np.float32)
    step = max(1, _CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        a, _ = _masked_abs(x[r:r + step], threshold)
        np.maximum(stats, np.max(a, axis=0, initial=np.float32(0)), out=stats)
    return stats


def quantize_rows_f32(x: np.ndarray, stats: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    """Row-wise codes of float32 x (rows, cols) for row absmax ``stats``; outliers get 0."""
    rows, cols = x.shape
    q = np.empty((rows, cols), np.int8)
    scale = _scale_of(stats)
    step = max(1, _CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        quantize_with_scale(x[r:r + step], scale[r:r + step, None], q[r:r + step])
        if threshold > 0:
            q[r:r + step][np.abs(x[r:r + step]) >= np.float32(threshold)] = 0
    return q


def quantize_cols_f32(x: np.ndarray, stats: np.ndarray, threshold: float = 0.0) -> np.ndarray:
    rows, cols = x.shape
    q = np.empty((rows, cols), np.int8)
    scale = _scale_of(stats)[None, :]
    step = max(1, _CHUNK // max(cols, 1))
    for r in range(0, rows, step):
        quantize_with_scale(x[r:r + step], scale, q[r:r + step])
        if threshold > 0:
            q[r:r + step][np.abs(x[r:r + step]) >= np.float32(threshold)] = 0
    return q


def _rows2d(A) -> tuple[np.ndarray, str, tuple]:
    """(float32 (rows, cols), dtype name, original shape) of an array with >= 1 dims."""
    A = np.asarray(A)
    name = _check_float(A, "A")
    if A.ndim < 1:
        raise ValueError(f"A must have at least 1 dimension; got shape {A.shape}")
    x, _ = to_float32(np.ascontiguousarray(A))
    cols = A.shape[-1]
    rows = int(np.prod(A.shape[:-1], dtype=np.int64))
    return x.reshape(rows, cols), name, A.shape


# --- LLM.int8() ----------------------------------------------------------------------------

def int8_vectorwise_quant(A, threshold: float = 0.0):
    """Row-wise int8 quantization with optional outlier columns (docs/FORMATS.md §5.2).

    A: float16 (bnb's type; bfloat16 and float32 also accepted), shape (..., cols); leading
    dims are rows. Returns (q int8 of A's shape, row_stats float32 (rows,), outlier_cols):
    outlier_cols is None when threshold == 0, else int64 (n_outlier_cols,) ascending.
    """
    t = check_threshold(threshold)
    x, _, shape = _rows2d(A)
    stats, flags = absmax_rows(x, t)
    q = quantize_rows_f32(x, stats, t)
    cols = None
    if t > 0:
        cols = np.flatnonzero(flags).astype(np.int64)
        q[:, cols] = 0
    return q.reshape(shape), stats, cols


def int8_vectorwise_dequant(q, stats):
    """``f32(q) * stats[row] * f32(1/127)`` as float32 of q's shape; stats float32 (rows,)."""
    q = np.asarray(q)
    check_int8(q.dtype, "A")
    if q.ndim < 1:
        raise ValueError(f"A must have at least 1 dimension; got shape {q.shape}")
    rows = int(np.prod(q.shape[:-1], dtype=np.int64))
    stats = np.asarray(stats)
    check_stats(stats.shape, stats.dtype, rows, "stats", ("float32",))
    s = stats.reshape(-1).astype(np.float32)
    with np.errstate(invalid="ignore"):
        out = q.reshape(rows, -1).astype(np.float32) * s[:, None] * RCP_127
    return out.reshape(q.shape)


def matmul_int32(a: np.ndarray, bt: np.ndarray) -> np.ndarray:
    """Exact ``a @ bt.T`` in int32 (wrapping) for int8 a (M, K) and bt (N, K).

    float32 matmuls over K-chunks of 1024: every partial sum is an integer below 2^24 in
    magnitude, so any summation order is exact; the chunks add up in int64."""
    M, K = a.shape
    N = bt.shape[0]
    if K <= _KCHUNK:  # one chunk: the float32 result is exact and within int32 already
        return (a.astype(np.float32) @ bt.astype(np.float32).T).astype(np.int32)
    out = np.zeros((M, N), np.int64)
    for k in range(0, K, _KCHUNK):
        a32 = a[:, k:k + _KCHUNK].astype(np.float32)
        b32 = bt[:, k:k + _KCHUNK].astype(np.float32)
        out += (a32 @ b32.T).astype(np.int64)
    return out.astype(np.int32)


def int8_linear_matmul(A, B):
    """``A @ B^T`` exactly in int32: A int8 (..., K), B int8 (N, K); returns int32 (..., N)."""
    A, B = np.asarray(A), np.asarray(B)
    check_int8(A.dtype, "A")
    check_int8(B.dtype, "B")
    M, N, K = check_matmul_shapes(A.shape, B.shape, "A", "B", b_is_nk=True)
    out = matmul_int32(A.reshape(M, K), B)
    return out.reshape(A.shape[:-1] + (N,))


def mm_dequant_f32(C: np.ndarray, r: np.ndarray, c: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The epilogue in float32: ``((f32(C) * r[:, None]) * c[None, :]) * K (+ bias)``.

    C int32 (M, N); r (M,) and c (N,) or (1,) float32; bias (N,) float32 or None."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = C.astype(np.float32) * r[:, None]
        out *= c[None, :]
        out *= K_DEQUANT
        if bias is not None:
            out += bias[None, :]
    return out


def _f32(a) -> np.ndarray:
    return to_float32(np.ascontiguousarray(np.asarray(a)).reshape(-1))[0]


def _check_bias(bias, n: int, argname="bias"):
    if bias is None:
        return None
    bias = np.asarray(bias)
    check_stats(bias.shape, bias.dtype, n, argname)
    return _f32(bias)


def int8_mm_dequant(C, row_stats, col_stats, bias=None, out_dtype="float16"):
    """Dequantize an int32 product: C int32 (..., N), row_stats float32 (rows,), col_stats
    float32 (N,), bias (N,) of any float dtype or None; returns out_dtype (default float16)
    of C's shape."""
    C = np.asarray(C)
    if dtype_name(C.dtype) != "int32":
        raise TypeError(f"A must be int32; got dtype {dtype_name(C.dtype)}")
    if C.ndim < 1:
        raise ValueError(f"A must have at least 1 dimension; got shape {C.shape}")
    N = C.shape[-1]
    M = int(np.prod(C.shape[:-1], dtype=np.int64))
    row_stats, col_stats = np.asarray(row_stats), np.asarray(col_stats)
    check_stats(row_stats.shape, row_stats.dtype, M, "row_stats", ("float32",))
    check_stats(col_stats.shape, col_stats.dtype, N, "col_stats", ("float32",))
    name = dtype_name(out_dtype)
    check_float_dtype(name, "out_dtype")
    b = _check_bias(bias, N)
    out = mm_dequant_f32(C.reshape(M, N), _f32(row_stats), _f32(col_stats), b)
    return from_float32(out, name).reshape(C.shape)


def int8_double_quant(A, threshold: float = 0.0):
    """Row- and column-wise int8 quantization (docs/FORMATS.md §5.6).

    Returns (CA int8 A's shape, CAt int8 A's shape (NOT transposed), row_stats float32
    (rows,), col_stats float32 (cols,), outlier_cols (as int8_vectorwise_quant)). With
    threshold > 0 the outliers are left out of both statistics; CA zeroes whole outlier
    columns, CAt only the outlier elements."""
    t = check_threshold(threshold)
    x, _, shape = _rows2d(A)
    row_stats, flags = absmax_rows(x, t)
    col_stats = absmax_cols(x, t)
    CA = quantize_rows_f32(x, row_stats, t)
    CAt = quantize_cols_f32(x, col_stats, t)
    cols = None
    if t > 0:
        cols = np.flatnonzero(flags).astype(np.int64)
        CA[:, cols] = 0
    return CA.reshape(shape), CAt.reshape(shape), row_stats, col_stats, cols


# --- SwitchBack ----------------------------------------------------------------------------

def _as_2d_f32(x, argname: str) -> tuple[np.ndarray, str]:
    x = np.asarray(x)
    name = _check_float(x, argname)
    check_2d(x.shape, argname)
    return to_float32(np.ascontiguousarray(x))[0], name


def _state(values: np.ndarray, name: str) -> np.ndarray:
    """absmax values (exact in the input dtype) as a state array of that dtype."""
    return from_float32(values.astype(np.float32), name)


def quantize_rowwise(x):
    """x (M, K) float16/bfloat16/float32 -> (q int8 (M, K), state (M,) row absmax in x's dtype)."""
    x32, name = _as_2d_f32(x, "x")
    stats, _ = absmax_rows(x32)
    return quantize_rows_f32(x32, stats), _state(stats, name)


def _global_absmax(x32: np.ndarray) -> np.float32:
    if x32.size == 0:
        return np.float32(0)
    return np.float32(np.max(np.abs(x32)))


def quantize_global(w):
    """w (N, K) -> (q int8 (N, K), state (1,) absmax of w in w's dtype)."""
    w32, name = _as_2d_f32(w, "w")
    m = _global_absmax(w32)
    q = quantize_with_scale(w32, _scale_of(np.array([m]))[0])
    return q, _state(np.array([m]), name)


def quantize_global_transpose(w):
    """w (N, K) -> (q^T int8 (K, N) contiguous, state (1,)): quantize_global, transposed."""
    q, state = quantize_global(w)
    return np.ascontiguousarray(q.T), state


def quantize_columnwise_and_transpose(w):
    """w (N, K) -> (q^T int8 (K, N) contiguous, state (K,) per-column absmax in w's dtype)."""
    w32, name = _as_2d_f32(w, "w")
    stats = absmax_cols(w32)
    q = quantize_cols_f32(w32, stats)
    return np.ascontiguousarray(q.T), _state(stats, name)


def dequantize_rowwise(q, state):
    """``f32(q) * state[:, None] * f32(1/127)`` rounded once to state's dtype; q int8 (M, K)."""
    q = np.asarray(q)
    check_int8(q.dtype, "x")
    check_2d(q.shape, "x")
    state = np.asarray(state)
    check_stats(state.shape, state.dtype, q.shape[0], "state")
    name = dtype_name(state.dtype)
    with np.errstate(invalid="ignore"):
        out = q.astype(np.float32) * _f32(state)[:, None] * RCP_127
    return from_float32(out, name)


def _switchback_matmul(a, b, state_a, state_b, bias, global_b: bool):
    a, b = np.asarray(a), np.asarray(b)
    check_int8(a.dtype, "a")
    check_int8(b.dtype, "b")
    M, N, K = check_matmul_shapes(a.shape, b.shape)
    state_a, state_b = np.asarray(state_a), np.asarray(state_b)
    check_stats(state_a.shape, state_a.dtype, M, "state_a")
    check_stats(state_b.shape, state_b.dtype, 1 if global_b else N, "state_b")
    name = dtype_name(state_a.dtype)
    bias = _check_bias(bias, N)
    C = matmul_int32(np.ascontiguousarray(a), np.ascontiguousarray(b.T))
    out = mm_dequant_f32(C, _f32(state_a), _f32(state_b), bias)
    return from_float32(out, name)


def int8_matmul_rowwise_dequantize(a, b, state_a, state_b, bias=None):
    """``f32(a @ b) * state_a[:, None] * state_b[None, :] * K + bias`` in state_a's dtype.

    a int8 (M, K) row-major; b int8 (K, N), typically ``W_int8.T`` (a transposed view of a
    contiguous (N, K) weight); state_a (M,), state_b (N,), bias (N,) or None."""
    return _switchback_matmul(a, b, state_a, state_b, bias, global_b=False)


def int8_matmul_mixed_dequantize(a, b, state_a, state_b, bias=None):
    """As int8_matmul_rowwise_dequantize with state_b one global scale (shape (1,))."""
    return _switchback_matmul(a, b, state_a, state_b, bias, global_b=True)
