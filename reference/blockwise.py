"""Blockwise 8-bit dynamic quantization, the NumPy oracle (docs/FORMATS.md §2).

GPU versions: qkernels/blockwise/blockwise.cu (CuPy) and qkernels/blockwise/_numba.py.

    quantize_blockwise(A, code=None, blocksize=4096, nested=False) -> (codes, QuantState)
    dequantize_blockwise(codes, state, out_dtype=None) -> array of state.dtype, codes' shape

Per block of ``blocksize`` consecutive elements of the flattened input (the last block
may be partial): ``absmax = max |x|`` in float32, ``y = f32(x * f32(1 / absmax))`` and the
code is ``#{i : mid_i < y}`` over the float32 midpoints of the sorted codebook (the nearest
value; a tie goes to the lower index). Dequantization is ``f32(code[c] * absmax)``.

Special values (docs/FORMATS.md §12): ``absmax`` propagates NaN (NaN if the block holds a
NaN, else +Inf if it holds an infinity). A NaN ``y`` (0/0 in an all-zero block, Inf*0,
anything in a NaN block) is searched as 0.0, so an all-zero block stores the code of 0.0
and dequantizes to zeros, and a block with NaN or Inf dequantizes to NaN (for codebooks
holding 0.0) while every other block is untouched.

Nested statistics (``nested=True``): the offset is the float32 mean of the *finite* absmax
values (0 when none is), so NaN/Inf never reach the offset and all-zero blocks still
dequantize to zeros. A non-finite absmax stays non-finite in its nested block (blocks of
``blocksize`` absmax values sharing one scale): every block of that nested block then
dequantizes to NaN. No finite code of bitsandbytes' nested format can stand for NaN, so this
is the narrowest the damage can be without turning the special block into finite values;
the rest of the tensor is unaffected (the 4-bit path's rule, reference/fourbit.py).
"""
from __future__ import annotations

import functools

import numpy as np

from .codebooks import dynamic_map, midpoints
from .dtypes import dtype_name, check_float_dtype, from_float32, to_float32
from .state import QuantState

__all__ = [
    "BLOCKSIZES", "check_blockwise_args", "check_code", "quantize_blockwise",
    "dequantize_blockwise", "quantize_blockwise_f32", "dequantize_blockwise_f32",
    "nearest_code", "search_table", "finite_mean", "nest_absmax", "unnest_absmax",
    "nested_offset", "check_nested_flag",
]

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# Elements per vectorized step: large enough that the Python overhead vanishes, small
# enough that every temporary stays in the CPU's L2 (this is 3x faster than whole-array
# passes on 2^24 elements).
_CHUNK = 1 << 16


def check_blockwise_args(dtype, blocksize: int, blocksizes=BLOCKSIZES) -> str:
    """Validate a blockwise call's dtype and blocksize; returns the dtype's name."""
    name = dtype_name(dtype)
    check_float_dtype(name, "A")
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
            or int(blocksize) not in blocksizes:
        raise ValueError(f"blocksize must be one of {', '.join(map(str, blocksizes))}; "
                         f"got {blocksize!r}")
    return name


def check_code(code, n: int = 256, argname: str = "code") -> np.ndarray:
    """A codebook as float32 (n,), checked to be finite and sorted ascending."""
    c = np.asarray(code)
    if c.shape != (n,):
        raise ValueError(f"{argname} must have shape ({n},); got {c.shape}")
    c = c.astype(np.float32)
    if not np.all(np.isfinite(c)):
        raise ValueError(f"{argname} must be finite")
    if np.any(np.diff(c) < 0):
        raise ValueError(f"{argname} must be sorted ascending")
    return c


def _range_thresholds(mid: np.ndarray, vmin: np.ndarray, vmax: np.ndarray):
    """For value ranges [vmin, vmax]: (base, thresholds) with, for every y in a range,
    ``#{i : mid_i < y} = base + sum_k (thresholds[k] < y)``."""
    lo = np.searchsorted(mid, vmin, "left")
    hi = np.searchsorted(mid, vmax, "left")
    padded = np.append(mid, np.float32(np.inf)).astype(np.float32)
    thresholds = []
    for k in range(int((hi - lo).max(initial=0))):
        t = padded[np.minimum(lo + k, len(mid))]
        t[lo + k >= hi] = np.inf
        thresholds.append(t.astype(np.float32))
    return lo.astype(np.uint8), tuple(thresholds)


@functools.lru_cache(maxsize=16)
def _bucket_tables(code_bytes: bytes):
    """Tables for the nearest-code search keyed by the high 16 bits of float32 ``y``: bucket
    b holds every float whose bit pattern starts with b. One threshold per bucket suffices
    for the built-in maps; closer midpoints add thresholds (and time), never errors."""
    mid = midpoints(np.frombuffer(code_bytes, dtype=np.float32))
    b = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    ends = np.stack([b.view(np.float32), (b | np.uint32(0xFFFF)).view(np.float32)])
    # buckets past the infinities hold only NaN, never searched (NaN y is replaced by 0)
    ends = np.where(np.isnan(ends), np.copysign(np.float32(np.inf), ends), ends)
    return _range_thresholds(mid, ends.min(0), ends.max(0))


@functools.lru_cache(maxsize=16)
def _search_table_cached(code_bytes: bytes):
    mid = midpoints(np.frombuffer(code_bytes, dtype=np.float32))
    if np.abs(mid).max() >= 2.0:
        return None
    nonzero = np.abs(mid[mid != 0])
    emin = max(1, int(nonzero.min().view(np.uint32) >> np.uint32(23))) if nonzero.size else 1
    rows = 128 - emin + 1                      # exponent rows emin-1 (underflow) .. 127
    key = np.arange(rows * 128, dtype=np.uint32) + np.uint32((emin - 1) << 7)
    lo_mag = (key << np.uint32(16)).view(np.float32)
    hi_mag = ((key << np.uint32(16)) | np.uint32(0xFFFF)).view(np.float32)
    lo_mag[:128] = 0.0                          # the underflow row: every |y| < 2^(emin-127)
    hi_mag[:128] = np.nextafter(np.float32(2.0 ** (emin - 127)), np.float32(0))
    hi_mag[-1] = np.inf                         # the last bucket: everything above
    vmin = np.concatenate([lo_mag, -hi_mag])
    vmax = np.concatenate([hi_mag, -lo_mag])
    base, thresholds = _range_thresholds(mid, vmin, vmax)
    if len(thresholds) > 1:
        return None
    thr = thresholds[0] if thresholds else np.full(vmin.shape, np.inf, np.float32)
    table = np.stack([thr, base.astype(np.float32)], axis=1).astype(np.float32)
    table.setflags(write=False)
    return table, emin


def search_table(code: np.ndarray):
    """The GPU kernels' nearest-code table for a sorted 256-entry code, or None when two
    midpoints are too close for it (the GPU backends then fall back to NumPy).

    Returns (table float32 (2 * rows * 128, 2) of (threshold, base) pairs, emin). The entry
    of float32 y with bits u: ``h = (u >> 16) & 0x7FFF`` (exponent and 7 mantissa bits),
    ``i = clamp(h - ((emin - 1) << 7), 0, rows * 128 - 1) + (u >> 31) * rows * 128`` with
    ``rows = 129 - emin``; the code is ``base + (threshold < y)``. Exponents below emin (no
    midpoint but 0.0 lives there) share the first row, exponents above 127 the last entry.
    """
    return _search_table_cached(np.ascontiguousarray(code, np.float32).tobytes())


def nearest_code(y: np.ndarray, code: np.ndarray) -> np.ndarray:
    """``#{i : mid_i < y}`` (uint8) for float32 ``y`` (any shape, no NaN) and a sorted
    256-entry code: one table lookup on y's high 16 bits plus one comparison."""
    base, thresholds = _bucket_tables(np.ascontiguousarray(code, np.float32).tobytes())
    bucket = np.right_shift(np.ascontiguousarray(y, np.float32).view(np.uint32),
                            np.uint32(16)).astype(np.intp)
    out = np.take(base, bucket, mode="wrap")
    for t in thresholds:
        out += np.take(t, bucket, mode="wrap") < y
    return out


def _quantize_blocks(xb: np.ndarray, code: np.ndarray, codes: np.ndarray, absmax: np.ndarray):
    """Quantize full blocks ``xb`` (nblocks, blocksize) float32 into ``codes``/``absmax``."""
    # NaN propagates; + 0.0 turns the -0.0 of an all-zero block into +0.0
    absmax[:] = np.maximum(xb.max(axis=1), -xb.min(axis=1)) + np.float32(0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rcp = np.float32(1.0) / absmax
        y = xb * rcp[:, None]
    odd = ~(np.isfinite(rcp) & np.isfinite(absmax))  # zero, tiny, NaN or Inf blocks: NaN y
    if odd.any():
        y[odd] = np.where(np.isnan(y[odd]), np.float32(0.0), y[odd])
    codes[:] = nearest_code(y, code)


def quantize_blockwise_f32(x: np.ndarray, code: np.ndarray, blocksize: int):
    """Core of quantize_blockwise on flat float32 ``x``: returns (codes uint8 (n,), absmax (nblocks,))."""
    n = x.size
    nblocks = -(-n // blocksize)
    codes = np.empty(n, dtype=np.uint8)
    absmax = np.empty(nblocks, dtype=np.float32)
    nfull = n // blocksize
    rows = max(1, _CHUNK // blocksize)
    full = x[: nfull * blocksize].reshape(nfull, blocksize)
    cfull = codes[: nfull * blocksize].reshape(nfull, blocksize)
    afull = absmax[:nfull]
    for r in range(0, nfull, rows):
        _quantize_blocks(full[r:r + rows], code, cfull[r:r + rows], afull[r:r + rows])
    if nfull < nblocks:
        tail = x[nfull * blocksize:].reshape(1, -1)
        _quantize_blocks(tail, code, codes[nfull * blocksize:].reshape(1, -1), absmax[nfull:])
    return codes, absmax


def dequantize_blockwise_f32(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray,
                             blocksize: int) -> np.ndarray:
    """Core of dequantize_blockwise on flat uint8 ``codes``: float32 (n,) = code[c] * absmax."""
    n = codes.size
    out = np.empty(n, dtype=np.float32)
    nfull = n // blocksize
    rows = max(1, _CHUNK // blocksize)
    code = np.asarray(code, dtype=np.float32)
    absmax = np.asarray(absmax, dtype=np.float32)
    full = codes[: nfull * blocksize].reshape(nfull, blocksize)
    ofull = out[: nfull * blocksize].reshape(nfull, blocksize)
    afull = absmax[:nfull, None]
    with np.errstate(invalid="ignore"):  # 0 * Inf in a block that held an infinity
        _dequantize_blocks(full, afull, code, ofull, rows)
        if nfull * blocksize < n:
            out[nfull * blocksize:] = code[codes[nfull * blocksize:].astype(np.intp)] * absmax[nfull]
    return out


def _dequantize_blocks(full, afull, code, ofull, rows):
    for r in range(0, full.shape[0], rows):
        np.multiply(np.take(code, full[r:r + rows].astype(np.intp)), afull[r:r + rows],
                    out=ofull[r:r + rows])


def quantize_blockwise(A, code=None, blocksize: int = 4096, nested: bool = False):
    """Blockwise 8-bit quantization.

    A: float16 / bfloat16 / float32 array of any shape (bfloat16 as ml_dtypes.bfloat16).
    code: sorted float32 (256,) codebook; default the signed dynamic map.
    Returns (codes uint8 with A's shape, QuantState with absmax float32 (ceil(n/blocksize),)).
    With ``nested=True`` the absmax vector is itself quantized (offset = the mean of its
    finite values, the signed dynamic map, the same blocksize) and ``state.absmax`` holds
    its uint8 codes (see the module doc for NaN/Inf blocks).
    """
    A = np.asarray(A)
    name = check_blockwise_args(A.dtype, blocksize)
    check_nested_flag(nested)
    code = dynamic_map(True) if code is None else check_code(code)
    x, _ = to_float32(np.ascontiguousarray(A))
    codes, absmax = quantize_blockwise_f32(x.reshape(-1), code, int(blocksize))
    state = QuantState(absmax=absmax, shape=A.shape, code=code, dtype=name,
                       blocksize=int(blocksize))
    if nested:
        state = nest_absmax(state, int(blocksize))
    return codes.reshape(A.shape), state


def check_nested_flag(nested) -> None:
    """``nested`` must be a bool (a truthy string or array would nest by accident)."""
    if not isinstance(nested, (bool, np.bool_)):
        raise TypeError(f"nested must be a bool; got {nested!r}")


def finite_mean(absmax: np.ndarray) -> np.float32:
    """f32(mean) of the finite values of a float32 absmax vector (any shape); 0 when none
    is finite. The nested offset: NaN/Inf blocks must not move the other blocks' scales."""
    a = np.asarray(absmax, dtype=np.float32).reshape(-1)
    finite = a[np.isfinite(a)]
    return np.float32(finite.mean(dtype=np.float64)) if finite.size else np.float32(0)


def nest_absmax(state: QuantState, blocksize: int) -> QuantState:
    """Quantize ``state.absmax`` (float32 (nblocks,)) with the signed dynamic map in blocks of
    ``blocksize`` around ``offset = finite_mean(absmax)``; absmax becomes uint8 codes,
    ``state.offset`` a float and ``state.state2`` the nested (float32) state."""
    absmax = np.asarray(state.absmax, dtype=np.float32)
    offset = finite_mean(absmax)
    qabs, state2 = quantize_blockwise(absmax - offset, blocksize=blocksize)
    state.absmax, state.offset, state.state2 = qabs, float(offset), state2
    return state


def nested_offset(state: QuantState, argname: str = "state") -> np.float32:
    """A nested state's offset as float32; ValueError when it is missing (None would turn
    every block into NaN), TypeError when it is not a number or a one-element array."""
    offset = state.offset
    if offset is None:
        raise ValueError(f"{argname}.offset is None but {argname} is nested ({argname}.state2 "
                         "is set): a nested state needs the float offset its absmax was "
                         "quantized around")
    if isinstance(offset, (bool, np.bool_)) or not (
            isinstance(offset, (int, float, np.integer, np.floating))
            or (hasattr(offset, "shape") and hasattr(offset, "dtype")
                and int(np.prod(offset.shape)) == 1)):
        raise TypeError(f"{argname}.offset must be a number or a one-element array; got "
                        f"{type(offset).__name__}")
    return np.float32(float(offset.reshape(-1)[0]) if hasattr(offset, "shape") else offset)


def unnest_absmax(state: QuantState) -> np.ndarray:
    """float32 absmax of a state, dequantizing the nested statistics if present."""
    if state.state2 is None:
        return np.asarray(state.absmax, dtype=np.float32)
    s2 = state.state2
    offset = nested_offset(state)
    return dequantize_blockwise_f32(np.asarray(state.absmax).reshape(-1), s2.absmax, s2.code,
                                    s2.blocksize) + offset


def dequantize_blockwise(codes, state: QuantState, out_dtype=None):
    """Inverse of quantize_blockwise: ``code[codes] * absmax[block]`` in float32, cast once to
    ``out_dtype`` (default ``state.dtype``), codes' shape."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"codes must be uint8; got {codes.dtype}")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState; got {type(state).__name__}")
    absmax = unnest_absmax(state)
    nblocks = -(-codes.size // state.blocksize)
    if absmax.size != nblocks:
        raise ValueError(f"state has {absmax.size} blocks but codes of size {codes.size} with "
                         f"blocksize {state.blocksize} need {nblocks}")
    name = dtype_name(out_dtype) if out_dtype is not None else state.dtype
    out = dequantize_blockwise_f32(codes.reshape(-1), absmax, state.code, state.blocksize)
    return from_float32(out, name).reshape(codes.shape)
