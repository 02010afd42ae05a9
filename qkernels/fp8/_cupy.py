"""CuPy launchers for fp8.cu (the native float8 quantizers).

Two entry levels, as in qkernels.int8._cupy:
- array level (``quantize_rows``, ``quantize_global``, ``quantize_columns_transpose``): CuPy
  arrays on the caller's device, inside the caller's ``Call.cupy_context()``; bfloat16 arrives
  as uint16 bits with the logical dtype beside it; codes are uint8. Used by qkernels.fp8.
- torch hot paths (``*_torch``): torch CUDA tensors in, torch float8 tensors and float32
  scales out (``torch.empty``), launched with raw pointers on ``torch.cuda.current_stream()``;
  no DLPack conversion, no host synchronization. The native FP8 layers call these per step.
Every launch builds its arguments from one typed list (pointers uint64, sizes int32/int64):
CuPy checks nothing, and a wrong width shifts every later argument.
The kernels convert with ``cvt.rn.satfinite.{e4m3,e5m2}x2.f32``: compute capability >= 8.9.
"""
from __future__ import annotations

import functools

import numpy as np

from .._cuda import DTYPE_CODES as _DT, aligned16, current_device, get_kernel, multiprocessor_count, ptr
from .._interop import on_stream, torch_stream

_ES = {"float32": 4, "float16": 2, "bfloat16": 2}
_E5M2 = {"e4m3": "false", "e5m2": "true"}
_TILE = 64


def _kernel(name: str):
    _check_arch(_device())
    return get_kernel(__package__, "fp8.cu", name)


@functools.lru_cache(maxsize=None)
def _check_arch(device: int) -> None:
    import cupy
    cc = cupy.cuda.Device(device).compute_capability  # e.g. "90"
    if int(cc) < 89:
        raise RuntimeError(f"qkernels.fp8's CUDA kernels need a GPU of compute capability >= 8.9 "
                           f"(float8 conversions); device {device} has {cc[:-1]}.{cc[-1]}. "
                           f"Use the numpy backend (qkernels.use_backend('numpy')).")


_ptr, _aligned, _device = ptr, aligned16, current_device
_u64 = np.uint64  # pointers travel as unsigned 64-bit kernel arguments


# --- pointer-level launchers (sizes validated by the caller) --------------------------------

def launch_rows(x: int, dtype: str, fmt: str, q: int, scale: int, rows: int, cols: int):
    """q u8 (rows, cols), scale f32 (rows,) of x (rows, cols) row-major."""
    if rows == 0 or cols == 0:
        return
    es = _ES[dtype]
    vec = 16 // es
    nv = 2 if es == 2 else 4            # 16 elements per thread held in registers
    need = -(-cols // vec)              # 16-byte vectors per row
    threads = min(1024, max(32, -(-(-(-need // nv)) // 32) * 32))
    vec_ok = int(_aligned(x, q) and (cols * es) % 16 == 0)
    k = _kernel(f"fp8_quantize_rows<{_DT[dtype]}, {_E5M2[fmt]}, {nv}>")
    # one wave of CTAs (<= 64 registers a thread), each walking rows with the next in flight
    grid = min(rows, min(32, max(1, 1024 // threads)) * multiprocessor_count(_device()))
    k((grid,), (threads,), (_u64(x), _u64(q), _u64(scale), np.int32(rows),
                                          np.int32(cols), np.int32(vec_ok)))


def launch_absmax_global(x: int, dtype: str, n: int, out_u32: int):
    """NaN-propagating max |x| of n elements into out_u32 (zeroed by the caller), float bits."""
    if n == 0:
        return
    vec = 16 // _ES[dtype]
    grid = max(1, min(-(-n // (vec * 256)), 8 * multiprocessor_count(_device())))
    k = _kernel(f"fp8_absmax_global<{_DT[dtype]}>")
    k((grid,), (256,), (_u64(x), np.int64(n), _u64(out_u32), np.int32(_aligned(x))))


def launch_quant_global(x: int, dtype: str, fmt: str, absmax_u32: int, q: int, scale: int, n: int):
    if n == 0:
        return
    vec = 16 // _ES[dtype]
    grid = max(1, min(-(-n // (vec * 256)), 8 * multiprocessor_count(_device())))
    k = _kernel(f"fp8_quantize_global<{_DT[dtype]}, {_E5M2[fmt]}>")
    k((grid,), (256,), (_u64(x), _u64(absmax_u32), _u64(q), _u64(scale), np.int64(n),
                        np.int32(_aligned(x, q))))


def launch_col_absmax(x: int, dtype: str, rows: int, cols: int, out_u32: int):
    """Per-column NaN-propagating max |x| of x (rows, cols) into out_u32 (cols,), zeroed."""
    if rows == 0 or cols == 0:
        return
    es = _ES[dtype]
    vec = 16 // es
    gx = -(-cols // (32 * vec))
    want_y = max(1, (8 * multiprocessor_count(_device())) // gx)  # ~8 CTAs per SM
    rpc = max(8, -(-(-(-rows // want_y)) // 8) * 8)
    gy = -(-rows // rpc)
    vec_ok = int(_aligned(x) and (cols * es) % 16 == 0)
    k = _kernel(f"fp8_col_absmax<{_DT[dtype]}>")
    k((gx, gy), (32, 8), (_u64(x), np.int32(rows), np.int32(cols), np.int32(rpc), _u64(out_u32),
                          np.int32(vec_ok)))


def launch_quant_transpose(x: int, absmax_u32: int, qT: int, scale: int, N: int, K: int, *,
                           dtype: str, fmt: str, per_col: bool):
    """qT u8 (K, N) = ``fmt`` codes of x^T for x (N, K) of ``dtype``; scale f32 (K,) per
    column of x (per_col, absmax_u32 (K,)) or (1,) (absmax_u32 (1,))."""
    if N == 0 or K == 0:
        return
    es = _ES[dtype]
    vec_in = int(_aligned(x) and (K * es) % 16 == 0)
    vec_out = int(_aligned(qT) and N % 16 == 0)
    k = _kernel(f"fp8_quantize_transpose<{_DT[dtype]}, {_E5M2[fmt]}, {'true' if per_col else 'false'}>")
    k((-(-K // _TILE), -(-N // _TILE)), (256,),
      (_u64(x), _u64(absmax_u32), _u64(qT), _u64(scale), np.int32(N), np.int32(K),
       np.int32(vec_in), np.int32(vec_out)))


def launch_absmax_rows_cols(x: int, dtype: str, M: int, N: int, row_u32: int, col_u32: int,
                            colsum: int, parts: int):
    """Row and column absmax of x (M, N) into row_u32 (M,) and col_u32 (N,) (zeroed by the
    caller), and the column sums of ``parts`` slabs of rows into colsum f32 (parts, N) unless
    colsum is 0; parts must be ``rows_cols_parts(dtype, M, N)``."""
    gx, rpc = _rows_cols_plan(dtype, M, N)
    vec_ok = int(_aligned(x) and (N * _ES[dtype]) % 16 == 0)
    k = _kernel(f"fp8_absmax_rows_cols<{_DT[dtype]}>")
    k((gx, parts), (256,), (_u64(x), np.int32(M), np.int32(N), np.int32(rpc), _u64(row_u32),
                            _u64(col_u32), _u64(colsum), np.int32(vec_ok)))


def launch_quant_rows_cols(x: int, M: int, N: int, *, dtype: str, row_fmt: str, col_fmt: str,
                           row_u32: int, col_u32: int, q: int, qT: int, srow: int, scol: int,
                           colsum: int = 0, parts: int = 0, dbias: int = 0):
    """q u8 (M, N) row-wise ``row_fmt`` codes of x (M, N) of ``dtype``, qT u8 (N, M) row-wise
    ``col_fmt`` codes of x^T, their scales srow f32 (M,) and scol f32 (N,) from
    launch_absmax_rows_cols' maxima (row_u32 (M,), col_u32 (N,)); with parts > 0, dbias (N,)
    in x's dtype = the sum of colsum's parts rows (colsum f32 (parts, N))."""
    if bool(dbias) != (parts > 0) or (parts > 0 and not colsum):
        raise ValueError("launch_quant_rows_cols: dbias needs parts > 0 and colsum, and parts > 0 needs dbias")
    es = _ES[dtype]
    vec_in = int(_aligned(x) and (N * es) % 16 == 0)
    vec_row = int(_aligned(q) and N % (16 // es) == 0)
    vec_t = int(_aligned(qT) and M % 16 == 0)
    fmts = {"e4m3": 0, "e5m2": 1}
    k = _kernel(f"fp8_quantize_rows_cols<{_DT[dtype]}, {fmts[row_fmt]}, {fmts[col_fmt]}>")
    k((-(-N // _RQ_TILE), -(-M // _RQ_TILE)), (256,),
      (_u64(x), _u64(row_u32), _u64(col_u32), _u64(q), _u64(qT), _u64(srow), _u64(scol),
       _u64(colsum), np.int32(parts), _u64(dbias), np.int32(M), np.int32(N), np.int32(vec_in),
       np.int32(vec_row), np.int32(vec_t)))


_RQ_TILE = 128


def _rows_cols_plan(dtype: str, M: int, N: int) -> tuple[int, int]:
    """(column strips, rows per CTA) of fp8_absmax_rows_cols: strips of 64 16-byte vectors,
    slabs of a multiple of 32 rows sized for about four CTAs per SM."""
    strips = -(-N // (64 * (16 // _ES[dtype])))
    want = max(1, (4 * multiprocessor_count(_device())) // strips)
    rpc = max(32, -(-M // want))
    return strips, -(-rpc // 32) * 32


def rows_cols_parts(dtype: str, M: int, N: int) -> int:
    """The number of column-sum slabs (colsum's rows) of fp8_absmax_rows_cols for x (M, N)."""
    return -(-M // _rows_cols_plan(dtype, M, N)[1])


# --- array level (qkernels.fp8's backend tables) ---------------------------------------------

def _zeros_u32(n: int):
    import cupy
    return cupy.zeros(max(n, 1), cupy.uint32)


def quantize_rows(x, dtype, fmt, q, scale):
    """x (rows, cols) contiguous -> q u8 (rows, cols), scale f32 (rows,)."""
    rows, cols = x.shape
    if cols == 0:
        scale.fill(1)
        return
    launch_rows(_ptr(x), dtype, fmt, _ptr(q), _ptr(scale), rows, cols)


def quantize_global(x, dtype, fmt, q, scale, transpose):
    """x (N, K) contiguous -> q u8 (N, K), or q^T (K, N) with ``transpose``; scale f32 (1,)."""
    N, K = x.shape
    ws = _zeros_u32(1)
    launch_absmax_global(_ptr(x), dtype, N * K, _ptr(ws))
    if N * K == 0:
        scale.fill(1)
    elif transpose:
        launch_quant_transpose(_ptr(x), _ptr(ws), _ptr(q), _ptr(scale), N, K, dtype=dtype, fmt=fmt,
                               per_col=False)
    else:
        launch_quant_global(_ptr(x), dtype, fmt, _ptr(ws), _ptr(q), _ptr(scale), N * K)


def quantize_columns_transpose(x, dtype, fmt, q, scale):
    """x (N, K) contiguous -> q^T u8 (K, N) = row-wise codes of x^T, scale f32 (K,)."""
    N, K = x.shape
    if N == 0:
        scale.fill(1)
        return
    ws = _zeros_u32(K)
    launch_col_absmax(_ptr(x), dtype, N, K, _ptr(ws))
    launch_quant_transpose(_ptr(x), _ptr(ws), _ptr(q), _ptr(scale), N, K, dtype=dtype, fmt=fmt,
                           per_col=True)


# --- torch hot paths: raw pointers, torch's current stream, torch allocations ----------------

def _tname(t) -> str:
    return str(t.dtype).replace("torch.", "")


def _fmt(fp8_dtype) -> str:
    import torch
    return "e5m2" if fp8_dtype == torch.float8_e5m2 else "e4m3"


def _context(t):
    """Selects t's device and torch's current stream on it for the CuPy launches."""
    return on_stream(*torch_stream(t))


def quantize_rowwise_torch(x, fp8_dtype):
    """(q (M, K) fp8_dtype, scale (M, 1) float32) for a contiguous 2-D CUDA tensor x (M, K)
    of float16 / bfloat16 / float32. The caller has validated."""
    import torch
    M, K = x.shape
    q = torch.empty((M, K), dtype=fp8_dtype, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if K == 0:
        return q, scale.fill_(1)
    with _context(x):
        launch_rows(x.data_ptr(), _tname(x), _fmt(fp8_dtype), q.data_ptr(), scale.data_ptr(), M, K)
    return q, scale


def quantize_columnwise_transpose_torch(w, fp8_dtype):
    """Row-wise quantization of w^T for a contiguous 2-D CUDA tensor w (N, K), in two passes
    over w (column absmax, then a tiled transpose): (q (K, N) fp8_dtype, scale (K, 1))."""
    import torch
    N, K = w.shape
    q = torch.empty((K, N), dtype=fp8_dtype, device=w.device)
    scale = torch.empty((K, 1), dtype=torch.float32, device=w.device)
    if N == 0:
        return q, scale.fill_(1)
    ws = torch.zeros((max(K, 1),), dtype=torch.int32, device=w.device)
    with _context(w):
        launch_col_absmax(w.data_ptr(), _tname(w), N, K, ws.data_ptr())
        launch_quant_transpose(w.data_ptr(), ws.data_ptr(), q.data_ptr(), scale.data_ptr(), N, K,
                               dtype=_tname(w), fmt=_fmt(fp8_dtype), per_col=True)
    return q, scale


def quantize_global_torch(w, fp8_dtype, transpose: bool = False):
    """Tensor-wise quantization of a contiguous 2-D CUDA tensor w (N, K): (q (N, K), or q^T
    (K, N) with ``transpose``, fp8_dtype; scale (1, 1) float32)."""
    import torch
    N, K = w.shape
    q = torch.empty((K, N) if transpose else (N, K), dtype=fp8_dtype, device=w.device)
    scale = torch.empty((1, 1), dtype=torch.float32, device=w.device)
    if N * K == 0:
        return q, scale.fill_(1)
    ws = torch.zeros((1,), dtype=torch.int32, device=w.device)
    fmt = _fmt(fp8_dtype)
    with _context(w):
        launch_absmax_global(w.data_ptr(), _tname(w), N * K, ws.data_ptr())
        if transpose:
            launch_quant_transpose(w.data_ptr(), ws.data_ptr(), q.data_ptr(), scale.data_ptr(), N, K,
                                   dtype=_tname(w), fmt=fmt, per_col=False)
        else:
            launch_quant_global(w.data_ptr(), _tname(w), fmt, ws.data_ptr(), q.data_ptr(),
                                scale.data_ptr(), N * K)
    return q, scale


def qdq_global_torch(x, code, mid):
    """Global quantize-dequantize (qdq.cu) of a contiguous CUDA tensor x (any shape, float16 /
    bfloat16 / float32, nonempty) with the float32 CUDA tables code (256,) and mid (255,) on
    x's device: a new tensor of x's shape and dtype. Two launches on torch's current stream
    (absmax, then the lookup), no host synchronization; any compute capability."""
    import torch
    from ..int8._cupy import launch_absmax_global as absmax_global
    _check_qdq_args(x, code, mid, "qdq_global_torch")
    n = x.numel()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    ws = torch.zeros((1,), dtype=torch.int32, device=x.device)
    dtype = _tname(x)
    with _context(x):
        absmax_global(x.data_ptr(), dtype, n, ws.data_ptr())
        k = get_kernel(__package__, "qdq.cu", f"qdq_global<{_DT[dtype]}>")
        grid = max(1, min(-(-n // 1024), 16 * multiprocessor_count(x.device.index)))
        k((grid,), (256,), (_u64(x.data_ptr()), np.int64(n), _u64(ws.data_ptr()),
                            _u64(code.data_ptr()), _u64(mid.data_ptr()), _u64(y.data_ptr())))
    return y


QDQ_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


def qdq_blockwise_torch(x, code, mid, blocksize: int):
    """Blockwise quantize-dequantize (qdq.cu) of a contiguous CUDA tensor x (any shape,
    float16 / bfloat16 / float32, nonempty), blocks of ``blocksize`` (QDQ_BLOCKSIZES)
    consecutive elements, with the float32 CUDA tables code (256,) and mid (255,) on x's
    device: a new tensor of x's shape and dtype, as quantize_blockwise then
    dequantize_blockwise would give. One launch on torch's current stream."""
    import torch
    _check_qdq_args(x, code, mid, "qdq_blockwise_torch")
    if blocksize not in QDQ_BLOCKSIZES:
        raise ValueError(f"qdq_blockwise_torch: blocksize must be one of {QDQ_BLOCKSIZES}; got {blocksize}")
    n = x.numel()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    ept = 4 if blocksize <= 1024 else blocksize // 256  # threads a block: blocksize / ept <= 256
    per_cta = 256 // (blocksize // ept)
    grid = -(-(-(-n // blocksize)) // per_cta)
    dtype = _tname(x)
    with _context(x):
        k = get_kernel(__package__, "qdq.cu", f"qdq_blockwise<{_DT[dtype]}, {ept}>")
        k((grid,), (256,), (_u64(x.data_ptr()), np.int64(n), np.int32(blocksize),
                            _u64(code.data_ptr()), _u64(mid.data_ptr()), _u64(y.data_ptr())))
    return y


def _check_qdq_args(x, code, mid, name: str) -> None:
    import torch
    for t, size, what in ((code, 256, "code"), (mid, 255, "mid")):
        if t.dtype != torch.float32 or t.numel() != size or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"{name}: {what} must be a contiguous float32 ({size},) tensor on "
                             f"{x.device}; got {t.dtype} {tuple(t.shape)} on {t.device}")
    if x.numel() == 0 or not x.is_contiguous() or _tname(x) not in _DT:
        raise ValueError(f"{name}: x must be a nonempty contiguous float16/bfloat16/float32 "
                         f"tensor; got {x.dtype} {tuple(x.shape)}")


def quantize_rows_cols_torch(x, row_fp8, col_fp8, with_colsum: bool):
    """Row-wise float8 codes of x and of x^T, and x's column sums, in two reads of x: for a
    contiguous 2-D CUDA tensor x (M, N) of float16 / bfloat16 / float32 (M, N > 0; the caller
    has validated), returns (q (M, N) row_fp8, scale (M, 1), qT (N, M) col_fp8, scale (N, 1),
    colsum (N,) in x's dtype or None). The codes and scales are those of quantize_rowwise_torch
    of x and of x.t(); colsum sums float32 slabs of rows in a fixed order (the same bits every
    run; not the order of torch's x.sum(0)). The backward of the native FP8 layers: G's codes
    for dX, G^T's for dW, and dbias."""
    import torch
    M, N = x.shape
    dev = x.device
    q = torch.empty((M, N), dtype=row_fp8, device=dev)
    qT = torch.empty((N, M), dtype=col_fp8, device=dev)
    srow = torch.empty((M, 1), dtype=torch.float32, device=dev)
    scol = torch.empty((N, 1), dtype=torch.float32, device=dev)
    amax = torch.zeros((M + N,), dtype=torch.int32, device=dev)
    dtype = _tname(x)
    parts = rows_cols_parts(dtype, M, N)
    colsum = dbias = None
    if with_colsum:
        colsum = torch.empty((parts, N), dtype=torch.float32, device=dev)
        dbias = torch.empty((N,), dtype=x.dtype, device=dev)
    rows_u32 = amax.data_ptr()
    cols_u32 = rows_u32 + 4 * M
    sums = 0 if colsum is None else colsum.data_ptr()
    with _context(x):
        launch_absmax_rows_cols(x.data_ptr(), dtype, M, N, rows_u32, cols_u32, sums, parts)
        launch_quant_rows_cols(x.data_ptr(), M, N, dtype=dtype, row_fmt=_fmt(row_fp8),
                               col_fmt=_fmt(col_fp8), row_u32=rows_u32, col_u32=cols_u32,
                               q=q.data_ptr(), qT=qT.data_ptr(), srow=srow.data_ptr(),
                               scol=scol.data_ptr(), colsum=sums, parts=parts if with_colsum else 0,
                               dbias=0 if dbias is None else dbias.data_ptr())
    return q, srow, qT, scol, dbias
