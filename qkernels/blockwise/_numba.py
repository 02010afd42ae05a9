"""Numba CUDA kernels for blockwise 8-bit quantization. Reference: reference/blockwise.py;
the CuPy version: blockwise.cu beside this file.

Both kernels move the data as uint64 words of raw storage bits (8 bytes: W = 4 float16 /
bfloat16 or 2 float32 values, taken apart with shifts; bfloat16 travels as uint16 bits) and
the matching codes as one W-byte access (uint32 / uint16). The kernel factories below
compile one variant per storage dtype (and, for the quantizer, blocksize), so that W, the
work decomposition and the dtype branches are compile-time constants.

quantize_blockwise_kernel
  in:  xs (n,) raw bits (uint16 or uint32), xw its whole words as uint64; thr float32 /
       base uint8 (entries,): the columns of reference.blockwise.search_table
  out: codes uint8 (n,) (cw: its whole W-byte groups); absmax float32 (ceil(n / BLOCK),)
  A group of G threads owns one quantization block; each thread loads NW words, at word
  k * G + lane of the block (k < NW: the group's k-th loads are contiguous), the group
  reduces the NaN-propagating absmax (group_nan_max: warp shuffles, shared memory across
  warps when G > 32), and each thread writes the W codes of each word with one store.
  Persistent grid: a CTA copies the search table into shared memory once, then walks
  tiles of blockDim / G blocks. Traffic: ES bytes read + 1 written per element, 4 per block.
dequantize_blockwise_kernel
  in:  codes uint8 (n,) (cw: whole W-byte groups), code float32 (256,), absmax float32
  out: y (n,) raw bits (ow: whole words) = code[c] * absmax[block], rounded once
  Each thread turns one W-byte load of codes into one 8-byte store of W values, U words
  per iteration (grid-stride; consecutive threads take consecutive words), so that U
  loads are in flight per thread. Traffic: 1 + ES bytes per element.
Words never straddle a block (W divides every blocksize). Words past the end of the data,
or all of them when an array is not aligned for the wide access (``vec_ok`` false), are
moved value by value (load_word / store_word).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import cuda, float32, uint8, uint32, uint64

from reference.blockwise import search_table
from .._numba_util import (SCRATCH, WORD_ELEMS, cta_size, kernel, load_block_words, load_bytes,
                           quantize_shape, raw_view, sm_count, storage_kind, store_bytes,
                           store_word, table_code_split, value_bits, wide_view, word_value)

QUANTIZE_THREADS = 512  # CTA size bound of the quantizer
DEQUANTIZE_THREADS = 256
MAX_TABLE = 6400  # search-table entries held in shared memory (32 KB): the dynamic maps
U = 4  # words per thread per iteration of the dequantizer


@functools.lru_cache(maxsize=None)
def quantize_blockwise_kernel(kind: int, blocksize: int, table_in_shared: bool):
    """The quantizer for storage ``kind`` and ``blocksize``; the search table is staged in
    shared memory when it fits (MAX_TABLE entries)."""
    W = WORD_ELEMS[kind]
    NW, G = quantize_shape(kind, blocksize)
    WORDS = blocksize // W  # words per quantization block
    CAP = MAX_TABLE if table_in_shared else 1

    @kernel(QUANTIZE_THREADS)
    def quantize_blockwise_kernel(xs, xw, cw, vec_ok, thr_g, base_g, key_lo, key_hi, rows128,
                                  codes, absmax):
        thr_s = cuda.shared.array(CAP, float32)
        base_s = cuda.shared.array(CAP, uint8)
        scratch = cuda.shared.array(SCRATCH, float32)
        t = cuda.threadIdx.x
        if table_in_shared:
            for i in range(t, thr_g.shape[0], cuda.blockDim.x):
                thr_s[i] = thr_g[i]
                base_s[i] = base_g[i]
            cuda.syncthreads()
        thr = thr_s if table_in_shared else thr_g
        base = base_s if table_in_shared else base_g
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
                c = uint32(0)
                for j in range(W):
                    y = float32(word_value(words[k], j, kind) * r)
                    if y != y:  # 0/0, Inf*0 and NaN blocks search as 0.0 (reference rule)
                        y = float32(0.0)
                    code = table_code_split(thr, base, y, key_lo, key_hi, rows128)
                    c |= code << uint32(8 * j)
                store_bytes(codes, cw, vec_ok, w0 + k * G, c, W)
            if lane == 0 and qb < nblocks:
                absmax[qb] = m

    return quantize_blockwise_kernel


@functools.lru_cache(maxsize=None)
def dequantize_blockwise_kernel(kind: int):
    W = WORD_ELEMS[kind]

    @kernel(DEQUANTIZE_THREADS)
    def dequantize_blockwise_kernel(codes, cw, vec_ok, code_g, absmax, block_shift, outs, ow):
        code = cuda.shared.array(256, float32)
        for i in range(cuda.threadIdx.x, 256, cuda.blockDim.x):
            code[i] = code_g[i]
        cuda.syncthreads()
        nwords = (codes.shape[0] + W - 1) // W
        stride = cuda.gridsize(1)
        c = cuda.local.array(U, uint32)
        s = cuda.local.array(U, float32)
        for w0 in range(cuda.grid(1), nwords, stride * U):
            for u in range(U):  # the loads first: U of them in flight
                wi = w0 + u * stride
                c[u] = load_bytes(codes, cw, vec_ok, wi, W)
                s[u] = absmax[(wi * W) >> block_shift] if wi < nwords else float32(0.0)
            for u in range(U):
                word = uint64(0)
                for j in range(W):
                    v = float32(code[(c[u] >> uint32(8 * j)) & uint32(0xFF)] * s[u])
                    word |= uint64(value_bits(v, kind)) << uint64(j * (64 // W))
                store_word(outs, ow, vec_ok, w0 + u * stride, word, W)

    return dequantize_blockwise_kernel


@functools.lru_cache(maxsize=32)
def _device_table(code_bytes: bytes):
    found = search_table(np.frombuffer(code_bytes, np.float32))
    if found is None:
        return None
    table, emin = found
    thr = cuda.to_device(np.ascontiguousarray(table[:, 0]))
    base = cuda.to_device(table[:, 1].astype(np.uint8))
    return thr, base, emin


def _code_groups(kind):
    return np.uint32 if WORD_ELEMS[kind] == 4 else np.uint16


def quantize_blockwise(x, dtype: str, code, blocksize: int, codes, absmax, stream=0,
                       threads: int = QUANTIZE_THREADS):
    """x (n,) Numba device array -> codes (n,) uint8, absmax (nblocks,) float32, in place.
    ``threads``: CTA size (see cta_size)."""
    if x.shape[0] == 0:
        return
    found = _device_table(np.ascontiguousarray(code, np.float32).tobytes())
    if found is None:
        raise NotImplementedError("this codebook's midpoints are too close for the GPU search "
                                  "table; use the numpy backend")
    thr, base, emin = found
    kind = storage_kind(dtype)
    _, g = quantize_shape(kind, blocksize)
    threads = cta_size(threads, g, QUANTIZE_THREADS)
    xs = raw_view(x, kind)
    xw, x_ok = wide_view(xs, np.uint64)
    cw, c_ok = wide_view(codes, _code_groups(kind))
    groups = threads // g
    # persistent: each CTA copies the search table to shared memory once
    grid = min(-(-absmax.shape[0] // groups), 2048 // threads * sm_count())
    k = quantize_blockwise_kernel(kind, blocksize, thr.shape[0] <= MAX_TABLE)
    key_lo, rows128 = (emin - 1) << 7, (129 - emin) * 128
    k[grid, threads, stream](xs, xw, cw, x_ok and c_ok, thr, base, np.uint32(key_lo),
                             np.uint32(key_lo + rows128 - 1), np.uint32(rows128), codes, absmax)


def dequantize_blockwise(codes, code, absmax, blocksize: int, dtype: str, out, stream=0,
                         threads: int = DEQUANTIZE_THREADS):
    if codes.shape[0] == 0:
        return
    kind = storage_kind(dtype)
    threads = -(-min(threads, DEQUANTIZE_THREADS) // 32) * 32
    outs = raw_view(out, kind)
    ow, o_ok = wide_view(outs, np.uint64)
    cw, c_ok = wide_view(codes, _code_groups(kind))
    nwords = -(-codes.shape[0] // WORD_ELEMS[kind])
    grid = min(-(-nwords // (threads * U)), 2048 // threads * sm_count())
    k = dequantize_blockwise_kernel(kind)
    k[grid, threads, stream](codes, cw, o_ok and c_ok, code, absmax, blocksize.bit_length() - 1,
                             outs, ow)
