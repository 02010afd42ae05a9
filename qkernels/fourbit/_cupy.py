"""CuPy launchers for fourbit.cu (kernels quantize_4bit / dequantize_4bit / matmul_4bit).

``quantize_4bit`` / ``dequantize_4bit`` take CuPy arrays already on the caller's device,
flat and contiguous, inside the caller's ``Call.cupy_context()`` (device and stream);
bfloat16 arrives as uint16 bits.

``matmul_4bit_torch`` is the per-token hot path for torch layers: torch tensors in, the
kernel launched with raw pointers on ``torch.cuda.current_stream()`` (no DLPack, no
per-call compile lookup), the output allocated with ``torch.empty``.
"""
from __future__ import annotations

import functools

import numpy as np

from .._cuda import get_kernel, multiprocessor_count
from .._interop import _external_stream  # cached per stream pointer

_DT = {"float32": 0, "float16": 1, "bfloat16": 2}
_QT = {"nf4": 0, "fp4": 1}
_CTA = 1024
# The fused kernel's row counts (template MT); x with more rows than the largest takes
# dequantize + GEMM (see qkernels.fourbit.FUSED_MAX_ROWS).
_MT = (1, 2, 4, 8, 16)
_MATMUL_WARPS = 8


def _aligned(*arrays) -> int:
    return int(all(a.data.ptr % 16 == 0 for a in arrays))


def quantize_4bit(x, dtype: str, quant_type: str, blocksize: int, packed, absmax):
    """x (n,) -> packed uint8 (>= ceil(n/2),), absmax float32 (nblocks,), in place. Bytes of
    ``packed`` past ceil(n/2) (quant_storage padding) are zeroed."""
    import cupy
    n = x.size
    m = (n + 1) // 2
    if packed.size > m:
        packed[m:] = 0
    if n == 0:
        return
    device = cupy.cuda.Device().id
    kernel = get_kernel(__package__, "fourbit.cu",
                        f"quantize_4bit<{_DT[dtype]}, {blocksize}, {_QT[quant_type]}>")
    vec = 16 // x.itemsize
    group = blocksize // vec
    cta = max(_CTA, group)
    groups = cta // group
    tiles = -(-(-(-n // blocksize)) // groups)
    grid = min(tiles, 2 * multiprocessor_count(device))
    kernel((grid,), (cta,), (x, packed, absmax, np.int64(n), np.int32(_aligned(x, packed))))


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
    threads = 256
    grid = min(-(-n // (32 * threads)), 8 * multiprocessor_count(device))
    if nested is None:
        args = (packed, code, absmax, np.uint64(0), np.uint64(0), np.uint64(0))
    else:
        qabs, code2, absmax2, offset = nested
        args = (packed, code, qabs, code2, absmax2, offset)
    kernel((grid,), (threads,), args + (out, np.int64(n), np.int32(_aligned(packed, out))))


def fused_rows(m: int) -> int | None:
    """The fused kernel's template row count for m rows of x, or None when m is too large."""
    for mt in _MT:
        if m <= mt:
            return mt
    return None


def matmul_4bit(x, packed, absmax, code, bias, out, blocksize: int, dtype: str):
    """CuPy arrays: x (M, K), packed uint8 (N*K/2,), absmax float32, code float32 (16,),
    bias (N,) or None, out (M, N); K % 32 == 0, M <= 16. Inside the caller's context."""
    import cupy
    M, K = x.shape
    N = out.shape[1]
    device = cupy.cuda.Device().id
    fn = _matmul_function(device, dtype, fused_rows(M))
    fn((-(-N // _MATMUL_WARPS),), (32 * _MATMUL_WARPS,),
       (x, packed, absmax, code, bias if bias is not None else np.uint64(0), out,
        np.int32(M), np.int32(N), np.int32(K), np.int32(blocksize.bit_length() - 1)),
       0, cupy.cuda.get_current_stream())


# --- the torch hot path -----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _matmul_function(device: int, dtype: str, mt: int):
    """The compiled cupy.cuda.Function (launch: fn(grid, block, args, shared_mem, stream))."""
    import cupy
    with cupy.cuda.Device(device):
        return get_kernel(__package__, "fourbit.cu", f"matmul_4bit<{_DT[dtype]}, {mt}>").kernel


def matmul_4bit_torch(x, packed, absmax_f32, code, blocksize: int, out_features: int, bias=None):
    """``x @ W^T + bias`` for a 4-bit weight W (out_features, K), torch CUDA tensors in and out.

    x: (..., K) float16/bfloat16/float32, contiguous, at most 16 rows after flattening;
    packed: the weight's packed bytes (any shape/storage dtype, out_features*K/2 bytes);
    absmax_f32: float32 (out_features*K/blocksize,) (dequantize nested statistics once and
    cache them); code: float32 (16,); bias: (out_features,) of x's dtype or None.
    Requires K % 32 == 0 and 16-byte aligned x and packed (callers check with
    ``fused_ok``). Returns (..., out_features) of x's dtype on torch's current stream.
    """
    import torch
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    out = torch.empty((*x.shape[:-1], out_features), dtype=x.dtype, device=x.device)
    if M == 0 or out_features == 0:
        return out
    dtype = str(x.dtype)[6:]
    device = x.device.index
    fn = _matmul_function(device, dtype, fused_rows(M))
    stream = _external_stream(torch.cuda.current_stream(device).cuda_stream)
    args = (np.uint64(x.data_ptr()), np.uint64(packed.data_ptr()), np.uint64(absmax_f32.data_ptr()),
            np.uint64(code.data_ptr()), np.uint64(bias.data_ptr() if bias is not None else 0),
            np.uint64(out.data_ptr()), np.int32(M), np.int32(out_features), np.int32(K),
            np.int32(blocksize.bit_length() - 1))
    grid = (-(-out_features // _MATMUL_WARPS),)
    if torch.cuda.current_device() != device:
        import cupy
        with cupy.cuda.Device(device):
            fn(grid, (32 * _MATMUL_WARPS,), args, 0, stream)
    else:
        fn(grid, (32 * _MATMUL_WARPS,), args, 0, stream)
    return out


def fused_ok(M: int, K: int, *ptrs: int) -> bool:
    """Whether the fused kernel can take this call (rows, K % 32, 16-byte alignment)."""
    return fused_rows(M) is not None and K % 32 == 0 and K > 0 and all(p % 16 == 0 for p in ptrs)
