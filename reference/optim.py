"""Adam / AdamW updates with 8-bit blockwise or 32-bit state, the NumPy oracle (docs/FORMATS.md
§11; the quantization of the state is §2's, blocks of 256).

GPU versions: qkernels/optim/optim.cu (CuPy) and qkernels/optim/_numba.py.

    adam_scalars(lr, betas, eps, weight_decay, step, gnorm_scale=1.0) -> AdamScalars
    optimizer_update_8bit_blockwise(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                    scalars, dtype=None) -> number of non-finite gradients
    optimizer_update_32bit(p, g, state1, state2, scalars, dtype=None, update_scale=1.0) -> int
    update_norm_32bit(g, state1, state2, scalars, dtype=None) -> float  (for max_unorm)
    max_unorm_scale(unorm, pnorm, max_unorm) -> float32
    percentile_clipping(g, gnorm_vec, step, percentile, dtype=None) -> (gnorm, clip, scale)

Every backend takes the same float32 scalars (``adam_scalars``, computed once on the host
in float64 and rounded once), then per element, in float32, each operation rounded once
(no fused multiply-add):

    g = f32(grad) * gnorm_scale
    if g is NaN or +-Inf:   p unchanged, m = v = 0                  (counted and returned)
    m = beta1 * m0 + (1 - beta1) * g
    v = beta2 * v0 + (1 - beta2) * (g * g)
    p = (p + step_size * (m / (sqrt(v) + eps_c2))) * decay         rounded once to p's dtype
    with step_size = f32(-lr * c2 / c1), eps_c2 = f32(eps * c2), decay = f32(1 - lr * wd),
    c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t).

With 8-bit state, m0 / v0 are the dequantized codes ``qmap[state] * absmax[block]`` and the
new m / v are requantized with reference.blockwise's exact nearest-code rule (signed map
for m, unsigned for v, a new absmax per block of 256); then the sign fix: a code whose
value has the opposite sign bit of m moves one step towards m's sign (a tiny negative m
becomes index 126, never +0.0). An all-zero block keeps absmax 0 and codes of 0.0.

Arrays are flat and updated in place: p and g float32 / float16, or uint16 bit patterns
with ``dtype="bfloat16"``; state1/state2 uint8 (n,) with absmax1/absmax2 float32
(ceil(n / 256),) for 8-bit state, float32 (n,) for 32-bit state.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .blockwise import dequantize_blockwise_f32, quantize_blockwise_f32
from .dtypes import bf16_bits_to_float32, dtype_name, float32_to_bf16_bits

__all__ = [
    "BLOCKSIZE", "AdamScalars", "adam_scalars", "optimizer_update_8bit_blockwise",
    "optimizer_update_32bit", "update_norm_32bit", "max_unorm_scale", "percentile_clipping",
    "check_adam_args",
]

BLOCKSIZE = 256  # 8-bit optimizer state: one absmax per 256 elements (bnb's blocksize)
# Elements per vectorized step (a multiple of BLOCKSIZE): every temporary stays in L2.
_CHUNK = 1 << 15
_f32 = np.float32


class AdamScalars(NamedTuple):
    """The float32 constants of one Adam step, identical for every backend."""
    beta1: np.float32
    one_minus_beta1: np.float32
    beta2: np.float32
    one_minus_beta2: np.float32
    eps_c2: np.float32       # eps * sqrt(1 - beta2^t)
    step_size: np.float32    # -lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    decay: np.float32        # 1 - lr * weight_decay (1.0 without weight decay: exact)
    gnorm_scale: np.float32
    # for max_unorm (32-bit state): the bias corrections themselves
    c1: np.float32           # 1 - beta1^t
    c2sq: np.float32         # 1 - beta2^t
    eps: np.float32


def check_adam_args(lr, betas, eps, weight_decay) -> tuple[float, float]:
    """Validate Adam hyper-parameters; returns (beta1, beta2). ValueError naming the argument."""
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(lr)) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0; got {lr!r}")
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be a pair of floats in [0, 1); got {betas!r}") from None
    for i, b in enumerate((beta1, beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1); got {b!r}")
    if not (math.isfinite(float(eps)) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    if not (math.isfinite(float(weight_decay)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0; got {weight_decay!r}")
    return beta1, beta2


def adam_scalars(lr: float, betas, eps: float, weight_decay: float, step: int,
                 gnorm_scale: float = 1.0) -> AdamScalars:
    """Step ``step`` (1-based)'s float32 constants, each computed in float64, rounded once."""
    beta1, beta2 = check_adam_args(lr, betas, eps, weight_decay)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1; got {step!r}")
    c1 = 1.0 - beta1 ** int(step)
    c2sq = 1.0 - beta2 ** int(step)
    c2 = math.sqrt(c2sq)
    return AdamScalars(
        beta1=_f32(beta1), one_minus_beta1=_f32(1.0 - beta1),
        beta2=_f32(beta2), one_minus_beta2=_f32(1.0 - beta2),
        eps_c2=_f32(eps * c2), step_size=_f32(-lr * c2 / c1),
        decay=_f32(1.0 - lr * weight_decay) if weight_decay > 0 else _f32(1.0),
        gnorm_scale=_f32(gnorm_scale), c1=_f32(c1), c2sq=_f32(c2sq), eps=_f32(eps))


def _load(x: np.ndarray, dtype: str) -> np.ndarray:
    return bf16_bits_to_float32(x) if dtype == "bfloat16" else x.astype(_f32, copy=False)


def _store(out: np.ndarray, values: np.ndarray, dtype: str) -> None:
    out[...] = float32_to_bf16_bits(values) if dtype == "bfloat16" else values


def _dtype(p: np.ndarray, dtype) -> str:
    name = dtype_name(dtype) if dtype is not None else dtype_name(p.dtype)
    if name not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"p must be float32, float16 or bfloat16 (uint16 bits with "
                        f"dtype='bfloat16'); got {name}")
    return name


def _moments(g: np.ndarray, m0: np.ndarray, v0: np.ndarray, s: AdamScalars):
    """(g, m, v, bad) in float32 for one chunk; m and v are 0 where g is not finite."""
    with np.errstate(over="ignore", invalid="ignore"):
        if s.gnorm_scale != 1:
            g = g * s.gnorm_scale
        bad = ~np.isfinite(g)
        m = m0 * s.beta1
        m += g * s.one_minus_beta1
        gg = g * g
        gg *= s.one_minus_beta2
        v = v0 * s.beta2
        v += gg
    if bad.any():
        m[bad] = 0.0
        v[bad] = 0.0
    return m, v, bad


def _new_param(p: np.ndarray, m: np.ndarray, v: np.ndarray, bad: np.ndarray, s: AdamScalars,
               update_scale=None) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        denom = np.sqrt(v)
        denom += s.eps_c2
        u = m / denom
        step = s.step_size if update_scale is None else _f32(update_scale * s.step_size)
        u *= step
        u += p
        u *= s.decay
    if bad.any():
        u[bad] = p[bad]
    return u


def _sign_fix(codes: np.ndarray, m: np.ndarray, qmap: np.ndarray) -> None:
    """A code whose value's sign bit differs from m's moves one index towards m's sign."""
    wrong = np.signbit(np.take(qmap, codes)) != np.signbit(m)
    if wrong.any():
        step = np.where(m[wrong] > 0, 1, -1)
        codes[wrong] = (codes[wrong].astype(np.int16) + step).astype(np.uint8)


def _check_flat(name: str, a: np.ndarray, n: int, dtype) -> None:
    if a.shape != (n,) or a.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must be a flat {np.dtype(dtype)} array of {n} elements; "
                         f"got {a.dtype} {a.shape}")


def optimizer_update_8bit_blockwise(p, g, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                    scalars: AdamScalars, dtype=None) -> int:
    """One Adam/AdamW step with 8-bit blockwise state, in place; see the module docstring.

    p, g: (n,) float32 / float16 / uint16 bf16 bits (``dtype="bfloat16"``), same dtype.
    state1, state2: uint8 (n,) codes of m (signed map qmap1) and v (unsigned map qmap2).
    absmax1, absmax2: float32 (ceil(n / 256),). qmap1, qmap2: float32 (256,), sorted.
    Returns the number of non-finite gradient elements (their p is left unchanged and their
    m and v are set to 0 before requantization).
    """
    name = _dtype(p, dtype)
    n = p.size
    nblocks = -(-n // BLOCKSIZE)
    for arg, a, dt in (("g", g, p.dtype), ("state1", state1, np.uint8),
                       ("state2", state2, np.uint8)):
        _check_flat(arg, a, n, dt)
    _check_flat("absmax1", absmax1, nblocks, np.float32)
    _check_flat("absmax2", absmax2, nblocks, np.float32)
    qmap1 = np.asarray(qmap1, _f32)
    qmap2 = np.asarray(qmap2, _f32)
    nonfinite = 0
    for a in range(0, n, _CHUNK):
        b = min(a + _CHUNK, n)
        ba, bb = a // BLOCKSIZE, -(-b // BLOCKSIZE)
        m0 = dequantize_blockwise_f32(state1[a:b], absmax1[ba:bb], qmap1, BLOCKSIZE)
        v0 = dequantize_blockwise_f32(state2[a:b], absmax2[ba:bb], qmap2, BLOCKSIZE)
        m, v, bad = _moments(_load(g[a:b], name), m0, v0, scalars)
        nonfinite += int(np.count_nonzero(bad))
        _store(p[a:b], _new_param(_load(p[a:b], name), m, v, bad, scalars), name)
        c1, absmax1[ba:bb] = quantize_blockwise_f32(m, qmap1, BLOCKSIZE)
        _sign_fix(c1, m, qmap1)
        state1[a:b] = c1
        state2[a:b], absmax2[ba:bb] = quantize_blockwise_f32(v, qmap2, BLOCKSIZE)
    return nonfinite


def optimizer_update_32bit(p, g, state1, state2, scalars: AdamScalars, dtype=None,
                           update_scale=1.0) -> int:
    """One Adam/AdamW step with float32 state (n,) each, in place; ``update_scale`` (float32,
    from ``max_unorm_scale``) multiplies the step size. Returns the non-finite count."""
    name = _dtype(p, dtype)
    n = p.size
    _check_flat("g", g, n, p.dtype)
    _check_flat("state1", state1, n, np.float32)
    _check_flat("state2", state2, n, np.float32)
    scale = None if update_scale == 1 else _f32(update_scale)
    nonfinite = 0
    for a in range(0, n, _CHUNK):
        b = min(a + _CHUNK, n)
        m, v, bad = _moments(_load(g[a:b], name), state1[a:b], state2[a:b], scalars)
        nonfinite += int(np.count_nonzero(bad))
        _store(p[a:b], _new_param(_load(p[a:b], name), m, v, bad, scalars, scale), name)
        state1[a:b] = m
        state2[a:b] = v
    return nonfinite


def update_norm_32bit(g, state1, state2, scalars: AdamScalars, dtype=None) -> float:
    """max_unorm's update norm ``|| m_hat / (sqrt(v_hat) + eps) ||`` (float64 sum of the
    float32 terms) of the step about to be taken, with m_hat = m / c1, v_hat = v / c2sq and
    m, v the new moments; elements with non-finite gradients contribute 0."""
    name = _dtype(g, dtype)
    total = 0.0
    for a in range(0, g.size, _CHUNK):
        b = min(a + _CHUNK, g.size)
        m, v, _ = _moments(_load(g[a:b], name), state1[a:b], state2[a:b], scalars)
        u = (m / scalars.c1) / (np.sqrt(v / scalars.c2sq) + scalars.eps)
        total += float(np.dot(u.astype(np.float64), u.astype(np.float64)))
    return math.sqrt(total)


def max_unorm_scale(unorm: float, pnorm: float, max_unorm: float) -> np.float32:
    """The step-size factor of max_unorm: ``max_unorm * pnorm / unorm`` when the update norm
    exceeds ``max_unorm * ||p||`` (norm of p before the step), else 1."""
    limit = float(max_unorm) * float(pnorm)
    return _f32(limit / unorm) if unorm > limit else _f32(1.0)


def percentile_clipping(g, gnorm_vec: np.ndarray, step: int, percentile: int, dtype=None):
    """Percentile clipping (bnb <= 0.49): ``gnorm_vec`` float32 (100,) is a ring of the last
    100 squared gradient norms, all set to the first at step 1, slot ``step % 100`` after.
    Returns float32 (gnorm, clip, gnorm_scale) with ``clip = sqrt(sorted(ring)[percentile])``
    and ``gnorm_scale = clip / gnorm`` if ``gnorm > clip`` else 1. Updates the ring in place."""
    if not 0 <= int(percentile) < 100:
        raise ValueError(f"percentile must be in [0, 100); got {percentile!r}")
    x = _load(np.asarray(g).reshape(-1), _dtype(g, dtype)).astype(np.float64)
    gnorm2 = _f32(np.dot(x, x))
    if step == 1:
        gnorm_vec[:] = gnorm2
    else:
        gnorm_vec[step % 100] = gnorm2
    clip = np.sqrt(np.sort(gnorm_vec)[int(percentile)])
    gnorm = np.sqrt(gnorm2)
    scale = _f32(clip / gnorm) if gnorm > clip else _f32(1.0)
    return gnorm, clip, scale
