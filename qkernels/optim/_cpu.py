"""Numba CPU kernel for the fused Adam/AdamW update with 8-bit blockwise state. Reference: reference/optim.py.

One pass over the data, parallel over chunks of quantization blocks (256 elements each), as
the CUDA kernels (optim.cu, _numba.py) fuse it: per block, pass 1 dequantizes m0 / v0 from
the codes, computes g, m, v and the new p, every float32 operation rounded once
(``fastmath=False``: no fused multiply-add), writes p and keeps m, v in a small buffer with
their NaN-propagating absmax; pass 2 requantizes m and v with reference.blockwise's
nearest-code rule through its search table (``search_table``: one lookup on the value's high
16 bits and one comparison, the exact rule) and the sign fix for m. p, codes, absmax and the
non-finite count are bit-identical to the reference (docs/FORMATS.md §11).

float16 / bfloat16 parameters are widened to float32 (exact), updated, and rounded back
once with the reference's rule. Codebooks whose midpoints are too close for the search
table run the reference itself.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _numba_cpu  # noqa: F401  (the threading layer, before any kernel runs)

from reference import optim as ref
from reference.blockwise import search_table
from reference.dtypes import bf16_bits_to_float32, float32_to_bf16_bits

BLOCKSIZE = ref.BLOCKSIZE
_BLOCKS_PER_TASK = 32  # quantization blocks per parallel task (8192 elements)
_JIT = dict(parallel=True, fastmath=False, cache=True, error_model="numpy")


@njit(inline="always", cache=True)
def _nearest_code(y, t, k, r, yb, ub):
    """The code index of y = value / absmax (NaN as 0) by the bucket table t (search_table's;
    k, r its bucket offset and rows per sign); yb / ub: a float32 (1,) scratch and its uint32
    view (Numba has no scalar bit cast)."""
    if y != y:
        y = np.float32(0.0)
    yb[0] = y
    u = ub[0]
    h = np.int64((u >> 16) & 0x7FFF) - k
    j = min(max(h, 0), r - 1) + np.int64(u >> 31) * r
    return np.int64(t[j, 1]) + (1 if t[j, 0] < y else 0)


@njit(**_JIT)
def _adam8bit_kernel(p, g, s1, s2, a1, a2, q1, q2, t1, k1, r1, t2, k2, r2, beta1, omb1, beta2,
                     omb2, eps_c2, step_size, decay, gs, bad_out):
    """p, g float32 (n,); s1, s2 uint8 (n,); a1, a2 float32 (nblocks,); q1, q2 float32 (256,)
    codebooks with their search tables t1, t2 ((entries, 2) float32), key offsets k1, k2 and
    row lengths r1, r2; scalars float32; bad_out int64 (tasks,) non-finite counts per task."""
    n = p.shape[0]
    nblocks = a1.shape[0]
    tasks = bad_out.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    for task in prange(tasks):
        mb = np.empty(BLOCKSIZE, np.float32)
        vb = np.empty(BLOCKSIZE, np.float32)
        yb = np.empty(1, np.float32)
        ub = yb.view(np.uint32)
        bad = 0
        last = min((task + 1) * _BLOCKS_PER_TASK, nblocks)
        for qb in range(task * _BLOCKS_PER_TASK, last):
            start = qb * BLOCKSIZE
            end = min(start + BLOCKSIZE, n)
            A1 = a1[qb]
            A2 = a2[qb]
            mx1 = zero
            mx2 = zero
            for i in range(start, end):
                gi = g[i] * gs
                m0 = q1[s1[i]] * A1
                v0 = q2[s2[i]] * A2
                mk = m0 * beta1
                mk = mk + gi * omb1
                gg = gi * gi
                gg = gg * omb2
                vk = v0 * beta2
                vk = vk + gg
                if np.isfinite(gi):
                    d = np.sqrt(vk)
                    d = d + eps_c2
                    u = mk / d
                    u = u * step_size
                    u = u + p[i]
                    p[i] = u * decay
                else:  # p unchanged, m = v = 0
                    mk = zero
                    vk = zero
                    bad += 1
                mb[i - start] = mk
                vb[i - start] = vk
                am = abs(mk)
                if am > mx1 or am != am:
                    mx1 = am
                av = abs(vk)
                if av > mx2 or av != av:
                    mx2 = av
            a1[qb] = mx1
            a2[qb] = mx2
            rc1 = one / mx1
            rc2 = one / mx2
            for i in range(start, end):
                mk = mb[i - start]
                c = _nearest_code(mk * rc1, t1, k1, r1, yb, ub)
                if (np.copysign(one, q1[c]) < zero) != (np.copysign(one, mk) < zero):
                    c = c + 1 if mk > zero else c - 1
                s1[i] = np.uint8(c & 0xFF)
                s2[i] = np.uint8(_nearest_code(vb[i - start] * rc2, t2, k2, r2, yb, ub))
        bad_out[task] = bad


def _table(qmap):
    found = search_table(qmap)
    if found is None:
        return None
    table, emin = found
    return np.ascontiguousarray(table), (emin - 1) << 7, (129 - emin) * 128


def update_8bit_flat(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2,
                     scalars: ref.AdamScalars, dtype: str) -> int:
    """reference.optim.optimizer_update_8bit_blockwise's contract on flat NumPy arrays (p, g
    float32 / float16 / uint16 bfloat16 bits with ``dtype``), in place, on Numba's threads;
    returns the number of non-finite gradient elements."""
    n = p.size
    if n == 0:
        return 0
    q1 = np.ascontiguousarray(qmap1, np.float32)
    q2 = np.ascontiguousarray(qmap2, np.float32)
    tab1, tab2 = _table(q1), _table(q2)
    if tab1 is None or tab2 is None:
        return ref.optimizer_update_8bit_blockwise(p, g, state1, state2, absmax1, absmax2, q1,
                                                   q2, scalars, dtype)
    if dtype == "float32":
        pf, gf = p, g
    elif dtype == "bfloat16":
        pf, gf = bf16_bits_to_float32(p), bf16_bits_to_float32(g)
    else:
        pf, gf = p.astype(np.float32), g.astype(np.float32)
    nblocks = -(-n // BLOCKSIZE)
    bad = np.zeros(-(-nblocks // _BLOCKS_PER_TASK), np.int64)
    s = scalars
    _adam8bit_kernel(pf, gf, state1, state2, absmax1, absmax2, q1, q2, *tab1, *tab2,
                     s.beta1, s.one_minus_beta1, s.beta2, s.one_minus_beta2, s.eps_c2,
                     s.step_size, s.decay, s.gnorm_scale, bad)
    if dtype == "bfloat16":
        p[...] = float32_to_bf16_bits(pf)
    elif dtype != "float32":
        p[...] = pf
    return int(bad.sum())


def optimizer_update_8bit_blockwise(p, g, s1, s2, a1, a2, qmap1, qmap2, name, scalars, nonfinite):
    """The "cpu" entry of qkernels.optim's 8-bit table (the "numpy" entry's arguments: host
    arrays or CPU tensors, contiguous; ``nonfinite`` an int32 (1,) counter or None)."""
    from . import _count_into, _host_view
    count = update_8bit_flat(_host_view(p), _host_view(g), _host_view(s1), _host_view(s2),
                             _host_view(a1), _host_view(a2), qmap1, qmap2, scalars, name)
    _count_into(nonfinite, count)
