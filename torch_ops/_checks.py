"""Input checks and the compute dtype shared by the quantized layers.

A layer's forward asks ``input_problem`` what is wrong with its input (None when nothing is)
and hands the answer to ``refuse``: in eager mode that raises the error; while torch.compile
traces, it returns the output of ``qkernels::refuse_input``, an op that raises the same error
when the compiled code runs. So a compiled model (``fullgraph=True`` included) meets a bad
input with the layer's own TypeError / ValueError / RuntimeError, never a dynamo internal
error, and the check costs nothing per call once compiled (dynamo guards on dtype and shape).
"""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ERRORS = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError}


def input_problem(x, in_features: int, param: Tensor | None, layer: str):
    """None, or (error class name, message) for an input a quantized linear layer cannot
    take. x: the layer input, (*, in_features) float16 / bfloat16 / float32; param: a
    parameter or buffer of the layer (its device must be x's)."""
    if not isinstance(x, Tensor):
        return "TypeError", f"{layer}: input must be a torch.Tensor; got {type(x).__name__}"
    if x.dtype not in FLOAT_DTYPES:
        kind = "a floating-point" if not x.dtype.is_floating_point else "a float16, bfloat16 or float32"
        return "TypeError", (f"{layer}: input must be {kind} tensor (float16, bfloat16 or float32); "
                             f"got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        # the shape is filled in when the error is raised (compiled: at run time, not the traced one)
        return "ValueError", f"{layer}: input must have shape (*, in_features={in_features}); got shape {{shape}}"
    if param is not None and param.device != x.device:
        return "RuntimeError", (f"{layer}: input is on {x.device} but the layer's weights are on "
                                f"{param.device}; move one of them (layer.to(x.device))")
    return None


def refuse(problem, x: Tensor, out_features: int) -> Tensor:
    """Raise ``problem`` (from input_problem or a layer's own check); under torch.compile,
    the output of an op that raises it when run (module docstring)."""
    kind, message = problem
    if torch.compiler.is_compiling() and isinstance(x, Tensor):
        return torch.ops.qkernels.refuse_input(x, kind, message, out_features)
    raise _error(kind, message, x)


def _error(kind: str, message: str, x) -> Exception:
    shape = tuple(x.shape) if isinstance(x, Tensor) else None
    return _ERRORS[kind](message.replace("{shape}", str(shape)))


def check_linear_input(x, in_features: int, param: Tensor | None, layer: str) -> None:
    """Raise a clear error for an input a quantized linear layer cannot take (eager code;
    forwards that torch.compile traces use input_problem + refuse)."""
    problem = input_problem(x, in_features, param, layer)
    if problem is not None:
        raise _error(*problem, x)


@torch.library.custom_op("qkernels::refuse_input", mutates_args=())
def refuse_input(x: Tensor, kind: str, message: str, out_features: int) -> Tensor:
    """Raises ``kind(message)``: the compiled form of a layer's input check."""
    raise _error(kind, message, x)


@refuse_input.register_fake
def _(x, kind, message, out_features):
    dtype = x.dtype if x.dtype in FLOAT_DTYPES else torch.float32
    return x.new_empty((*x.shape[:-1], out_features) if x.dim() else (out_features,), dtype=dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when autocast is on for x's device (and
    gives a supported dtype), else x's own (never a silent float32 path)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt in FLOAT_DTYPES:
            return dt
    return x.dtype
