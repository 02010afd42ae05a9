"""4-bit NF4/FP4 quantization and the 4-bit matmul, public API: validate, choose, call.

    quantize_4bit(A, blocksize=64, quant_type="fp4", compress_statistics=False,
                  quant_storage="uint8") -> (packed, QuantState)
    dequantize_4bit(packed, state, out_dtype=None) -> array of state.dtype, state.shape
    quantize_nf4 / quantize_fp4 / dequantize_nf4 / dequantize_fp4: the shorthands
    matmul_4bit(x, packed, state, bias=None) = x @ dequantize_4bit(packed, state).T + bias

Implementations: reference/fourbit.py (numpy, the oracle), fourbit.cu + _cupy.py (cupy),
_numba.py (numba). Quantization and dequantization are bit-identical on every backend.
matmul_4bit runs a fused kernel (each packed byte read once: gemv_4bit for one row of x,
matmul_4bit for more) for x with at most
``FUSED_MAX_ROWS`` rows on CUDA data, else dequantizes and calls the GEMM of x's library
(torch.matmul / cupy.matmul, i.e. cuBLAS).
"""
from __future__ import annotations

import numpy as np

from reference import fourbit as ref
from reference.blockwise import dequantize_blockwise_f32
from reference.codebooks import dynamic_map
from reference.dtypes import bf16_bits_to_float32, dtype_name, float32_to_bf16_bits
from reference.state import QuantState
from .._backend import choose, lazy
from .._interop import (Call, _to_numpy, device_of, dtype_of, kind_of, contiguous as _contiguous,
                       run as _run)

__all__ = ["quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4",
           "dequantize_nf4", "dequantize_fp4", "matmul_4bit", "FUSED_MAX_ROWS"]

# Largest number of rows of x (after flattening leading dims) that the fused kernel takes;
# above it, dequantize + cuBLAS. The crossover measured on an H200 (benchmarks/fourbit.py,
# 2026-12-02, 4096x4096, 8192x8192 and 4096x14336 bf16 weights): fused faster at 8 rows on
# every shape, dequantize + cuBLAS faster at 16.
FUSED_MAX_ROWS = 8


def _numpy_quantize(x, dtype, quant_type, blocksize, packed, absmax, stream=None):
    f32 = bf16_bits_to_float32(x) if dtype == "bfloat16" else np.asarray(x, np.float32)
    p, a = ref.quantize_4bit_f32(f32, quant_type, blocksize)
    packed[:p.size] = p
    packed[p.size:] = 0
    absmax[:] = a


def _numpy_dequantize(packed, code, absmax, blocksize, dtype, out, nested=None, stream=None):
    if nested is not None:
        qabs, code2, absmax2, offset = nested
        absmax = dequantize_blockwise_f32(qabs, absmax2, code2, ref.NESTED_BLOCKSIZE) \
            + np.float32(offset[0])
    f32 = ref.dequantize_4bit_f32(packed, absmax, code, blocksize, out.size)
    out[:] = float32_to_bf16_bits(f32) if dtype == "bfloat16" else f32.astype(dtype)


_QUANTIZE = {
    "numpy": _numpy_quantize,
    "cupy": lazy(".fourbit._cupy", "quantize_4bit"),
    "numba": lazy(".fourbit._numba", "quantize_4bit"),
}
_DEQUANTIZE = {
    "numpy": _numpy_dequantize,
    "cupy": lazy(".fourbit._cupy", "dequantize_4bit"),
    "numba": lazy(".fourbit._numba", "dequantize_4bit"),
}






def _flat_bytes(call: Call, packed):
    """The packed data of any storage dtype and orientation as flat uint8, backend array."""
    a = call.arg(_contiguous(packed)).reshape(-1)
    if call.backend == "numba":
        return a.view(np.uint8) if a.dtype != np.uint8 else a
    return a.view(np.uint8)


def _storage_result(call: Call, packed_bytes, storage: str):
    """Packed uint8 result (padded to the storage itemsize) in the caller's kind, viewed as
    ``(elements, 1)`` of quant_storage."""
    out = call.result(packed_bytes, "uint8")
    kind = call.kind
    if kind == "torch":
        import torch
        return (out if storage == "uint8" else out.view(getattr(torch, storage))).reshape(-1, 1)
    if kind == "numpy":
        return ref.pack_storage(out, storage)
    if storage == "uint8":
        return out.reshape(-1, 1)
    if storage == "bfloat16":
        storage = "uint16"  # CuPy and Numba have no bfloat16: its bit patterns
    return out.view(np.dtype(storage)).reshape(-1, 1)


def _finite_mean(absmax, kind: str):
    """f32(mean of the finite values) of a float32 absmax vector, on its device (no host
    sync for torch/cupy CUDA data: the 0-d result stays there); 0 when none is finite."""
    if kind == "torch":
        import torch
        fin = torch.isfinite(absmax)
        total = torch.where(fin, absmax, torch.zeros((), dtype=absmax.dtype, device=absmax.device))
        return (total.double().sum() / fin.sum().clamp(min=1).double()).float()
    if kind == "cupy":
        import cupy
        fin = cupy.isfinite(absmax)
        total = cupy.where(fin, absmax, 0).astype(cupy.float64).sum()
        return (total / cupy.maximum(fin.sum(), 1)).astype(cupy.float32)
    host = _host(absmax)
    finite = host[np.isfinite(host)]
    return np.float32(finite.mean(dtype=np.float64)) if finite.size else np.float32(0)


def _host(a) -> np.ndarray:
    kind = kind_of(a) if not isinstance(a, (list, tuple, float, int, np.floating)) else "numpy"
    if kind == "torch":
        return a.detach().cpu().numpy()
    if kind == "cupy":
        return a.get()
    if kind == "numba":
        return a.copy_to_host()
    return np.asarray(a)


def quantize_4bit(A, blocksize: int = 64, quant_type: str = "fp4",
                  compress_statistics: bool = False, quant_storage="uint8"):
    """4-bit NF4/FP4 quantization of A (NumPy, CuPy, Numba or torch; float16, bfloat16 or
    float32; any shape). Returns (packed, QuantState) in A's kind and on A's device:
    packed ``(ceil(n/2), 1)`` uint8 (or ``(ceil(ceil(n/2)/s), 1)`` of quant_storage),
    state.absmax float32 (ceil(n/blocksize),). ``compress_statistics=True`` quantizes absmax
    again (8-bit, blocks of 256, offset = mean of its finite values; on CUDA data the offset
    stays a 0-d device array, so the call needs no host sync). See reference.fourbit."""
    kind_of(A)
    name = ref.check_4bit_args(dtype_of(A), blocksize, quant_type)
    storage = ref.check_storage(quant_storage)
    if not isinstance(compress_statistics, (bool, np.bool_)):
        raise TypeError(f"compress_statistics must be a bool; got {compress_statistics!r}")
    blocksize = int(blocksize)
    backend, impl = choose(_QUANTIZE, on_gpu=device_of(A) is not None)
    call = Call(A, backend)
    shape = tuple(A.shape)
    n = int(np.prod(shape, dtype=np.int64))
    nblocks = -(-n // blocksize)
    s = ref.STORAGE_DTYPES[storage]
    nbytes = -(-ref.packed_bytes(n) // s) * s
    x = call.arg(_contiguous(A)).reshape(-1)
    packed, absmax = call.empty((nbytes,), "uint8"), call.empty((nblocks,), "float32")
    # CUDA data on the CuPy backend nests the statistics in one more launch (nest_absmax_4bit;
    # the quantize kernel sums the finite absmax values on the way)
    fused_nest = (compress_statistics and backend == "cupy" and nblocks > 0
                  and call.kind in ("torch", "cupy") and call.device is not None)
    if fused_nest:
        from . import _cupy
        partials = call.empty((2 * _cupy.max_quantize_ctas(call.device),), "float64")
        ctas = _run(call, impl, x, name, quant_type, blocksize, packed, absmax, partials=partials)
    else:
        _run(call, impl, x, name, quant_type, blocksize, packed, absmax)
    packed = _storage_result(call, packed, storage)
    state = QuantState(absmax=call.result(absmax, "float32"), shape=shape,
                       code=call.from_host(ref.code_4bit(quant_type).copy()), dtype=name,
                       blocksize=blocksize, quant_type=quant_type)
    if fused_nest:
        nb2 = -(-nblocks // ref.NESTED_BLOCKSIZE)
        qabs, absmax2 = call.empty((nblocks,), "uint8"), call.empty((nb2,), "float32")
        offset = call.empty((1,), "float32")
        _run(call, _cupy.nest_absmax_4bit, absmax, partials, ctas, qabs, absmax2, offset)
        # what quantize_blockwise(absmax - offset, blocksize=256) returns, and the 0-d offset
        state.absmax = call.result(qabs, "uint8")
        state.state2 = QuantState(absmax=call.result(absmax2, "float32"), shape=(nblocks,),
                                  code=call.from_host(dynamic_map(True)), dtype="float32",
                                  blocksize=ref.NESTED_BLOCKSIZE)
        state.offset = call.result(offset, "float32").reshape(())
    elif compress_statistics:
        from ..blockwise import quantize_blockwise
        absmax = state.absmax
        offset = _finite_mean(absmax, call.kind if device_of(absmax) is not None else "numpy")
        state.absmax, state.state2 = quantize_blockwise(absmax - offset, blocksize=ref.NESTED_BLOCKSIZE)
        state.offset = float(offset) if isinstance(offset, np.floating) else offset
    return packed, state


def quantize_nf4(A, blocksize: int = 64, compress_statistics: bool = False, quant_storage="uint8"):
    return quantize_4bit(A, blocksize, "nf4", compress_statistics, quant_storage)


def quantize_fp4(A, blocksize: int = 64, compress_statistics: bool = False, quant_storage="uint8"):
    return quantize_4bit(A, blocksize, "fp4", compress_statistics, quant_storage)


def _check_state(packed, state) -> int:
    n = ref.check_4bit_state(state, tuple(packed.shape), dtype_of(packed))
    if state.state2 is None:
        if dtype_of(state.absmax) != "float32":
            raise TypeError(f"state.absmax must be float32; got {dtype_of(state.absmax)}")
    else:
        if dtype_of(state.absmax) != "uint8":
            raise TypeError(f"a nested state's absmax must hold uint8 codes; got {dtype_of(state.absmax)}")
        s2 = state.state2
        if dtype_of(s2.absmax) != "float32" or tuple(s2.code.shape) != (256,):
            raise ValueError("state.state2 must hold float32 absmax and a (256,) code")
        need = -(-int(np.prod(state.absmax.shape)) // ref.NESTED_BLOCKSIZE)
        if int(np.prod(s2.absmax.shape)) != need:
            raise ValueError(f"state.state2.absmax has {int(np.prod(s2.absmax.shape))} blocks; "
                             f"{int(np.prod(state.absmax.shape))} nested values need {need}")
        if state.offset is None:
            raise ValueError("a nested state needs state.offset")
    if dtype_of(state.code) != "float32":
        raise TypeError(f"state.code must be float32; got {dtype_of(state.code)}")
    for what, arr in (("state.absmax", state.absmax), ("state.code", state.code)):
        if device_of(arr) != device_of(packed):
            where = lambda d: "the host" if d is None else f"cuda:{d}"  # noqa: E731
            raise ValueError(f"{what} is on {where(device_of(arr))} but packed is on "
                             f"{where(device_of(packed))}; move the state with the data")
    return n


def _offset_arg(call: Call, offset):
    """The nested offset as a float32 (1,) backend array."""
    if isinstance(offset, (float, int, np.floating)):
        return call.arg(call.from_host(np.array([offset], np.float32)))
    if dtype_of(offset) != "float32":
        offset = offset.float() if kind_of(offset) == "torch" else offset.astype(np.float32)
    return call.arg(offset.reshape(1))


def _absmax_args(call: Call, state: QuantState):
    """(absmax float32 backend array or None, nested tuple or None)."""
    if state.state2 is None:
        return call.arg(state.absmax).reshape(-1), None
    s2 = state.state2
    return None, (call.arg(state.absmax).reshape(-1), call.arg(s2.code).reshape(-1),
                  call.arg(s2.absmax).reshape(-1), _offset_arg(call, state.offset))


def dequantize_4bit(packed, state: QuantState, out_dtype=None):
    """Inverse of quantize_4bit: ``code[nibble] * absmax[block]`` in float32 (nested
    statistics dequantized first), rounded once to ``out_dtype`` (default state.dtype),
    shaped ``state.shape``, in packed's kind and on its device. packed may be (m, 1), (1, m)
    or flat, of any quant_storage dtype (bitsandbytes' checkpoints included)."""
    kind_of(packed)
    n = _check_state(packed, state)
    name = dtype_name(out_dtype) if out_dtype is not None else dtype_name(state.dtype)
    ref.check_float_dtype(name, "out_dtype")
    backend, impl = choose(_DEQUANTIZE, on_gpu=device_of(packed) is not None)
    call = Call(packed, backend)
    absmax, nested = _absmax_args(call, state)
    out = call.empty((n,), name)
    extra = {}
    if nested is not None and backend == "numba":
        # Numba dequantizes the nested absmax in a pass of its own: its float32 workspace is
        # allocated here, by the caller's allocator (torch's under a CUDA graph capture)
        extra["workspace"] = call.empty((int(np.prod(state.absmax.shape)),), "float32")
    _run(call, impl, _flat_bytes(call, packed), call.arg(state.code).reshape(-1), absmax,
         int(state.blocksize), name, out, nested, **extra)
    return call.result(out, name).reshape(tuple(state.shape))


def dequantize_nf4(packed, state: QuantState, out_dtype=None):
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_nf4 needs an nf4 state; got quant_type {state.quant_type!r}")
    return dequantize_4bit(packed, state, out_dtype)


def dequantize_fp4(packed, state: QuantState, out_dtype=None):
    if state.quant_type != "fp4":
        raise ValueError(f"dequantize_fp4 needs an fp4 state; got quant_type {state.quant_type!r}")
    return dequantize_4bit(packed, state, out_dtype)


# --- matmul_4bit -----------------------------------------------------------------------------

def _absmax_f32(packed, state: QuantState):
    """The state's float32 absmax in packed's kind (nested statistics dequantized)."""
    if state.state2 is None:
        return state.absmax
    from ..blockwise import dequantize_blockwise
    s2 = state.state2
    a = dequantize_blockwise(state.absmax, QuantState(absmax=s2.absmax, code=s2.code,
                                                      dtype="float32", blocksize=s2.blocksize),
                             out_dtype="float32")
    offset = state.offset
    if kind_of(a) == "torch" and not isinstance(offset, (float, int, np.floating)):
        offset = offset.to(a.device)
    return a + (np.float32(offset) if isinstance(offset, (float, int, np.floating)) else offset)


def matmul_4bit(x, packed, state: QuantState, bias=None):
    """``x @ dequantize_4bit(packed, state).T + bias`` for a weight stored as (out, in).

    x: (..., in) float16 / bfloat16 / float32 (torch, CuPy or NumPy); bias: (out,) or None.
    Returns (..., out) of x's dtype and kind. CUDA data with at most FUSED_MAX_ROWS rows and
    ``in % 32 == 0`` runs the fused kernel (float32 accumulation, each packed byte read
    once); otherwise the weight is dequantized to x's dtype and multiplied by x's library
    (cuBLAS on the GPU). Host data runs the reference (float32). A weight quantized
    transposed, as (in, out), is used transposed with a DeprecationWarning, as bitsandbytes.
    """
    kind = kind_of(x)
    name = dtype_of(x)
    ref.check_float_dtype(name, "x")
    _check_state(packed, state)
    normal = ref.weight_orientation(tuple(x.shape), state)
    if device_of(x) != device_of(packed):
        raise ValueError(f"x is on {device_of(x)} but packed is on {device_of(packed)} "
                         "(None = host); move them to one device")
    out_f, in_f = state.shape if normal else state.shape[::-1]
    if bias is not None:
        if int(np.prod(bias.shape)) != out_f:
            raise ValueError(f"bias must have {out_f} elements; got shape {tuple(bias.shape)}")
        if device_of(bias) != device_of(x):
            raise ValueError("bias must be on x's device")
    if device_of(x) is None:
        host = lambda a: None if a is None else _host_float(a)  # noqa: E731
        out = ref.matmul_4bit(host(x), _to_numpy(packed), _host_state(state), host(bias))
        return _like_input(out, x, name)
    rows = int(np.prod(x.shape[:-1], dtype=np.int64))
    if kind == "torch":
        return _matmul_torch(x, packed, state, bias, normal, rows, out_f, in_f)
    if kind == "cupy":
        return _matmul_cupy(x, packed, state, bias, normal, rows, out_f, in_f)
    # numba device arrays: dequantize on the numba backend, multiply through CuPy or the host
    w = dequantize_4bit(packed, state, out_dtype=name)
    try:
        import cupy
        xc, wc = cupy.asarray(x), cupy.asarray(w)
        wc = wc if normal else wc.T
        y = xc.reshape(rows, in_f) @ wc.T
        if bias is not None:
            y += cupy.asarray(bias).reshape(-1)
        from numba import cuda
        return cuda.as_cuda_array(y.reshape(*x.shape[:-1], out_f))
    except ImportError:
        raise RuntimeError("matmul_4bit on Numba device arrays needs CuPy for the GEMM") from None


def _host_float(a) -> np.ndarray:
    """A host NumPy copy/view; bfloat16 as ml_dtypes.bfloat16."""
    h = _to_numpy(a)
    if dtype_of(a) == "bfloat16":
        from reference.dtypes import numpy_bfloat16
        return h.view(numpy_bfloat16())
    return h


def _host_state(state: QuantState) -> QuantState:
    s2 = state.state2
    return QuantState(absmax=_host(state.absmax), shape=state.shape, code=_host(state.code),
                      dtype=state.dtype, blocksize=state.blocksize, quant_type=state.quant_type,
                      offset=None if state.offset is None else float(state.offset),
                      state2=None if s2 is None else QuantState(
                          absmax=_host(s2.absmax), code=_host(s2.code), dtype=s2.dtype,
                          blocksize=s2.blocksize))


def _like_input(out: np.ndarray, x, name: str):
    if kind_of(x) == "torch":
        import torch
        t = torch.from_numpy(np.ascontiguousarray(out).view(np.uint16) if name == "bfloat16"
                             else np.ascontiguousarray(out))
        return t.view(torch.bfloat16) if name == "bfloat16" else t
    return out


def _matmul_torch(x, packed, state, bias, normal, rows, out_f, in_f):
    import torch
    from .._backend import backend_status, requested_backend
    asked = requested_backend()
    xc = x.contiguous()
    packed_c = packed.contiguous()
    if (normal and rows <= FUSED_MAX_ROWS and asked in (None, "cupy") and backend_status("cupy")[0]):
        from . import _cupy
        if _cupy.fused_ok(rows, in_f, xc.data_ptr(), packed_c.data_ptr()):
            # one launch: nested statistics are dequantized inside the kernel
            b = None if bias is None else bias.to(x.dtype).contiguous()
            return _cupy.matmul_4bit_torch(xc, packed_c, state.absmax.contiguous(), state.code.contiguous(),
                                           int(state.blocksize), out_f, b, _nested_args(state, x.device))
    w = dequantize_4bit(packed_c, state, out_dtype=x.dtype)
    if not normal:
        w = w.t()
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _nested_args(state: QuantState, device):
    """(code2, absmax2, offset) of a nested state for the fused kernel (torch tensors on
    ``device``; offset a float32 tensor or a number), or None for plain float32 absmax."""
    s2 = state.state2
    if s2 is None:
        return None
    import torch

    def f32_on_device(t):  # per-token path: attribute checks before any torch call
        ok = t.dtype == torch.float32 and t.device == device and t.is_contiguous()
        return t if ok else t.to(device=device, dtype=torch.float32).contiguous()

    offset = state.offset
    if isinstance(offset, np.ndarray):
        offset = float(offset)
    if not isinstance(offset, (float, int, np.floating)):
        offset = f32_on_device(offset)
    return f32_on_device(s2.code), f32_on_device(s2.absmax), offset


def _matmul_cupy(x, packed, state, bias, normal, rows, out_f, in_f):
    import cupy
    from .._backend import backend_status, requested_backend
    asked = requested_backend()
    xc = cupy.ascontiguousarray(x)
    name = dtype_of(x)
    if normal and rows <= FUSED_MAX_ROWS and asked in (None, "cupy") and backend_status("cupy")[0]:
        from . import _cupy
        pk = cupy.ascontiguousarray(packed).reshape(-1).view(cupy.uint8)
        if _cupy.fused_ok(rows, in_f, xc.data.ptr, pk.data.ptr):
            with cupy.cuda.Device(xc.device.id):
                nested = None
                if state.state2 is None:
                    absmax = cupy.ascontiguousarray(state.absmax, dtype=cupy.float32)
                else:
                    absmax = cupy.ascontiguousarray(state.absmax).reshape(-1)
                    s2 = state.state2
                    offset = state.offset
                    if isinstance(offset, cupy.ndarray):
                        offset = cupy.ascontiguousarray(offset, dtype=cupy.float32)
                    nested = (cupy.ascontiguousarray(s2.code, dtype=cupy.float32),
                              cupy.ascontiguousarray(s2.absmax, dtype=cupy.float32), offset)
                out = cupy.empty((rows, out_f), dtype=xc.dtype)
                b = None if bias is None else cupy.ascontiguousarray(bias, dtype=xc.dtype).reshape(-1)
                _cupy.matmul_4bit(xc.reshape(rows, in_f), pk, absmax, state.code, b, out,
                                  int(state.blocksize), name, nested)
            return out.reshape(*x.shape[:-1], out_f)
    w = dequantize_4bit(packed, state, out_dtype=name)
    w = w if normal else w.T
    y = xc.reshape(rows, in_f) @ w.T
    if bias is not None:
        y += bias.reshape(-1).astype(y.dtype)
    return y.reshape(*x.shape[:-1], out_f)
