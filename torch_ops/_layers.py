"""Helpers shared by the quantized layers (linear4bit.py, linear8bit.py, switchback.py).

- ``move_state``: a QuantState with every tensor moved to a device (never re-quantized).
- ``apply_to_quantized_weight``: the body of ``Module._apply`` for a layer whose ``weight``
  is a quantized parameter class (Params4bit, Int8Params). torch's generic ``_apply`` would
  run ``fn`` on the packed bytes (``module.half()`` casts a bfloat16-stored 4-bit payload,
  i.e. corrupts it) and would keep the old quantization state beside the new data; here the
  parameter's own ``_applied(fn)`` decides, and the existing parameter object is updated in
  place (its identity, which optimizers and peft hold on to, is kept).
- ``LoadReport``: collects a layer's state_dict load problems so that nothing is changed
  unless the whole load is valid.
"""
from __future__ import annotations

import dataclasses

import torch

from reference.state import QuantState

__all__ = ["move_state", "apply_to_quantized_weight", "install_weight", "install_bias", "LoadReport", "plain",
           "tensor_bytes"]


def plain(t: torch.Tensor) -> torch.Tensor:
    """The same storage as a plain torch.Tensor (no parameter subclass, no autograd)."""
    return t.detach().as_subclass(torch.Tensor)


def move_state(state: QuantState | None, device, non_blocking: bool = False) -> QuantState | None:
    """A copy of ``state`` whose tensors (absmax, code, offset, the nested state's) live on
    ``device``; tensors already there are shared, not copied."""
    if state is None:
        return None

    def mv(a):
        return a.to(device, non_blocking=non_blocking) if isinstance(a, torch.Tensor) else a

    s2 = state.state2
    nested = None if s2 is None else dataclasses.replace(s2, absmax=mv(s2.absmax), code=mv(s2.code),
                                                          offset=mv(s2.offset))
    return dataclasses.replace(state, absmax=mv(state.absmax), code=mv(state.code),
                               offset=mv(state.offset), state2=nested)


def state_device(state: QuantState | None):
    return None if state is None or not isinstance(state.absmax, torch.Tensor) else state.absmax.device


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def apply_to_quantized_weight(module: torch.nn.Module, fn, recurse: bool, super_apply):
    """``Module._apply`` for a layer with a quantized ``weight`` parameter (see module doc)."""
    weight = module._parameters.get("weight")
    if weight is None or not hasattr(weight, "_applied"):
        return super_apply(fn, recurse)
    module._parameters["weight"] = None  # keeps the key's position; _apply skips None
    try:
        super_apply(fn, recurse)
    finally:
        module._parameters["weight"] = weight
    with torch.no_grad():
        new = weight._applied(fn)
    if new is not weight:
        install_weight(module, new)
    return module


def install_weight(module: torch.nn.Module, new: torch.nn.Parameter, assign: bool = False) -> None:
    """Make the quantized Parameter ``new`` the module's weight. In place (the Parameter
    object, which optimizers and peft hold, is kept) unless ``assign`` (load_state_dict's
    assign=True) or either is on the meta device (to_empty, loading into a model built on
    meta: torch cannot swap a meta tensor's data for a real one, and nothing can hold a meta
    weight usefully); then ``new`` itself is installed."""
    old = module._parameters.get("weight")
    if old is None or assign or old.device.type == "meta" or new.device.type == "meta":
        module._parameters["weight"] = new
        return
    old.data = new.data
    old.__dict__.update(new.__dict__)


def install_bias(module: torch.nn.Module, value: torch.Tensor, assign: bool = False) -> None:
    """Load a checked bias (out,): copied into the existing Parameter, or, for assign=True or
    a meta-device bias, installed as a new Parameter (requires_grad kept)."""
    old = module.bias
    if assign or old.device.type == "meta":
        module.bias = torch.nn.Parameter(value.detach(), requires_grad=old.requires_grad)
    else:
        old.copy_(value)


@dataclasses.dataclass
class LoadReport:
    """Problems found while validating one layer's slice of a state_dict.

    An error (a shape, dtype or format that cannot load) changes nothing in the layer. Missing
    and unexpected keys do not stop the keys that are present from loading, as in nn.Linear:
    torch calls ``_load_from_state_dict`` with strict=True whatever the user asked and applies
    the user's ``strict`` to the reported keys afterwards (raising for strict=True)."""
    prefix: str
    missing: list = dataclasses.field(default_factory=list)
    unexpected: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)

    def error(self, key: str, message: str) -> None:
        self.errors.append(f"{self.prefix}{key}: {message}")

    def ok(self) -> bool:
        """Whether the present keys may be loaded (no errors)."""
        return not self.errors

    def hand_over(self, missing_keys, unexpected_keys, error_msgs) -> None:
        missing_keys.extend(self.prefix + k for k in self.missing)
        unexpected_keys.extend(self.prefix + k for k in self.unexpected)
        error_msgs.extend(self.errors)


def check_bias(report: LoadReport, sd: dict, bias, out_features: int):
    """The checkpoint's bias (validated) or None; records missing/unexpected/mismatch."""
    if bias is None:
        if "bias" in sd:
            report.unexpected.append("bias")
        return None
    if "bias" not in sd:
        report.missing.append("bias")
        return None
    b = sd["bias"]
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != (out_features,):
        shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        report.error("bias", f"size mismatch: checkpoint has {shape}, the layer expects ({out_features},)")
        return None
    if not b.is_floating_point():
        report.error("bias", f"must be a floating-point tensor; got {b.dtype}")
        return None
    return b


def layer_keys(state_dict: dict, prefix: str) -> dict:
    """The items of state_dict under ``prefix``, keyed without it."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
