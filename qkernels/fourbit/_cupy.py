"""CuPy launchers for fourbit.cu (kernels quantize_4bit / nest_absmax_4bit /
dequantize_4bit / matmul_4bit / gemv_4bit) and fourbit_mma.cu (matmul_4bit_mma, the
tensor-core matmul for 2-64 rows of float16 / bfloat16 x).

Which kernel multiplies x (rows, K) by a 4-bit weight (N, K) is ``choose_kernel``'s answer, a
function of the shape, x's dtype, the device and the alignment: "gemv" (gemv_4bit, one row),
"mma" (matmul_4bit_mma), "fused" (matmul_4bit, float32 x on CUDA cores) or "dequantize"
(dequantize + cuBLAS). The launchers take ``kernel=`` to force one (tests, benchmarks).

``quantize_4bit`` / ``nest_absmax_4bit`` / ``dequantize_4bit`` take CuPy arrays already on
the caller's device, flat and contiguous, inside the caller's ``Call.cupy_context()``
(device and stream); bfloat16 arrives as uint16 bits. Double quantization on CUDA data is
two launches: quantize_4bit (which also sums the finite absmax values per CTA) and
nest_absmax_4bit (offset, then the 8-bit blockwise quantization of absmax - offset).

``matmul_4bit_torch`` is the per-token hot path for torch layers: torch tensors in, the
kernel launched with raw pointers on ``torch.cuda.current_stream()`` (no DLPack, no
per-call compile lookup), the output allocated with ``torch.empty``.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from .._cuda import DTYPE_CODES as _DT, get_kernel, multiprocessor_count
from .._interop import _external_stream, torch_stream  # cached per stream pointer

_QT = {"nf4": 0, "fp4": 1}
# Launch shapes of fourbit.cu (its #defines of the same names): the persistent kernels' grids
# are MIN_CTAS CTAs per SM, which their launch bounds guarantee are resident together.
_Q4_THREADS, _Q4_MIN_CTAS = 256, 5
_DQ_THREADS, _DQ_MIN_CTAS, _DQ_UNITS = 256, 8, 4
_NEST_THREADS = 1024
_MM_THREADS = 256
# The fused kernel's row counts (template MT); x with more rows than the largest takes
# dequantize + GEMM (see qkernels.fourbit.FUSED_MAX_ROWS).
_MT = (1, 2, 4, 8, 16)
# One row of x takes gemv_4bit (rows of W per CTA: _GEMV_ROWS); kernel="fused" forces
# matmul_4bit<., 1, .> instead.
_GEMV_ROWS = 8
# matmul_4bit_mma (fourbit_mma.cu): 8 warps, chunks of 256 columns, x rows in NT tiles of 8
# (MmaShape<NT>: WT m16 tiles of W per warp, so R = 128 * WT rows of W per CTA).
MMA_MAX_ROWS = 64
# where the tensor-core kernel takes over from the CUDA-core one below FUSED_MAX_ROWS rows
# (choose_kernel): from 8 rows, or from 2 on weights of 2^25 elements or more
MMA_FROM_ROWS, MMA_FROM_ELEMENTS = 8, 1 << 25
_MMA_THREADS, _MMA_KC, _MMA_STAGES = 256, 256, 3
_MMA_NT = (1, 2, 4, 8)
KERNELS = ("gemv", "fused", "mma", "dequantize")


def _aligned(*arrays) -> int:
    return int(all(a.data.ptr % 16 == 0 for a in arrays))


def _quantize_shape(dtype: str, blocksize: int) -> int:
    """Threads per quantization block (Quantize4Shape<DT, BLOCK>::G in fourbit.cu)."""
    vec = 4 if dtype == "float32" else 8
    nv = 4 if blocksize // vec >= 256 else (2 if blocksize // vec >= 8 else 1)
    return blocksize // (vec * nv)


def max_quantize_ctas(device: int) -> int:
    """The most CTAs quantize_4bit launches (its ``partials`` need this many double2)."""
    return _Q4_MIN_CTAS * multiprocessor_count(device)


def quantize_4bit(x, dtype: str, quant_type: str, blocksize: int, packed, absmax, partials=None):
    """x (n,) -> packed uint8 (>= ceil(n/2),), absmax float32 (nblocks,), in place. Bytes of
    ``packed`` past ceil(n/2) (quant_storage padding) are zeroed. ``partials``: float64
    (>= 2 * max_quantize_ctas,) or None; when given, each CTA writes the (sum, count) of its
    finite absmax values there for nest_absmax_4bit. Returns the number of CTAs launched."""
    import cupy
    n = x.size
    m = (n + 1) // 2
    if packed.size > m:
        packed[m:] = 0
    if n == 0:
        return 0
    device = cupy.cuda.Device().id
    kernel = get_kernel(__package__, "fourbit.cu",
                        f"quantize_4bit<{_DT[dtype]}, {blocksize}, {_QT[quant_type]}>")
    groups = _Q4_THREADS // _quantize_shape(dtype, blocksize)
    tiles = -(-(-(-n // blocksize)) // groups)
    grid = min(tiles, max_quantize_ctas(device))
    kernel((grid,), (_Q4_THREADS,), (x, packed, absmax, np.int64(n), np.int32(_aligned(x, packed)),
                                     partials if partials is not None else np.uint64(0)))
    return grid


@functools.lru_cache(maxsize=8)
def _nested_table(device: int):
    """The signed dynamic map's search table on ``device``: (table, key_offset, rows128)."""
    import cupy
    from reference.blockwise import search_table
    from reference.codebooks import dynamic_map
    table, emin = search_table(dynamic_map(True))
    with cupy.cuda.Device(device):
        return cupy.asarray(table), (emin - 1) << 7, (129 - emin) * 128


def nest_absmax_4bit(absmax, partials, ctas: int, qabs, absmax2, offset):
    """Double quantization after ``quantize_4bit(..., partials)`` launched ``ctas`` CTAs:
    absmax float32 (nb,) -> qabs uint8 (nb,), absmax2 float32 (ceil(nb/256),), offset
    float32 (1,): offset = the float64 mean of the finite absmax values, rounded to float32,
    then quantize_blockwise(absmax - offset, blocksize=256) (reference.fourbit)."""
    import cupy
    nb = absmax.size
    device = cupy.cuda.Device().id
    table, key_offset, rows128 = _nested_table(device)
    kernel = get_kernel(__package__, "fourbit.cu", "nest_absmax_4bit<256>")
    grid = max(1, min(-(-nb // _NEST_THREADS), 2 * multiprocessor_count(device)))
    kernel((grid,), (_NEST_THREADS,), (absmax, partials, np.int32(ctas), table, np.int32(key_offset),
                                       np.int32(rows128), qabs, absmax2, offset, np.int64(nb)))


def dequantize_4bit(packed, code, absmax, blocksize: int, dtype: str, out, nested=None):
    """packed uint8 (>= ceil(n/2),), code float32 (16,), absmax float32 (nblocks,) -> out (n,)
    of dtype. ``nested = (qabsmax uint8 (nblocks,), code2 float32 (256,), absmax2 float32,
    offset float32 (1,))`` replaces absmax (then pass absmax=None): the nested statistics are
    dequantized inside the kernel."""
    import cupy
    n = out.size
    if n == 0:
        return
    device = cupy.cuda.Device().id
    kernel = get_kernel(__package__, "fourbit.cu",
                        f"dequantize_4bit<{_DT[dtype]}, {blocksize}, {int(nested is not None)}>")
    units = -(-n // (16 // out.itemsize))  # one 16-byte store each
    grid = min(-(-units // (_DQ_THREADS * _DQ_UNITS)), _DQ_MIN_CTAS * multiprocessor_count(device))
    if nested is None:
        args = (packed, code, absmax, np.uint64(0), np.uint64(0), np.uint64(0))
    else:
        qabs, code2, absmax2, offset = nested
        args = (packed, code, qabs, code2, absmax2, offset)
    # vectorized: 4 (or 2) packed bytes per unit at a 4-byte aligned address, 16-byte stores
    vec_ok = int(packed.data.ptr % 4 == 0 and out.data.ptr % 16 == 0)
    kernel((grid,), (_DQ_THREADS,), args + (out, np.int64(n), np.int32(vec_ok)))


def _matmul_ctas(mt: int, n_out: int) -> int:
    """CTAs of matmul_4bit<., mt, .>: one per MatmulShape<mt>::ROWS rows of W."""
    return -(-n_out // (8 if mt <= 2 else 16))


def gemv_shape(K: int) -> tuple[int, int]:
    """(R, TW) of gemv_4bit for K columns: R rows of W per CTA of TW warps, TW so that the
    32 * TW lanes cover the K / 32 chunks of a row in about one pass."""
    chunks = K // 32
    return _GEMV_ROWS, 4 if chunks > 64 else (2 if chunks > 32 else 1)


def _launch_shape(device: int, dtype: str, M: int, N: int, K: int, nested: bool, kernel: str | None = None):
    """(kernel function, grid, block) of the CUDA-core matmul for x (M, K) and N rows of W:
    gemv_4bit (kernel "gemv"; None: one row of x) or matmul_4bit ("fused").
    Both take the same arguments."""
    if kernel == "gemv" or (kernel is None and M == 1):
        r, tw = gemv_shape(K)
        return _gemv_function(device, dtype, r, tw, nested), (-(-N // r),), (32 * tw,)
    mt = fused_rows(M)
    return _matmul_function(device, dtype, mt, nested), (_matmul_ctas(mt, N),), (_MM_THREADS,)


# --- the kernel choice ----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _compute_capability(device: int) -> int:
    import cupy
    return int(cupy.cuda.Device(device).compute_capability)


def kernel_unfit(kernel: str, rows: int, K: int, device: int, dtype: str, x_ptr: int = 0,
                 packed_ptr: int = 0) -> str | None:
    """Why ``kernel`` (one of KERNELS) cannot multiply x (rows, K) of ``dtype`` at address
    ``x_ptr`` by the packed weight at ``packed_ptr`` on CUDA ``device``; None when it can."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)} or None; got {kernel!r}")
    if kernel == "dequantize":
        return None
    if K <= 0 or K % 32:
        return f"it needs in_features % 32 == 0 (got {K})"
    if packed_ptr % 16:
        return "it needs the packed weight 16-byte aligned"
    if kernel == "mma":
        if dtype not in ("float16", "bfloat16"):
            return f"it takes float16 or bfloat16 x (got {dtype}; float32 x takes kernel='fused')"
        if rows > MMA_MAX_ROWS:
            return f"it takes at most {MMA_MAX_ROWS} rows (got {rows})"
        if _compute_capability(device) < 80:
            return "it needs compute capability 8.0 or newer (mma.sync m16n8k16 bf16)"
        return None  # any 2-byte aligned x: misaligned x is staged element by element
    if x_ptr % 16:
        return "it needs x 16-byte aligned"
    if kernel == "gemv":
        return None if rows <= 1 else f"it takes one row of x (got {rows})"
    return None if fused_rows(rows) is not None else f"it takes at most {_MT[-1]} rows (got {rows})"


def choose_kernel(rows: int, N: int, K: int, device: int, dtype: str, x_ptr: int = 0, packed_ptr: int = 0,
                  kernel: str | None = None) -> str:
    """The kernel for x (rows, K) of ``dtype`` (address ``x_ptr``) @ W^T, W (N, K) packed at
    ``packed_ptr`` on CUDA ``device``: one of KERNELS.

    One row: gemv_4bit (the decode case). Up to FUSED_MAX_ROWS rows: matmul_4bit (the
    CUDA-core kernel; for float32 x float32 FMA, as a bfloat16 split of x and W could not keep
    the float64-referenced error of a float32 product), except for float16 / bfloat16 x from
    MMA_FROM_ROWS rows, or from 2 rows on a weight of MMA_FROM_ELEMENTS elements or more:
    matmul_4bit_mma (tensor cores, compute capability 8.0+), which also takes FUSED_MAX_ROWS
    + 1 to MMA_MAX_ROWS rows of 16-bit x. Otherwise, or where a kernel's requirement fails
    (``kernel_unfit``: K % 32, alignment), dequantize + cuBLAS. The crossovers are the H100
    benchmark's (benchmarks/fourbit.py, 2026-12-07, NF4 bf16 weights 4096x4096, 4096x14336,
    8192x8192, graph-timed): at 16 rows the tensor-core kernel takes 15.8 / 33.3 / 34.2 us,
    dequantize + cuBLAS 27.9 / 102.9 / 113.8 us; at 8 rows 13.7 / 28.8 / 30.0 us against the
    CUDA-core kernel's 17.6 / 54.9 / 63.4; at 2 and 4 rows the CUDA-core kernel is faster
    only on 4096x4096 (10.4 and 11.5 us against 13.0 and 13.1). ``kernel``: force one;
    ValueError when it cannot take the call."""
    if kernel is not None:
        why = kernel_unfit(kernel, rows, K, device, dtype, x_ptr, packed_ptr)
        if why is not None:
            raise ValueError(f"matmul_4bit: kernel={kernel!r} cannot take x ({rows}, {K}) of {dtype}: {why}")
        return kernel
    from . import FUSED_MAX_ROWS
    if rows <= 1:
        order = ("gemv", "fused")
    elif rows <= FUSED_MAX_ROWS:
        tensor_cores = rows >= MMA_FROM_ROWS or N * K >= MMA_FROM_ELEMENTS
        order = ("mma", "fused") if tensor_cores else ("fused",)
    elif rows <= MMA_MAX_ROWS:
        order = ("mma",)
    else:
        order = ()
    for k in order:
        if kernel_unfit(k, rows, K, device, dtype, x_ptr, packed_ptr) is None:
            return k
    return "dequantize"


# --- matmul_4bit_mma (fourbit_mma.cu) -------------------------------------------------------

class MmaShape(NamedTuple):
    """The launch of matmul_4bit_mma for one (rows, N, K, device): NT (x row tiles of 8), grid
    (row blocks, splits), cps (256-column chunks per split), smem (dynamic shared memory),
    counter_bytes and ws_bytes (the split-K workspace: zeroed counters, then float32
    partials (row blocks, splits, rows, R); both 0 without split-K)."""
    nt: int
    grid: tuple
    cps: int
    smem: int
    counter_bytes: int
    ws_bytes: int


def _mma_tile(nt: int) -> tuple[int, int, int]:
    """(R rows of W per CTA, CTAs resident per SM (the launch bound), dynamic shared memory)
    of matmul_4bit_mma<., NT, .> (MmaShape<NT> in fourbit_mma.cu)."""
    wt = 2 if nt >= 4 else 1
    return 128 * wt, 1 if nt >= 4 else 2, _MMA_STAGES * nt * 8 * _MMA_KC * 2


def mma_splits(row_blocks: int, chunks: int, slots: int) -> tuple[int, int]:
    """(chunks per split, splits) for ``row_blocks`` CTAs' worth of rows over ``chunks``
    256-column chunks on ``slots`` resident CTAs: the fewest splits that minimize
    waves * (chunks per CTA + 1) (the + 1: a CTA's pipeline start), no split left empty."""
    best = None
    for s in range(1, min(chunks, 64) + 1):
        cps = -(-chunks // s)
        splits = -(-chunks // cps)
        cost = -(-(row_blocks * splits) // slots) * (cps + 1)
        if best is None or cost < best[0]:
            best = (cost, cps, splits)
    return best[1], best[2]


@functools.lru_cache(maxsize=4096)
def mma_launch_shape(M: int, N: int, K: int, device: int) -> MmaShape:
    """The MmaShape of x (M, K) @ W^T, W (N, K), on ``device`` (1 <= M <= MMA_MAX_ROWS)."""
    nt = next(v for v in _MMA_NT if M <= 8 * v)
    rows_per_cta, per_sm, smem = _mma_tile(nt)
    row_blocks = -(-N // rows_per_cta)
    cps, splits = mma_splits(row_blocks, -(-K // _MMA_KC), per_sm * multiprocessor_count(device))
    counter_bytes = -(-4 * row_blocks // 256) * 256 if splits > 1 else 0
    ws_bytes = counter_bytes + 4 * row_blocks * splits * M * rows_per_cta if splits > 1 else 0
    return MmaShape(nt, (row_blocks, splits), cps, smem, counter_bytes, ws_bytes)


@functools.lru_cache(maxsize=None)
def _mma_function(device: int, dtype: str, nt: int, nested: bool):
    """The compiled matmul_4bit_mma<dtype, nt, nested> (a cupy.cuda.Function) on ``device``,
    its dynamic shared memory limit raised to what it takes."""
    import cupy
    with cupy.cuda.Device(device):
        k = get_kernel(__package__, "fourbit_mma.cu", f"matmul_4bit_mma<{_DT[dtype]}, {nt}, {int(nested)}>")
        k.max_dynamic_shared_size_bytes = _mma_tile(nt)[2]
        return k.kernel


# matmul_4bit_mma: x, packed, absmax, code, code2, absmax2, offset_p, offset_v, bias, out, ws,
# counters, M, N, K, log2_block, cps, x_vec
_MMA_SIG = "pppppppfppppiiiiii"


def _mma_args(*, x: int, packed: int, absmax: int, code: int, code2: int, absmax2: int, offset_p,
              offset_v, bias: int, out: int, ws: int, counters: int, M: int, N: int, K: int,
              blocksize: int, cps: int) -> tuple:
    """matmul_4bit_mma's argument tuple, typed as _MMA_SIG: the pointers (0 for an absent
    one), offset_p / offset_v from ``_offset_args``, the sizes, log2(blocksize), ``cps`` and
    whether x is 16-byte aligned."""
    return (np.uint64(x), np.uint64(packed), np.uint64(absmax), np.uint64(code),
            np.uint64(code2), np.uint64(absmax2), offset_p, offset_v, np.uint64(bias),
            np.uint64(out), np.uint64(ws), np.uint64(counters), np.int32(M), np.int32(N),
            np.int32(K), np.int32(blocksize.bit_length() - 1), np.int32(cps), np.int32(x % 16 == 0))


def fused_rows(m: int) -> int | None:
    """The fused kernel's template row count for m rows of x, or None when m is too large."""
    for mt in _MT:
        if m <= mt:
            return mt
    return None


def _offset_args(offset):
    """(pointer, value) kernel arguments of a nested offset: a device float32 array (torch
    tensor or CuPy array, one element) or a host number."""
    if isinstance(offset, (float, int, np.floating, np.integer)):
        return np.uint64(0), np.float32(offset)
    if isinstance(offset, np.ndarray):
        return np.uint64(0), np.float32(offset.reshape(-1)[0])
    ptr = offset.data_ptr() if hasattr(offset, "data_ptr") else offset.data.ptr
    return np.uint64(ptr), np.float32(0)


def matmul_4bit(x, packed, absmax, code, out, *, blocksize: int, dtype: str, bias=None, nested=None,
                kernel=None):
    """out (M, N) = x @ W^T + bias for CuPy arrays: x (M, K) of ``dtype`` (2-byte aligned;
    16-byte aligned for gemv/fused), packed uint8 (N*K/2,), absmax float32 (N*K/blocksize,)
    (or, with ``nested = (code2, absmax2, offset)``, the uint8 nested codes), code float32
    (16,), bias (N,) of x's dtype or None, out (M, N) of x's dtype; K % 32 == 0.
    ``kernel``: "gemv", "fused" or "mma" (None: ``choose_kernel``'s; ValueError for
    "dequantize", which this function does not run). Inside the caller's context."""
    import cupy
    M, K = x.shape
    N = out.shape[1]
    if M == 0 or N == 0:
        return
    device = cupy.cuda.Device().id
    kernel = choose_kernel(M, N, K, device, dtype, x.data.ptr, packed.data.ptr, kernel)
    if kernel == "dequantize":
        raise ValueError("matmul_4bit (the fused launcher) runs gemv, fused or mma; got 'dequantize'")
    code2, absmax2, offset = nested if nested is not None else (None, None, 0.0)
    offset_p, offset_v = _offset_args(offset)
    stream = cupy.cuda.get_current_stream()
    if kernel == "mma":
        shape = mma_launch_shape(M, N, K, device)
        ws = None
        ws_ptr = counters_ptr = 0
        if shape.ws_bytes:
            from .._cuda.launch import memset_async
            ws = cupy.empty((shape.ws_bytes,), dtype=cupy.uint8)
            counters_ptr, ws_ptr = ws.data.ptr, ws.data.ptr + shape.counter_bytes
            memset_async(counters_ptr, shape.counter_bytes, stream.ptr)
        fn = _mma_function(device, dtype, shape.nt, nested is not None)
        fn(shape.grid, (_MMA_THREADS,),
           _mma_args(x=x.data.ptr, packed=packed.data.ptr, absmax=absmax.data.ptr, code=code.data.ptr,
                     code2=code2.data.ptr if code2 is not None else 0,
                     absmax2=absmax2.data.ptr if absmax2 is not None else 0, offset_p=offset_p,
                     offset_v=offset_v, bias=bias.data.ptr if bias is not None else 0, out=out.data.ptr,
                     ws=ws_ptr, counters=counters_ptr, M=M, N=N, K=K, blocksize=blocksize, cps=shape.cps),
           shape.smem, stream)
        return
    fn, grid, block = _launch_shape(device, dtype, M, N, K, nested is not None, kernel)
    fn(grid, block,
       (x, packed, absmax, code, code2 if code2 is not None else np.uint64(0),
        absmax2 if absmax2 is not None else np.uint64(0), offset_p, offset_v,
        bias if bias is not None else np.uint64(0), out,
        np.int32(M), np.int32(N), np.int32(K), np.int32(blocksize.bit_length() - 1)),
       0, stream)


# --- the torch hot path -----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _matmul_function(device: int, dtype: str, mt: int, nested: bool = False):
    """The compiled cupy.cuda.Function (launch: fn(grid, block, args, shared_mem, stream))."""
    import cupy
    with cupy.cuda.Device(device):
        return get_kernel(__package__, "fourbit.cu", f"matmul_4bit<{_DT[dtype]}, {mt}, {int(nested)}>").kernel


@functools.lru_cache(maxsize=None)
def _gemv_function(device: int, dtype: str, r: int, tw: int, nested: bool = False):
    import cupy
    with cupy.cuda.Device(device):
        return get_kernel(__package__, "fourbit.cu", f"gemv_4bit<{_DT[dtype]}, {int(nested)}, {r}, {tw}>").kernel


def matmul_4bit_torch(x, packed, absmax, code, *, blocksize: int, out_features: int, bias=None,
                      nested=None, kernel=None):
    """``x @ W^T + bias`` for a 4-bit weight W (out_features, K), torch CUDA tensors in and out.

    x: (..., K) float16/bfloat16/float32, contiguous; packed: the weight's packed bytes (any
    shape/storage dtype, out_features*K/2 bytes, 16-byte aligned); absmax: float32
    (out_features*K/blocksize,), or with ``nested = (code2 float32 (256,), absmax2 float32,
    offset)`` the state's uint8 nested codes (dequantized in the kernel; offset: a float32
    device tensor or a number); code: float32 (16,); bias: (out_features,) of x's dtype or
    None. Requires K % 32 == 0. ``kernel``: "gemv", "fused" or "mma" (None:
    ``choose_kernel``'s choice; ValueError when the forced one cannot take the call, or for
    "dequantize", which this function does not run). Returns (..., out_features) of x's dtype
    on torch's current stream: one kernel launch (the tensor-core kernel with split-K also
    zeroes its workspace's counters: one memset), no host synchronization.
    """
    import torch
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    if M == 0 or out_features == 0:
        return out
    dtype = str(x.dtype)[6:]
    device = x.device.index
    kernel = choose_kernel(M, out_features, K, device, dtype, x.data_ptr(), packed.data_ptr(), kernel)
    if kernel == "dequantize":
        raise ValueError("matmul_4bit_torch runs gemv, fused or mma; got kernel 'dequantize' "
                         "(dequantize_4bit + torch.nn.functional.linear is that path)")
    raw_stream = torch_stream(x)[1]
    stream = _external_stream(raw_stream)
    code2, absmax2, offset = nested if nested is not None else (None, None, 0.0)
    offset_p, offset_v = _offset_args(offset)
    ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    if kernel == "mma":
        shape = mma_launch_shape(M, out_features, K, device)
        ws_ptr = counters_ptr = 0
        if shape.ws_bytes:
            ws = torch.empty((shape.ws_bytes,), dtype=torch.uint8, device=x.device)  # stream-ordered reuse
            counters_ptr, ws_ptr = ws.data_ptr(), ws.data_ptr() + shape.counter_bytes
        fn = _mma_function(device, dtype, shape.nt, nested is not None)
        args = _mma_args(x=x.data_ptr(), packed=packed.data_ptr(), absmax=absmax.data_ptr(),
                         code=code.data_ptr(), code2=ptr(code2), absmax2=ptr(absmax2), offset_p=offset_p,
                         offset_v=offset_v, bias=ptr(bias), out=out.data_ptr(), ws=ws_ptr,
                         counters=counters_ptr, M=M, N=out_features, K=K, blocksize=blocksize,
                         cps=shape.cps)
        grid, block, smem = shape.grid, (_MMA_THREADS,), shape.smem
    else:
        shape = None
        fn, grid, block = _launch_shape(device, dtype, M, out_features, K, nested is not None, kernel)
        args = (np.uint64(x.data_ptr()), np.uint64(packed.data_ptr()), np.uint64(absmax.data_ptr()),
                np.uint64(code.data_ptr()), np.uint64(ptr(code2)), np.uint64(ptr(absmax2)), offset_p, offset_v,
                np.uint64(ptr(bias)), np.uint64(out.data_ptr()), np.int32(M), np.int32(out_features),
                np.int32(K), np.int32(blocksize.bit_length() - 1))
        smem = 0

    def launch():
        if shape is not None and shape.ws_bytes:
            from .._cuda.launch import memset_async
            memset_async(counters_ptr, shape.counter_bytes, raw_stream)
        fn(grid, block, args, smem, stream)

    if torch.cuda.current_device() != device:
        import cupy
        with cupy.cuda.Device(device):
            launch()
    else:
        launch()
    return out


def fused_ok(M: int, K: int, *ptrs: int) -> bool:
    """Whether the fused kernel can take this call (rows, K % 32, 16-byte alignment)."""
    return fused_rows(M) is not None and K % 32 == 0 and K > 0 and all(p % 16 == 0 for p in ptrs)


# --- prepared launches for one weight (qkernels.fourbit.ops) --------------------------------

# matmul_4bit / gemv_4bit: x, packed, absmax, code, code2, absmax2, offset_p, offset_v, bias,
# out, M, N, K, log2_block. dequantize_4bit: packed, code, absmax, code2, absmax2, offset_p, y,
# n, vec_ok.
_MATMUL_SIG = "pppppppfppiiii"
_DEQUANT_SIG = "pppppppli"


class PreparedWeight4bit:
    """The fused matmul and the dequantization of one 4-bit weight W (N, K) on one CUDA
    device, with every weight-dependent launch argument written once.

    packed: uint8 bytes of W (any shape and storage dtype, viewed flat); absmax: float32
    (nblocks,) or, when ``nested = (code2 float32 (256,), absmax2 float32, offset float32
    (1,))``, the uint8 nested codes; code: float32 (16,); all contiguous CUDA tensors on one
    device. ``hold=True`` keeps the tensors, so the pointers stay valid for the object's life;
    with ``hold=False`` only the pointers are kept, and the caller must launch only while
    tensors at those same addresses are alive (qkernels.fourbit.ops keys its cache on them).
    """

    def __init__(self, packed, absmax, code, nested, blocksize: int, N: int, K: int, hold: bool = True):
        import torch
        self.device = packed.device.index
        self.N, self.K, self.blocksize = N, K, blocksize
        code2, absmax2, offset = nested if nested is not None else (None, None, None)
        self.tensors = (packed, absmax, code, code2, absmax2, offset) if hold else None
        self.nested = nested is not None
        p = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        self._ptrs = (p(packed), p(absmax), p(code), p(code2), p(absmax2), p(offset))
        # the fused kernels read x and the packed bytes in 16-byte vectors, K in 32-column chunks
        self.fused = K % 32 == 0 and K > 0 and N > 0 and self._ptrs[0] % 16 == 0
        self._matmul: dict = {}
        self._dequant: dict = {}
        self._routes: dict = {}
        self._dtype_names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

    def route(self, dtype, M: int) -> str:
        """The kernel (``choose_kernel``) for M rows of x of torch dtype ``dtype``, for an x
        that the caller makes 16-byte aligned when the answer is "gemv" or "fused" (the
        tensor-core kernel takes any 2-byte aligned x). Cached per (dtype, M) for the row
        counts a fused kernel takes; more rows always dequantize (nothing cached for them)."""
        r = self._routes.get((dtype, M))
        if r is None:
            if not self.fused or M > max(MMA_MAX_ROWS, _MT[-1]) or dtype not in self._dtype_names:
                return "dequantize"
            r = self._routes[(dtype, M)] = choose_kernel(M, self.N, self.K, self.device, self._dtype_names[dtype],
                                                         0, self._ptrs[0])
        return r

    def check_kernel(self, kernel: str, x, M: int) -> str:
        """``kernel`` (one of KERNELS) after checking that it can take x with M rows (the
        ``kernel=`` argument of Matmul4bitPlan); ValueError otherwise."""
        if kernel != "dequantize" and not self.fused:
            raise ValueError(f"matmul_4bit: kernel={kernel!r} needs in_features % 32 == 0, out_features > 0 "
                             "and a 16-byte aligned packed weight")
        return choose_kernel(M, self.N, self.K, self.device, self._dtype_names.get(x.dtype, str(x.dtype)),
                             0, self._ptrs[0], kernel)  # the plan aligns x for gemv / fused

    def _matmul_launch(self, dtype, M: int, kernel: str):
        """The PreparedLaunch of gemv_4bit ("gemv") or matmul_4bit<dtype, MT> ("fused") for M
        rows of x of torch dtype ``dtype``, made on first use."""
        from .._cuda.launch import PreparedLaunch
        name = self._dtype_names[dtype]
        fn, grid, block = _launch_shape(self.device, name, M, self.N, self.K, self.nested, kernel)
        pk, am, cd, c2, a2, off = self._ptrs
        fixed = {1: pk, 2: am, 3: cd, 4: c2, 5: a2, 6: off, 7: 0.0, 11: self.N, 12: self.K,
                 13: self.blocksize.bit_length() - 1}
        launch = self._matmul[(dtype, M, kernel)] = PreparedLaunch(fn, _MATMUL_SIG, fixed, (0, 8, 9, 10), grid,
                                                                   block)
        return launch

    def _mma_launch(self, dtype, M: int):
        """(PreparedLaunch of matmul_4bit_mma, its MmaShape) for M rows of x of torch dtype
        ``dtype``, made on first use."""
        from .._cuda.launch import PreparedLaunch
        shape = mma_launch_shape(M, self.N, self.K, self.device)
        fn = _mma_function(self.device, self._dtype_names[dtype], shape.nt, self.nested)
        pk, am, cd, c2, a2, off = self._ptrs
        fixed = {1: pk, 2: am, 3: cd, 4: c2, 5: a2, 6: off, 7: 0.0, 13: self.N, 14: self.K,
                 15: self.blocksize.bit_length() - 1, 16: shape.cps}
        launch = PreparedLaunch(fn, _MMA_SIG, fixed, (0, 8, 9, 10, 11, 12, 17), shape.grid, (_MMA_THREADS,),
                                smem=shape.smem)
        self._matmul[(dtype, M, "mma")] = (launch, shape)
        return launch, shape

    def matmul(self, x, M: int, bias, out, stream: int, kernel: str | None = None) -> None:
        """out (M, N) = x (M, K) @ W^T + bias with ``kernel`` (None: ``route``'s): x
        contiguous (any leading shape with M rows), 16-byte aligned for "gemv" / "fused"
        (2-byte aligned for "mma"), M rows as the kernel takes them; bias (N,) of x's dtype or
        None; out of x's dtype, M x N contiguous. Launched on ``stream`` (a raw cudaStream_t of
        this device); the tensor-core kernel's split-K workspace comes from torch's allocator
        and its counters are zeroed on the same stream."""
        if kernel is None:
            kernel = self.route(x.dtype, M)
        xp = x.data_ptr()
        bp = 0 if bias is None else bias.data_ptr()
        if kernel == "mma":
            launch, shape = self._matmul.get((x.dtype, M, "mma")) or self._mma_launch(x.dtype, M)
            ws_ptr = counters_ptr = 0
            if shape.ws_bytes:
                import torch
                from .._cuda.launch import memset_async
                ws = torch.empty((shape.ws_bytes,), dtype=torch.uint8, device=x.device)  # stream-ordered reuse
                counters_ptr, ws_ptr = ws.data_ptr(), ws.data_ptr() + shape.counter_bytes
                memset_async(counters_ptr, shape.counter_bytes, stream)
            launch.launch(stream, xp, bp, out.data_ptr(), ws_ptr, counters_ptr, M, int(xp % 16 == 0))
            return
        launch = self._matmul.get((x.dtype, M, kernel)) or self._matmul_launch(x.dtype, M, kernel)
        launch.launch(stream, xp, bp, out.data_ptr(), M)

    def dequantize(self, out, stream: int) -> None:
        """out (N*K,) contiguous float16/bfloat16/float32 = the dequantized weight."""
        from .._cuda.launch import PreparedLaunch
        dtype = self._dtype_names[out.dtype]
        n = self.N * self.K
        if n == 0:
            return
        vec_ok = int(self._ptrs[0] % 4 == 0 and out.data_ptr() % 16 == 0)
        launch = self._dequant.get((dtype, vec_ok))
        if launch is None:
            import cupy
            with cupy.cuda.Device(self.device):
                fn = get_kernel(__package__, "fourbit.cu",
                                f"dequantize_4bit<{_DT[dtype]}, {self.blocksize}, {int(self.nested)}>").kernel
            units = -(-n // (16 // out.element_size()))
            grid = min(-(-units // (_DQ_THREADS * _DQ_UNITS)), _DQ_MIN_CTAS * multiprocessor_count(self.device))
            pk, am, cd, c2, a2, off = self._ptrs
            fixed = {0: pk, 1: cd, 2: am, 3: c2, 4: a2, 5: off, 7: n, 8: vec_ok}
            launch = self._dequant[(dtype, vec_ok)] = PreparedLaunch(fn, _DEQUANT_SIG, fixed, (6,), (grid,),
                                                                     (_DQ_THREADS,))
        launch.launch(stream, out.data_ptr())
