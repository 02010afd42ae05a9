"""LLM.int8() linear layer: ``Int8Params`` and ``Linear8bitLt`` (docs/FORMATS.md §5 and §9;
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

bitsandbytes' other attributes: ``layer.state`` is its MatmulLtState, read from the layer
when asked (``qkernels.int8.matmul_lt``; ``state.idx`` holds the outlier columns of the last
input where the forward saw them on the host: CPU weights; the CUDA kernels keep them on the
device), so ``bnb.matmul(x, layer.weight, state=layer.state, bias=layer.bias)`` is the
layer's forward. A plain float Parameter as the weight (a tied weight, e.g. an lm_head tied
to an embedding) is computed with like a has_fp16_weights weight and saved as nn.Linear saves
it; a checkpoint with SCB raises bitsandbytes' RuntimeError there.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from qkernels.int8.matmul_lt import MatMul8bitLt, MatmulLtState, RecordingInt8LinearPlan
from qkernels.int8.ops import dequant_weight, prepare_int8_linear, quantize_weight
from reference.int8 import check_threshold
from ._checks import input_problem, refuse
from ._layers import (LoadReport, apply_to_quantized_weight, check_bias, install_bias, install_weight,
                      layer_keys, plain, tensor_bytes)

__all__ = ["Int8Params", "Linear8bitLt", "MatMul8bitLt"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


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
            if self.device.type == "meta" and out.device.type != "meta" and not self.has_fp16_weights:
                # to_empty: an uninitialized int8 weight (CB, SCB) for a checkpoint to load into
                CB = torch.empty(self.shape, dtype=torch.int8, device=out.device)
                return self._rewrap(CB, CB=CB, SCB=torch.empty(self.shape[0], dtype=torch.float32, device=out.device))
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
        # MatmulLtState fields the layer does not derive (state.force_no_igemmlt, ...)
        self._state_extra = {"use_pool": t > 0.0 and not has_fp16_weights}

    @property
    def has_fp16_weights(self) -> bool:
        """The weight's ``has_fp16_weights``; True for a plain float Parameter (a tied weight)."""
        return getattr(self.weight, "has_fp16_weights", True)

    @property
    def state(self) -> "MatmulLtState":
        """bitsandbytes' ``Linear8bitLt.state``: a MatmulLtState that reads the layer as it is
        now (CB / SCB of the int8 weight, threshold, has_fp16_weights, is_training = the
        layer's training mode, idx = the outlier columns of the last input where the forward
        recorded them: host weights). Setting ``state.threshold`` sets the layer's threshold;
        the other fields bitsandbytes has are kept with the layer. Nothing is copied per forward."""
        return _LayerState(self)

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

    def __getstate__(self):
        """Pickle and deepcopy leave the plan out (it holds device launches; it is made again on
        the first forward) and keep the outlier columns it recorded (``state.idx``)."""
        state = dict(self.__dict__)
        cols = getattr(state.get("_plan"), "cols", None)
        if cols is not None:
            state["_state_extra"] = {**(state.get("_state_extra") or {}), "idx": cols}
        state["_plan"] = None
        return state

    def _apply(self, fn, recurse=True):
        self._plan = None  # a move makes new pointers
        return apply_to_quantized_weight(self, fn, recurse, super()._apply)

    def _prepare(self, fp16: bool):
        """The Int8LinearPlan of the current int8 weight (and threshold), made again whenever
        the weight's data, its SCB, its version (fp16: a float weight) or the threshold changed."""
        w = self.weight
        if fp16:
            key = (w._version, w.data_ptr(), w.device, w.dtype, self.threshold)
            plan = self._plan
            if plan is None or plan.key != key:
                with torch.no_grad():
                    CB, SCB = quantize_weight(w)
                plan = self._plan = _make_plan(CB, SCB, self.threshold, key)
            return plan
        CB, SCB = w.synced()
        self._plan = _make_plan(CB, SCB, self.threshold, (w.data_ptr(), id(w.SCB), self.threshold))
        return self._plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        fp16 = getattr(w, "has_fp16_weights", True)  # a plain Parameter (a tied weight) is a float weight
        problem = input_problem(x, self.in_features, w, "Linear8bitLt")
        if problem is None and not fp16 and not w.quantized:
            problem = ("RuntimeError", "Linear8bitLt: the weight is not quantized yet; it is quantized "
                       "when the layer is moved to a device (layer.to(device), .cuda(), .cpu()) or "
                       "loaded from an int8 checkpoint")
        if problem is not None:
            return refuse(problem, x, self.out_features)
        bias = self.bias
        if torch.compiler.is_compiling():
            if fp16:  # quantized in the graph (no cache to go stale)
                CB, SCB = torch.ops.qkernels.int8_quantize_weight(w.detach())
                return MatMul8bitLt.apply(x, w, CB, SCB, bias, self.threshold, None)
            return MatMul8bitLt.apply(x, None, w, w.SCB, bias, self.threshold, None)
        plan = self._plan
        if fp16 or plan is None or plan.key != (w.data_ptr(), id(w.SCB), self.threshold):
            plan = self._prepare(fp16)
        weight = w if fp16 else None
        if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)):
            return MatMul8bitLt.apply(x, weight, plan.CB, plan.SCB, bias, self.threshold, plan)
        return plan(x, bias)

    # -- state_dict -------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self.weight
        # a plain Parameter (a tied weight) saves as nn.Linear does: no SCB, no weight_format
        if not self.has_fp16_weights and w.quantized:
            CB, SCB = w.synced()
            destination[prefix + "weight"] = w if keep_vars else CB
            destination[prefix + "SCB"] = SCB
            destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        sd = layer_keys(state_dict, prefix)
        if "SCB" in sd and not isinstance(self.weight, Int8Params):
            # a tied weight is the other module's float Parameter: int8 codes cannot go there
            raise RuntimeError(f"{prefix}SCB: Loading a quantized checkpoint into non-quantized Linear8bitLt "
                               "is not supported: this layer's weight is a plain float Parameter (a tied "
                               "weight), not an Int8Params")
        _check_weight_format(sd.get("weight_format"), prefix)
        report = LoadReport(prefix)
        new_weight = self._checked_weight(sd, report)
        new_bias = check_bias(report, sd, self.bias, self.out_features)
        report.unexpected += [k for k in sd if k not in ("weight", "bias", "SCB", "weight_format")]
        report.hand_over(missing_keys, unexpected_keys, error_msgs)
        if not report.ok():
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            if isinstance(new_weight, Int8Params):
                install_weight(self, new_weight, assign)
            elif new_weight is not None:   # a float weight (has_fp16_weights)
                if assign or self.weight.device.type == "meta":
                    install_weight(self, self.weight._rewrap(new_weight.detach()), assign=True)
                else:
                    self.weight.copy_(new_weight)
            if new_bias is not None:
                install_bias(self, new_bias, assign)
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
            if self.has_fp16_weights:
                return dequant_weight(CB.contiguous(), SCB).to(w.dtype)
            return w._rewrap(CB, CB=CB, SCB=SCB)
        if data.dtype not in _FLOAT:
            report.error("weight", f"must be int8 (with SCB) or float16/bfloat16/float32; got {data.dtype}")
            return None
        if "SCB" in sd:
            report.unexpected.append("SCB")
        if self.has_fp16_weights:
            return data.detach()
        fresh = w._rewrap(data.detach().to(device), CB=None, SCB=None)
        # quantized on load into a quantized layer, or one built on meta (its weight exists now)
        return fresh.to(device) if w.quantized or w.device.type == "meta" else fresh

    def quantized_bytes(self) -> int:
        """Bytes held by the weight (CB + SCB, or the float weight), excluding the bias."""
        w = self.weight
        return tensor_bytes(w, w.SCB) if getattr(w, "quantized", False) else tensor_bytes(w)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", has_fp16_weights={self.has_fp16_weights}, "
                f"threshold={self.threshold}")


def _check_weight_format(fmt, prefix: str) -> None:
    """bitsandbytes' weight_format: 0 / "row" / absent mean row-major; nothing else is
    supported (docs/FORMATS.md §9)."""
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


def _make_plan(CB: torch.Tensor, SCB: torch.Tensor, threshold: float, key):
    """The layer's plan: an Int8LinearPlan, or for a host weight with threshold > 0 the kind
    that keeps the outlier columns of its last input (``state.idx``; free on the CPU route)."""
    if threshold > 0.0 and CB.device.type == "cpu":
        return RecordingInt8LinearPlan(CB, SCB, threshold, key=key)
    return prepare_int8_linear(CB, SCB, threshold, key=key)


_STATE_SETTINGS = ("threshold", "has_fp16_weights", "is_training", "use_pool", "has_accumulated_gradients")


def _state_from_values(values: dict) -> MatmulLtState:
    """A plain MatmulLtState with these field and setting values (a layer state's snapshot)."""
    fields = {f.name for f in dataclasses.fields(MatmulLtState)}
    state = MatmulLtState(**{k: v for k, v in values.items() if k in fields})
    for name in _STATE_SETTINGS:
        setattr(state, name, values[name])
    return state


def _extra_field(name: str, default=None):
    """A MatmulLtState field that Linear8bitLt.state keeps in the layer's ``_state_extra``."""
    def get(self):
        extra = self._layer.__dict__.get("_state_extra") or {}
        return extra.get(name, default(self._layer) if callable(default) else default)

    def set(self, value):
        self._layer.__dict__.setdefault("_state_extra", {})[name] = value

    return property(get, set, doc=f"MatmulLtState.{name}, kept with the layer")


class _LayerState(MatmulLtState):
    """``Linear8bitLt.state``: the layer's MatmulLtState, read from the layer when asked (no
    copy per forward). A MatmulLtState (isinstance, fields, equality, ``matmul``'s
    ``state=``); copying or pickling it gives a plain MatmulLtState snapshot."""

    def __init__(self, layer: "Linear8bitLt"):
        object.__setattr__(self, "_layer", layer)

    def _int8(self, i: int):
        layer = self._layer
        w = layer.weight
        if getattr(w, "quantized", False) and not layer.has_fp16_weights:
            return w.synced()[i]
        set_here = (layer.__dict__.get("_state_extra") or {}).get("SCB" if i else "CB")
        if set_here is not None:
            return set_here
        plan = layer.__dict__.get("_plan")  # has_fp16_weights: the int8 copy of the last forward
        return None if plan is None else (plan.SCB if i else plan.CB)

    CB = property(lambda self: self._int8(0), _extra_field("CB").fset,
                  doc="int8 (out, in) codes of the weight (bitsandbytes' state.CB)")
    SCB = property(lambda self: self._int8(1), _extra_field("SCB").fset,
                   doc="float32 (out,) row absmax of the weight (bitsandbytes' state.SCB)")

    @property
    def idx(self):
        """int64 outlier columns of the last input, where the layer's forward recorded them."""
        cols = getattr(self._layer.__dict__.get("_plan"), "cols", None)
        return cols if cols is not None else (self._layer.__dict__.get("_state_extra") or {}).get("idx")

    @idx.setter
    def idx(self, value):
        self._layer.__dict__.setdefault("_state_extra", {})["idx"] = value

    @property
    def threshold(self) -> float:
        return self._layer.threshold

    @threshold.setter
    def threshold(self, value):
        self._layer.threshold = check_threshold(value)

    has_fp16_weights = property(lambda self: self._layer.has_fp16_weights,
                                doc="the weight's has_fp16_weights (set it on the weight)")
    is_training = property(lambda self: self._layer.training, doc="the layer's training mode")

    force_no_igemmlt = _extra_field("force_no_igemmlt", False)
    SB = _extra_field("SB")
    SBt = _extra_field("SBt")
    CBt = _extra_field("CBt")
    subB = _extra_field("subB")
    outlier_pool = _extra_field("outlier_pool")
    has_accumulated_gradients = _extra_field("has_accumulated_gradients", False)
    use_pool = _extra_field("use_pool", lambda layer: layer.threshold > 0.0 and not layer.has_fp16_weights)

    def _values(self) -> dict:
        names = [f.name for f in dataclasses.fields(MatmulLtState)] + list(_STATE_SETTINGS)
        return {name: getattr(self, name) for name in names}

    def snapshot(self) -> MatmulLtState:
        """A plain MatmulLtState with this one's values now."""
        return _state_from_values(self._values())

    def __reduce_ex__(self, protocol):
        return _state_from_values, (self._values(),)

    def __repr__(self) -> str:
        return repr(self.snapshot())
