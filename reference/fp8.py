"""Simulated FP8 (bitsandbytes' research layers), the NumPy oracle (SPEC.md section 8).

GPU and torch versions: torch_ops/fp8.py (``qdq_global`` in torch ops on CUDA, blockwise
through qkernels.quantize_blockwise).

    fp8_block_sizes(input_features, output_features) -> (bsz, bsz2)
    qdq_global(A, code) -> A's dtype and shape
    qdq_blockwise(A, code, blocksize) -> A's dtype and shape
    matmul_fp8_mixed(A (..., K), B (K, N), fw_code, bw_code, bsz, bsz2) -> A's dtype
    matmul_fp8_global(A (..., K), B (K, N), fw_code, bw_code) -> A's dtype

"qdq" is quantize-then-dequantize with a codebook (SPEC.md section 2's rule: ``y = f32(x *
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
    """Forward of SPEC.md 8 "Mixed": ``qdq(A, fw, bsz) @ qdq_global(B, fw)`` in float64 on the
    dtype-rounded qdq values, rounded once to A's dtype. A (..., K), B (K, N)."""
    A, B = np.asarray(A), np.asarray(B)
    name = dtype_name(A.dtype)
    check_float_dtype(name, "A")
    a = to_float32(qdq_blockwise(A, fw_code, bsz))[0].reshape(-1, A.shape[-1])
    b = to_float32(qdq_global(B, fw_code))[0]
    return _matmul(a, b, name).reshape(A.shape[:-1] + (B.shape[1],))


def matmul_fp8_global(A, B, fw_code, bw_code=None):
    """Forward of SPEC.md 8 "Global": ``qdq_global(A, fw) @ qdq_global(B, fw)``, as above."""
    A, B = np.asarray(A), np.asarray(B)
    name = dtype_name(A.dtype)
    check_float_dtype(name, "A")
    a = to_float32(qdq_global(A, fw_code))[0].reshape(-1, A.shape[-1])
    b = to_float32(qdq_global(B, fw_code))[0]
    return _matmul(a, b, name).reshape(A.shape[:-1] + (B.shape[1],))
