"""SwitchBack INT8 linear layers for training (SPEC.md sections 6 and 7).

    layer = SwitchBackLinear(4096, 16384)              # instead of nn.Linear(4096, 16384)
    layer.eval(); layer.prepare_for_eval()             # int8 weight quantized once for inference

The forward matmul and the input-gradient matmul run in int8 (row-wise quantized
activations and output gradients against a globally or row-wise quantized weight, int32
accumulation, scales applied in float32); the weight gradient ``G^T @ X`` is computed in
the activation precision ("switch back"). Variants:

    SwitchBackLinearGlobal               global weight scale; saves X and W
    SwitchBackLinearGlobalMemEfficient   global weight scale; saves int8 X, its row scales and
                                         the forward's int8 W instead (about half the bytes)
    SwitchBackLinearVectorwise           per-output-channel weight scales (per input channel
                                         in the backward)

Parameters and state_dict are exactly nn.Linear's, so a checkpoint moves between the two.
The int8 primitives are qkernels.int8's (NumPy reference on CPU, CuPy kernels on CUDA),
registered here as ``torch.library`` custom ops with fake kernels, so a compiled model has
no graph break in these layers. ``quant_dtype="fp8"`` runs both matmuls as native float8
GEMMs instead (torch_ops/fp8.py; a GPU with FP8 tensor cores).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qkernels.int8 as Q
from ._checks import check_linear_input, compute_dtype
from ._layers import fast_cuda as _fast_cuda
from .fp8 import linear_fp8_native

__all__ = ["SwitchBackLinear", "SwitchBackLinearGlobal", "SwitchBackLinearGlobalMemEfficient",
           "SwitchBackLinearVectorwise", "SwitchBackGlobal", "SwitchBackGlobalMemEfficient",
           "SwitchBackVectorwise", "quantize_rowwise", "quantize_global",
           "quantize_global_transpose", "quantize_columnwise_and_transpose", "dequantize_rowwise",
           "int8_matmul_rowwise_dequantize", "int8_matmul_mixed_dequantize"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


# --- custom ops over qkernels.int8 (shapes as in SPEC.md section 6) ---------------------------
# On CUDA with the CuPy backend, well-formed calls go straight to the raw-pointer launchers
# (qkernels.int8._cupy: torch allocations, torch's stream, the same kernels and bits); the
# public qkernels.int8 API (array conversions, full validation, its errors) takes the rest.

def _fast_float(x: Tensor):
    """qkernels.int8._cupy for a nonempty 2-D float16/bfloat16/float32 CUDA tensor, else None."""
    return _fast_cuda(x) if x.dim() == 2 and x.dtype in _FLOATS and x.numel() > 0 else None


def _fast_matmul(a, b, state_a, state_b, bias, n_b: int):
    """qkernels.int8._cupy where int8_matmul_*_dequantize's arguments are well formed CUDA
    tensors on one device (n_b: state_b's length, 1 for the global scale), else None."""
    fast = _fast_cuda(a)
    if fast is None or a.dim() != 2 or b.dim() != 2 or a.dtype != torch.int8 or b.dtype != torch.int8:
        return None
    M, K = a.shape
    N = b.shape[1]
    ok = (b.shape[0] == K and M * N * K > 0 and b.device == a.device
          and all(t.dim() == 1 and t.dtype in _FLOATS and t.device == a.device
                  for t in (state_a, state_b) + (() if bias is None else (bias,)))
          and state_a.shape[0] == M and state_b.shape[0] == (1 if n_b == 1 else N)
          and (bias is None or bias.shape[0] == N))
    return fast if ok else None


def _matmul(a, b, state_a, state_b, bias, rowwise: bool):
    fast = _fast_matmul(a, b, state_a, state_b, bias, 0 if rowwise else 1)
    if fast is None:
        fn = Q.int8_matmul_rowwise_dequantize if rowwise else Q.int8_matmul_mixed_dequantize
        return fn(a, b, state_a, state_b, bias)
    return fast.int8_matmul_dequant_torch(a.contiguous(), b.t().contiguous(), state_a.contiguous(),
                                          state_b.contiguous(), None if bias is None else bias.contiguous(),
                                          out_dtype=state_a.dtype, col_global=not rowwise)


@torch.library.custom_op("qkernels::quantize_rowwise", mutates_args=())
def quantize_rowwise(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float -> (int8 (M, K), row absmax (M,) in x's dtype)."""
    fast = _fast_float(x)
    if fast is None:
        return Q.quantize_rowwise(x.detach())
    return fast.quantize_rowwise_torch(x.detach().contiguous())


@torch.library.custom_op("qkernels::quantize_global", mutates_args=())
def quantize_global(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> (int8 (N, K), absmax (1,) in w's dtype)."""
    fast = _fast_float(w)
    if fast is None:
        return Q.quantize_global(w.detach())
    return fast.quantize_global_torch(w.detach().contiguous())


@torch.library.custom_op("qkernels::quantize_global_transpose", mutates_args=())
def quantize_global_transpose(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> (int8 (K, N) contiguous = codes^T, absmax (1,))."""
    fast = _fast_float(w)
    if fast is None:
        return Q.quantize_global_transpose(w.detach())
    return fast.quantize_global_torch(w.detach().contiguous(), transpose=True)


@torch.library.custom_op("qkernels::quantize_columnwise_and_transpose", mutates_args=())
def quantize_columnwise_and_transpose(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) float -> (int8 (K, N) contiguous, per-column absmax (K,) in w's dtype)."""
    fast = _fast_float(w)
    if fast is None:
        return Q.quantize_columnwise_and_transpose(w.detach())
    return fast.quantize_columnwise_and_transpose_torch(w.detach().contiguous())


@torch.library.custom_op("qkernels::dequantize_rowwise", mutates_args=())
def dequantize_rowwise(q: Tensor, state: Tensor) -> Tensor:
    """q int8 (M, K), state (M,) -> q * state / 127 (M, K) in state's dtype."""
    fast = _fast_cuda(q)
    if (fast is None or q.dim() != 2 or q.dtype != torch.int8 or q.numel() == 0 or state.dim() != 1
            or state.dtype not in _FLOATS or state.device != q.device or state.shape[0] != q.shape[0]):
        return Q.dequantize_rowwise(q, state)
    return fast.dequantize_rowwise_torch(q.contiguous(), state.contiguous())


@torch.library.custom_op("qkernels::int8_matmul_rowwise_dequantize", mutates_args=())
def int8_matmul_rowwise_dequantize(a: Tensor, b: Tensor, state_a: Tensor, state_b: Tensor,
                                   bias: Optional[Tensor]) -> Tensor:
    """a int8 (M, K), b int8 (K, N) (usually W_int8.t()), state_a (M,), state_b (N,), bias (N,)
    -> (M, N) in state_a's dtype."""
    return _matmul(a, b, state_a, state_b, bias, rowwise=True)


@torch.library.custom_op("qkernels::int8_matmul_mixed_dequantize", mutates_args=())
def int8_matmul_mixed_dequantize(a: Tensor, b: Tensor, state_a: Tensor, state_b: Tensor,
                                 bias: Optional[Tensor]) -> Tensor:
    """As int8_matmul_rowwise_dequantize with state_b one global scale (1,)."""
    return _matmul(a, b, state_a, state_b, bias, rowwise=False)


@quantize_rowwise.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1])


@quantize_global.register_fake
def _(w):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty((1,))


@quantize_global_transpose.register_fake
def _(w):
    return w.new_empty((w.shape[1], w.shape[0]), dtype=torch.int8), w.new_empty((1,))


@quantize_columnwise_and_transpose.register_fake
def _(w):
    return w.new_empty((w.shape[1], w.shape[0]), dtype=torch.int8), w.new_empty(w.shape[1:])


@dequantize_rowwise.register_fake
def _(q, state):
    return q.new_empty(q.shape, dtype=state.dtype)


def _fake_matmul(a, b, state_a, state_b, bias):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=state_a.dtype)


int8_matmul_rowwise_dequantize.register_fake(_fake_matmul)
int8_matmul_mixed_dequantize.register_fake(_fake_matmul)


# --- eager CUDA: the raw launchers without the custom-op dispatch -----------------------------
# The autograd functions below run on tensors they have shaped themselves (2-D, one float
# dtype, one device). In eager mode on CUDA they call qkernels.int8._cupy directly: the same
# kernels and bits as the custom ops' CUDA bodies, minus the torch.library dispatch (tens of
# microseconds of host time per call, several calls per step, which the GPU waits for at the
# smaller shapes). Under torch.compile they call the custom ops, which the graph keeps.

def _direct(X: Tensor, W: Tensor, bias: Optional[Tensor] = None, shared: int = 1):
    """qkernels.int8._cupy for an eager call on CUDA tensors of one device: X (M, K) and W
    nonempty 2-D, float (W int8 in the memory-efficient backward), X.shape[1] ==
    W.shape[shared] (1: the forward's W (N, K); 0: the backward's G (M, N) against W (N, K)),
    bias None or (W.shape[0],) float. Else None: the custom ops, which validate and raise."""
    if (torch.compiler.is_compiling() or X.dim() != 2 or W.dim() != 2 or X.numel() == 0
            or W.numel() == 0 or W.device != X.device or X.shape[1] != W.shape[shared]
            or X.dtype not in _FLOATS or W.dtype not in (_FLOATS + (torch.int8,) if shared == 0 else _FLOATS)):
        return None
    if bias is not None and (bias.shape != (W.shape[0],) or bias.device != X.device
                             or bias.dtype not in _FLOATS):
        return None
    return _fast_cuda(X)


def _rowwise(fast, x):
    return quantize_rowwise(x) if fast is None else fast.quantize_rowwise_torch(x.contiguous())


def _global(fast, w, transpose: bool = False):
    if fast is None:
        return (quantize_global_transpose if transpose else quantize_global)(w)
    return fast.quantize_global_torch(w.contiguous(), transpose=transpose)


def _columnwise_t(fast, w):
    if fast is None:
        return quantize_columnwise_and_transpose(w)
    return fast.quantize_columnwise_and_transpose_torch(w.contiguous())


def _mm(fast, a, b, state_a, state_b, bias, rowwise: bool):
    """int8_matmul_{rowwise,mixed}_dequantize(a, b, ...) with a int8 (M, K), b int8 (K, N)."""
    if fast is None:
        fn = int8_matmul_rowwise_dequantize if rowwise else int8_matmul_mixed_dequantize
        return fn(a, b, state_a, state_b, bias)
    return fast.int8_matmul_dequant_torch(a, b.t().contiguous(), state_a, state_b, bias,
                                          out_dtype=state_a.dtype, col_global=not rowwise)


# --- autograd functions: X (M, K), W (N, K), bias (N,) or None, all of one float dtype --------

class SwitchBackGlobal(torch.autograd.Function):
    """Y = int8(X, per row) @ int8(W, global)^T + bias; dX = int8(G, per row) @ int8(W,
    global); dW = G^T @ X in X's dtype; dbias = sum(G, 0). Saves X and W."""

    @staticmethod
    def forward(ctx, X, W, bias):
        fast = _direct(X, W, bias)
        Xq, sX = _rowwise(fast, X)
        Wq, sW = _global(fast, W)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(X, W)
        return _mm(fast, Xq, Wq.t(), sX, sW, bias, rowwise=False)

    @staticmethod
    def backward(ctx, G):
        X, W = ctx.saved_tensors
        dX = dW = dbias = None
        if ctx.needs_input_grad[0]:
            fast = _direct(G, W, shared=0)
            Gq, sG = _rowwise(fast, G)
            WqT, sW = _global(fast, W, transpose=True)           # (K, N)
            dX = _mm(fast, Gq, WqT.t(), sG, sW, None, rowwise=False)
        if ctx.needs_input_grad[1]:
            dW = torch.matmul(G.t(), X)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = G.sum(0)
        return dX, dW, dbias


class SwitchBackGlobalMemEfficient(torch.autograd.Function):
    """Global's math, but saves int8 X with its row scales and the forward's int8 W with its
    scale (M*K + N*K bytes plus scales instead of (M*K + N*K) * itemsize): dW = G^T @
    dequantize_rowwise(Xq, sX); dX = int8(G, per row) @ Wq, W not re-quantized."""

    @staticmethod
    def forward(ctx, X, W, bias):
        fast = _direct(X, W, bias)
        Xq, sX = _rowwise(fast, X)
        Wq, sW = _global(fast, W)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(Xq, sX, Wq, sW)
        return _mm(fast, Xq, Wq.t(), sX, sW, bias, rowwise=False)

    @staticmethod
    def backward(ctx, G):
        Xq, sX, Wq, sW = ctx.saved_tensors
        dX = dW = dbias = None
        fast = _direct(G, Wq, shared=0)
        if ctx.needs_input_grad[0]:
            Gq, sG = _rowwise(fast, G)
            dX = _mm(fast, Gq, Wq, sG, sW, None, rowwise=False)  # Wq (N, K) as (K', N')
        if ctx.needs_input_grad[1]:
            X = dequantize_rowwise(Xq, sX) if fast is None else fast.dequantize_rowwise_torch(Xq, sX)
            dW = torch.matmul(G.t(), X)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = G.sum(0)
        return dX, dW, dbias


class SwitchBackVectorwise(torch.autograd.Function):
    """Y = int8(X, per row) @ int8(W, per output row)^T + bias; dX = int8(G, per row) @
    int8(W, per input column); dW = G^T @ X in X's dtype. Saves X and W."""

    @staticmethod
    def forward(ctx, X, W, bias):
        fast = _direct(X, W, bias)
        Xq, sX = _rowwise(fast, X)
        Wq, sW = _rowwise(fast, W)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(X, W)
        return _mm(fast, Xq, Wq.t(), sX, sW, bias, rowwise=True)

    @staticmethod
    def backward(ctx, G):
        X, W = ctx.saved_tensors
        dX = dW = dbias = None
        if ctx.needs_input_grad[0]:
            fast = _direct(G, W, shared=0)
            Gq, sG = _rowwise(fast, G)
            WqT, sWc = _columnwise_t(fast, W)                    # (K, N), (K,)
            dX = _mm(fast, Gq, WqT.t(), sG, sWc, None, rowwise=True)
        if ctx.needs_input_grad[1]:
            dW = torch.matmul(G.t(), X)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = G.sum(0)
        return dX, dW, dbias


# --- the layer ---------------------------------------------------------------------------------

class SwitchBackLinear(nn.Linear):
    """``SwitchBackLinear(in_features, out_features, bias=True, device=None, dtype=None,
    vector_wise_quantization=False, mem_efficient=False, quant_dtype="int8")``.

    A drop-in nn.Linear: input (*, in_features) float16 / bfloat16 / float32 (the compute
    dtype follows the input, or autocast's), output (*, out_features) in that dtype; the
    parameters (weight (out, in), bias (out,)) keep their own dtype and receive gradients in
    it. ``prepare_for_eval()`` (in eval mode) quantizes the weight once and replaces it with
    the buffers ``W_int8`` (int8 (out, in)) and ``state_W`` ((1,) global or (out,) row-wise
    absmax, the weight's dtype), as bitsandbytes does; a fresh module loads such a
    checkpoint with ``load_state_dict``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, vector_wise_quantization: bool = False, mem_efficient: bool = False,
                 quant_dtype: str = "int8"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if vector_wise_quantization and mem_efficient:
            raise ValueError("SwitchBackLinear: mem_efficient=True is supported only with global "
                             "quantization (vector_wise_quantization=False)")
        if quant_dtype not in ("int8", "fp8"):
            raise ValueError(f"SwitchBackLinear: quant_dtype must be 'int8' or 'fp8'; got {quant_dtype!r}")
        self.vector_wise_quantization = bool(vector_wise_quantization)
        self.mem_efficient = bool(mem_efficient)
        self.quant_dtype = quant_dtype
        if self.vector_wise_quantization:
            self._fn = SwitchBackVectorwise
        else:
            self._fn = SwitchBackGlobalMemEfficient if self.mem_efficient else SwitchBackGlobal

    @property
    def prepared(self) -> bool:
        """True after prepare_for_eval() (or loading W_int8 / state_W): the weight is int8."""
        return "W_int8" in self._buffers

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        if self.prepared:
            check_linear_input(x, self.in_features, self.W_int8, name)
            if self.training:
                raise RuntimeError(f"{name}: this layer was prepared for eval (its weight is int8 "
                                   f"and cannot be trained); call .eval() before using it")
            return self._forward_prepared(x)
        check_linear_input(x, self.in_features, self.weight, name)
        if self.quant_dtype == "fp8":
            return linear_fp8_native(x, self.weight, self.bias,
                                     w_rowwise=self.vector_wise_quantization,
                                     mem_efficient=self.mem_efficient)
        dt = compute_dtype(x)
        X = x.reshape(-1, self.in_features).to(dt)
        W = self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        if X.shape[0] == 0:
            Y = F.linear(X, W, b)   # no tokens: an empty output and zero gradients
        else:
            Y = self._fn.apply(X, W, b)
        return Y.reshape(*x.shape[:-1], self.out_features)

    def _forward_prepared(self, x: Tensor) -> Tensor:
        dt = compute_dtype(x)
        X = x.reshape(-1, self.in_features).to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        if X.shape[0] == 0:
            return x.new_zeros((*x.shape[:-1], self.out_features), dtype=dt)
        Xq, sX = quantize_rowwise(X)
        matmul = int8_matmul_rowwise_dequantize if self.vector_wise_quantization \
            else int8_matmul_mixed_dequantize
        Y = matmul(Xq, self.W_int8.t(), sX, self.state_W, b)
        return Y.reshape(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def prepare_for_eval(self) -> "SwitchBackLinear":
        """Quantize the weight once (global, or row-wise when vector-wise) into the buffers
        W_int8 / state_W and delete ``weight``. Needs eval mode; int8 layers only."""
        name = type(self).__name__
        if self.training:
            raise RuntimeError(f"{name}.prepare_for_eval() needs eval mode: call .eval() first "
                               f"(it deletes the trainable weight)")
        if self.quant_dtype != "int8":
            raise NotImplementedError(f"{name}.prepare_for_eval() supports quant_dtype='int8' only")
        if self.prepared:
            return self
        quantize = quantize_rowwise if self.vector_wise_quantization else quantize_global
        W_int8, state_W = quantize(self.weight)
        del self.weight
        self.register_buffer("W_int8", W_int8)
        self.register_buffer("state_W", state_W)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a prepared (int8) checkpoint loads into a fresh module: become prepared first
        key_q, key_s = prefix + "W_int8", prefix + "state_W"
        if key_q in state_dict and key_s in state_dict and not self.prepared:
            q, s = state_dict[key_q], state_dict[key_s]
            device = self.weight.device
            del self.weight
            self.register_buffer("W_int8", torch.empty(q.shape, dtype=torch.int8, device=device))
            self.register_buffer("state_W", torch.empty(s.shape, dtype=s.dtype, device=device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        kind = "vector-wise" if self.vector_wise_quantization else "global"
        extra = f", quantization={kind}, mem_efficient={self.mem_efficient}"
        if self.quant_dtype != "int8":
            extra += f", quant_dtype={self.quant_dtype!r}"
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}" + extra + (", prepared" if self.prepared else "")


class SwitchBackLinearGlobal(SwitchBackLinear):
    """SwitchBackLinear with a global weight scale (bitsandbytes' alias)."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 quant_dtype="int8"):
        super().__init__(in_features, out_features, bias, device, dtype,
                         vector_wise_quantization=False, mem_efficient=False, quant_dtype=quant_dtype)


class SwitchBackLinearGlobalMemEfficient(SwitchBackLinear):
    """SwitchBackLinear, global weight scale, saving int8 activations for the backward."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 quant_dtype="int8"):
        super().__init__(in_features, out_features, bias, device, dtype,
                         vector_wise_quantization=False, mem_efficient=True, quant_dtype=quant_dtype)


class SwitchBackLinearVectorwise(SwitchBackLinear):
    """SwitchBackLinear with per-channel weight scales."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None,
                 quant_dtype="int8"):
        super().__init__(in_features, out_features, bias, device, dtype,
                         vector_wise_quantization=True, mem_efficient=False, quant_dtype=quant_dtype)
