"""PEFT integration: LoRA layers for this library's Linear4bit and Linear8bitLt.

    import torch_ops.peft_lora                      # once; registers the layers (below)
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    ... train ...
    model.save_pretrained("adapter")           # the adapters only (PEFT's format)
    merged = model.merge_and_unload()          # dequantize, add B @ A * scaling, re-quantize

``LoraLinear4bit`` and ``LoraLinear8bitLt`` are PEFT LoRA layers (subclasses of
``peft.tuners.lora.Linear``: the same forward, adapters, dropout, scaling, mixed-batch and
multi-adapter handling) whose ``merge`` / ``unmerge`` work on a quantized base weight: it
is dequantized to float32, the adapters' ``B @ A * scaling`` is added (or subtracted), and
the sum is re-quantized once with the layer's own settings (torch_ops.lora.store_weight).
Re-quantizing rounds, so PEFT's rounding warning applies: a merged quantized layer's output
differs from the unmerged adapter's by up to the quantization error, and ``unmerge`` restores
the base weight within that error, not bit-exactly. Variants that need the base weight in
float (DoRA, aLoRA, ...) are refused by PEFT's variant check ("unsupported variant").

Registration uses PEFT's custom-module mechanism, ``LoraConfig._register_custom_module``
({Linear4bit: LoraLinear4bit, Linear8bitLt: LoraLinear8bitLt}). PEFT reads that mapping
from the config of each adapter, so a plain ``LoraConfig(...)`` (also one PEFT loads from
an adapter directory) would not have it: importing this module wraps
``LoraModel._create_new_module`` so that, when the layer being wrapped is one of ours, the
mapping is registered on that config first (``register(config)`` does it by hand).

Merging is all or nothing: importing this module also extends ``LoraModel``'s
``_check_merge_allowed`` (which PEFT calls before ``merge_and_unload``, ``merge_adapter``
and ``unload``'s merging) to check every adapter on our layers first; an adapter whose
dtype cannot be merged (float8, integer: torch_ops.lora.MERGEABLE_DTYPES) is a ValueError
naming the layer and the model is unchanged.
"""
from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Linear as _PeftLoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import check_adapters_to_merge

from .linear4bit import Linear4bit
from .linear8bit import Linear8bitLt
from .lora import _ROUNDING, dequantized_weight, is_quantized, merge_problem, store_weight

__all__ = ["LoraLinear4bit", "LoraLinear8bitLt", "CUSTOM_MODULES", "register"]


class _QuantizedLoraLinear(_PeftLoraLinear):
    """A PEFT LoRA layer over a quantized base layer (module docstring). Adapters: lora_A
    (r, in), lora_B (out, r) per adapter name, as in PEFT."""

    def __init__(self, base_layer, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        if config.fan_in_fan_out:
            warnings.warn(f"fan_in_fan_out=True does not apply to {type(base_layer).__name__} (its weight "
                          "is stored (out, in)); using False", UserWarning, stacklevel=2)
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    @property
    def lora_variants(self):
        return {(): None}   # plain LoRA only: the variants need the base weight in float

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """``B @ A * scaling`` in float32 on the base weight's device: (out, in)."""
        dev = self.get_base_layer().weight.device
        A = self.lora_A[adapter].weight.detach().to(dev, torch.float32)
        B = self.lora_B[adapter].weight.detach().to(dev, torch.float32)
        return (B @ A) * self.scaling[adapter]

    def merge_problems(self, adapter_names=None) -> list:
        """Why any of ``adapter_names`` (default: all of this layer's) cannot be merged."""
        names = list(self.lora_A.keys()) if adapter_names is None else adapter_names
        base = self.get_base_layer()
        out = []
        for a in names:
            if a not in self.lora_A.keys():
                continue
            p = merge_problem(f"{type(base).__name__} adapter {a!r}", self.lora_A[a].weight,
                              self.lora_B[a].weight, base)
            if p:
                out.append(p)
            if self.lora_bias[a] and getattr(base, "bias", None) is None:
                out.append(f"adapter {a!r} has lora_bias=True but the base layer has no bias")
        return out

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Merge the adapters (default: the active ones) into the base weight: dequantize, add,
        re-quantize once. On any problem (dtype, NaN with safe_merge) nothing changes."""
        adapter_names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A.keys()]
        if not adapter_names:
            return
        problems = self.merge_problems(adapter_names)
        if problems:
            raise ValueError("cannot merge LoRA adapters: " + "; ".join(problems) + "; nothing was changed")
        base = self.get_base_layer()
        W = dequantized_weight(base)
        bias = None if base.bias is None else base.bias.detach().float().clone()
        for a in adapter_names:
            W += self.get_delta_weight(a)
            if self.lora_bias[a]:
                bias += self.lora_B[a].bias.detach().float().to(bias.device) * self.scaling[a]
        if safe_merge and not (torch.isfinite(W).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights; the adapter(s) {adapter_names} seem broken; "
                             "nothing was changed")
        self._store(base, W, bias)
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Subtract every merged adapter again (one re-quantization)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        W = dequantized_weight(base)
        bias = None if base.bias is None else base.bias.detach().float().clone()
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            if a not in self.lora_A.keys():
                continue
            W -= self.get_delta_weight(a)
            if self.lora_bias[a]:
                bias -= self.lora_B[a].bias.detach().float().to(bias.device) * self.scaling[a]
        self._store(base, W, bias)

    @staticmethod
    @torch.no_grad()
    def _store(base, W, bias) -> None:
        if is_quantized(base):
            warnings.warn(_ROUNDING.format(cls=type(base).__name__), UserWarning, stacklevel=3)
        store_weight(base, W)
        if bias is not None:
            base.bias.copy_(bias.to(base.bias.dtype))


class LoraLinear4bit(_QuantizedLoraLinear):
    """PEFT LoRA layer for torch_ops.Linear4bit (LinearNF4, LinearFP4)."""


class LoraLinear8bitLt(_QuantizedLoraLinear):
    """PEFT LoRA layer for torch_ops.Linear8bitLt."""


CUSTOM_MODULES = {Linear4bit: LoraLinear4bit, Linear8bitLt: LoraLinear8bitLt}


def register(config: LoraConfig) -> LoraConfig:
    """Register our LoRA layers on ``config`` (PEFT's ``_register_custom_module``); returns it."""
    have = config._custom_modules or {}
    config._register_custom_module({k: v for k, v in CUSTOM_MODULES.items() if k not in have})
    return config


def _install_hooks() -> None:
    create = LoraModel.__dict__["_create_new_module"]
    if getattr(create, "_qkernels", False):
        return
    create_fn = create.__func__

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if isinstance(base, tuple(CUSTOM_MODULES)) and isinstance(lora_config, LoraConfig):
            register(lora_config)
        return create_fn(lora_config, adapter_name, target, **kwargs)

    _create_new_module._qkernels = True
    LoraModel._create_new_module = staticmethod(_create_new_module)

    check = LoraModel._check_merge_allowed

    def _check_merge_allowed(self):
        check(self)
        problems = []
        for name, module in self.model.named_modules():
            if isinstance(module, _QuantizedLoraLinear):
                problems += [f"{name}: {p}" for p in module.merge_problems()]
        if problems:
            raise ValueError("cannot merge the LoRA adapters; the model is unchanged:\n  " + "\n  ".join(problems))

    LoraModel._check_merge_allowed = _check_merge_allowed


_install_hooks()
