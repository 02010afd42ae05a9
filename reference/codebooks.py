"""The codebooks (quantization maps) of docs/FORMATS.md §1, built in code, float32.

Every map is reproduced bit for bit as bitsandbytes builds it with torch float32
arithmetic; ``tests/test_codebooks.py`` checks each against ``tests/data/codebooks.json``.

8-bit maps have 256 entries, 4-bit maps 16. All are sorted ascending except FP4,
whose index is the 4-bit code (bit 3 is the sign).
"""
from __future__ import annotations

import functools
import itertools
import statistics

import numpy as np

__all__ = [
    "dynamic_map", "linear_map", "fp8_map", "nf4_map", "fp4_map",
    "get_code", "CODEBOOK_NAMES", "midpoints",
    "create_dynamic_map", "create_linear_map", "create_fp8_map", "create_normal_map",
    "get_4bit_type", "UnsupportedCodebook",
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
    """A codebook by its name in ``CODEBOOK_NAMES`` (the keys of tests/data/codebooks.json)."""
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


# --- bitsandbytes' codebook constructors, generalized (bits, exponent layout) ---------------
# Each returns a new writable float32 array equal, bit for bit, to what bitsandbytes 0.50.2's
# function of the same name and arguments returns (as a torch tensor) there. 8-bit results
# have 256 entries; fewer-bit codes are padded with zeros to 256, as bitsandbytes does, so
# they can index an 8-bit code.

class UnsupportedCodebook(ValueError, NotImplementedError):
    """A codebook name or option that does not exist. A ValueError (an argument we reject), and
    a NotImplementedError too: bitsandbytes raises that for the same arguments."""


def _check_bits(value, argname: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{argname} must be an integer; got {type(value).__name__}")
    if not low <= int(value) <= high:
        raise ValueError(f"{argname} must be in {low}..{high}; got {value}")
    return int(value)


def _pad_to_256(values: list) -> np.ndarray:
    """Sorted float32 with zeros appended to 256 entries, as bitsandbytes pads short codes."""
    return np.sort(np.array(values + [0.0] * (256 - len(values)), dtype=np.float64),
                   kind="stable").astype(_f32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The dynamic (decade) code: the fraction of decade i (``10^(i - max_exponent_bits + 1)``)
    has ``2^(i + total_bits - 1 - max_exponent_bits) + 1`` boundaries, twice as many when
    unsigned, in ``[0.1, 1]``; their float32 midpoints, times the decade, once positive and
    (signed) once negative, plus 0 and 1; sorted, zero-padded to 256. The defaults give
    ``dynamic_map(signed)``. float32 (256,)."""
    total_bits = _check_bits(total_bits, "total_bits", 2, 8)
    max_exponent_bits = _check_bits(max_exponent_bits, "max_exponent_bits", 1, 8)
    non_sign_bits = total_bits - 1
    data: list = []

    def decade(i: int, n_boundaries: int) -> None:
        means = _pair_means(_torch_linspace_f32(0.1, 1.0, n_boundaries))
        scale = _f32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.extend((scale * means).astype(_f32).tolist())
        if signed:
            data.extend((-scale * means).astype(_f32).tolist())

    for i in range(max_exponent_bits):
        e = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        decade(i, int(2.0**e + 1))  # int(): a negative e gives 1 boundary, no midpoint
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1 if non_sign_bits >= max_exponent_bits else 0
    if extra > 0:  # the all-zero-exponent items go to the last decade again
        decade(max_exponent_bits - 1, extra + 1)
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, "
                         f"total_bits={total_bits}) makes {len(data)} values, not 2**total_bits; "
                         "choose max_exponent_bits <= total_bits - 1 (signed) or = total_bits")
    return _pad_to_256(data)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> np.ndarray:
    """Evenly spaced values, torch's float32 linspace from -1 (signed) or 0 to 1: ``2^bits``
    of them, or ``2^bits - 1`` for a signed code with a zero (``add_zero`` or fewer than 8
    bits), the zeros that pad it to 256 inserted in the middle. float32 (256,)."""
    total_bits = _check_bits(total_bits, "total_bits", 1, 8)
    n = 2**total_bits
    if (add_zero or total_bits < 8) and signed:
        n -= 1
    values = _torch_linspace_f32(-1.0 if signed else 0.0, 1.0, n)
    half = n // 2
    return np.concatenate([values[:half], np.zeros(256 - n, _f32), values[half:]]).astype(_f32)


def create_fp8_map(signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2,
                   total_bits: int = 8) -> np.ndarray:
    """Every sign/exponent/mantissa pattern of a small float, exponent bias ``2^(e-1)``:
    exponent field 0 is subnormal (``m * 2^-bias``), else ``(1 + m) * 2^-(E - bias - 1)``;
    sorted, zero-padded to 256, divided by the largest (range [-1, 1]). ``exponent_bits +
    precision_bits + signed`` must equal ``total_bits``. float32 (256,); E4M3 = fp8_map(4, 3)."""
    total_bits = _check_bits(total_bits, "total_bits", 1, 8)
    e = _check_bits(exponent_bits, "exponent_bits", 0, 8)
    p = _check_bits(precision_bits, "precision_bits", 0, 8)
    if e + p != total_bits - (1 if signed else 0):
        raise ValueError(f"exponent_bits + precision_bits + (1 if signed) must equal total_bits; "
                         f"got {e} + {p} + {int(bool(signed))} != {total_bits}")
    bias = 2 ** (e - 1)
    values: list = []
    for E in range(2**e):
        for bits in itertools.product([0, 1], repeat=p):
            m = sum(b * 2.0 ** -(i + 1) for i, b in enumerate(bits))
            v = m * 2.0**-bias if E == 0 else (1.0 + m) * 2.0 ** -(E - bias - 1)
            values.append(v)
            if signed:
                values.append(-v)  # +v before -v: a stable sort keeps +0.0 ahead of -0.0
    values = np.sort(np.array(values), kind="stable").tolist()
    with np.errstate(over="ignore", invalid="ignore"):  # 7-8 exponent bits overflow float32, as there
        v = _pad_to_256(values)
        return (v / v.max()).astype(_f32)


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
    """The NormalFloat code: standard-normal quantiles at float32 linspace(offset, 0.5)
    (8 positive and 7 negative with ``use_extra_value``, else 7 and 7), each rounded to
    float32, zero-padded to 256, sorted and divided by the largest. float32 (256,); its 16
    nonzero-padded entries at the ends are nf4_map() for the defaults.

    The quantile is ``statistics.NormalDist().inv_cdf`` (bitsandbytes calls scipy's
    ``norm.ppf``; both are accurate far below float32 resolution, so the values agree)."""
    if not 0.5 < float(offset) < 1.0:
        raise ValueError(f"offset must be in (0.5, 1); got {offset}")
    ppf = statistics.NormalDist().inv_cdf

    def quantiles(n: int) -> list:
        return [float(_f32(ppf(float(q)))) for q in _torch_linspace_f32(offset, 0.5, n)[:-1]]

    positive = quantiles(9 if use_extra_value else 8)
    negative = [-v for v in quantiles(8)]
    v = _pad_to_256(positive + negative)
    return (v / v.max()).astype(_f32)


_INT4 = [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]
_AF4_64 = [1.0, 0.72424863, 0.55496234, 0.42563882, 0.31675666, 0.21961274, 0.12934483, 0.04273164,
           0.0, -0.04934812, -0.14982478, -0.25607552, -0.3736951, -0.51243739, -0.69441008, -1.0]


def get_4bit_type(typename: str, blocksize: int = 64) -> np.ndarray:
    """A 16-entry 4-bit code as float32, divided by its largest magnitude, index = code:
    "nf4" (nf4_map), "fp4" (fp4_map, not sorted), "int4" (7..0, -0..-7 over 7) or "af4"
    (AbnormalFloat, blocksize 64 only). Unknown names raise UnsupportedCodebook."""
    if typename == "nf4":
        return nf4_map().copy()
    if typename == "fp4":
        return fp4_map().copy()
    if typename == "int4":
        data = np.array(_INT4, dtype=_f32)
    elif typename == "af4":
        if blocksize != 64:
            raise UnsupportedCodebook(f"the af4 code exists for blocksize 64 only; got blocksize {blocksize}")
        data = np.array(_AF4_64, dtype=_f32)
    else:
        raise UnsupportedCodebook(f"typename must be 'nf4', 'fp4', 'int4' or 'af4'; got {typename!r}")
    return (data / np.abs(data).max()).astype(_f32)
