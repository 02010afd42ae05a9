"""The LLM.int8() torch op layer: what Linear8bitLt (torch_ops/linear8bit.py) calls.

    prepare_int8_linear(CB, SCB, threshold) -> Int8LinearPlan   once per weight (and per move)
    plan(x2, bias) -> out                                      eager, per call
    torch.ops.qkernels.int8_linear(x2, CB, SCB, bias, threshold)      the forward, declared
    torch.ops.qkernels.int8_weight_grad(g2, x2, threshold)            dW (has_fp16_weights)
    torch.ops.qkernels.int8_quantize_weight(W) -> (CB, SCB)           a float weight's int8 copy

Each op is declared once with ``torch.library`` (schema and fake implementation, so
torch.compile traces it) and has one implementation for every device. The eager layer keeps
an ``Int8LinearPlan`` and calls it directly (no dispatcher, nothing re-derived per call).

The forward (SPEC.md section 9): x2 (tokens, K) float16 / bfloat16 / float32, CB int8 (N, K),
SCB float32 (N,), bias (N,) float or None:
``CA, SCA, cols = int8_vectorwise_quant(x2, threshold)``;
``out = int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias)`` plus, for threshold > 0,
``x2[:, cols] @ (CB[:, cols] * SCB / 127)^T`` added in float32 before the one rounding to x2's
dtype. On CUDA (``takes_cuda_path``) at most 16 rows take one prepared GEMV launch (threshold
0: qkernels/int8/gemv.cu, quantization fused) or three (threshold > 0: row_quant, outlier_cols,
the GEMV adding the outlier product), with no host synchronization; more rows take the int8
GEMM with its fused epilogue (the outlier product in the Hopper GEMM's epilogue, or, off
Hopper, counted on the host and added with one addmm). On the CPU the NumPy reference runs.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._backend import takes_cuda_path
from .._cuda.launch import PlanCache
from .._interop import on_torch_device, torch_stream
from . import int8_linear_matmul, int8_mm_dequant, int8_vectorwise_quant

__all__ = ["Int8LinearPlan", "prepare_int8_linear", "dequant_weight", "quantize_weight",
           "int8_linear", "int8_weight_grad", "int8_quantize_weight", "int8_linear_small_batch",
           "int8_linear_outliers"]

_INV127 = float(np.float32(1.0 / 127.0))
_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def dequant_weight(CB: Tensor, SCB: Tensor) -> Tensor:
    """float32 (N, K) = CB * SCB[:, None] * f32(1/127): int8_vectorwise_dequant's two float32
    roundings, in torch ops (traceable: the layer's backward calls it under torch.compile)."""
    return CB.float() * SCB.float()[:, None] * _INV127


def quantize_weight(W: Tensor) -> tuple[Tensor, Tensor]:
    """(CB int8 (N, K), SCB float32 (N,)) of a float weight, quantized via float16 (SPEC 9)."""
    CB, SCB, _ = int8_vectorwise_quant(W.detach().to(torch.float16).contiguous(), 0.0)
    return CB, SCB


# --- the CUDA forms of the forward (None where they do not apply) ---------------------------

def int8_linear_small_batch(x2: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor]):
    """The threshold-0 forward in x2's dtype for at most 16 rows on CUDA, in one fused kernel
    (qkernels/int8/gemv.cu: quantize x, int8 dot products, epilogue), the same bits as the
    GEMM path; None where it does not apply (host data, another backend, more rows)."""
    if not takes_cuda_path(x2):
        return None
    from . import _cupy_gemv as gemv
    if not gemv.gemv_ok(x2, CB, SCB, bias):
        return None
    b = None if bias is None else bias.contiguous()
    return gemv.int8_linear_gemv_torch(x2.contiguous(), CB.contiguous(), SCB.contiguous(), b)


def int8_linear_outliers(x2: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float):
    """The threshold > 0 forward on CUDA without a host synchronization: (out in x2's dtype,
    idx int64, count int32 (1,) on the device; idx[:count] = the outlier columns), the outlier
    product fused into the int8 kernels' epilogue. None where it does not apply (host data,
    another backend, K % 16 != 0, more than 16 rows off Hopper)."""
    if not takes_cuda_path(x2):
        return None
    from . import _cupy
    b = None if bias is None else bias.contiguous()
    return _cupy.int8_linear_outliers_torch(x2.contiguous(), CB.contiguous(), SCB.contiguous(), b, threshold)


def _quantize_rows(x2: Tensor, threshold: float):
    """(CA int8, SCA float32, cols int64 or None) of x2; the outlier columns of CA are zero."""
    if not takes_cuda_path(x2):
        return int8_vectorwise_quant(x2, threshold)
    from . import _cupy
    if threshold <= 0:
        q, s = _cupy.quantize_rowwise_torch(x2.contiguous(), stats_dtype=torch.float32)
        return q, s, None
    # two kernels and one host sync to read the count (as bitsandbytes' nonzero)
    return _cupy.int8_vectorwise_quant_torch(x2.contiguous(), threshold)


def _gemm_dequant(CA, CB, SCA, SCB, bias, out_dtype: torch.dtype) -> Tensor:
    """int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias) in out_dtype (one fused
    kernel on CUDA)."""
    if not takes_cuda_path(CA):
        return int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias, out_dtype=_NAMES[out_dtype])
    from . import _cupy
    b = None if bias is None else bias.contiguous()
    return _cupy.int8_matmul_dequant_torch(CA.contiguous(), CB.contiguous(), SCA, SCB, b, out_dtype=out_dtype)


def _forward(x2: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """The forward by the general route (module docstring), any size, any device."""
    if threshold <= 0:
        out = int8_linear_small_batch(x2, CB, SCB, bias)
    else:
        fused = int8_linear_outliers(x2, CB, SCB, bias, threshold)
        out = None if fused is None else fused[0]
    if out is not None:
        return out
    CA, SCA, cols = _quantize_rows(x2, threshold)
    if cols is None or cols.numel() == 0:
        return _gemm_dequant(CA, CB, SCA, SCB, bias, x2.dtype)
    out = _gemm_dequant(CA, CB, SCA, SCB, bias, torch.float32)
    w_cols = dequant_weight(CB[:, cols].contiguous(), SCB)
    out.addmm_(x2[:, cols].float(), w_cols.T)  # one GEMM pass adds it (beta = 1)
    return out.to(x2.dtype)


class Int8LinearPlan:
    """The LLM.int8() forward for one int8 weight (CB (N, K), SCB (N,)) and threshold,
    everything about the weight prepared once. ``plan(x, bias)``: x (..., K) float16 /
    bfloat16 / float32 on the weight's device, bias (N,) float or None -> (..., N) in x's
    dtype. ``key`` identifies the tensors the plan was made from (the layer compares it)."""

    def __init__(self, CB: Tensor, SCB: Tensor, threshold: float, key=None, hold: bool = True):
        CB, SCB = CB.contiguous(), SCB.to(torch.float32).contiguous()
        # hold=False (the op's cache, CUDA only): no tensor is kept, only their addresses
        self.CB, self.SCB = (CB, SCB) if hold else (None, None)
        self.N, self.K = CB.shape
        self.threshold = float(threshold)
        self.key = key
        self._cuda = None
        if takes_cuda_path(CB):
            from ._cupy_gemv import PreparedWeight8bit
            cuda = PreparedWeight8bit(CB, SCB, hold=hold)
            # threshold > 0 reads unpadded codes: K % 16 == 0 and an aligned CB (else the general route)
            self._cuda = cuda if self.threshold <= 0 or cuda.aligned else None

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """x (..., K) -> (..., N) (the layer passes its input as it came)."""
        cuda = self._cuda
        if cuda is not None and takes_cuda_path(x):
            M = x.numel() // self.K if self.K else 0
            if cuda.usable(M):
                if not x.is_contiguous():
                    x = x.contiguous()
                if bias is not None and not bias.is_contiguous():
                    bias = bias.contiguous()
                device, stream = torch_stream(x)
                with on_torch_device(device):
                    if self.threshold <= 0:
                        return cuda.forward(x, M, bias, stream)
                    return cuda.forward_outliers(x, M, bias, self.threshold, stream)
        x2 = x.reshape(-1, self.K)
        out = _forward(x2, self.CB, self.SCB, bias, self.threshold)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.N)


def prepare_int8_linear(CB: Tensor, SCB: Tensor, threshold: float, key=None) -> Int8LinearPlan:
    """The Int8LinearPlan of an int8 weight and its row scales, for ``threshold``."""
    if CB.dim() != 2 or CB.dtype != torch.int8:
        raise ValueError(f"CB must be an int8 (out, in) tensor; got {CB.dtype} {tuple(CB.shape)}")
    if tuple(SCB.shape) != (CB.shape[0],) or not SCB.is_floating_point() or SCB.device != CB.device:
        raise ValueError(f"SCB must be a float ({CB.shape[0]},) tensor on {CB.device}; got {SCB.dtype} "
                         f"{tuple(SCB.shape)} on {SCB.device}")
    return Int8LinearPlan(CB, SCB, threshold, key=key)


def weight_grad(g2: Tensor, x2: Tensor, threshold: float) -> Tensor:
    """dW (N, K) float32 ~= g2^T @ x2 as an int8 product: g2^T quantized per output feature,
    x2 per input feature (both over tokens); with threshold > 0 the outlier columns of x2
    (those holding an |x| >= threshold, as in the forward) in float32."""
    cols = None
    if threshold > 0:
        cols = (x2.abs() >= threshold).any(0).nonzero().reshape(-1)
        cols = cols if cols.numel() else None
    qG, sG, _ = int8_vectorwise_quant(g2.t().contiguous(), 0.0)
    qX, sX, _ = int8_vectorwise_quant(x2.t().contiguous(), 0.0)
    if cols is not None:
        qX[cols] = 0
    dW = int8_mm_dequant(int8_linear_matmul(qG, qX), sG, sX, None, out_dtype="float32")
    if cols is not None:
        dW[:, cols] = g2.t().float() @ x2[:, cols].float()
    return dW


# --- the declared ops -------------------------------------------------------------------------

_OP_PLANS = PlanCache()  # the op's CUDA plans (they hold no tensor; qkernels/_cuda/launch.py)


@torch.library.custom_op("qkernels::int8_linear", mutates_args=())
def int8_linear(x2: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float) -> Tensor:
    """The LLM.int8() forward (module docstring): (tokens, N) in x2's dtype."""
    cached = (takes_cuda_path(CB) and takes_cuda_path(x2) and CB.is_contiguous() and SCB.is_contiguous()
              and SCB.dtype == torch.float32)
    if not cached:
        return Int8LinearPlan(CB, SCB, threshold)(x2, bias)
    key = (CB.device.index, *CB.shape, CB.data_ptr(), SCB.data_ptr(), float(threshold))
    plan = _OP_PLANS.get(key, lambda: Int8LinearPlan(CB, SCB, threshold, key=key, hold=False))
    if plan._cuda is None or not plan._cuda.usable(x2.shape[0]):
        return _forward(x2, CB, SCB, bias, threshold)
    return plan(x2, bias)  # a cached plan holds no tensor: only its prepared CUDA launches run


@int8_linear.register_fake
def _int8_linear_fake(x2, CB, SCB, bias, threshold):
    return x2.new_empty((x2.shape[0], CB.shape[0]))


@torch.library.custom_op("qkernels::int8_weight_grad", mutates_args=())
def int8_weight_grad(g2: Tensor, x2: Tensor, threshold: float) -> Tensor:
    """dW (N, K) float32 of g2 (tokens, N) and x2 (tokens, K) (``weight_grad``)."""
    return weight_grad(g2, x2, threshold)


@int8_weight_grad.register_fake
def _int8_weight_grad_fake(g2, x2, threshold):
    return g2.new_empty((g2.shape[1], x2.shape[1]), dtype=torch.float32)


@torch.library.custom_op("qkernels::int8_quantize_weight", mutates_args=())
def int8_quantize_weight(W: Tensor) -> tuple[Tensor, Tensor]:
    """(CB int8 (N, K), SCB float32 (N,)) of a float weight (``quantize_weight``)."""
    return quantize_weight(W)


@int8_quantize_weight.register_fake
def _int8_quantize_weight_fake(W):
    return W.new_empty(W.shape, dtype=torch.int8), W.new_empty((W.shape[0],), dtype=torch.float32)
