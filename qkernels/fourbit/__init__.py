"""4-bit NF4/FP4 quantization and the 4-bit matmul, public API: validate, choose, call.

    quantize_4bit(A, absmax=None, out=None, blocksize=None (64), compress_statistics=False,
                  quant_type="fp4", quant_storage="uint8") -> (packed, QuantState)
    dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4",
                    *, state=None, out_dtype=None) -> array of state.dtype, state.shape
    quantize_nf4 / quantize_fp4 / dequantize_nf4 / dequantize_fp4: the shorthands
    matmul_4bit(x, packed, state, bias=None) = x @ dequantize_4bit(packed, state).T + bias
    gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None): the same
        product under bitsandbytes' name and arguments

bitsandbytes' signatures (``bitsandbytes.functional``), with our ``state=`` / ``out_dtype=``
keywords besides. Calls in qkernels' earlier positional order, ``quantize_4bit(A, blocksize,
quant_type, compress_statistics, quant_storage)``, still work: an int where bitsandbytes has
``absmax`` marks them.

Implementations: reference/fourbit.py (numpy, the oracle), fourbit.cu + _cupy.py (cupy),
_numba.py (numba), _cpu.py (cpu: Numba CPU kernels for host data, matmul_4bit included).
Quantization and dequantization are bit-identical on every backend.
matmul_4bit on CUDA data runs a fused kernel (each packed byte read once), as
``_cupy.choose_kernel`` picks by rows, dtype and alignment: gemv_4bit for one row of x, the
CUDA-core matmul_4bit up to ``FUSED_MAX_ROWS`` rows, the tensor-core matmul_4bit_mma
(fourbit_mma.cu) for 8-64 rows of float16 / bfloat16 x (2-64 on weights of 2^25+ elements);
else it dequantizes and calls the GEMM of x's library (torch.matmul / cupy.matmul, i.e.
cuBLAS).
"""
from __future__ import annotations

import numpy as np

from reference import fourbit as ref
from reference.blockwise import dequantize_blockwise_f32
from reference.codebooks import dynamic_map
from reference.dtypes import bf16_bits_to_float32, dtype_name, float32_to_bf16_bits
from reference.state import QuantState, host_array
from .._backend import backend_table, choose, lazy
from .._interop import (Call, _to_numpy, device_of, dtype_of, kind_of, contiguous as _contiguous,
                       run as _run)
from .._compat import ArgTypeError, as_quant_state, bnb_arg_errors, is_array, resolve_state, write_out

__all__ = ["quantize_4bit", "dequantize_4bit", "quantize_nf4", "quantize_fp4",
           "dequantize_nf4", "dequantize_fp4", "matmul_4bit", "gemv_4bit", "FUSED_MAX_ROWS"]

# Largest number of rows of x (after flattening leading dims) that the CUDA-core fused
# kernel matmul_4bit takes; above it, dequantize + cuBLAS (_cupy.choose_kernel). The crossover measured on an
# H200 (benchmarks/fourbit.py, 2026-12-02, 4096x4096, 8192x8192 and 4096x14336 bf16 weights):
# fused faster at 8 rows on every shape, dequantize + cuBLAS faster at 16.
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


_QUANTIZE = backend_table(_numpy_quantize, "fourbit", "quantize_4bit")
_DEQUANTIZE = backend_table(_numpy_dequantize, "fourbit", "dequantize_4bit")


def _numpy_matmul(x, packed, state, bias, normal):
    """matmul_4bit of host data by the reference (float32), in x's kind and dtype."""
    host = lambda a: None if a is None else _host_float(a)  # noqa: E731
    out = ref.matmul_4bit(host(x), _to_numpy(packed), _host_state(state), host(bias))
    return _like_input(out, x, dtype_of(x))


# host data only: matmul_4bit on the GPU takes its own routes (_matmul_torch, _matmul_cupy)
_MATMUL_HOST = {
    "numpy": _numpy_matmul,
    "cpu": lazy(".fourbit._cpu", "matmul_4bit"),
}


class HostWeight4bit:
    """One host (CPU) torch 4-bit weight W (N, K), as quantize_4bit stored it, prepared once
    for ``x @ W^T + bias``: what ops.Matmul4bitPlan calls per host call instead of the public
    matmul_4bit, whose per-call state checks and conversions cost about 100 us.

    ``packed`` (any storage dtype, contiguous) and ``state`` must have passed _check_state.
    Kept: ``pk``, the packed bytes as a flat uint8 NumPy view and ``code`` (16,) float32, a
    view too (in-place writes to the tensors are seen), and the state itself, whose nested
    absmax the "cpu" backend unnests once and checks per call (_cpu._block_absmax). Per
    call: x's dtype and last dimension and the bias's size and device are checked, and the host backend
    is chosen as for every op (``use_backend``)."""

    def __init__(self, packed, state: QuantState):
        self.packed, self.state = packed, state
        self.N, self.K = (int(d) for d in state.shape)
        self.blocksize = int(state.blocksize)
        self.pk = _to_numpy(packed).reshape(-1).view(np.uint8)
        self.code = _to_numpy(state.code).reshape(-1)

    def __call__(self, x, bias=None):
        """x torch (..., K) float16 / bfloat16 / float32 on the host, bias (N,) or None ->
        (..., N) of x's dtype."""
        if x.dim() == 0 or x.shape[-1] != self.K:
            raise ValueError(f"matmul_4bit: x's last dimension must be in_features {self.K}; "
                             f"got x of shape {tuple(x.shape)}")
        ref.check_float_dtype(dtype_of(x), "x")
        if bias is not None:
            if bias.numel() != self.N:
                raise ValueError(f"bias must have {self.N} elements; got shape {tuple(bias.shape)}")
            if bias.device.type != "cpu":
                raise ValueError(f"bias must be on x's device (cpu); got bias on {bias.device}")
        _, impl = choose(_MATMUL_PREPARED, on_gpu=False)
        return impl(self, x, bias)


def _numpy_matmul_prepared(w: HostWeight4bit, x, bias):
    return _numpy_matmul(x, w.packed, w.state, bias, True)


_MATMUL_PREPARED = {
    "numpy": _numpy_matmul_prepared,
    "cpu": lazy(".fourbit._cpu", "matmul_prepared"),
}


def _flat_bytes(call: Call, packed):
    """The packed data of any storage dtype and orientation as flat uint8, backend array."""
    return call.arg(_contiguous(packed)).reshape(-1).view(np.uint8)


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
    host = host_array(absmax)
    finite = host[np.isfinite(host)]
    return np.float32(finite.mean(dtype=np.float64)) if finite.size else np.float32(0)


def quantize_4bit(A, absmax=None, out=None, blocksize: int | None = None,
                  compress_statistics: bool = False, quant_type: str = "fp4",
                  quant_storage="uint8"):
    """4-bit NF4/FP4 quantization of A (NumPy, CuPy, Numba or torch; float16, bfloat16 or
    float32; any shape). Returns (packed, QuantState) in A's kind and on A's device:
    packed ``(ceil(n/2), 1)`` uint8 (or ``(ceil(ceil(n/2)/s), 1)`` of quant_storage, a NumPy
    or torch dtype or its name), state.absmax float32 (ceil(n/blocksize),); blocksize None
    means 64. ``compress_statistics=True`` quantizes absmax again (8-bit, blocks of 256,
    offset = mean of its finite values; on CUDA data the offset stays a 0-d device array,
    so the call needs no host sync). See reference.fourbit.

    bitsandbytes' ``out`` (the packed shape and dtype) receives the packed data and is
    returned in its place; ``absmax`` receives ``state.absmax`` and becomes it."""
    if absmax is not None and not is_array(absmax):
        blocksize, qt, compress_statistics, quant_storage = _earlier_order(
            absmax, out, blocksize, compress_statistics, quant_storage)
        quant_type, absmax, out = qt or quant_type, None, None
    packed, state = _quantize_4bit(A, 64 if blocksize is None else blocksize, quant_type,
                                   compress_statistics, quant_storage)
    if out is not None:
        packed = write_out(out, packed)
    if absmax is not None:
        from ..blockwise import _store_into
        state.absmax = _store_into(absmax, state.absmax, "absmax")
    return packed, state


def _earlier_order(absmax, out, blocksize, compress_statistics, quant_storage):
    """(blocksize, quant_type or None, compress_statistics, quant_storage) of a call in the
    earlier positional order ``quantize_4bit(A, blocksize, quant_type, compress_statistics,
    quant_storage)``, whose values landed in bitsandbytes' slots (absmax, out, blocksize,
    compress_statistics); the ones passed by keyword are in their own slots."""
    if isinstance(absmax, bool) or not isinstance(absmax, (int, np.integer)):
        raise ArgTypeError(f"absmax must be an array (bitsandbytes' order is quantize_4bit(A, "
                           f"absmax, out, blocksize, ...)); got {type(absmax).__name__}")
    if blocksize is not None and not isinstance(blocksize, (bool, np.bool_)):
        raise TypeError("blocksize given twice: positionally (in absmax's place) and by keyword")
    if blocksize is not None:  # compress_statistics came 4th, so quant_storage (if any) 5th
        storage = quant_storage if isinstance(compress_statistics, (bool, np.bool_)) else compress_statistics
        return int(absmax), out, blocksize, storage
    return int(absmax), out, compress_statistics, quant_storage


def _quantize_4bit(A, blocksize, quant_type, compress_statistics, quant_storage):
    with bnb_arg_errors():
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


def quantize_nf4(A, absmax=None, out=None, blocksize: int | None = None,
                 compress_statistics: bool = False, quant_storage="uint8"):
    """quantize_4bit with quant_type "nf4" (also in the earlier order (A, blocksize,
    compress_statistics, quant_storage))."""
    return _quantize_shorthand(A, absmax, out, blocksize, compress_statistics, quant_storage, "nf4")


def quantize_fp4(A, absmax=None, out=None, blocksize: int | None = None,
                 compress_statistics: bool = False, quant_storage="uint8"):
    """quantize_4bit with quant_type "fp4" (also in the earlier order (A, blocksize,
    compress_statistics, quant_storage))."""
    return _quantize_shorthand(A, absmax, out, blocksize, compress_statistics, quant_storage, "fp4")


def _quantize_shorthand(A, absmax, out, blocksize, compress_statistics, quant_storage, quant_type):
    if absmax is not None and not is_array(absmax):  # earlier order: (A, blocksize, cs, storage)
        if out is not None:
            compress_statistics = out
        if blocksize is not None:
            quant_storage = blocksize
        absmax, out, blocksize = None, None, absmax
        if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
            raise ArgTypeError(f"absmax must be an array; got {type(blocksize).__name__}")
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, quant_type, quant_storage)


def _check_state(packed, state) -> int:
    state = as_quant_state(state)  # matmul_4bit passes bitsandbytes' QuantState through as given
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


def dequantize_4bit(A, quant_state: QuantState | None = None, absmax=None, out=None,
                    blocksize: int | None = None, quant_type: str = "fp4", *,
                    state: QuantState | None = None, out_dtype=None):
    """Inverse of quantize_4bit: ``code[nibble] * absmax[block]`` in float32 (nested
    statistics dequantized first), rounded once to ``out_dtype`` (default the state's
    dtype), shaped ``state.shape``, in A's kind and on its device. A, the packed data, may
    be (m, 1), (1, m) or flat, of any quant_storage dtype (bitsandbytes' checkpoints
    included). The state (``quant_state``, or our name ``state``) is what quantize_4bit
    returned, ours or bitsandbytes'; blocksize and quant_type are then ignored.

    Without a state, bitsandbytes' form: float32 ``absmax`` with ``out`` (whose shape and
    dtype are the result's), ``blocksize`` (default 64) and ``quant_type``. ``out`` receives
    the values and is returned. Unlike bitsandbytes, a (1, m) A is not transposed back:
    the result always has the state's shape."""
    with bnb_arg_errors():
        kind_of(A)
        state = resolve_state(quant_state, state)
        if out is not None:
            if not is_array(out):
                raise TypeError(f"out must be an array of A's kind; got {type(out).__name__}")
            if out_dtype is None:
                out_dtype = dtype_of(out)
        if state is None:
            state = _state_from_parts(A, absmax, out, blocksize, quant_type)
        n = _check_state(A, state)
        name = dtype_name(out_dtype) if out_dtype is not None else dtype_name(state.dtype)
        ref.check_float_dtype(name, "out_dtype")
    backend, impl = choose(_DEQUANTIZE, on_gpu=device_of(A) is not None)
    call = Call(A, backend)
    absmax, nested = _absmax_args(call, state)
    result = call.empty((n,), name)
    _run(call, impl, _flat_bytes(call, A), call.arg(state.code).reshape(-1), absmax,
         int(state.blocksize), name, result, nested)
    result = call.result(result, name).reshape(tuple(state.shape))
    return result if out is None else write_out(out, result)


def _state_from_parts(A, absmax, out, blocksize, quant_type) -> QuantState:
    """bitsandbytes' stateless call: absmax, with out giving the shape and dtype."""
    if absmax is None or out is None:
        raise ValueError("dequantize_4bit needs quant_state (or state), or both absmax and out "
                         "(out gives the result's shape and dtype)")
    kind_of(absmax)
    blocksize = ref.check_blocksize(64 if blocksize is None else blocksize)
    code = Call(A, "numpy").from_host(ref.code_4bit(quant_type).copy())
    return QuantState(absmax=absmax, shape=tuple(out.shape), code=code, blocksize=blocksize,
                      quant_type=quant_type, dtype=dtype_of(out))


def dequantize_nf4(A, quant_state: QuantState | None = None, absmax=None, out=None,
                   blocksize: int | None = None, *, state: QuantState | None = None, out_dtype=None):
    """dequantize_4bit of NF4 data (ValueError for a state of another quant_type)."""
    return _dequantize_shorthand(A, quant_state, absmax, out, blocksize, state, out_dtype, "nf4")


def dequantize_fp4(A, quant_state: QuantState | None = None, absmax=None, out=None,
                   blocksize: int | None = None, *, state: QuantState | None = None, out_dtype=None):
    """dequantize_4bit of FP4 data (ValueError for a state of another quant_type)."""
    return _dequantize_shorthand(A, quant_state, absmax, out, blocksize, state, out_dtype, "fp4")


def _dequantize_shorthand(A, quant_state, absmax, out, blocksize, state, out_dtype, quant_type):
    # bitsandbytes would dequantize with the state's own quant_type; a mismatch is a mistake
    given = quant_state if quant_state is not None else state
    if given is not None and getattr(given, "quant_type", None) != quant_type:
        raise ValueError(f"dequantize_{quant_type} needs an {quant_type} state; got quant_type "
                         f"{getattr(given, 'quant_type', None)!r}")
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, quant_type, state=state,
                           out_dtype=out_dtype)


def gemv_4bit(A, B, out=None, transposed_A: bool = False, transposed_B: bool = False, state=None):
    """bitsandbytes' gemv_4bit: ``A @ W.T`` for the 4-bit weight W (out, in) whose packed data
    is B (bitsandbytes passes ``qB.t()``; either orientation) and whose QuantState is
    ``state`` (ours or bitsandbytes'). A (..., in), usually one row; the result (..., out)
    in A's dtype, computed as matmul_4bit does (the fused kernel on CUDA). ``out`` receives
    it and is returned. transposed_A / transposed_B are accepted and ignored, as there."""
    if state is None:
        raise ValueError("gemv_4bit needs state, the QuantState quantize_4bit returned")
    with bnb_arg_errors():
        state = resolve_state(None, state)
    y = matmul_4bit(A, B, state)
    return y if out is None else write_out(out, y)


# --- matmul_4bit -----------------------------------------------------------------------------

def matmul_4bit(A, B, quant_state: QuantState = None, *out_or_bias, out=None, bias=None, state=None):
    """``A @ dequantize_4bit(B, quant_state).T + bias`` for a weight stored as (out, in):
    bitsandbytes' ``matmul_4bit(A, B, quant_state, out=None, bias=None)`` and qkernels'
    ``matmul_4bit(x, packed, state, bias=None)``, one function.

    A: (..., in) float16 / bfloat16 / float32 (torch, CuPy, NumPy or Numba). B: the packed
    weight from ``quantize_4bit`` as stored ((m, 1), bitsandbytes' ``weight.t()`` (1, m), or
    flat; any quant_storage). quant_state: its QuantState (``state=`` is the same argument).
    bias: (out,) or None. out: None, or an array of the result's shape and kind, written and
    returned. Returns (..., out) of A's dtype and kind.

    The two orders differ in the fourth positional argument (bitsandbytes: out; qkernels:
    bias). With A of two or more dimensions, one extra positional argument is read as
    ``bias`` when it is 1-D and as ``out`` (A's number of dimensions) otherwise; with a 1-D
    A, where both would be (out,), it must be passed by keyword (TypeError otherwise). Two extra positional
    arguments are (out, bias), bitsandbytes' order.

    torch: when A or bias requires grad (grad mode on), or under torch.compile, the call goes
    through the declared op ``qkernels::matmul_4bit`` (qkernels/fourbit/ops.py): gradients
    reach A and bias, none the frozen packed weight. Otherwise, and for every other kind:
    CUDA data with at most FUSED_MAX_ROWS rows and ``in % 32 == 0`` runs the fused kernel
    (float32 accumulation, each packed byte read once); otherwise the weight is dequantized to
    A's dtype and multiplied by A's library (cuBLAS on the GPU). Host data is computed in
    float32: the "cpu" backend dequantizes in parallel and calls A's library's GEMM, "numpy"
    runs the reference. A weight quantized transposed, as (in, out) with in != out, is used transposed
    with a DeprecationWarning, as bitsandbytes.
    """
    if state is not None:
        if quant_state is not None:
            raise TypeError("matmul_4bit got both quant_state and state (two names of one argument)")
        quant_state = state
    if quant_state is None:
        raise ValueError("matmul_4bit: quant_state is required (the QuantState from quantize_4bit)")
    out, bias = _out_and_bias(A, out_or_bias, out, bias)
    kind = _check_x_and_state(A, B, quant_state)
    normal = ref.weight_orientation(tuple(A.shape), quant_state)  # warns at the caller's line
    out_f, in_f = _check_operands(A, B, quant_state, bias, normal)
    if kind == "torch" and _needs_autograd(A, bias):
        from .ops import matmul_4bit_op
        y = matmul_4bit_op(A, B, quant_state, bias, transposed=not normal)
    else:
        y = _matmul_arrays(A, B, quant_state, bias, kind, normal, out_f, in_f)
    return y if out is None else _write_out(out, y)


def _out_and_bias(A, extra: tuple, out, bias):
    """(out, bias) from matmul_4bit's positional arguments after quant_state (its docstring)."""
    if not extra:
        return out, bias
    if len(extra) > 2:
        raise TypeError(f"matmul_4bit takes at most 5 positional arguments (A, B, quant_state, out, "
                        f"bias); got {3 + len(extra)}")
    if out is not None or bias is not None:
        raise TypeError("matmul_4bit: pass out and bias either positionally or by keyword, not both")
    if len(extra) == 2:
        return extra
    value = extra[0]
    if value is None:
        return None, None
    ndim = len(getattr(value, "shape", ()))
    if len(A.shape) < 2 or ndim == 0:
        raise TypeError("matmul_4bit: the fourth positional argument is ambiguous here (bitsandbytes' "
                        "order reads it as out, qkernels' as bias); pass out= or bias= by keyword")
    return (None, value) if ndim == 1 else (value, None)


def _needs_autograd(x, bias) -> bool:
    """Whether a torch call must go through the declared op: a gradient to record, or a trace."""
    import torch
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))


def _write_out(out, y):
    """matmul_4bit's ``out``: ``y`` copied into it (a differentiable copy for torch)."""
    if kind_of(out) != kind_of(y):
        raise TypeError(f"out must be a {kind_of(y)} array like A; got {type(out).__name__}")
    if tuple(out.shape) != tuple(y.shape):
        raise ValueError(f"out must have the result's shape {tuple(y.shape)}; got {tuple(out.shape)}")
    if kind_of(out) == "torch":
        out.copy_(y)
    else:
        out[...] = y
    return out


def _check_x_and_state(x, packed, state: QuantState) -> str:
    """x's kind, after checking x's dtype and the weight's state."""
    kind = kind_of(x)
    ref.check_float_dtype(dtype_of(x), "x")
    _check_state(packed, state)
    return kind


def _check_operands(x, packed, state: QuantState, bias, normal: bool):
    """(out, in) of the product after checking devices and the bias."""
    if device_of(x) != device_of(packed):
        raise ValueError(f"x is on {device_of(x)} but packed is on {device_of(packed)} "
                         "(None = host); move them to one device")
    out_f, in_f = state.shape if normal else state.shape[::-1]
    if bias is not None:
        if int(np.prod(bias.shape)) != out_f:
            raise ValueError(f"bias must have {out_f} elements; got shape {tuple(bias.shape)}")
        if device_of(bias) != device_of(x):
            raise ValueError("bias must be on x's device")
    return out_f, in_f


def _matmul_4bit_arrays(x, packed, state: QuantState, bias=None):
    """matmul_4bit without the autograd route: the computation on x's own library (the
    declared op's implementation calls this)."""
    kind = _check_x_and_state(x, packed, state)
    normal = ref.weight_orientation(tuple(x.shape), state)
    out_f, in_f = _check_operands(x, packed, state, bias, normal)
    return _matmul_arrays(x, packed, state, bias, kind, normal, out_f, in_f)


def _matmul_arrays(x, packed, state: QuantState, bias, kind: str, normal: bool, out_f: int, in_f: int):
    """matmul_4bit's computation for a validated call (see matmul_4bit)."""
    name = dtype_of(x)
    if device_of(x) is None:
        _, impl = choose(_MATMUL_HOST, on_gpu=False)
        return impl(x, packed, state, bias, normal)
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
    return QuantState(absmax=host_array(state.absmax), shape=state.shape, code=host_array(state.code),
                      dtype=state.dtype, blocksize=state.blocksize, quant_type=state.quant_type,
                      offset=None if state.offset is None else float(state.offset),
                      state2=None if s2 is None else QuantState(
                          absmax=host_array(s2.absmax), code=host_array(s2.code), dtype=s2.dtype,
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
    if normal and asked in (None, "cupy") and backend_status("cupy")[0]:
        from . import _cupy
        kernel = _cupy.choose_kernel(rows, out_f, in_f, xc.device.index, dtype_of(x), xc.data_ptr(),
                                     packed_c.data_ptr())
        if kernel != "dequantize":
            # one launch: nested statistics are dequantized inside the kernel
            b = None if bias is None else bias.to(x.dtype).contiguous()
            return _cupy.matmul_4bit_torch(xc, packed_c, state.absmax.contiguous(), state.code.contiguous(),
                                           blocksize=int(state.blocksize), out_features=out_f, bias=b,
                                           nested=_nested_args(state, x.device), kernel=kernel)
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
    if normal and asked in (None, "cupy") and backend_status("cupy")[0]:
        from . import _cupy
        pk = cupy.ascontiguousarray(packed).reshape(-1).view(cupy.uint8)
        kernel = _cupy.choose_kernel(rows, out_f, in_f, xc.device.id, name, xc.data.ptr, pk.data.ptr)
        if kernel != "dequantize":
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
                _cupy.matmul_4bit(xc.reshape(rows, in_f), pk, absmax, state.code, out,
                                  blocksize=int(state.blocksize), dtype=name, bias=b, nested=nested,
                                  kernel=kernel)
            return out.reshape(*x.shape[:-1], out_f)
    w = dequantize_4bit(packed, state, out_dtype=name)
    w = w if normal else w.T
    y = xc.reshape(rows, in_f) @ w.T
    if bias is not None:
        y += bias.reshape(-1).astype(y.dtype)
    return y.reshape(*x.shape[:-1], out_f)
