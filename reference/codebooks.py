"""The codebooks (quantization maps) of SPEC.md section 1, built in code, float32.

Every map is reproduced bit for bit as bitsandbytes builds it with torch float32
arithmetic; ``tests/test_codebooks.py`` checks each against ``tests/data/codebooks.json``.

8-bit maps have 256 entries, 4-bit maps 16. All are sorted ascending except FP4,
whose index is the 4-bit code (bit 3 is the sign).
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "dynamic_map", "linear_map", "fp8_map", "nf4_map", "fp4_map",
    "get_code", "CODEBOOK_NAMES", "midpoints",
]

_f32 = np.float32


def _torch_linspace_f32(a: float, b: float, n: int) -> np.ndarray:
    """torch.linspace(a, b, n, dtype=float32): fills from both ends with one rounding each.

    ``step = f32((f32(b) - f32(a)) / (n - 1))``; the first half is ``a + step*i``, the
    second ``b - step*(n-1-i)``, each a fused multiply-add rounded once to float32
    (exact in float64 here, since both products fit a double's mantissa).
    """
    a32, b32 = _f32(a), _f32(b)
    if n == 1:
        return np.array([a32], dtype=_f32)
    step = _f32((b32 - a32) / _f32(n - 1))
    i = np.arange(n, dtype=np.float64)
    half = n // 2
    lower = np.float64(step) * i + np.float64(a32)
    upper = np.float64(b32) - np.float64(step) * (n - 1 - i)
    return np.where(i < half, lower, upper).astype(_f32)


def _pair_means(v: np.ndarray) -> np.ndarray:
    """float32 ``(v[j] + v[j+1]) / 2`` as torch computes it (sum rounded, exact halving)."""
    return ((v[:-1] + v[1:]) / _f32(2)).astype(_f32)


@functools.lru_cache(maxsize=None)
def _dynamic_map(signed: bool) -> np.ndarray:
    parts = []
    for i in range(7):
        n_boundaries = 2**i + 1 if signed else 2 ** (i + 1) + 1
        means = _pair_means(_torch_linspace_f32(0.1, 1.0, n_boundaries))
        scale = _f32(10.0 ** (i - 6))
        parts.append(scale * means)
        if signed:
            parts.append(-scale * means)
    parts.append(np.array([0.0, 1.0], dtype=_f32))
    out = np.sort(np.concatenate(parts).astype(_f32))
    out.setflags(write=False)
    return out


def dynamic_map(signed: bool = True) -> np.ndarray:
    """The dynamic (decade) 8-bit map: signed (default 8-bit code, optimizer first moment)
    or unsigned (optimizer second moment). 256 float32 values, sorted, read-only."""
    return _dynamic_map(bool(signed))


@functools.lru_cache(maxsize=None)
def _linear_map() -> np.ndarray:
    v = _torch_linspace_f32(-1.0, 1.0, 255)
    out = np.concatenate([v[:127], np.array([0.0], dtype=_f32), v[127:]]).astype(_f32)
    out.setflags(write=False)
    return out


def linear_map() -> np.ndarray:
    """torch's float32 linspace(-1, 1, 255) with 0.0 inserted at index 127 (256 values)."""
    return _linear_map()


@functools.lru_cache(maxsize=None)
def fp8_map(exponent_bits: int, precision_bits: int) -> np.ndarray:
    """bitsandbytes' ``create_fp8_map(signed=True, e, p, 8)``, normalized to [-1, 1].

    Note the exponent runs downwards (``2 ** -(E - bias - 1)``): this is a codebook used
    through blockwise quantization, not the IEEE/OCP float8 encoding.
    """
    e, p = exponent_bits, precision_bits
    if e + p != 7:
        raise ValueError(f"exponent_bits + precision_bits must be 7; got {e} + {p}")
    bias = 2 ** (e - 1)
    mantissas = np.arange(2**p, dtype=np.float64) / 2**p
    values = []
    for E in range(2**e):
        if E == 0:
            mag = mantissas * 2.0**-bias
        else:
            mag = (1.0 + mantissas) * 2.0 ** -(E - bias - 1)
        values.append(np.stack([mag, -mag], axis=1).ravel())  # bnb's order: +v then -v
    # a stable sort, as Python's list.sort, keeps +0.0 before -0.0 (indices 127, 128)
    v = np.sort(np.concatenate(values), kind="stable").astype(_f32)
    out = (v / v.max()).astype(_f32)
    out.setflags(write=False)
    return out


_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=_f32)
_NF4.setflags(write=False)

# FP4 (e2m1 with bnb's scaling): magnitudes of codes 0..7 in units of 1/12; bit 3 is the sign.
_FP4_TWELFTHS = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=_f32)
_FP4 = np.concatenate([_FP4_TWELFTHS, -_FP4_TWELFTHS]) / _f32(12)
_FP4[8] = 0.0  # +0.0 in the table (bnb's CUDA dequantizer returns -0.0; they compare equal)
_FP4 = _FP4.astype(_f32)
_FP4.setflags(write=False)


def nf4_map() -> np.ndarray:
    """The 16 NF4 values, index = 4-bit code, ascending."""
    return _NF4


def fp4_map() -> np.ndarray:
    """The 16 FP4 values, index = 4-bit code (NOT sorted; bit 3 is the sign)."""
    return _FP4


CODEBOOK_NAMES = ("dynamic_signed", "dynamic_unsigned", "fp8_e4m3", "fp8_e5m2",
                  "linear_signed", "nf4", "fp4")


def get_code(name: str) -> np.ndarray:
    """A codebook by its name in ``CODEBOOK_NAMES`` (the keys of spec/codebooks.json)."""
    makers = {
        "dynamic_signed": lambda: dynamic_map(True),
        "dynamic_unsigned": lambda: dynamic_map(False),
        "fp8_e4m3": lambda: fp8_map(4, 3),
        "fp8_e5m2": lambda: fp8_map(5, 2),
        "linear_signed": linear_map,
        "nf4": nf4_map,
        "fp4": fp4_map,
    }
    if name not in makers:
        raise ValueError(f"unknown codebook {name!r}; known: {', '.join(CODEBOOK_NAMES)}")
    return makers[name]()


def midpoints(code: np.ndarray) -> np.ndarray:
    """float32 midpoints ``f32((c_i + c_{i+1}) / 2)`` of a sorted codebook (len(code) - 1).

    The nearest-code rule everywhere is ``code = #{i : mid_i < y}``: a value exactly on a
    midpoint goes to the lower index. A -0.0 midpoint is stored as +0.0.
    """
    return _pair_means(np.asarray(code, dtype=_f32)) + _f32(0.0)
