"""Array interop for the public API: NumPy, CuPy, Numba device arrays and torch tensors in;
the caller's kind out.

A ``Call`` is made per op call from its first array argument and the chosen backend. It
turns arguments into the backend's own arrays (zero-copy through DLPack / the CUDA array
interface when the data is already on the GPU; a copy when host data meets a GPU backend
or GPU data the NumPy backend), allocates outputs with the caller's library on the
caller's device (torch's allocator for torch tensors), and hands them back in the caller's
kind. bfloat16 travels as its uint16 bit patterns (CuPy, Numba and NumPy have no bfloat16);
the logical dtype is passed beside it. GPU work runs on the caller's current stream
(torch's for tensors) and on the caller's device (``cuda:1`` is device 1).
"""
from __future__ import annotations

import sys

import numpy as np

from reference.dtypes import dtype_name as _canonical, numpy_bfloat16

_KINDS = ("numpy", "torch", "cupy", "numba")


def kind_of(x) -> str:
    """"numpy", "torch", "cupy" or "numba" for an array; TypeError for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__.split(".")[0]
    if mod == "torch" and hasattr(x, "data_ptr"):
        return "torch"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):  # a subclass (a layer's parameter class)
        return "torch"
    if mod == "cupy":
        return "cupy"
    if mod == "numba" and hasattr(x, "copy_to_host"):
        return "numba"
    raise TypeError(f"expected a NumPy, CuPy or Numba array or a torch tensor; got {type(x).__name__}")


def device_of(x) -> int | None:
    """CUDA device index of an array, or None for host memory."""
    kind = kind_of(x)
    if kind == "numpy":
        return None
    if kind == "torch":
        return x.device.index if x.device.type == "cuda" else None
    if kind == "cupy":
        return x.device.id
    if getattr(x, "_numba_type_", None) is not None or "Fake" in type(x).__name__:
        return 0  # the CUDA simulator's arrays
    return x.gpu_data._context.device.id if hasattr(x, "gpu_data") else 0


def dtype_of(x) -> str:
    """Canonical dtype name ("float16", "bfloat16", "uint8", ...) of any supported array."""
    return _canonical(x.dtype)


def shape_of(x) -> tuple:
    return tuple(x.shape)


def is_contiguous(x) -> bool:
    kind = kind_of(x)
    if kind == "torch":
        return x.is_contiguous()
    if kind == "numba":
        return x.is_c_contiguous()
    return x.flags.c_contiguous


def _torch_raw(t):
    """A torch tensor as a same-size view NumPy/DLPack can carry (bfloat16 -> int16 bits)."""
    import torch
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


class Call:
    """Conversions for one op call on ``backend`` ("numpy", "cpu", "cupy" or "numba"); the
    host backends ("numpy", "cpu") take and give host NumPy arrays."""

    def __init__(self, ref, backend: str):
        self.kind = kind_of(ref)
        self.device = device_of(ref)
        self.backend = backend
        self.on_gpu = backend not in ("numpy", "cpu")
        self._outs: dict[int, object] = {}
        self.stream = 0
        if self.kind == "torch" and self.device is not None:
            import torch
            self.stream = torch.cuda.current_stream(self.device).cuda_stream
        elif self.kind == "cupy":
            import cupy
            self.stream = cupy.cuda.get_current_stream().ptr

    # --- context for GPU launches -------------------------------------------------------
    def cupy_context(self):
        """``with call.cupy_context():`` selects the caller's device and stream for CuPy."""
        import contextlib
        import cupy
        stack = contextlib.ExitStack()
        stack.enter_context(cupy.cuda.Device(self.device or 0))
        if self.stream:
            stack.enter_context(_external_stream(self.stream))
        return stack

    def numba_stream(self):
        """The caller's stream for a Numba launch (0: the default stream)."""
        if not self.stream:
            return 0
        from numba import cuda
        return cuda.external_stream(self.stream)

    # --- arguments ----------------------------------------------------------------------
    def arg(self, x):
        """``x`` as the backend's array; bfloat16 as uint16 bits; dtype otherwise kept."""
        kind = kind_of(x)
        if device_of(x) != self.device and not (self.device is None and device_of(x) is None):
            raise ValueError(f"all arrays must be on the same device; got one on "
                             f"{_where(device_of(x))} and one on {_where(self.device)}")
        if not self.on_gpu:
            return _to_numpy(x)
        if self.backend == "cupy":
            import cupy
            if kind == "numpy":
                return cupy.asarray(_to_numpy(x))
            if kind == "torch":
                t = _torch_raw(x)
                if t.device.type == "cpu":
                    return cupy.asarray(t.numpy())
                return _torch_cuda_as_cupy(t, _raw_numpy_dtype(x))
            if kind == "numba":
                return cupy.asarray(x)
            return x.view(_raw_numpy_dtype(x))
        from numba import cuda  # numba backend
        if kind == "numba":
            return x
        if kind == "torch" and x.device.type == "cuda":
            return cuda.as_cuda_array(_torch_raw(x).detach())
        if kind == "cupy":
            return cuda.as_cuda_array(x)
        return cuda.to_device(np.ascontiguousarray(_to_numpy(x)))

    # --- outputs ------------------------------------------------------------------------
    def empty(self, shape, dtype: str):
        """A new output in the backend's kind; the caller's library allocates it when the
        caller's data is on the GPU, so that ``result`` returns it without a copy."""
        shape = tuple(int(s) for s in shape)
        if self.device is not None and self.on_gpu:
            owner = _allocate(self.kind, shape, dtype, self.device)
            view = self.arg(owner) if self.kind != "numba" else owner
            self._outs[id(view)] = owner
            return view
        raw = _raw_numpy_dtype_name(dtype)
        if not self.on_gpu:
            return np.empty(shape, raw)
        if self.backend == "cupy":
            import cupy
            with self.cupy_context():
                return cupy.empty(shape, raw)
        from numba import cuda
        return cuda.device_array(shape, raw)

    def from_host(self, values: np.ndarray):
        """A small read-only host array (a codebook) in the caller's kind, on the caller's
        device; cached, so that no op copies host data while a CUDA graph is captured."""
        if self.kind == "numpy":
            return values
        key = (self.kind, self.device, values.dtype.str, values.tobytes())
        if key not in _constants:
            _constants[key] = self._from_host(values)
        return _constants[key]

    def _from_host(self, values: np.ndarray):
        if self.kind == "torch":
            import torch
            t = torch.from_numpy(np.array(values))
            return t if self.device is None else t.to(f"cuda:{self.device}")
        if self.kind == "cupy":
            import cupy
            with cupy.cuda.Device(self.device):
                return cupy.asarray(values)
        from numba import cuda
        return cuda.to_device(values)

    def add_scalar(self, a, value: np.float32):
        """``a + value`` in float32 for a backend array (one rounding per element)."""
        if self.backend == "numba":
            from numba import cuda
            host = a.copy_to_host() + value
            return cuda.to_device(host)
        if self.backend == "cupy":
            with self.cupy_context():
                return a + value
        return a + value

    def result(self, out, dtype: str):
        """Backend output ``out`` (of logical dtype ``dtype``) in the caller's kind."""
        if id(out) in self._outs:
            return self._outs.pop(id(out))
        host = out
        if self.backend == "cupy":
            host = out.get()
        elif self.backend == "numba":
            host = out.copy_to_host()
        host = np.asarray(host)
        if self.kind == "numpy":
            return host.view(numpy_bfloat16()) if dtype == "bfloat16" else host
        if self.kind == "torch":
            import torch
            t = torch.from_numpy(np.ascontiguousarray(host))
            if dtype == "bfloat16":
                t = t.view(torch.bfloat16)
            return t if self.device is None else t.to(f"cuda:{self.device}")
        if self.kind == "cupy":
            import cupy
            return cupy.asarray(host)
        from numba import cuda
        return cuda.to_device(host)


def contiguous(A):
    """A itself when C-contiguous, else a contiguous copy in A's own library and device."""
    if is_contiguous(A):
        return A
    kind = kind_of(A)
    if kind == "torch":
        return A.contiguous()
    if kind == "cupy":
        import cupy
        return cupy.ascontiguousarray(A)
    if kind == "numba":
        from numba import cuda
        return cuda.to_device(np.ascontiguousarray(A.copy_to_host()))
    return np.ascontiguousarray(A)


def run(call: "Call", impl, *args, **kwargs):
    """Call a backend implementation; GPU backends run in the caller's device and stream."""
    if call.backend == "cupy":
        with call.cupy_context():
            return impl(*args, **kwargs)
    if call.backend == "numba":
        return impl(*args, stream=call.numba_stream(), **kwargs)
    return impl(*args, **kwargs)


_streams: dict = {}
_constants: dict = {}


class _StreamPointer:
    """A raw cudaStream_t in the CUDA stream protocol (``__cuda_stream__``)."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _external_stream(ptr: int):
    """A CuPy stream object for a stream another library (torch) owns; cached per pointer."""
    import cupy
    s = _streams.get(ptr)
    if s is None:
        if hasattr(cupy.cuda.Stream, "from_external"):
            s = cupy.cuda.Stream.from_external(_StreamPointer(ptr))
        else:
            s = cupy.cuda.ExternalStream(ptr)
        _streams[ptr] = s
    return s


def torch_stream(t) -> tuple[int, int]:
    """(device index, torch's current stream on that device as a raw cudaStream_t) for a CUDA
    tensor t: where the torch hot paths launch. torch._C's raw-stream query where this torch
    has it (torch.cuda.current_stream builds a Stream object per call, several times slower:
    the layers' eager steps pay it for every launch group)."""
    d = t.get_device()
    raw = _RAW_STREAM[0] if _RAW_STREAM else _raw_stream_query()
    return d, raw(d)


_RAW_STREAM: list = []
_NO_SWITCH = None


def on_torch_device(device: int):
    """A context that makes ``device`` torch's (and so the driver's) current CUDA device for a
    launch: a no-op when it already is (the usual case: one cheap query), else
    ``torch.cuda.device(device)``. A prepared launch (raw cuLaunchKernel) runs in the
    current context, so a layer on cuda:1 called while cuda:0 is current needs the switch."""
    global _NO_SWITCH
    import torch
    if torch._C._cuda_getDevice() == device:
        if _NO_SWITCH is None:
            import contextlib
            _NO_SWITCH = contextlib.nullcontext()
        return _NO_SWITCH
    return torch.cuda.device(device)


def _raw_stream_query():
    import torch
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        raw = lambda d: torch.cuda.current_stream(d).cuda_stream  # noqa: E731
    _RAW_STREAM.append(raw)
    return raw


class on_stream:
    """``with on_stream(device, stream):`` selects device ``device`` and the external stream
    ``stream`` (a raw cudaStream_t, e.g. from torch_stream) for CuPy launches; ``stream=None``
    keeps the current one. The device is switched only when it is not already current, and
    the stream objects are cached (``_external_stream``): per-launch host cost matters on the
    hot paths."""

    __slots__ = ("_dev", "_stream", "_prev_dev", "_s")

    def __init__(self, device: int | None, stream: int | None):
        self._dev, self._stream = device, stream

    def __enter__(self):
        import cupy
        self._prev_dev = None
        if self._dev is not None:
            cur = cupy.cuda.runtime.getDevice()
            if cur != self._dev:
                cupy.cuda.runtime.setDevice(self._dev)
                self._prev_dev = cur
        self._s = None
        if self._stream is not None:
            self._s = _external_stream(self._stream)
            self._s.__enter__()
        return self

    def __exit__(self, *exc):
        if self._s is not None:
            self._s.__exit__(*exc)
        if self._prev_dev is not None:
            import cupy
            cupy.cuda.runtime.setDevice(self._prev_dev)
        return False


def _torch_cuda_as_cupy(t, dtype):
    """A zero-copy CuPy view of a CUDA tensor from its pointer (the tensor stays its owner).
    Cheaper than a DLPack exchange (~28 us) on every call; strides are kept."""
    import cupy
    if t.numel() == 0:
        with cupy.cuda.Device(t.device.index):
            return cupy.empty(tuple(t.shape), dtype)
    itemsize = t.element_size()
    extent = (sum((d - 1) * st for d, st in zip(t.shape, t.stride())) + 1) * itemsize
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), extent, t, t.device.index)
    strides = tuple(st * itemsize for st in t.stride())
    return cupy.ndarray(tuple(t.shape), dtype, cupy.cuda.MemoryPointer(mem, 0), strides=strides)


def _where(device) -> str:
    return "the host" if device is None else f"cuda:{device}"


def _raw_numpy_dtype_name(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def _raw_numpy_dtype(x):
    return np.dtype(_raw_numpy_dtype_name(dtype_of(x)))


def _to_numpy(x) -> np.ndarray:
    """Host NumPy copy or view of any array; bfloat16 becomes uint16 bits."""
    kind = kind_of(x)
    if kind == "numpy":
        return x.view(np.uint16) if dtype_of(x) == "bfloat16" else x
    if kind == "torch":
        return _torch_raw(x).detach().cpu().numpy().view(_raw_numpy_dtype(x))
    if kind == "cupy":
        return x.get()
    return x.copy_to_host()


def _allocate(kind: str, shape: tuple, dtype: str, device: int):
    if kind == "torch":
        import torch
        return torch.empty(shape, dtype=getattr(torch, dtype), device=f"cuda:{device}")
    if kind == "cupy":
        import cupy
        with cupy.cuda.Device(device):
            return cupy.empty(shape, dtype)
    from numba import cuda
    with cuda.gpus[device]:
        return cuda.device_array(shape, dtype)

