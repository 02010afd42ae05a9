"""bitsandbytes' codebook constructors, returning what bitsandbytes returns: torch tensors.

    create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) -> float32 (256,)
    create_linear_map(signed=True, total_bits=8, add_zero=True)       -> float32 (256,)
    create_fp8_map(signed=True, exponent_bits=5, precision_bits=2, total_bits=8) -> (256,)
    create_normal_map(offset=0.9677083, use_extra_value=True)          -> float32 (256,)
    get_4bit_type(typename, device=None, blocksize=64)                 -> float32 (16,)

The values are reference.codebooks' (NumPy), equal bit for bit to bitsandbytes'. Each returns
a new float32 CPU tensor (get_4bit_type: on ``device``), or the NumPy array when torch is
not installed; importing this module does not import torch.
"""
from __future__ import annotations

import numpy as np

from reference import codebooks as ref

__all__ = ["create_dynamic_map", "create_linear_map", "create_fp8_map", "create_normal_map",
           "get_4bit_type"]


def _as_tensor(values: np.ndarray, device=None):
    try:
        import torch
    except ImportError:
        return values
    t = torch.from_numpy(np.array(values, dtype=np.float32))
    return t if device is None else t.to(device)


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    """The dynamic (decade) 8-bit code (signed: the default code of quantize_blockwise and the
    optimizers' first moment; unsigned: their second moment); fewer bits zero-padded."""
    return _as_tensor(ref.create_dynamic_map(signed, max_exponent_bits, total_bits))


def create_linear_map(signed=True, total_bits=8, add_zero=True):
    """Evenly spaced values in [-1, 1] (or [0, 1]), zero-padded to 256 in the middle."""
    return _as_tensor(ref.create_linear_map(signed, total_bits, add_zero))


def create_fp8_map(signed=True, exponent_bits=5, precision_bits=2, total_bits=8):
    """A small-float code (E4M3 = (True, 4, 3)), normalized to [-1, 1], zero-padded to 256."""
    return _as_tensor(ref.create_fp8_map(signed, exponent_bits, precision_bits, total_bits))


def create_normal_map(offset=0.9677083, use_extra_value=True):
    """The NormalFloat code (its nonzero ends are NF4 for the defaults), padded to 256."""
    return _as_tensor(ref.create_normal_map(offset, use_extra_value))


def get_4bit_type(typename, device=None, blocksize=64):
    """The 16 values of "nf4", "fp4", "int4" or "af4" (index = 4-bit code), float32, on
    ``device``: by default CUDA when available (bitsandbytes always picks "cuda"), else the
    CPU. An unknown name raises reference.codebooks.UnsupportedCodebook, a ValueError and a
    NotImplementedError (bitsandbytes' type)."""
    values = ref.get_4bit_type(typename, blocksize)
    try:
        import torch
    except ImportError:
        return values
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _as_tensor(values, device)
