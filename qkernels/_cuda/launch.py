"""Prepared kernel launches: the argument block of a kernel built once, a few slots set per call.

The torch layers call a kernel per token; a CuPy ``Function.__call__`` converts and checks every
argument on every launch (tens of microseconds for a dozen arguments once the layer's other
Python is added), so the hot paths keep one ``PreparedLaunch`` per (weight, kernel): the
arguments that depend only on the weight (its pointers, its shape, the block size) are written
into a ctypes argument block when the weight is quantized or moved; a call writes the slots that
depend on the input (x, out, rows) and calls ``cuLaunchKernel`` (through CuPy's driver binding)
on the stream it is given. Nothing is allocated per call.

Argument types (one character each, as the kernel declares them): ``p`` a pointer (64 bits),
``i`` int32, ``l`` int64, ``f`` float32. Getting one wrong shifts every later argument, so each
caller spells its kernel's signature once, next to the kernel's name.
"""
from __future__ import annotations

import ctypes
import threading

__all__ = ["PreparedLaunch", "PlanCache", "memset_async"]

_CTYPES = {"p": ctypes.c_uint64, "i": ctypes.c_int32, "l": ctypes.c_int64, "f": ctypes.c_float}
_CUDA = []


def _driver():
    """cupy.cuda.driver, imported on first use (importing qkernels never touches CUDA)."""
    if not _CUDA:
        from cupy.cuda import driver, runtime
        _CUDA.extend((driver, runtime))
    return _CUDA[0]


def memset_async(ptr: int, nbytes: int, stream: int) -> None:
    """Zero ``nbytes`` at device address ``ptr`` on ``stream`` (a raw cudaStream_t): one
    cudaMemsetAsync, captured by CUDA graphs like a kernel."""
    _driver()
    _CUDA[1].memsetAsync(ptr, 0, nbytes, stream)


class PreparedLaunch:
    """``PreparedLaunch(function, signature, fixed, variable, grid, block, smem=0)``.

    function: a ``cupy.cuda.Function`` (its ``ptr`` is the CUfunction; it must belong to the
    device the launch runs on); signature: the kernel's argument types (module docstring);
    fixed: ``{index: value}`` of the arguments that never change; variable: the indices set per
    call, in the order ``__call__`` takes them; grid/block: 3-tuples (grid may be overridden per
    call along x); smem: dynamic shared memory in bytes.

    ``launch(stream, v0, v1, ..., grid_x=None, smem=None)`` writes the variable slots and
    launches on ``stream`` (a raw cudaStream_t); grid_x and smem override the prepared grid
    size along x and the dynamic shared memory for this launch. Thread-safe: the write and the launch happen under one lock (the driver
    copies the argument values at launch).
    """

    __slots__ = ("function", "_fptr", "_slots", "_params", "_params_ptr", "_var", "grid", "block",
                 "smem", "_lock")

    def __init__(self, function, signature: str, fixed: dict, variable: tuple, grid, block, smem: int = 0):
        unknown = set(signature) - set(_CTYPES)
        if unknown:
            raise ValueError(f"signature has unknown argument types {sorted(unknown)}; use p, i, l, f")
        covered = set(fixed) | set(variable)
        if covered != set(range(len(signature))) or len(covered) != len(fixed) + len(variable):
            raise ValueError(f"every one of the {len(signature)} arguments must be either fixed or "
                             f"variable, once; got fixed {sorted(fixed)}, variable {list(variable)}")
        self.function = function  # keeps the module (and so the CUfunction) alive
        self._fptr = int(function.ptr)
        self._slots = [_CTYPES[c]() for c in signature]
        for i, v in fixed.items():
            self._slots[i].value = v
        self._params = (ctypes.c_void_p * len(signature))(*[ctypes.addressof(s) for s in self._slots])
        self._params_ptr = ctypes.addressof(self._params)
        self._var = tuple(self._slots[i] for i in variable)
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.block = tuple(block) + (1,) * (3 - len(block))
        self.smem = int(smem)
        self._lock = threading.Lock()

    def launch(self, stream: int, *values, grid_x: int | None = None, smem: int | None = None) -> None:
        gx, gy, gz = self.grid
        bx, by, bz = self.block
        args = (self._fptr, gx if grid_x is None else grid_x, gy, gz, bx, by, bz,
                self.smem if smem is None else smem, stream, self._params_ptr, 0)
        with self._lock:
            for slot, v in zip(self._var, values):
                slot.value = v
            try:
                _driver().launchKernel(*args)
            except _driver().CUDADriverError as e:
                if "INVALID_CONTEXT" not in str(e):
                    raise
                # a thread with no current context (torch's autograd threads select their
                # device without creating one): make the current device's primary context
                # current, as any CUDA runtime call there would, and launch again
                runtime = _CUDA[1]
                runtime.setDevice(runtime.getDevice())
                _driver().launchKernel(*args)


class PlanCache:
    """Plans (objects holding prepared launches) keyed by the addresses, shapes and kinds of
    the tensors they were made for, at most ``size`` of them (the oldest goes first).

    For ops called without a layer to keep their plan (torch.compile calls the declared op):
    a cached plan must hold no tensor, so that a freed model frees its memory, and a call
    finds it only when its own live tensors sit at the addresses in the key, so the plan's
    pointers are that call's.
    """

    def __init__(self, size: int = 1024):
        from collections import OrderedDict
        self._plans = OrderedDict()
        self._size = size

    def get(self, key, make):
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make()
            if len(self._plans) > self._size:
                self._plans.popitem(last=False)
        return plan
