"""``replace_linear(model, kind, skip=("lm_head",), **options)``: convert a model's nn.Linear
layers, in place, to one of this library's layers (the torchao ``quantize_`` role).

Kinds (layer class, defaults):
    "int8"        Linear8bitLt (has_fp16_weights=False: inference; threshold=0.0)
    "int8-lt"     Linear8bitLt with threshold=6.0 (LLM.int8() outlier decomposition)
    "nf4", "fp4"  Linear4bit with that quant_type (compress_statistics=True)
    "switchback", "switchback-global", "switchback-vectorwise"   torch_ops.switchback
    "fp8", "fp8-mixed", "fp8-global"                              torch_ops.fp8
``options`` are passed to the layer's constructor (e.g. compute_dtype, threshold,
compress_statistics, blocksize). The switchback / fp8 modules are imported only when such
a kind is asked for.

Each new layer takes the old layer's weight tensor itself (no float copy first), on its
device; 4-bit and int8 layers quantize there. Returns a ``ReplaceReport`` (replaced and
skipped names, bytes of parameters, buffers and quantization state before and after),
printed when ``verbose``; a tqdm progress bar is shown for more than ``progress_min``
layers (or never / always with ``progress=False`` / ``True``).
"""
from __future__ import annotations

import dataclasses
import importlib
import sys

import torch
from torch import nn

__all__ = ["replace_linear", "ReplaceReport", "model_bytes", "KINDS"]

# kind -> (module, class name, default options)
KINDS = {
    "int8": ("torch_ops.linear8bit", "Linear8bitLt", {"has_fp16_weights": False}),
    "int8-lt": ("torch_ops.linear8bit", "Linear8bitLt", {"has_fp16_weights": False, "threshold": 6.0}),
    "nf4": ("torch_ops.linear4bit", "Linear4bit", {"quant_type": "nf4"}),
    "fp4": ("torch_ops.linear4bit", "Linear4bit", {"quant_type": "fp4"}),
    "switchback": ("torch_ops.switchback", "SwitchBackLinear", {}),
    "switchback-global": ("torch_ops.switchback", "SwitchBackLinearGlobal", {}),
    "switchback-vectorwise": ("torch_ops.switchback", "SwitchBackLinearVectorwise", {}),
    "fp8": ("torch_ops.fp8", "LinearFP8Mixed", {}),
    "fp8-mixed": ("torch_ops.fp8", "LinearFP8Mixed", {}),
    "fp8-global": ("torch_ops.fp8", "LinearFP8Global", {}),
}


@dataclasses.dataclass
class ReplaceReport:
    kind: str
    replaced: list
    skipped: list
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        mib = 1 << 20
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("inf")
        return (f"replace_linear: {len(self.replaced)} nn.Linear -> {self.kind}, "
                f"{len(self.skipped)} skipped; model memory {self.bytes_before / mib:.2f} MiB -> "
                f"{self.bytes_after / mib:.2f} MiB ({ratio:.2f}x smaller)")


def _state_tensors(param):
    """Tensors a quantized parameter holds beside its data (QuantState, SCB)."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        yield state.absmax
        yield state.code
        if state.state2 is not None:
            yield state.state2.absmax
            yield state.state2.code
    scb = getattr(param, "SCB", None)
    if scb is not None:
        yield scb


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and quantization-state tensor of ``model``
    (each storage counted once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for p in model.parameters() for t in _state_tensors(p)]
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _layer_class(kind: str):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    module_name, cls_name, defaults = KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"kind {kind!r} needs {module_name}, which cannot be imported: {e}") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ValueError(f"kind {kind!r}: {module_name} has no {cls_name}")
    return cls, defaults


def _convert(cls, linear: nn.Linear, options: dict) -> nn.Module:
    if hasattr(cls, "from_linear"):
        return cls.from_linear(linear, **options)
    # an nn.Linear subclass (SwitchBack, FP8): built on meta, then given the old tensors
    layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device="meta", dtype=linear.weight.dtype, **options)
    layer.weight = nn.Parameter(linear.weight.data, requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=linear.bias.requires_grad)
    return layer


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def replace_linear(model: nn.Module, kind: str, skip=("lm_head",), *, verbose: bool = True,
                   progress: bool | None = None, progress_min: int = 32, **options) -> ReplaceReport:
    """Replace every ``nn.Linear`` of ``model`` (exactly nn.Linear, not a subclass that is
    already one of ours) by ``kind``'s layer, in place, except those whose qualified name,
    or last name component, is in ``skip``. See the module docstring for kinds and options.
    """
    cls, defaults = _layer_class(kind)
    opts = {**defaults, **options}
    if isinstance(skip, str):
        skip = (skip,)
    targets, skipped = [], []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            (skipped if _skipped(name, skip) else targets).append(name)
    if type(model) is nn.Linear:
        raise TypeError("replace_linear converts the nn.Linear layers inside a model; for a "
                        f"single layer use {cls.__name__}.from_linear(layer) or wrap it")
    before = model_bytes(model)
    show = progress if progress is not None else len(targets) > progress_min
    names = targets
    if show:
        try:
            from tqdm.auto import tqdm
            names = tqdm(targets, desc=f"replace_linear -> {kind}", unit="layer", file=sys.stderr)
        except ImportError:
            pass
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, _convert(cls, old, opts))
        del old
    report = ReplaceReport(kind, targets, skipped, before, model_bytes(model))
    if verbose:
        print(report, file=sys.stderr)
    return report
