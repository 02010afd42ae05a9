"""Floating-point input and output formats of the reference, including bfloat16 in NumPy.

NumPy has no bfloat16 of its own. The reference reads and writes bfloat16 in two forms:
- an array whose dtype is named ``bfloat16`` (``ml_dtypes.bfloat16``, the type JAX uses),
  read through its 16-bit patterns; ml_dtypes is imported (optionally) only to give a
  bfloat16 result its dtype;
- raw bit patterns: a ``uint16`` array plus ``dtype="bfloat16"`` passed to the internal
  ``*_f32`` functions. qkernels hands torch's bfloat16 tensors over this way.
Widening bfloat16 to float32 is exact; narrowing float32 to bfloat16 rounds to nearest
even (NaN stays NaN), as torch's ``.to(torch.bfloat16)`` does.
"""
from __future__ import annotations

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def dtype_name(dtype) -> str:
    """Canonical name ("float16", "bfloat16", "float32", ...) of a NumPy or torch dtype, or str."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "name", None) or str(dtype)
    return name.replace("torch.", "")


def check_float_dtype(name: str, argname: str = "A") -> None:
    if name not in FLOAT_DTYPES:
        raise TypeError(f"{argname} must be float16, bfloat16 or float32; got dtype {name}")


def to_float32(A: np.ndarray) -> tuple[np.ndarray, str]:
    """(float32 values, dtype name) of a float16 / bfloat16 / float32 NumPy array."""
    name = dtype_name(A.dtype)
    check_float_dtype(name)
    if name == "bfloat16":
        return bf16_bits_to_float32(np.ascontiguousarray(A).view(np.uint16)), name
    return np.asarray(A, dtype=np.float32), name


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even); returns the uint16 bit patterns."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet_nan = (u >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, quiet_nan, rounded).astype(np.uint16)


def numpy_bfloat16():
    """ml_dtypes' bfloat16 NumPy dtype; TypeError naming the fix when ml_dtypes is absent."""
    try:
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    except ImportError:
        raise TypeError(
            "a bfloat16 NumPy array needs ml_dtypes (pip install ml_dtypes); "
            "or ask for out_dtype='float32'") from None


def from_float32(x: np.ndarray, name: str) -> np.ndarray:
    """float32 values rounded once to the named dtype, as a NumPy array of that dtype."""
    if name == "float32":
        return x
    if name == "float16":
        return x.astype(np.float16)
    if name == "bfloat16":
        return float32_to_bf16_bits(x).view(numpy_bfloat16())
    raise TypeError(f"out dtype must be float16, bfloat16 or float32; got {name}")
