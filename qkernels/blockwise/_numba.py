"""Numba CUDA kernels for blockwise 8-bit quantization. Reference: reference/blockwise.py;
the CuPy version: blockwise.cu beside this file.

quantize_blockwise_kernel: a CUDA block of (T, GY) threads quantizes GY blocks at a time,
T threads per block. Each thread takes UNROLL consecutive elements at a time, at
start + UNROLL * t, start + UNROLL * (t + T), ... (coalesced), the T threads reduce the NaN-propagating absmax in shared memory (a tree, no
warp shuffles, so the CUDA simulator runs it), then each thread writes the codes of its
elements. dequantize_blockwise_kernel: UNROLL consecutive elements per thread per step, grid-stride.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, uint8

from reference.blockwise import search_table
from .._numba_util import f32_to_bf16_bits, load_f32, nan_max, table_code_split

MAX_THREADS = 1024
UNROLL = 4  # consecutive elements per thread per step
MAX_TABLE = 6400  # search-table entries held in shared memory (32 KB)


@cuda.jit
def quantize_blockwise_kernel(x, is_bf16, thr_g, base_g, key_offset, rows128, codes, absmax,
                              blocksize):
    n = x.shape[0]
    nblocks = absmax.shape[0]
    shared_max = cuda.shared.array(MAX_THREADS, float32)
    t, gy = cuda.threadIdx.x, cuda.threadIdx.y
    T, GY = cuda.blockDim.x, cuda.blockDim.y
    slot = gy * T + t
    # the search table in shared memory when it fits (the dynamic and FP8-E4M3 maps)
    thr_s = cuda.shared.array(MAX_TABLE, float32)
    base_s = cuda.shared.array(MAX_TABLE, uint8)
    in_shared = thr_g.shape[0] <= MAX_TABLE
    if in_shared:
        for i in range(slot, thr_g.shape[0], T * GY):
            thr_s[i] = thr_g[i]
            base_s[i] = base_g[i]
    cuda.syncthreads()
    thr = thr_s if in_shared else thr_g
    base = base_s if in_shared else base_g
    for first in range(cuda.blockIdx.x * GY, nblocks, cuda.gridDim.x * GY):  # uniform per CTA
        qb = first + gy
        start = qb * blocksize
        stop = min(start + blocksize, n)
        m = float32(0.0)
        for i0 in range(start + t * UNROLL, stop, T * UNROLL):
            for j in range(UNROLL):  # unrolled: UNROLL independent loads in flight
                if i0 + j < stop:
                    m = nan_max(abs(load_f32(x, i0 + j, is_bf16)), m)
        shared_max[slot] = m
        cuda.syncthreads()
        step = T // 2
        while step > 0:
            if t < step:
                shared_max[slot] = nan_max(shared_max[slot + step], shared_max[slot])
            cuda.syncthreads()
            step //= 2
        m = shared_max[gy * T]
        r = float32(1.0) / m if m != 0 else float32(np.inf)
        for i0 in range(start + t * UNROLL, stop, T * UNROLL):
            for j in range(UNROLL):
                if i0 + j < stop:
                    y = float32(load_f32(x, i0 + j, is_bf16) * r)
                    if y != y:  # 0/0, Inf*0 and NaN blocks search as 0.0 (reference rule)
                        y = float32(0.0)
                    codes[i0 + j] = table_code_split(thr, base, y, key_offset, rows128)
        if t == 0 and qb < nblocks:
            absmax[qb] = m
        cuda.syncthreads()


@cuda.jit
def dequantize_blockwise_kernel(codes, code_g, absmax, block_shift, out, is_bf16):
    code = cuda.shared.array(256, float32)
    for i in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
        code[i] = code_g[i]
    cuda.syncthreads()
    n = codes.shape[0]
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i0 in range(start * UNROLL, n, stride * UNROLL):
        for j in range(UNROLL):  # unrolled: UNROLL independent loads in flight
            i = i0 + j
            if i < n:
                v = float32(code[codes[i]] * absmax[i >> block_shift])
                if is_bf16:
                    out[i] = f32_to_bf16_bits(v)
                else:
                    out[i] = v


@functools.lru_cache(maxsize=None)
def _sm_count() -> int:
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's device has no such attribute
        return 1


@functools.lru_cache(maxsize=32)
def _device_table(code_bytes: bytes):
    found = search_table(np.frombuffer(code_bytes, np.float32))
    if found is None:
        return None
    table, emin = found
    thr = cuda.to_device(np.ascontiguousarray(table[:, 0]))
    base = cuda.to_device(table[:, 1].astype(np.uint8))
    return thr, base, emin


def quantize_blockwise(x, dtype: str, code, blocksize: int, codes, absmax, stream=0,
                       threads: int = 256):
    """x (n,) Numba device array -> codes (n,) uint8, absmax (nblocks,) float32, in place."""
    if x.shape[0] == 0:
        return
    found = _device_table(np.ascontiguousarray(code, np.float32).tobytes())
    if found is None:
        raise NotImplementedError("this codebook's midpoints are too close for the GPU search "
                                  "table; use the numpy backend")
    thr, base, emin = found
    per_block = max(1, min(blocksize // 16, threads))  # threads per quantization block
    groups = max(1, threads // per_block)
    # persistent: each CUDA block copies the search table to shared memory once
    grid = min(-(-absmax.shape[0] // groups), 2048 // (per_block * groups) * _sm_count())
    quantize_blockwise_kernel[grid, (per_block, groups), stream](x, dtype == "bfloat16", thr, base,
                                                                (emin - 1) << 7,
                                             (129 - emin) * 128, codes, absmax, blocksize)


def dequantize_blockwise(codes, code, absmax, blocksize: int, dtype: str, out, stream=0,
                         threads: int = 256):
    if codes.shape[0] == 0:
        return
    grid = min(-(-codes.shape[0] // (threads * UNROLL)), 2048 // threads * _sm_count())
    dequantize_blockwise_kernel[grid, threads, stream](codes, code, absmax, blocksize.bit_length() - 1,
                                                       out, dtype == "bfloat16")
