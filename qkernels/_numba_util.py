"""Small helpers shared by the Numba kernels, including the bit casts the CUDA simulator
lacks (libdevice is not simulated, so under NUMBA_ENABLE_CUDASIM=1 they are plain NumPy)."""
from __future__ import annotations

import numpy as np

if not hasattr(np, "row_stack"):  # numba-cuda 0.30 still calls np.row_stack (gone in NumPy 2.5)
    np.row_stack = np.vstack

from numba import config, cuda, float32, int32, uint32  # noqa: E402

if config.ENABLE_CUDASIM:
    import sys
    import threading
    import traceback

    from numba.core import types as _types
    from numba.np import numpy_support as _numpy_support
    from numba.cuda.simulator import kernelapi as _kernelapi

    # The simulator creates a block's shared array on first use without a lock: two threads
    # that both find it missing each make their own, and a reduction over it then sees only
    # part of the block (an intermittent wrong absmax). Same keying as the simulator's (the
    # calling file and line), with the lookup-and-create serialized.
    _shared_lock = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported
            return _unlocked_shared_array(self, shape, dtype, alignment)
        if isinstance(dtype, _types.Type):
            dtype = _numpy_support.as_dtype(dtype)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[-1])[0:2]
        with _shared_lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    if _kernelapi.FakeCUDAShared.array.__name__ != "_shared_array":
        _unlocked_shared_array = _kernelapi.FakeCUDAShared.array
        _kernelapi.FakeCUDAShared.array = _shared_array

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
    """Nearest code of float32 y via the (entries, 2) float32 table of
    reference.blockwise.search_table (see table_code in common.cuh)."""
    u = float_bits(y)
    h = int32((u >> 16) & 0x7FFF) - key_offset
    i = min(max(h, 0), rows128 - 1) + int32(u >> 31) * rows128
    return int32(table[i, 1]) + (1 if table[i, 0] < y else 0)


@cuda.jit(device=True, inline=True)
def table_code_split(thresholds, bases, y, key_offset, rows128):
    """table_code with the table's two columns as separate arrays (float32 thresholds,
    uint8 bases), so that they fit shared memory."""
    u = float_bits(y)
    h = int32((u >> 16) & 0x7FFF) - key_offset
    i = min(max(h, 0), rows128 - 1) + int32(u >> 31) * rows128
    return int32(bases[i]) + (1 if thresholds[i] < y else 0)


# Float32 arithmetic rounded once per operation (never contracted into a fused multiply-add:
# NVVM contracts a*b+c by default, which would break bit-equality with the NumPy oracle).
if config.ENABLE_CUDASIM:
    def mul_rn(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) * np.float32(b))

    def add_rn(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) + np.float32(b))

    def div_rn(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) / np.float32(b))

    def sqrt_rn(a):
        with np.errstate(all="ignore"):
            return np.sqrt(np.float32(a))
else:
    @cuda.jit(device=True, inline=True)
    def mul_rn(a, b):
        return libdevice.fmul_rn(float32(a), float32(b))

    @cuda.jit(device=True, inline=True)
    def add_rn(a, b):
        return libdevice.fadd_rn(float32(a), float32(b))

    @cuda.jit(device=True, inline=True)
    def div_rn(a, b):
        return libdevice.fdiv_rn(float32(a), float32(b))

    @cuda.jit(device=True, inline=True)
    def sqrt_rn(a):
        return libdevice.fsqrt_rn(float32(a))


@cuda.jit(device=True, inline=True)
def sign_bit(y):
    """1 if float32 y has its sign bit set (also -0.0 and negative NaN), else 0."""
    return int32(float_bits(y) >> 31)


@cuda.jit(device=True, inline=True)
def store_f32(out, i, v, is_bf16):
    """out[i] = float32 v rounded to out's dtype; ``is_bf16``: out holds bfloat16 bits."""
    if is_bf16:
        out[i] = f32_to_bf16_bits(v)
    else:
        out[i] = v


@cuda.jit(device=True, inline=True)
def quant8(v, scale):
    """clamp(rint(f32(v * scale)), -127, 127), NaN -> 0: the int8 quantizer of reference/int8.py."""
    y = float32(v * scale)
    if y != y:
        return 0
    y = min(max(y, float32(-127.0)), float32(127.0))
    return int32(round(y))
