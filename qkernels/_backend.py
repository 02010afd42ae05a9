"""Backend selection: which implementation of an op runs for a given input.

An op's table is a literal dict next to its public function, ``{"numpy": f, "cupy": g,
"numba": h}``. ``choose(table, on_gpu)`` picks the backend the user asked for
(``use_backend`` or ``QKERNELS_BACKEND``), else the fastest one for the data's device,
and falls back, with one warning per cause, when the asked one cannot load.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings

BACKENDS = ("cupy", "numba", "numpy")  # fastest first
# The use_backend blocks in force, innermost last. A ContextVar, not a threading.local: each
# thread and each asyncio task has its own value (a task starts with a copy of its creator's),
# so one task's block never leaks into another task interleaved on the same thread.
_requested: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "qkernels_requested_backends", default=())
_warned: set = set()


@functools.lru_cache(maxsize=None)
def backend_status(name: str) -> tuple[bool, str]:
    """(usable, reason) for a backend; probed once per process, never raises."""
    if name == "numpy":
        return True, "always available"
    try:
        if name == "cupy":
            import cupy
            count = cupy.cuda.runtime.getDeviceCount()
            if count < 1:
                return False, "no CUDA device"
            return True, f"cupy {cupy.__version__}, {count} device(s)"
        if name == "numba":
            from numba import cuda
            if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
                return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
            if not cuda.is_available():
                return False, "numba.cuda finds no CUDA device/driver"
            return True, f"{len(cuda.gpus)} device(s)"
    except Exception as exc:  # ImportError, CUDA driver errors, ...
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """The backends that load on this machine, fastest first."""
    return [b for b in BACKENDS if backend_status(b)[0]]


_ENV_DATA = getattr(os.environ, "_data", None)  # os.environ's own dict (encoded keys and values)
_ENV_KEY = os.environ.encodekey("QKERNELS_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend() -> str | None:
    """QKERNELS_BACKEND as os.environ holds it now. Read from os.environ's own dict: the
    torch hot paths ask per call, and os.environ.get costs more than the rest of the check."""
    if _ENV_DATA is None or _ENV_KEY is None:
        return os.environ.get("QKERNELS_BACKEND")
    value = _ENV_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)


def requested_backend() -> str | None:
    """The backend asked for by ``use_backend`` (the innermost block of this thread or
    asyncio task) or else ``QKERNELS_BACKEND``; None when neither asks for one."""
    stack = _requested.get()
    name = stack[-1] if stack else (_env_backend() or None)
    if name is not None and name not in BACKENDS:
        raise ValueError(f"QKERNELS_BACKEND must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on ``name`` ("numpy", "cupy" or "numba").

    Context-local (``contextvars``) and nestable: the choice holds in this thread or asyncio
    task only (a task created inside the block inherits it), and leaving the block restores
    exactly what was in force on entry, whatever other tasks did meanwhile."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    token = _requested.set(_requested.get() + (name,))
    try:
        yield
    finally:
        _requested.reset(token)


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def choose(table: dict, on_gpu: bool) -> tuple[str, object]:
    """(backend name, implementation) for data on the GPU (``on_gpu``) or the host."""
    asked = requested_backend()
    order = [asked] if asked else []
    order += [b for b in BACKENDS if on_gpu or b == "numpy"]
    for name in order:
        if name not in table:
            continue
        ok, why = backend_status(name)
        if ok:
            return name, table[name]
        if name == asked:
            _warn_once(f"qkernels: backend {name!r} cannot load ({why}); falling back")
    raise RuntimeError(f"no backend can run this op; tried {order}")


def takes_cuda_path(t) -> bool:
    """Whether the torch tensor ``t`` may take the CUDA kernels' raw-pointer path: it is a
    CUDA tensor, CuPy loads, and no other backend was asked for (``use_backend``,
    ``QKERNELS_BACKEND``). The one test every torch hot path makes before its launch."""
    return t.is_cuda and requested_backend() in (None, "cupy") and backend_status("cupy")[0]


def lazy(module: str, attr: str):
    """A table entry that imports ``module`` only when first called."""
    def call(*args, **kwargs):
        fn = getattr(importlib.import_module(module, __package__), attr)
        return fn(*args, **kwargs)
    call.__qualname__ = f"{module}.{attr}"
    return call
