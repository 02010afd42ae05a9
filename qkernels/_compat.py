"""bitsandbytes' calling conventions, shared by the public functions of the families.

The functions of ``qkernels.blockwise``, ``.fourbit`` and ``.int8`` take bitsandbytes 0.50.2's
parameter names, order and defaults (``out=`` and ``absmax=`` included) besides our own
keywords (``state=``, ``out_dtype=``). This module holds what they share: writing a result
into a caller's ``out`` array, and the exception type for a bad argument type or dtype.
"""
from __future__ import annotations

import contextlib

import numpy as np

from reference.state import as_quant_state, is_quant_state_like
from ._interop import device_of, dtype_of, kind_of

__all__ = ["ArgTypeError", "bnb_arg_errors", "is_array", "write_out", "as_quant_state",
           "is_quant_state_like", "resolve_state"]


class ArgTypeError(TypeError, ValueError):
    """An argument of the wrong type or dtype. A TypeError (what it is), and a ValueError too:
    bitsandbytes raises ValueError for the same inputs (e.g. a float64 tensor), and code
    written against it catches that."""


@contextlib.contextmanager
def bnb_arg_errors():
    """``with bnb_arg_errors():`` around argument checks re-raises their TypeErrors as
    ArgTypeError (same message), so that they are ValueErrors as in bitsandbytes too."""
    try:
        yield
    except ArgTypeError:
        raise
    except TypeError as exc:
        raise ArgTypeError(*exc.args).with_traceback(exc.__traceback__) from None


def is_array(x) -> bool:
    """A NumPy, CuPy or Numba array or a torch tensor."""
    try:
        kind_of(x)
        return True
    except TypeError:
        return False


def resolve_state(quant_state, state, argname: str = "quant_state"):
    """The state passed as bitsandbytes' ``quant_state`` or our ``state`` keyword (not both),
    as our QuantState (bitsandbytes' read through its attributes), or None."""
    if quant_state is not None and state is not None:
        raise TypeError("pass the QuantState once, as quant_state (bitsandbytes' name) or state")
    given = quant_state if quant_state is not None else state
    if given is None:
        return None
    return as_quant_state(given, argname if quant_state is not None else "state")


def write_out(out, result, argname: str = "out"):
    """Copy ``result`` into the caller's preallocated ``out`` (same kind, device, shape and
    dtype, checked: TypeError / ValueError naming ``argname``) and return ``out``."""
    if not is_array(out):
        raise TypeError(f"{argname} must be an array of the result's kind; got {type(out).__name__}")
    kind = kind_of(result)
    if kind_of(out) != kind:
        raise TypeError(f"{argname} must be a {kind} array like the result; got a {kind_of(out)} array")
    if device_of(out) != device_of(result):
        raise ValueError(f"{argname} is on {_where(device_of(out))} but the result is on "
                         f"{_where(device_of(result))}")
    if tuple(out.shape) != tuple(result.shape):
        raise ValueError(f"{argname} must have shape {tuple(result.shape)}; got {tuple(out.shape)}")
    if dtype_of(out) != dtype_of(result):
        raise TypeError(f"{argname} must have dtype {dtype_of(result)}; got {dtype_of(out)}")
    if kind == "torch":
        out.copy_(result)
    elif kind == "numpy":
        np.copyto(out, result)
    elif kind == "cupy":
        out[...] = result
    else:  # numba device array
        out.copy_to_device(result)
    return out


def _where(device) -> str:
    return "the host" if device is None else f"cuda:{device}"
