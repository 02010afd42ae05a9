"""Numba CUDA kernels for blockwise 8-bit quantization. Reference: reference/blockwise.py;
the CuPy version: blockwise.cu beside this file.

quantize_blockwise_kernel: one CUDA block per quantization block. Each thread takes the
elements start + t, start + t + threads, ... (coalesced), the block reduces the
NaN-propagating absmax in shared memory (a tree, no warp shuffles, so the CUDA simulator
runs it), then each thread writes the codes of its elements. dequantize_blockwise_kernel:
one thread per element, grid-stride.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32

from reference.blockwise import search_table
from .._numba_util import f32_to_bf16_bits, load_f32, nan_max, table_code

MAX_THREADS = 1024


@cuda.jit
def quantize_blockwise_kernel(x, is_bf16, table, key_offset, rows128, codes, absmax, blocksize):
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
        for i in range(start + t, stop, threads):
            y = float32(load_f32(x, i, is_bf16) * r)
            if y != y:  # 0/0, Inf*0 and NaN blocks search as 0.0 (reference rule)
                y = float32(0.0)
            codes[i] = table_code(table, y, key_offset, rows128)
        if t == 0:
            absmax[qb] = m
        cuda.syncthreads()


@cuda.jit
def dequantize_blockwise_kernel(codes, code, absmax, blocksize, out, is_bf16):
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, codes.shape[0], stride):
        v = float32(code[codes[i]] * absmax[i // blocksize])
        if is_bf16:
            out[i] = f32_to_bf16_bits(v)
        else:
            out[i] = v


@functools.lru_cache(maxsize=32)
def _device_table(code_bytes: bytes):
    found = search_table(np.frombuffer(code_bytes, np.float32))
    if found is None:
        return None
    table, emin = found
    return cuda.to_device(np.ascontiguousarray(table)), emin


def quantize_blockwise(x, dtype: str, code, blocksize: int, codes, absmax, stream=0,
                       threads: int = 256):
    """x (n,) Numba device array -> codes (n,) uint8, absmax (nblocks,) float32, in place."""
    if x.shape[0] == 0:
        return
    found = _device_table(np.ascontiguousarray(code, np.float32).tobytes())
    if found is None:
        raise NotImplementedError("this codebook's midpoints are too close for the GPU search "
                                  "table; use the numpy backend")
    table, emin = found
    threads = min(threads, blocksize)
    grid = min(absmax.shape[0], 65535)
    quantize_blockwise_kernel[grid, threads, stream](x, dtype == "bfloat16", table, (emin - 1) << 7,
                                             (129 - emin) * 128, codes, absmax, blocksize)


def dequantize_blockwise(codes, code, absmax, blocksize: int, dtype: str, out, stream=0,
                         threads: int = 256):
    if codes.shape[0] == 0:
        return
    grid = min(-(-codes.shape[0] // threads), 65535)
    dequantize_blockwise_kernel[grid, threads, stream](codes, code, absmax, blocksize, out, dtype == "bfloat16")
