"""The int8 family's torch op layer: what Linear8bitLt (torch_ops/linear8bit.py) and the
SwitchBack layers (torch_ops/switchback.py, second half of this file) call.

LLM.int8():

    prepare_int8_linear(CB, SCB, threshold) -> Int8LinearPlan   once per weight (and per move)
    plan(x2, bias) -> out                                      eager, per call
    torch.ops.qkernels.int8_linear(x2, CB, SCB, bias, threshold)      the forward, declared
    torch.ops.qkernels.int8_weight_grad(g2, x2, threshold)            dW (has_fp16_weights)
    torch.ops.qkernels.int8_quantize_weight(W) -> (CB, SCB)           a float weight's int8 copy

Each op is declared once with ``torch.library`` (schema and fake implementation, so
torch.compile traces it) and has one implementation for every device. The eager layer keeps
an ``Int8LinearPlan`` and calls it directly (no dispatcher, nothing re-derived per call).

The forward (docs/FORMATS.md §9): x2 (tokens, K) float16 / bfloat16 / float32, CB int8 (N, K),
SCB float32 (N,), bias (N,) float or None:
``CA, SCA, cols = int8_vectorwise_quant(x2, threshold)``;
``out = int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias)`` plus, for threshold > 0,
``x2[:, cols] @ (CB[:, cols] * SCB / 127)^T`` added in float32 before the one rounding to x2's
dtype. On CUDA (``takes_cuda_path``) at most 16 rows take one prepared GEMV launch (threshold
0: qkernels/int8/gemv.cu, quantization fused) or three (threshold > 0: row_quant, outlier_cols,
the GEMV adding the outlier product), with no host synchronization; more rows take the int8
GEMM with its fused epilogue (the outlier product in the Hopper GEMM's epilogue, or, off
Hopper, counted on the host and added with one addmm). On the CPU the Numba kernels of
qkernels/int8/_cpu.py quantize and dequantize around torch's int8 GEMM (the NumPy reference
where Numba cannot load, or under use_backend("numpy")).
"""
from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._backend import requested_backend, takes_cuda_path
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
    """(CB int8 (N, K), SCB float32 (N,)) of a float weight, quantized via float16 (docs/FORMATS.md §9)."""
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


def _host_kernels(x: Tensor):
    """qkernels.int8._cpu (the Numba CPU forward) for a 2-D float / int8 CPU tensor when no
    other backend is asked for and its kernels compile, else None (the NumPy reference)."""
    if x.device.type != "cpu" or x.dim() != 2 or requested_backend() not in (None, "cpu"):
        return None
    cpu = _CPU.get("module")
    if cpu is None:
        try:
            from . import _cpu as cpu
        except Exception as exc:  # numba missing or broken: one warning, then the reference
            warnings.warn(f"qkernels: the Numba CPU int8 forward cannot load ({type(exc).__name__}: "
                          f"{exc}); using the NumPy reference", RuntimeWarning, stacklevel=3)
            cpu = False
        _CPU["module"] = cpu
    return cpu if cpu and cpu.ready() else None


_CPU: dict = {}


def _host_gemm_args_ok(CA, CB, SCA, SCB, bias) -> bool:
    """Whether _gemm_dequant's arguments are well formed CPU tensors (else the public ops
    take them, and raise their errors)."""
    M, K = CA.shape
    return (CA.dtype == torch.int8 and CB.dtype == torch.int8 and CB.dim() == 2
            and CB.shape[1] == K and CB.device.type == "cpu"
            and SCA.dtype == torch.float32 and SCA.device.type == "cpu" and SCA.numel() == M
            and SCB.dtype == torch.float32 and SCB.device.type == "cpu" and SCB.numel() == CB.shape[0]
            and (bias is None or (bias.dtype in _NAMES and bias.device.type == "cpu"
                                  and bias.numel() == CB.shape[0])))


def _quantize_rows(x2: Tensor, threshold: float):
    """(CA int8, SCA float32, cols int64 or None) of x2; the outlier columns of CA are zero."""
    if not takes_cuda_path(x2):
        cpu = _host_kernels(x2)
        if cpu is not None and x2.dtype in _NAMES and isinstance(threshold, (int, float)) \
                and not isinstance(threshold, bool) and 0 <= threshold < float("inf"):
            with cpu.PARALLEL_LOCK:
                return cpu.quantize_rows_torch(x2, float(threshold))
        return int8_vectorwise_quant(x2, threshold)  # also every error, raised before any work
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
        cpu = _host_kernels(CA)
        if cpu is not None and _host_gemm_args_ok(CA, CB, SCA, SCB, bias):
            with cpu.PARALLEL_LOCK:
                return cpu.gemm_dequant_torch(CA, CB, SCA, SCB, bias, out_dtype)
        return int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias, out_dtype=_NAMES[out_dtype])
    from . import _cupy
    b = None if bias is None else bias.contiguous()
    return _cupy.int8_matmul_dequant_torch(CA.contiguous(), CB.contiguous(), SCA, SCB, b, out_dtype=out_dtype)


def _forward(x2: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float,
             kept: Optional[dict] = None) -> Tensor:
    """The forward by the general route (module docstring), any size, any device. ``kept``:
    a dict that receives "cols", the outlier columns (threshold > 0) as an int64 tensor or
    as (idx, count) still on the device (idx[:count]; nothing is synchronized here)."""
    if threshold <= 0:
        out = int8_linear_small_batch(x2, CB, SCB, bias)
    else:
        fused = int8_linear_outliers(x2, CB, SCB, bias, threshold)
        out = None if fused is None else fused[0]
        if fused is not None and kept is not None:
            kept["cols"] = fused[1:]
    if out is not None:
        return out
    CA, SCA, cols = _quantize_rows(x2, threshold)
    if kept is not None:
        kept["cols"] = cols
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
        if not hold and not takes_cuda_path(CB):
            raise ValueError("Int8LinearPlan(hold=False) keeps only CUDA launch pointers; a weight off the "
                             "CUDA path needs hold=True")
        CB, SCB = CB.contiguous(), SCB.to(torch.float32).contiguous()
        # hold=False (the op's cache, CUDA only): no tensor is kept, only their addresses
        self.CB, self.SCB = (CB, SCB) if hold else (None, None)
        self.N, self.K = CB.shape
        self.threshold = float(threshold)
        self.key = key
        self._cuda = None
        # "cols": the last input's outlier columns, in some form (see cols); only a plan that
        # holds its tensors keeps them (hold=False: the op's cache, whose plans outlive calls
        # that torch.compile may run inside its CUDA graphs' memory pool)
        self._kept: Optional[dict] = {} if hold else None
        if takes_cuda_path(CB):
            from ._cupy_gemv import PreparedWeight8bit
            cuda = PreparedWeight8bit(CB, SCB, hold=hold)
            # threshold > 0 reads unpadded codes: K % 16 == 0 and an aligned CB (else the general route)
            self._cuda = cuda if self.threshold <= 0 or cuda.aligned else None

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """x (..., K) -> (..., N) (the layer passes its input as it came)."""
        cuda = self._cuda
        if cuda is not None and takes_cuda_path(x):
            if x.get_device() != cuda.device:  # the prepared launches hold this device's pointers
                raise ValueError(f"int8_linear: x is on {x.device} but the weight is on cuda:{cuda.device}")
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
                    if self._kept is not None:
                        self._kept["cols"] = cuda  # its last workspace holds the columns
                    return cuda.forward_outliers(x, M, bias, self.threshold, stream)
        x2 = x.reshape(-1, self.K)
        out = _forward(x2, self.CB, self.SCB, bias, self.threshold, self._kept if self.threshold > 0 else None)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.N)


    @property
    def cols(self) -> Optional[Tensor]:
        """The outlier columns (int64, ascending) of the last input, threshold > 0 (bitsandbytes'
        ``state.idx``); None before the first call. Reading them on CUDA waits for that call
        (one host synchronization), which the forward itself never does."""
        kept = None if self._kept is None else self._kept.get("cols")
        if kept is None or isinstance(kept, Tensor):
            return kept
        if isinstance(kept, tuple):
            idx, count = kept
            return idx[: int(count.item())]
        return kept.last_outlier_cols()


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


# =============================================================================================
# --- SwitchBack: the int8 quantizers and GEMMs of torch_ops/switchback.py ---------------------
# =============================================================================================
#
#     torch.ops.qkernels.quantize_rowwise(x) -> (q, state)            x (M, K) float
#     torch.ops.qkernels.quantize_global(w) -> (q, state (1,))
#     torch.ops.qkernels.quantize_global_transpose(w) -> (q^T, state (1,))
#     torch.ops.qkernels.quantize_columnwise_and_transpose(w) -> (q^T, state (K,))
#     torch.ops.qkernels.dequantize_rowwise(q, state) -> (M, K) in state's dtype
#     torch.ops.qkernels.int8_matmul_rowwise_dequantize(a, b, state_a, state_b, bias)
#     torch.ops.qkernels.int8_matmul_mixed_dequantize(a, b, state_a, state_b, bias)
#
# The ops of docs/FORMATS.md §6 (shapes there), declared with ``torch.library`` (schema and fake
# implementation, so a compiled SwitchBack layer has no graph break). On CUDA (``takes_cuda_path``)
# well-formed calls go straight to the raw-pointer launchers (qkernels.int8._cupy: torch
# allocations, torch's stream, the same kernels and bits); the public qkernels.int8 API (array
# conversions, full validation, its errors) takes the rest, the NumPy reference on the CPU.
#
# The eager direct path: ``switchback_direct(X, W, bias, shared)`` is an opaque handle (None
# where it does not apply) for the ``direct_*`` functions, which call the launchers without the
# custom-op dispatch (tens of microseconds of host time per call, several calls per step) when
# given a handle and the custom ops when given None. SwitchBack's autograd functions call them
# on tensors they have shaped themselves; under torch.compile the handle is None.

from . import (dequantize_rowwise as _api_dequantize_rowwise,
               int8_matmul_mixed_dequantize as _api_int8_matmul_mixed_dequantize,
               int8_matmul_rowwise_dequantize as _api_int8_matmul_rowwise_dequantize,
               quantize_columnwise_and_transpose as _api_quantize_columnwise_and_transpose,
               quantize_global as _api_quantize_global,
               quantize_global_transpose as _api_quantize_global_transpose,
               quantize_rowwise as _api_quantize_rowwise)

__all__ += ["quantize_rowwise", "quantize_global", "quantize_global_transpose",
            "quantize_columnwise_and_transpose", "dequantize_rowwise",
            "int8_matmul_rowwise_dequantize", "int8_matmul_mixed_dequantize",
            "switchback_direct", "direct_quantize_rowwise", "direct_quantize_global",
            "direct_quantize_columnwise_and_transpose", "direct_dequantize_rowwise",
            "direct_int8_matmul_dequantize"]

_SB_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _sb_launchers(x: Tensor):
    """qkernels.int8._cupy (the raw-pointer torch launchers) where x may take the CUDA path
    (``takes_cuda_path``), else None."""
    if not takes_cuda_path(x):
        return None
    from . import _cupy
    return _cupy


def _sb_fast_float(x: Tensor):
    """The launchers for a nonempty 2-D float16/bfloat16/float32 CUDA tensor, else None."""
    return _sb_launchers(x) if x.dim() == 2 and x.dtype in _SB_FLOATS and x.numel() > 0 else None


def _sb_fast_matmul(a, b, state_a, state_b, bias, n_b: int):
    """The launchers where int8_matmul_*_dequantize's arguments are well formed CUDA tensors on
    one device (n_b: state_b's length, 1 for the global scale), else None."""
    fast = _sb_launchers(a)
    if fast is None or a.dim() != 2 or b.dim() != 2 or a.dtype != torch.int8 or b.dtype != torch.int8:
        return None
    M, K = a.shape
    N = b.shape[1]
    ok = (b.shape[0] == K and M * N * K > 0 and b.device == a.device
          and all(t.dim() == 1 and t.dtype in _SB_FLOATS and t.device == a.device
                  for t in (state_a, state_b) + (() if bias is None else (bias,)))
          and state_a.shape[0] == M and state_b.shape[0] == (1 if n_b == 1 else N)
          and (bias is None or bias.shape[0] == N))
    return fast if ok else None


def _sb_matmul(a, b, state_a, state_b, bias, rowwise: bool):
    fast = _sb_fast_matmul(a, b, state_a, state_b, bias, 0 if rowwise else 1)
    if fast is None:
        fn = _api_int8_matmul_rowwise_dequantize if rowwise else _api_int8_matmul_mixed_dequantize
        return fn(a, b, state_a, state_b, bias)
    return fast.int8_matmul_dequant_torch(a.contiguous(), b.t().contiguous(), state_a.contiguous(),
                                          state_b.contiguous(), None if bias is None else bias.contiguous(),
                                          out_dtype=state_a.dtype, col_global=not rowwise)


@torch.library.custom_op("qkernels::quantize_rowwise", mutates_args=())
def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float -> (int8 (M, K), row absmax (M,) in x's dtype)."""
    fast = _sb_fast_float(x)
    if fast is None:
        return _api_quantize_rowwise(x.detach())
    return fast.quantize_rowwise_torch(x.detach().contiguous())


@torch.library.custom_op("qkernels::quantize_global", mutates_args=())
def quantize_global(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> (int8 (N, K), absmax (1,) in w's dtype)."""
    fast = _sb_fast_float(w)
    if fast is None:
        return _api_quantize_global(w.detach())
    return fast.quantize_global_torch(w.detach().contiguous())


@torch.library.custom_op("qkernels::quantize_global_transpose", mutates_args=())
def quantize_global_transpose(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> (int8 (K, N) contiguous = codes^T, absmax (1,))."""
    fast = _sb_fast_float(w)
    if fast is None:
        return _api_quantize_global_transpose(w.detach())
    return fast.quantize_global_torch(w.detach().contiguous(), transpose=True)


@torch.library.custom_op("qkernels::quantize_columnwise_and_transpose", mutates_args=())
def quantize_columnwise_and_transpose(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> (int8 (K, N) contiguous, per-column absmax (K,) in w's dtype)."""
    fast = _sb_fast_float(w)
    if fast is None:
        return _api_quantize_columnwise_and_transpose(w.detach())
    return fast.quantize_columnwise_and_transpose_torch(w.detach().contiguous())


@torch.library.custom_op("qkernels::dequantize_rowwise", mutates_args=())
def dequantize_rowwise(q: Tensor, state: Tensor) -> Tensor:
    """q int8 (M, K), state (M,) -> q * state / 127 (M, K) in state's dtype."""
    fast = _sb_launchers(q)
    if (fast is None or q.dim() != 2 or q.dtype != torch.int8 or q.numel() == 0 or state.dim() != 1
            or state.dtype not in _SB_FLOATS or state.device != q.device or state.shape[0] != q.shape[0]):
        return _api_dequantize_rowwise(q, state)
    return fast.dequantize_rowwise_torch(q.contiguous(), state.contiguous())


@torch.library.custom_op("qkernels::int8_matmul_rowwise_dequantize", mutates_args=())
def int8_matmul_rowwise_dequantize(a: Tensor, b: Tensor, state_a: Tensor, state_b: Tensor,
                                   bias: Optional[Tensor]) -> Tensor:
    """a int8 (M, K), b int8 (K, N) (usually W_int8.t()), state_a (M,), state_b (N,), bias (N,)
    -> (M, N) in state_a's dtype."""
    return _sb_matmul(a, b, state_a, state_b, bias, rowwise=True)


@torch.library.custom_op("qkernels::int8_matmul_mixed_dequantize", mutates_args=())
def int8_matmul_mixed_dequantize(a: Tensor, b: Tensor, state_a: Tensor, state_b: Tensor,
                                 bias: Optional[Tensor]) -> Tensor:
    """As int8_matmul_rowwise_dequantize with state_b one global scale (1,)."""
    return _sb_matmul(a, b, state_a, state_b, bias, rowwise=False)


@quantize_rowwise.register_fake
def _quantize_rowwise_fake(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1])


@quantize_global.register_fake
def _quantize_global_fake(w):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty((1,))


@quantize_global_transpose.register_fake
def _quantize_global_transpose_fake(w):
    return w.new_empty((w.shape[1], w.shape[0]), dtype=torch.int8), w.new_empty((1,))


@quantize_columnwise_and_transpose.register_fake
def _quantize_columnwise_and_transpose_fake(w):
    return w.new_empty((w.shape[1], w.shape[0]), dtype=torch.int8), w.new_empty(w.shape[1:])


@dequantize_rowwise.register_fake
def _dequantize_rowwise_fake(q, state):
    return q.new_empty(q.shape, dtype=state.dtype)


def _int8_matmul_dequantize_fake(a, b, state_a, state_b, bias):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=state_a.dtype)


int8_matmul_rowwise_dequantize.register_fake(_int8_matmul_dequantize_fake)
int8_matmul_mixed_dequantize.register_fake(_int8_matmul_dequantize_fake)


# --- the eager direct path: the raw launchers without the custom-op dispatch -----------------

def switchback_direct(X: Tensor, W: Tensor, bias: Optional[Tensor] = None, shared: int = 1):
    """The handle of the eager direct path for a call on CUDA tensors of one device: X (M, K)
    and W nonempty 2-D, float (W int8 in the memory-efficient backward), X.shape[1] ==
    W.shape[shared] (1: the forward's W (N, K); 0: the backward's G (M, N) against W (N, K)),
    bias None or (W.shape[0],) float, not under torch.compile, ``takes_cuda_path(X)``. Else
    None: the ``direct_*`` functions then call the custom ops, which validate and raise."""
    if (torch.compiler.is_compiling() or X.dim() != 2 or W.dim() != 2 or X.numel() == 0
            or W.numel() == 0 or W.device != X.device or X.shape[1] != W.shape[shared]
            or X.dtype not in _SB_FLOATS
            or W.dtype not in (_SB_FLOATS + (torch.int8,) if shared == 0 else _SB_FLOATS)):
        return None
    if bias is not None and (bias.shape != (W.shape[0],) or bias.device != X.device
                             or bias.dtype not in _SB_FLOATS):
        return None
    return _sb_launchers(X)


def direct_quantize_rowwise(fast, x: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_rowwise(x); ``fast``: switchback_direct's handle or None (the custom op)."""
    return quantize_rowwise(x) if fast is None else fast.quantize_rowwise_torch(x.contiguous())


def direct_quantize_global(fast, w: Tensor, transpose: bool = False) -> tuple[Tensor, Tensor]:
    """quantize_global(w), or quantize_global_transpose(w) with ``transpose``."""
    if fast is None:
        return (quantize_global_transpose if transpose else quantize_global)(w)
    return fast.quantize_global_torch(w.contiguous(), transpose=transpose)


def direct_quantize_columnwise_and_transpose(fast, w: Tensor) -> tuple[Tensor, Tensor]:
    """quantize_columnwise_and_transpose(w)."""
    if fast is None:
        return quantize_columnwise_and_transpose(w)
    return fast.quantize_columnwise_and_transpose_torch(w.contiguous())


def direct_dequantize_rowwise(fast, q: Tensor, state: Tensor) -> Tensor:
    """dequantize_rowwise(q, state)."""
    return dequantize_rowwise(q, state) if fast is None else fast.dequantize_rowwise_torch(q, state)


def direct_int8_matmul_dequantize(fast, a: Tensor, b: Tensor, state_a: Tensor, state_b: Tensor,
                                  bias: Optional[Tensor], rowwise: bool) -> Tensor:
    """int8_matmul_{rowwise,mixed}_dequantize(a, b, ...) with a int8 (M, K), b int8 (K, N)."""
    if fast is None:
        fn = int8_matmul_rowwise_dequantize if rowwise else int8_matmul_mixed_dequantize
        return fn(a, b, state_a, state_b, bias)
    return fast.int8_matmul_dequant_torch(a, b.t().contiguous(), state_a, state_b, bias,
                                          out_dtype=state_a.dtype, col_global=not rowwise)
