"""LLM.int8() linear layer: ``Int8Params`` and ``Linear8bitLt`` (SPEC.md sections 5 and 9;
bitsandbytes' names, arguments and state_dict keys).

When quantization happens (``has_fp16_weights=False``): **when the weight is moved to a
device** (``layer.to(device)``, ``.cuda()``, ``.cpu()``, ``model.to(...)``), exactly as in
bitsandbytes, or when a checkpoint is loaded (an int8 one as it is; a float one into an
already-quantized layer is quantized on load). The float weight is then dropped: only
``CB`` (int8 (out, in), the parameter's data) and ``SCB`` (float32 (out,) row absmax) are
kept. A forward before that raises. Moving a quantized layer moves CB and SCB, never
re-quantizes.

With ``has_fp16_weights=True`` the weight stays a trainable 16/32-bit parameter and its int8
copy is recomputed whenever the weight changed (keyed on the tensor's version counter;
bitsandbytes serves a stale copy in eval mode after an update).

Forward (x (*, in) float16 / bfloat16 / float32, flattened to (tokens, in)):
``CA, SCA, cols = int8_vectorwise_quant(x, threshold)``;
``out = int8_mm_dequant(int8_linear_matmul(CA, CB), SCA, SCB, bias)``; with ``threshold > 0``
the outlier columns ``cols`` of x are multiplied in float32 with the dequantized weight
columns ``CB[:, cols] * SCB / 127`` and added before the single rounding to x's dtype.
x is quantized in its own dtype (bitsandbytes casts to float16 first, which overflows past
65504 for bfloat16/float32 models). Backward: ``dx = dout @ (CB * SCB / 127)``; ``dW`` only
with has_fp16_weights (int8 product of column-quantized dout^T and x, outlier columns in
float32); ``dbias = sum(dout)``. On CUDA the int8 GEMM runs with its dequantization fused
in the epilogue (qkernels.int8); at most 16 rows with threshold 0 take one fused kernel
instead (quantize x, dp4a GEMV, the same epilogue: qkernels/int8/gemv.cu), with the same
bits. With threshold > 0 the outlier product is added in those kernels' epilogues too (the
Hopper GEMM, or the GEMV for at most 16 rows), with no host synchronization (the outlier
count stays on the device; CUDA-graph safe) where K % 16 == 0; elsewhere the columns are
counted on the host and added with one float32 addmm. On CPU the NumPy reference runs.

state_dict: ``weight`` (int8 CB), ``bias``, ``SCB`` (float32), ``weight_format`` (uint8 0 =
row-major); a float weight (has_fp16_weights, or not quantized yet) is saved as nn.Linear
saves it. Loading accepts ``weight_format`` 0, "row" or no key; anything else is a
ValueError. Missing/mismatched keys are reported by name and a failed load changes nothing.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from qkernels.int8.ops import dequant_weight, prepare_int8_linear, quantize_weight
from ._checks import input_problem, refuse
from ._layers import (LoadReport, apply_to_quantized_weight, check_bias, layer_keys, plain,
                      tensor_bytes)

__all__ = ["Int8Params", "Linear8bitLt", "MatMul8bitLt"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


class MatMul8bitLt(torch.autograd.Function):
    """LLM.int8() matmul with gradients (module docstring). x (..., in); weight: the float
    parameter (for dW) or None; CB int8 (out, in); SCB float32 (out,); bias (out,) or None;
    plan: the layer's Int8LinearPlan in eager mode, None under torch.compile (the declared
    op ``qkernels::int8_linear`` then runs the same forward)."""

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


def _rebuild_int8params(data, requires_grad, attrs):
    return Int8Params(data, requires_grad, **attrs)


class Int8Params(nn.Parameter):
    """The LLM.int8() weight: ``Int8Params(data=None, requires_grad=True,
    has_fp16_weights=False, CB=None, SCB=None, **extra)`` (bitsandbytes' constructor).

    Before quantization ``data`` is the float weight (out, in). With has_fp16_weights=False,
    ``.to(device)`` / ``.cuda()`` / ``.cpu()`` quantize it there: data becomes int8 (out, in),
    ``CB`` is that same tensor and ``SCB`` the float32 (out,) row absmax. A quantized weight
    moves with its SCB and ignores dtypes; it is frozen (``requires_grad_(True)`` raises).
    """

    def __new__(cls, data=None, requires_grad=True, has_fp16_weights=False, CB=None, SCB=None,
                **extra):
        if data is None:
            data = torch.empty(0)
        # integer payloads cannot require grad (torch refuses); a rebuild passing True is fine
        self = torch.Tensor._make_subclass(cls, data, requires_grad and data.is_floating_point())
        self.CB = CB
        self.SCB = SCB
        self.has_fp16_weights = bool(has_fp16_weights)
        for k, v in extra.items():
            setattr(self, k, v)
        return self

    @property
    def quantized(self) -> bool:
        return self.SCB is not None and self.dtype == torch.int8

    def _rewrap(self, data, **changes) -> "Int8Params":
        attrs = {**self.__dict__, **changes}
        return Int8Params(data, self.requires_grad and data.is_floating_point(), **attrs)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None:  # dtype-only conversion: no move, no quantization
            if self.quantized:
                return self
            return self._rewrap(self.data.to(dtype=dtype or self.data.dtype))
        device = torch.device(device)
        if self.quantized:
            data = self.data.to(device, non_blocking=non_blocking)
            return self._rewrap(data, CB=data, SCB=self.SCB.to(device, non_blocking=non_blocking))
        w = self.data.to(device=device, dtype=dtype if dtype in _FLOAT else None,
                         non_blocking=non_blocking)
        if self.has_fp16_weights or device.type == "meta":
            return self._rewrap(w)
        if w.dtype not in _FLOAT:
            raise TypeError(f"Int8Params: cannot quantize a {w.dtype} weight without its SCB")
        CB, SCB = quantize_weight(w)
        return self._rewrap(CB, CB=CB, SCB=SCB)

    def cuda(self, device=None, non_blocking=False):
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        return self.to(device, non_blocking=non_blocking)

    def cpu(self):
        return self.to("cpu")

    def _applied(self, fn) -> "Int8Params":
        """What ``module._apply(fn)`` makes of this weight (see torch_ops/_layers.py)."""
        out = fn(self)
        if isinstance(out, Int8Params) or out is self:
            return out
        if not self.quantized:
            return self._rewrap(out)
        return self.to(out.device)

    def synced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(CB, SCB) on the data's device (SCB moved, and kept, if left behind)."""
        if self.SCB.device != self.device:
            self.SCB = self.SCB.to(self.device)
        self.CB = plain(self)
        return self.CB, self.SCB

    def requires_grad_(self, requires_grad=True):
        if requires_grad and self.quantized:
            raise RuntimeError("Int8Params: a quantized int8 weight (has_fp16_weights=False) is "
                               "frozen and cannot require grad; use has_fp16_weights=True to "
                               "train it, or train adapters on top (torch_ops.LoRA)")
        return super().requires_grad_(requires_grad)

    def __deepcopy__(self, memo):
        new = Int8Params(self.data.clone(memory_format=torch.preserve_format), self.requires_grad)
        memo[id(self)] = new
        attrs = copy.deepcopy(self.__dict__, memo)
        if self.quantized:
            attrs["CB"] = plain(new)
        new.__dict__.update(attrs)
        return new

    def __reduce_ex__(self, protocol):
        return _rebuild_int8params, (self.data, self.requires_grad, dict(self.__dict__))


class Linear8bitLt(nn.Linear):
    """``Linear8bitLt(input_features, output_features, bias=True, has_fp16_weights=True,
    threshold=0.0, index=None, device=None)``: LLM.int8() linear layer (module docstring).

    Input (*, input_features) float16 / bfloat16 / float32 -> output (*, output_features) in
    the input's dtype; gradients reach the input (also with has_fp16_weights=False, for
    LoRA); the bias is never cast in place.
    """

    def __init__(self, input_features, output_features, bias=True, has_fp16_weights=True,
                 threshold=0.0, index=None, device=None):
        t = float(threshold)
        if not (t >= 0.0) or t == float("inf"):
            raise ValueError(f"threshold must be finite and >= 0 (0 disables outliers); got {threshold!r}")
        super().__init__(input_features, output_features, bias, device=device)
        self.threshold = t
        self.index = index
        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights,
                                 requires_grad=has_fp16_weights)
        self._plan = None  # the weight's Int8LinearPlan (forward), made on first use

    @property
    def has_fp16_weights(self) -> bool:
        return self.weight.has_fp16_weights

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "Linear8bitLt":
        """An int8 copy of ``linear`` on its device. ``options``: this class's keyword
        arguments (has_fp16_weights defaults to False here: an inference layer)."""
        options.setdefault("has_fp16_weights", False)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device="meta", **options)
        layer.weight = layer.weight._rewrap(linear.weight.data)
        if layer.has_fp16_weights:
            layer.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
        if linear.weight.device.type != "meta":
            layer.to(linear.weight.device)
        return layer

    def _apply(self, fn, recurse=True):
        self._plan = None  # a move makes new pointers
        return apply_to_quantized_weight(self, fn, recurse, super()._apply)

    def _prepare(self):
        """The Int8LinearPlan of the current int8 weight (and threshold), made again whenever
        the weight's data, its SCB, its version (has_fp16_weights) or the threshold changed."""
        w = self.weight
        if w.has_fp16_weights:
            key = (w._version, w.data_ptr(), w.device, w.dtype, self.threshold)
            plan = self._plan
            if plan is None or plan.key != key:
                with torch.no_grad():
                    CB, SCB = quantize_weight(w)
                plan = self._plan = prepare_int8_linear(CB, SCB, self.threshold, key=key)
            return plan
        CB, SCB = w.synced()
        self._plan = prepare_int8_linear(CB, SCB, self.threshold, key=(w.data_ptr(), id(w.SCB), self.threshold))
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        problem = input_problem(x, self.in_features, w, "Linear8bitLt")
        if problem is None and not w.has_fp16_weights and not w.quantized:
            problem = ("RuntimeError", "Linear8bitLt: the weight is not quantized yet; it is quantized "
                       "when the layer is moved to a device (layer.to(device), .cuda(), .cpu()) or "
                       "loaded from an int8 checkpoint")
        if problem is not None:
            return refuse(problem, x, self.out_features)
        bias = self.bias
        if torch.compiler.is_compiling():
            if w.has_fp16_weights:  # quantized in the graph (no cache to go stale)
                CB, SCB = torch.ops.qkernels.int8_quantize_weight(w.detach())
                return MatMul8bitLt.apply(x, w, CB, SCB, bias, self.threshold, None)
            return MatMul8bitLt.apply(x, None, w, w.SCB, bias, self.threshold, None)
        plan = self._plan
        if w.has_fp16_weights or plan is None or plan.key != (w.data_ptr(), id(w.SCB), self.threshold):
            plan = self._prepare()
        weight = w if w.has_fp16_weights else None
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            return MatMul8bitLt.apply(x, weight, plan.CB, plan.SCB, bias, self.threshold, plan)
        return plan(x, bias)

    # -- state_dict -------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        if not w.has_fp16_weights and w.quantized:
            CB, SCB = w.synced()
            destination[prefix + "weight"] = w if keep_vars else CB
            destination[prefix + "SCB"] = SCB
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        sd = layer_keys(state_dict, prefix)
        _check_weight_format(sd.get("weight_format"), prefix)
        report = LoadReport(prefix)
        new_weight = self._checked_weight(sd, report)
        new_bias = check_bias(report, sd, self.bias, self.out_features)
        report.unexpected += [k for k in sd if k not in ("weight", "bias", "SCB", "weight_format")]
        report.hand_over(missing_keys, unexpected_keys, error_msgs)
        if not report.ok():
            return
        with torch.no_grad():
            if isinstance(new_weight, Int8Params):
                self.weight.data = new_weight.data
                self.weight.__dict__.update(new_weight.__dict__)
            elif new_weight is not None:
                self.weight.copy_(new_weight)
            if new_bias is not None:
                self.bias.copy_(new_bias)
        self._plan = None

    def _checked_weight(self, sd: dict, report: LoadReport):
        """An Int8Params to install, a float tensor to copy into the float weight, or None
        (with the problem recorded)."""
        if "weight" not in sd:
            report.missing.append("weight")
            return None
        data = sd["weight"]
        out_in = (self.out_features, self.in_features)
        if tuple(data.shape) != out_in:
            report.error("weight", f"size mismatch: checkpoint has {tuple(data.shape)}, the layer "
                         f"expects {out_in}")
            return None
        w = self.weight
        device = w.device if w.device.type != "meta" else data.device
        if data.dtype == torch.int8:
            if "SCB" not in sd:
                report.missing.append("SCB")
                report.error("SCB", "an int8 weight needs its row scales SCB (float32 "
                             f"({self.out_features},)); none found")
                return None
            SCB = sd["SCB"]
            if tuple(SCB.shape) != (self.out_features,) or not SCB.is_floating_point():
                report.error("SCB", f"expected float32 ({self.out_features},); got "
                             f"{SCB.dtype} {tuple(SCB.shape)}")
                return None
            CB, SCB = data.detach().to(device), SCB.detach().to(device, torch.float32)
            if w.has_fp16_weights:
                return dequant_weight(CB.contiguous(), SCB).to(w.dtype)
            return w._rewrap(CB, CB=CB, SCB=SCB)
        if data.dtype not in _FLOAT:
            report.error("weight", f"must be int8 (with SCB) or float16/bfloat16/float32; got {data.dtype}")
            return None
        if "SCB" in sd:
            report.unexpected.append("SCB")
        if w.has_fp16_weights:
            return data.detach()
        fresh = w._rewrap(data.detach().to(device), CB=None, SCB=None)
        return fresh.to(device) if w.quantized else fresh

    def quantized_bytes(self) -> int:
        """Bytes held by the weight (CB + SCB, or the float weight), excluding the bias."""
        w = self.weight
        return tensor_bytes(w, w.SCB) if w.quantized else tensor_bytes(w)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", has_fp16_weights={self.weight.has_fp16_weights}, "
                f"threshold={self.threshold}")


def _check_weight_format(fmt, prefix: str) -> None:
    """bitsandbytes' weight_format: 0 / "row" / absent mean row-major; nothing else is
    supported (SPEC.md section 9)."""
    if fmt is None:
        return
    if isinstance(fmt, torch.Tensor):
        value = fmt.item() if fmt.numel() == 1 else None  # an empty or longer tensor is no format
    else:
        value = fmt
    if isinstance(value, (int, str)) and value in (0, "row"):
        return
    raise ValueError(f"{prefix}weight_format: only row-major weights are supported (0 or 'row'); "
                     f"got {fmt!r}")
