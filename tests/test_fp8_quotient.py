"""The division-free quotient of the float8 quantizers' 16-bit path (fp8.cu's fp8x4, NARROW),
checked for every input it can meet.

The kernels form x / s for a float16 / bfloat16 x and a scale s = f32(amax * f32(1/fmax)) of a
16-bit amax >= |x| (reference/fp8.py's fp8_scale) as

    r = f32(1/s),  y = f32(x r),  e = f32(s y - x) (one FMA),  q = f32(y - e r) (one FMA)

and use q in place of the IEEE quotient f32(x / s). Every operation scales exactly with powers
of two while nothing underflows (the kernels divide instead when s is outside [2^-60, 2^125]),
so q is f32(x / s) everywhere if it is so for amax in [1, 2), every mantissa of x and amax, and
every exponent distance d = 0 .. 57 at which a float8 code can be non-zero (x / s >= 2^-40;
below, both are far under the least float8 subnormal). This test enumerates exactly those
cases (about 1e6 for bfloat16, 6e7 for float16), emulating each float32 operation exactly in
float64 with the one rounding to float32 done right (round32), and finds no mismatch; a
plain f32(x r) without the correction fails about one case in four (the last test)."""
from __future__ import annotations

import numpy as np
import pytest

from reference import fp8 as ref

f32, f64 = np.float32, np.float64
MANTISSA_BITS = {"bfloat16": 7, "float16": 10}
DISTANCES = range(58)


def round32(t: np.ndarray, side: np.ndarray) -> np.ndarray:
    """float32 nearest-even rounding of exact values T, given t = f64(T) (T rounded to float64)
    and side = sign(T - t). Rounding t again is right except where t lies exactly halfway
    between two float32 numbers (then side picks, or, for side 0, the tie goes to even)."""
    r = t.astype(f32)
    toward = np.where(t >= r.astype(f64), f32(np.inf), f32(-np.inf)).astype(f32)
    n = np.nextafter(r, toward)
    half = (t != r.astype(f64)) & (np.abs(t - r.astype(f64)) * 2 == np.abs(n.astype(f64) - r.astype(f64)))
    lo, hi = np.minimum(r, n), np.maximum(r, n)
    return np.where(half, np.where(side > 0, hi, np.where(side < 0, lo, r)), r)


def quotients(amax: np.ndarray, x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fp8x4's q, plain f32(x * f32(1/s)), the IEEE f32(x / s)) for float32 arrays holding
    16-bit values, s = fp8_scale(amax)."""
    s = ref.fp8_scale(amax, fmt).astype(f32)
    r = (f32(1) / s).astype(f32)
    y = (x * r).astype(f32)
    s64, x64, y64, r64 = s.astype(f64), x.astype(f64), y.astype(f64), r.astype(f64)
    e = (s64 * y64 - x64).astype(f32)   # s y is exact in float64 (48 bits), so is s y - x
    p = e.astype(f64) * r64             # exact (48 bits)
    t = y64 - p                         # y - e r, rounded to float64 ...
    q = round32(t, np.sign((y64 - t) - p))  # ... and its exact remainder (|y| >> |e r|)
    qd = x64 / s64
    # where qd is a float32 halfway point it has 25 bits: s * qd is then exact, so is x - s qd
    exact = round32(qd, np.sign(x64 - s64 * qd))
    return q, y, exact


def cases(dtype: str, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(amax, x): amax every mantissa in [1, 2), x every mantissa times 2^-d, x <= amax."""
    m = 1.0 + np.arange(1 << MANTISSA_BITS[dtype], dtype=f64) / (1 << MANTISSA_BITS[dtype])
    amax, x = (a.ravel() for a in np.meshgrid(m, m * 2.0 ** -d, indexing="ij"))
    keep = x <= amax
    return amax[keep].astype(f32), x[keep].astype(f32)


def test_round32_against_exact_fractions():
    from fractions import Fraction
    g = np.random.default_rng(0)
    a = g.standard_normal(4000).astype(f32)
    mids = (a.astype(f64) + np.nextafter(a, f32(np.inf)).astype(f64)) / 2
    base = np.concatenate([a.astype(f64), mids, mids, mids])
    tail = np.concatenate([g.standard_normal(4000) * 2.0 ** -40, g.standard_normal(4000) * 2.0 ** -80,
                           -np.abs(g.standard_normal(4000)) * 2.0 ** -80, np.zeros(4000)])
    t = base + tail
    got = round32(t, np.sign((base - t) + tail))
    for i in range(0, t.size, 7):
        T = Fraction(float(base[i])) + Fraction(float(tail[i]))
        c = f32(float(T))
        near = [np.nextafter(c, f32(-np.inf)), c, np.nextafter(c, f32(np.inf))]
        want = min(near, key=lambda v: (abs(Fraction(float(v)) - T), int(np.array(v).view(np.uint32)) & 1))
        assert got[i] == want, (base[i], tail[i], got[i], want)


@pytest.mark.parametrize("fmt", ("e4m3", "e5m2"))
@pytest.mark.parametrize("dtype", ("bfloat16", "float16"))
def test_corrected_quotient_is_the_ieee_quotient_for_every_16bit_input(dtype, fmt):
    for d in DISTANCES:
        amax, x = cases(dtype, d)
        q, _, exact = quotients(amax, x, fmt)
        bad = np.nonzero(q != exact)[0]
        assert bad.size == 0, [(float(amax[i]), float(x[i]), float(q[i]), float(exact[i])) for i in bad[:5]]
        nq, _, nexact = quotients(amax, -x, fmt)   # the rule is odd in x
        assert np.array_equal(nq, nexact)


def test_uncorrected_product_is_not_the_quotient():
    """The check can fail: f32(x * f32(1/s)) alone misses f32(x / s) about one time in four."""
    amax, x = cases("bfloat16", 0)
    _, y, exact = quotients(amax, x, "e4m3")
    assert 0.1 < np.mean(y != exact) < 0.5
