"""LoRA adapters over a frozen (quantized) layer: the QLoRA recipe.

    model = ...                                   # any torch model
    replace_linear(model, "nf4", skip=("lm_head",), compute_dtype=torch.bfloat16)
    add_lora(model, rank=16, alpha=32, dropout=0.05)   # wraps every 4-bit / 8-bit layer
    # or by name, as PEFT's target_modules:  add_lora(model, targets=["q_proj", "v_proj"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ...
    torch.save(lora_state_dict(model), "adapters.pt")   # the adapters only
    load_lora_state_dict(other_model_with_adapters, torch.load("adapters.pt"))
    merge_lora(model)                             # fold the adapters in; LoRA wrappers removed

``LoRA(base_layer, rank=8, alpha=16, dropout=0.0, dtype=torch.float32)`` computes
``base_layer(x) + (dropout(x) @ A^T @ B^T) * (alpha / rank)`` with ``A`` (rank, in)
Kaiming-uniform and ``B`` (out, rank) zero, so a fresh adapter leaves the output unchanged.
The base layer's parameters are frozen (requires_grad False); only ``lora_A`` / ``lora_B``
train. The adapter computes in its own dtype (float32 by default, as peft); its result is
added to the base output in the wider of the two dtypes and rounded once to the base
output's dtype (as peft's LoRA layers do); gradients reach the input through both paths.

Merging (``LoRA.merge()``, ``merge_lora``) computes ``W + B @ A * scaling`` in float32, with W
the base weight dequantized, and stores it back the way the layer stores weights: a
quantized layer (Linear4bit, Linear8bitLt with has_fp16_weights=False) re-quantizes it with
its own settings (same quant_type, blocksize, double quantization, storage), which rounds: a
merged quantized layer's output differs from the unmerged adapter's by up to that
quantization error (a UserWarning says so). ``unmerge()`` subtracts the same product and
re-quantizes again. Adapters in float16, bfloat16, float32 or float64 can be merged; any
other dtype (float8, integer) is a ValueError and nothing changes.
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings

import torch
from torch import nn

__all__ = ["LoRA", "add_lora", "merge_lora", "lora_state_dict", "load_lora_state_dict",
           "dequantized_weight", "store_weight", "MERGEABLE_DTYPES"]

MERGEABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_ROUNDING = ("merging a LoRA adapter into a quantized {cls} re-quantizes its weight: its outputs differ "
             "from the unmerged adapter's by up to that quantization error")


def _quantized_layers():
    from .linear4bit import Linear4bit
    from .linear8bit import Linear8bitLt
    return (Linear4bit, Linear8bitLt)


# --- a layer's weight as float32, and back ------------------------------------------------------

def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight holds quantized codes (4-bit packed or int8 CB)."""
    w = getattr(layer, "weight", None)
    return bool(getattr(w, "bnb_quantized", False)) or (
        getattr(w, "SCB", None) is not None and not getattr(w, "has_fp16_weights", True))


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """``layer``'s weight as float32 (out_features, in_features) on its device: dequantized for a
    quantized Linear4bit / Linear8bitLt, a float32 copy otherwise."""
    from .linear4bit import Linear4bit
    from .linear8bit import Linear8bitLt
    from ._layers import plain
    w = layer.weight
    if isinstance(layer, Linear4bit) and getattr(w, "bnb_quantized", False):
        from qkernels.fourbit import dequantize_4bit
        return dequantize_4bit(plain(w), w.synced_state(), out_dtype="float32")
    if isinstance(layer, Linear8bitLt) and is_quantized(layer):
        from qkernels.int8.ops import dequant_weight
        CB, SCB = w.synced()
        return dequant_weight(CB, SCB)
    return w.detach().float().clone()


@torch.no_grad()
def store_weight(layer: nn.Module, W: torch.Tensor) -> None:
    """Make ``layer``'s weight ``W`` (float (out, in)), in place: re-quantized with the layer's
    own settings for a quantized layer (the QuantState keeps its recorded dtype), copied into
    the float weight otherwise. The weight Parameter object stays the same."""
    from .linear4bit import Linear4bit
    w = layer.weight
    if not is_quantized(layer):
        w.copy_(W.to(w.dtype))
        return
    if isinstance(layer, Linear4bit):
        old_dtype = w.quant_state.dtype
        new = w._rewrap(W.float().contiguous(), quant_state=None, bnb_quantized=False).to(w.device)
        new.quant_state = dataclasses.replace(new.quant_state, dtype=old_dtype)
    else:
        new = w._rewrap(W.float().contiguous(), CB=None, SCB=None).to(w.device)
    w.data = new.data
    w.__dict__.update(new.__dict__)
    layer._plan = None


def merge_problem(name: str, A: torch.Tensor, B: torch.Tensor, base: nn.Module) -> str | None:
    """Why the adapter (A (r, in), B (out, r)) cannot be merged into ``base``, or None."""
    for which, t in (("lora_A", A), ("lora_B", B)):
        if t.dtype not in MERGEABLE_DTYPES:
            return (f"{name}: the adapter's {which} is {t.dtype}; only float16, bfloat16, float32 and "
                    f"float64 adapters can be merged")
        if t.device.type == "meta":
            return f"{name}: the adapter's {which} is on the meta device (not loaded)"
    if base.weight.device.type == "meta":
        return f"{name}: the base layer's weight is on the meta device (not loaded)"
    return None


def delta_weight(A: torch.Tensor, B: torch.Tensor, scaling: float, device) -> torch.Tensor:
    """``B @ A * scaling`` in float32 on ``device``: (out, in)."""
    return (B.detach().to(device, torch.float32) @ A.detach().to(device, torch.float32)) * scaling


def merge_into(layer: nn.Module, delta: torch.Tensor, sign: int = 1) -> None:
    """``layer.weight += sign * delta`` in float32, stored back as the layer stores weights
    (re-quantizing a quantized layer, with the rounding warning)."""
    if is_quantized(layer):
        warnings.warn(_ROUNDING.format(cls=type(layer).__name__), UserWarning, stacklevel=3)
    store_weight(layer, dequantized_weight(layer) + sign * delta)


# --- the adapter --------------------------------------------------------------------------------

class LoRA(nn.Module):
    """Low-rank adapter around ``base_layer`` (anything with in_features/out_features:
    Linear4bit, Linear8bitLt, nn.Linear). Input (*, in_features) -> (*, out_features)."""

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_args(rank, dropout)
        in_f, out_f = getattr(base_layer, "in_features", None), getattr(base_layer, "out_features", None)
        if in_f is None or out_f is None:
            raise TypeError(f"base_layer must have in_features and out_features; got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        device = next((p.device for p in base_layer.parameters() if p.device.type != "meta"), None)
        self.lora_A = nn.Linear(in_f, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_f, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.in_features, self.out_features = in_f, out_f
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        dt = self.lora_A.weight.dtype
        delta = self.lora_B(self.lora_A(self.dropout(x.to(dt)))) * self.scaling
        return (out + delta).to(out.dtype)

    def merge_problem(self, name: str = "") -> str | None:
        """Why this adapter cannot be merged (dtype, meta device), or None."""
        return merge_problem(name or type(self.base_layer).__name__, self.lora_A.weight,
                             self.lora_B.weight, self.base_layer)

    def merge(self) -> None:
        """Fold ``B @ A * scaling`` into the base layer's weight (module docstring); the forward
        then runs the base layer alone. A no-op if already merged."""
        if self.merged:
            return
        problem = self.merge_problem()
        if problem:
            raise ValueError(f"cannot merge the LoRA adapter: {problem}; nothing was changed")
        merge_into(self.base_layer, self._delta(), +1)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the adapter's product from the base weight again (re-quantizing a quantized
        layer: the base weight comes back within the quantization error, not bit-exactly)."""
        if not self.merged:
            return
        merge_into(self.base_layer, self._delta(), -1)
        self.merged = False

    def _delta(self) -> torch.Tensor:
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling, self.base_layer.weight.device)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}" + (", merged" if self.merged else "")


def _check_args(rank, dropout) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int; got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")


# --- whole models -------------------------------------------------------------------------------

def _inside_lora(name: str, lora_names) -> bool:
    return any(name.startswith(p + ".") for p in lora_names)


def _match(name: str, module: nn.Module, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if isinstance(targets, tuple) and all(isinstance(t, type) for t in targets):
        return isinstance(module, targets)
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(targets):
    """None -> our quantized layer classes; a class or a tuple of classes; a regex string
    (matched against the whole module name, as PEFT); or a list of names or name suffixes."""
    if targets is None:
        return _quantized_layers()
    if isinstance(targets, type):
        return (targets,)
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"add_lora: targets {targets!r} is not a valid regular expression: {e}") from e
        return targets
    try:
        items = tuple(targets)
    except TypeError:
        items = None
    if items and all(isinstance(t, type) for t in items):
        return items
    if not items or not all(isinstance(t, str) for t in items):
        raise TypeError(f"add_lora: targets must be None, a layer class or tuple of classes, a regex string "
                        f"or a list of module names / name suffixes; got {targets!r}")
    return list(items)


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets=None, dtype: torch.dtype = torch.float32) -> list:
    """Wrap layers of ``model`` in a LoRA, in place, and freeze every other parameter. Returns
    the wrapped layers' names.

    ``targets``: None (every Linear4bit / Linear8bitLt); a layer class or tuple of classes; a
    list of names, each matching a module named exactly that or ending in ``"." + name`` (as
    PEFT's ``target_modules``: ``["q_proj", "v_proj"]``); or a string, a regular expression the
    whole module name must match. A named module without in_features / out_features, one that
    is already a LoRA, or targets that match nothing raise (TypeError / ValueError) before
    anything changes."""
    _check_args(rank, dropout)
    targets = _check_targets(targets)
    lora_names = [n for n, m in model.named_modules() if isinstance(m, LoRA)]
    names = []
    for name, module in model.named_modules():
        if not name or _inside_lora(name, lora_names) or not _match(name, module, targets):
            continue
        if isinstance(module, LoRA):
            raise ValueError(f"add_lora: {name!r} already has a LoRA adapter; nothing was changed")
        if getattr(module, "in_features", None) is None or getattr(module, "out_features", None) is None:
            if isinstance(targets, tuple):
                continue
            raise TypeError(f"add_lora: target {name!r} is a {type(module).__name__}, which has no "
                            "in_features / out_features (LoRA wraps linear layers); nothing was changed")
        names.append(name)
    if not names and not isinstance(targets, tuple):
        raise ValueError(f"add_lora: targets {targets!r} match no module of the model; nothing was changed")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRA(getattr(parent, child), rank, alpha, dropout, dtype))
    return names


def _loras(model: nn.Module) -> list:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRA)]


def merge_lora(model: nn.Module, unload: bool = True, dtype: torch.dtype | None = None) -> list:
    """Merge every LoRA of ``model`` into its base layer; returns the merged layers' names.
    Every adapter is checked first: if any cannot be merged, a ValueError names each such
    layer and the model is unchanged.

    ``dtype=None``: ``LoRA.merge`` (a quantized base is re-quantized with W + B A); with
    ``unload`` each LoRA wrapper is then replaced by its base layer. Re-quantizing keeps each
    weight within the format's rounding error of W + B A, and an adapter whose change is
    small against that error (the usual case after a short fine-tune: its median is a few
    percent of half an NF4 step) is mostly rounded away.
    ``dtype=torch.bfloat16`` (or float16 / float32; needs ``unload``): each wrapper is
    replaced by an ``nn.Linear`` of that dtype holding dequantize(W) + B A, so nothing of the
    adapter is lost, at 16 or 32 bits a weight."""
    if dtype is not None and (dtype not in (torch.float16, torch.bfloat16, torch.float32) or not unload):
        raise ValueError(f"merge_lora: dtype must be None, torch.float16, torch.bfloat16 or torch.float32, "
                         f"with unload=True; got dtype={dtype!r}, unload={unload!r}")
    loras = _loras(model)
    problems = [p for p in (m.merge_problem(n) for n, m in loras if not m.merged) if p]
    if problems:
        raise ValueError("merge_lora: cannot merge; nothing was changed:\n  " + "\n  ".join(problems))
    if dtype is not None:
        merged = {name: _merged_linear(m, dtype) for name, m in loras}
    else:
        for _, m in loras:
            m.merge()
    if unload:
        for name, m in loras:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, merged[name] if dtype is not None else m.base_layer)
    return [n for n, _ in loras]


@torch.no_grad()
def _merged_linear(lora: "LoRA", dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear of ``dtype`` with weight dequantize(W) (+ B A unless already merged) and
    the base layer's bias, on the base layer's device."""
    base = lora.base_layer
    W = dequantized_weight(base)
    if not lora.merged:
        W += lora._delta().to(W.dtype)
    bias = getattr(base, "bias", None)
    out = nn.Linear(lora.in_features, lora.out_features, bias=bias is not None, device=W.device, dtype=dtype)
    out.weight.copy_(W)
    if bias is not None:
        out.bias.copy_(bias)
    out.weight.requires_grad_(False)
    if bias is not None:
        out.bias.requires_grad_(False)
    return out


_ADAPTER_KEYS = ("lora_A.weight", "lora_B.weight")


def lora_state_dict(model: nn.Module) -> dict:
    """The adapters alone: ``{"<layer>.lora_A.weight": (rank, in), "<layer>.lora_B.weight":
    (out, rank)}`` for every LoRA of ``model`` (the keys ``model.state_dict()`` uses), detached
    tensors sharing the parameters' storage (save them with torch.save or safetensors)."""
    out = {}
    for name, m in _loras(model):
        prefix = f"{name}." if name else ""
        out[prefix + "lora_A.weight"] = m.lora_A.weight.detach()
        out[prefix + "lora_B.weight"] = m.lora_B.weight.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: dict, strict: bool = True) -> tuple:
    """Copy adapters saved by ``lora_state_dict`` into ``model``'s LoRAs (same names, shapes).
    Returns (missing, unexpected) key lists; with ``strict`` either being non-empty, or any
    shape mismatch, is a ValueError naming the keys, raised before anything is copied."""
    params = {}
    for name, m in _loras(model):
        prefix = f"{name}." if name else ""
        params[prefix + "lora_A.weight"] = m.lora_A.weight
        params[prefix + "lora_B.weight"] = m.lora_B.weight
    missing = [k for k in params if k not in state_dict]
    unexpected = [k for k in state_dict if k not in params]
    bad = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(params[k].shape)}"
           for k, v in state_dict.items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
    if bad or (strict and (missing or unexpected)):
        parts = ([f"missing {missing}"] if missing and strict else []) + \
                ([f"unexpected {unexpected}"] if unexpected and strict else []) + bad
        raise ValueError("load_lora_state_dict: " + "; ".join(parts) + "; nothing was loaded")
    for k, v in state_dict.items():
        if k in params:
            params[k].copy_(v)
    return missing, unexpected
