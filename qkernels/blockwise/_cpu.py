"""Numba CPU kernels for blockwise 8-bit quantization. Reference: reference/blockwise.py.

The "cpu" backend (qkernels/_backend.py): host arrays in, host arrays out, the "numpy"
entries' arguments; codes, absmax and dequantized values bit-identical to the reference
(NaN payloads aside: the reference's NumPy reductions return any NaN of a block).

Work is split into chunks of whole blocks (about CHUNK elements), one ``prange`` iteration
each, with a float32 buffer of its own read through a uint32 view (Numba has no scalar bit
cast): the absmax is a max over the bits of |x|, the nearest-code search keys on the high
16 bits of ``y`` (the reference's bucket tables), and float16 / bfloat16 results are
rounded from the float32 bits.

Also the shared helpers of qkernels/fourbit/_cpu.py: the float16 / bfloat16 -> float32
tables (``input_table``) and the float32 -> float16 / bfloat16 rounding (``round_bits``).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .. import _numba_cpu  # noqa: F401  (the threading layer, before any kernel runs)

from reference.blockwise import _bucket_tables
from reference.dtypes import bf16_bits_to_float32

CHUNK = 1 << 14  # elements per parallel work item (its buffer stays in L1/L2)
_JIT = dict(parallel=True, fastmath=False, cache=True, error_model="numpy")
KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}
_NO_U16 = np.empty(0, np.uint16)
_NO_F32 = np.empty(0, np.float32)
_NO_U32 = np.empty(0, np.uint32)


@functools.lru_cache(maxsize=None)
def input_table(dtype: str) -> np.ndarray:
    """float32 (65536,): the value of each float16 / bfloat16 bit pattern, as the reference
    converts it (NumPy's astype for float16, the bit shift for bfloat16)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    if dtype == "float16":
        table = bits.view(np.float16).astype(np.float32)
    else:
        table = bf16_bits_to_float32(bits)
    table.setflags(write=False)
    return table


def split_input_bits(x, dtype: str):
    """(float32 bits (uint32) or empty, uint16 bits or empty, uint32 table, use_table)."""
    if dtype == "float32":
        return x.view(np.uint32), _NO_U16, _NO_U32, False
    return _NO_U32, x.view(np.uint16), input_table(dtype).view(np.uint32), True


def split_output(out, dtype: str):
    """(float32 view or empty, uint16 bits or empty, kind) of a flat output."""
    if dtype == "float32":
        return out, _NO_U16, 0
    return _NO_F32, out.view(np.uint16), KINDS[dtype]


# round_bits and load_block_bits are inlined into the 4-bit kernels (fourbit/_cpu.py) too.
# Numba's disk cache checks only the caching function's own file, so after editing them here,
# touch fourbit/_cpu.py (or clear its __pycache__) or it keeps the old code (an installed
# package replaces every file at once, so users are not affected).
@njit(inline="always", cache=True)
def round_bits(u, kind):
    """float32 bit pattern ``u`` rounded (nearest, ties to even) to float16 (kind 1) or
    bfloat16 (kind 2) bits. bfloat16 is reference.dtypes.float32_to_bf16_bits; float16 is
    IEEE rounding (NumPy's astype), NaN as a quiet NaN of the same sign."""
    if kind == 2:
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return np.uint16((u >> np.uint32(16)) | np.uint32(0x0040))
        return np.uint16((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))))
                         >> np.uint32(16))
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF)))
    if a >= np.uint32(0x477FF000):  # 65520 and above round to infinity
        return np.uint16(sign | np.uint32(0x7C00))
    if a < np.uint32(0x38800000):  # below 2^-14: a float16 subnormal (or zero)
        e = a >> np.uint32(23)
        s = np.uint32(126) - e
        if s > np.uint32(24):
            return np.uint16(sign)
        m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        r = m >> s
        rem = m & ((np.uint32(1) << s) - np.uint32(1))
        half = np.uint32(1) << (s - np.uint32(1))
        if rem > half or (rem == half and (r & np.uint32(1)) != 0):
            r += np.uint32(1)
        return np.uint16(sign | r)
    r = (a >> np.uint32(13)) - np.uint32(112 << 10)
    rem = a & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (r & np.uint32(1)) != 0):
        r += np.uint32(1)
    return np.uint16(sign | r)


@njit(inline="always", cache=True)
def load_block_bits(xu, xh, table_u, use_table, s, cnt, bufu):
    """Copy the float32 bits of x[s:s+cnt] into bufu[:cnt] (16-bit input through its
    widening table) and return the bits of max |x| over them: NaN-propagating, as for
    non-negative floats the bit order is the value order and NaN bits exceed all others
    (which NaN: as undefined as NumPy's reductions make it in the reference)."""
    mask = np.uint32(0x7FFFFFFF)
    mu = np.uint32(0)
    if use_table:
        for i in range(cnt):
            u = table_u[xh[s + i]]
            bufu[i] = u
            mu = max(mu, u & mask)
    else:
        for i in range(cnt):
            u = xu[s + i]
            bufu[i] = u
            mu = max(mu, u & mask)
    return mu


@njit(**_JIT)
def _quantize(xu, xh, table_u, use_table, blocksize, base, thr, codes, absmax):
    n = codes.shape[0]
    nblocks = absmax.shape[0]
    per = max(1, CHUNK // blocksize)
    nthr = thr.shape[0]
    for c in prange((nblocks + per - 1) // per):
        # one block's float32 values, and their bits through a view (Numba has no scalar
        # bit cast); the word past them carries the absmax bits
        buf = np.empty(blocksize + 1, np.float32)
        bufu = buf.view(np.uint32)
        for b in range(c * per, min(c * per + per, nblocks)):
            s = b * blocksize
            cnt = min(blocksize, n - s)
            bufu[cnt] = load_block_bits(xu, xh, table_u, use_table, s, cnt, bufu)
            m = buf[cnt]
            absmax[b] = m
            r = np.float32(1.0) / m
            for j in range(cnt):
                y = buf[j] * r
                buf[j] = y if y == y else np.float32(0.0)  # 0/0, Inf*0, NaN blocks: 0.0
            if nthr == 1:
                t0 = thr[0]
                for j in range(cnt):
                    key = bufu[j] >> np.uint32(16)
                    codes[s + j] = base[key] + (t0[key] < buf[j])
            else:
                for j in range(cnt):
                    key = bufu[j] >> np.uint32(16)
                    y = buf[j]
                    q = np.int32(base[key])
                    for k in range(nthr):
                        q += thr[k, key] < y
                    codes[s + j] = np.uint8(q)


@functools.lru_cache(maxsize=16)
def _tables(code_bytes: bytes):
    base, thresholds = _bucket_tables(code_bytes)
    thr = (np.stack(thresholds) if thresholds else np.empty((0, base.size), np.float32))
    return base, np.ascontiguousarray(thr, np.float32)


def quantize_blockwise(x, dtype: str, code, blocksize: int, codes, absmax, stream=None):
    """x (n,) float32 / float16 / bfloat16 bits (uint16) -> codes uint8 (n,) and absmax
    float32 (ceil(n / blocksize),), in place."""
    base, thr = _tables(np.ascontiguousarray(code, np.float32).tobytes())
    xu, xh, table_u, use_table = split_input_bits(x, dtype)
    _quantize(xu, xh, table_u, use_table, int(blocksize), base, thr, codes, absmax)


@njit(**_JIT)
def _dequantize(codes, code, absmax, blocksize, kind, of, oh):
    n = codes.shape[0]
    nblocks = absmax.shape[0]
    per = max(1, CHUNK // blocksize)
    for c in prange((nblocks + per - 1) // per):
        b0 = c * per
        off = b0 * blocksize
        if kind == 0:
            for b in range(b0, min(b0 + per, nblocks)):
                s = absmax[b]
                for i in range(b * blocksize, min(b * blocksize + blocksize, n)):
                    of[i] = code[codes[i]] * s
        else:
            buf = np.empty(per * blocksize, np.float32)
            bits = buf.view(np.uint32)
            end = min(off + per * blocksize, n)
            for b in range(b0, min(b0 + per, nblocks)):
                s = absmax[b]
                for i in range(b * blocksize, min(b * blocksize + blocksize, n)):
                    buf[i - off] = code[codes[i]] * s
            for i in range(off, end):
                oh[i] = round_bits(bits[i - off], kind)


def dequantize_blockwise(codes, code, absmax, blocksize: int, dtype: str, out, stream=None):
    """codes uint8 (n,), code float32 (256,), absmax float32 (nblocks,) -> out (n,) of dtype
    (bfloat16 as uint16 bits) = code[c] * absmax[block], rounded once."""
    of, oh, kind = split_output(out, dtype)
    _dequantize(codes, np.ascontiguousarray(code, np.float32), np.ascontiguousarray(absmax, np.float32),
                int(blocksize), kind, of, oh)
