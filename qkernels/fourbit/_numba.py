"""Numba CUDA kernels for 4-bit NF4/FP4 quantization. Reference: reference/fourbit.py; the
CuPy version: fourbit.cu beside this file.

Both kernels move the values as uint64 words of raw storage bits (8 bytes: W = 4 float16 /
bfloat16 or 2 float32 values; bfloat16 travels as uint16 bits) and the matching W / 2
packed bytes as one access (uint16 / uint8). Packing: element 2k in the high nibble of byte
k, 2k + 1 in the low nibble; an odd count pads the last low nibble with the code of 0.0
(what a zero loaded past n encodes to). The kernel factories below compile one variant per
storage dtype (and blocksize for the quantizer, nesting for the dequantizer), so that the
work decomposition and the dtype branches are compile-time constants.

quantize_4bit_kernel
  in:  xs (n,) raw bits, xw its whole words as uint64; thr float32 (16,) and perm uint8 (16,)
       of reference.fourbit.rank_tables (thr padded with +inf)
  out: packed uint8 (ceil(n/2),) (pw: its whole W/2-byte groups); absmax float32 (nblocks,)
  The blockwise quantizer's decomposition (see blockwise/_numba.py): a group of G threads
  per quantization block, NW words per thread at word k * G + lane (coalesced), absmax by
  group_nan_max, persistent grid walking tiles of blockDim / G blocks; each word becomes
  W / 2 packed bytes in one store. The code is ``perm[#{i : thr_i < y}]`` over the 15 sorted
  signed thresholds (NF4: midpoints, identity perm; FP4: bitsandbytes' literals mirrored,
  see the reference), a 4-step binary search in shared memory. Traffic per element: ES bytes
  read + 1/2 written, plus 4 bytes per block.
dequantize_4bit_kernel
  in:  packed uint8 (>= ceil(n/2),), code float32 (16,), absmax float32 (nblocks,) or, when
       nested, qabsmax uint8 (nblocks,) + code2 float32 (256,) + absmax2 float32
       (ceil(nblocks / 256),) + offset float32 (1,): scale = f32(f32(code2[q] * absmax2) + offset)
  out: y (n,) raw bits (ow: whole words) = code[nibble] * scale, rounded once
  Each thread turns one W/2-byte load of packed bytes into one 8-byte store of W values,
  U words per iteration (grid-stride; consecutive threads take consecutive words).
  Traffic per element: 1/2 byte read + ES written.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, uint8, uint32, uint64

from reference.fourbit import rank_tables
from .._numba_util import (F32, SCRATCH, WORD_ELEMS, add_rn, cta_size, device_function, kernel,
                           load_block_words, load_bytes, mul_rn, quantize_shape, raw_view,
                           sm_count, storage_kind, store_bytes, store_word, value_bits, wide_view,
                           word_value)

QUANTIZE_THREADS = 512  # CTA size bound of the quantizer
DEQUANTIZE_THREADS = 256
U = 4  # words per thread per iteration of the dequantizer
NESTED_BLOCK_SHIFT = 8  # nested absmax statistics come in blocks of 256


@device_function
def rank_code(thr, perm, y):
    """``perm[#{i : thr[i] < y}]`` for 15 sorted thresholds; NaN y is coded as 0.0."""
    if y != y:
        y = float32(0.0)
    c = uint32(8) if y > thr[7] else uint32(0)
    c += uint32(4) if y > thr[c + uint32(3)] else uint32(0)
    c += uint32(2) if y > thr[c + uint32(1)] else uint32(0)
    c += uint32(1) if y > thr[c] else uint32(0)
    return uint32(perm[c])


@functools.lru_cache(maxsize=None)
def quantize_4bit_kernel(kind: int, blocksize: int):
    W = WORD_ELEMS[kind]
    NW, G = quantize_shape(kind, blocksize)
    WORDS = blocksize // W  # words per quantization block

    @kernel(QUANTIZE_THREADS)
    def quantize_4bit_kernel(xs, xw, pw, vec_ok, thr_g, perm_g, packed, absmax):
        thr = cuda.shared.array(16, float32)
        perm = cuda.shared.array(16, uint8)
        scratch = cuda.shared.array(SCRATCH, float32)
        t = cuda.threadIdx.x
        if t < 16:
            thr[t] = thr_g[t]
            perm[t] = perm_g[t]
        cuda.syncthreads()
        nblocks = absmax.shape[0]
        groups = cuda.blockDim.x // G
        lane = t % G
        words = cuda.local.array(NW, uint64)
        # uniform per CTA: every thread reaches load_block_words' barriers equally often
        for tile in range(cuda.blockIdx.x, (nblocks + groups - 1) // groups, cuda.gridDim.x):
            qb = tile * groups + t // G
            w0 = qb * WORDS + lane
            m, r = load_block_words(xs, xw, vec_ok, w0, words, G, W, kind, scratch)
            for k in range(NW):
                b = uint32(0)
                for p in range(W // 2):
                    hi = rank_code(thr, perm, float32(word_value(words[k], 2 * p, kind) * r))
                    lo = rank_code(thr, perm, float32(word_value(words[k], 2 * p + 1, kind) * r))
                    b |= ((hi << uint32(4)) | lo) << uint32(8 * p)
                store_bytes(packed, pw, vec_ok, w0 + k * G, b, W // 2)
            if lane == 0 and qb < nblocks:
                absmax[qb] = m

    return quantize_4bit_kernel


@functools.lru_cache(maxsize=None)
def dequantize_4bit_kernel(kind: int, nested: bool):
    W = WORD_ELEMS[kind]
    CODE2 = 256 if nested else 1

    @kernel(DEQUANTIZE_THREADS)
    def dequantize_4bit_kernel(packed, pw, vec_ok, code_g, absmax, qabs, code2_g, absmax2, offset,
                               block_shift, outs, ow):
        code = cuda.shared.array(16, float32)
        code2 = cuda.shared.array(CODE2, float32)
        t = cuda.threadIdx.x
        if t < 16:
            code[t] = code_g[t]
        if nested:
            for i in range(t, 256, cuda.blockDim.x):
                code2[i] = code2_g[i]
        cuda.syncthreads()
        nwords = (outs.shape[0] + W - 1) // W
        stride = cuda.gridsize(1)
        b = cuda.local.array(U, uint32)
        s = cuda.local.array(U, float32)
        for w0 in range(cuda.grid(1), nwords, stride * U):
            for u in range(U):  # the loads first: U of them in flight
                wi = w0 + u * stride
                b[u] = load_bytes(packed, pw, vec_ok, wi, W // 2)
                s[u] = float32(0.0)
                if wi < nwords:
                    qb = (wi * W) >> block_shift
                    if nested:  # rounded twice, as the reference (no fused multiply-add)
                        s[u] = add_rn(mul_rn(code2[qabs[qb]], absmax2[qb >> NESTED_BLOCK_SHIFT]),
                                      offset[0])
                    else:
                        s[u] = absmax[qb]
            for u in range(U):
                word = uint64(0)
                for j in range(W):  # value j: the high nibble of its byte when j is even
                    v = float32(code[(b[u] >> uint32(4 * (j ^ 1))) & uint32(15)] * s[u])
                    word |= uint64(value_bits(v, kind)) << uint64(j * (64 // W))
                store_word(outs, ow, vec_ok, w0 + u * stride, word, W)

    return dequantize_4bit_kernel


@functools.lru_cache(maxsize=4)
def _device_tables(quant_type: str):
    thr, perm = rank_tables(quant_type)
    return cuda.to_device(np.append(thr, np.float32(np.inf))), cuda.to_device(perm)


def _pair_groups(kind):
    """Packed bytes of one word (W / 2) as one unsigned integer."""
    return np.uint16 if WORD_ELEMS[kind] == 4 else np.uint8


def quantize_4bit(x, dtype: str, quant_type: str, blocksize: int, packed, absmax, stream=0,
                  threads: int = QUANTIZE_THREADS):
    """x (n,) Numba device array -> packed uint8 (>= ceil(n/2),), absmax float32, in place;
    packed bytes past ceil(n/2) (quant_storage padding) are zeroed. ``threads``: CTA size
    (see cta_size)."""
    n = x.shape[0]
    m = (n + 1) // 2
    if packed.shape[0] > m:
        packed[m:].copy_to_device(np.zeros(packed.shape[0] - m, np.uint8), stream=stream)
    if n == 0:
        return
    thr, perm = _device_tables(quant_type)
    kind = storage_kind(dtype)
    _, g = quantize_shape(kind, blocksize)
    threads = cta_size(threads, g, QUANTIZE_THREADS)
    xs = raw_view(x, kind)
    xw, x_ok = wide_view(xs, np.uint64)
    if packed.shape[0] > m:
        packed = packed[:m]  # the kernel writes whole words' bytes up to its end
    pw, p_ok = (packed, True) if kind == F32 else wide_view(packed, _pair_groups(kind))
    grid = min(-(-absmax.shape[0] // (threads // g)), 2048 // threads * sm_count())
    k = quantize_4bit_kernel(kind, blocksize)
    k[grid, threads, stream](xs, xw, pw, x_ok and p_ok, thr, perm, packed, absmax)


def dequantize_4bit(packed, code, absmax, blocksize: int, dtype: str, out, nested=None, stream=0,
                    threads: int = DEQUANTIZE_THREADS):
    """packed uint8 (>= ceil(n/2),), code float32 (16,), absmax float32 (nblocks,) -> out (n,).
    ``nested = (qabsmax, code2, absmax2, offset (1,))`` replaces absmax (pass None): the
    kernel dequantizes each block's scale itself (nested blocksize 256)."""
    n = out.shape[0]
    if n == 0:
        return
    kind = storage_kind(dtype)
    threads = -(-min(threads, DEQUANTIZE_THREADS) // 32) * 32
    outs = raw_view(out, kind)
    ow, o_ok = wide_view(outs, np.uint64)
    pw, p_ok = (packed, True) if kind == F32 else wide_view(packed, _pair_groups(kind))
    if nested is None:  # placeholders of the nested arguments' types
        qabs, code2, absmax2, offset = packed, code, code, code
    else:
        qabs, code2, absmax2, offset = nested
        absmax = code
    nwords = -(-n // WORD_ELEMS[kind])
    grid = min(-(-nwords // (threads * U)), 2048 // threads * sm_count())
    k = dequantize_4bit_kernel(kind, nested is not None)
    k[grid, threads, stream](packed, pw, o_ok and p_ok, code, absmax, qabs, code2, absmax2, offset,
                             blocksize.bit_length() - 1, outs, ow)
