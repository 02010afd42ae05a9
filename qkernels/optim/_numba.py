"""Numba CUDA kernels for the fused Adam/AdamW updates. Reference: reference/optim.py; the
CuPy version: optim.cu beside this file.

optimizer_update_8bit_blockwise_kernel: one CUDA block per 256-element quantization block
(grid-stride over blocks). Pass 1: each thread takes elements start + t, start + t + threads,
... (coalesced), dequantizes m0 = qmap1[state1] * absmax1 and v0 likewise, computes g, m,
v and the new p with every float32 operation rounded once (mul_rn & co.: no FMA), writes
p and keeps m, v in shared memory. A shared-memory tree (no warp shuffles, so the CUDA
simulator runs it) reduces the new absmax of m and v and the count of non-finite
gradients. Pass 2 requantizes m and v through the search table of
reference.blockwise.search_table, with the sign fix for m.
optimizer_update_32bit_kernel: one thread per element, grid-stride.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, int32

from reference.blockwise import search_table
from reference.optim import BLOCKSIZE, AdamScalars
from .._numba_util import (add_rn, div_rn, f32_to_bf16_bits, load_f32, mul_rn, nan_max, sign_bit,
                           sqrt_rn, table_code)

MAX_THREADS = 1024


@cuda.jit(device=True, inline=True)
def _store(x, i, value, is_bf16):
    if is_bf16:
        x[i] = f32_to_bf16_bits(value)
    else:
        x[i] = value


@cuda.jit(device=True, inline=True)
def _finite(x):
    return not (math.isinf(x) or math.isnan(x))


@cuda.jit
def optimizer_update_8bit_blockwise_kernel(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                           table1, key_offset1, rows128_1, table2, key_offset2,
                                           rows128_2, beta1, omb1, beta2, omb2, eps_c2, step_size,
                                           decay, gscale, is_bf16, nonfinite):
    n = p.shape[0]
    sm_m = cuda.shared.array(256, float32)
    sm_v = cuda.shared.array(256, float32)
    red1 = cuda.shared.array(MAX_THREADS, float32)
    red2 = cuda.shared.array(MAX_THREADS, float32)
    redbad = cuda.shared.array(MAX_THREADS, int32)
    t = cuda.threadIdx.x
    threads = cuda.blockDim.x
    gs = gscale[0]
    for qb in range(cuda.blockIdx.x, absmax1.shape[0], cuda.gridDim.x):
        start = qb * 256
        stop = min(start + 256, n)
        a1 = absmax1[qb]
        a2 = absmax2[qb]
        max1 = float32(0.0)
        max2 = float32(0.0)
        bad = 0
        for i in range(start + t, stop, threads):
            gi = mul_rn(load_f32(g, i, is_bf16), gs)
            m0 = mul_rn(qmap1[state1[i]], a1)
            v0 = mul_rn(qmap2[state2[i]], a2)
            m = add_rn(mul_rn(m0, beta1), mul_rn(gi, omb1))
            v = add_rn(mul_rn(v0, beta2), mul_rn(mul_rn(gi, gi), omb2))
            if _finite(gi):
                u = div_rn(m, add_rn(sqrt_rn(v), eps_c2))
                _store(p, i, mul_rn(add_rn(mul_rn(u, step_size), load_f32(p, i, is_bf16)), decay),
                       is_bf16)
            else:  # p unchanged, m = v = 0 (SPEC.md section 11)
                m = float32(0.0)
                v = float32(0.0)
                bad += 1
            sm_m[i - start] = m
            sm_v[i - start] = v
            max1 = nan_max(abs(m), max1)
            max2 = nan_max(abs(v), max2)
        red1[t] = max1
        red2[t] = max2
        redbad[t] = bad
        cuda.syncthreads()
        step = threads // 2
        while step > 0:
            if t < step:
                red1[t] = nan_max(red1[t + step], red1[t])
                red2[t] = nan_max(red2[t + step], red2[t])
                redbad[t] += redbad[t + step]
            cuda.syncthreads()
            step //= 2
        max1 = red1[0]
        max2 = red2[0]
        r1 = div_rn(float32(1.0), max1)  # inf for an all-zero block
        r2 = div_rn(float32(1.0), max2)
        for i in range(start + t, stop, threads):
            m = sm_m[i - start]
            y1 = mul_rn(m, r1)
            if y1 != y1:  # 0/0, Inf*0, NaN: searched as 0.0 (reference.blockwise rule)
                y1 = float32(0.0)
            c = table_code(table1, y1, key_offset1, rows128_1)
            if sign_bit(qmap1[c]) != sign_bit(m):
                c += 1 if m > 0 else -1
            state1[i] = c
            y2 = mul_rn(sm_v[i - start], r2)
            if y2 != y2:
                y2 = float32(0.0)
            state2[i] = table_code(table2, y2, key_offset2, rows128_2)
        if t == 0:
            absmax1[qb] = max1
            absmax2[qb] = max2
            if redbad[0] > 0:
                cuda.atomic.add(nonfinite, 0, redbad[0])
        cuda.syncthreads()


@cuda.jit
def optimizer_update_32bit_kernel(p, g, state1, state2, beta1, omb1, beta2, omb2, eps_c2,
                                  step_size, decay, gscale, update_scale, is_bf16, nonfinite):
    gs = gscale[0]
    scaled_step = mul_rn(update_scale[0], step_size)
    start, stride = cuda.grid(1), cuda.gridsize(1)
    for i in range(start, p.shape[0], stride):
        gi = mul_rn(load_f32(g, i, is_bf16), gs)
        m = add_rn(mul_rn(state1[i], beta1), mul_rn(gi, omb1))
        v = add_rn(mul_rn(state2[i], beta2), mul_rn(mul_rn(gi, gi), omb2))
        if _finite(gi):
            u = div_rn(m, add_rn(sqrt_rn(v), eps_c2))
            _store(p, i, mul_rn(add_rn(mul_rn(u, scaled_step), load_f32(p, i, is_bf16)), decay),
                   is_bf16)
        else:
            m = float32(0.0)
            v = float32(0.0)
            cuda.atomic.add(nonfinite, 0, 1)
        state1[i] = m
        state2[i] = v


@functools.lru_cache(maxsize=16)
def _device_tables(qmap1_bytes: bytes, qmap2_bytes: bytes):
    out = []
    for b in (qmap1_bytes, qmap2_bytes):
        code = np.frombuffer(b, np.float32)
        found = search_table(code)
        if found is None:
            raise NotImplementedError("the optimizer's codebooks have midpoints too close for "
                                      "the GPU search table; use the numpy backend")
        table, emin = found
        out += [cuda.to_device(np.ascontiguousarray(code)), cuda.to_device(np.ascontiguousarray(table)),
                (emin - 1) << 7, (129 - emin) * 128]
    return tuple(out)


def _scalar_array(value, dtype):
    """A (1,) device array: ``value`` itself when it already is one, else a copy of it."""
    if hasattr(value, "copy_to_host") or hasattr(value, "__cuda_array_interface__"):
        return value
    return cuda.to_device(np.array([value], dtype))


def optimizer_update_8bit_blockwise(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                    dtype: str, scalars: AdamScalars, gnorm_scale=None,
                                    nonfinite=None, stream=0, threads: int = 256) -> None:
    """Numba device arrays (flat; bfloat16 as uint16 bits), updated in place. qmap1/qmap2:
    host float32 (256,). gnorm_scale: None, a float or a device float32 (1,) array;
    nonfinite: None or a device int32 (1,) counter."""
    if p.shape[0] == 0:
        return
    q1, t1, k1, r1, q2, t2, k2, r2 = _device_tables(
        np.ascontiguousarray(qmap1, np.float32).tobytes(),
        np.ascontiguousarray(qmap2, np.float32).tobytes())
    s = scalars
    gscale = _scalar_array(s.gnorm_scale if gnorm_scale is None else gnorm_scale, np.float32)
    count = _scalar_array(0, np.int32) if nonfinite is None else nonfinite
    nblocks = -(-p.shape[0] // BLOCKSIZE)
    # a power of two (the reduction tree), no more than one block's elements need
    threads = min(threads, BLOCKSIZE, max(32, 1 << (min(p.shape[0], BLOCKSIZE) - 1).bit_length()))
    optimizer_update_8bit_blockwise_kernel[min(nblocks, 65535), threads, stream](
        p, g, state1, state2, absmax1, absmax2, q1, q2, t1, k1, r1, t2, k2, r2,
        s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps_c2, s.step_size, s.decay,
        gscale, dtype == "bfloat16", count)


def optimizer_update_32bit(p, g, state1, state2, dtype: str, scalars: AdamScalars,
                           gnorm_scale=None, update_scale=None, nonfinite=None, stream=0,
                           threads: int = 256) -> None:
    """Numba device arrays, updated in place; update_scale: None, a float or a device
    float32 (1,) array (max_unorm's factor on the step size)."""
    n = p.shape[0]
    if n == 0:
        return
    s = scalars
    gscale = _scalar_array(s.gnorm_scale if gnorm_scale is None else gnorm_scale, np.float32)
    uscale = _scalar_array(1.0 if update_scale is None else update_scale, np.float32)
    count = _scalar_array(0, np.int32) if nonfinite is None else nonfinite
    grid = min(-(-n // threads), 65535)
    optimizer_update_32bit_kernel[grid, threads, stream](
        p, g, state1, state2, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps_c2,
        s.step_size, s.decay, gscale, uscale, dtype == "bfloat16", count)
