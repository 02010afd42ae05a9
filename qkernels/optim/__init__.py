"""Fused Adam/AdamW updates, public array API: validate, choose a backend, call.

    optimizer_update_8bit_blockwise(p, g, state1, state2, absmax1, absmax2, qmap1=None,
                                    qmap2=None, *, lr, betas, eps, weight_decay, step,
                                    gnorm_scale=1.0, nonfinite=None) -> None
    optimizer_update_32bit(p, g, state1, state2, *, lr, betas, eps, weight_decay, step,
                           gnorm_scale=1.0, update_scale=1.0, nonfinite=None) -> None

In place on NumPy, CuPy or Numba arrays or torch tensors (contiguous, all on one device).
Implementations: reference/optim.py (numpy, the oracle), optim.cu + _cupy.py (cupy),
_numba.py (numba), _cpu.py (cpu: Numba CPU, 8-bit state; host data runs it by default); all
give bit-identical p, codes and absmax. Host data runs on cpu (the 8-bit update) or
numpy unless a GPU backend is asked for (``use_backend``, QKERNELS_BACKEND); then it is
copied to the GPU and every array the update writes is copied back into the caller's
memory. ``nonfinite``: an int32 (1,) array on the data's device that receives the number
of non-finite gradient elements (their p is left unchanged and their moments reset to 0:
docs/FORMATS.md §11.3). ``gnorm_scale`` (on the gradient) and ``update_scale`` (on the step
size) are finite numbers >= 0: percentile clipping and max_unorm give factors in [0, 1],
and 0 is reachable (a clip of 0 after all-zero gradients, a parameter of norm 0).
The optimizers in torch_ops.optim call the CuPy launchers directly with raw pointers.
"""
from __future__ import annotations

import math

import numpy as np

from reference import optim as ref
from reference.blockwise import check_code
from reference.codebooks import dynamic_map
from .._backend import choose, lazy
from .._interop import Call, _to_numpy, device_of, dtype_of, is_contiguous, kind_of

__all__ = ["optimizer_update_8bit_blockwise", "optimizer_update_32bit"]

_FLOAT = ("float32", "float16", "bfloat16")


def _numel(x) -> int:
    return int(np.prod(tuple(x.shape), dtype=np.int64))


def _host_view(x) -> np.ndarray:
    """A flat NumPy view sharing x's memory (host data only); bfloat16 as uint16 bits."""
    kind = kind_of(x)
    if kind == "torch":
        import torch
        if x.dtype == torch.bfloat16:
            return x.detach().view(torch.int16).numpy().reshape(-1).view(np.uint16)
        return x.detach().numpy().reshape(-1)
    return _to_numpy(x).reshape(-1)


def _ptr(x) -> int:
    kind = kind_of(x)
    if kind == "torch":
        return x.data_ptr()
    if kind == "cupy":
        return x.data.ptr
    return x.device_ctypes_pointer.value


def _check(p, g, states: dict, absmaxes: dict):
    """Validate shapes, dtypes, devices and layout; returns (dtype name, n)."""
    kind_of(p)
    name = dtype_of(p)
    if name not in _FLOAT:
        raise TypeError(f"p must be float32, float16 or bfloat16; got {name}")
    n = _numel(p)
    if dtype_of(g) != name or _numel(g) != n:
        raise ValueError(f"g must match p ({name}, {n} elements); got {dtype_of(g)}, {_numel(g)}")
    for arg, (x, dt, size) in {**states, **absmaxes}.items():
        if dtype_of(x) != dt or _numel(x) != size:
            raise ValueError(f"{arg} must be {dt} with {size} elements; got {dtype_of(x)} with "
                             f"{_numel(x)}")
    arrays = {"p": p, "g": g, **{k: v[0] for k, v in {**states, **absmaxes}.items()}}
    for arg, x in arrays.items():
        if device_of(x) != device_of(p):
            raise ValueError(f"{arg} is on {device_of(x)} but p on {device_of(p)}: every array "
                             f"must be on p's device")
        if not is_contiguous(x):
            raise ValueError(f"{arg} must be contiguous (it is updated in place)")
    return name, n


def _count_into(nonfinite, count: int) -> None:
    if nonfinite is not None and count:
        nonfinite[0] += count


def _numpy_8bit(p, g, s1, s2, a1, a2, qmap1, qmap2, name, scalars, nonfinite):
    count = ref.optimizer_update_8bit_blockwise(
        _host_view(p), _host_view(g), _host_view(s1), _host_view(s2), _host_view(a1),
        _host_view(a2), qmap1, qmap2, scalars, name)
    _count_into(nonfinite, count)


def _numpy_32bit(p, g, s1, s2, name, scalars, update_scale, nonfinite):
    count = ref.optimizer_update_32bit(_host_view(p), _host_view(g), _host_view(s1),
                                       _host_view(s2), scalars, name, update_scale)
    _count_into(nonfinite, count)


def _cupy_8bit(p, g, s1, s2, a1, a2, qmap1, qmap2, name, scalars, nonfinite):
    from . import _cupy
    call = Call(p, "cupy")
    _cupy.optimizer_update_8bit_blockwise(
        _ptr(p), _ptr(g), _ptr(s1), _ptr(s2), _ptr(a1), _ptr(a2), qmap1=qmap1, qmap2=qmap2,
        n=_numel(p), dtype=name, scalars=scalars, nonfinite=0 if nonfinite is None else _ptr(nonfinite), device=call.device,
        stream=call.stream)


def _cupy_32bit(p, g, s1, s2, name, scalars, update_scale, nonfinite):
    from . import _cupy
    call = Call(p, "cupy")
    scalars = scalars._replace(step_size=np.float32(update_scale * scalars.step_size)) \
        if update_scale != 1 else scalars
    _cupy.optimizer_update_32bit(_ptr(p), _ptr(g), _ptr(s1), _ptr(s2), n=_numel(p), dtype=name, scalars=scalars,
                                 nonfinite=0 if nonfinite is None else _ptr(nonfinite),
                                 device=call.device, stream=call.stream)


def _numba_args(call: Call, *arrays):
    return [call.arg(x).reshape(-1) if kind_of(x) != "numba" else x.reshape(-1) for x in arrays]


def _numba_8bit(p, g, s1, s2, a1, a2, qmap1, qmap2, name, scalars, nonfinite):
    from . import _numba
    call = Call(p, "numba")
    args = _numba_args(call, p, g, s1, s2, a1, a2)
    count = None if nonfinite is None else call.arg(nonfinite)
    _numba.optimizer_update_8bit_blockwise(*args, qmap1=qmap1, qmap2=qmap2, dtype=name, scalars=scalars,
                                           nonfinite=count,
                                           stream=call.numba_stream())


def _numba_32bit(p, g, s1, s2, name, scalars, update_scale, nonfinite):
    from . import _numba
    call = Call(p, "numba")
    args = _numba_args(call, p, g, s1, s2)
    count = None if nonfinite is None else call.arg(nonfinite)
    _numba.optimizer_update_32bit(*args, dtype=name, scalars=scalars, update_scale=float(update_scale),
                                  nonfinite=count, stream=call.numba_stream())


_UPDATE_8BIT = {"numpy": _numpy_8bit, "cupy": _cupy_8bit, "numba": _numba_8bit,
                "cpu": lazy(".optim._cpu", "optimizer_update_8bit_blockwise")}
_UPDATE_32BIT = {"numpy": _numpy_32bit, "cupy": _cupy_32bit, "numba": _numba_32bit}


def _choose(table, p):
    """(backend name, implementation) for an update of p's data."""
    on_gpu = device_of(p) is not None
    backend, impl = choose(table, on_gpu=on_gpu)
    if backend == "numpy" and on_gpu:
        raise ValueError("the optimizer update runs in place: GPU data needs the cupy or numba "
                         "backend (the numpy backend takes host data)")
    return backend, impl


def _to_gpu(backend: str, host: np.ndarray):
    if backend == "cupy":
        import cupy
        return cupy.asarray(host)
    from numba import cuda
    return cuda.to_device(host)


def _to_host(backend: str, dev, host: np.ndarray) -> None:
    if backend == "cupy":
        dev.get(out=host)  # on the current stream, which the launch used: waits for it
    else:
        dev.copy_to_host(host)


def _run(table, arrays: tuple, rest: tuple, nonfinite) -> None:
    """``impl(*arrays, *rest, nonfinite)`` on the chosen backend. arrays = (p, g, states...):
    everything but g is updated in place. Host data under a GPU backend runs on device
    copies (the current device), and p, the states and the counter are copied back into
    the caller's memory (through NumPy views of it: numpy arrays or CPU tensors)."""
    backend, impl = _choose(table, arrays[0])
    if backend in ("numpy", "cpu") or device_of(arrays[0]) is not None:
        impl(*arrays, *rest, nonfinite)
        return
    hosts = [_host_view(x) for x in arrays]
    count = None if nonfinite is None else _host_view(nonfinite)
    devs = [_to_gpu(backend, h) for h in hosts]
    dev_count = None if count is None else _to_gpu(backend, count)
    impl(*devs, *rest, dev_count)
    for i, (dev, host) in enumerate(zip(devs, hosts)):
        if i != 1:  # g is only read
            _to_host(backend, dev, host)
    if count is not None:
        _to_host(backend, dev_count, count)


def _check_scale(argname: str, value) -> None:
    """ValueError unless ``value`` is a finite real number >= 0 (NaN would zero every moment
    or write NaN into p; a negative factor would step up the gradient)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value) and value >= 0)
    if not ok:
        what = "gradient" if argname == "gnorm_scale" else "step size"
        raise ValueError(f"{argname} must be a finite number >= 0 (a factor on the {what}); "
                         f"got {value!r}")


def _check_counter(nonfinite, p):
    if nonfinite is not None and (dtype_of(nonfinite) != "int32" or _numel(nonfinite) != 1
                                  or device_of(nonfinite) != device_of(p)):
        raise ValueError("nonfinite must be an int32 array of one element on p's device")


def optimizer_update_8bit_blockwise(p, g, state1, state2, absmax1, absmax2, qmap1=None,
                                    qmap2=None, *, lr: float, betas=(0.9, 0.999),
                                    eps: float = 1e-8, weight_decay: float = 0.0, step: int,
                                    gnorm_scale: float = 1.0, nonfinite=None) -> None:
    """One Adam/AdamW step (step 1-based) with 8-bit blockwise state, in place.

    p, g: float32/float16/bfloat16, same shape (any) and dtype. state1, state2: uint8 with
    p's element count (codes of m with qmap1, of v with qmap2). absmax1, absmax2: float32
    (ceil(n / 256),). qmap1/qmap2 default to the signed/unsigned dynamic maps. Weight decay
    is decoupled and applied after the step (Adam and AdamW alike); see reference.optim.
    gnorm_scale: a finite number >= 0 multiplying the gradient (percentile clipping's).
    """
    n = _numel(p) if hasattr(p, "shape") else None
    nblocks = -(-(n or 0) // ref.BLOCKSIZE)
    name, n = _check(p, g, {"state1": (state1, "uint8", n), "state2": (state2, "uint8", n)},
                     {"absmax1": (absmax1, "float32", nblocks),
                      "absmax2": (absmax2, "float32", nblocks)})
    _check_counter(nonfinite, p)
    _check_scale("gnorm_scale", gnorm_scale)
    q1 = dynamic_map(True) if qmap1 is None else check_code(_to_numpy(qmap1), argname="qmap1")
    q2 = dynamic_map(False) if qmap2 is None else check_code(_to_numpy(qmap2), argname="qmap2")
    scalars = ref.adam_scalars(lr, betas, eps, weight_decay, step, gnorm_scale)
    if n == 0:
        return
    _run(_UPDATE_8BIT, (p, g, state1, state2, absmax1, absmax2), (q1, q2, name, scalars),
         nonfinite)


def optimizer_update_32bit(p, g, state1, state2, *, lr: float, betas=(0.9, 0.999),
                           eps: float = 1e-8, weight_decay: float = 0.0, step: int,
                           gnorm_scale: float = 1.0, update_scale: float = 1.0,
                           nonfinite=None) -> None:
    """One Adam/AdamW step with float32 state (state1 = m, state2 = v, p's element count),
    in place. ``gnorm_scale`` multiplies the gradient, ``update_scale`` the step size
    (max_unorm's factor, float32): finite numbers >= 0."""
    n = _numel(p) if hasattr(p, "shape") else None
    name, n = _check(p, g, {"state1": (state1, "float32", n), "state2": (state2, "float32", n)}, {})
    _check_counter(nonfinite, p)
    _check_scale("gnorm_scale", gnorm_scale)
    _check_scale("update_scale", update_scale)
    scalars = ref.adam_scalars(lr, betas, eps, weight_decay, step, gnorm_scale)
    if n == 0:
        return
    _run(_UPDATE_32BIT, (p, g, state1, state2), (name, scalars, np.float32(update_scale)),
         nonfinite)

