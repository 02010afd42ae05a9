"""FP8 linear layers: bitsandbytes' simulated-FP8 research layers and a native FP8 path.

    layer = LinearFP8Mixed(1024, 4096)                 # instead of nn.Linear(1024, 4096)
    y = matmul_fp8_mixed(x, layer.weight.t())          # the bare function (bias not added)

Simulated (SPEC.md section 8): the operands of each matmul are quantized and dequantized
("qdq") through 8-bit codebooks, E4M3 forward and E5M2 for gradients, then multiplied in
the activation dtype. qdq_blockwise runs through qkernels.quantize_blockwise (NumPy on
CPU, CuPy on CUDA); qdq_global (one block spanning the tensor) is the NumPy reference
(reference/fp8.py) on CPU and the same float32 math in torch ops on CUDA, bit-identical.
Codebooks live on the host and are copied once per device on first use.

Native (``LinearFP8Mixed(..., native=True)``, ``SwitchBackLinear(..., quant_dtype="fp8")``):
real float8 tensor-core GEMMs through ``torch._scaled_mm`` with row-wise float32 scales,
float8_e4m3fn activations and weights, float8_e5m2 output gradients; needs a CUDA GPU of
compute capability >= 8.9 (Ada, Hopper) and feature counts divisible by 16.

The quantized primitives are ``torch.library`` custom ops (namespace ``qkernels``) with
fake kernels, so ``torch.compile(fullgraph=True)`` traces these layers without a break.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

import qkernels
from reference import fp8 as ref
from reference.codebooks import fp8_map, midpoints
from ._checks import check_linear_input, compute_dtype
from ._layers import fast_cuda

__all__ = ["matmul_fp8_mixed", "matmul_fp8_global", "LinearFP8Mixed", "LinearFP8Global",
           "qdq_global", "qdq_blockwise", "fp8_block_sizes", "check_native_fp8"]

fp8_block_sizes = ref.fp8_block_sizes

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
    return _tables(name, torch.device(device))[0]


def _tables(name: str, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (name, str(device))
    if key not in _DEVICE_TABLES:
        code = _CODES[name]
        _DEVICE_TABLES[key] = (torch.from_numpy(code.copy()).to(device),
                               torch.from_numpy(midpoints(code).copy()).to(device))
    return _DEVICE_TABLES[key]


# --- custom ops: quantize-dequantize ---------------------------------------------------------

def _qdq_global_torch(x: Tensor, code: Tensor, mid: Tensor) -> Tensor:
    """SPEC.md 2 with one block, in torch float32 ops (IEEE on CPU and CUDA alike)."""
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
    code_t, mid = _tables(code, x.device)
    kernels = _fp8_kernels(x)
    if kernels is not None:  # qkernels/fp8/qdq.cu: the same float32 ops, one pass
        return kernels.qdq_global_torch(x.detach().contiguous(), code_t, mid)
    return _qdq_global_torch(x, code_t, mid)


@torch.library.custom_op("qkernels::qdq_blockwise", mutates_args=())
def qdq_blockwise(x: Tensor, code: str, blocksize: int) -> Tensor:
    """Blockwise quantize-dequantize of x (flattened, blocks of ``blocksize`` consecutive
    elements, 64..4096) as qkernels.quantize_blockwise then dequantize_blockwise give it; x's
    dtype and shape. On CUDA with the CuPy kernels one fused pass (qdq.cu, qdq_blockwise)."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    kernels = _fp8_kernels(x) if x.dtype in _QDQ_DTYPES else None
    if kernels is not None and blocksize in kernels.QDQ_BLOCKSIZES:
        code_t, mid = _tables(code, x.device)
        return kernels.qdq_blockwise_torch(x.detach().contiguous(), code_t, mid, blocksize)
    codes, state = qkernels.quantize_blockwise(x.detach(), code=_CODES[code], blocksize=blocksize)
    return qkernels.dequantize_blockwise(codes, state).reshape(x.shape)


@qdq_global.register_fake
def _(x, code):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@qdq_blockwise.register_fake
def _(x, code, blocksize):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _host_f32(x: Tensor) -> np.ndarray:
    return x.detach().reshape(-1).float().numpy()


def _from_f32(values: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(values).to(like.dtype).reshape(like.shape)


# --- simulated FP8 matmuls ---------------------------------------------------------------------

def _product(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    """``a (..., K) @ b (K, N) + bias``, the bias added inside the GEMM (one rounding): the
    product torch.compile's inductor makes of a matmul and a bias add, so compiled and eager
    layers give the same bits."""
    if bias is None:
        return torch.matmul(a, b)
    out = torch.addmm(bias.to(a.dtype), a.reshape(-1, a.shape[-1]), b)
    return out.reshape(*a.shape[:-1], b.shape[1])


def _bias_grad(G: Tensor, bias: Tensor | None, needed: bool):
    return G.reshape(-1, G.shape[-1]).sum(0).to(bias.dtype) if needed else None


class MatMulFP8Mixed(torch.autograd.Function):
    """A (..., K) @ B (K, N) (+ bias (N,)). Forward ``qdq(A, fw, bsz) @ qdq_global(B, fw)``;
    backward ``dA = qdq(G, bw, bsz2) @ qdq_global(B)^T``, ``dB = A^T @ G`` in full precision,
    ``dbias = sum(G)``."""

    @staticmethod
    def forward(ctx, A, B, fw: str, bw: str, bsz: int, bsz2: int, bias=None):
        fp8A = qdq_blockwise(A, fw, bsz)
        fp8B = qdq_global(B, fw)
        ctx.bw, ctx.bsz2 = bw, bsz2
        ctx.save_for_backward(A, fp8B, bias)
        return _product(fp8A, fp8B.to(A.dtype), bias)

    @staticmethod
    def backward(ctx, G):
        A, fp8B, bias = ctx.saved_tensors
        dA = dB = None
        if ctx.needs_input_grad[0]:
            Gq = qdq_blockwise(G, ctx.bw, ctx.bsz2)
            dA = torch.matmul(Gq, fp8B.t().to(Gq.dtype)).to(A.dtype)
        if ctx.needs_input_grad[1]:
            A2, G2 = A.reshape(-1, A.shape[-1]), G.reshape(-1, G.shape[-1])
            dB = torch.matmul(A2.t().to(G.dtype), G2).to(fp8B.dtype)
        return dA, dB, None, None, None, None, _bias_grad(G, bias, ctx.needs_input_grad[6])


class MatMulFP8Global(torch.autograd.Function):
    """As MatMulFP8Mixed with global scaling everywhere; ``dB = qdq_global(A)^T @ Gq``."""

    @staticmethod
    def forward(ctx, A, B, fw: str, bw: str, bias=None):
        fp8A = qdq_global(A, fw)
        fp8B = qdq_global(B, fw)
        ctx.bw = bw
        ctx.save_for_backward(fp8A, fp8B, bias)  # qdq_global(A^T) = qdq_global(A)^T: one scale
        return _product(fp8A, fp8B.to(A.dtype), bias)

    @staticmethod
    def backward(ctx, G):
        fp8A, fp8B, bias = ctx.saved_tensors
        Gq = qdq_global(G, ctx.bw)
        dA = dB = None
        if ctx.needs_input_grad[0]:
            dA = torch.matmul(Gq, fp8B.t().to(Gq.dtype)).to(fp8A.dtype)
        if ctx.needs_input_grad[1]:
            A2, G2 = fp8A.reshape(-1, fp8A.shape[-1]), Gq.reshape(-1, Gq.shape[-1])
            dB = torch.matmul(A2.t().to(Gq.dtype), G2).to(fp8B.dtype)
        return dA, dB, None, None, _bias_grad(G, bias, ctx.needs_input_grad[4])


def _matmul_args(A, B, fw_code, bw_code, out, bsz, bsz2):
    if out is not None:
        raise ValueError("out= is not supported (bitsandbytes ignores it); pass out=None")
    if A.shape[-1] != B.shape[0]:
        raise ValueError(f"A (..., K) and B (K, N) must agree in K; got {tuple(A.shape)} and "
                         f"{tuple(B.shape)}")
    if bsz == -1 or bsz2 == -1:
        bsz, bsz2 = fp8_block_sizes(A.shape[-1], B.shape[1])
    bw = "e5m2" if bw_code is None else code_name(bw_code)
    return code_name(fw_code), bw, bsz, bsz2


def matmul_fp8_mixed(A: Tensor, B: Tensor, fw_code=None, bw_code=None, out=None,
                     bsz: int = -1, bsz2: int = -1, *, bias: Tensor | None = None) -> Tensor:
    """Simulated-FP8 ``A @ B`` with blockwise scaling of A: A (..., K), B (K, N) (usually
    ``weight.t()``), same float dtype; codes default to E4M3 (forward) / E5M2 (backward);
    bsz / bsz2 = -1 choose SPEC's block sizes from K and N. Returns (..., N) in A's dtype.
    ``bias`` (N,), keyword only (not in bitsandbytes): added inside the GEMM, one rounding."""
    fw, bw, bsz, bsz2 = _matmul_args(A, B, fw_code, bw_code, out, bsz, bsz2)
    if A.numel() == 0 or B.numel() == 0:  # empty: right shape, zero gradients
        return _product(A, B.to(A.dtype), bias)
    return MatMulFP8Mixed.apply(A, B, fw, bw, bsz, bsz2, bias)


def matmul_fp8_global(A: Tensor, B: Tensor, fw_code=None, bw_code=None, out=None,
                      bsz: int = -1, bsz2: int = -1, *, bias: Tensor | None = None) -> Tensor:
    """Simulated-FP8 ``A @ B`` with one global scale per operand; as matmul_fp8_mixed."""
    fw, bw, _, _ = _matmul_args(A, B, fw_code, bw_code, out, bsz, bsz2)
    if A.numel() == 0 or B.numel() == 0:
        return _product(A, B.to(A.dtype), bias)
    return MatMulFP8Global.apply(A, B, fw, bw, bias)


# --- native FP8 (torch._scaled_mm) -------------------------------------------------------------

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_FP8_NAME = {E4M3: "e4m3", E5M2: "e5m2"}
_FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
_FP8_INV_MAX = {dt: float(ref.FP8_INV_MAX[name]) for dt, name in _FP8_NAME.items()}  # f32(1/max)


def check_native_fp8(x: Tensor, in_features: int, out_features: int, what: str) -> None:
    """Raise a clear error unless x lives on a GPU with FP8 tensor cores and the feature
    counts suit torch._scaled_mm."""
    if x.device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA GPU with FP8 tensor cores (compute capability "
                           f">= 8.9: Ada or Hopper, e.g. H100); the input is on {x.device}. "
                           f"Use the simulated path (native=False / quant_dtype='int8') elsewhere.")
    if in_features % 16 or out_features % 16:
        raise ValueError(f"{what} needs in_features and out_features divisible by 16 "
                         f"(torch._scaled_mm); got {in_features} and {out_features}")
    if torch.compiler.is_compiling():
        return  # the eager call checked the device; its queries are no graph material
    cap = torch.cuda.get_device_capability(x.device)
    if cap < (8, 9):
        raise RuntimeError(f"{what} needs a GPU with FP8 tensor cores (compute capability >= 8.9, "
                           f"e.g. H100); {torch.cuda.get_device_name(x.device)} has {cap[0]}.{cap[1]}")


# Quantization: reference/fp8.py's rule, ``scale = amax * f32(1/fp8_max)`` (1 for a zero row),
# ``q = fp8(clamp(x / scale))``. On CUDA the fused kernels of qkernels.fp8 (one read of x, one
# write of the codes; two reads of w for the per-column scales of a transposed view w.t()), or
# the same math in torch ops where CuPy cannot run; on the CPU the NumPy reference. All give the
# same bits. (``amax * f32(1/max)`` is what CUDA torch computes for ``amax / max`` too: it
# divides by a Python float as a multiply by its float32 reciprocal.)

def _fp8_kernels(x: Tensor):
    """qkernels.fp8._cupy when x is a CUDA tensor and the CuPy backend may run, else None."""
    return fast_cuda(x, "fp8")


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


def _host_f32(x2: Tensor) -> np.ndarray:
    return x2.detach().float().numpy()


def _fp8_rowwise_torch(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    fmax = _FP8_MAX[fp8_dtype]
    amax = x.abs().amax(dim=1, keepdim=True).float()
    scale = torch.where(amax > 0, amax * _FP8_INV_MAX[fp8_dtype], torch.ones_like(amax))
    scale = torch.where(torch.isnan(amax), amax, scale)
    return (x.float() / scale).clamp(-fmax, fmax).to(fp8_dtype).contiguous(), scale


def _fp8_global_torch(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
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
    kernels = _fp8_kernels(x)
    if kernels is not None:
        if _transposed_view(x):
            return kernels.quantize_columnwise_transpose_torch(x.t(), fp8_dtype)
        return kernels.quantize_rowwise_torch(x.contiguous(), fp8_dtype)
    if x.is_cuda:
        return _fp8_rowwise_torch(x, fp8_dtype)
    codes, scale = ref.quantize_fp8_rowwise_f32(_host_f32(x), _FP8_NAME[fp8_dtype])
    return torch.from_numpy(codes).view(fp8_dtype), torch.from_numpy(scale).reshape(-1, 1)


@torch.library.custom_op("qkernels::fp8_global", mutates_args=())
def fp8_global(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Tensor-wise float8 quantization of x (N, K), any strides: (q (N, K) fp8_dtype
    contiguous, scale (1, 1) float32); a NaN in x leaves the scale at 1 (``amax > 0`` fails)."""
    return _fp8_global_impl(x, fp8_dtype)


def _fp8_global_impl(x: Tensor, fp8_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _check_quant_input(x, fp8_dtype, "fp8_global")
    kernels = _fp8_kernels(x)
    if kernels is not None:
        if _transposed_view(x):
            return kernels.quantize_global_torch(x.t(), fp8_dtype, transpose=True)
        return kernels.quantize_global_torch(x.contiguous(), fp8_dtype)
    if x.is_cuda:
        return _fp8_global_torch(x, fp8_dtype)
    codes, scale = ref.quantize_fp8_global_f32(_host_f32(x), _FP8_NAME[fp8_dtype])
    return torch.from_numpy(codes).view(fp8_dtype), torch.from_numpy(scale).reshape(1, 1)


@fp8_rowwise.register_fake
def _(x, fp8_dtype):
    return x.new_empty(x.shape, dtype=fp8_dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@fp8_global.register_fake
def _(x, fp8_dtype):
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
def _(a, b_nk, scale_a, scale_b, out_dtype, bias=None):
    return a.new_empty((a.shape[0], b_nk.shape[0]), dtype=out_dtype)


def _native_ops():
    """(fp8_rowwise, fp8_global, fp8_scaled_mm): the custom ops under torch.compile (the graph
    keeps them), their bodies in eager mode (the same code minus the torch.library dispatch,
    tens of microseconds of host time per call)."""
    if torch.compiler.is_compiling():
        return fp8_rowwise, fp8_global, fp8_scaled_mm
    return _fp8_rowwise_impl, _fp8_global_impl, _fp8_scaled_mm_impl


class FP8NativeLinearFunction(torch.autograd.Function):
    """Native-FP8 linear on X (M, K), W (N, K) of one float dtype, bias (N,) or None.

    Forward: ``Y = fp8(X, e4m3, per row) @ fp8(W, e4m3, per output row or global)^T + bias``,
    the bias added in the GEMM's epilogue. Backward: ``dX = fp8(G, e5m2, per row) @ fp8(W^T,
    e4m3, per input column or global)^T``; ``dW = G^T @ X`` in X's dtype (from the saved e4m3 X
    when ``mem_efficient``); ``dbias = sum(G, 0)``. Each quantization is one fused kernel on
    CUDA (W^T's: two passes over W). dW stays a 16-bit GEMM by default (bitsandbytes' rule:
    the weight gradient in full precision; the tests hold its error under 1%). With
    ``fp8_wgrad`` it is a float8 GEMM too, as in FP8 training recipes such as Transformer
    Engine's: ``dW = fp8(G^T, e5m2, per output feature) @ fp8(X^T, e4m3, per input
    feature)^T``, for about half the dW time (the tests hold its relative error to the exact
    product under 10%, against under 1% for the 16-bit dW); it needs the token count
    to be a multiple of 16 (torch._scaled_mm's inner dimension) and falls back to the 16-bit
    dW otherwise. Under ``fp8_wgrad`` the forward also forms X^T's codes, saved for dW in place
    of X (or of its e4m3 codes: 1 byte per element either way), and, with row-wise W scales,
    W^T's codes for dX (1 byte per weight saved); the backward takes G's codes, G^T's and
    dbias from one fused kernel pair, each pair reading its tensor twice."""

    @staticmethod
    def forward(ctx, X, W, bias, w_rowwise: bool, mem_efficient: bool, fp8_wgrad: bool = False):
        fp8_rowwise, fp8_global, fp8_scaled_mm = _native_ops()
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        fp8_wgrad = fp8_wgrad and X.shape[0] % 16 == 0
        XtQ = sXt = WtQ = sWt = None
        if fp8_wgrad and need_dw:   # X^T's codes now, saved in place of X
            Xq, sX, XtQ, sXt, _ = _codes_both_ways(X, E4M3, E4M3, False)
        else:
            Xq, sX = fp8_rowwise(X, E4M3)
        if not w_rowwise:
            Wq, sW = fp8_global(W, E4M3)
            sW = sW.expand(W.shape[0], 1).contiguous()
        elif fp8_wgrad and need_dx:  # W^T's codes for dX now, from the same two reads of W
            Wq, sW, WtQ, sWt, _ = _codes_both_ways(W, E4M3, E4M3, False)
        else:
            Wq, sW = fp8_rowwise(W, E4M3)
        Y = fp8_scaled_mm(Xq, Wq, sX, sW, X.dtype, bias)
        ctx.w_rowwise, ctx.mem_efficient, ctx.has_bias = w_rowwise, mem_efficient, bias is not None
        ctx.fp8_wgrad, ctx.x_dtype, ctx.w_dtype = fp8_wgrad, X.dtype, W.dtype
        ctx.xt, ctx.wt = XtQ is not None, WtQ is not None
        if ctx.xt:
            saved_x = (XtQ, sXt)
        else:
            saved_x = (Xq, sX) if mem_efficient else (X,)
        saved_w = (WtQ, sWt) if ctx.wt else (W,)
        ctx.save_for_backward(*saved_x, *saved_w)
        return Y

    @staticmethod
    def backward(ctx, G):
        saved = list(ctx.saved_tensors)
        if ctx.wt:
            WtQ, sWt = saved[-2:]
            del saved[-2:]
        else:
            W = saved.pop()
        if ctx.xt:
            XtQ, sXt = saved
        elif ctx.mem_efficient:
            Xq, sX = saved
        else:
            (X,) = saved
        G = G.contiguous()
        dX = dW = dbias = None
        fp8_rowwise, fp8_global, fp8_scaled_mm = _native_ops()
        want_dbias = ctx.has_bias and ctx.needs_input_grad[2]
        if ctx.fp8_wgrad and all(ctx.needs_input_grad[:2]):
            Gq, sG, GtQ, sGt, dbias = _codes_both_ways(G, E5M2, E5M2, want_dbias)
        else:
            Gq = GtQ = None
        if ctx.needs_input_grad[0]:
            if Gq is None:
                Gq, sG = fp8_rowwise(G, E5M2)
            if not ctx.wt:
                if ctx.w_rowwise:
                    WtQ, sWt = fp8_rowwise(W.t(), E4M3)        # per input channel: (K, N)
                else:
                    WtQ, sWt = fp8_global(W.t(), E4M3)
                    sWt = sWt.expand(W.shape[1], 1).contiguous()
            dX = fp8_scaled_mm(Gq, WtQ, sG, sWt, G.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.fp8_wgrad:
                if GtQ is None:
                    GtQ, sGt = fp8_rowwise(G.t(), E5M2)       # (N, M), a scale per output feature
                dW = fp8_scaled_mm(GtQ, XtQ, sGt, sXt, G.dtype).to(ctx.w_dtype)
            else:
                Xh = (Xq.float() * sX).to(ctx.x_dtype) if ctx.mem_efficient else X
                dW = torch.matmul(G.t(), Xh.to(G.dtype)).to(ctx.w_dtype)
        if want_dbias and dbias is None:
            dbias = G.sum(0)
        return dX, dW, dbias, None, None, None


def _codes_both_ways(x: Tensor, row_fp8: torch.dtype, col_fp8: torch.dtype, with_colsum: bool):
    """(q, s, qT, sT, colsum or None): ``fp8_rowwise(x, row_fp8)``, ``fp8_rowwise(x.t(),
    col_fp8)`` and ``x.sum(0)``. In eager mode on CUDA with the CuPy kernels one fused kernel
    pair (qkernels.fp8._cupy.quantize_rows_cols_torch: two reads of x instead of three or
    four, the same codes bit for bit; colsum sums float32 slabs of rows, a fixed order that is
    not x.sum(0)'s); else the separate ops."""
    if x.numel() and not torch.compiler.is_compiling():
        kernels = _fp8_kernels(x)
        if kernels is not None:
            return kernels.quantize_rows_cols_torch(x.contiguous(), row_fp8, col_fp8, with_colsum)
    fp8_rowwise = _native_ops()[0]
    q, s = fp8_rowwise(x, row_fp8)
    qT, sT = fp8_rowwise(x.t(), col_fp8)
    return q, s, qT, sT, (x.sum(0) if with_colsum else None)


def linear_fp8_native(x: Tensor, weight: Tensor, bias: Tensor | None, w_rowwise: bool = True,
                      mem_efficient: bool = False, fp8_wgrad: bool = False) -> Tensor:
    """Native-FP8 ``F.linear``: x (*, K), weight (N, K), bias (N,); returns (*, N) in the
    compute dtype. See FP8NativeLinearFunction (``fp8_wgrad``: dW as a float8 GEMM too)."""
    N, K = weight.shape
    check_native_fp8(x, K, N, "native FP8")
    dt = compute_dtype(x)
    X = x.reshape(-1, K).to(dt)
    b = None if bias is None else bias.to(dt)
    Y = FP8NativeLinearFunction.apply(X, weight.to(dt), b, w_rowwise, mem_efficient, fp8_wgrad)
    return Y.reshape(*x.shape[:-1], N)


# --- layers ----------------------------------------------------------------------------------

class _LinearFP8(nn.Linear):
    """nn.Linear's parameters and state_dict; the matmul simulated in FP8 (or native)."""

    _matmul = None  # set by subclasses

    def __init__(self, input_features: int, output_features: int, bias: bool = True,
                 native: bool = False, device=None, dtype=None, fp8_weight_grad: bool = False):
        super().__init__(input_features, output_features, bias, device=device, dtype=dtype)
        if fp8_weight_grad and not native:
            raise ValueError(f"{type(self).__name__}: fp8_weight_grad=True needs native=True (the "
                             f"simulated path keeps bitsandbytes' full-precision weight gradient)")
        self.bsz, self.bsz2 = fp8_block_sizes(input_features, output_features)
        self.native = bool(native)
        self.fp8_weight_grad = bool(fp8_weight_grad)

    @property
    def fw_code(self) -> Tensor:
        """The E4M3 forward codebook on the weight's device (created once per device)."""
        return code_tensor("e4m3", self.weight.device)

    @property
    def bw_code(self) -> Tensor:
        """The E5M2 backward codebook on the weight's device."""
        return code_tensor("e5m2", self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        check_linear_input(x, self.in_features, self.weight, name)
        if self.native:
            return linear_fp8_native(x, self.weight, self.bias, w_rowwise=True,
                                     fp8_wgrad=self.fp8_weight_grad)
        dt = compute_dtype(x)
        W = self.weight.to(dt)
        bias = None if self.bias is None else self.bias.to(dt)
        return type(self)._matmul(x.to(dt), W.t(), "e4m3", "e5m2", None, self.bsz, self.bsz2, bias=bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", native=True" if self.native else "") + \
            (", fp8_weight_grad=True" if self.fp8_weight_grad else "")


class LinearFP8Mixed(_LinearFP8):
    """``LinearFP8Mixed(input_features, output_features, bias=True, native=False,
    fp8_weight_grad=False)``: a drop-in nn.Linear whose forward is matmul_fp8_mixed
    (blockwise E4M3 activations, global E4M3 weight, blockwise E5M2 output gradient; weight
    gradient in full precision). With ``native=True`` the GEMMs run in float8 on the tensor
    cores (see module docstring); ``fp8_weight_grad=True`` (native only) makes the weight
    gradient a float8 GEMM as well (FP8NativeLinearFunction)."""

    _matmul = staticmethod(matmul_fp8_mixed)


class LinearFP8Global(_LinearFP8):
    """``LinearFP8Global(input_features, output_features, bias=True, native=False)``: as
    LinearFP8Mixed with one global scale per operand (matmul_fp8_global)."""

    _matmul = staticmethod(matmul_fp8_global)
