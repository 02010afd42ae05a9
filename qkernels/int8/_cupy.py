"""CuPy launchers for int8.cu (quantizers, dequantizers, the fused-epilogue int8 GEMM).

Two entry levels:
- array level (``quantize_rows``, ``quantize_global``, ..., ``gemm``): CuPy arrays already
  on the caller's device, inside the caller's ``Call.cupy_context()`` (device and stream);
  bfloat16 arrives as uint16 bits, the logical dtype beside it. Used by qkernels.int8.
- torch hot paths (``*_torch``): torch CUDA tensors in and out, launched with raw pointers
  (``t.data_ptr()``) on ``torch.cuda.current_stream()``, outputs from ``torch.empty``; no
  DLPack conversion and no host synchronization. The layers call these per step.
Every launch goes through one typed argument list per kernel (pointers as uint64, sizes as
int32/int64, floats as float32): CuPy checks nothing, a wrong width shifts every argument.

Which product kernel runs is decided in one place, ``kernel_choice`` (cached per device,
shape and dtype); the launchers' ``kernel=`` keyword forces one by name (tests, benchmarks).
"""
from __future__ import annotations

import functools

import numpy as np

from .._cuda import DTYPE_CODES, get_kernel, multiprocessor_count
from .._cuda import aligned16 as _aligned, current_device as _device, ptr as _ptr
from .._interop import on_stream as _on_stream, torch_stream as _stream_of
from ._choice import _ES, _SM90_TILES, GEMM_KERNELS, GEMV_KERNELS, GEMV_MAX_ROWS, kernel_choice  # noqa: F401

_DT = {**DTYPE_CODES, "int32": 3}  # ODT 3 in int8.cu and gemm_sm90.cu: the raw int32 product
_u64 = np.uint64  # pointers travel as unsigned 64-bit kernel arguments
_GEMM_THREADS = 256
_GEMM_TILE = 128
_GEMM_SMEM = 4 * 2 * 128 * 64       # G_STAGES * 2 operands * 128 rows * 64 bytes
_QT_TN = 128                        # quant_transpose tile: 128 rows x 256 bytes of x
# Two-pass quantizers: the part of x (a fraction of the L2 size) that the absmax pass reads
# last with normal loads, so that the reverse second pass finds it in L2.
_L2_KEEP = 0.6


def _b(v: bool) -> str:
    return "true" if v else "false"


def _kernel(name: str):
    return get_kernel(__package__, "int8.cu", name)


@functools.lru_cache(maxsize=None)
def _gemm_kernel(device: int, name: str):
    k = _kernel(name)
    k.max_dynamic_shared_size_bytes = _GEMM_SMEM
    return k


@functools.lru_cache(maxsize=None)
def _sm90_kernel(device: int, name: str, smem: int):
    k = get_kernel(__package__, "gemm_sm90.cu", name, options=("-arch=sm_90a",))
    k.max_dynamic_shared_size_bytes = smem
    return k


def _launch_gemm_sm90(device: int, a: int, bt: int, M: int, N: int, K: int, out: int, *,
                      odt: int, rdt: int, cdt: int, bdt: int, c_global: bool, r: int, c: int,
                      bias: int, vec_out: int, outliers=None, kernel: str = "sm90"):
    """The Hopper wgmma GEMM (gemm_sm90.cu) on ``device``: out (M, N) = epilogue(a (M, K)
    int8 @ bt (N, K) int8 ^T), pointers a, bt, out. odt / rdt / cdt / bdt: the dtype codes
    (``_DT``; bdt -1: no bias, odt 3: the raw int32 product) of out, the row scales r (M,),
    the column scales c ((N,), or (1,) with ``c_global``) and the bias (N,) (pointers, 0 when
    unused); vec_out: 1 when out may be stored two values at a time. ``outliers``: None, or
    (x, idx, count) pointers for the OUTL epilogue; ``kernel``: one of the sm90 names of
    GEMM_KERNELS (its tile)."""
    bn, bk, stages = _SM90_TILES[kernel]
    name = (f"int8_gemm_sm90<{odt}, {rdt}, {cdt}, {bdt}, {_b(c_global)}, {bn}, {bk}, {stages}, "
            f"{_b(outliers is not None)}>")
    smem = stages * (128 + bn) * bk + 1024  # + 1 KB to align the swizzle atoms
    if outliers is not None:
        smem += bn * 48  # the staged weight values of the outlier columns (WO_STRIDE halves per row)
    k = _sm90_kernel(device, name, smem)
    tiles = -(-M // 128) * -(-N // bn)
    grid = min(tiles, multiprocessor_count(device) * (2 if bn == 128 else 1))
    x, idx, count = outliers or (0, 0, 0)
    k((grid,), (256,), (_u64(a), _u64(bt), np.int32(M), np.int32(N), np.int32(K), _u64(r), _u64(c),
                        _u64(bias), _u64(out), np.int32(vec_out), _u64(x), _u64(idx), _u64(count)),
      shared_mem=smem)


@functools.lru_cache(maxsize=None)
def _l2_bytes(device: int) -> int:
    import cupy
    return int(cupy.cuda.runtime.getDeviceProperties(device)["l2CacheSize"])


def _keep_bytes() -> int:
    """Bytes of x the absmax pass leaves in L2 for the reverse quantizing pass."""
    return int(_L2_KEEP * _l2_bytes(_device()))


# --- pointer-level launchers (all sizes validated by the caller) ---------------------------

def launch_row_quant(x: int, q: int, stats: int, rows: int, cols: int, *, dtype: str,
                     stats_dtype: str, threshold: float = 0.0, flags: int = 0):
    """Row-wise int8 codes of x (rows, cols) of ``dtype`` into q int8 (rows, cols) and the
    row absmax into stats (rows,) of ``stats_dtype``; with threshold > 0 the outliers code 0,
    are left out of the statistics and set their column's byte of flags uint8 (cols,)
    (zeroed by the caller)."""
    if threshold > 0 and not flags:
        raise ValueError("launch_row_quant: threshold > 0 needs flags, a zeroed uint8 (cols,) buffer")
    if rows == 0 or cols == 0:
        return
    es = _ES[dtype]
    vec = 16 // es
    nv = 2 if es == 2 else 4
    need = -(-cols // vec)
    threads = min(1024, max(32, -(-(-(-need // nv)) // 32) * 32))
    vec_ok = int(_aligned(x, q) and (cols * es) % 16 == 0)
    thresh = threshold > 0
    k = _kernel(f"row_quant<{_DT[dtype]}, {_DT[stats_dtype]}, {nv}, {_b(thresh)}>")
    # One wave of CTAs (<= 64 registers a thread: 1024 // threads CTAs per SM), each walking
    # rows with the next row's loads in flight; THRESH: each CTA then sets an outlier
    # column's flag once, not once per row.
    per_sm = min(32, max(1, 1024 // threads))
    grid = min(rows, per_sm * multiprocessor_count(_device()), 1 << 30)
    k((grid,), (threads,), (_u64(x), _u64(q), _u64(stats), _u64(flags), np.int32(rows),
                            np.int32(cols), np.float32(threshold), np.int32(vec_ok)))


def launch_absmax_global(x: int, dtype: str, n: int, out_u32: int, keep_bytes: int = 0):
    """NaN-propagating absmax of n elements into out_u32 (zeroed by the caller) as float bits.
    The last ``keep_bytes`` of x are read last with normal loads (the rest evict-first), for a
    following pass that reads x in reverse."""
    if n == 0:
        return
    vec = 16 // _ES[dtype]
    # 8 CTAs per SM fit (__launch_bounds__(256, 8)): one wave, every CTA resident
    grid = max(1, min(-(-n // (vec * 256)), 8 * multiprocessor_count(_device())))
    keep_vec = max(0, n // vec - keep_bytes // 16)
    k = _kernel(f"absmax_global<{_DT[dtype]}>")
    k((grid,), (256,), (_u64(x), np.int64(n), _u64(out_u32), np.int32(_aligned(x)),
                        np.int64(keep_vec)))


def launch_col_absmax(x: int, dtype: str, rows: int, cols: int, threshold: float, out_u32: int,
                      keep_bytes: int = 0):
    """Per-column NaN-propagating absmax (outliers left out when threshold > 0) into out_u32
    (cols,), zeroed by the caller. The last rows, about ``keep_bytes`` of x, are read last
    with normal loads (the rest evict-first), for a following pass that reads x in reverse."""
    if rows == 0 or cols == 0:
        return
    es = _ES[dtype]
    vec = 16 // es
    gx = -(-cols // (32 * vec))
    # ~6 CTAs per SM are resident (40 registers): one wave of CTAs sweeping the rows together
    gy = max(1, min(-(-rows // 8), (6 * multiprocessor_count(_device())) // gx))
    keep_row = max(0, rows - keep_bytes // (cols * es))
    vec_ok = int(_aligned(x) and (cols * es) % 16 == 0)
    k = _kernel(f"col_absmax<{_DT[dtype]}, {_b(threshold > 0)}>")
    k((gx, gy), (32, 8), (_u64(x), np.int32(rows), np.int32(cols), np.float32(threshold),
                          np.int32(keep_row), _u64(out_u32), np.int32(vec_ok)))


def launch_quant_global(x: int, dtype: str, absmax_u32: int, q: int, state: int, n: int):
    if n == 0:
        return
    vec = 16 // _ES[dtype]
    grid = max(1, min(-(-n // (vec * 256)), 8 * multiprocessor_count(_device())))  # one wave
    k = _kernel(f"quant_global<{_DT[dtype]}, {_DT[dtype]}>")
    k((grid,), (256,), (_u64(x), _u64(absmax_u32), _u64(q), _u64(state), np.int64(n),
                        np.int32(_aligned(x, q))))


def launch_quant_transpose(x: int, absmax_u32: int, qT: int, state: int, N: int, K: int, *,
                           dtype: str, per_col: bool):
    """qT int8 (K, N) = the codes of x (N, K) of ``dtype``, transposed, with the absmax bits
    in absmax_u32: (K,) per column of x (``per_col``) or (1,); state (K,) or (1,) of
    ``dtype`` <- that absmax."""
    if N == 0 or K == 0:
        return
    es = _ES[dtype]
    vec_in = int(_aligned(x) and (K * es) % 16 == 0)
    vec_out = int(_aligned(qT) and N % 16 == 0)
    tk = 16 * (16 // es)  # tile columns: 256 bytes of a row of x
    tiles = -(-K // tk) * -(-N // _QT_TN)
    k = _kernel(f"quant_transpose<{_DT[dtype]}, {_DT[dtype]}, {_b(per_col)}>")
    k((tiles,), (256,), (_u64(x), _u64(absmax_u32), _u64(qT), _u64(state), np.int32(N), np.int32(K),
                         np.int32(vec_in), np.int32(vec_out)))


def launch_quant_cols(x: int, dtype: str, colmax_u32: int, threshold: float, q: int, rows: int, cols: int):
    n = rows * cols
    if n == 0:
        return
    grid = max(1, min(-(-n // 256), 16 * multiprocessor_count(_device())))
    k = _kernel(f"quant_cols<{_DT[dtype]}, {_b(threshold > 0)}>")
    k((grid,), (256,), (_u64(x), _u64(colmax_u32), np.float32(threshold), _u64(q),
                        np.int32(rows), np.int32(cols)))


def launch_outlier_cols(flags: int, cols: int, q: int, rows: int, idx: int, count: int):
    """After row_quant with a threshold: idx int64 (cols,) <- the ascending outlier columns
    (count int32 (1,) <- how many), and those columns of q (rows, cols) zeroed. ``count`` must
    hold 0 beforehand: nothing is launched when rows or cols is 0."""
    if rows == 0 or cols == 0:
        return
    grid = min(rows, 2 * multiprocessor_count(_device()))
    _kernel("outlier_cols")((grid,), (256,), (_u64(flags), np.int32(cols), _u64(q), np.int32(rows),
                                              _u64(idx), _u64(count)))


def launch_zero_cols(q: int, rows: int, cols: int, idx: int, nidx: int):
    n = rows * nidx
    if n == 0:
        return
    grid = max(1, min(-(-n // 256), 8 * multiprocessor_count(_device())))
    _kernel("zero_cols")((grid,), (256,), (_u64(q), np.int32(rows), np.int32(cols), _u64(idx),
                                           np.int32(nidx)))


def launch_dequant_rows(q: int, stats: int, stats_dtype: str, out: int, out_dtype: str, rows: int, cols: int):
    n = rows * cols
    if n == 0:
        return
    vec_ok = int(_aligned(q, out) and cols % 16 == 0)
    grid = max(1, min(-(-n // (16 * 256)), 8 * multiprocessor_count(_device())))
    k = _kernel(f"dequant_rows<{_DT[stats_dtype]}, {_DT[out_dtype]}>")
    k((grid,), (256,), (_u64(q), _u64(stats), _u64(out), np.int32(rows), np.int32(cols), np.int32(vec_ok)))


def _check_bias(bias: int, bias_dtype) -> None:
    """A bias pointer and its dtype come together (the kernel's type is the dtype's; a pointer
    without one would be ignored, a dtype without one read through a null pointer)."""
    if bool(bias) != (bias_dtype is not None):
        raise ValueError(f"bias and bias_dtype go together; got bias={'a pointer' if bias else 0} and "
                         f"bias_dtype={bias_dtype!r}")


def launch_mm_dequant(C: int, r: int, c: int, out: int, rows: int, cols: int, *, out_dtype: str,
                      bias: int = 0, bias_dtype: str | None = None):
    """out (rows, cols) of ``out_dtype`` = ((f32(C) * r[row]) * c[col]) * f32(1/127^2)
    (+ bias[col]); C int32 (rows, cols), r and c float32, bias (cols,) of ``bias_dtype``
    (or 0 / None: no bias)."""
    _check_bias(bias, bias_dtype)
    n = rows * cols
    if n == 0:
        return
    bdt = -1 if bias_dtype is None else _DT[bias_dtype]
    grid = max(1, min(-(-n // 256), 16 * multiprocessor_count(_device())))
    k = _kernel(f"mm_dequant<{_DT[out_dtype]}, {bdt}>")
    k((grid,), (256,), (_u64(C), _u64(r), _u64(c), _u64(bias), _u64(out), np.int32(rows), np.int32(cols)))


def launch_gemm(a: int, bt: int, M: int, N: int, K: int, out: int, *, out_dtype: str,
                r: int = 0, r_dtype: str = "float32", c: int = 0, c_dtype: str = "float32",
                c_global: bool = False, bias: int = 0, bias_dtype: str | None = None,
                kernel: str | None = None):
    """out (M, N) = epilogue(a (M, K) int8 @ bt (N, K) int8 ^T); both operands row-major, lda =
    ldb = K. out_dtype "int32" writes the raw product (r, c, bias unused); otherwise the
    epilogue of launch_mm_dequant with row scales r (M,) of r_dtype, column scales c of
    c_dtype ((N,), or (1,) with c_global) and bias (N,) of bias_dtype (0 / None: none).
    ``kernel``: None, or a name from GEMM_KERNELS to force (see kernel_choice)."""
    if out_dtype != "int32":
        _check_bias(bias, bias_dtype)
    if M == 0 or N == 0:
        return
    aligned = _aligned(a, bt) and K % 16 == 0
    vec_out = int(out % 8 == 0 and N % 2 == 0)
    device = _device()
    kernel = kernel_choice("gemm", device, M, N, K, "int8", aligned, kernel)
    if kernel != "mma_sync":
        if out_dtype == "int32":
            odt, rdt, cdt, bdt, c_global = 3, 0, 0, -1, False
        else:
            odt, rdt, cdt = _DT[out_dtype], _DT[r_dtype], _DT[c_dtype]
            bdt = -1 if bias_dtype is None else _DT[bias_dtype]
        _launch_gemm_sm90(device, a, bt, M, N, K, out, odt=odt, rdt=rdt, cdt=cdt, bdt=bdt,
                          c_global=c_global, r=r, c=c, bias=bias, vec_out=vec_out, kernel=kernel)
        return
    if out_dtype == "int32":
        name = f"int8_gemm<3, 0, 0, -1, false, {_b(aligned)}>"
    else:
        bdt = -1 if bias_dtype is None else _DT[bias_dtype]
        name = (f"int8_gemm<{_DT[out_dtype]}, {_DT[r_dtype]}, {_DT[c_dtype]}, {bdt}, "
                f"{_b(c_global)}, {_b(aligned)}>")
    k = _gemm_kernel(device, name)
    tiles = -(-M // _GEMM_TILE) * -(-N // _GEMM_TILE)
    k((tiles,), (_GEMM_THREADS,), (_u64(a), _u64(bt), np.int32(M), np.int32(N), np.int32(K),
                                   _u64(r), _u64(c), _u64(bias), _u64(out), np.int32(vec_out)),
      shared_mem=_GEMM_SMEM)


# --- array level (qkernels.int8's backend table) -------------------------------------------

def _zeros_u32(n: int):
    import cupy
    return cupy.zeros(max(n, 1), cupy.uint32)


def quantize_rows(x, q, stats, *, dtype, stats_dtype, threshold=0.0, flags=None):
    """x (rows, cols) of ``dtype`` -> q int8 (rows, cols), stats (rows,) of stats_dtype; flags
    uint8 (cols,) (zeroed here) marks outlier columns when threshold > 0."""
    rows, cols = x.shape
    if flags is not None:
        flags.fill(0)
    launch_row_quant(_ptr(x), _ptr(q), _ptr(stats), rows, cols, dtype=dtype, stats_dtype=stats_dtype,
                     threshold=threshold, flags=_ptr(flags))


def zero_cols(q, idx):
    """q int8 (rows, cols): the columns idx (int64 (n,)) set to 0."""
    rows, cols = q.shape
    launch_zero_cols(_ptr(q), rows, cols, _ptr(idx), int(idx.size))


def outlier_cols(flags, q, idx) -> int:
    """After quantize_rows with a threshold: idx int64 (cols,) <- the ascending outlier
    columns, those columns of q zeroed; returns how many (one host synchronization)."""
    import cupy
    rows, cols = q.shape
    count = cupy.zeros(1, cupy.int32)
    launch_outlier_cols(_ptr(flags), cols, _ptr(q), rows, _ptr(idx), _ptr(count))
    return int(count.get()[0])


def quantize_global(x, q, state, *, dtype, transpose):
    """x (N, K) of ``dtype`` -> q int8 (N, K) or q^T (K, N) (``transpose``), state (1,) in dtype."""
    N, K = x.shape
    if N * K == 0:
        state.fill(0)
        return
    ws = _zeros_u32(1)
    launch_absmax_global(_ptr(x), dtype, N * K, _ptr(ws), _keep_bytes())
    if transpose:
        launch_quant_transpose(_ptr(x), _ptr(ws), _ptr(q), _ptr(state), N, K, dtype=dtype, per_col=False)
    else:
        launch_quant_global(_ptr(x), dtype, _ptr(ws), _ptr(q), _ptr(state), N * K)


def quantize_columns(x, q, *, dtype, transpose, threshold=0.0, state=None, col_stats=None):
    """Per-column quantization of x (rows, cols) of ``dtype``: q^T (cols, rows) with state
    (cols,) in dtype (transpose=True; quantize_columnwise_and_transpose) or q (rows, cols) with
    float32 col_stats (cols,) (transpose=False; int8_double_quant's CAt)."""
    import cupy
    rows, cols = x.shape
    ws = _zeros_u32(cols)
    # transpose: quant_transpose walks the tiles in reverse, so the tail is kept in L2
    launch_col_absmax(_ptr(x), dtype, rows, cols, threshold, _ptr(ws),
                      _keep_bytes() if transpose else 0)
    if transpose:
        if rows == 0 and cols > 0:
            state.fill(0)
        launch_quant_transpose(_ptr(x), _ptr(ws), _ptr(q), _ptr(state), rows, cols, dtype=dtype,
                               per_col=True)
    else:
        launch_quant_cols(_ptr(x), dtype, _ptr(ws), threshold, _ptr(q), rows, cols)
        if cols:
            col_stats[...] = ws[:cols].view(cupy.float32)


def dequant_rows(q, stats, out, *, stats_dtype, out_dtype):
    """out (rows, cols) of ``out_dtype`` = f32(q) * stats[row] * f32(1/127); q int8 (rows,
    cols), stats (rows,) of ``stats_dtype``."""
    rows, cols = q.shape
    launch_dequant_rows(_ptr(q), _ptr(stats), stats_dtype, _ptr(out), out_dtype, rows, cols)


def mm_dequant(C, r, c, out, *, out_dtype, bias=None, bias_dtype=None):
    """out (M, N) of ``out_dtype`` = the GEMM epilogue of C int32 (M, N) with r float32 (M,),
    c float32 (N,) and bias (N,) of ``bias_dtype`` or None."""
    rows, cols = C.shape
    launch_mm_dequant(_ptr(C), _ptr(r), _ptr(c), _ptr(out), rows, cols, out_dtype=out_dtype,
                      bias=_ptr(bias), bias_dtype=bias_dtype)


def gemm(a, bt, out, *, out_dtype, r=None, r_dtype="float32", c=None, c_dtype="float32",
         c_global=False, bias=None, bias_dtype=None, kernel: str | None = None):
    """out (M, N) = a (M, K) int8 @ bt (N, K) int8 ^T: the raw int32 product (``out_dtype``
    "int32") or its epilogue in out_dtype with r (M,) of r_dtype, c of c_dtype ((N,), or (1,)
    with c_global) and bias (N,) of bias_dtype or None. ``kernel``: None, or a name from
    GEMM_KERNELS to force."""
    M, K = a.shape
    N = bt.shape[0]
    if K == 0 and out_dtype == "int32":
        out.fill(0)
        return
    launch_gemm(_ptr(a), _ptr(bt), M, N, K, _ptr(out), out_dtype=out_dtype, r=_ptr(r), r_dtype=r_dtype,
                c=_ptr(c), c_dtype=c_dtype, c_global=c_global, bias=_ptr(bias), bias_dtype=bias_dtype,
                kernel=kernel)


# --- torch hot paths: raw pointers, torch's current stream, torch allocations --------------

def _tname(t) -> str:
    return str(t.dtype).replace("torch.", "")


def int8_matmul_dequant_torch(a, bt, row_scale, col_scale, bias=None, out_dtype=None, col_global=False,
                              kernel: str | None = None):
    """out (M, N) = ((f32(a @ bt^T) * row_scale) * col_scale) * K (+ bias) for torch CUDA
    tensors: a int8 (M, K) contiguous, bt int8 (N, K) contiguous (the (N, K) weight itself;
    for b = W.t() pass b.t()), row_scale (M,), col_scale (N,) or (1,) with col_global, any
    float dtypes; out_dtype defaults to row_scale's dtype. The caller has validated.
    ``kernel``: None, or a name from GEMM_KERNELS to force (tests, benchmarks)."""
    import torch
    M, K = a.shape
    N = bt.shape[0]
    out_dtype = out_dtype or row_scale.dtype
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    dev, stream = _stream_of(a)
    with _on_stream(dev, stream):
        launch_gemm(a.data_ptr(), bt.data_ptr(), M, N, K, out.data_ptr(), out_dtype=_tname(out),
                    r=row_scale.data_ptr(), r_dtype=_tname(row_scale), c=col_scale.data_ptr(),
                    c_dtype=_tname(col_scale), c_global=col_global, bias=_ptr(bias),
                    bias_dtype=None if bias is None else _tname(bias), kernel=kernel)
    return out


def quantize_rowwise_torch(x, stats_dtype=None, threshold: float = 0.0):
    """(q int8 (M, K), stats (M,)) for a contiguous 2-D torch CUDA tensor; stats in x's dtype
    (SwitchBack) or ``stats_dtype`` (torch.float32 for LLM.int8()). With threshold > 0 also
    returns the uint8 (K,) outlier-column flags (no host sync; the caller compacts them)."""
    import torch
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    stats = torch.empty((M,), dtype=stats_dtype or x.dtype, device=x.device)
    flags = torch.zeros((K,), dtype=torch.uint8, device=x.device) if threshold > 0 else None
    dev, stream = _stream_of(x)
    with _on_stream(dev, stream):
        launch_row_quant(x.data_ptr(), q.data_ptr(), stats.data_ptr(), M, K, dtype=_tname(x),
                         stats_dtype=_tname(stats), threshold=threshold, flags=_ptr(flags))
    return (q, stats) if flags is None else (q, stats, flags)


def int8_outlier_quant_torch(x, threshold: float):
    """LLM.int8() quantization with outliers (threshold > 0) of a contiguous 2-D torch CUDA
    tensor x (rows, cols), without a host synchronization: (q int8 (rows, cols) with the
    outlier columns zeroed, row_stats float32 (rows,), idx int64 (cols,) whose first ``count``
    entries are the outlier columns in ascending order, count int32 (1,) on the device). Two
    kernels (row_quant<THRESH>, outlier_cols) on torch's current stream."""
    import torch
    rows, cols = x.shape
    dev = x.device
    q = torch.empty((rows, cols), dtype=torch.int8, device=dev)
    stats = torch.empty((rows,), dtype=torch.float32, device=dev)
    if cols == 0:
        stats.zero_()  # the absmax of an empty row
    cpad = -(-cols // 16) * 16
    # one zeroed workspace: flags (cols,) | count int32 | idx int64 (cols,)
    ws = torch.zeros((cpad + 16 + 8 * cols,), dtype=torch.uint8, device=dev)
    idx = ws[cpad + 16:].view(torch.int64)
    d, stream = _stream_of(x)
    with _on_stream(d, stream):
        launch_row_quant(x.data_ptr(), q.data_ptr(), stats.data_ptr(), rows, cols, dtype=_tname(x),
                         stats_dtype="float32", threshold=threshold, flags=ws.data_ptr())
        launch_outlier_cols(ws.data_ptr(), cols, q.data_ptr(), rows, idx.data_ptr(),
                            ws.data_ptr() + cpad)
    return q, stats, idx, ws[cpad:cpad + 4].view(torch.int32)


def int8_vectorwise_quant_torch(x, threshold: float):
    """int8_outlier_quant_torch, then one host synchronization to read the count (the size of
    the result, as bitsandbytes' nonzero): (q, row_stats, outlier_cols int64 (n,) ascending,
    a view of a (cols,) buffer)."""
    q, stats, idx, count = int8_outlier_quant_torch(x, threshold)
    return q, stats, idx[:int(count.item())]


def int8_linear_outliers_torch(x, CB, SCB, bias, threshold: float, kernel: str | None = None):
    """The LLM.int8() forward with outlier columns, without a host synchronization:
    ``(int8_mm_dequant(CA @ CB^T, SCA, SCB, bias) + x[:, cols] @ (CB[:, cols] * SCB / 127)^T)``
    rounded once to x's dtype, cols = the outlier columns of x for ``threshold`` (> 0).

    x: float16 / bfloat16 / float32 (M, K) contiguous CUDA tensor; CB int8 (N, K) contiguous,
    SCB float32 (N,), bias (N,) float or None, all on x's device (validated by the caller).
    Returns (out (M, N) in x's dtype, idx int64 (K,), count int32 (1,): idx[:count] = cols),
    or None where this form does not apply (K % 16 != 0, a CB base that is not 16-byte
    aligned, more than 16 rows off compute capability 9.0): the caller takes the
    synchronizing form. Kernels: row_quant<THRESH> and outlier_cols (int8_outlier_quant_torch),
    then for at most 16 rows the GEMV (gemv.cu) and otherwise the Hopper GEMM with the OUTL
    epilogue (gemm_sm90.cu), both reading x at the outlier columns. ``kernel``: None, or
    "gemv_dp4a" / "gemv_mma" (at most 16 rows) or an sm90 name (more) to force
    (kernel_choice's "linear_outliers")."""
    import torch
    from . import _cupy_gemv as gemv
    M, K = x.shape
    N = CB.shape[0]
    if M == 0 or N == 0 or K % 16 or CB.data_ptr() % 16:
        return None
    device = x.device.index
    small = M <= GEMV_MAX_ROWS
    if small and not gemv.gemv_ok(x, CB, SCB, bias):
        return None
    kernel = kernel_choice("linear_outliers", device, M, N, K, _tname(x), True, kernel)
    if kernel is None:
        return None
    q, stats, idx, count = int8_outlier_quant_torch(x, threshold)
    if small:
        out = gemv.int8_linear_gemv_torch(x, CB, SCB, bias, outliers=(q, stats, idx, count), kernel=kernel)
        return out, idx, count
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    vec_out = int(N % 2 == 0)  # torch.empty bases are 16-byte aligned
    bdt = -1 if bias is None else _DT[_tname(bias)]
    d, stream = _stream_of(x)
    with _on_stream(d, stream):
        _launch_gemm_sm90(device, q.data_ptr(), CB.data_ptr(), M, N, K, out.data_ptr(),
                          odt=_DT[_tname(x)], rdt=_DT["float32"], cdt=_DT["float32"], bdt=bdt,
                          c_global=False, r=stats.data_ptr(), c=SCB.data_ptr(), bias=_ptr(bias),
                          vec_out=vec_out, outliers=(x.data_ptr(), idx.data_ptr(), count.data_ptr()),
                          kernel=kernel)
    return out, idx, count


def quantize_global_torch(w, transpose: bool = False):
    """(q int8 (N, K) or q^T (K, N), state (1,) in w's dtype) for a contiguous 2-D tensor."""
    import torch
    N, K = w.shape
    q = torch.empty((K, N) if transpose else (N, K), dtype=torch.int8, device=w.device)
    # the quantizing kernel writes state (for N * K > 0, which the callers ensure)
    state = torch.empty((1,), dtype=w.dtype, device=w.device)
    ws = torch.zeros((1,), dtype=torch.int32, device=w.device)
    dev, stream = _stream_of(w)
    with _on_stream(dev, stream):
        launch_absmax_global(w.data_ptr(), _tname(w), N * K, ws.data_ptr(), _keep_bytes())
        if transpose:
            launch_quant_transpose(w.data_ptr(), ws.data_ptr(), q.data_ptr(), state.data_ptr(), N, K,
                                   dtype=_tname(w), per_col=False)
        else:
            launch_quant_global(w.data_ptr(), _tname(w), ws.data_ptr(), q.data_ptr(),
                                state.data_ptr(), N * K)
    return q, state


def quantize_columnwise_and_transpose_torch(w):
    """(q^T int8 (K, N), state (K,) in w's dtype) for a contiguous 2-D tensor w (N, K)."""
    import torch
    N, K = w.shape
    q = torch.empty((K, N), dtype=torch.int8, device=w.device)
    # quant_transpose writes state from its first row of tiles (N > 0); N == 0 leaves zeros
    state = (torch.empty if N else torch.zeros)((K,), dtype=w.dtype, device=w.device)
    ws = torch.zeros((max(K, 1),), dtype=torch.int32, device=w.device)
    dev, stream = _stream_of(w)
    with _on_stream(dev, stream):
        launch_col_absmax(w.data_ptr(), _tname(w), N, K, 0.0, ws.data_ptr(), _keep_bytes())
        launch_quant_transpose(w.data_ptr(), ws.data_ptr(), q.data_ptr(), state.data_ptr(), N, K,
                               dtype=_tname(w), per_col=True)
    return q, state


def dequantize_rowwise_torch(q, state, out_dtype=None):
    """f32(q) * state[:, None] * f32(1/127) in state's dtype (or out_dtype), q int8 (M, K)."""
    import torch
    M, K = q.shape
    out = torch.empty((M, K), dtype=out_dtype or state.dtype, device=q.device)
    dev, stream = _stream_of(q)
    with _on_stream(dev, stream):
        launch_dequant_rows(q.data_ptr(), state.data_ptr(), _tname(state), out.data_ptr(),
                            _tname(out), M, K)
    return out
