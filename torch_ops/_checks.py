"""Input checks and the compute dtype shared by the training layers (switchback.py, fp8.py)."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_linear_input(x, in_features: int, param: torch.Tensor | None, layer: str) -> None:
    """Raise a clear error for an input a quantized linear layer cannot take.

    x: the layer input, (*, in_features) float16 / bfloat16 / float32; param: a parameter or
    buffer of the layer (its device must be x's)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer}: input must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        kind = "a floating-point" if not x.dtype.is_floating_point else "a float16, bfloat16 or float32"
        raise TypeError(f"{layer}: input must be {kind} tensor (float16, bfloat16 or float32); "
                        f"got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{layer}: input must have shape (*, in_features={in_features}); "
                         f"got shape {tuple(x.shape)}")
    if param is not None and param.device != x.device:
        raise RuntimeError(f"{layer}: input is on {x.device} but the layer's weights are on "
                           f"{param.device}; move one of them (layer.to(x.device))")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when autocast is on for x's device (and
    gives a supported dtype), else x's own (never a silent float32 path)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt in FLOAT_DTYPES:
            return dt
    return x.dtype
