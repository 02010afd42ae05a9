"""Backend selection: which implementation of an op runs for a given input.

An op's table is a dict next to its public function, ``{"numpy": f, "cupy": g,
"numba": h, "cpu": c}``, written out or made by ``backend_table`` (the NumPy reference and
one function name in the family's backend modules). ``choose(table, on_gpu)`` picks the
backend the user asked for (``use_backend`` or ``QKERNELS_BACKEND``), else the fastest one
for the data's device, and falls back, with one warning per cause, when the asked one
cannot load.

Backends: "cupy" and "numba" are GPU kernels (CuPy / Numba CUDA); "cpu" is Numba CPU kernels
(``@njit(parallel=True)``, cached on disk) for host data; "numpy" is the NumPy reference, the
oracle, always there. Host data tries the asked backend, then "cpu", then "numpy"; a table
without a "cpu" entry runs "numpy". A "cpu" entry takes the "numpy" entry's arguments and
writes the same outputs; when Numba fails to compile it (or its module fails to import), the
call runs the "numpy" entry instead, with one warning, and so do later calls of that op.
The "cpu" kernels run on ``torch.get_num_threads()`` threads when torch is imported.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import sys
import warnings

BACKENDS = ("cupy", "numba", "cpu", "numpy")  # fastest first
HOST_BACKENDS = ("cpu", "numpy")  # the ones that run on host arrays
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
        if name == "cpu":
            import numba
            return True, f"numba {numba.__version__} CPU, {numba.config.NUMBA_NUM_THREADS} thread(s)"
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
    """Run the ops inside the ``with`` block on ``name`` ("numpy", "cpu", "cupy" or "numba").

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
    order += [b for b in BACKENDS if b != "cpu"] if on_gpu else list(HOST_BACKENDS)
    for name in order:
        if name not in table:
            continue
        if name == "cpu":
            impl = table["cpu"]
            if impl in _cpu_failed or "numpy" not in table:
                continue
        ok, why = backend_status(name)
        if ok:
            return name, (_cpu_guard(table) if name == "cpu" else table[name])
        if name == asked:
            _warn_once(f"qkernels: backend {name!r} cannot load ({why}); falling back")
    raise RuntimeError(f"no backend can run this op; tried {order}")


def entry(table: dict, backend: str):
    """The implementation in ``table`` for a ``backend`` that ``choose`` already picked for a
    companion table (an op of several steps): "cpu" is guarded as ``choose`` guards it and
    becomes "numpy" where the table has no (working) "cpu" entry."""
    if backend == "cpu":
        impl = table.get("cpu")
        if impl is None or impl in _cpu_failed or "numpy" not in table:
            return table["numpy"]
        return _cpu_guard(table)
    return table[backend]


# "cpu" entries whose Numba kernels failed to compile (or import): their ops run "numpy"
_cpu_failed: set = set()
_cpu_guards: dict = {}
_threads = [0]  # the thread count last given to Numba


def _sync_threads() -> None:
    """Numba's CPU thread count follows torch.get_num_threads() when torch is imported
    (torch.set_num_threads then governs both); otherwise Numba's default stays."""
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    if get is None:
        return
    n = get()
    if n != _threads[0]:
        import numba
        from . import _numba_cpu  # noqa: F401  (the threading layer, before set_num_threads starts it)
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
        _threads[0] = n


def _compile_errors() -> tuple:
    from numba.core.errors import NumbaError
    return (NumbaError, ImportError)


def _cpu_guard(table: dict):
    """table["cpu"] wrapped: the thread count synced, and a Numba compile failure turned into
    one warning and the table's "numpy" entry (same arguments, same outputs), for good."""
    impl, reference = table["cpu"], table["numpy"]
    key = (id(impl), id(reference))
    guard = _cpu_guards.get(key)
    if guard is not None:
        return guard

    def guard(*args, **kwargs):
        if impl in _cpu_failed:
            return reference(*args, **kwargs)
        _sync_threads()
        try:
            from ._numba_cpu import PARALLEL_LOCK
            with PARALLEL_LOCK:
                return impl(*args, **kwargs)
        except _compile_errors() as exc:
            _cpu_failed.add(impl)
            name = getattr(impl, "__qualname__", repr(impl))
            _warn_once(f"qkernels: the Numba CPU kernel {name} failed to compile "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                       "running the NumPy reference for it instead")
            return reference(*args, **kwargs)

    guard.__qualname__ = f"cpu_guard({getattr(impl, '__qualname__', impl)})"
    _cpu_guards[key] = guard
    return guard


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so that torch's
    bfloat16 matmul is faster than its float32 one (about 3.5x on a 2-core EPYC)."""
    import torch
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


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


def backend_table(numpy_impl, family: str, name: str,
                  backends: tuple[str, ...] = ("cupy", "numba", "cpu")) -> dict:
    """An op's table: ``numpy_impl`` (the NumPy reference) under "numpy", and for each of
    ``backends`` the function ``name`` of ``qkernels.<family>._<backend>``, imported on its
    first call (``lazy``). E.g. ``backend_table(f, "blockwise", "quantize_blockwise")``."""
    return {"numpy": numpy_impl, **{b: lazy(f".{family}._{b}", name) for b in backends}}
