"""CuPy launchers for blockwise.cu (kernels quantize_blockwise / dequantize_blockwise).

Arguments are CuPy arrays already on the caller's device, flat and contiguous, inside the
caller's ``Call.cupy_context()`` (device and stream); bfloat16 arrives as uint16 bits.
"""
from __future__ import annotations

import functools

import numpy as np

from reference.blockwise import search_table
from .._cuda import DTYPE_CODES as _DT, get_kernel, multiprocessor_count


@functools.lru_cache(maxsize=32)
def _device_table(device: int, code_bytes: bytes):
    import cupy
    found = search_table(np.frombuffer(code_bytes, np.float32))
    if found is None:
        return None
    table, emin = found
    return cupy.asarray(table), emin


def _aligned(*arrays) -> int:
    return int(all(a.data.ptr % 16 == 0 for a in arrays))


def quantize_blockwise(x, dtype: str, code: np.ndarray, blocksize: int, codes, absmax):
    """x (n,) -> codes uint8 (n,), absmax float32 (nblocks,), written in place."""
    import cupy
    n = x.size
    if n == 0:
        return
    device = cupy.cuda.Device().id
    found = _device_table(device, np.ascontiguousarray(code, np.float32).tobytes())
    if found is None:
        raise NotImplementedError("this codebook's midpoints are too close for the GPU search "
                                  "table; use the numpy backend")
    table, emin = found
    kernel = get_kernel(__package__, "blockwise.cu", f"quantize_blockwise<{_DT[dtype]}, {blocksize}>")
    smem = table.size * 4
    kernel.max_dynamic_shared_size_bytes = smem
    vec = 16 // x.itemsize  # QuantizeShape in blockwise.cu
    nv = 4 if blocksize // vec >= 256 else (2 if blocksize // vec >= 8 else 1)
    g = blocksize // (vec * nv)
    cta = 1024 if g <= 32 else min(g * 8, 1024)
    tiles = -(-(-(-n // blocksize)) // (cta // g))
    grid = min(tiles, (2048 // cta) * multiprocessor_count(device))
    kernel((grid,), (cta,), (x, table, np.int32(table.shape[0]), np.int32((emin - 1) << 7),
                              np.int32((129 - emin) * 128), codes, absmax, np.int64(n),
                              np.int32(_aligned(x, codes))), shared_mem=smem)


def dequantize_blockwise(codes, code, absmax, blocksize: int, dtype: str, out):
    """codes uint8 (n,), code float32 (256,), absmax float32 (nblocks,) -> out (n,) of dtype."""
    import cupy
    n = codes.size
    if n == 0:
        return
    device = cupy.cuda.Device().id
    kernel = get_kernel(__package__, "blockwise.cu", f"dequantize_blockwise<{_DT[dtype]}, {blocksize}>")
    threads = 256
    grid = min(-(-n // (16 // out.itemsize * threads * 4)), 8 * multiprocessor_count(device))
    kernel((grid,), (threads,), (codes, code, absmax, out, np.int64(n), np.int32(_aligned(codes, out))))
