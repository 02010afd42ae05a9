"""Small helpers shared by the Numba kernels, including the bit casts the CUDA simulator
lacks (libdevice is not simulated, so under NUMBA_ENABLE_CUDASIM=1 they are plain NumPy)."""
from __future__ import annotations

import numpy as np

if not hasattr(np, "row_stack"):  # numba-cuda 0.30 still calls np.row_stack (gone in NumPy 2.5)
    np.row_stack = np.vstack

from numba import config, cuda, float32, int32, uint32  # noqa: E402

if config.ENABLE_CUDASIM:
    def float_bits(y):
        return int(np.float32(y).view(np.uint32))

    def bits_float(u):
        return float(np.uint32(u).view(np.float32))
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def float_bits(y):
        return uint32(libdevice.float_as_int(float32(y)))

    @cuda.jit(device=True, inline=True)
    def bits_float(u):
        return libdevice.int_as_float(int32(u))


@cuda.jit(device=True, inline=True)
def nan_max(a, b):
    """max that propagates NaN, as the reference's absmax does."""
    return a if (a != a or a > b) else b


@cuda.jit(device=True, inline=True)
def load_f32(x, i, is_bf16):
    """x[i] as float32; ``is_bf16``: x holds bfloat16 bit patterns (uint16)."""
    if is_bf16:
        return bits_float(uint32(x[i]) << 16)
    return float32(x[i])


@cuda.jit(device=True, inline=True)
def f32_to_bf16_bits(v):
    """Round float32 to bfloat16 bits (nearest, ties to even; NaN stays NaN)."""
    u = float_bits(v)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@cuda.jit(device=True, inline=True)
def table_code(table, y, key_offset, rows128):
    """Nearest code of float32 y via reference.blockwise.search_table (see common.cuh)."""
    u = float_bits(y)
    h = int32((u >> 16) & 0x7FFF) - key_offset
    i = min(max(h, 0), rows128 - 1) + int32(u >> 31) * rows128
    return int32(table[i, 1]) + (1 if table[i, 0] < y else 0)
