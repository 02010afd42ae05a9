"""Simulated FP8 (bitsandbytes' research layers), the NumPy oracle (docs/FORMATS.md §8).

GPU and torch versions: torch_ops/fp8.py (``qdq_global`` in torch ops on CUDA, blockwise
through qkernels.quantize_blockwise).

    fp8_block_sizes(input_features, output_features) -> (bsz, bsz2)
    qdq_global(A, code) -> A's dtype and shape
    qdq_blockwise(A, code, blocksize) -> A's dtype and shape
    matmul_fp8_mixed(A (..., K), B (K, N), fw_code, bw_code, bsz, bsz2) -> A's dtype
    matmul_fp8_global(A (..., K), B (K, N), fw_code, bw_code) -> A's dtype

"qdq" is quantize-then-dequantize with a codebook (docs/FORMATS.md §2's rule: ``y = f32(x *
f32(1 / absmax))``, the nearest code by float32 midpoints, ties to the lower index, then
``f32(code[c] * absmax)`` rounded once to A's dtype). "Global" is one block spanning the
whole tensor; its special values follow section 12: a NaN or Inf anywhere makes every
output NaN, an all-zero tensor stays zero.
"""
from __future__ import annotations

import numpy as np

from .blockwise import dequantize_blockwise_f32, quantize_blockwise_f32
from .dtypes import check_float_dtype, dtype_name, from_float32, to_float32

__all__ = ["FP8_BLOCKSIZES", "fp8_block_sizes", "qdq_global_f32", "qdq_blockwise_f32",
           "qdq_global", "qdq_blockwise", "matmul_fp8_mixed", "matmul_fp8_global"]

FP8_BLOCKSIZES = (4096, 2048, 1024, 512, 256, 128, 64, 0)


def _block_size(features: int) -> int:
    for k, nxt in zip(FP8_BLOCKSIZES, FP8_BLOCKSIZES[1:]):
        if features > nxt:
            return k
    return 64  # features == 0: bnb's loop runs off the table; any valid size serves


def fp8_block_sizes(input_features: int, output_features: int) -> tuple[int, int]:
    """(bsz, bsz2): the first table entry whose next entry is below the feature count
    (768 -> 1024, 1024 -> 1024, 1025 -> 2048, above 2048 -> 4096)."""
    return _block_size(int(input_features)), _block_size(int(output_features))


def qdq_global_f32(x: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Global qdq of flat float32 ``x``: float32 (n,) values before the final rounding."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    if x.size == 0:
        return x.copy()
    codes, absmax = quantize_blockwise_f32(x, code, x.size)
    return dequantize_blockwise_f32(codes, absmax, code, x.size)


def qdq_blockwise_f32(x: np.ndarray, code: np.ndarray, blocksize: int) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    codes, absmax = quantize_blockwise_f32(x, code, blocksize)
    return dequantize_blockwise_f32(codes, absmax, code, blocksize)


def qdq_global(A, code) -> np.ndarray:
    """Global quantize-dequantize of A (float16 / bfloat16 / float32, any shape)."""
    A = np.asarray(A)
    x, name = to_float32(np.ascontiguousarray(A))
    return from_float32(qdq_global_f32(x, np.asarray(code, np.float32)), name).reshape(A.shape)


def qdq_blockwise(A, code, blocksize: int) -> np.ndarray:
    A = np.asarray(A)
    x, name = to_float32(np.ascontiguousarray(A))
    out = qdq_blockwise_f32(x, np.asarray(code, np.float32), int(blocksize))
    return from_float32(out, name).reshape(A.shape)


def _matmul(a: np.ndarray, b: np.ndarray, name: str) -> np.ndarray:
    """float64 product of float32 operands, rounded to ``name`` (via float32): the exact-math
    target a low-precision GEMM approximates (tests measure GEMM error against it)."""
    return from_float32((a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32), name)


def matmul_fp8_mixed(A, B, fw_code, bw_code=None, bsz: int = 1024, bsz2: int = 1024):
    """Forward of docs/FORMATS.md §8.1 "Mixed": ``qdq(A, fw, bsz) @ qdq_global(B, fw)`` in float64 on the
    dtype-rounded qdq values, rounded once to A's dtype. A (..., K), B (K, N)."""
    A, B = np.asarray(A), np.asarray(B)
    name = dtype_name(A.dtype)
    check_float_dtype(name, "A")
    a = to_float32(qdq_blockwise(A, fw_code, bsz))[0].reshape(-1, A.shape[-1])
    b = to_float32(qdq_global(B, fw_code))[0]
    return _matmul(a, b, name).reshape(A.shape[:-1] + (B.shape[1],))


def matmul_fp8_global(A, B, fw_code, bw_code=None):
    """Forward of docs/FORMATS.md §8.1 "Global": ``qdq_global(A, fw) @ qdq_global(B, fw)``, as above."""
    A, B = np.asarray(A), np.asarray(B)
    name = dtype_name(A.dtype)
    check_float_dtype(name, "A")
    a = to_float32(qdq_global(A, fw_code))[0].reshape(-1, A.shape[-1])
    b = to_float32(qdq_global(B, fw_code))[0]
    return _matmul(a, b, name).reshape(A.shape[:-1] + (B.shape[1],))


# --- native float8 quantization (the native layers' torch._scaled_mm operands) -----------------
#
#   quantize_fp8_rowwise_f32(x (M, K) float32, fmt) -> (codes uint8 (M, K), scale float32 (M,))
#   quantize_fp8_global_f32(x float32, fmt) -> (codes uint8 of x's shape, scale float32 (1,))
#   float32_to_fp8_bits(y, fmt) / fp8_bits_to_float32(codes, fmt)
#
# fmt "e4m3" is torch.float8_e4m3fn (max 448, no Inf), "e5m2" torch.float8_e5m2 (max 57344).
# The rule, per row (row-wise) or over the whole tensor (global), all in float32:
#   amax  = max |x|                        (NaN propagates; an Inf stays Inf)
#   scale = amax * f32(1 / fmax)  if amax > 0, else 1.0
#           row-wise: NaN when amax is NaN; global: 1.0 when amax is NaN (``amax > 0`` is False)
#   y     = f32(x / scale)                 (IEEE division, round to nearest even)
#   code  = float8(clamp(y, -fmax, fmax))  (round to nearest even; a NaN y gives 0x7F)
# so that ``x ~= f32(code) * scale``. This is what torch computes on CUDA for
# ``amax / fmax`` (a tensor divided by a Python float is a multiply by the float32 reciprocal
# there; on the CPU it is a true division, which can differ by one ulp) followed by
# ``(x.float() / scale).clamp(-fmax, fmax).to(float8)``. A NaN y always gives the positive
# NaN code 0x7F: the GPU's division returns the canonical positive NaN, whatever the sign of a
# NaN input.

FP8_FORMATS = ("e4m3", "e5m2")
FP8_MAX = {"e4m3": np.float32(448.0), "e5m2": np.float32(57344.0)}
FP8_INV_MAX = {k: np.float32(1) / v for k, v in FP8_MAX.items()}  # 0x3b124925, 0x37924925


def check_fp8_format(fmt: str) -> str:
    if fmt not in FP8_FORMATS:
        raise ValueError(f"fp8 format must be one of {', '.join(FP8_FORMATS)}; got {fmt!r}")
    return fmt


def float32_to_fp8_bits(y, fmt: str) -> np.ndarray:
    """float32 -> float8 bit patterns (uint8) as torch's ``.to(float8)`` rounds |y| <= fmax:
    to nearest, ties to even, subnormals kept, the sign kept (also of zero); NaN -> 0x7F.
    Beyond fmax (the quantizers clamp first) this follows c10's scalar conversion: e4m3 (no
    Inf) gives NaN from 464 up, e5m2 Inf from 61440 up (torch's vectorized CPU path saturates
    e4m3 instead)."""
    check_fp8_format(fmt)
    u = np.ascontiguousarray(y, np.float32).view(np.uint32)
    sign = u & np.uint32(0x80000000)
    a = u ^ sign
    if fmt == "e4m3":
        mbits, bias, first_bad = 3, 7, np.uint32(0x43F00000)        # 480.0
        min_normal = np.uint32(121 << 23)                            # 2^-6
    else:
        mbits, bias, first_bad = 2, 15, np.uint32(0x47800000)       # 65536.0
        min_normal = np.uint32(113 << 23)                            # 2^-14
    shift = np.uint32(23 - mbits)
    # normal range: re-bias the exponent, round the mantissa to nearest even, take the bits
    odd = (a >> shift) & np.uint32(1)
    rebias = np.uint32(((bias - 127) << 23) & 0xFFFFFFFF)
    normal = (a + rebias + np.uint32((1 << (23 - mbits - 1)) - 1) + odd) >> shift
    # subnormal range: adding 2^(mbits + 1 - bias + 23 - mbits) ... lands the value on the
    # float8 subnormal grid with one float32 rounding (nearest even)
    magic_bits = np.uint32((127 - bias + 23 - mbits + 1) << 23)
    with np.errstate(over="ignore", invalid="ignore"):
        s = (a.view(np.float32) + magic_bits.view(np.float32)).view(np.uint32) - magic_bits
    out = np.where(a < min_normal, s, normal)
    if fmt == "e4m3":
        out = np.where(a >= first_bad, np.uint32(0x7F), out)
    else:
        out = np.where(a >= first_bad, np.uint32(0x7C), out)
    out = (out & np.uint32(0xFF)) | (sign >> np.uint32(24))
    nan = a > np.uint32(0x7F800000)
    return np.where(nan, np.uint32(0x7F), out).astype(np.uint8)


def fp8_bits_to_float32(codes, fmt: str) -> np.ndarray:
    """The float32 value of each float8 bit pattern (exact)."""
    check_fp8_format(fmt)
    c = np.asarray(codes, np.uint8).astype(np.int64)
    mbits, bias = (3, 7) if fmt == "e4m3" else (2, 15)
    e = (c >> mbits) & ((1 << (7 - mbits)) - 1)
    m = c & ((1 << mbits) - 1)
    mag = np.where(e == 0, np.ldexp(m.astype(np.float64), 1 - bias - mbits),
                   np.ldexp((m + (1 << mbits)).astype(np.float64), e - bias - mbits))
    emax = (1 << (7 - mbits)) - 1
    if fmt == "e4m3":
        mag = np.where((e == emax) & (m == 7), np.nan, mag)
    else:
        mag = np.where(e == emax, np.where(m == 0, np.inf, np.nan), mag)
    return np.where(c & 0x80, -mag, mag).astype(np.float32)


def fp8_scale(amax, fmt: str, nan_to_one: bool = False) -> np.ndarray:
    """The float32 scale of each absmax: ``amax * f32(1/fmax)`` if amax > 0, else 1; a NaN
    absmax gives NaN (row-wise) or 1 (``nan_to_one``: the global rule)."""
    amax = np.asarray(amax, np.float32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        s = np.where(amax > 0, (amax * FP8_INV_MAX[fmt]).astype(np.float32), np.float32(1))
    if not nan_to_one:
        s = np.where(np.isnan(amax), amax, s)
    return s.astype(np.float32)


def _fp8_codes(x: np.ndarray, scale: np.ndarray, fmt: str) -> np.ndarray:
    fmax = FP8_MAX[fmt]
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        y = (x / scale).astype(np.float32)
    return float32_to_fp8_bits(np.clip(y, -fmax, fmax), fmt)


def quantize_fp8_rowwise_f32(x, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise float8 quantization of float32 x (M, K): (codes uint8 (M, K), scale (M,))."""
    check_fp8_format(fmt)
    x = np.asarray(x, np.float32)
    amax = np.max(np.abs(x), axis=1, initial=np.float32(0)).astype(np.float32)
    scale = fp8_scale(amax, fmt)
    return _fp8_codes(x, scale[:, None], fmt), scale


def quantize_fp8_global_f32(x, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Tensor-wise float8 quantization of float32 x (any shape): (codes uint8 of x's shape,
    scale (1,)); a NaN absmax gives scale 1 (see the rule above)."""
    check_fp8_format(fmt)
    x = np.asarray(x, np.float32)
    amax = np.max(np.abs(x), initial=np.float32(0)).astype(np.float32).reshape(1)
    scale = fp8_scale(amax, fmt, nan_to_one=True)
    return _fp8_codes(x, scale[0], fmt), scale
