"""Blockwise 8-bit quantization, public API: validate, choose a backend, call.

    quantize_blockwise(A, code=None, absmax=None, out=None, blocksize=4096, nested=False)
        -> (codes, QuantState)
    dequantize_blockwise(A, quant_state=None, absmax=None, code=None, out=None, blocksize=4096,
                         nested=False, *, state=None, out_dtype=None) -> array

bitsandbytes' signatures (``bitsandbytes.functional``), with our ``state=`` / ``out_dtype=``
keywords besides.

Implementations: reference/blockwise.py (numpy, the oracle), blockwise.cu + _cupy.py
(cupy), _numba.py (numba), _cpu.py (cpu: Numba CPU kernels for host data). All give
bit-identical codes, absmax and values.
"""
from __future__ import annotations

import numpy as np

from reference import blockwise as ref
from reference.codebooks import dynamic_map
from reference.dtypes import (bf16_bits_to_float32, check_float_dtype, dtype_name,
                              float32_to_bf16_bits)
from reference.state import QuantState, host_array
from .._backend import backend_table, choose
from .._interop import Call, device_of, dtype_of, kind_of, contiguous as _contiguous, run as _run
from .._compat import ArgTypeError, bnb_arg_errors, is_array, resolve_state, write_out

__all__ = ["quantize_blockwise", "dequantize_blockwise"]


def _numpy_quantize(x, dtype, code, blocksize, codes, absmax, stream=None):
    f32 = bf16_bits_to_float32(x) if dtype == "bfloat16" else np.asarray(x, np.float32)
    codes[:], absmax[:] = ref.quantize_blockwise_f32(f32, code, blocksize)


def _numpy_dequantize(codes, code, absmax, blocksize, dtype, out, stream=None):
    f32 = ref.dequantize_blockwise_f32(codes, absmax, code, blocksize)
    out[:] = float32_to_bf16_bits(f32) if dtype == "bfloat16" else f32.astype(dtype)


_QUANTIZE = backend_table(_numpy_quantize, "blockwise", "quantize_blockwise")
_DEQUANTIZE = backend_table(_numpy_dequantize, "blockwise", "dequantize_blockwise")


_ARRAY_KINDS = "a NumPy, CuPy or Numba array or a torch tensor"


def _check_array(x, argname: str, what: str = "") -> str:
    """The array kind of ``x`` ("numpy", "torch", "cupy", "numba"); a TypeError naming
    ``argname`` for anything else (a list, a dict, None)."""
    try:
        return kind_of(x)
    except TypeError:
        raise TypeError(f"{argname} must be {_ARRAY_KINDS}{what}; got {type(x).__name__}") from None


def quantize_blockwise(A, code=None, absmax=None, out=None, blocksize: int = 4096,
                       nested: bool = False):
    """Blockwise 8-bit quantization of A (NumPy, CuPy, Numba or torch; float16, bfloat16 or
    float32; any shape). code: sorted (256,) codebook array of any of those kinds (default the
    signed dynamic map). Returns (codes uint8 of A's shape, QuantState with float32
    (ceil(n/blocksize),) absmax) in A's kind and on A's device; see reference.blockwise for
    the exact rule. ``nested=True`` quantizes absmax again (same blocksize, offset = the
    mean of its finite values): ``state.absmax`` uint8 codes, ``state.offset`` a float.

    bitsandbytes' ``out`` (uint8, A's shape) receives the codes and is returned in their
    place; ``absmax`` receives ``state.absmax`` (as many elements, its dtype) and becomes it.
    An int in absmax's place is a blocksize: the earlier order (A, code, blocksize, nested)."""
    if absmax is not None and not is_array(absmax) and isinstance(absmax, (int, np.integer)):
        absmax, out, blocksize, nested = None, None, absmax, out if out is not None else nested
    with bnb_arg_errors():
        _check_array(A, "A")
        name = ref.check_blockwise_args(dtype_of(A), blocksize)
        ref.check_nested_flag(nested)
        if code is not None:
            _check_array(code, "code", " of 256 sorted float32 values")
        for arg, argname in ((absmax, "absmax"), (out, "out")):
            if arg is not None:
                _check_array(arg, argname)
    code = dynamic_map(True) if code is None else ref.check_code(host_array(code))
    backend, impl = choose(_QUANTIZE, on_gpu=device_of(A) is not None)
    call = Call(A, backend)
    shape = tuple(A.shape)
    n = int(np.prod(shape, dtype=np.int64))
    nblocks = -(-n // blocksize)
    x = call.arg(_contiguous(A)).reshape(-1)
    codes, absmax_out = call.empty((n,), "uint8"), call.empty((nblocks,), "float32")
    _run(call, impl, x, name, code, int(blocksize), codes, absmax_out)
    codes = call.result(codes, "uint8").reshape(shape)
    state = QuantState(absmax=call.result(absmax_out, "float32"), shape=shape,
                       code=call.from_host(code), dtype=name, blocksize=int(blocksize))
    if nested:
        _nest_absmax(state, int(blocksize))
    if out is not None:
        codes = write_out(out, codes)
    if absmax is not None:
        state.absmax = _store_into(absmax, state.absmax, "absmax")
    return codes, state


def _store_into(dest, values, argname: str):
    """``values`` written into the caller's array ``dest`` (same kind and element count; cast
    to dest's dtype, as bitsandbytes' ``copy_``); returns dest."""
    if kind_of(dest) != kind_of(values) or device_of(dest) != device_of(values):
        raise TypeError(f"{argname} must be a {kind_of(values)} array on the data's device")
    if int(np.prod(dest.shape)) != int(np.prod(values.shape)):
        raise ValueError(f"{argname} must hold {int(np.prod(values.shape))} values; "
                         f"got shape {tuple(dest.shape)}")
    if kind_of(dest) == "torch":
        dest.copy_(values.reshape(dest.shape))
    elif kind_of(dest) == "numba":
        dest.copy_to_device(values.copy_to_host().reshape(dest.shape).astype(dest.dtype))
    else:
        dest[...] = values.reshape(dest.shape)
    return dest


def _nest_absmax(state: QuantState, blocksize: int) -> None:
    """Nest ``state.absmax`` (float32 (nblocks,), any kind) in place: quantized around the
    float32 mean of its finite values (reference.blockwise.finite_mean: a NaN/Inf block must
    not reach the offset, or every block would dequantize to NaN), same blocksize."""
    absmax = state.absmax
    offset = ref.finite_mean(host_array(absmax))
    if kind_of(absmax) == "numba":   # Numba device arrays have no arithmetic operators
        from numba import cuda
        shifted = cuda.to_device(absmax.copy_to_host() - offset)
    else:
        shifted = absmax - offset
    state.absmax, state.state2 = quantize_blockwise(shifted, blocksize=blocksize)
    state.offset = float(offset)


def _check_state(codes_size: int, state: QuantState, argname: str = "state") -> None:
    """Validate a blockwise state against codes of ``codes_size`` elements, nested part and
    offset included, before any work: TypeError/ValueError naming the field."""
    if not isinstance(state, QuantState):
        raise ArgTypeError(f"{argname} must be a QuantState; got {type(state).__name__}")
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
    _, impl = choose(_DEQUANTIZE, on_gpu=call.on_gpu)
    _run(call, impl, call.arg(state.absmax).reshape(-1), call.arg(s2.code),
         _absmax_f32(call, s2, f"{argname}.state2"), int(s2.blocksize), "float32", out)
    return call.add_scalar(out, ref.nested_offset(state, argname))


def dequantize_blockwise(A, quant_state: QuantState | None = None, absmax=None, code=None,
                         out=None, blocksize: int = 4096, nested: bool = False, *,
                         state: QuantState | None = None, out_dtype=None):
    """Inverse of quantize_blockwise: ``code[A] * absmax[block]`` in float32, rounded once to
    ``out_dtype`` (default the state's dtype); A's shape, kind and device. A: uint8 codes of
    any kind; the state (``quant_state``, or our name ``state``): what quantize_blockwise
    returned (ours or bitsandbytes'), nested part and offset included.

    Without a state, bitsandbytes' form: ``absmax`` (float32 block scales) with ``code``
    (default the signed dynamic map) and ``blocksize``; dtype float32 (or out's). ``out``
    (the result's shape and dtype) receives the values and is returned. ``nested`` is
    ignored, as in bitsandbytes (a nested state says so itself)."""
    with bnb_arg_errors():
        _check_array(A, "codes", " (argument A)")
        if dtype_of(A) != "uint8":
            raise TypeError(f"codes must be uint8 (argument A); got {dtype_of(A)}")
        state = resolve_state(quant_state, state)
        if out is not None:
            _check_array(out, "out")
            if out_dtype is None:
                out_dtype = dtype_of(out)
        if state is None:
            state = _state_from_parts(A, absmax, code, blocksize, out_dtype)
        shape = tuple(A.shape)
        n = int(np.prod(shape, dtype=np.int64))
        _check_state(n, state)
        name = dtype_name(out_dtype) if out_dtype is not None else dtype_name(state.dtype)
        check_float_dtype(name, "out_dtype")
    backend, impl = choose(_DEQUANTIZE, on_gpu=device_of(A) is not None)
    call = Call(A, backend)
    absmax = _absmax_f32(call, state)
    code = call.arg(state.code)
    result = call.empty((n,), name)
    _run(call, impl, call.arg(_contiguous(A)).reshape(-1), code, absmax,
         int(state.blocksize), name, result)
    result = call.result(result, name).reshape(shape)
    return result if out is None else write_out(out, result)


def _state_from_parts(A, absmax, code, blocksize, out_dtype) -> QuantState:
    """bitsandbytes' stateless call: a QuantState of absmax, code (default the signed dynamic
    map, on A's device) and blocksize."""
    if absmax is None:
        raise ValueError("dequantize_blockwise needs quant_state (or state), or absmax (with "
                         "code and blocksize)")
    _check_array(absmax, "absmax")
    ref.check_blockwise_args("float32", blocksize)
    if code is None:
        code = Call(A, "numpy").from_host(dynamic_map(True))
    else:
        _check_array(code, "code", " of 256 sorted float32 values")
    return QuantState(absmax=absmax, code=code, blocksize=int(blocksize),
                      dtype=dtype_name(out_dtype) if out_dtype is not None else "float32")
