"""The fourbit family's torch op layer: what Linear4bit (torch_ops/linear4bit.py) calls.

    prepare_matmul_4bit(packed, state) -> Matmul4bitPlan   once per weight (and per move)
    plan(x, bias) -> x @ W^T + bias                        eager, per call
    plan.dequantize(dtype) -> W (N, K)                     eager (the backward's weight)
    torch.ops.qkernels.matmul_4bit(...)                    the same, declared for torch.compile
    torch.ops.qkernels.dequantize_4bit(...)

Each op is declared once with ``torch.library`` (schema, fake implementation for tracing,
autograd for matmul_4bit) and has one implementation for every device: it prepares a plan
from its tensors and calls it. Eager layers keep the plan and call it directly, skipping the
dispatcher and the preparation. A plan on a CUDA tensor (``takes_cuda_path``) launches the
CuPy kernels of fourbit.cu through prepared launches (qkernels/fourbit/_cupy.py
``PreparedWeight4bit``): per call it allocates the output with torch and launches on torch's
current stream, nothing else. Elsewhere it runs the public array API (the NumPy reference on
the CPU, whichever backend ``use_backend`` names on CUDA).

Weight: (N, K) = (out_features, in_features) stored by ``quantize_4bit``: packed bytes (any
storage dtype), state.absmax float32 (nblocks,) or uint8 nested codes with state.state2 and
state.offset, state.code float32 (16,). The ops take these as separate tensors: ``absmax``,
``code``, and for nested states ``code2``, ``absmax2`` and ``offset`` (float32 (1,)).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from reference.state import QuantState
from .._backend import takes_cuda_path
from .._cuda.launch import PlanCache
from .._interop import on_torch_device, torch_stream
from . import FUSED_MAX_ROWS, HostWeight4bit, _check_state, dequantize_4bit as _dequantize_4bit
from . import _matmul_4bit_arrays as _matmul_4bit  # not the public one: that routes back here

__all__ = ["Matmul4bitPlan", "prepare_matmul_4bit", "state_tensors", "matmul_4bit", "dequantize_4bit",
           "matmul_4bit_op"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def state_tensors(state: QuantState, device) -> tuple:
    """(absmax, code, code2, absmax2, offset) of a 4-bit QuantState as the ops take them:
    tensors on ``device``; code2/absmax2/offset None for a plain state, offset a float32 (1,)
    tensor for a nested one (a host number in the state is made one)."""
    s2 = state.state2
    if s2 is None:
        return state.absmax, state.code, None, None, None
    offset = state.offset
    if isinstance(offset, Tensor):
        offset = offset.to(device=device, dtype=torch.float32).reshape(1)
    else:
        offset = torch.tensor([float(np.float32(offset))], dtype=torch.float32, device=device)
    return state.absmax, state.code, s2.code, s2.absmax, offset


def _state(absmax, code, code2, absmax2, offset, blocksize: int, quant_type: str, N: int, K: int) -> QuantState:
    """The QuantState of the ops' separate tensors (module docstring)."""
    nested = code2 is not None
    return QuantState(absmax=absmax, shape=(int(N), int(K)), code=code, dtype="float32",
                      blocksize=int(blocksize), quant_type=quant_type,
                      offset=offset.reshape(()) if nested else None,
                      state2=QuantState(absmax=absmax2, code=code2, dtype="float32", blocksize=256)
                      if nested else None)


class Matmul4bitPlan:
    """``x @ W^T + bias`` for one 4-bit weight W (N, K), everything about W prepared once.

    Build it with ``prepare_matmul_4bit``. ``plan(x, bias)``: x (..., K) float16 / bfloat16 /
    float32 on W's device, bias (N,) of x's dtype or None -> (..., N) of x's dtype. The CUDA
    path runs a fused kernel (float32 accumulation, each packed byte read once: gemv_4bit for
    one row, matmul_4bit for up to FUSED_MAX_ROWS rows, the tensor-core kernel for 8-64 rows
    of 16-bit x (2-64 on large weights); qkernels.fourbit._cupy.choose_kernel, its answer
    cached per row count) and dequantize + cuBLAS above; on the host, the weight is prepared
    once (fourbit.HostWeight4bit) and each call runs the host backend's matmul_4bit.
    ``key`` identifies the tensors the plan was made from (the layer compares it per call).
    """

    def __init__(self, packed: Tensor, state: QuantState, key=None, hold: bool = True, checked: bool = False):
        self.N, self.K = (int(d) for d in state.shape)
        if not checked:
            _check_state(packed, state)  # once per weight: sizes, dtypes, devices
        self.device = packed.device
        self.key = key
        # hold=False (the ops' cache, CUDA only): no tensor is kept, only their addresses
        self.packed, self.state = (packed, state) if hold else (None, None)
        self._cuda = self._host = None
        if hold and packed.device.type == "cpu" and packed.is_contiguous():
            self._host = HostWeight4bit(packed, state)
        if takes_cuda_path(packed):
            from ._cupy import PreparedWeight4bit
            f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
            s2 = state.state2
            nest = None if s2 is None else (f32(s2.code), f32(s2.absmax), f32(state.offset).reshape(1))
            absmax = state.absmax.contiguous() if s2 is not None else f32(state.absmax)
            self._cuda = PreparedWeight4bit(packed.contiguous().view(torch.uint8).reshape(-1), absmax,
                                            f32(state.code), nest, int(state.blocksize), self.N, self.K,
                                            hold=hold)

    def __call__(self, x: Tensor, bias: Optional[Tensor] = None, kernel: Optional[str] = None) -> Tensor:
        """``kernel``: None (the plan's choice for x's row count and dtype, cached), or one of
        "gemv", "fused", "mma", "dequantize" to force it on CUDA (ValueError when it cannot
        take x; tests and benchmarks); host data ignores it."""
        cuda = self._cuda
        if cuda is not None and takes_cuda_path(x):
            if x.device != self.device:  # the prepared launch holds this device's pointers
                raise ValueError(f"matmul_4bit: x is on {x.device} but the weight is on {self.device}")
            if x.dim() == 0 or x.shape[-1] != self.K:
                raise ValueError(f"matmul_4bit: x's last dimension must be in_features {self.K}; "
                                 f"got x of shape {tuple(x.shape)}")
            M = x.numel() // self.K if self.K else 0
            if M == 0:  # no rows: nothing to launch
                return x.new_empty((*x.shape[:-1], self.N))
            if not x.is_contiguous():
                x = x.contiguous()
            route = cuda.route(x.dtype, M) if kernel is None else cuda.check_kernel(kernel, x, M)
            if route != "dequantize":
                if route != "mma" and x.data_ptr() % 16:  # a contiguous view at an odd offset
                    x = x.clone()  # (the tensor-core kernel stages any x itself)
                if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
                    bias = bias.to(x.dtype).contiguous()  # the kernel reads it in x's dtype
                out = x.new_empty((*x.shape[:-1], self.N))
                device, stream = torch_stream(x)
                with on_torch_device(device):
                    cuda.matmul(x, M, bias, out, stream, route)
                return out
            return torch.nn.functional.linear(x, self.dequantize(x.dtype), bias)
        if self._host is not None and x.device.type == "cpu":
            return self._host(x, bias)
        return _matmul_4bit(x, self.packed, self.state, bias)

    def dequantize(self, dtype: torch.dtype) -> Tensor:
        """W (N, K) in ``dtype``, dequantized in float32 and rounded once."""
        cuda = self._cuda
        if cuda is not None and (self.packed is None or takes_cuda_path(self.packed)):
            out = torch.empty((self.N, self.K), dtype=dtype, device=self.device)
            device, stream = torch_stream(out)
            with on_torch_device(device):
                cuda.dequantize(out, stream)
            return out
        return _dequantize_4bit(self.packed, self.state, out_dtype=str(dtype)[6:])


def prepare_matmul_4bit(packed: Tensor, state: QuantState, key=None) -> Matmul4bitPlan:
    """The Matmul4bitPlan of a weight quantized by ``quantize_4bit`` as (out, in)."""
    if state.shape is None or len(state.shape) != 2:
        raise ValueError(f"a 4-bit linear weight needs a 2-D state shape; got {state.shape}")
    N, K = state.shape
    tensors = state_tensors(state, packed.device)
    return Matmul4bitPlan(packed, _state(*tensors, state.blocksize, state.quant_type, N, K), key=key)


# --- the declared ops -------------------------------------------------------------------------
# A compiled model calls the ops, not a layer's plan: on CUDA they keep theirs in a PlanCache
# (qkernels/_cuda/launch.py), keyed by their tensors' addresses; those plans hold no tensor.
_OP_PLANS = PlanCache()
_CHECKED_LAYOUTS: set = set()  # the host ops' tensor layouts that passed _check_state


def _op_plan(packed, absmax, code, code2, absmax2, offset, blocksize, quant_type, N, K) -> Matmul4bitPlan:
    state = _state(absmax, code, code2, absmax2, offset, blocksize, quant_type, N, K)
    tensors = (packed, absmax, code, code2, absmax2, offset)
    f32 = (code, absmax2, offset) if code2 is not None else (absmax, code)
    if not takes_cuda_path(packed) or not all(t.is_contiguous() and t.dtype == torch.float32 for t in f32):
        # a host plan per call (it holds the tensors, so it is not cached); its checks, a
        # function of the tensors' shapes, dtypes and devices only, are made once per layout
        layout = (int(blocksize), quant_type, int(N), int(K)) + tuple(
            None if t is None else (t.shape, t.dtype, t.device, t.is_contiguous()) for t in tensors)
        checked = layout in _CHECKED_LAYOUTS
        plan = Matmul4bitPlan(packed, state, checked=checked)
        if not checked:
            if len(_CHECKED_LAYOUTS) >= 4096:
                _CHECKED_LAYOUTS.clear()
            _CHECKED_LAYOUTS.add(layout)
        return plan
    key = (packed.device.index, packed.dtype, int(blocksize), quant_type, int(N), int(K), absmax.dtype,
           *(0 if t is None else t.data_ptr() for t in tensors), packed.is_contiguous())
    return _OP_PLANS.get(key, lambda: Matmul4bitPlan(packed, state, key=key, hold=False))


@torch.library.custom_op("qkernels::matmul_4bit", mutates_args=())
def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, code2: Optional[Tensor],
                absmax2: Optional[Tensor], offset: Optional[Tensor], bias: Optional[Tensor],
                blocksize: int, quant_type: str, out_features: int) -> Tensor:
    """x (..., K) @ W^T + bias for the 4-bit weight W (out_features, K) (module docstring)."""
    plan = _op_plan(packed, absmax, code, code2, absmax2, offset, blocksize, quant_type, out_features, x.shape[-1])
    if plan.packed is None and not takes_cuda_path(x):  # a cached CUDA plan meets host data
        plan = Matmul4bitPlan(packed, _state(absmax, code, code2, absmax2, offset, blocksize, quant_type,
                                             out_features, x.shape[-1]))
    return plan(x, bias)


@matmul_4bit.register_fake
def _matmul_4bit_fake(x, packed, absmax, code, code2, absmax2, offset, bias, blocksize, quant_type,
                      out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("qkernels::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, code2: Optional[Tensor],
                    absmax2: Optional[Tensor], offset: Optional[Tensor], blocksize: int, quant_type: str,
                    out_features: int, in_features: int, dtype: torch.dtype) -> Tensor:
    """W (out_features, in_features) in ``dtype``."""
    return _op_plan(packed, absmax, code, code2, absmax2, offset, blocksize, quant_type, out_features,
                    in_features).dequantize(dtype)


@dequantize_4bit.register_fake
def _dequantize_4bit_fake(packed, absmax, code, code2, absmax2, offset, blocksize, quant_type,
                          out_features, in_features, dtype):
    return packed.new_empty((out_features, in_features), dtype=dtype)


def _matmul_setup(ctx, inputs, output):
    x, packed, absmax, code, code2, absmax2, offset, bias, blocksize, quant_type, out_features = inputs
    ctx.save_for_backward(packed, absmax, code, code2, absmax2, offset)
    ctx.shape = (blocksize, quant_type, out_features, x.shape[-1])
    ctx.has_bias = bias is not None


def _matmul_backward(ctx, grad):
    """dx = grad @ W (W dequantized in grad's dtype); dbias = grad summed over rows; the
    weight and its state get none (a frozen 4-bit weight)."""
    packed, absmax, code, code2, absmax2, offset = ctx.saved_tensors
    blocksize, quant_type, N, K = ctx.shape
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        w = dequantize_4bit(packed, absmax, code, code2, absmax2, offset, blocksize, quant_type, N, K, grad.dtype)
        dx = grad @ w
    if ctx.has_bias and ctx.needs_input_grad[7]:
        dbias = grad.reshape(-1, N).sum(0)
    return dx, None, None, None, None, None, None, dbias, None, None, None


matmul_4bit.register_autograd(_matmul_backward, setup_context=_matmul_setup)


def matmul_4bit_op(x: Tensor, packed: Tensor, state: QuantState, bias: Optional[Tensor] = None,
                   transposed: bool = False) -> Tensor:
    """``x @ W^T + bias`` through the declared ops, for a 4-bit weight W given as ``packed``
    and its QuantState (``state.shape`` = (N, K)): differentiable in x and bias, traceable by
    torch.compile. ``transposed``: the weight was quantized as (in, out) = (K', N'), and the
    product is ``x @ W + bias`` (bitsandbytes' deprecated orientation). bias is cast to x's
    dtype, as the op takes it."""
    tensors = state_tensors(state, x.device)
    N, K = (int(d) for d in state.shape)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if transposed:
        w = dequantize_4bit(packed, *tensors, state.blocksize, state.quant_type, N, K, x.dtype)
        return torch.nn.functional.linear(x, w.t(), bias)
    return matmul_4bit(x, packed, *tensors, bias, state.blocksize, state.quant_type, N)
