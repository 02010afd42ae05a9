"""Numba CUDA kernels for the fused Adam/AdamW updates. Reference: reference/optim.py; the
CuPy version: optim.cu beside this file.

optimizer_update_8bit_blockwise_kernel: one warp per 256-element quantization block, 8
elements per lane at start + lane + 32 * k (coalesced loads), warps of a CUDA block in
step over the blocks (grid-stride). Pass 1 dequantizes m0 = qmap1[state1] * absmax1 and v0
likewise, computes g, m, v and the new p with every float32 operation rounded once
(mul_rn & co.: no FMA), writes p and keeps m, v in registers. A warp reduction gives the
block's new absmax of m and v and the count of non-finite gradients: warp shuffles on the
GPU; under the CUDA simulator (which has no shuffles) shared memory and syncthreads, which
is why the loop over blocks runs the same number of rounds in every warp of a CUDA block.
Pass 2 requantizes m and v through the search table of reference.blockwise.search_table,
with the sign fix for m. Scalars are kernel arguments (float32); nothing is allocated per
launch. Traffic per element as the CuPy kernel's: 2*ES + ES + 2 + 2 bytes.
optimizer_update_32bit_kernel: one thread per element, grid-stride.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from numba import config, cuda, float32, int32, int64

from reference.blockwise import search_table
from reference.optim import BLOCKSIZE, AdamScalars
from .._numba_util import (add_rn, div_rn, f32_to_bf16_bits, load_f32, mul_rn, nan_max, sign_bit,
                           sqrt_rn, table_code)

WARP = 32
PER_LANE = BLOCKSIZE // WARP  # 8 elements of a quantization block per lane
MAX_WARPS = 8                 # threads per CUDA block: 32 .. 256
_ZERO = float32(0.0)
_ONE = float32(1.0)


@cuda.jit(device=True, inline=True)
def _store(x, i, value, is_bf16):
    if is_bf16:
        x[i] = f32_to_bf16_bits(value)
    else:
        x[i] = value


@cuda.jit(device=True, inline=True)
def _finite(x):
    return not (math.isinf(x) or math.isnan(x))


if config.ENABLE_CUDASIM:
    # The simulator runs one Python thread per CUDA thread and has no warp shuffles: the
    # lanes meet in shared memory (every thread of the CUDA block calls these together).
    @cuda.jit(device=True, inline=True)
    def _warp_max(x, scratch, warp, lane):
        scratch[warp, lane] = x
        cuda.syncthreads()
        r = scratch[warp, 0]
        for j in range(1, WARP):
            r = nan_max(scratch[warp, j], r)
        cuda.syncthreads()
        return r

    @cuda.jit(device=True, inline=True)
    def _warp_sum(x, scratch, warp, lane):
        scratch[warp, lane] = x
        cuda.syncthreads()
        r = int64(0)
        for j in range(WARP):
            r += scratch[warp, j]
        cuda.syncthreads()
        return r
else:
    @cuda.jit(device=True, inline=True)
    def _warp_max(x, scratch, warp, lane):
        off = 16
        while off > 0:
            x = nan_max(cuda.shfl_xor_sync(0xFFFFFFFF, x, off), x)
            off //= 2
        return x

    @cuda.jit(device=True, inline=True)
    def _warp_sum(x, scratch, warp, lane):
        off = 16
        while off > 0:
            x += cuda.shfl_xor_sync(0xFFFFFFFF, x, off)
            off //= 2
        return x


@cuda.jit
def optimizer_update_8bit_blockwise_kernel(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                           table1, key_offset1, rows128_1, table2, key_offset2,
                                           rows128_2, beta1, omb1, beta2, omb2, eps_c2, step_size,
                                           decay, gs_value, gs_array, use_gs_array, is_bf16,
                                           nonfinite):
    n = p.shape[0]
    nblocks = absmax1.shape[0]
    lane = int32(cuda.threadIdx.x % WARP)
    warp = int32(cuda.threadIdx.x // WARP)
    warps = int32(cuda.blockDim.x // WARP)
    red_f = cuda.shared.array((MAX_WARPS, WARP), float32)  # simulator reductions only
    red_i = cuda.shared.array((MAX_WARPS, WARP), int64)
    m = cuda.local.array(PER_LANE, float32)
    v = cuda.local.array(PER_LANE, float32)
    gs = gs_array[0] if use_gs_array else gs_value
    for first in range(cuda.blockIdx.x * warps, nblocks, cuda.gridDim.x * warps):
        qb = first + warp
        active = qb < nblocks  # the last round may leave warps idle (they still reduce)
        max1 = _ZERO
        max2 = _ZERO
        bad = int64(0)
        start = qb * BLOCKSIZE + lane
        if active:
            a1 = absmax1[qb]
            a2 = absmax2[qb]
            for k in range(PER_LANE):
                i = start + k * WARP
                mk = _ZERO
                vk = _ZERO
                if i < n:
                    gi = mul_rn(load_f32(g, i, is_bf16), gs)
                    m0 = mul_rn(qmap1[state1[i]], a1)
                    v0 = mul_rn(qmap2[state2[i]], a2)
                    mk = add_rn(mul_rn(m0, beta1), mul_rn(gi, omb1))
                    vk = add_rn(mul_rn(v0, beta2), mul_rn(mul_rn(gi, gi), omb2))
                    if _finite(gi):
                        u = div_rn(mk, add_rn(sqrt_rn(vk), eps_c2))
                        _store(p, i, mul_rn(add_rn(mul_rn(u, step_size), load_f32(p, i, is_bf16)),
                                            decay), is_bf16)
                    else:  # p unchanged, m = v = 0 (docs/FORMATS.md §11.3)
                        mk = _ZERO
                        vk = _ZERO
                        bad += 1
                m[k] = mk
                v[k] = vk
                max1 = nan_max(abs(mk), max1)
                max2 = nan_max(abs(vk), max2)
        max1 = _warp_max(max1, red_f, warp, lane)
        max2 = _warp_max(max2, red_f, warp, lane)
        bad = _warp_sum(bad, red_i, warp, lane)
        if active:
            r1 = div_rn(_ONE, max1)  # inf for an all-zero block
            r2 = div_rn(_ONE, max2)
            for k in range(PER_LANE):
                i = start + k * WARP
                if i < n:
                    y1 = mul_rn(m[k], r1)
                    if y1 != y1:  # 0/0, Inf*0, NaN: searched as 0.0 (reference.blockwise rule)
                        y1 = _ZERO
                    c = table_code(table1, y1, key_offset1, rows128_1)
                    if sign_bit(qmap1[c]) != sign_bit(m[k]):
                        c += 1 if m[k] > _ZERO else -1
                    state1[i] = c
                    y2 = mul_rn(v[k], r2)
                    if y2 != y2:
                        y2 = _ZERO
                    state2[i] = table_code(table2, y2, key_offset2, rows128_2)
            if lane == 0:
                absmax1[qb] = max1
                absmax2[qb] = max2
                if bad > 0:
                    cuda.atomic.add(nonfinite, 0, bad)


@cuda.jit
def optimizer_update_32bit_kernel(p, g, state1, state2, beta1, omb1, beta2, omb2, eps_c2,
                                  step_size, decay, gs_value, gs_array, use_gs_array, us_value,
                                  us_array, use_us_array, is_bf16, nonfinite):
    gs = gs_array[0] if use_gs_array else gs_value
    scaled_step = mul_rn(us_array[0] if use_us_array else us_value, step_size)
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
            m = _ZERO
            v = _ZERO
            cuda.atomic.add(nonfinite, 0, 1)
        state1[i] = m
        state2[i] = v


def _device_id() -> int:
    return getattr(cuda.get_current_device(), "id", 0)  # the simulator's device has no id


@functools.lru_cache(maxsize=16)
def _device_tables(device: int, qmap1_bytes: bytes, qmap2_bytes: bytes):
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


@functools.lru_cache(maxsize=None)
def _placeholders(device: int):
    """Per device, made once: a float32 (1,) array standing in for an absent scale array
    and an int32 (1,) counter for calls that do not count non-finite gradients (no
    allocation, copy or synchronization per launch)."""
    return cuda.to_device(np.ones(1, np.float32)), cuda.to_device(np.zeros(1, np.int32))


def _is_device_array(x) -> bool:
    return hasattr(x, "copy_to_host") or hasattr(x, "__cuda_array_interface__")


def _scale(value, default, placeholder):
    """(float32 value, array, use the array) for a kernel's optional scale argument."""
    if value is not None and _is_device_array(value):
        return np.float32(1.0), value, True
    return np.float32(default if value is None else value), placeholder, False


def optimizer_update_8bit_blockwise(p, g, state1, state2, absmax1, absmax2, *, qmap1, qmap2,
                                    dtype: str, scalars: AdamScalars, gnorm_scale=None,
                                    nonfinite=None, stream=0, threads: int = 256) -> None:
    """Numba device arrays (flat; bfloat16 as uint16 bits), updated in place. qmap1/qmap2:
    host float32 (256,). gnorm_scale: None, a float or a device float32 (1,) array;
    nonfinite: None or a device int32 (1,) counter. threads: a multiple of 32, at most 256."""
    if p.shape[0] == 0:
        return
    if threads % WARP or not WARP <= threads <= WARP * MAX_WARPS:
        raise ValueError(f"threads must be a multiple of 32 from 32 to 256; got {threads}")
    device = _device_id()
    q1, t1, k1, r1, q2, t2, k2, r2 = _device_tables(
        device, np.ascontiguousarray(qmap1, np.float32).tobytes(),
        np.ascontiguousarray(qmap2, np.float32).tobytes())
    ones, counter = _placeholders(device)
    s = scalars
    gs_value, gs_array, use_gs_array = _scale(gnorm_scale, s.gnorm_scale, ones)
    nblocks = -(-p.shape[0] // BLOCKSIZE)
    threads = min(threads, WARP * nblocks)  # no idle warps for small tensors
    warps = threads // WARP
    optimizer_update_8bit_blockwise_kernel[min(-(-nblocks // warps), 65535), threads, stream](
        p, g, state1, state2, absmax1, absmax2, q1, q2, t1, k1, r1, t2, k2, r2,
        s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps_c2, s.step_size, s.decay,
        gs_value, gs_array, use_gs_array, dtype == "bfloat16",
        counter if nonfinite is None else nonfinite)


def optimizer_update_32bit(p, g, state1, state2, *, dtype: str, scalars: AdamScalars,
                           gnorm_scale=None, update_scale=None, nonfinite=None, stream=0,
                           threads: int = 256) -> None:
    """Numba device arrays, updated in place; update_scale: None, a float or a device
    float32 (1,) array (max_unorm's factor on the step size)."""
    n = p.shape[0]
    if n == 0:
        return
    ones, counter = _placeholders(_device_id())
    s = scalars
    gs_value, gs_array, use_gs_array = _scale(gnorm_scale, s.gnorm_scale, ones)
    us_value, us_array, use_us_array = _scale(update_scale, 1.0, ones)
    grid = min(-(-n // threads), 65535)
    optimizer_update_32bit_kernel[grid, threads, stream](
        p, g, state1, state2, s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps_c2,
        s.step_size, s.decay, gs_value, gs_array, use_gs_array, us_value, us_array,
        use_us_array, dtype == "bfloat16", counter if nonfinite is None else nonfinite)
