"""Numba CPU kernels for 4-bit NF4/FP4 and the host matmul_4bit. Reference: reference/fourbit.py.

The "cpu" backend (qkernels/_backend.py): host arrays in, host arrays out, the "numpy"
entries' arguments; packed codes, absmax and dequantized values bit-identical to the
reference (NaN payloads aside, as in qkernels/blockwise/_cpu.py). Work is split into chunks
of whole blocks (``prange``); float16 / bfloat16 inputs are read through a 65536-entry
table; the code of y is ``perm[lo[key] + (thr[key] < y)]`` on y's high 16 bits (the
reference's bucket tables); float16 / bfloat16 outputs are rounded from float32 bits staged
in a per-chunk buffer.

matmul_4bit dequantizes the weight to float32 in parallel (into a buffer reused per thread
and shape) and calls the GEMM of x's library (torch.nn.functional.linear for torch x, NumPy's
matmul otherwise), then rounds once to x's dtype: the reference's computation in another
summation order, within its float64-bounded tolerance.
"""
from __future__ import annotations

import functools
import sys
import threading
import weakref

import numpy as np
from numba import njit, prange

from .. import _numba_cpu  # noqa: F401  (the threading layer, before any kernel runs)
from .._backend import native_bf16_cpu

from reference import fourbit as ref
from ..blockwise._cpu import CHUNK, load_block_bits, round_bits, split_input_bits, split_output

_JIT = dict(parallel=True, fastmath=False, cache=True, error_model="numpy")


@njit(**_JIT)
def _quantize(xu, xh, table_u, use_table, blocksize, lo, thr, perm, packed, absmax):
    n = xh.shape[0] if use_table else xu.shape[0]
    nblocks = absmax.shape[0]
    per = max(1, CHUNK // blocksize)
    for c in prange((nblocks + per - 1) // per):
        # one block's float32 values and their bits (a view: Numba has no scalar bit cast);
        # word blocksize: the odd tail's pad (0.0), word blocksize + 1: the absmax bits
        buf = np.empty(blocksize + 2, np.float32)
        bufu = buf.view(np.uint32)
        for b in range(c * per, min(c * per + per, nblocks)):
            s = b * blocksize
            cnt = min(blocksize, n - s)
            bufu[blocksize + 1] = load_block_bits(xu, xh, table_u, use_table, s, cnt, bufu)
            m = buf[blocksize + 1]
            absmax[b] = m
            r = np.float32(1.0) / m
            for j in range(cnt):
                y = buf[j] * r
                buf[j] = y if y == y else np.float32(0.0)  # 0/0, Inf*0, NaN blocks: 0.0
            bufu[cnt] = np.uint32(0)  # an odd count's pad: the code of 0.0
            k0 = s // 2
            for k in range((cnt + 1) // 2):
                u0 = bufu[2 * k] >> np.uint32(16)
                u1 = bufu[2 * k + 1] >> np.uint32(16)
                r0 = lo[u0] + (thr[u0] < buf[2 * k])
                r1 = lo[u1] + (thr[u1] < buf[2 * k + 1])
                packed[k0 + k] = (perm[r0] << np.uint8(4)) | perm[r1]
    for k in prange((n + 1) // 2, packed.shape[0]):  # quant_storage padding
        packed[k] = 0


@functools.lru_cache(maxsize=None)
def _rank_tables(quant_type: str):
    """(lo uint8 (65536,), thr float32 (65536,), perm uint8 (16,)): the rank of y is
    ``lo[key] + (thr[key] < y)`` with key its high 16 bits (the reference's bucket tables)."""
    lo, thr, _ = ref._bucket_tables(quant_type)
    _, perm = ref.rank_tables(quant_type)
    return (np.ascontiguousarray(lo, np.uint8), np.ascontiguousarray(thr, np.float32),
            np.ascontiguousarray(perm, np.uint8))


def quantize_4bit(x, dtype: str, quant_type: str, blocksize: int, packed, absmax, stream=None):
    """x (n,) float32 / float16 / bfloat16 bits (uint16) -> packed uint8 (>= ceil(n/2),;
    bytes past ceil(n/2) zeroed) and absmax float32 (ceil(n / blocksize),), in place."""
    lo, thr, perm = _rank_tables(quant_type)
    xu, xh, table_u, use_table = split_input_bits(x, dtype)
    _quantize(xu, xh, table_u, use_table, int(blocksize), lo, thr, perm, packed, absmax)


@njit(inline="always", cache=True)
def _scale(b, absmax, nested, qabs, code2, absmax2, offset):
    """Block b's float32 absmax; nested: f32(code2[qabs[b]] * absmax2[b // 256]) + offset,
    reference.blockwise.unnest_absmax's two float32 roundings."""
    if nested:
        return code2[qabs[b]] * absmax2[b // 256] + offset
    return absmax[b]


@njit(**_JIT)
def _dequantize(packed, code, absmax, nested, qabs, code2, absmax2, offset, nblocks, blocksize,
                n, kind, of, oh, pw, ow):
    per = max(1, CHUNK // blocksize)
    half = blocksize // 2
    for c in prange((nblocks + per - 1) // per):
        b0 = c * per
        b1 = min(b0 + per, nblocks)
        if kind == 0:
            for b in range(b0, b1):
                s = _scale(b, absmax, nested, qabs, code2, absmax2, offset)
                k0 = b * half
                if 2 * (k0 + half) <= n:
                    for k in range(k0, k0 + half):
                        v = packed[k]
                        of[2 * k] = code[v >> 4] * s
                        of[2 * k + 1] = code[v & 15] * s
                else:  # the last block, partial
                    for i in range(2 * k0, n):
                        v = np.int64(packed[i >> 1])
                        of[i] = code[(v >> 4) if i % 2 == 0 else (v & 15)] * s
        else:  # 16-bit output: each block's 16 values rounded once, then looked up by nibble
            lut = np.empty(16, np.float32)
            lut_bits = lut.view(np.uint32)
            lut16 = np.empty(16, np.uint64)
            for b in range(b0, b1):
                s = _scale(b, absmax, nested, qabs, code2, absmax2, offset)
                for j in range(16):
                    lut[j] = code[j] * s
                    lut16[j] = np.uint64(round_bits(lut_bits[j], kind))
                k0 = b * half
                k1 = k0 + half
                if 2 * k1 <= n and half % 8 == 0 and k1 <= 8 * pw.shape[0] and 2 * k1 <= 4 * ow.shape[0]:
                    # 8 packed bytes (16 values) a load, 4 values a store
                    for w in range(k0 // 8, k1 // 8):
                        v = pw[w]
                        for q in range(4):
                            lo = (v >> np.uint64(16 * q)) & np.uint64(0xFF)
                            hi = (v >> np.uint64(16 * q + 8)) & np.uint64(0xFF)
                            ow[4 * w + q] = (lut16[lo >> np.uint64(4)]
                                             | (lut16[lo & np.uint64(15)] << np.uint64(16))
                                             | (lut16[hi >> np.uint64(4)] << np.uint64(32))
                                             | (lut16[hi & np.uint64(15)] << np.uint64(48)))
                else:
                    for i in range(2 * k0, min(2 * k1, n)):
                        v = np.int64(packed[i >> 1])
                        oh[i] = np.uint16(lut16[(v >> 4) if i % 2 == 0 else (v & 15)])


_NO_U8 = np.empty(0, np.uint8)
_NO_F32 = np.empty(0, np.float32)
_NO_U64 = np.empty(0, np.uint64)
_LITTLE = sys.byteorder == "little"


def dequantize_4bit(packed, code, absmax, blocksize: int, dtype: str, out, nested=None, stream=None):
    """packed uint8 (>= ceil(n/2),), code float32 (16,), absmax float32 (nblocks,) -> out (n,)
    of dtype (bfloat16 as uint16 bits) = code[nibble] * absmax[block], rounded once.
    ``nested = (qabsmax uint8, code2 float32 (256,), absmax2 float32, offset float32 (1,))``
    replaces absmax (pass None): each block's scale is dequantized first (blocks of 256)."""
    assert ref.NESTED_BLOCKSIZE == 256  # _scale's constant
    if nested is None:
        absmax = np.ascontiguousarray(absmax, np.float32)
        args = (absmax, False, _NO_U8, _NO_F32, _NO_F32, np.float32(0), absmax.shape[0])
    else:
        qabs, code2, absmax2, offset = nested
        args = (_NO_F32, True, qabs, np.ascontiguousarray(code2, np.float32),
                np.ascontiguousarray(absmax2, np.float32),
                np.float32(np.asarray(offset).reshape(-1)[0]), qabs.shape[0])
    of, oh, kind = split_output(out, dtype)
    n = out.shape[0]
    if dtype == "bfloat16" and _bf16_lookup_fits(packed, oh, int(blocksize)):
        # whole blocks by the AVX-512 lookup (_cpu_gemv.dequantize_bf16, the same bits); the
        # last, partial block (if any) below, with the unnested absmax
        from . import _cpu_gemv
        scales = absmax if nested is None else _unnest_to_f32(*nested)
        full = n // blocksize
        half = blocksize // 2
        _cpu_gemv.dequantize_bf16(packed, code, scales[:full], int(blocksize), oh[:full * blocksize].view(np.uint32))
        if full == scales.shape[0] or n == full * blocksize:
            return
        packed, oh, n = packed[full * half:], oh[full * blocksize:], n - full * blocksize
        args = (np.ascontiguousarray(scales[full:]), False, _NO_U8, _NO_F32, _NO_F32, np.float32(0), 1)
    # 16-bit output, 8-byte aligned: the packed bytes and the output as little-endian uint64 words
    pw, ow = _NO_U64, _NO_U64
    if (kind and _LITTLE and oh.ctypes.data % 8 == 0 and packed.ctypes.data % 8 == 0
            and packed.flags.c_contiguous):
        pw = packed[:packed.shape[0] // 8 * 8].view(np.uint64)
        ow = oh[:n // 4 * 4].view(np.uint64)
    _dequantize(packed, np.ascontiguousarray(code, np.float32), *args, int(blocksize), n,
                kind, of, oh, pw, ow)


def _bf16_lookup_fits(packed, oh, blocksize: int) -> bool:
    from . import _cpu_gemv
    return (blocksize % 32 == 0 and _LITTLE and oh.ctypes.data % 4 == 0 and packed.flags.c_contiguous
            and _cpu_gemv.available())


def _unnest_to_f32(qabs, code2, absmax2, offset) -> np.ndarray:
    """Nested statistics -> float32 (nblocks,) block absmax (``_scale``'s two roundings)."""
    out = np.empty(qabs.shape[0], np.float32)
    _unnest(np.ascontiguousarray(qabs).reshape(-1), np.ascontiguousarray(code2, np.float32).reshape(-1),
            np.ascontiguousarray(absmax2, np.float32).reshape(-1), np.float32(np.asarray(offset).reshape(-1)[0]),
            out)
    return out


_buffers = threading.local()


def _weight_buffer(size: int, dtype: str) -> np.ndarray:
    """A (size,) scratch array kept per thread and dtype (float32, or bfloat16 as uint16 bits),
    so that a layer's per-call dequantized weight reuses its pages (a fresh multi-MB array
    costs page faults at every call)."""
    buf = getattr(_buffers, dtype, None)
    if buf is None or buf.shape[0] != size:
        buf = np.empty(size, np.float32 if dtype == "float32" else np.uint16)
        setattr(_buffers, dtype, buf)
    return buf


def _dequantize_weight(w, dtype: str = "float32") -> np.ndarray:
    """W (N, K) of a fourbit.HostWeight4bit as float32, or bfloat16 bits (uint16), in the
    thread's scratch buffer."""
    buf = _weight_buffer(w.N * w.K, dtype)
    dequantize_4bit(w.pk, w.code, _block_absmax(w.state), w.blocksize, dtype, buf)
    return buf.reshape(w.N, w.K)


@njit(**_JIT)
def _unnest(qabs, code2, absmax2, offset, out):
    for b in prange(out.shape[0]):
        out[b] = _scale(b, _NO_F32, True, qabs, code2, absmax2, offset)


# id(state.absmax) -> (weak reference to that tensor of nested codes, the identity and version
# of the state's three statistics tensors and the offset's value, float32 absmax); keyed by
# the tensor, not the QuantState, as the declared op builds a new state at every call; the
# entry goes when the tensor does
_UNNESTED: dict = {}


def _block_absmax(state) -> np.ndarray:
    """The state's per-block absmax as float32 (nblocks,): as stored, or unnested (``_scale``).
    The unnested array of a state whose statistics are torch tensors is kept beside them
    (an eighth of the packed weight's bytes; 84 us of a 4096 x 4096 decode call otherwise)
    and made again when any of them is replaced or written in place (torch's version counter)
    or the offset's value changes; NumPy statistics and inference-mode tensors have no version
    counter, so they are unnested at every call."""
    from .._interop import _to_numpy
    if state.state2 is None:
        return np.ascontiguousarray(_to_numpy(state.absmax), np.float32).reshape(-1)
    s2 = state.state2
    parts = (state.absmax, s2.code, s2.absmax, state.offset)
    key = None
    if all(hasattr(t, "_version") and not t.is_inference() for t in parts[:3]):
        # (inference tensors keep no version counter: those are unnested at every call)
        key = tuple((id(t), t._version, t.data_ptr()) for t in parts[:3]) + (float(parts[3]),)
        kept = _UNNESTED.get(id(state.absmax))
        if kept is not None and kept[0]() is state.absmax and kept[1] == key:
            return kept[2]
    offset = state.offset
    offset = np.float32(float(offset.reshape(-1)[0]) if hasattr(offset, "shape") else offset)
    out = _unnest_to_f32(_to_numpy(state.absmax), _to_numpy(s2.code), _to_numpy(s2.absmax), offset)
    if key is not None:
        sid = id(state.absmax)
        _UNNESTED[sid] = (weakref.ref(state.absmax, lambda _, sid=sid: _UNNESTED.pop(sid, None)), key, out)
    return out


def matmul_prepared(w, x, bias, normal: bool = True):
    """``x @ W^T + bias`` (``normal``; else ``x @ W + bias``) for torch x on the host and a
    fourbit.HostWeight4bit w; the result (..., out) in x's dtype.

    Up to _cpu_gemv.MAX_ROWS rows on an AVX-512 CPU (``normal`` only): the fused kernel of
    _cpu_gemv (float32, W never written out). bfloat16 x on a CPU with native bfloat16
    (``_backend.native_bf16_cpu``): W dequantized to bfloat16 and torch's bfloat16 linear (float32
    accumulation, one rounding), the same operation as the CUDA route "dequantize + cuBLAS";
    about 3x faster than float32 there. Every other x: W dequantized to float32 and the
    product in float32, rounded once to x's dtype."""
    import torch
    from . import _cpu_gemv
    N, K = w.N, w.K
    x = x.detach()
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if normal and _cpu_gemv.fits(rows, N, K, w.blocksize):
        x32 = x.reshape(rows, K).to(torch.float32).numpy()
        y = torch.from_numpy(_cpu_gemv.gemv_4bit(x32, w.pk, w.code, _block_absmax(w.state), w.blocksize, N))
        if bias is not None:
            y += bias.detach().reshape(-1).to(torch.float32)
        y = y.reshape(*x.shape[:-1], N)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    bf16 = x.dtype == torch.bfloat16 and native_bf16_cpu()
    wt = torch.from_numpy(_dequantize_weight(w, "bfloat16" if bf16 else "float32"))
    wt = wt.view(torch.bfloat16) if bf16 else wt
    wt = wt if normal else wt.T
    cd = wt.dtype
    xc = x if x.dtype == cd else x.to(cd)
    b = None if bias is None else bias.detach().reshape(-1).to(cd)
    y = torch.nn.functional.linear(xc, wt, b)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def matmul_4bit(x, packed, state, bias, normal: bool):
    """``x @ W^T + bias`` (``normal``; else ``x @ W + bias``); x host torch or NumPy (..., in),
    the result (..., out) of x's kind and dtype. Torch x: ``matmul_prepared``. NumPy x: the
    fused few-row kernel where it fits (``normal``), else W dequantized to float32 and the
    product in float32 (W used as stored when not ``normal``); rounded once to x's dtype."""
    from .._interop import dtype_of, kind_of
    from reference.dtypes import from_float32, to_float32
    from . import HostWeight4bit, _cpu_gemv, _host_float
    w = HostWeight4bit(packed, state)
    if kind_of(x) == "torch":
        return matmul_prepared(w, x, bias, normal)
    in_f = w.K if normal else w.N
    out_f = w.N if normal else w.K
    x32, _ = to_float32(np.ascontiguousarray(_host_float(x)))
    x32 = x32.reshape(-1, in_f)
    if normal and _cpu_gemv.fits(x32.shape[0], w.N, w.K, w.blocksize):
        y = _cpu_gemv.gemv_4bit(x32, w.pk, w.code, _block_absmax(w.state), w.blocksize, w.N)
    else:
        wd = _dequantize_weight(w)
        y = x32 @ (wd.T if normal else wd)
    if bias is not None:
        b32, _ = to_float32(np.ascontiguousarray(_host_float(bias).reshape(-1)))
        y = y + b32
    return from_float32(y.astype(np.float32), dtype_of(x)).reshape(*x.shape[:-1], out_f)
