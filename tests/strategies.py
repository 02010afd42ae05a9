"""Hypothesis strategies shared by every family's tests."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
# sizes around block boundaries, primes and 1
SIZES = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 63, 64, 65, 127, 256, 257, 509,
                                                        1021, 4095, 4096, 4097, 8191, 12289]))


def shapes(max_elems: int = 20000):
    """Shapes of 1-3 dims whose element count is at most ``max_elems`` (dims 1 and primes)."""
    dim = st.one_of(st.integers(1, 40), st.sampled_from([1, 2, 3, 7, 31, 61, 127, 257]))
    return st.lists(dim, min_size=1, max_size=3).filter(
        lambda s: int(np.prod(s)) <= max_elems).map(tuple)


@st.composite
def float_arrays(draw, shape=None, dtype=None, specials: bool = False, zero_blocks: bool = True):
    """(float32 values, dtype name): values already representable in ``dtype``, scales 1e-6
    to 1e4, optional runs of zeros and (``specials``) NaN / +-Inf."""
    shape = draw(shapes()) if shape is None else shape
    dtype = draw(st.sampled_from(FLOAT_DTYPES)) if dtype is None else dtype
    n = int(np.prod(shape))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = 10.0 ** draw(st.floats(-6, 4))
    kind = draw(st.sampled_from(["normal", "uniform", "heavy", "ints"]))
    if kind == "normal":
        x = rng.standard_normal(n) * scale
    elif kind == "uniform":
        x = rng.uniform(-scale, scale, n)
    elif kind == "heavy":
        x = rng.standard_cauchy(n) * scale
    else:
        x = rng.integers(-3, 4, n).astype(np.float64)
    if zero_blocks and n > 8 and draw(st.booleans()):
        a = draw(st.integers(0, n - 1))
        x[a:a + draw(st.integers(1, n))] = 0.0
    if specials and n > 0:
        for value in draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf]), max_size=3)):
            x[draw(st.integers(0, n - 1))] = value
    x = round_to(x.astype(np.float32), dtype)
    return x.reshape(shape), dtype


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to ``dtype`` and back (so they are exact in it)."""
    from reference.dtypes import bf16_bits_to_float32, float32_to_bf16_bits
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return bf16_bits_to_float32(float32_to_bf16_bits(x))
    return x.astype(np.float32)


def as_numpy(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a NumPy array of ``dtype`` (bfloat16 through ml_dtypes)."""
    if dtype == "bfloat16":
        import ml_dtypes
        return x32.astype(ml_dtypes.bfloat16)
    return x32.astype(dtype)


def as_torch(x32: np.ndarray, dtype: str, device: str = "cpu"):
    import torch
    return torch.from_numpy(np.ascontiguousarray(x32)).to(device=device, dtype=getattr(torch, dtype))
