"""LoRA adapters over a frozen (quantized) layer: the QLoRA recipe.

    model = ...                                   # any torch model
    replace_linear(model, "nf4", skip=("lm_head",), compute_dtype=torch.bfloat16)
    add_lora(model, rank=16, alpha=32, dropout=0.05)   # wraps every 4-bit / 8-bit layer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

``LoRA(base_layer, rank=8, alpha=16, dropout=0.0, dtype=torch.float32)`` computes
``base_layer(x) + (dropout(x) @ A^T @ B^T) * (alpha / rank)`` with ``A`` (rank, in)
Kaiming-uniform and ``B`` (out, rank) zero, so a fresh adapter leaves the output unchanged.
The base layer's parameters are frozen (requires_grad False); only ``lora_A`` / ``lora_B``
train. The adapter computes in its own dtype (float32 by default, as peft) and adds its
result in the base output's dtype; gradients reach the input through both paths.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LoRA", "add_lora"]


def _quantized_layers():
    from .linear4bit import Linear4bit
    from .linear8bit import Linear8bitLt
    return (Linear4bit, Linear8bitLt)


class LoRA(nn.Module):
    """Low-rank adapter around ``base_layer`` (anything with in_features/out_features:
    Linear4bit, Linear8bitLt, nn.Linear). Input (*, in_features) -> (*, out_features)."""

    def __init__(self, base_layer: nn.Module, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int; got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        dt = self.lora_A.weight.dtype
        delta = self.lora_B(self.lora_A(self.dropout(x.to(dt)))) * self.scaling
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets=None, dtype: torch.dtype = torch.float32) -> list:
    """Wrap every layer of ``model`` that is an instance of ``targets`` (default: this
    library's 4-bit and 8-bit layers) in a LoRA, in place; freezes every other parameter
    of the model. Returns the wrapped layers' names."""
    targets = targets or _quantized_layers()
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, targets) and n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRA(getattr(parent, child), rank, alpha, dropout, dtype))
    return names
