"""4-bit linear layers: ``Params4bit``, ``Linear4bit``, ``LinearNF4``, ``LinearFP4``
(docs/FORMATS.md §3, §4 and §10; bitsandbytes' names, arguments and state_dict keys).

When quantization happens: **when the weight is moved to a device** (``layer.to(device)``,
``.cuda()``, ``.cpu()``, ``model.to(...)``), as in bitsandbytes, or when a float
checkpoint is loaded into an already-quantized layer. A freshly constructed layer holds a
float weight; its forward raises until it has been moved (or a quantized checkpoint
loaded). Moving a quantized layer moves the packed bytes and the QuantState together and
never re-quantizes.

Formats: the weight (out, in) is stored as ``quantize_4bit(W, blocksize=64, quant_type,
compress_statistics, quant_storage)``: packed uint8 ``(ceil(out*in/2), 1)`` (or the same
bytes viewed as quant_storage) plus a QuantState (absmax float32 (nblocks,), or uint8 codes
with a nested state when compress_statistics). ``state_dict()`` holds ``weight`` (packed),
``bias`` and ``weight.`` + every key of ``quant_state.as_dict(packed=True)``: exactly the
keys bitsandbytes writes, so checkpoints (torch.save or safetensors) go both ways.
``load_state_dict(strict=True)`` works on a freshly constructed layer (bitsandbytes #1946).
"""
from __future__ import annotations

import copy
import re
import warnings

import torch
from torch import nn

from qkernels.fourbit import matmul_4bit  # bitsandbytes' bnb.matmul_4bit; differentiable for torch
from qkernels.fourbit.ops import matmul_4bit_op, prepare_matmul_4bit
from qkernels._backend import native_bf16_cpu
from reference import fourbit as ref4
from reference.state import QuantState
from ._checks import check_linear_input, input_problem, refuse
from ._layers import (LoadReport, apply_to_quantized_weight, check_bias, install_bias, install_weight,
                      layer_keys, move_state, plain, state_device, tensor_bytes)

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4", "matmul_4bit"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
# probed once here: torch.compile then reads a constant (Linear4bit._compute_dtype)
_CPU_BF16 = native_bf16_cpu()


def _fourbit():
    from qkernels import fourbit
    return fourbit


def _rebuild_params4bit(data, requires_grad, attrs):
    return Params4bit(data, requires_grad, **attrs)


_PIECEWISE = {torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split}
_PLAIN_VIEWS = torch._C.DisableTorchFunctionSubclass  # a Params4bit read as a plain tensor


class Params4bit(nn.Parameter):
    """A 4-bit weight: a torch.nn.Parameter over the packed payload carrying its QuantState.

    ``Params4bit(data=None, requires_grad=False, quant_state=None, blocksize=64,
    compress_statistics=True, quant_type="fp4", quant_storage=torch.uint8, module=None,
    bnb_quantized=False, **extra)``: bitsandbytes' constructor and attribute names (all in
    ``__dict__``), so ``Params4bit(data, **old.__dict__)`` (accelerate, peft) rebuilds it;
    extra keyword attributes (e.g. ``_is_hf_initialized``) are kept.

    Before quantization ``data`` is the float weight (out, in). ``.to(device)`` / ``.cuda()``
    / ``.cpu()`` quantize it there (bnb_quantized becomes True, data becomes packed uint8
    ``(ceil(n/2), 1)`` or quant_storage). On a quantized weight they move the bytes and
    the state and ignore any dtype (the payload is codes, not numbers). A quantized weight
    is frozen: ``requires_grad_(True)`` raises. bitsandbytes' readers of the state (``absmax``,
    ``code``, ``quant_map``, ``nested_*``, ...) are properties; ``torch.chunk`` / ``torch.split``
    give Params4bit pieces with the same attributes (other ops give plain tensors).
    """

    def __new__(cls, data=None, requires_grad=False, quant_state=None, blocksize=None,
                compress_statistics=True, quant_type="fp4", quant_storage=torch.uint8,
                module=None, bnb_quantized=False, **extra):
        if data is None:
            data = torch.empty(0)
        # integer payloads cannot require grad (torch refuses); a rebuild passing True is fine
        self = torch.Tensor._make_subclass(cls, data, requires_grad and data.is_floating_point())
        self.blocksize = 64 if blocksize is None else int(blocksize)
        self.compress_statistics = bool(compress_statistics)
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bool(bnb_quantized)
        self.module = module
        for k, v in extra.items():
            setattr(self, k, v)
        return self

    # -- bitsandbytes' accessors ----------------------------------------------------------
    # The QuantState's fields under their state_dict key names ("weight.absmax", ...):
    # FSDP's state_dict code resolves a key by getattr along its dotted path. Properties, not
    # __getattr__, so that torch.compile traces them. AttributeError while not quantized.
    def _state_field(self, name: str, nested: bool = False):
        state = self.__dict__.get("quant_state")
        if state is None or (nested and state.state2 is None):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}' "
                                 f"({'not quantized yet' if state is None else 'no nested state'})")
        return state.state2 if nested else state

    absmax = property(lambda self: self._state_field("absmax").absmax)
    code = property(lambda self: self._state_field("code").code)
    quant_map = property(lambda self: self._state_field("quant_map").code)
    offset = property(lambda self: self._state_field("offset").offset)
    state2 = property(lambda self: self._state_field("state2").state2)
    nested_absmax = property(lambda self: self._state_field("nested_absmax", True).absmax)
    nested_quant_map = property(lambda self: self._state_field("nested_quant_map", True).code)
    nested_blocksize = property(lambda self: self._state_field("nested_blocksize", True).blocksize)
    nested_dtype = property(lambda self: self._state_field("nested_dtype", True).dtype)
    nested_offset = property(lambda self: self._state_field("nested_offset").offset)

    # -- views that stay 4-bit weights -----------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch.chunk / torch.split (and their Tensor methods) return Params4bit pieces that
        carry this weight's attributes, quant_state included (FSDP2 shards a parameter with
        them, as bitsandbytes); every other op gives plain tensors, as for nn.Parameter."""
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func in _PIECEWISE and isinstance(args[0], Params4bit):
            attrs = args[0].__dict__
            return tuple(Params4bit(piece, piece.requires_grad, **attrs) for piece in result)
        return result

    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict, requires_grad=False,
                          device="cuda", module=None, **kwargs) -> "Params4bit":
        """bitsandbytes' constructor from a checkpoint: packed ``data`` and the
        ``weight.``-stripped (or prefixed) QuantState items (``QuantState.from_dict``)."""
        state = QuantState.from_dict(quantized_stats)
        self = cls(data.to(device), requires_grad, quant_state=move_state(state, device),
                   blocksize=state.blocksize, compress_statistics=state.nested,
                   quant_type=state.quant_type, quant_storage=data.dtype, module=module,
                   bnb_quantized=True, **kwargs)
        if isinstance(module, Linear4bit):
            module.quant_state = self.quant_state  # the layer's record (Linear4bit._forward_other)
        return self

    # -- moving and quantizing ------------------------------------------------------------
    def _rewrap(self, data, **changes) -> "Params4bit":
        attrs = {**self.__dict__, **changes}
        return Params4bit(data, self.requires_grad and data.is_floating_point(), **attrs)

    def _quantize(self, device, dtype=None) -> "Params4bit":
        w = self.data.to(device=device, dtype=dtype or self.data.dtype).contiguous()
        if w.dtype not in _FLOAT:
            raise TypeError(f"Params4bit: cannot quantize a {w.dtype} weight; it must be "
                            "float16, bfloat16 or float32 (a packed weight needs its quant_state)")
        ref4.check_quant_type(self.quant_type)
        packed, state = _fourbit().quantize_4bit(
            w, blocksize=self.blocksize, quant_type=self.quant_type,
            compress_statistics=self.compress_statistics, quant_storage=self.quant_storage)
        return self._rewrap(packed, quant_state=state, bnb_quantized=True)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None:  # a dtype-only conversion: no move, so no quantization
            if self.bnb_quantized:
                return self
            return self._rewrap(self.data.to(dtype=dtype or self.data.dtype))
        device = torch.device(device)
        if not self.bnb_quantized:
            if device.type == "meta":
                return self._rewrap(self.data.to(device=device, dtype=dtype or self.data.dtype))
            return self._quantize(device, dtype if dtype in _FLOAT else None)
        data = self.data.to(device, non_blocking=non_blocking)
        return self._rewrap(data, quant_state=move_state(self.quant_state, device, non_blocking))

    def cuda(self, device=None, non_blocking=False):
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        return self.to(device, non_blocking=non_blocking)

    def cpu(self):
        return self.to("cpu")

    def _applied(self, fn) -> "Params4bit":
        """What ``module._apply(fn)`` makes of this weight: our ``.to``/``.cuda``/``.cpu``
        give a Params4bit; any other result (``.half()`` on bfloat16-stored bytes, a copy)
        only contributes its device, never its dtype, once quantized."""
        out = fn(self)
        if isinstance(out, Params4bit) or out is self:
            return out
        if not self.bnb_quantized:
            if self.device.type == "meta" and out.device.type != "meta":   # to_empty
                return self._empty_quantized(out.device)
            return self._rewrap(out)
        return self.to(out.device)

    def _empty_quantized(self, device) -> "Params4bit":
        """What ``to_empty(device)`` makes of a meta-device weight: a quantized weight on
        ``device`` with the layout quantization would give (packed bytes, absmax, nested
        state; the codebooks filled in) and undefined payload and scales, ready for a
        checkpoint to be loaded into it. Nothing is quantized: O(1) work, not O(n)."""
        import dataclasses
        out_f, in_f = self.shape
        n = out_f * in_f
        probe = self._rewrap(torch.zeros(1, self.blocksize, dtype=self.dtype, device=device))._quantize(device)
        s = probe.quant_state
        nblocks = -(-n // self.blocksize)
        state2 = None
        if s.state2 is not None:
            s2 = s.state2
            state2 = dataclasses.replace(s2, absmax=torch.empty(-(-nblocks // s2.blocksize), dtype=s2.absmax.dtype,
                                                                device=device))
        state = dataclasses.replace(s, absmax=torch.empty(nblocks, dtype=s.absmax.dtype, device=device),
                                    shape=(out_f, in_f), state2=state2)
        nbytes = (n + 1) // 2   # two codes a byte, padded to whole quant_storage elements
        packed = torch.empty(-(-nbytes // probe.element_size()), 1, dtype=probe.dtype, device=device)
        return self._rewrap(packed, quant_state=state, bnb_quantized=True)

    def synced_state(self) -> QuantState:
        """The QuantState on the payload's device (moved, and kept, if a bare ``.data``
        assignment left it behind)."""
        state = self.quant_state
        if state is not None and state_device(state) != self.device:
            state = self.quant_state = move_state(state, self.device)
        return state

    def requires_grad_(self, requires_grad=True):
        if requires_grad and self.bnb_quantized:
            raise RuntimeError("Params4bit: a quantized 4-bit weight is frozen and cannot require "
                               "grad; train an adapter on top (torch_ops.LoRA) instead")
        return super().requires_grad_(requires_grad)

    # -- copies ----------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        new = Params4bit(self.data.clone(memory_format=torch.preserve_format), self.requires_grad)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce_ex__(self, protocol):
        return _rebuild_params4bit, (self.data, self.requires_grad, dict(self.__dict__))

    def __repr__(self):
        if not self.bnb_quantized:
            return f"Params4bit(not quantized yet, {self.quant_type}):\n{super().__repr__()}"
        s = self.quant_state
        return (f"Params4bit({s.quant_type}, shape={tuple(s.shape)}, blocksize={s.blocksize}, "
                f"nested={s.nested}, storage={self.dtype}, device={self.device})")


_FROZEN = ("backward into a frozen quantized weight: Linear4bit.weight holds packed 4-bit codes and "
           "has no gradient; keep weight.requires_grad=False and train adapters (torch_ops.LoRA)")


class _PlannedMatmul4bit(torch.autograd.Function):
    """The eager forward with gradients (QLoRA): ``plan(x, bias)``; backward ``dx = grad @ W``
    (W dequantized in grad's dtype), ``dbias = sum(grad)``; the frozen weight gets none."""

    @staticmethod
    def forward(ctx, x, bias, plan):
        ctx.plan = plan
        return plan(x, bias)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        dx = grad @ plan.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        dbias = grad.reshape(-1, plan.N).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dbias, None


class Linear4bit(nn.Linear):
    """``Linear4bit(input_features, output_features, bias=True, compute_dtype=None,
    compress_statistics=True, quant_type="fp4", quant_storage=torch.uint8, device=None,
    *, blocksize=64)``: an nn.Linear whose weight is a frozen 4-bit ``Params4bit``.

    Input (*, input_features) float16 / bfloat16 / float32 -> output (*, output_features) in
    the input's dtype. The matmul runs in ``compute_dtype``, or in the input's dtype when it
    is None (following each input; bitsandbytes fixes it from the first), except for
    inference in float32 on a CPU with native bfloat16, which runs in bfloat16 as in
    bitsandbytes (``_compute_dtype``); the fused small-batch kernels accumulate in float32.
    Gradients reach the input (QLoRA); the bias is trainable and never cast in place.
    Quantization happens on move to a device (module docstring). ``quant_state``: the
    weight's QuantState as this layer last saw it (bitsandbytes' attribute); a weight that
    lost its state (FSDP) is used with it.
    """

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                 compress_statistics=True, quant_type="fp4", quant_storage=torch.uint8,
                 device=None, *, blocksize=64):
        ref4.check_quant_type(quant_type)
        ref4.check_blocksize(blocksize)
        ref4.check_storage(quant_storage)
        if compute_dtype is not None and compute_dtype not in _FLOAT:
            raise ValueError(f"compute_dtype must be None, torch.float16, torch.bfloat16 or "
                             f"torch.float32; got {compute_dtype!r}")
        super().__init__(input_features, output_features, bias, device=device)
        self.weight = Params4bit(self.weight.data, requires_grad=False, blocksize=blocksize,
                                 compress_statistics=compress_statistics, quant_type=quant_type,
                                 quant_storage=quant_storage)
        self.compute_dtype = compute_dtype
        self.quant_storage = quant_storage
        self.quant_state = None  # the weight's QuantState, recorded when quantized (_forward_other)
        self._warned_f32 = False
        self._plan = None  # the weight's Matmul4bitPlan (forward), made on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "Linear4bit":
        """A quantized copy of ``linear`` on its device (its float weight is not copied
        first; the quantized bytes are new). ``options``: this class's keyword arguments."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device="meta", **options)
        layer.weight = layer.weight._rewrap(linear.weight.data)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
        if linear.weight.device.type != "meta":
            layer.to(linear.weight.device)
        return layer

    def _apply(self, fn, recurse=True):
        self._plan = None  # a move makes new pointers
        out = apply_to_quantized_weight(self, fn, recurse, super()._apply)
        self._record_state()
        return out

    def _record_state(self) -> None:
        state = getattr(self.weight, "__dict__", {}).get("quant_state")
        if state is not None:
            self.quant_state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if not isinstance(w, Params4bit):  # FSDP: see _forward_other
            return self._forward_other(x, w)
        compiling = torch.compiler.is_compiling()
        with _PLAIN_VIEWS():  # w read as a plain tensor: Params4bit.__torch_function__ costs ~1 us a read
            problem = input_problem(x, self.in_features, w, type(self).__name__)
            key = None if compiling else (w.data_ptr(), id(w.quant_state))
            frozen_grad = w.requires_grad
        if problem is None and not w.bnb_quantized:
            problem = ("RuntimeError", f"{type(self).__name__}: the weight is not quantized yet; it "
                       "is quantized when the layer is moved to a device (layer.to(device), .cuda(), "
                       ".cpu()) or loaded from a quantized checkpoint")
        if problem is not None:
            return refuse(problem, x, self.out_features)
        cd = self._compute_dtype(x)
        if cd == torch.float32 and x.dtype != torch.float32 and not self._warned_f32:
            self._warn_f32(x)
        bias = self.bias
        if bias is not None and bias.dtype != cd:
            bias = bias.to(cd)
        xc = x if x.dtype == cd else x.to(cd)
        if compiling:
            out = matmul_4bit_op(xc, w, w.quant_state, bias)
        else:
            plan = self._plan
            if plan is None or plan.key != key:
                plan = self._prepare()
            if torch.is_grad_enabled() and (xc.requires_grad or (bias is not None and bias.requires_grad)
                                            or frozen_grad):
                if frozen_grad:
                    raise RuntimeError(_FROZEN)
                out = _PlannedMatmul4bit.apply(xc, bias, plan)
            else:
                out = plan(xc, bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _prepare(self):
        """The weight's Matmul4bitPlan (launch arguments for its current device and bytes),
        made once and again whenever the weight's data or state object changed."""
        w = self.weight
        if w.quant_state is None and self.quant_state is not None:
            # the parameter lost its state (FSDP's parameter handling; bitsandbytes restores
            # it from the layer the same way): the bytes are the ones quantized with it
            w.quant_state = self.quant_state
        state = w.synced_state()
        if state is None:
            raise RuntimeError(f"{type(self).__name__}: the weight is marked quantized but has no "
                               "quant_state; load a quantized checkpoint or quantize it again")
        self._plan = prepare_matmul_4bit(plain(w), state, key=(w.data_ptr(), id(w.quant_state)))
        self.quant_state = state
        return self._plan

    def _forward_other(self, x: torch.Tensor, w) -> torch.Tensor:
        """The forward when ``weight`` is not a Params4bit: a Shardable4bitWeight from
        torch_ops.fsdp4bit.prepare_for_fsdp (FSDP2), or the packed bytes as a plain tensor or
        parameter, as FSDP1 hands them to the layer after flattening them (quant_storage
        float16 / bfloat16 / float32 lets it shard them): those are used with the state this
        layer recorded when it was quantized (bitsandbytes rewraps them the same way; here
        the module's parameter is left as FSDP set it). Through the declared op. A weight
        type that brings its own forward (``layer_forward(layer, x)``, as the FSDP2 weight
        does) runs it: this module need not know that type."""
        own = getattr(type(w), "layer_forward", None)
        if own is not None:
            return own(w, self, x)
        state, name = self.quant_state, type(self).__name__
        if not isinstance(w, torch.Tensor) or state is None or tuple(w.shape[1:]) != (1,):
            raise TypeError(f"{name}.weight is a {type(w).__name__}; expected a Params4bit (or "
                            "the packed bytes of the layer's quantized weight)")
        check_linear_input(x, self.in_features, w, name)
        cd = self._compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(cd)
        return matmul_4bit_op(x.to(cd), w.detach(), state, bias).to(x.dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """``compute_dtype``, or where it is None x's dtype; except float32 x that needs no
        gradient, in an eval-mode layer on a CPU with native bfloat16 arithmetic: bfloat16
        there, the rule and the speed of bitsandbytes' CPU inference (docs/FORMATS.md §13.16).
        ``compute_dtype=torch.float32`` keeps such a layer in float32."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        if (x.dtype == torch.float32 and _CPU_BF16 and not self.training and not x.requires_grad
                and x.device.type == "cpu"):
            return torch.bfloat16
        return x.dtype

    @torch.compiler.disable
    def _warn_f32(self, x: torch.Tensor):
        """bitsandbytes' warning for float32 compute on 16-bit input, once per process for each
        message (as bitsandbytes: a warnings filter ignores repeats of that message)."""
        use = "inference." if x.numel() == x.shape[-1] else "inference or training speed."
        message = (f"Input type into {type(self).__name__} is {x.dtype}, but compute_dtype="
                   f"torch.float32: the 4-bit matmul runs in float32. This will lead to slow {use} "
                   "Leave compute_dtype=None to follow the input's dtype.")
        warnings.warn(message, UserWarning, stacklevel=3)
        warnings.filterwarnings("ignore", message=re.escape(message))
        self._warned_f32 = True

    # -- state_dict -------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        w = self.weight
        if not isinstance(w, Params4bit):  # converted by torch_ops.fsdp4bit.prepare_for_fsdp
            raise NotImplementedError(
                f"{type(self).__name__}.state_dict() after torch_ops.fsdp4bit.prepare_for_fsdp: "
                "the base 4-bit weights are frozen, so save them before conversion and save "
                "the trained adapters (LoRA lora_A / lora_B) with "
                "torch.distributed.checkpoint.state_dict.get_model_state_dict on their modules")
        if not w.bnb_quantized:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = w if keep_vars else plain(w)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for k, v in w.synced_state().as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v.detach() if isinstance(v, torch.Tensor) else v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        sd = layer_keys(state_dict, prefix)
        report = LoadReport(prefix)
        new_weight = self._checked_weight(sd, report)
        new_bias = check_bias(report, sd, self.bias, self.out_features)
        known = {"weight", "bias"}
        report.unexpected += [k for k in sd if k not in known and not k.startswith("weight.")]
        report.hand_over(missing_keys, unexpected_keys, error_msgs)
        if not report.ok():
            return
        assign = local_metadata.get("assign_to_params_buffers", False)
        with torch.no_grad():
            if new_weight is not None:
                install_weight(self, new_weight, assign)
                self._plan = None
                self._record_state()
            if new_bias is not None:
                install_bias(self, new_bias, assign)

    def _checked_weight(self, sd: dict, report: LoadReport):
        """The Params4bit the checkpoint describes, on this layer's device, or None (with
        the problem recorded)."""
        if "weight" not in sd:
            report.missing.append("weight")
            return None
        data = sd["weight"]
        out_in = (self.out_features, self.in_features)
        qitems = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
        device = self.weight.device
        if not qitems:
            if not data.is_floating_point():
                report.error("weight", f"a packed {data.dtype} weight needs its quantization keys "
                             "(weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__"
                             f"{self.weight.quant_type}); none found")
                report.missing += ["weight.absmax", "weight.quant_map",
                                   f"weight.quant_state.bitsandbytes__{self.weight.quant_type}"]
                return None
            if tuple(data.shape) != out_in:
                report.error("weight", f"size mismatch: checkpoint has {tuple(data.shape)}, the "
                             f"layer expects {out_in}")
                return None
            if data.dtype not in _FLOAT:
                report.error("weight", f"must be float16, bfloat16 or float32; got {data.dtype}")
                return None
            materialize = device.type == "meta"   # built on meta: quantized where the data is
            if materialize:
                device = data.device
            fresh = self.weight._rewrap(data.detach().to(device), quant_state=None, bnb_quantized=False)
            return fresh.to(device) if self.weight.bnb_quantized or materialize else fresh
        try:
            state = QuantState.from_dict(qitems)
            ref4.check_4bit_state(state, tuple(data.shape), str(data.dtype).replace("torch.", ""))
        except (ValueError, TypeError, KeyError) as e:
            report.error("weight", f"invalid quantization keys: {e}")
            return None
        if tuple(state.shape) != out_in:
            report.error("weight", f"size mismatch: the checkpoint's quantized weight has shape "
                         f"{tuple(state.shape)}, the layer expects {out_in}")
            return None
        if state.quant_type != self.weight.quant_type:
            report.error(f"weight.quant_state.bitsandbytes__{state.quant_type}",
                         f"the checkpoint is {state.quant_type} but this {type(self).__name__} is "
                         f"{self.weight.quant_type}; construct it with quant_type="
                         f"{state.quant_type!r}")
            return None
        want_absmax = torch.uint8 if state.nested else torch.float32
        if state.absmax.dtype != want_absmax or state.code.dtype != torch.float32:
            report.error("weight.absmax", f"expected {want_absmax} absmax and a float32 quant_map; "
                         f"got {state.absmax.dtype} and {state.code.dtype}")
            return None
        if device.type == "meta":
            device = data.device
        return self.weight._rewrap(data.detach().to(device), quant_state=move_state(state, device),
                                   blocksize=state.blocksize, compress_statistics=state.nested,
                                   quant_storage=data.dtype, bnb_quantized=True)

    def quantized_bytes(self) -> int:
        """Bytes held by the weight (payload + QuantState tensors), excluding the bias."""
        w = self.weight
        if not w.bnb_quantized:
            return tensor_bytes(w)
        s = w.quant_state
        extra = () if s.state2 is None else (s.state2.absmax, s.state2.code, s.offset)
        return tensor_bytes(w, s.absmax, s.code, *extra)

    def extra_repr(self) -> str:
        w = getattr(self.weight, "_local_tensor", self.weight)  # FSDP2: the DTensor's shard
        quantized = getattr(w, "bnb_quantized", True)  # a prepare_for_fsdp weight is quantized
        return (super().extra_repr() + f", quant_type={getattr(w, 'quant_type', '?')}, "
                f"compute_dtype={self.compute_dtype}, quantized={quantized}")


class LinearNF4(Linear4bit):
    """Linear4bit with quant_type="nf4" (the QLoRA format)."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                 compress_statistics=True, quant_storage=torch.uint8, device=None, *, blocksize=64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics,
                         "nf4", quant_storage, device, blocksize=blocksize)


class LinearFP4(Linear4bit):
    """Linear4bit with quant_type="fp4"."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None,
                 compress_statistics=True, quant_storage=torch.uint8, device=None, *, blocksize=64):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics,
                         "fp4", quant_storage, device, blocksize=blocksize)
