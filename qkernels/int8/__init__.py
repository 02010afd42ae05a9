"""INT8 quantization and int8 GEMMs, public API: validate, choose a backend, call.

SwitchBack (2-D row-major input; states in the input's dtype):
    quantize_rowwise(x) -> (q int8 (M, K), state (M,))
    quantize_global(w) -> (q int8 (N, K), state (1,))
    quantize_global_transpose(w) -> (q^T int8 (K, N), state (1,))
    quantize_columnwise_and_transpose(w) -> (q^T int8 (K, N), state (K,))
    dequantize_rowwise(x, state) -> state's dtype
    int8_matmul_rowwise_dequantize(a (M, K), b (K, N), state_a (M,), state_b (N,), bias=None)
    int8_matmul_mixed_dequantize(a (M, K), b (K, N), state_a (M,), state_b (1,), bias=None)
LLM.int8() (leading dimensions are rows):
    int8_vectorwise_quant(A, threshold=0.0) -> (q int8, row_stats float32, outlier_cols int64 | None)
    int8_vectorwise_dequant(A, stats) -> float32
    int8_linear_matmul(A int8 (..., K), B int8 (N, K), out=None, dtype="int32") -> int32 (..., N)
    int8_mm_dequant(A int32, row_stats, col_stats, out=None, bias=None, *, out_dtype="float16")
    int8_double_quant(A, col_stats=None, row_stats=None, out_col=None, out_row=None,
                      threshold=0.0) -> (CA, CAt, row_stats, col_stats, outlier_cols)
The LLM.int8() functions have bitsandbytes' signatures (``bitsandbytes.functional``); the
earlier positional forms ``int8_mm_dequant(A, row_stats, col_stats, bias)`` and
``int8_double_quant(A, threshold)`` still work (see each function).

Implementations: reference/int8.py (numpy, the oracle), int8.cu + _cupy.py (cupy; the
GEMMs run there as one kernel with the dequantization fused into the epilogue), _numba.py
(numba; every op but the GEMMs, which fall back to cupy, else numpy). All give identical
codes, statistics and outputs. ``b`` of the SwitchBack matmuls is usually ``W_int8.t()``, a
transposed view of a contiguous (N, K) weight: the kernels read the weight as it is stored.
"""
from __future__ import annotations

import numpy as np

from reference import int8 as ref
from reference.dtypes import bf16_bits_to_float32, check_float_dtype, dtype_name, float32_to_bf16_bits
from .._backend import backend_table, choose, lazy
from .._interop import (Call, device_of, dtype_of, kind_of, shape_of, contiguous as _contiguous,
                       run as _run)
from .._compat import bnb_arg_errors, is_array, write_out

__all__ = [
    "quantize_rowwise", "quantize_global", "quantize_global_transpose",
    "quantize_columnwise_and_transpose", "dequantize_rowwise",
    "int8_matmul_rowwise_dequantize", "int8_matmul_mixed_dequantize",
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_linear_matmul",
    "int8_mm_dequant", "int8_double_quant",
]


# --- the numpy backend (the reference's cores on raw storage arrays) -----------------------
# Every backend of one table (numpy, cupy, numba, cpu) takes the same arguments: the operand
# arrays positionally (inputs, then outputs), every option and optional array keyword-only.
# Arrays are raw storage (bfloat16 as uint16 bits) with their logical dtype names beside
# them; outputs are written in place. The GPU backends add their own trailing keywords
# (numba: stream, threads; cupy's gemm: kernel).

def _f32(raw, dtype):
    """A bias (or scales) array of ``dtype`` as float32; None for none (then dtype must be
    None too: a backend entry's bias and bias_dtype come together)."""
    if (raw is None) != (dtype is None):
        raise ValueError(f"an array and its dtype go together; got {'an array' if raw is not None else None} "
                         f"and dtype {dtype!r}")
    if raw is None:
        return None
    return bf16_bits_to_float32(raw) if dtype == "bfloat16" else np.asarray(raw, np.float32)


def _raw(f32, dtype):
    if dtype == "bfloat16":
        return float32_to_bf16_bits(f32)
    return f32.astype(dtype)


def _numpy_quantize_rows(x, q, stats, *, dtype, stats_dtype, threshold=0.0, flags=None):
    """Row-wise codes: x (rows, cols) of ``dtype`` -> q int8 (rows, cols), stats (rows,) row
    absmax of ``stats_dtype``. With threshold > 0 the elements with |x| >= threshold code 0
    and are left out of the statistics, and flags uint8 (cols,), when given, marks their
    columns (the columns are not zeroed here: see zero_cols)."""
    f = _f32(x, dtype)
    s, fl = ref.absmax_rows(f, threshold)
    q[...] = ref.quantize_rows_f32(f, s, threshold)
    stats[...] = _raw(s, stats_dtype)
    if flags is not None:
        flags[...] = fl


def _numpy_zero_cols(q, idx):
    """q int8 (rows, cols): the columns idx (int64 (n,)) set to 0."""
    q[:, idx] = 0


def _numpy_quantize_global(x, q, state, *, dtype, transpose):
    """One scale for the tensor: x (N, K) of ``dtype`` -> q int8 (N, K), or its transpose
    (K, N) with ``transpose``; state (1,) of ``dtype`` = the absmax."""
    f = _f32(x, dtype)
    m = np.float32(np.max(np.abs(f))) if f.size else np.float32(0)
    codes = ref.quantize_with_scale(f, ref._scale_of(np.array([m]))[0])
    q[...] = codes.T if transpose else codes
    state[...] = _raw(np.array([m], np.float32), dtype)


def _numpy_quantize_columns(x, q, *, dtype, transpose, threshold=0.0, state=None, col_stats=None):
    """Per-column codes of x (rows, cols) of ``dtype`` (outliers, |x| >= threshold > 0, code 0
    and are left out of the statistics): with ``transpose``, q int8 (cols, rows) = the codes
    transposed and state (cols,) of ``dtype`` = the column absmax; otherwise q int8 (rows,
    cols) and col_stats float32 (cols,)."""
    f = _f32(x, dtype)
    s = ref.absmax_cols(f, threshold)
    codes = ref.quantize_cols_f32(f, s, threshold)
    if transpose:
        q[...] = codes.T
        state[...] = _raw(s, dtype)
    else:
        q[...] = codes
        col_stats[...] = s


def _numpy_dequant_rows(q, stats, out, *, stats_dtype, out_dtype):
    """out (rows, cols) of ``out_dtype`` = f32(q) * stats[row] * f32(1/127), rounded once;
    q int8 (rows, cols), stats (rows,) of ``stats_dtype``."""
    s = _f32(stats, stats_dtype)
    with np.errstate(invalid="ignore"):
        f = q.astype(np.float32) * s[:, None] * ref.RCP_127
    out[...] = _raw(f, out_dtype)


def _numpy_mm_dequant(C, r, c, out, *, out_dtype, bias=None, bias_dtype=None):
    """The int8 GEMM's epilogue: out (M, N) of ``out_dtype`` = ((f32(C) * r[m]) * c[n]) *
    f32(1/127^2) (+ bias[n]), rounded once; C int32 (M, N), r float32 (M,), c float32 (N,),
    bias (N,) of ``bias_dtype`` or None."""
    out[...] = _raw(ref.mm_dequant_f32(C, r, c, _f32(bias, bias_dtype)), out_dtype)


def _numpy_gemm(a, bt, out, *, out_dtype, r=None, r_dtype="float32", c=None, c_dtype="float32",
                c_global=False, bias=None, bias_dtype=None):
    """out (M, N) = a (M, K) int8 @ bt (N, K) int8 ^T, exact in int32: the raw product when
    ``out_dtype`` is "int32" (r, c and bias unused), else the mm_dequant epilogue rounded
    once to ``out_dtype`` with row scales r (M,) of ``r_dtype``, column scales c of
    ``c_dtype``, (N,) or, with ``c_global``, (1,), and bias (N,) of ``bias_dtype`` or None."""
    C = ref.matmul_int32(a, bt)
    if out_dtype == "int32":
        out[...] = C
        return
    out[...] = _raw(ref.mm_dequant_f32(C, _f32(r, r_dtype), _f32(c, c_dtype),
                                       _f32(bias, bias_dtype)), out_dtype)


# --- one table per op ----------------------------------------------------------------------

_QUANTIZE_ROWS = backend_table(_numpy_quantize_rows, "int8", "quantize_rows")
_ZERO_COLS = backend_table(_numpy_zero_cols, "int8", "zero_cols")
_QUANTIZE_GLOBAL = backend_table(_numpy_quantize_global, "int8", "quantize_global", ("cupy", "numba"))
_QUANTIZE_COLUMNS = {
    "numpy": _numpy_quantize_columns,
    "cupy": lazy(".int8._cupy", "quantize_columns"),
    "numba": lazy(".int8._numba", "quantize_columns"),
    "cpu": _numpy_quantize_columns,  # int8_double_quant indexes it by _QUANTIZE_ROWS' backend
}
_DEQUANT_ROWS = backend_table(_numpy_dequant_rows, "int8", "dequant_rows", ("cupy", "numba"))
_MM_DEQUANT = backend_table(_numpy_mm_dequant, "int8", "mm_dequant")
_GEMM = {  # no Numba GEMM: under use_backend("numba") the GEMMs run on cupy, else numpy
    "numpy": _numpy_gemm,
    "cupy": lazy(".int8._cupy", "gemm"),
    "cpu": lazy(".int8._cpu", "gemm"),  # torch's int8 GEMM + a Numba epilogue
}


# --- helpers -------------------------------------------------------------------------------





def _transpose(b):
    """The transposed view of a 2-D array of any supported kind (no copy)."""
    return b.t() if kind_of(b) == "torch" else b.T


def _size(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _float_input(x, argname: str, two_d: bool) -> tuple[str, tuple]:
    kind_of(x)
    name = dtype_of(x)
    check_float_dtype(name, argname)
    shape = shape_of(x)
    if two_d:
        ref.check_2d(shape, argname)
    elif len(shape) < 1:
        raise ValueError(f"{argname} must have at least 1 dimension; got shape {shape}")
    return name, shape


def _rows_cols(shape) -> tuple[int, int]:
    return _size(shape[:-1]), int(shape[-1])


def _arg2d(call: Call, x, rows: int, cols: int):
    return call.arg(_contiguous(x)).reshape(rows, cols)


def _vector(call: Call, v, n: int, argname: str, dtypes=("float16", "bfloat16", "float32")):
    """A 1-D scale / bias argument: validated dtype and length, as a flat backend array."""
    kind_of(v)
    ref.check_stats(shape_of(v), dtype_of(v), n, argname, dtypes)
    return call.arg(_contiguous(v)).reshape(-1)


def _choose(table, x):
    return choose(table, on_gpu=device_of(x) is not None)


def _outlier_cols(call: Call, flags, rows: int, q2d):
    """Compact the outlier-column flags into int64 indices (a host synchronization, as in
    bnb) and zero those columns of q; returns the indices in the caller's kind."""
    if call.backend == "cupy":  # one kernel: compaction and zeroing; the host reads the count
        from . import _cupy
        cols = int(q2d.shape[1])
        buf = call.empty((cols,), "int64")
        with call.cupy_context():
            n = _cupy.outlier_cols(flags, q2d, buf)
        return call.result(buf, "int64")[:n]
    if call.backend == "numba":
        idx = np.flatnonzero(flags.copy_to_host()).astype(np.int64)
    else:
        idx = np.flatnonzero(flags).astype(np.int64)
    out = call.empty((int(idx.size),), "int64")
    if idx.size:
        if call.backend == "numba":
            out.copy_to_device(idx)
        elif call.backend == "cupy":
            with call.cupy_context():
                out[...] = idx
        else:
            out[...] = idx
        _run(call, _ZERO_COLS[call.backend], q2d, out)
    return call.result(out, "int64")


# --- SwitchBack --------------------------------------------------------------------------------

def quantize_rowwise(x):
    """Row-wise int8 quantization of x (M, K) float16/bfloat16/float32 (NumPy, CuPy, Numba or
    torch): ``q = rint(x * f32(127 / rowmax))``. Returns (q int8 (M, K), state (M,) row absmax
    in x's dtype), in x's kind and device."""
    name, shape = _float_input(x, "x", two_d=True)
    backend, impl = _choose(_QUANTIZE_ROWS, x)
    call = Call(x, backend)
    M, K = shape
    q, state = call.empty((M, K), "int8"), call.empty((M,), name)
    _run(call, impl, _arg2d(call, x, M, K), q, state, dtype=name, stats_dtype=name)
    return call.result(q, "int8"), call.result(state, name)


def _quantize_global(w, transpose: bool):
    name, shape = _float_input(w, "w", two_d=True)
    backend, impl = _choose(_QUANTIZE_GLOBAL, w)
    call = Call(w, backend)
    N, K = shape
    q, state = call.empty((K, N) if transpose else (N, K), "int8"), call.empty((1,), name)
    _run(call, impl, _arg2d(call, w, N, K), q, state, dtype=name, transpose=transpose)
    return call.result(q, "int8"), call.result(state, name)


def quantize_global(w):
    """Tensor-wise int8 quantization of w (N, K): (q int8 (N, K), state (1,) absmax in w's dtype)."""
    return _quantize_global(w, transpose=False)


def quantize_global_transpose(w):
    """quantize_global with the codes transposed in the same pass: (q^T int8 (K, N)
    contiguous, state (1,))."""
    return _quantize_global(w, transpose=True)


def quantize_columnwise_and_transpose(w):
    """Per-column int8 quantization of w (N, K), transposed in the same pass: (q^T int8 (K, N)
    contiguous, state (K,) per-column absmax in w's dtype)."""
    name, shape = _float_input(w, "w", two_d=True)
    backend, impl = _choose(_QUANTIZE_COLUMNS, w)
    call = Call(w, backend)
    N, K = shape
    q, state = call.empty((K, N), "int8"), call.empty((K,), name)
    _run(call, impl, _arg2d(call, w, N, K), q, dtype=name, transpose=True, state=state)
    return call.result(q, "int8"), call.result(state, name)


def dequantize_rowwise(x, state):
    """``f32(x) * state[:, None] * f32(1/127)`` rounded once to state's dtype; x int8 (M, K),
    state (M,) float16/bfloat16/float32."""
    kind_of(x)
    ref.check_int8(dtype_of(x), "x")
    ref.check_2d(shape_of(x), "x")
    M, K = shape_of(x)
    kind_of(state)
    sname = dtype_of(state)
    backend, impl = _choose(_DEQUANT_ROWS, x)
    call = Call(x, backend)
    s = _vector(call, state, M, "state")
    out = call.empty((M, K), sname)
    _run(call, impl, _arg2d(call, x, M, K), s, out, stats_dtype=sname, out_dtype=sname)
    return call.result(out, sname)


def _switchback_matmul(a, b, state_a, state_b, bias, global_b: bool):
    kind_of(a)
    kind_of(b)
    ref.check_int8(dtype_of(a), "a")
    ref.check_int8(dtype_of(b), "b")
    M, N, K = ref.check_matmul_shapes(shape_of(a), shape_of(b))
    backend, impl = _choose(_GEMM, a)
    call = Call(a, backend)
    ra = _vector(call, state_a, M, "state_a")
    cb = _vector(call, state_b, 1 if global_b else N, "state_b")
    bv = None if bias is None else _vector(call, bias, N, "bias")
    out_dtype = dtype_of(state_a)
    out = call.empty((M, N), out_dtype)
    bt = call.arg(_contiguous(_transpose(b)))  # (N, K): W itself when b = W.t(), no copy
    _run(call, impl, _arg2d(call, a, M, K), bt, out, out_dtype=out_dtype, r=ra,
         r_dtype=dtype_of(state_a), c=cb, c_dtype=dtype_of(state_b), c_global=global_b, bias=bv,
         bias_dtype=None if bias is None else dtype_of(bias))
    return call.result(out, out_dtype)


def int8_matmul_rowwise_dequantize(a, b, state_a, state_b, bias=None):
    """``f32(a @ b) * state_a[:, None] * state_b[None, :] * f32(1/127^2) + bias`` in float32,
    rounded once to state_a's dtype. a int8 (M, K); b int8 (K, N), usually ``W_int8.t()``;
    state_a (M,), state_b (N,), bias (N,) or None (float16/bfloat16/float32). int32
    accumulation, exact; the product never leaves the GEMM's registers on the GPU."""
    return _switchback_matmul(a, b, state_a, state_b, bias, global_b=False)


def int8_matmul_mixed_dequantize(a, b, state_a, state_b, bias=None):
    """As int8_matmul_rowwise_dequantize with state_b one global scale of shape (1,)."""
    return _switchback_matmul(a, b, state_a, state_b, bias, global_b=True)


# --- LLM.int8() --------------------------------------------------------------------------------

def int8_vectorwise_quant(A, threshold: float = 0.0):
    """LLM.int8() row-wise quantization of A (..., cols) float16 (bfloat16/float32 accepted).

    Returns (q int8 of A's shape, row_stats float32 (rows,), outlier_cols): with threshold > 0
    the elements with |a| >= threshold are left out of the statistics, outlier_cols (int64,
    ascending, possibly empty) lists their columns and those columns of q are zero; with
    threshold 0, outlier_cols is None. A is not modified."""
    with bnb_arg_errors():
        t = ref.check_threshold(threshold)
        name, shape = _float_input(A, "A", two_d=False)
    rows, cols = _rows_cols(shape)
    backend, impl = _choose(_QUANTIZE_ROWS, A)
    if t > 0 and backend == "cupy" and kind_of(A) == "torch" and device_of(A) is not None:
        # torch on the GPU: raw pointers and torch allocations, no per-array conversions
        from . import _cupy
        q, stats, outliers = _cupy.int8_vectorwise_quant_torch(_contiguous(A).reshape(rows, cols), t)
        return q.reshape(shape), stats, outliers
    call = Call(A, backend)
    q, stats = call.empty(shape, "int8"), call.empty((rows,), "float32")
    flags = call.empty((cols,), "uint8") if t > 0 else None
    q2d = q.reshape(rows, cols)
    _run(call, impl, _arg2d(call, A, rows, cols), q2d, stats, dtype=name, stats_dtype="float32",
         threshold=t, flags=flags)
    outliers = _outlier_cols(call, flags, rows, q2d) if t > 0 else None
    return call.result(q, "int8"), call.result(stats, "float32"), outliers


def int8_vectorwise_dequant(A, stats):
    """``f32(A) * stats[row] * f32(1/127)`` as float32; A int8 (..., cols), stats float32 (rows,)."""
    with bnb_arg_errors():
        kind_of(A)
        ref.check_int8(dtype_of(A), "A")
        shape = shape_of(A)
        if len(shape) < 1:
            raise ValueError(f"A must have at least 1 dimension; got shape {shape}")
        rows, cols = _rows_cols(shape)
        backend, impl = _choose(_DEQUANT_ROWS, A)
        call = Call(A, backend)
        s = _vector(call, stats, rows, "stats", ("float32",))
    out = call.empty(shape, "float32")
    _run(call, impl, _arg2d(call, A, rows, cols), s, out.reshape(rows, cols), stats_dtype="float32",
         out_dtype="float32")
    return call.result(out, "float32")


def int8_linear_matmul(A, B, out=None, dtype="int32"):
    """``A @ B^T`` exactly in int32: A int8 (..., K), B int8 (N, K); returns int32 (..., N).
    On the GPU this is the int8 GEMM with an int32 epilogue. ``out`` (int32 (..., N))
    receives the product and is returned; ``dtype`` (bitsandbytes' argument) must be int32."""
    with bnb_arg_errors():
        kind_of(A)
        kind_of(B)
        ref.check_int8(dtype_of(A), "A")
        ref.check_int8(dtype_of(B), "B")
        if dtype is not None and dtype_name(dtype) != "int32":
            raise ValueError(f"dtype must be int32 (the exact product); got {dtype_name(dtype)}")
        M, N, K = ref.check_matmul_shapes(shape_of(A), shape_of(B), "A", "B", b_is_nk=True)
    backend, impl = _choose(_GEMM, A)
    call = Call(A, backend)
    result = call.empty(tuple(shape_of(A)[:-1]) + (N,), "int32")
    _run(call, impl, _arg2d(call, A, M, K), call.arg(_contiguous(B)), result.reshape(M, N),
         out_dtype="int32")
    result = call.result(result, "int32")
    return result if out is None else write_out(out, result)


def int8_mm_dequant(A, row_stats, col_stats, out=None, bias=None, *, out_dtype=None):
    """``f32(A) * row_stats[:, None] * col_stats[None, :] * f32(1/127^2) + bias`` in float32,
    rounded once to out_dtype (default out's dtype, else float16). A int32 (..., N),
    row_stats float32 (rows values, any shape), col_stats float32 (N values), bias (N,)
    float16/bfloat16/float32 or None. ``out`` (A's shape) receives the result and is returned.

    The earlier order ``int8_mm_dequant(A, row_stats, col_stats, bias)`` still works: a 1-D
    array of N values in out's place, for 2-D or higher A (where out would have A's shape),
    is the bias."""
    if (out is not None and bias is None and is_array(out) and is_array(A)
            and len(shape_of(out)) == 1 and len(shape_of(A)) >= 2):
        out, bias = None, out
    with bnb_arg_errors():
        kind_of(A)
        if dtype_of(A) != "int32":
            raise TypeError(f"A must be int32; got dtype {dtype_of(A)}")
        shape = shape_of(A)
        if len(shape) < 1:
            raise ValueError(f"A must have at least 1 dimension; got shape {shape}")
        if out is not None:
            kind_of(out)
            if out_dtype is None:
                out_dtype = dtype_of(out)
        name = dtype_name(out_dtype) if out_dtype is not None else "float16"
        check_float_dtype(name, "out_dtype")
        rows, cols = _rows_cols(shape)
        backend, impl = _choose(_MM_DEQUANT, A)
        call = Call(A, backend)
        r = _vector(call, row_stats, rows, "row_stats", ("float32",))
        c = _vector(call, col_stats, cols, "col_stats", ("float32",))
        bv = None if bias is None else _vector(call, bias, cols, "bias")
    result = call.empty(shape, name)
    _run(call, impl, _arg2d(call, A, rows, cols), r, c, result.reshape(rows, cols), out_dtype=name,
         bias=bv, bias_dtype=None if bias is None else dtype_of(bias))
    result = call.result(result, name)
    return result if out is None else write_out(out, result)


def int8_double_quant(A, col_stats=None, row_stats=None, out_col=None, out_row=None,
                      threshold: float = 0.0):
    """Row- and column-wise int8 quantization of A (..., cols): (CA int8, CAt int8 (A's shape,
    NOT transposed), row_stats float32 (rows,), col_stats float32 (cols,), outlier_cols as in
    int8_vectorwise_quant). With threshold > 0 outliers are left out of both statistics; CA
    zeroes whole outlier columns, CAt only the outlier elements.

    bitsandbytes' preallocated col_stats / row_stats / out_col / out_row are not supported
    (ValueError, as there). A number in col_stats' place is the threshold: the earlier
    order ``int8_double_quant(A, threshold)``."""
    if col_stats is not None and not is_array(col_stats) and isinstance(col_stats, (int, float, np.number)):
        col_stats, threshold = None, col_stats
    for arg, argname in ((col_stats, "col_stats"), (row_stats, "row_stats"), (out_col, "out_col"),
                         (out_row, "out_row")):
        if arg is not None:
            raise ValueError(f"{argname} must be None: int8_double_quant allocates its outputs")
    with bnb_arg_errors():
        t = ref.check_threshold(threshold)
        name, shape = _float_input(A, "A", two_d=False)
    rows, cols = _rows_cols(shape)
    backend, impl = _choose(_QUANTIZE_ROWS, A)
    call = Call(A, backend)
    x2d = _arg2d(call, A, rows, cols)
    CA, CAt = call.empty(shape, "int8"), call.empty(shape, "int8")
    row_stats, col_stats = call.empty((rows,), "float32"), call.empty((cols,), "float32")
    flags = call.empty((cols,), "uint8") if t > 0 else None
    ca2d = CA.reshape(rows, cols)
    _run(call, impl, x2d, ca2d, row_stats, dtype=name, stats_dtype="float32", threshold=t, flags=flags)
    _run(call, _QUANTIZE_COLUMNS[backend], x2d, CAt.reshape(rows, cols), dtype=name, transpose=False,
         threshold=t, col_stats=col_stats)
    outliers = _outlier_cols(call, flags, rows, ca2d) if t > 0 else None
    return (call.result(CA, "int8"), call.result(CAt, "int8"), call.result(row_stats, "float32"),
            call.result(col_stats, "float32"), outliers)
