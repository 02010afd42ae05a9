"""Numba CUDA kernels for 4-bit NF4/FP4 quantization. Reference: reference/fourbit.py; the
CuPy version: fourbit.cu beside this file.

quantize_4bit_kernel: one CUDA block per quantization block. Each thread takes the elements
start + t, start + t + threads, ... (coalesced), the block reduces the NaN-propagating
absmax in shared memory (a tree, no warp shuffles, so the CUDA simulator runs it), then
each thread codes pairs of elements (2p, 2p + 1) and writes packed byte p (high nibble
first). The code is ``perm[#{s_i < y}]`` over the 15 sorted signed thresholds of
``reference.fourbit.rank_tables`` (NF4: midpoints, identity perm; FP4: bitsandbytes'
literals mirrored, see the reference), found by a 4-step binary search.
dequantize_4bit_kernel: one thread per packed byte, two values out, grid-stride.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, int32

from reference.fourbit import rank_tables
from .._numba_util import f32_to_bf16_bits, load_f32, nan_max

MAX_THREADS = 1024


@cuda.jit(device=True, inline=True)
def rank_code(thr, perm, y):
    """``perm[#{i : thr[i] < y}]`` for 15 sorted thresholds; NaN y is coded as 0.0."""
    if y != y:
        y = float32(0.0)
    c = 8 if y > thr[7] else 0
    c += 4 if y > thr[c + 3] else 0
    c += 2 if y > thr[c + 1] else 0
    c += 1 if y > thr[c] else 0
    return perm[c]


@cuda.jit
def quantize_4bit_kernel(x, is_bf16, thr, perm, packed, absmax, blocksize):
    n = x.shape[0]
    shared_max = cuda.shared.array(MAX_THREADS, float32)
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    for qb in range(cuda.blockIdx.x, absmax.shape[0], cuda.gridDim.x):
        start = qb * blocksize
        stop = min(start + blocksize, n)
        m = float32(0.0)
        for i in range(start + t, stop, threads):
            m = nan_max(abs(load_f32(x, i, is_bf16)), m)
        shared_max[t] = m
        cuda.syncthreads()
        step = threads // 2
        while step > 0:
            if t < step:
                shared_max[t] = nan_max(shared_max[t + step], shared_max[t])
            cuda.syncthreads()
            step //= 2
        m = shared_max[0]
        r = float32(1.0) / m if m != 0 else float32(np.inf)
        for p in range(start // 2 + t, (stop + 1) // 2, threads):
            y0 = float32(load_f32(x, 2 * p, is_bf16) * r)
            y1 = float32(0.0)  # past an odd n: the code of 0.0
            if 2 * p + 1 < n:
                y1 = float32(load_f32(x, 2 * p + 1, is_bf16) * r)
            packed[p] = (rank_code(thr, perm, y0) << 4) | rank_code(thr, perm, y1)
        if t == 0:
            absmax[qb] = m
        cuda.syncthreads()


@cuda.jit
def dequantize_4bit_kernel(packed, code, absmax, blocksize, out, is_bf16):
    n = out.shape[0]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for p in range(start, (n + 1) // 2, stride):
        byte = packed[p]
        for j in range(2):
            i = 2 * p + j
            if i < n:
                nibble = int32(byte >> 4) if j == 0 else int32(byte & 15)
                v = float32(code[nibble] * absmax[i // blocksize])
                if is_bf16:
                    out[i] = f32_to_bf16_bits(v)
                else:
                    out[i] = v


@cuda.jit
def add_offset_kernel(a, offset):
    """a += offset[0] in float32 (the nested absmax's mean)."""
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, a.shape[0], stride):
        a[i] = float32(a[i] + offset[0])


@functools.lru_cache(maxsize=4)
def _device_tables(quant_type: str):
    thr, perm = rank_tables(quant_type)
    return cuda.to_device(np.append(thr, np.float32(np.inf))), cuda.to_device(perm)


def quantize_4bit(x, dtype: str, quant_type: str, blocksize: int, packed, absmax, stream=0,
                  threads: int = 256):
    """x (n,) Numba device array -> packed uint8 (>= ceil(n/2),), absmax float32, in place;
    packed bytes past ceil(n/2) (quant_storage padding) are zeroed."""
    n = x.shape[0]
    m = (n + 1) // 2
    if packed.shape[0] > m:
        packed[m:].copy_to_device(np.zeros(packed.shape[0] - m, np.uint8), stream=stream)
    if n == 0:
        return
    thr, perm = _device_tables(quant_type)
    threads = min(threads, blocksize)
    grid = min(absmax.shape[0], 65535)
    quantize_4bit_kernel[grid, threads, stream](x, dtype == "bfloat16", thr, perm, packed, absmax,
                                                blocksize)


def dequantize_4bit(packed, code, absmax, blocksize: int, dtype: str, out, nested=None, stream=0,
                    threads: int = 256, workspace=None):
    """packed uint8 (>= ceil(n/2),), code float32 (16,), absmax float32 (nblocks,) -> out (n,).
    ``nested = (qabsmax, code2, absmax2, offset (1,))`` replaces absmax (pass None); its
    float32 absmax is dequantized into ``workspace`` (nblocks,) first (allocated here when
    None, which a CUDA graph capture does not allow: qkernels.fourbit passes one)."""
    n = out.shape[0]
    if n == 0:
        return
    if nested is not None:
        from ..blockwise import _numba as blockwise_numba
        qabs, code2, absmax2, offset = nested
        absmax = workspace if workspace is not None else \
            cuda.device_array(qabs.shape[0], np.float32, stream=stream)
        blockwise_numba.dequantize_blockwise(qabs, code2, absmax2, 256, "float32", absmax,
                                             stream=stream, threads=threads)
        grid = min(-(-absmax.shape[0] // threads), 65535)
        add_offset_kernel[grid, threads, stream](absmax, offset)
    grid = min(-(-((n + 1) // 2) // threads), 65535)
    dequantize_4bit_kernel[grid, threads, stream](packed, code, absmax, blocksize, out,
                                                  dtype == "bfloat16")
