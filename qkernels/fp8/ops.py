"""The FP8 family's torch op layer: what the FP8 layers (torch_ops/fp8.py) and SwitchBackLinear
with ``quant_dtype="fp8"`` (torch_ops/switchback.py) call.

Simulated FP8 (docs/FORMATS.md §8.1), quantize-dequantize ("qdq") through a named 8-bit codebook
(``code_name``: "e4m3", "e5m2", or a registered custom (256,) table):

    torch.ops.qkernels.qdq_global(x, code)               one absmax over the whole tensor
    torch.ops.qkernels.qdq_blockwise(x, code, blocksize) qkernels.quantize_blockwise, then
                                                         dequantize_blockwise, x's dtype and shape

Native FP8 (float8 tensor-core GEMMs through ``torch._scaled_mm``, row-wise float32 scales):

    torch.ops.qkernels.fp8_rowwise(x, fp8_dtype) -> (q (M, K) fp8_dtype, scale (M, 1) float32)
    torch.ops.qkernels.fp8_global(x, fp8_dtype) -> (q (N, K) fp8_dtype, scale (1, 1) float32)
    torch.ops.qkernels.fp8_scaled_mm(a, b_nk, scale_a, scale_b, out_dtype, bias) -> (M, N)

Each op is declared once with ``torch.library`` (schema and fake implementation, so
``torch.compile(fullgraph=True)`` traces the layers without a break) and has one
implementation for every device: on CUDA (``takes_cuda_path``) the fused CuPy kernels of
qdq.cu and fp8.cu through their raw-pointer torch entry points (qkernels/fp8/_cupy.py), on CUDA
without CuPy the same float32 math in torch ops (``*_in_torch``), on the CPU the NumPy
reference (reference/fp8.py) or the public qkernels API; all give the same bits.

The eager direct path: ``native_ops()`` is (fp8_rowwise, fp8_global, fp8_scaled_mm) as custom
ops under torch.compile and as their bodies in eager mode (the same code minus the
torch.library dispatch, tens of microseconds of host time per call);
``fp8_codes_both_ways(x, ...)`` quantizes x row-wise and x^T row-wise (and sums x's columns)
in one fused kernel pair in eager mode on CUDA, the separate ops elsewhere.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from reference import fp8 as ref
from reference.codebooks import fp8_map, midpoints
from .._backend import takes_cuda_path
from ..blockwise import dequantize_blockwise, quantize_blockwise

__all__ = ["E4M3", "E5M2", "code_name", "code_tensor", "code_tables", "qdq_global", "qdq_blockwise",
           "qdq_global_in_torch", "fp8_rowwise", "fp8_global", "fp8_scaled_mm",
           "fp8_rowwise_in_torch", "fp8_global_in_torch", "fp8_scaled_mm_routes", "native_ops",
           "fp8_codes_both_ways"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2

# --- codebooks: named host arrays; device copies made once per (name, device) ------------

_CODES: dict[str, np.ndarray] = {"e4m3": fp8_map(4, 3), "e5m2": fp8_map(5, 2)}
_DEVICE_TABLES: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
_QDQ_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def code_name(code) -> str:
    """A name for a codebook: None -> "e4m3"; a name is checked; a (256,) tensor or array is
    registered under a name derived from its bytes (one host copy, at the call site)."""
    if code is None:
        return "e4m3"
    if isinstance(code, str):
        if code not in _CODES:
            raise ValueError(f"unknown codebook name {code!r}; known: {', '.join(_CODES)}")
        return code
    host = code.detach().cpu().numpy() if isinstance(code, Tensor) else np.asarray(code)
    host = np.ascontiguousarray(host, np.float32)
    if host.shape != (256,) or not np.all(np.isfinite(host)) or np.any(np.diff(host) < 0):
        raise ValueError(f"code must be a sorted, finite (256,) codebook; got shape {host.shape}")
    for name, c in _CODES.items():
        if np.array_equal(c, host):
            return name
    name = "custom_" + hashlib.sha1(host.tobytes()).hexdigest()[:16]
    _CODES.setdefault(name, host)
    return name


def code_tensor(name: str, device) -> Tensor:
    """The codebook ``name`` as a float32 (256,) tensor on ``device`` (cached)."""
    return code_tables(name, torch.device(device))[0]


def code_tables(name: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """(codebook, midpoints) of ``name`` as float32 tensors on ``device`` (cached)."""
    key = (name, str(device))
    if key not in _DEVICE_TABLES:
        code = _CODES[name]
        _DEVICE_TABLES[key] = (torch.from_numpy(code.copy()).to(device),
                               torch.from_numpy(midpoints(code).copy()).to(device))
    return _DEVICE_TABLES[key]


# --- custom ops: quantize-dequantize ---------------------------------------------------------

def _kernels(x: Tensor):
    """qkernels.fp8._cupy (the raw-pointer torch entry points) where x may take the CUDA path
    (``takes_cuda_path``), else None."""
    if not takes_cuda_path(x):
        return None
    from . import _cupy
    return _cupy


def _host_f32(x: Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def _from_f32(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(values).to(like.dtype).reshape(like.shape)


def qdq_global_in_torch(x: Tensor, code: Tensor, mid: Tensor) -> Tensor:
    """docs/FORMATS.md §2 with one block, in torch float32 ops (IEEE on CPU and CUDA alike): qdq_global's
    body on CUDA where CuPy cannot run; code, mid: ``code_tables(name, x.device)``."""
    xf = x.reshape(-1).float()
    absmax = torch.maximum(xf.max(), -xf.min()) + 0.0       # NaN propagates
    y = xf * torch.reciprocal(absmax)
    y = torch.where(torch.isnan(y), torch.zeros_like(y), y)
    c = torch.searchsorted(mid, y)                          # #{mid < y}, ties to the lower
    return (code[c] * absmax).to(x.dtype).reshape(x.shape)


@torch.library.custom_op("qkernels::qdq_global", mutates_args=())
def qdq_global(x: Tensor, code: str) -> Tensor:
    """Global quantize-dequantize of x (any shape, float16/bfloat16/float32) with the named
    codebook: one absmax over the whole tensor; returns x's dtype and shape, contiguous."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.device.type == "cpu":
        out = ref.qdq_global_f32(_host_f32(x), _CODES[code])
        return _from_f32(out, x)
    code_t, mid = code_tables(code, x.device)
    kernels = _kernels(x)
    if kernels is not None:  # qkernels/fp8/qdq.cu: the same float32 ops, one pass
        return kernels.qdq_global_torch(x.detach().contiguous(), code_t, mid)
    return qdq_global_in_torch(x, code_t, mid)


@torch.library.custom_op("qkernels::qdq_blockwise", mutates_args=())
def qdq_blockwise(x: Tensor, code: str, blocksize: int) -> Tensor:
    """Blockwise quantize-dequantize of x (flattened, blocks of ``blocksize`` consecutive
    elements, 64..4096) as qkernels.quantize_blockwise then dequantize_blockwise give it; x's
    dtype and shape. On CUDA with the CuPy kernels one fused pass (qdq.cu, qdq_blockwise)."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    kernels = _kernels(x) if x.dtype in _QDQ_DTYPES else None
    if kernels is not None and blocksize in kernels.QDQ_BLOCKSIZES:
        code_t, mid = code_tables(code, x.device)
        return kernels.qdq_blockwise_torch(x.detach().contiguous(), code_t, mid, blocksize)
    codes, state = quantize_blockwise(x.detach(), code=_CODES[code], blocksize=blocksize)
    return dequantize_blockwise(codes, state).reshape(x.shape)


@qdq_global.register_fake
def _qdq_global_fake(x, code):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@qdq_blockwise.register_fake
def _qdq_blockwise_fake(x, code, blocksize):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# --- native FP8: quantizers --------------------------------------------------------------------

_FP8_NAME = {E4M3: "e4m3", E5M2: "e5m2"}
_FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
_FP8_INV_MAX = {dt: float(ref.FP8_INV_MAX[name]) for dt, name in _FP8_NAME.items()}  # f32(1/max)


# Quantization: reference/fp8.py's rule, ``scale = amax * f32(1/fp8_max)`` (1 for a zero row),
# ``q = fp8(clamp(x / scale))``. On CUDA the fused kernels of qkernels.fp8 (one read of x, one
# write of the codes; two reads of w for the per-column scales of a transposed view w.t()), or
# the same math in torch ops where CuPy cannot run; on the CPU the NumPy reference. All give the
# same bits. (``amax * f32(1/max)`` is what CUDA torch computes for ``amax / max`` too: it
# divides by a Python float as a multiply by its float32 reciprocal.)

def _check_quant_input(x: Tensor, fp8_dtype: torch.dtype, what: str) -> None:
    if fp8_dtype not in _FP8_NAME:
        raise ValueError(f"{what}: fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2; "
                         f"got {fp8_dtype}")
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{what}: x must be a 2-D float16 / bfloat16 / float32 tensor; got "
                         f"{x.dtype} of shape {tuple(x.shape)}")


def _transposed_view(x: Tensor) -> bool:
    """x is w.t() of a contiguous w (W^T in the backward): quantize it without a copy."""
    return not x.is_contiguous() and x.t().is_contiguous()


def fp8_rowwise_in_torch(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """fp8_rowwise's rule in torch ops (its body on CUDA where CuPy cannot run)."""
    fmax = _FP8_MAX[fp8_dtype]
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax * _FP8_INV_MAX[fp8_dtype], torch.ones_like(amax))
    scale = torch.where(torch.isnan(amax), amax, scale)
    return (x.float() / scale).clamp(-fmax, fmax).to(fp8_dtype).contiguous(), scale


def fp8_global_in_torch(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """fp8_global's rule in torch ops (its body on CUDA where CuPy cannot run)."""
    fmax = _FP8_MAX[fp8_dtype]
    amax = x.abs().amax().float().reshape(1, 1)
    scale = torch.where(amax > 0, amax * _FP8_INV_MAX[fp8_dtype], torch.ones_like(amax))
    return (x.float() / scale).clamp(-fmax, fmax).to(fp8_dtype).contiguous(), scale


@torch.library.custom_op("qkernels::fp8_rowwise", mutates_args=())
def fp8_rowwise(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Row-wise float8 quantization of x (M, K) float16/bfloat16/float32, any strides: (q (M, K)
    fp8_dtype contiguous, scale (M, 1) float32) with ``x ~= q * scale``, ``scale = rowmax *
    f32(1/fp8_max)`` (1 for a zero row; NaN for a NaN row, whose codes are NaN)."""
    return _fp8_rowwise_impl(x, fp8_dtype)


def _fp8_rowwise_impl(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _check_quant_input(x, fp8_dtype, "fp8_rowwise")
    kernels = _kernels(x)
    if kernels is not None:
        if _transposed_view(x):
            return kernels.quantize_columnwise_transpose_torch(x.t(), fp8_dtype)
        return kernels.quantize_rowwise_torch(x.contiguous(), fp8_dtype)
    if x.is_cuda:
        return fp8_rowwise_in_torch(x, fp8_dtype)
    codes, scale = ref.quantize_fp8_rowwise_f32(_host_f32(x), _FP8_NAME[fp8_dtype])
    return torch.from_numpy(codes).view(fp8_dtype), torch.from_numpy(scale).reshape(-1, 1)


@torch.library.custom_op("qkernels::fp8_global", mutates_args=())
def fp8_global(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Tensor-wise float8 quantization of x (N, K), any strides: (q (N, K) fp8_dtype
    contiguous, scale (1, 1) float32); a NaN in x leaves the scale at 1 (``amax > 0`` fails)."""
    return _fp8_global_impl(x, fp8_dtype)


def _fp8_global_impl(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _check_quant_input(x, fp8_dtype, "fp8_global")
    kernels = _kernels(x)
    if kernels is not None:
        if _transposed_view(x):
            return kernels.quantize_global_torch(x.t(), fp8_dtype, transpose=True)
        return kernels.quantize_global_torch(x.contiguous(), fp8_dtype)
    if x.is_cuda:
        return fp8_global_in_torch(x, fp8_dtype)
    codes, scale = ref.quantize_fp8_global_f32(_host_f32(x), _FP8_NAME[fp8_dtype])
    return torch.from_numpy(codes).view(fp8_dtype), torch.from_numpy(scale).reshape(1, 1)


@fp8_rowwise.register_fake
def _fp8_rowwise_fake(x, fp8_dtype):
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@fp8_global.register_fake
def _fp8_global_fake(x, fp8_dtype):
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((1, 1), dtype=torch.float32)


# GEMMs. torch._scaled_mm's row-wise path differs by build: CUTLASS (cuBLAS < 12.9) takes an
# e4m3 or e5m2 ``a``, only an e4m3 ``b`` and, in some versions, only a bfloat16 output; cuBLAS
# (>= 12.9, Hopper) takes more. fp8_scaled_mm tries the float8 routes below in order the first
# time it meets a combination and keeps the first that runs (warning once if it is not the
# direct one): the direct call, the bias added after the GEMM instead of in its epilogue, a
# bfloat16 output converted to out_dtype, and an e5m2 ``a`` re-encoded as e4m3 (``a * 2^-7``
# with ``scale_a * 2^7``: exact for every code of magnitude >= 2, i.e. all but those below
# 2^-15 of the row maximum). Only if no float8 route runs does it form the product in bfloat16.
_ROUTES: dict = {}
_BF16_GEMM = "bfloat16 GEMM"


def _routes(a_dtype, out_dtype, bias_dtype):
    """(a as e4m3, GEMM output dtype, bias in the epilogue) candidates, best first."""
    outs = [out_dtype] + ([torch.bfloat16] if out_dtype != torch.bfloat16 else [])
    for as_e4m3 in ([False, True] if a_dtype == E5M2 else [False]):
        for gemm_out in outs:
            fuse = [True, False] if bias_dtype == gemm_out == out_dtype != torch.float32 else [False]
            for f in fuse:
                yield as_e4m3, gemm_out, f


def _run_route(route, a, b_nk, scale_a, scale_b, out_dtype, bias):
    if route == _BF16_GEMM:
        af = (a.float() * scale_a).to(torch.bfloat16)
        bf = (b_nk.float() * scale_b).to(torch.bfloat16)
        y = (af @ bf.t()).to(out_dtype)
        return y if bias is None else y + bias.to(out_dtype)
    as_e4m3, gemm_out, fuse = route
    if as_e4m3:
        a, scale_a = (a.float() * 2.0 ** -7).to(E4M3), scale_a * 128.0
    y = torch._scaled_mm(a, b_nk.t(), scale_a, scale_b.t(), bias=bias if fuse else None,
                         out_dtype=gemm_out)
    if gemm_out != out_dtype:
        y = y.to(out_dtype)
    if bias is not None and not fuse:
        y = y + bias.to(out_dtype)
    return y


def fp8_scaled_mm_routes() -> dict:
    """{(device type, a dtype, b dtype, out dtype, bias dtype or None): route} as chosen so far;
    a route is (a re-encoded as e4m3, GEMM output dtype, bias in the epilogue) or the bfloat16
    fallback."""
    return dict(_ROUTES)


@torch.library.custom_op("qkernels::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm(a: Tensor, b_nk: Tensor, scale_a: Tensor, scale_b: Tensor,
                  out_dtype: torch.dtype, bias: Optional[Tensor] = None) -> Tensor:
    """``(a * scale_a) @ (b_nk * scale_b)^T + bias`` for float8 a (M, K) and b_nk (N, K), both
    row-major, scale_a (M, 1) and scale_b (N, 1) float32, bias (N,) in out_dtype or None; out
    (M, N) in out_dtype. One torch._scaled_mm with row-wise scales (float32 accumulation, the
    bias in its epilogue where the build allows); see the routes above."""
    return _fp8_scaled_mm_impl(a, b_nk, scale_a, scale_b, out_dtype, bias)


def _fp8_scaled_mm_impl(a, b_nk, scale_a, scale_b, out_dtype, bias=None):
    bias_dtype = None if bias is None else bias.dtype
    key = (a.device.type, a.dtype, b_nk.dtype, out_dtype, bias_dtype)
    route = _ROUTES.get(key)
    if route is not None:
        return _run_route(route, a, b_nk, scale_a, scale_b, out_dtype, bias)
    refused = []
    for route in list(_routes(a.dtype, out_dtype, bias_dtype)) + [_BF16_GEMM]:
        try:
            y = _run_route(route, a, b_nk, scale_a, scale_b, out_dtype, bias)
        except (RuntimeError, ValueError) as exc:
            if route == _BF16_GEMM:
                raise
            refused.append(f"{route}: {str(exc).splitlines()[0][:200]}")
            continue
        _ROUTES[key] = route
        if refused:
            import warnings
            warnings.warn(f"torch._scaled_mm refused {a.dtype} x {b_nk.dtype} -> {out_dtype} "
                          f"(bias {bias_dtype}) with row-wise scales as asked; using route "
                          f"{route}. Refused: {'; '.join(refused)}", RuntimeWarning)
        return y


@fp8_scaled_mm.register_fake
def _fp8_scaled_mm_fake(a, b_nk, scale_a, scale_b, out_dtype, bias=None):
    return a.new_empty((a.shape[0], b_nk.shape[0]), dtype=out_dtype)


def native_ops():
    """(fp8_rowwise, fp8_global, fp8_scaled_mm): the custom ops under torch.compile (the graph
    keeps them), their bodies in eager mode (the same code minus the torch.library dispatch,
    tens of microseconds of host time per call)."""
    if torch.compiler.is_compiling():
        return fp8_rowwise, fp8_global, fp8_scaled_mm
    return _fp8_rowwise_impl, _fp8_global_impl, _fp8_scaled_mm_impl


def fp8_codes_both_ways(x: Tensor, row_fp8: torch.dtype, col_fp8: torch.dtype, with_colsum: bool):
    """(q, s, qT, sT, colsum or None): ``fp8_rowwise(x, row_fp8)``, ``fp8_rowwise(x.t(),
    col_fp8)`` and ``x.sum(0)``. In eager mode on CUDA with the CuPy kernels one fused kernel
    pair (qkernels.fp8._cupy.quantize_rows_cols_torch: two reads of x instead of three or
    four, the same codes bit for bit; colsum sums float32 slabs of rows, a fixed order that is
    not x.sum(0)'s); else the separate ops."""
    if x.numel() and not torch.compiler.is_compiling():
        kernels = _kernels(x)
        if kernels is not None:
            return kernels.quantize_rows_cols_torch(x.contiguous(), row_fp8, col_fp8, with_colsum)
    fp8_rowwise = native_ops()[0]
    q, s = fp8_rowwise(x, row_fp8)
    qT, sT = fp8_rowwise(x.t(), col_fp8)
    return q, s, qT, sT, (x.sum(0) if with_colsum else None)
