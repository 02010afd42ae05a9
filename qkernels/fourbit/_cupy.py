"""CuPy launchers for fourbit.cu (kernels quantize_4bit / nest_absmax_4bit /
dequantize_4bit / matmul_4bit / gemv_4bit).

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

import numpy as np

from .._cuda import get_kernel, multiprocessor_count
from .._interop import _external_stream, torch_stream  # cached per stream pointer

_DT = {"float32": 0, "float16": 1, "bfloat16": 2}
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
# One row of x takes gemv_4bit (rows of W per CTA: _GEMV_ROWS); USE_GEMV = False sends it to
# matmul_4bit<., 1, .> instead (the benchmark times both).
_GEMV_ROWS = 8
USE_GEMV = True


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


def _launch_shape(device: int, dtype: str, M: int, N: int, K: int, nested: bool):
    """(kernel function, grid, block) of the fused matmul for x (M, K) and N rows of W:
    gemv_4bit for one row of x, matmul_4bit for more. Both take the same arguments."""
    if M == 1 and USE_GEMV:
        r, tw = gemv_shape(K)
        return _gemv_function(device, dtype, r, tw, nested), (-(-N // r),), (32 * tw,)
    mt = fused_rows(M)
    return _matmul_function(device, dtype, mt, nested), (_matmul_ctas(mt, N),), (_MM_THREADS,)


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


def matmul_4bit(x, packed, absmax, code, bias, out, blocksize: int, dtype: str, nested=None):
    """CuPy arrays: x (M, K), packed uint8 (N*K/2,), absmax float32 (or, with ``nested =
    (code2, absmax2, offset)``, the uint8 nested codes), code float32 (16,), bias (N,) or
    None, out (M, N); K % 32 == 0, M <= 16. Inside the caller's context."""
    import cupy
    M, K = x.shape
    N = out.shape[1]
    device = cupy.cuda.Device().id
    fn, grid, block = _launch_shape(device, dtype, M, N, K, nested is not None)
    code2, absmax2, offset = nested if nested is not None else (None, None, 0.0)
    offset_p, offset_v = _offset_args(offset)
    fn(grid, block,
       (x, packed, absmax, code, code2 if code2 is not None else np.uint64(0),
        absmax2 if absmax2 is not None else np.uint64(0), offset_p, offset_v,
        bias if bias is not None else np.uint64(0), out,
        np.int32(M), np.int32(N), np.int32(K), np.int32(blocksize.bit_length() - 1)),
       0, cupy.cuda.get_current_stream())


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


def matmul_4bit_torch(x, packed, absmax, code, blocksize: int, out_features: int, bias=None,
                      nested=None):
    """``x @ W^T + bias`` for a 4-bit weight W (out_features, K), torch CUDA tensors in and out.

    x: (..., K) float16/bfloat16/float32, contiguous, at most 16 rows after flattening;
    packed: the weight's packed bytes (any shape/storage dtype, out_features*K/2 bytes);
    absmax: float32 (out_features*K/blocksize,), or with ``nested = (code2 float32 (256,),
    absmax2 float32, offset)`` the state's uint8 nested codes (dequantized in the kernel;
    offset: a float32 device tensor or a number); code: float32 (16,); bias:
    (out_features,) of x's dtype or None. Requires K % 32 == 0 and 16-byte aligned x and
    packed (callers check with ``fused_ok``). Returns (..., out_features) of x's dtype on
    torch's current stream: one kernel launch, no other work.
    """
    import torch
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    if M == 0 or out_features == 0:
        return out
    dtype = str(x.dtype)[6:]
    device = x.device.index
    fn, grid, block = _launch_shape(device, dtype, M, out_features, K, nested is not None)
    stream = _external_stream(torch_stream(x)[1])
    code2, absmax2, offset = nested if nested is not None else (None, None, 0.0)
    offset_p, offset_v = _offset_args(offset)
    args = (np.uint64(x.data_ptr()), np.uint64(packed.data_ptr()), np.uint64(absmax.data_ptr()),
            np.uint64(code.data_ptr()), np.uint64(code2.data_ptr() if code2 is not None else 0),
            np.uint64(absmax2.data_ptr() if absmax2 is not None else 0), offset_p, offset_v,
            np.uint64(bias.data_ptr() if bias is not None else 0),
            np.uint64(out.data_ptr()), np.int32(M), np.int32(out_features), np.int32(K),
            np.int32(blocksize.bit_length() - 1))
    if torch.cuda.current_device() != device:
        import cupy
        with cupy.cuda.Device(device):
            fn(grid, block, args, 0, stream)
    else:
        fn(grid, block, args, 0, stream)
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
        self._dtype_names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

    def _matmul_launch(self, dtype, M: int):
        """The PreparedLaunch of gemv_4bit (one row) or matmul_4bit<dtype, MT> for M rows of
        x of torch dtype ``dtype``, made on first use."""
        from .._cuda.launch import PreparedLaunch
        name = self._dtype_names[dtype]
        fn, grid, block = _launch_shape(self.device, name, M, self.N, self.K, self.nested)
        pk, am, cd, c2, a2, off = self._ptrs
        fixed = {1: pk, 2: am, 3: cd, 4: c2, 5: a2, 6: off, 7: 0.0, 11: self.N, 12: self.K,
                 13: self.blocksize.bit_length() - 1}
        launch = self._matmul[(dtype, M)] = PreparedLaunch(fn, _MATMUL_SIG, fixed, (0, 8, 9, 10), grid, block)
        return launch

    def matmul(self, x, M: int, bias, out, stream: int) -> None:
        """out (M, N) = x (M, K) @ W^T + bias: x contiguous (any leading shape with M rows),
        16-byte aligned, M <= the fused kernel's largest row count (``fused_rows``); bias (N,)
        of x's dtype or None; out of x's dtype, M x N contiguous. Launched on ``stream`` (a raw
        cudaStream_t of this device)."""
        launch = self._matmul.get((x.dtype, M)) or self._matmul_launch(x.dtype, M)
        launch.launch(stream, x.data_ptr(), 0 if bias is None else bias.data_ptr(), out.data_ptr(), M)

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
