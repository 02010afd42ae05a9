"""4-bit quantization (NF4 / FP4), double quantization and matmul_4bit: the NumPy oracle
(docs/FORMATS.md §3, §4 and §12).

GPU versions: qkernels/fourbit/fourbit.cu (CuPy) and qkernels/fourbit/_numba.py.

    quantize_4bit(A, blocksize=64, quant_type="fp4", compress_statistics=False,
                  quant_storage="uint8") -> (packed, QuantState)
    dequantize_4bit(packed, state, out_dtype=None) -> array of state.dtype, state.shape
    matmul_4bit(x, packed, state, bias=None) = x @ dequantize_4bit(packed, state).T + bias

Per block of ``blocksize`` consecutive elements of the flattened input (the last block may
be partial): ``absmax = max |x|`` in float32, ``y = f32(x * f32(1 / absmax))``.
- NF4: the code is ``#{i : t_i < y}`` over the 15 float32 midpoints of the NF4 values
  (nearest value; a tie goes to the lower code).
- FP4: bitsandbytes' CUDA rule (docs/FORMATS.md §4.3): sign bit 8 when ``y < 0``, three
  magnitude bits from comparisons of ``|y|`` with seven float32 literals.
Both are computed here as a *rank* ``#{s_i < y}`` over 15 sorted signed thresholds followed
by a rank -> code permutation (the identity for NF4). For FP4 the thresholds are the
literals mirrored to the negative side, each moved one float32 step down (``|y| > t`` is
``y < -t``, i.e. ``y <= nextbelow(-t)`` ... ``nextbelow(-t) < y`` selects the smaller
magnitude) plus the largest negative float (``y < 0`` sets the sign; -0.0 does not).

Packing: element 2k in the high nibble, 2k+1 in the low nibble of byte k; an odd count
pads the last low nibble with the code of 0.0 (NF4 7, FP4 0). ``packed`` has shape
``(ceil(n/2), 1)`` uint8, or with a ``quant_storage`` of itemsize s the same bytes (zero
padded) viewed as ``(ceil(ceil(n/2)/s), 1)`` of that dtype.

Special values (docs/FORMATS.md §12), as in reference/blockwise.py: ``absmax`` propagates
NaN (NaN if the block holds a NaN, else +Inf if it holds an infinity); a NaN ``y`` (0/0 in
an all-zero block, Inf*0, anything in a NaN block) is coded as 0.0. So an all-zero block
stores the code of 0.0 and dequantizes to zeros, and a block holding NaN or Inf
dequantizes to NaN while every other block is untouched. With ``compress_statistics`` the
nested offset is the mean of the *finite* absmax values, so a NaN/Inf block spreads only
to the nested block of 256 absmax values it shares (they dequantize to NaN), never to the
rest of the tensor; plain 4-bit keeps the damage inside the block.
"""
from __future__ import annotations

import functools
import warnings

import numpy as np

from .blockwise import quantize_blockwise, unnest_absmax
from .codebooks import fp4_map, midpoints, nf4_map
from .dtypes import check_float_dtype, dtype_name, from_float32, to_float32
from .state import QuantState

__all__ = [
    "BLOCKSIZES_4BIT", "QUANT_TYPES", "NESTED_BLOCKSIZE", "FP4_THRESHOLDS", "STORAGE_DTYPES",
    "check_4bit_args", "check_4bit_state", "code_4bit", "rank_tables",
    "quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4",
    "dequantize_nf4", "dequantize_fp4", "quantize_4bit_f32", "dequantize_4bit_f32",
    "pack_storage", "packed_bytes", "nest_absmax_4bit", "matmul_4bit",
]

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
# bitsandbytes' FP4 decision literals (float32), ascending: |y| above t_k selects the
# next-larger magnitude. Not all are exact midpoints of the FP4 values.
FP4_THRESHOLDS = np.array([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667,
                           0.583333, 0.8333333], dtype=np.float32)
# FP4 magnitude bits in ascending order of value: 0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1
_FP4_MAG_ORDER = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], np.uint8)
# quant_storage dtypes (any dtype bnb stores packed weights in) and their itemsize
STORAGE_DTYPES = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2,
                  "float32": 4, "int32": 4, "uint32": 4, "float64": 8, "int64": 8, "uint64": 8}
_ZERO_CODE = {"nf4": 7, "fp4": 0}
_CHUNK = 1 << 16  # elements per vectorized step (keeps temporaries in L2)


# --- arguments ---------------------------------------------------------------------------

def check_4bit_args(dtype, blocksize, quant_type, argname: str = "A") -> str:
    """Validate a 4-bit call's dtype, blocksize and quant_type; returns the dtype's name."""
    name = dtype_name(dtype)
    check_float_dtype(name, argname)
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    return name


def check_blocksize(blocksize, argname: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) \
            or int(blocksize) not in BLOCKSIZES_4BIT:
        raise ValueError(f"{argname} must be one of {', '.join(map(str, BLOCKSIZES_4BIT))}; "
                         f"got {blocksize!r}")
    return int(blocksize)


def check_quant_type(quant_type, argname: str = "quant_type") -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"{argname} must be 'nf4' or 'fp4'; got {quant_type!r}")
    return quant_type


def check_storage(quant_storage) -> str:
    """Canonical name of a quant_storage dtype (NumPy, torch or a name)."""
    name = dtype_name(quant_storage)
    if name not in STORAGE_DTYPES:
        raise TypeError(f"quant_storage must be one of {', '.join(STORAGE_DTYPES)}; got {name}")
    return name


def packed_bytes(n: int) -> int:
    """Bytes of packed 4-bit data for n elements."""
    return (int(n) + 1) // 2


def check_4bit_state(state, packed_shape, packed_dtype, argname: str = "state") -> int:
    """Check that ``state`` describes a packed tensor of this shape and dtype (any
    orientation: only its byte count matters). Returns the element count n."""
    if not isinstance(state, QuantState):
        raise TypeError(f"{argname} must be a QuantState; got {type(state).__name__}")
    check_quant_type(state.quant_type, f"{argname}.quant_type")
    check_blocksize(state.blocksize, f"{argname}.blocksize")
    check_float_dtype(dtype_name(state.dtype), f"{argname}.dtype")
    if state.shape is None:
        raise ValueError(f"{argname}.shape must be the original tensor's shape; got None")
    n = int(np.prod(state.shape, dtype=np.int64))
    sname = dtype_name(packed_dtype)
    if sname not in STORAGE_DTYPES:
        raise TypeError(f"packed must hold uint8 (or a quant_storage dtype: "
                        f"{', '.join(STORAGE_DTYPES)}); got {sname}")
    have = int(np.prod(packed_shape, dtype=np.int64)) * STORAGE_DTYPES[sname]
    need = packed_bytes(n)
    if have != -(-need // STORAGE_DTYPES[sname]) * STORAGE_DTYPES[sname]:
        raise ValueError(f"packed holds {have} bytes ({tuple(packed_shape)} {sname}) but "
                         f"{argname}.shape {tuple(state.shape)} needs {need}")
    nblocks = -(-n // int(state.blocksize))
    got = int(np.prod(state.absmax.shape))
    if got != nblocks:
        raise ValueError(f"{argname}.absmax has {got} blocks but {n} elements with blocksize "
                         f"{state.blocksize} need {nblocks}")
    if tuple(state.code.shape) != (16,):
        raise ValueError(f"{argname}.code must have shape (16,); got {tuple(state.code.shape)}")
    s2 = state.state2
    if s2 is not None:
        if int(s2.blocksize) != NESTED_BLOCKSIZE:
            raise ValueError(f"{argname}.state2.blocksize must be {NESTED_BLOCKSIZE}; got {s2.blocksize}")
        need = -(-nblocks // NESTED_BLOCKSIZE)
        if int(np.prod(s2.absmax.shape)) != need:
            raise ValueError(f"{argname}.state2.absmax (the nested absmax) has "
                             f"{int(np.prod(s2.absmax.shape))} values; {nblocks} blocks need {need}")
        if tuple(s2.code.shape) != (256,):
            raise ValueError(f"{argname}.state2.code (the nested quant_map) must have shape (256,); "
                             f"got {tuple(s2.code.shape)}")
    return n


def code_4bit(quant_type: str) -> np.ndarray:
    """The 16-value codebook of a quant_type (index = 4-bit code)."""
    return nf4_map() if check_quant_type(quant_type) == "nf4" else fp4_map()


# --- the code search ---------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _signed_thresholds(quant_type: str):
    """(15 sorted float32 thresholds s, rank -> code uint8 (16,)) with code = perm[#{s < y}]."""
    if quant_type == "nf4":
        return midpoints(nf4_map()), np.arange(16, dtype=np.uint8)
    neg = np.nextafter(-FP4_THRESHOLDS[::-1], np.float32(-np.inf)).astype(np.float32)
    tiny = np.nextafter(np.float32(0), np.float32(-1))  # -1.4e-45: y < 0 <=> y <= tiny
    s = np.concatenate([neg, [tiny], FP4_THRESHOLDS]).astype(np.float32)
    perm = np.concatenate([8 | _FP4_MAG_ORDER[::-1], _FP4_MAG_ORDER]).astype(np.uint8)
    return s, perm


def rank_tables(quant_type: str):
    """(thresholds float32 (15,), perm uint8 (16,)): code of y = ``perm[#{t : t < y}]``.
    Used by the Numba kernels and the bucket tables below."""
    return _signed_thresholds(check_quant_type(quant_type))


@functools.lru_cache(maxsize=None)
def _bucket_tables(quant_type: str):
    """Search tables keyed by the high 16 bits of float32 y: every float with those bits
    lies between at most one threshold, so ``rank = base[key] + (thr[key] < y)``.
    Also the 256-entry byte table applying the rank -> code permutation to a packed pair."""
    s, perm = _signed_thresholds(quant_type)
    key = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    ends = np.stack([key.view(np.float32), (key | np.uint32(0xFFFF)).view(np.float32)])
    # the buckets of +-Inf also hold NaNs, never searched (a NaN y is coded as 0.0)
    ends = np.where(np.isnan(ends), np.copysign(np.float32(np.inf), ends), ends)
    lo = np.searchsorted(s, ends.min(0), "left")
    hi = np.searchsorted(s, ends.max(0), "left")
    assert (hi - lo).max() <= 1, "two thresholds in one bucket"
    thr = np.where(hi > lo, np.append(s, np.inf)[lo], np.float32(np.inf)).astype(np.float32)
    pair = np.arange(256, dtype=np.uint16)
    byte_perm = ((perm[pair >> 4].astype(np.uint16) << 4) | perm[pair & 15]).astype(np.uint8)
    return lo.astype(np.uint8), thr, byte_perm


def _pack_ranks(y: np.ndarray, quant_type: str) -> np.ndarray:
    """Packed bytes of float32 ``y`` (rows, even length) with no NaN."""
    base, thr, byte_perm = _bucket_tables(quant_type)
    key = np.right_shift(y.view(np.uint32), np.uint32(16))
    rank = np.take(base, key)
    rank += np.take(thr, key) < y
    packed = rank[..., 0::2] << np.uint8(4)
    packed |= rank[..., 1::2]
    if quant_type != "nf4":
        packed = np.take(byte_perm, packed)
    return packed


def _quantize_rows(xb: np.ndarray, quant_type: str, absmax: np.ndarray) -> np.ndarray:
    """Quantize blocks ``xb`` (rows, blocksize) float32; fills absmax, returns packed bytes."""
    absmax[:] = np.abs(xb).max(axis=1)  # NaN propagates
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rcp = np.float32(1.0) / absmax
        y = xb * rcp[:, None]
    odd = ~(np.isfinite(rcp) & np.isfinite(absmax))  # zero, tiny, NaN or Inf blocks
    if odd.any():
        y[odd] = np.where(np.isnan(y[odd]), np.float32(0.0), y[odd])
    if y.shape[1] % 2:
        y = np.concatenate([y, np.zeros((y.shape[0], 1), np.float32)], axis=1)
    return _pack_ranks(y, quant_type)


def quantize_4bit_f32(x: np.ndarray, quant_type: str, blocksize: int):
    """Core of quantize_4bit on flat float32 ``x``: (packed uint8 (ceil(n/2),), absmax
    float32 (nblocks,))."""
    n = x.size
    nblocks = -(-n // blocksize)
    packed = np.empty(packed_bytes(n), dtype=np.uint8)
    absmax = np.empty(nblocks, dtype=np.float32)
    nfull = n // blocksize
    rows = max(1, _CHUNK // blocksize)
    full = x[: nfull * blocksize].reshape(nfull, blocksize)
    pfull = packed[: nfull * blocksize // 2].reshape(nfull, blocksize // 2)
    afull = absmax[:nfull]
    for r in range(0, nfull, rows):
        pfull[r:r + rows] = _quantize_rows(full[r:r + rows], quant_type, afull[r:r + rows])
    if nfull < nblocks:
        tail = x[nfull * blocksize:].reshape(1, -1)
        packed[nfull * blocksize // 2:] = _quantize_rows(tail, quant_type, absmax[nfull:]).reshape(-1)
    return packed, absmax


@functools.lru_cache(maxsize=8)
def _pair_table(code_bytes: bytes) -> np.ndarray:
    """uint64 (256,): byte b -> the float32 pair (code[b >> 4], code[b & 15]) in memory order."""
    code = np.frombuffer(code_bytes, np.float32)
    b = np.arange(256)
    pairs = np.stack([code[b >> 4], code[b & 15]], axis=1).astype(np.float32)
    return np.ascontiguousarray(pairs).view(np.uint64).reshape(256)


def dequantize_4bit_f32(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray,
                        blocksize: int, n: int) -> np.ndarray:
    """Core of dequantize_4bit: flat uint8 bytes (>= ceil(n/2)) -> float32 (n,) =
    code[nibble] * absmax[block]."""
    table = _pair_table(np.ascontiguousarray(code, np.float32).tobytes())
    m = packed_bytes(n)
    out = np.empty(2 * m, dtype=np.float32)
    out64 = out.view(np.uint64)
    absmax = np.asarray(absmax, dtype=np.float32)
    nfull = n // blocksize
    rows = max(1, _CHUNK // blocksize)
    half = blocksize // 2
    with np.errstate(invalid="ignore"):  # 0 * Inf in a block that held an infinity
        for r in range(0, nfull, rows):
            stop = min(r + rows, nfull)
            np.take(table, packed[r * half:stop * half], out=out64[r * half:stop * half])
            block = out[r * blocksize:stop * blocksize].reshape(stop - r, blocksize)
            np.multiply(block, absmax[r:stop, None], out=block)
        if nfull * blocksize < n:
            np.take(table, packed[nfull * half:m], out=out64[nfull * half:])
            out[nfull * blocksize:] *= absmax[nfull]
    return out[:n]


def pack_storage(packed: np.ndarray, quant_storage: str) -> np.ndarray:
    """Packed bytes (m,) viewed as ``(ceil(m / s), 1)`` elements of quant_storage (zero padded)."""
    s = STORAGE_DTYPES[quant_storage]
    if s > 1 and packed.size % s:
        packed = np.concatenate([packed, np.zeros(s - packed.size % s, np.uint8)])
    if quant_storage == "uint8":
        return packed.reshape(-1, 1)
    if quant_storage == "bfloat16":
        from .dtypes import numpy_bfloat16
        return packed.view(np.uint16).view(numpy_bfloat16()).reshape(-1, 1)
    return packed.view(quant_storage).reshape(-1, 1)


def _as_bytes(packed) -> np.ndarray:
    p = np.ascontiguousarray(packed)
    return p.reshape(-1).view(np.uint8)


# --- public ops -----------------------------------------------------------------------------

def nest_absmax_4bit(state: QuantState) -> QuantState:
    """Double quantization: ``state.absmax`` quantized with the signed dynamic map in blocks
    of 256 around ``offset = f32(mean)`` of its finite values; absmax becomes uint8 codes."""
    absmax = np.asarray(state.absmax, np.float32)
    finite = absmax[np.isfinite(absmax)]
    offset = np.float32(finite.mean(dtype=np.float64)) if finite.size else np.float32(0)
    qabs, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    state.absmax, state.offset, state.state2 = qabs, float(offset), state2
    return state


def quantize_4bit(A, blocksize: int = 64, quant_type: str = "fp4",
                  compress_statistics: bool = False, quant_storage="uint8"):
    """4-bit NF4/FP4 quantization.

    A: float16 / bfloat16 / float32 array of any shape (bfloat16 as ml_dtypes.bfloat16).
    Returns (packed (ceil(n/2), 1) uint8 -- or quant_storage elements, see the module doc --,
    QuantState(absmax float32 (ceil(n/blocksize),), shape=A.shape, code=the 16 values,
    dtype, blocksize, quant_type)). ``compress_statistics=True`` nests absmax (blocks of 256).
    """
    A = np.asarray(A)
    name = check_4bit_args(A.dtype, blocksize, quant_type)
    storage = check_storage(quant_storage)
    x, _ = to_float32(np.ascontiguousarray(A))
    packed, absmax = quantize_4bit_f32(x.reshape(-1), quant_type, int(blocksize))
    state = QuantState(absmax=absmax, shape=tuple(A.shape), code=code_4bit(quant_type).copy(),
                       dtype=name, blocksize=int(blocksize), quant_type=quant_type)
    if compress_statistics:
        nest_absmax_4bit(state)
    return pack_storage(packed, storage), state


def dequantize_4bit(packed, state: QuantState, out_dtype=None):
    """Inverse of quantize_4bit: ``code[nibble] * absmax[block]`` in float32 (absmax
    dequantized first when nested), rounded once to ``out_dtype`` (default state.dtype),
    shaped ``state.shape``. ``packed`` may be (m, 1), (1, m) or flat, of any quant_storage."""
    packed = np.asarray(packed)
    n = check_4bit_state(state, packed.shape, packed.dtype)
    name = dtype_name(out_dtype) if out_dtype is not None else dtype_name(state.dtype)
    check_float_dtype(name, "out_dtype")
    absmax = unnest_absmax(state)
    out = dequantize_4bit_f32(_as_bytes(packed), absmax, np.asarray(state.code, np.float32),
                              int(state.blocksize), n)
    return from_float32(out, name).reshape(state.shape)


def quantize_nf4(A, blocksize: int = 64, compress_statistics: bool = False, quant_storage="uint8"):
    return quantize_4bit(A, blocksize, "nf4", compress_statistics, quant_storage)


def quantize_fp4(A, blocksize: int = 64, compress_statistics: bool = False, quant_storage="uint8"):
    return quantize_4bit(A, blocksize, "fp4", compress_statistics, quant_storage)


def dequantize_nf4(packed, state: QuantState, out_dtype=None):
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 needs an nf4 state; got quant_type {state.quant_type!r}")
    return dequantize_4bit(packed, state, out_dtype)


def dequantize_fp4(packed, state: QuantState, out_dtype=None):
    if state.quant_type != "fp4":
        raise ValueError(f"dequantize_fp4 needs an fp4 state; got quant_type {state.quant_type!r}")
    return dequantize_4bit(packed, state, out_dtype)


def weight_orientation(x_shape, state: QuantState) -> bool:
    """True when the weight is stored (out, in) as usual; False (with a DeprecationWarning,
    as bitsandbytes) when it was quantized transposed, as (in, out) with in != out.
    ValueError when neither matches x's last dimension."""
    if state.shape is None or len(state.shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D weight state; got shape {state.shape}")
    k = x_shape[-1] if len(x_shape) else None
    out_f, in_f = state.shape
    if k == in_f:
        return True
    if k == out_f:
        warnings.warn("matmul_4bit: the weight was quantized transposed, as (in, out); it is "
                      "dequantized and used transposed. Quantize it as (out, in).",
                      DeprecationWarning, stacklevel=3)
        return False
    raise ValueError(f"x's last dimension {k} matches neither dimension of the weight "
                     f"{tuple(state.shape)} (stored as (out, in))")


def matmul_4bit(x, packed, state: QuantState, bias=None):
    """``x @ dequantize_4bit(packed, state).T + bias`` for a weight stored as (out, in).

    x: float16 / bfloat16 / float32 (..., in). The weight is dequantized to float32 (not
    rounded to its dtype), the product and the bias are computed in float32 and the result
    is rounded once to x's dtype: (..., out).
    """
    x = np.asarray(x)
    name = dtype_name(x.dtype)
    check_float_dtype(name, "x")
    normal = weight_orientation(x.shape, state)
    w = dequantize_4bit(packed, state, out_dtype="float32")
    if not normal:
        w = w.T
    x32, _ = to_float32(np.ascontiguousarray(x))
    out = x32.reshape(-1, x.shape[-1]) @ w.T
    if bias is not None:
        b = np.asarray(bias)
        b32, _ = to_float32(np.ascontiguousarray(b.reshape(-1)))
        if b32.size != w.shape[0]:
            raise ValueError(f"bias must have {w.shape[0]} elements; got shape {b.shape}")
        out = out + b32
    return from_float32(out.astype(np.float32), name).reshape(*x.shape[:-1], w.shape[0])
