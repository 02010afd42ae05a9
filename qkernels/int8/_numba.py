"""Numba CUDA kernels for the INT8 quantizers and dequantizers (no GEMMs: those are CuPy's).
Reference: reference/int8.py; the CuPy version: int8.cu beside this file.

Written to be read (and run under the CUDA simulator): no warp shuffles, shared-memory tree
reductions, one thread per element where that is simplest.
- row_quant_kernel: one CUDA block per row; each thread strides over the row's columns,
  the block reduces the NaN-propagating absmax (outliers left out) in shared memory, then
  each thread writes its codes; outlier columns are flagged in ``flags``.
- absmax_kernel: per-block NaN-propagating absmax of a flat array (run twice: array ->
  per-block maxima -> one value).
- col_absmax_kernel: one thread per column, looping down the rows.
- quant_global_kernel / quant_cols_kernel: one thread per element, one scale per tensor or
  per column, optionally writing the transpose.
- dequant_rows_kernel, mm_dequant_kernel, zero_cols_kernel: one thread per element.
Storage dtypes: bfloat16 arrives as uint16 bits (``*_bf16`` flags); float16/float32 as is.
"""
from __future__ import annotations

import numpy as np
from numba import config, cuda, float32

from .._numba_util import add_rn, load_f32, mul_rn, nan_max, quant8, store_f32

MAX_THREADS = 1024
# threads per block: the simulator runs each thread in Python (~0.2 ms each), so fewer there
THREADS = 32 if config.ENABLE_CUDASIM else 128
_K = np.float32(1.0 / (127.0 * 127.0))
_RCP127 = np.float32(1.0 / 127.0)
_INF = np.float32(np.inf)


@cuda.jit(device=True, inline=True)
def scale_of(m):
    """f32(127 / m); +Inf for m == 0 (so that 0 * scale is NaN and codes 0, as on the GPU)."""
    return float32(127.0) / m if m != 0 else _INF


@cuda.jit
def row_quant_kernel(x, is_bf16, threshold, q, stats, stats_bf16, flags, has_flags):
    rows, cols = x.shape
    shared_max = cuda.shared.array(MAX_THREADS, float32)
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    for row in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        m = float32(0.0)
        for c in range(t, cols, threads):
            a = abs(load_f32(x[row], c, is_bf16))
            if threshold > 0 and a >= threshold:
                if has_flags:
                    flags[c] = 1
            else:
                m = nan_max(a, m)
        shared_max[t] = m
        cuda.syncthreads()
        step = threads // 2
        while step > 0:
            if t < step:
                shared_max[t] = nan_max(shared_max[t + step], shared_max[t])
            cuda.syncthreads()
            step //= 2
        m = shared_max[0]
        s = scale_of(m)
        for c in range(t, cols, threads):
            v = load_f32(x[row], c, is_bf16)
            if threshold > 0 and abs(v) >= threshold:
                q[row, c] = 0
            else:
                q[row, c] = quant8(v, s)
        if t == 0:
            store_f32(stats, row, m, stats_bf16)
        cuda.syncthreads()


@cuda.jit
def absmax_kernel(x, is_bf16, partial):
    """partial[block] = NaN-propagating max |x| over the elements this block strides over."""
    shared_max = cuda.shared.array(MAX_THREADS, float32)
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    m = float32(0.0)
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        m = nan_max(abs(load_f32(x, i, is_bf16)), m)
    shared_max[t] = m
    cuda.syncthreads()
    step = threads // 2
    while step > 0:
        if t < step:
            shared_max[t] = nan_max(shared_max[t + step], shared_max[t])
        cuda.syncthreads()
        step //= 2
    if t == 0:
        partial[cuda.blockIdx.x] = shared_max[0]


@cuda.jit
def col_absmax_kernel(x, is_bf16, threshold, colmax):
    rows, cols = x.shape
    for c in range(cuda.grid(1), cols, cuda.gridsize(1)):
        m = float32(0.0)
        for r in range(rows):
            a = abs(load_f32(x[r], c, is_bf16))
            if not (threshold > 0 and a >= threshold):
                m = nan_max(a, m)
        colmax[c] = m


@cuda.jit
def quant_global_kernel(x, is_bf16, absmax, q, transpose, state, state_bf16):
    rows, cols = x.shape
    m = absmax[0]
    s = scale_of(m)
    for i in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        r = i // cols
        c = i - r * cols
        code = quant8(load_f32(x[r], c, is_bf16), s)
        if transpose:
            q[c, r] = code
        else:
            q[r, c] = code
        if i == 0:
            store_f32(state, 0, m, state_bf16)


@cuda.jit
def quant_cols_kernel(x, is_bf16, colmax, threshold, q, transpose, state, state_bf16, write_state):
    rows, cols = x.shape
    for i in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        r = i // cols
        c = i - r * cols
        v = load_f32(x[r], c, is_bf16)
        code = 0 if (threshold > 0 and abs(v) >= threshold) else quant8(v, scale_of(colmax[c]))
        if transpose:
            q[c, r] = code
        else:
            q[r, c] = code
        if write_state and r == 0:
            store_f32(state, c, colmax[c], state_bf16)


@cuda.jit
def zero_cols_kernel(q, idx):
    rows = q.shape[0]
    n = idx.shape[0]
    for i in range(cuda.grid(1), rows * n, cuda.gridsize(1)):
        q[i // n, idx[i % n]] = 0


@cuda.jit
def dequant_rows_kernel(q, stats, stats_bf16, out, out_bf16):
    rows, cols = q.shape
    for i in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        r = i // cols
        c = i - r * cols
        v = mul_rn(mul_rn(float32(q[r, c]), load_f32(stats, r, stats_bf16)), _RCP127)
        store_f32(out[r], c, v, out_bf16)


@cuda.jit
def mm_dequant_kernel(C, r, c, bias, has_bias, bias_bf16, out, out_bf16):
    rows, cols = C.shape
    for i in range(cuda.grid(1), rows * cols, cuda.gridsize(1)):
        row = i // cols
        col = i - row * cols
        v = mul_rn(mul_rn(mul_rn(float32(C[row, col]), r[row]), c[col]), _K)
        if has_bias:
            v = add_rn(v, load_f32(bias, col, bias_bf16))
        store_f32(out[row], col, v, out_bf16)


# --- launchers (qkernels.int8's backend tables) --------------------------------------------
# The NumPy backend's arguments (qkernels/int8/__init__.py), plus ``stream`` (a Numba stream,
# or 0) and ``threads`` (the CTA size) by keyword.

def _grid(n: int, threads: int) -> int:
    return max(1, min(-(-n // threads), 65535))


def _dummy():
    return cuda.device_array(1, np.uint8)


def quantize_rows(x, q, stats, *, dtype, stats_dtype, threshold=0.0, flags=None, stream=0,
                  threads: int = THREADS):
    """x (rows, cols) of ``dtype`` -> q int8 (rows, cols), stats (rows,) of stats_dtype; flags
    uint8 (cols,) or None (zeroed here) marks the outlier columns when threshold > 0."""
    rows, cols = x.shape
    has_flags = flags is not None
    if has_flags and cols:
        flags.copy_to_device(np.zeros(cols, np.uint8), stream=stream)
    if rows == 0:
        return
    row_quant_kernel[min(rows, 65535), threads, stream](
        x, dtype == "bfloat16", np.float32(threshold), q, stats, stats_dtype == "bfloat16",
        flags if has_flags else _dummy(), has_flags)


def zero_cols(q, idx, *, stream=0, threads: int = THREADS):
    """q int8 (rows, cols): the columns idx (int64 (n,)) set to 0."""
    n = q.shape[0] * idx.shape[0]
    if n:
        zero_cols_kernel[_grid(n, threads), threads, stream](q, idx)


def _absmax(x_flat, is_bf16, stream, threads):
    blocks = max(1, min(-(-x_flat.shape[0] // threads), 256))
    partial = cuda.device_array(blocks, np.float32, stream=stream)
    absmax_kernel[blocks, threads, stream](x_flat, is_bf16, partial)
    out = cuda.device_array(1, np.float32, stream=stream)
    absmax_kernel[1, threads, stream](partial, False, out)
    return out


def quantize_global(x, q, state, *, dtype, transpose, stream=0, threads: int = THREADS):
    """x (N, K) of ``dtype`` -> q int8 (N, K) or (K, N) (transpose), state (1,) absmax in dtype."""
    rows, cols = x.shape
    bf16 = dtype == "bfloat16"
    if rows * cols == 0:
        state.copy_to_device(np.zeros(1, state.dtype), stream=stream)
        return
    m = _absmax(x.reshape(rows * cols), bf16, stream, threads)
    quant_global_kernel[_grid(rows * cols, threads), threads, stream](x, bf16, m, q, transpose, state, bf16)


def quantize_columns(x, q, *, dtype, transpose, threshold=0.0, state=None, col_stats=None, stream=0,
                     threads: int = THREADS):
    """Per-column quantization of x (rows, cols) of ``dtype``: q^T int8 (cols, rows) + state
    (cols,) in dtype (transpose) or q int8 (rows, cols) + float32 col_stats (cols,)."""
    rows, cols = x.shape
    bf16 = dtype == "bfloat16"
    if cols == 0:
        return
    colmax = col_stats if col_stats is not None else cuda.device_array(cols, np.float32, stream=stream)
    col_absmax_kernel[_grid(cols, threads), threads, stream](x, bf16, np.float32(threshold), colmax)
    if rows == 0:
        if state is not None:
            state.copy_to_device(np.zeros(cols, state.dtype), stream=stream)
        return
    quant_cols_kernel[_grid(rows * cols, threads), threads, stream](
        x, bf16, colmax, np.float32(threshold), q, transpose,
        state if state is not None else _dummy(), bf16, state is not None)


def dequant_rows(q, stats, out, *, stats_dtype, out_dtype, stream=0, threads: int = THREADS):
    """out (rows, cols) of ``out_dtype`` = f32(q) * stats[row] * f32(1/127); q int8 (rows,
    cols), stats (rows,) of ``stats_dtype``."""
    rows, cols = q.shape
    if rows * cols:
        dequant_rows_kernel[_grid(rows * cols, threads), threads, stream](
            q, stats, stats_dtype == "bfloat16", out, out_dtype == "bfloat16")


def mm_dequant(C, r, c, out, *, out_dtype, bias=None, bias_dtype=None, stream=0,
               threads: int = THREADS):
    """out (rows, cols) of ``out_dtype`` = ((f32(C) * r[row]) * c[col]) * f32(1/127^2)
    (+ bias[col]); C int32 (rows, cols), r float32 (rows,), c float32 (cols,), bias (cols,)
    of ``bias_dtype`` or None."""
    rows, cols = C.shape
    if rows * cols:
        has_bias = bias is not None
        mm_dequant_kernel[_grid(rows * cols, threads), threads, stream](
            C, r, c, bias if has_bias else cuda.device_array(1, np.float32), has_bias,
            bias_dtype == "bfloat16", out, out_dtype == "bfloat16")
