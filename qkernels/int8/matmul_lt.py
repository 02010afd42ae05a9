"""LLM.int8() with gradients, bitsandbytes' functional form: ``MatmulLtState`` and
``matmul(A, B, out=None, state=None, threshold=0.0, bias=None)`` (bitsandbytes 0.50.2's
``bnb.matmul``), and the autograd function ``MatMul8bitLt`` that ``Linear8bitLt``
(torch_ops/linear8bit.py) runs too: one implementation behind both.

``matmul`` computes ``A @ B^T + bias`` (docs/FORMATS.md §9) with B the weight, (N, K):

- A (..., K) float16 / bfloat16 / float32 is quantized row-wise in its own dtype
  (``int8_vectorwise_quant``; bitsandbytes casts it to float16 first, which overflows past
  65504); with ``state.threshold > 0`` its outlier columns (any |a| >= threshold) are left out
  of the int8 product and multiplied in float32 with the dequantized weight columns;
  ``state.idx`` gets those columns (int64, ascending), as in bitsandbytes.
- B's int8 form: ``state.CB`` int8 (N, K) and ``state.SCB`` float32 (N,). With
  ``state.has_fp16_weights`` (the default) B is the float weight and is quantized (via
  float16, docs/FORMATS.md §9) whenever it changed since ``state.CB`` was made from it (keyed on B's
  version counter, storage, shape and dtype); bitsandbytes re-quantizes on every training call
  and serves a stale copy otherwise. With ``has_fp16_weights=False`` a given
  ``state.CB``/``state.SCB`` is used as it is (B is then usually ``state.CB`` or its
  transpose and only its shape matters), and a float B is quantized once if they are None.
  A transposed view of a (K, N) tensor (``W.t()``) is the (N, K) weight it shows.
- The output is (..., N) in A's dtype; ``out``, if given (same shape and dtype), receives it
  and is returned (bitsandbytes ignores ``out``).

Backward: ``grad_A = G @ (CB * SCB / 127)`` in A's dtype; ``grad_B`` (when B is a float
tensor that requires grad) the int8 product of column-quantized G^T and A with A's outlier
columns in float32 (``torch.ops.qkernels.int8_weight_grad``; bitsandbytes' own is less exact,
docs/FORMATS.md §13.14); ``grad_bias = sum(G)`` in the bias dtype. An empty A gives an empty output and zero
gradients.

Kernels: the int8 ops of ``qkernels.int8.ops`` (the NumPy reference on the CPU, the CUDA
kernels on the GPU). ``matmul`` runs eagerly (it updates ``state``); a compiled model calls
``Linear8bitLt``, whose traced forward is the declared op ``qkernels::int8_linear``.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from reference.int8 import check_threshold
from .ops import (Int8LinearPlan, _gemm_dequant, _quantize_rows, dequant_weight,
                  int8_linear_outliers, quantize_weight)

__all__ = ["MatmulLtState", "matmul", "MatMul8bitLt", "int8_linear_cols", "RecordingInt8LinearPlan",
           "MatmulArgError", "StateTypeError"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class MatmulArgError(ValueError, RuntimeError):
    """A matmul argument of the wrong shape or device: a ValueError (the project's kind for a
    bad value), and a RuntimeError too, which is what bitsandbytes (through torch) raises for
    the same inputs and what code written against it catches."""


class StateTypeError(TypeError, AttributeError):
    """``state`` that is not a MatmulLtState: a TypeError, and the AttributeError that
    bitsandbytes raises when it reads ``state.is_training`` from such an object."""


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b)))
    return a == b


@dataclasses.dataclass(eq=False)
class MatmulLtState:
    """bitsandbytes' ``MatmulLtState``: what ``matmul`` reads and keeps between calls.

    Fields (bitsandbytes' names; a dataclass with these fields, compared field by field):
    ``CB`` int8 (N, K) and ``SCB`` float32 (N,): the weight's int8 codes and row absmax;
    ``idx``: int64 outlier columns of the last input (threshold > 0); ``force_no_igemmlt``,
    ``SB``, ``SBt``, ``CBt``, ``subB``, ``outlier_pool``: kept for compatibility, unused.
    Class-level settings, set per instance: ``threshold`` (0.0: no outlier decomposition),
    ``has_fp16_weights`` (True: B is a float weight, quantized here), ``is_training``,
    ``has_accumulated_gradients``, ``use_pool``. ``CxB``, ``CxBt``, ``formatB`` and
    ``_tile_indices`` read as None with a FutureWarning, as in bitsandbytes. Equality
    compares tensors by value (bitsandbytes' raises for tensors of more than one element).
    """

    force_no_igemmlt: bool = False

    CB: Optional[Tensor] = None
    SB: Optional[Tensor] = None
    SCB: Optional[Tensor] = None

    SBt: Optional[Tensor] = None
    CBt: Optional[Tensor] = None

    subB: Optional[Tensor] = None

    outlier_pool: Any = None
    has_accumulated_gradients = False
    threshold = 0.0
    idx: Optional[Tensor] = None
    is_training = True
    has_fp16_weights = True
    use_pool = False

    _deprecated_fields = frozenset({"CxB", "CxBt", "formatB", "_tile_indices"})

    def __getattr__(self, name):
        if name in MatmulLtState._deprecated_fields:
            warnings.warn(f"MatmulLtState.{name} is deprecated (always None)", FutureWarning, stacklevel=2)
            return None
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __eq__(self, other):
        if not isinstance(other, MatmulLtState):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(MatmulLtState))

    __hash__ = None

    def reset_grads(self):
        """Forget the int8 weight (bitsandbytes' name): CB, SB, SCB, SBt, CBt become None."""
        self.CB = None
        self.SB = None
        self.SCB = None
        self.SBt = None
        self.CBt = None


# --- the forward that also returns the outlier columns -----------------------------------------

def int8_linear_cols(x2: Tensor, CB: Tensor, SCB: Tensor, bias: Optional[Tensor], threshold: float):
    """``(out, cols)``: the LLM.int8() forward of x2 (tokens, K) with CB int8 (N, K), SCB float32
    (N,), bias (N,) or None, out (tokens, N) in x2's dtype, bit for bit what
    ``torch.ops.qkernels.int8_linear`` gives; cols: the outlier columns (int64, ascending,
    possibly empty) for threshold > 0, else None. On CUDA with threshold > 0 the fused form
    runs and its column count is read on the host (one synchronization, as bitsandbytes')."""
    if threshold <= 0:
        return torch.ops.qkernels.int8_linear(x2, CB, SCB, bias, 0.0), None
    fused = int8_linear_outliers(x2, CB, SCB, bias, threshold)
    if fused is not None:
        out, idx, count = fused
        return out, idx[: int(count.item())]  # ascending (the compaction is a prefix sum)
    CA, SCA, cols = _quantize_rows(x2, threshold)
    if cols.numel() == 0:
        return _gemm_dequant(CA, CB, SCA, SCB, bias, x2.dtype), cols
    out = _gemm_dequant(CA, CB, SCA, SCB, bias, torch.float32)
    out.addmm_(x2[:, cols].float(), dequant_weight(CB[:, cols].contiguous(), SCB).T)
    return out.to(x2.dtype), cols


class RecordingInt8LinearPlan(Int8LinearPlan):
    """An Int8LinearPlan for a host (CPU) weight and threshold > 0 that keeps the outlier
    columns of its last input in ``cols`` (Linear8bitLt's ``state.idx``); the same outputs.
    On the CPU the columns come out of the forward anyway, so this costs nothing. CUDA plans
    stay Int8LinearPlan, whose ``cols`` reads them off the device when asked."""

    cols: Optional[Tensor] = None

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        x2 = x.reshape(-1, self.K)
        out, self.cols = int8_linear_cols(x2, self.CB, self.SCB, bias, self.threshold)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.N)


# --- the autograd function -----------------------------------------------------------------------

class MatMul8bitLt(torch.autograd.Function):
    """LLM.int8() matmul with gradients (module docstring). x (..., K); weight: the float
    weight (N, K) when its gradient is wanted (its dtype and shape are the gradient's), else
    None; CB int8 (N, K); SCB float32 (N,); bias (N,) or None; plan: a callable
    ``plan(x2, bias) -> out`` (an Int8LinearPlan in eager mode), or None under torch.compile
    (the declared op ``qkernels::int8_linear`` then runs the same forward)."""

    @staticmethod
    def forward(ctx, x, weight, CB, SCB, bias, threshold, plan):
        x2 = x.reshape(-1, x.shape[-1])
        b = None if bias is None else bias.detach()
        if plan is not None:
            out = plan(x2, b)
        else:
            out = torch.ops.qkernels.int8_linear(x2, CB, SCB, b, threshold)
        ctx.x_shape = x.shape
        ctx.threshold = threshold
        ctx.save_for_backward(CB, SCB, x2 if ctx.needs_input_grad[1] else None)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.reshape(*x.shape[:-1], CB.shape[0])

    @staticmethod
    def backward(ctx, grad):
        CB, SCB, x2 = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        dx = dW = dbias = None
        if ctx.needs_input_grad[0]:
            dx = (g2 @ dequant_weight(CB, SCB).to(g2.dtype)).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dW = torch.ops.qkernels.int8_weight_grad(g2, x2, ctx.threshold).to(ctx.weight_dtype)
        if ctx.needs_input_grad[4]:
            dbias = g2.sum(0).to(ctx.bias_dtype)
        return dx, dW, None, None, dbias, None, None


class _StateForward:
    """The forward ``matmul`` hands MatMul8bitLt: int8_linear_cols, recording the outlier
    columns in ``state.idx`` (threshold > 0)."""

    def __init__(self, state: MatmulLtState, CB: Tensor, SCB: Tensor, threshold: float):
        self.state, self.CB, self.SCB, self.threshold = state, CB, SCB, threshold

    def __call__(self, x2: Tensor, bias: Optional[Tensor]) -> Tensor:
        out, cols = int8_linear_cols(x2, self.CB, self.SCB, bias, self.threshold)
        if cols is not None:
            self.state.idx = cols
        return out


# --- matmul --------------------------------------------------------------------------------------

def _weight_key(B: Tensor) -> tuple:
    return (B._version, B.data_ptr(), tuple(B.shape), tuple(B.stride()), B.dtype, B.device)


def _int8_weight(B: Tensor, state: MatmulLtState) -> tuple[Tensor, Tensor]:
    """(CB, SCB) for this call, quantizing B into the state where needed (module docstring)."""
    if not state.has_fp16_weights and state.CB is not None:
        if state.SCB is None:
            raise MatmulArgError("state.SCB is None but state.CB is set: the int8 weight needs its "
                                 "float32 (out_features,) row absmax")
        return state.CB, state.SCB
    if not B.is_floating_point():
        raise TypeError(f"B must be the float weight (float16/bfloat16/float32) when "
                        f"state.has_fp16_weights is set or state.CB is None; got dtype {B.dtype}")
    key = _weight_key(B)
    if state.CB is None or state.SCB is None or state.__dict__.get("_cb_key") != key:
        state.reset_grads()
        state.CB, state.SCB = quantize_weight(B)
        state.__dict__["_cb_key"] = key  # not a field: equality and repr leave it out
    return state.CB, state.SCB


def _check(A, B, state, threshold, bias, out):
    if not isinstance(A, Tensor):
        raise TypeError(f"A must be a torch.Tensor; got {type(A).__name__}")
    if A.dtype not in _FLOATS:
        raise TypeError(f"A must be float16, bfloat16 or float32; got dtype {A.dtype}")
    if A.dim() < 1:
        raise MatmulArgError(f"A must have at least 1 dimension (..., in_features); got shape {tuple(A.shape)}")
    if not isinstance(B, Tensor):
        raise TypeError(f"B must be a torch.Tensor; got {type(B).__name__}")
    if B.dim() != 2:
        raise MatmulArgError(f"B must be the 2-D weight (out_features, in_features); got shape {tuple(B.shape)}")
    if state is not None and not isinstance(state, MatmulLtState):
        raise StateTypeError(f"state must be a MatmulLtState or None; got {type(state).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number; got {threshold!r}")
    check_threshold(threshold)
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None; got {type(bias).__name__}")
    if bias is not None and bias.dtype not in _FLOATS:
        raise TypeError(f"bias must be float16, bfloat16 or float32; got dtype {bias.dtype}")
    if out is not None and not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor or None; got {type(out).__name__}")


def _check_weight(A, CB, SCB, bias, out_shape, out):
    K = A.shape[-1]
    N = CB.shape[0]
    if CB.dim() != 2 or CB.dtype != torch.int8 or CB.shape[1] != K:
        raise MatmulArgError(f"the int8 weight must be (out_features, in_features={K}) int8 to multiply A "
                             f"of shape {tuple(A.shape)}; got {CB.dtype} {tuple(CB.shape)} (B, or state.CB)")
    if tuple(SCB.shape) != (N,) or not SCB.is_floating_point():
        raise MatmulArgError(f"state.SCB must be float32 ({N},); got {SCB.dtype} {tuple(SCB.shape)}")
    for name, t in (("B", CB), ("state.SCB", SCB), ("bias", bias), ("out", out)):
        if t is not None and t.device != A.device:
            raise MatmulArgError(f"{name} is on {t.device} but A is on {A.device}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise MatmulArgError(f"bias must have shape (out_features={N},); got {tuple(bias.shape)}")
    if out is not None:
        if tuple(out.shape) != out_shape:
            raise MatmulArgError(f"out must have shape {out_shape}; got {tuple(out.shape)}")
        if out.dtype != A.dtype:
            raise TypeError(f"out must have A's dtype {A.dtype}; got {out.dtype}")


def matmul(A: Tensor, B: Tensor, out: Optional[Tensor] = None, state: Optional[MatmulLtState] = None,
           threshold=0.0, bias: Optional[Tensor] = None) -> Tensor:
    """``A @ B^T + bias`` with LLM.int8(), differentiable (module docstring); bitsandbytes
    0.50.2's ``bnb.matmul``, same arguments.

    A (..., K) float16/bfloat16/float32; B (N, K): the float weight, or with
    ``state.has_fp16_weights=False`` and ``state.CB`` set, the int8 weight (its transpose is
    accepted too); out: (..., N) in A's dtype or None; state: a MatmulLtState kept between
    calls (a new one when None); threshold > 0 sets ``state.threshold`` (0 keeps the state's);
    bias (N,) float or None. Returns (..., N) in A's dtype.

    Errors: TypeError for a non-tensor or unsupported dtype, a ``state`` that is not a
    MatmulLtState (also an AttributeError, as bitsandbytes'), a non-numeric threshold;
    ValueError for a negative, NaN or infinite threshold (bitsandbytes ignores a negative
    one); MatmulArgError (a ValueError and a RuntimeError, as bitsandbytes') for shapes or
    devices that do not fit. Each names the argument."""
    _check(A, B, state, threshold, bias, out)
    state = MatmulLtState() if state is None else state
    if threshold > 0.0:
        state.threshold = threshold
    t = check_threshold(state.threshold)
    CB, SCB = _int8_weight(B, state)
    out_shape = (*A.shape[:-1], CB.shape[0])
    weight = B if (B.is_floating_point() and B.requires_grad) else None
    _check_weight(A, CB, SCB, bias, out_shape, out)
    if weight is not None and weight.shape != CB.shape:
        raise MatmulArgError(f"B requires grad, so it must be the float weight {tuple(CB.shape)} (out_features, "
                             f"in_features) its gradient has; got shape {tuple(B.shape)}")
    if SCB.dtype != torch.float32:
        SCB = SCB.float()
    plan = None if torch.compiler.is_compiling() else _StateForward(state, CB, SCB, t)
    result = MatMul8bitLt.apply(A, weight, CB, SCB, bias, t, plan)
    if out is None:
        return result
    out.copy_(result)
    return out
