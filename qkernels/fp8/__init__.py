"""Native float8 quantization (the operands of float8 tensor-core GEMMs), public API.

    quantize_fp8_rowwise(x (M, K), fp8="e4m3") -> (codes uint8 (M, K), scale float32 (M,))
    quantize_fp8_global(x, fp8="e4m3") -> (codes uint8 of x's shape, scale float32 (1,))
    quantize_fp8_columnwise_and_transpose(w (N, K), fp8="e4m3") -> (codes^T uint8 (K, N), scale (K,))
    quantize_fp8_global_transpose(w (N, K), fp8="e4m3") -> (codes^T uint8 (K, N), scale (1,))

``fp8`` is "e4m3" (torch.float8_e4m3fn) or "e5m2" (torch.float8_e5m2); the codes are the
float8 bytes (``codes.view(torch.float8_e4m3fn)`` in torch) and ``x ~= f32(code) * scale``.
The rule (reference/fp8.py, ``quantize_fp8_*_f32``): scale = absmax * f32(1/fmax) (1 for an
all-zero row or tensor; a NaN absmax gives a NaN row scale but a global scale of 1), code =
float8(clamp(x / scale, -fmax, fmax)) rounded to nearest even; a NaN quotient gives 0x7F.
"columnwise_and_transpose" quantizes each column of w (a row of w^T) and writes w^T's codes.

Implementations: reference/fp8.py (numpy, the oracle) and fp8.cu + _cupy.py (cupy, compute
capability >= 8.9); identical codes and scales. The torch layers (torch_ops/fp8.py) call the
ops of qkernels/fp8/ops.py, which reach the CuPy kernels through _cupy's ``*_torch`` entry
points (torch float8 tensors out).
"""
from __future__ import annotations

import numpy as np

from reference import fp8 as ref
from reference.dtypes import bf16_bits_to_float32, check_float_dtype
from .._backend import choose, lazy
from .._interop import Call, device_of, dtype_of, kind_of, shape_of, contiguous as _contiguous, \
    run as _run

__all__ = ["quantize_fp8_rowwise", "quantize_fp8_global", "quantize_fp8_columnwise_and_transpose",
           "quantize_fp8_global_transpose"]


def _f32(raw, dtype: str) -> np.ndarray:
    return bf16_bits_to_float32(raw) if dtype == "bfloat16" else np.asarray(raw, np.float32)


def _numpy_rows(x, dtype, fmt, q, scale):
    q[...], scale[...] = ref.quantize_fp8_rowwise_f32(_f32(x, dtype), fmt)


def _numpy_global(x, dtype, fmt, q, scale, transpose):
    codes, s = ref.quantize_fp8_global_f32(_f32(x, dtype), fmt)
    q[...] = codes.T if transpose else codes
    scale[...] = s


def _numpy_columns_transpose(x, dtype, fmt, q, scale):
    q[...], scale[...] = ref.quantize_fp8_rowwise_f32(_f32(x, dtype).T, fmt)


_ROWS = {"numpy": _numpy_rows, "cupy": lazy(".fp8._cupy", "quantize_rows")}
_GLOBAL = {"numpy": _numpy_global, "cupy": lazy(".fp8._cupy", "quantize_global")}
_COLUMNS_T = {"numpy": _numpy_columns_transpose, "cupy": lazy(".fp8._cupy", "quantize_columns_transpose")}


def _input(x, argname: str, fp8: str, two_d: bool) -> tuple[str, tuple]:
    kind_of(x)
    ref.check_fp8_format(fp8)
    name = dtype_of(x)
    check_float_dtype(name, argname)
    shape = shape_of(x)
    if two_d and len(shape) != 2:
        raise ValueError(f"{argname} must be 2-D (rows, cols); got shape {shape}")
    return name, shape


def _arg2d(call: Call, x, rows: int, cols: int):
    return call.arg(_contiguous(x)).reshape(rows, cols)


def quantize_fp8_rowwise(x, fp8: str = "e4m3"):
    """Row-wise float8 quantization of x (M, K) float16/bfloat16/float32 (NumPy, CuPy or
    torch): (codes uint8 (M, K), scale float32 (M,)) in x's kind and on x's device."""
    name, (M, K) = _input(x, "x", fp8, two_d=True)
    backend, impl = choose(_ROWS, on_gpu=device_of(x) is not None)
    call = Call(x, backend)
    q, scale = call.empty((M, K), "uint8"), call.empty((M,), "float32")
    _run(call, impl, _arg2d(call, x, M, K), name, fp8, q, scale)
    return call.result(q, "uint8"), call.result(scale, "float32")


def _global(x, fp8: str, transpose: bool):
    name, shape = _input(x, "w" if transpose else "x", fp8, two_d=transpose)
    rows, cols = (shape if transpose else (1, int(np.prod(shape, dtype=np.int64))))
    backend, impl = choose(_GLOBAL, on_gpu=device_of(x) is not None)
    call = Call(x, backend)
    q = call.empty((cols, rows) if transpose else (rows, cols), "uint8")
    scale = call.empty((1,), "float32")
    _run(call, impl, _arg2d(call, x, rows, cols), name, fp8, q, scale, transpose)
    q = call.result(q, "uint8")
    return (q if transpose else q.reshape(shape)), call.result(scale, "float32")


def quantize_fp8_global(x, fp8: str = "e4m3"):
    """Tensor-wise float8 quantization of x (any shape): (codes uint8 of x's shape, scale
    float32 (1,)). A NaN anywhere leaves the scale at 1 (torch's ``amax > 0`` rule)."""
    return _global(x, fp8, transpose=False)


def quantize_fp8_global_transpose(w, fp8: str = "e4m3"):
    """quantize_fp8_global of w (N, K) with the codes written transposed: (codes^T uint8
    (K, N) contiguous, scale (1,)), in one pass over the codes."""
    return _global(w, fp8, transpose=True)


def quantize_fp8_columnwise_and_transpose(w, fp8: str = "e4m3"):
    """Row-wise float8 quantization of w^T for w (N, K), read as stored: (codes^T uint8
    (K, N) contiguous, scale float32 (K,), one per column of w)."""
    name, (N, K) = _input(w, "w", fp8, two_d=True)
    backend, impl = choose(_COLUMNS_T, on_gpu=device_of(w) is not None)
    call = Call(w, backend)
    q, scale = call.empty((K, N), "uint8"), call.empty((K,), "float32")
    _run(call, impl, _arg2d(call, w, N, K), name, fp8, q, scale)
    return call.result(q, "uint8"), call.result(scale, "float32")
