"""SwitchBack INT8 linear layers for training (docs/FORMATS.md §6 and §7).

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

Parameters and state_dict are exactly nn.Linear's, so a checkpoint moves between the two,
until ``prepare_for_eval()``: then the state_dict is bitsandbytes' eval checkpoint {W_int8,
state_W, bias}, which loads into these layers (not nn.Linear), while an nn.Linear checkpoint
still loads into a prepared layer (quantized on load).
The int8 primitives are qkernels.int8's (NumPy reference on CPU, CuPy kernels on CUDA),
declared as ``torch.library`` custom ops with fake kernels in qkernels.int8.ops (re-exported
here), so a compiled model has no graph break in these layers. ``quant_dtype="fp8"`` runs
both matmuls as native float8 GEMMs instead (torch_ops/fp8.py; a GPU with FP8 tensor cores).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkernels.int8.ops import (dequantize_rowwise, direct_dequantize_rowwise,
                               direct_int8_matmul_dequantize, direct_quantize_columnwise_and_transpose,
                               direct_quantize_global, direct_quantize_rowwise,
                               int8_matmul_mixed_dequantize, int8_matmul_rowwise_dequantize,
                               quantize_columnwise_and_transpose, quantize_global,
                               quantize_global_transpose, quantize_rowwise, switchback_direct)
from ._checks import check_linear_input, compute_dtype
from ._layers import LoadReport, check_bias, layer_keys
from .fp8 import linear_fp8_native

__all__ = ["SwitchBackLinear", "SwitchBackLinearGlobal", "SwitchBackLinearGlobalMemEfficient",
           "SwitchBackLinearVectorwise", "SwitchBackGlobal", "SwitchBackGlobalMemEfficient",
           "SwitchBackVectorwise", "quantize_rowwise", "quantize_global",
           "quantize_global_transpose", "quantize_columnwise_and_transpose", "dequantize_rowwise",
           "int8_matmul_rowwise_dequantize", "int8_matmul_mixed_dequantize"]

# The custom ops (torch.ops.qkernels.quantize_rowwise, ...) and the eager direct path are
# declared in qkernels.int8.ops and re-exported here. The autograd functions below run on tensors
# they have shaped themselves (2-D, one float dtype, one device): in eager mode on CUDA
# ``switchback_direct`` gives them a handle with which the ``direct_*`` functions call the raw
# launchers without the custom-op dispatch; under torch.compile (handle None) they call the
# custom ops, which the graph keeps.


# --- autograd functions: X (M, K), W (N, K), bias (N,) or None, all of one float dtype --------

def _forward_saving_xw(ctx, X, W, bias, rowwise: bool):
    """The forward of SwitchBackGlobal (``rowwise`` False: one scale for W) and
    SwitchBackVectorwise (``rowwise``: a scale per row of W): Y (M, N) in X's dtype =
    int8(X, per row) @ int8(W)^T + bias, from X (M, K), W (N, K), bias (N,) or None; saves
    X and W."""
    fast = switchback_direct(X, W, bias)
    Xq, sX = direct_quantize_rowwise(fast, X)
    Wq, sW = direct_quantize_rowwise(fast, W) if rowwise else direct_quantize_global(fast, W)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(X, W)
    return direct_int8_matmul_dequantize(fast, Xq, Wq.t(), sX, sW, bias, rowwise=rowwise)


def _backward_saving_xw(ctx, G, rowwise: bool):
    """(dX (M, K), dW (N, K), dbias (N,)) for _forward_saving_xw's output gradient G (M, N),
    each None where not needed: dX = int8(G, per row) @ int8(W) with W quantized per input
    column (``rowwise``) or with one scale, dW = G^T @ X in X's dtype, dbias = sum(G, 0)."""
    X, W = ctx.saved_tensors
    dX = dW = dbias = None
    if ctx.needs_input_grad[0]:
        fast = switchback_direct(G, W, shared=0)
        Gq, sG = direct_quantize_rowwise(fast, G)
        if rowwise:
            WqT, sW = direct_quantize_columnwise_and_transpose(fast, W)   # (K, N), (K,)
        else:
            WqT, sW = direct_quantize_global(fast, W, transpose=True)   # (K, N), (1,)
        dX = direct_int8_matmul_dequantize(fast, Gq, WqT.t(), sG, sW, None, rowwise=rowwise)
    if ctx.needs_input_grad[1]:
        dW = torch.matmul(G.t(), X)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = G.sum(0)
    return dX, dW, dbias


class SwitchBackGlobal(torch.autograd.Function):
    """Y = int8(X, per row) @ int8(W, global)^T + bias; dX = int8(G, per row) @ int8(W,
    global); dW = G^T @ X in X's dtype; dbias = sum(G, 0). Saves X and W."""

    @staticmethod
    def forward(ctx, X, W, bias):
        return _forward_saving_xw(ctx, X, W, bias, rowwise=False)

    @staticmethod
    def backward(ctx, G):
        return _backward_saving_xw(ctx, G, rowwise=False)


class SwitchBackGlobalMemEfficient(torch.autograd.Function):
    """Global's math, but saves int8 X with its row scales and the forward's int8 W with its
    scale (M*K + N*K bytes plus scales instead of (M*K + N*K) * itemsize): dW = G^T @
    dequantize_rowwise(Xq, sX); dX = int8(G, per row) @ Wq, W not re-quantized."""

    @staticmethod
    def forward(ctx, X, W, bias):
        fast = switchback_direct(X, W, bias)
        Xq, sX = direct_quantize_rowwise(fast, X)
        Wq, sW = direct_quantize_global(fast, W)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(Xq, sX, Wq, sW)
        return direct_int8_matmul_dequantize(fast, Xq, Wq.t(), sX, sW, bias, rowwise=False)

    @staticmethod
    def backward(ctx, G):
        Xq, sX, Wq, sW = ctx.saved_tensors
        dX = dW = dbias = None
        fast = switchback_direct(G, Wq, shared=0)
        if ctx.needs_input_grad[0]:
            Gq, sG = direct_quantize_rowwise(fast, G)
            # Wq (N, K) as (K', N')
            dX = direct_int8_matmul_dequantize(fast, Gq, Wq, sG, sW, None, rowwise=False)
        if ctx.needs_input_grad[1]:
            X = direct_dequantize_rowwise(fast, Xq, sX)
            dW = torch.matmul(G.t(), X)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = G.sum(0)
        return dX, dW, dbias


class SwitchBackVectorwise(torch.autograd.Function):
    """Y = int8(X, per row) @ int8(W, per output row)^T + bias; dX = int8(G, per row) @
    int8(W, per input column); dW = G^T @ X in X's dtype. Saves X and W."""

    @staticmethod
    def forward(ctx, X, W, bias):
        return _forward_saving_xw(ctx, X, W, bias, rowwise=True)

    @staticmethod
    def backward(ctx, G):
        return _backward_saving_xw(ctx, G, rowwise=True)


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
    checkpoint with ``load_state_dict`` (and becomes prepared). That checkpoint does not load
    into nn.Linear (save before prepare_for_eval for one that does); an nn.Linear checkpoint
    loads into a prepared layer, quantized on load. Shapes and dtypes of W_int8 / state_W are
    checked at load, and a load that fails changes nothing in the layer.
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
        W_int8 / state_W and delete ``weight``. Needs eval mode; int8 layers only.

        The state_dict becomes bitsandbytes' eval checkpoint ``{W_int8, state_W, bias}``
        (docs/FORMATS.md §7). It loads into a SwitchBackLinear of the same variant, fresh or prepared,
        but not into nn.Linear (no ``weight`` key): keep ``state_dict()`` from before this
        call for a float checkpoint. The other way works: an nn.Linear checkpoint loads into
        a prepared layer, quantized on load exactly as this method quantizes."""
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

    # -- state_dict ---------------------------------------------------------------------------
    # Three checkpoints load: nn.Linear's {weight, bias}; the int8 eval form {W_int8, state_W,
    # bias}, which makes a fresh layer prepared; and {weight, bias} into a prepared layer,
    # quantized on load as prepare_for_eval() would. Everything present is validated before
    # the layer changes: an error (error_msgs, raised whatever the user's strict) leaves it as
    # it was. torch passes strict=True here whatever the user asked and applies the user's
    # strict to the missing / unexpected keys afterwards, so those never stop the present
    # keys from loading (as in nn.Linear).

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        sd = layer_keys(state_dict, prefix)
        has_int8 = "W_int8" in sd or "state_W" in sd
        if self.prepared and not has_int8 and "weight" in sd:
            self._load_float_into_prepared(sd, prefix, local_metadata, missing_keys,
                                           unexpected_keys, error_msgs)
            return
        if has_int8:
            report = LoadReport(prefix)
            self._check_int8_checkpoint(sd, report)
            if "bias" in sd:   # only its errors: nn.Module reports missing / unexpected keys
                check_bias(report, sd, self.bias, self.out_features)
            if not report.ok():
                error_msgs.extend(report.errors)
                return
            if not self.prepared:   # a fresh layer becomes prepared, then loads the buffers
                q, s = sd["W_int8"], sd["state_W"]
                device = self.weight.device
                del self.weight
                self.register_buffer("W_int8", torch.empty(q.shape, dtype=torch.int8, device=device))
                self.register_buffer("state_W", torch.empty(s.shape, dtype=s.dtype, device=device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @staticmethod
    def _describe(t) -> str:
        if not isinstance(t, Tensor):
            return f"a {type(t).__name__}"
        return f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}"

    def _check_int8_checkpoint(self, sd: dict, report: LoadReport) -> None:
        """Record in ``report`` what is wrong with the checkpoint's W_int8 / state_W."""
        name = type(self).__name__
        if self.quant_dtype != "int8":
            report.error("W_int8", f"an int8 eval checkpoint (W_int8, state_W) loads into "
                         f"quant_dtype='int8' layers only; this {name} has quant_dtype="
                         f"{self.quant_dtype!r}")
            return
        if not self.prepared and not ("W_int8" in sd and "state_W" in sd):
            have, lack = ("W_int8", "state_W") if "W_int8" in sd else ("state_W", "W_int8")
            report.error(lack, f"W_int8 and state_W load together (the int8 weight and its "
                         f"scale) into a layer that is not prepared; the checkpoint has {have} "
                         f"but no {lack}")
            return
        if "W_int8" in sd:
            q, want = sd["W_int8"], (self.out_features, self.in_features)
            if not isinstance(q, Tensor) or q.dtype != torch.int8 or tuple(q.shape) != want:
                report.error("W_int8", f"expected an int8 tensor of shape (out_features, "
                             f"in_features) = {want}; got {self._describe(q)}")
        if "state_W" in sd:
            s = sd["state_W"]
            vw = self.vector_wise_quantization
            want = (self.out_features,) if vw else (1,)
            if not isinstance(s, Tensor) or s.dtype not in (torch.float16, torch.bfloat16,
                                                            torch.float32):
                report.error("state_W", f"expected a float16, bfloat16 or float32 tensor; got "
                             f"{self._describe(s)}")
            elif tuple(s.shape) != want:
                if vw:
                    hint = (" (a global-quantization checkpoint: load it into a "
                            "SwitchBackLinearGlobal)" if tuple(s.shape) == (1,) else "")
                    expect = f"one scale per output row, shape ({self.out_features},)"
                else:
                    hint = (" (a vector-wise checkpoint: load it into a "
                            "SwitchBackLinearVectorwise)" if tuple(s.shape) == (self.out_features,)
                            else "")
                    expect = "one scale, shape (1,)"
                report.error("state_W", f"this {name} quantizes the weight "
                             f"{'vector-wise' if vw else 'globally'} and expects "
                             f"{expect}; got shape {tuple(s.shape)}{hint}")

    def _load_float_into_prepared(self, sd, prefix, local_metadata, missing_keys,
                                  unexpected_keys, error_msgs) -> None:
        """An nn.Linear checkpoint into a prepared layer: its weight, cast to the layer's
        dtype (state_W's) as nn.Linear's load casts, quantized as prepare_for_eval() does."""
        report = LoadReport(prefix)
        w, want = sd["weight"], (self.out_features, self.in_features)
        if not isinstance(w, Tensor) or not w.is_floating_point() or tuple(w.shape) != want:
            report.error("weight", f"expected a floating-point tensor of shape (out_features, "
                         f"in_features) = {want} (this layer is prepared for eval: it is "
                         f"quantized on load); got {self._describe(w)}")
        bias = check_bias(report, sd, self.bias, self.out_features)
        report.unexpected += [k for k in sd if k not in ("weight", "bias")]
        quantized = None
        if report.ok():
            device = self.W_int8.device if self.W_int8.device.type != "meta" else w.device
            quantize = quantize_rowwise if self.vector_wise_quantization else quantize_global
            with torch.no_grad():
                quantized = quantize(w.detach().to(device=device, dtype=self.state_W.dtype))
        report.hand_over(missing_keys, unexpected_keys, error_msgs)
        if quantized is None:
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            for key, t in zip(("W_int8", "state_W"), quantized):
                if assign:
                    self._buffers[key] = t
                else:
                    self._buffers[key].copy_(t)
            if bias is not None:
                if assign:
                    self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
                else:
                    self.bias.copy_(bias)

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
