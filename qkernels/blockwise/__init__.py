"""Blockwise 8-bit quantization, public API: validate, choose a backend, call.

    quantize_blockwise(A, code=None, blocksize=4096, nested=False) -> (codes, QuantState)
    dequantize_blockwise(codes, state, out_dtype=None) -> array

Implementations: reference/blockwise.py (numpy, the oracle), blockwise.cu + _cupy.py
(cupy), _numba.py (numba). All three give bit-identical codes, absmax and values.
"""
from __future__ import annotations

import numpy as np

from reference import blockwise as ref
from reference.codebooks import dynamic_map
from reference.dtypes import (bf16_bits_to_float32, check_float_dtype, dtype_name,
                              float32_to_bf16_bits)
from reference.state import QuantState
from .._backend import choose, lazy
from .._interop import Call, device_of, dtype_of, kind_of, contiguous as _contiguous, run as _run

__all__ = ["quantize_blockwise", "dequantize_blockwise"]


def _numpy_quantize(x, dtype, code, blocksize, codes, absmax, stream=None):
    f32 = bf16_bits_to_float32(x) if dtype == "bfloat16" else np.asarray(x, np.float32)
    codes[:], absmax[:] = ref.quantize_blockwise_f32(f32, code, blocksize)


def _numpy_dequantize(codes, code, absmax, blocksize, dtype, out, stream=None):
    f32 = ref.dequantize_blockwise_f32(codes, absmax, code, blocksize)
    out[:] = float32_to_bf16_bits(f32) if dtype == "bfloat16" else f32.astype(dtype)


_QUANTIZE = {
    "numpy": _numpy_quantize,
    "cupy": lazy(".blockwise._cupy", "quantize_blockwise"),
    "numba": lazy(".blockwise._numba", "quantize_blockwise"),
}
_DEQUANTIZE = {
    "numpy": _numpy_dequantize,
    "cupy": lazy(".blockwise._cupy", "dequantize_blockwise"),
    "numba": lazy(".blockwise._numba", "dequantize_blockwise"),
}


_ARRAY_KINDS = "a NumPy, CuPy or Numba array or a torch tensor"


def _check_array(x, argname: str, what: str = "") -> str:
    """The array kind of ``x`` ("numpy", "torch", "cupy", "numba"); a TypeError naming
    ``argname`` for anything else (a list, a dict, None)."""
    try:
        return kind_of(x)
    except TypeError:
        raise TypeError(f"{argname} must be {_ARRAY_KINDS}{what}; got {type(x).__name__}") from None


def quantize_blockwise(A, code=None, blocksize: int = 4096, nested: bool = False):
    """Blockwise 8-bit quantization of A (NumPy, CuPy, Numba or torch; float16, bfloat16 or
    float32; any shape). code: sorted (256,) codebook array of any of those kinds (default the
    signed dynamic map). Returns (codes uint8 of A's shape, QuantState with float32
    (ceil(n/blocksize),) absmax) in A's kind and on A's device; see reference.blockwise for
    the exact rule. ``nested=True`` quantizes absmax again (same blocksize, offset = the
    mean of its finite values): ``state.absmax`` uint8 codes, ``state.offset`` a float."""
    _check_array(A, "A")
    name = ref.check_blockwise_args(dtype_of(A), blocksize)
    ref.check_nested_flag(nested)
    if code is not None:
        _check_array(code, "code", " of 256 sorted float32 values")
    code = dynamic_map(True) if code is None else ref.check_code(_host(code))
    backend, impl = choose(_QUANTIZE, on_gpu=device_of(A) is not None)
    call = Call(A, backend)
    shape = tuple(A.shape)
    n = int(np.prod(shape, dtype=np.int64))
    nblocks = -(-n // blocksize)
    x = call.arg(_contiguous(A)).reshape(-1)
    codes, absmax = call.empty((n,), "uint8"), call.empty((nblocks,), "float32")
    _run(call, impl, x, name, code, int(blocksize), codes, absmax)
    codes = call.result(codes, "uint8").reshape(shape)
    state = QuantState(absmax=call.result(absmax, "float32"), shape=shape,
                       code=call.from_host(code), dtype=name, blocksize=int(blocksize))
    if nested:
        _nest_absmax(state, int(blocksize))
    return codes, state


def _nest_absmax(state: QuantState, blocksize: int) -> None:
    """Nest ``state.absmax`` (float32 (nblocks,), any kind) in place: quantized around the
    float32 mean of its finite values (reference.blockwise.finite_mean: a NaN/Inf block must
    not reach the offset, or every block would dequantize to NaN), same blocksize."""
    absmax = state.absmax
    offset = ref.finite_mean(_host(absmax))
    if kind_of(absmax) == "numba":   # Numba device arrays have no arithmetic operators
        from numba import cuda
        shifted = cuda.to_device(absmax.copy_to_host() - offset)
    else:
        shifted = absmax - offset
    state.absmax, state.state2 = quantize_blockwise(shifted, blocksize=blocksize)
    state.offset = float(offset)


def _host(a) -> np.ndarray:
    """A host NumPy copy (or view) of an array of any supported kind."""
    kind = kind_of(a)
    if kind == "torch":
        return a.detach().cpu().numpy()
    if kind == "cupy":
        return a.get()
    if kind == "numba":
        return a.copy_to_host()
    return np.asarray(a)


def _check_state(codes_size: int, state: QuantState, argname: str = "state") -> None:
    """Validate a blockwise state against codes of ``codes_size`` elements, nested part and
    offset included, before any work: TypeError/ValueError naming the field."""
    if not isinstance(state, QuantState):
        raise TypeError(f"{argname} must be a QuantState; got {type(state).__name__}")
    _check_array(state.absmax, f"{argname}.absmax", " of block scales")
    _check_array(state.code, f"{argname}.code", " of 256 float32 values")
    check_float_dtype(dtype_name(state.dtype), f"{argname}.dtype")
    ref.check_blockwise_args(state.dtype, state.blocksize)
    nblocks = -(-codes_size // state.blocksize)
    if int(np.prod(state.absmax.shape)) != nblocks:
        raise ValueError(f"{argname}.absmax has {int(np.prod(state.absmax.shape))} blocks but codes "
                         f"of size {codes_size} with blocksize {state.blocksize} need {nblocks}")
    if tuple(state.code.shape) != (256,):
        raise ValueError(f"{argname}.code must have shape (256,); got {tuple(state.code.shape)}")
    if dtype_of(state.code) != "float32":
        raise TypeError(f"{argname}.code must be float32; got {dtype_of(state.code)}")
    if state.state2 is not None:
        _check_state(nblocks, state.state2, f"{argname}.state2")
        ref.nested_offset(state, argname)


def _absmax_f32(call: Call, state: QuantState, argname: str = "state"):
    """The state's float32 absmax as a backend array, dequantizing nested statistics."""
    if state.state2 is None:
        if dtype_of(state.absmax) != "float32":
            raise TypeError(f"{argname}.absmax must be float32; got {dtype_of(state.absmax)}")
        return call.arg(state.absmax).reshape(-1)
    if dtype_of(state.absmax) != "uint8":
        raise TypeError(f"a nested state's absmax ({argname}.absmax) must hold uint8 codes; got "
                        f"{dtype_of(state.absmax)}")
    s2 = state.state2
    out = call.empty((int(np.prod(state.absmax.shape)),), "float32")
    _, impl = choose(_DEQUANTIZE, on_gpu=call.backend != "numpy")
    _run(call, impl, call.arg(state.absmax).reshape(-1), call.arg(s2.code),
         _absmax_f32(call, s2, f"{argname}.state2"), int(s2.blocksize), "float32", out)
    return call.add_scalar(out, ref.nested_offset(state, argname))


def dequantize_blockwise(codes, state: QuantState, out_dtype=None):
    """Inverse of quantize_blockwise: ``code[codes] * absmax[block]`` in float32, rounded
    once to ``out_dtype`` (default ``state.dtype``); codes' shape, kind and device.
    codes: uint8 array of any kind; state: the QuantState quantize_blockwise returned (its
    absmax and code arrays, nested part and float offset included)."""
    _check_array(codes, "codes")
    if dtype_of(codes) != "uint8":
        raise TypeError(f"codes must be uint8; got {dtype_of(codes)}")
    shape = tuple(codes.shape)
    n = int(np.prod(shape, dtype=np.int64))
    _check_state(n, state)
    name = dtype_name(out_dtype) if out_dtype is not None else dtype_name(state.dtype)
    check_float_dtype(name, "out_dtype")
    backend, impl = choose(_DEQUANTIZE, on_gpu=device_of(codes) is not None)
    call = Call(codes, backend)
    absmax = _absmax_f32(call, state)
    code = call.arg(state.code)
    out = call.empty((n,), name)
    _run(call, impl, call.arg(_contiguous(codes)).reshape(-1), code, absmax,
         int(state.blocksize), name, out)
    return call.result(out, name).reshape(shape)
