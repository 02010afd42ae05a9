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
device; 4-bit and int8 layers quantize there. The switchback and fp8 layers keep nn.Linear's
float parameters: they take the old layer's Parameter objects themselves, so an optimizer,
a hook or a tie that holds them still does. Every layer keeps the old one's bias Parameter
and its train/eval mode. Returns a ``ReplaceReport`` (replaced and skipped names, bytes of
parameters, buffers and quantization state before and after), printed when ``verbose``; a
tqdm progress bar is shown for more than ``progress_min`` layers (or never / always with
``progress=False`` / ``True``).

Models that are not a plain tree:
- A layer reachable under several names (``model.b = model.a``) is converted once and every
  name points to the one new layer. If any of its names is in ``skip`` it stays float under
  all of them.
- Tied weights (one weight Parameter in several modules: ``b.weight = a.weight``, an output
  head tied to its embedding). Switchback / fp8 kinds: the converted layers hold that same
  Parameter, so the tie (and its single gradient) is kept. Quantized kinds (int8, int8-lt,
  nf4, fp4): layers that are all converted share one quantized weight (quantized once; the
  weights are frozen, so they stay equal). A layer whose weight is also held by something
  that is not converted (an nn.Embedding, a skipped layer, any other parameter) cannot keep
  the tie: that is an error naming both, before anything changes; skip the layer (as the
  default ``skip=("lm_head",)`` does for a tied head) or untie the weights first.

All or nothing: the arguments and every target layer (weight dtype, shape, the options,
ties) are checked first, then every new layer is built, and only then are they put in
place. On any error the model is as it was. The price: while converting, the old float
weights and the new quantized ones coexist (the float ones are released on return, unless
something else holds them).
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

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class ReplaceReport:
    kind: str
    replaced: list
    skipped: list
    bytes_before: int
    bytes_after: int
    meta: bool = False  # some tensor was on the meta device: the byte counts leave it out

    def __str__(self) -> str:
        head = (f"replace_linear: {len(self.replaced)} nn.Linear -> {self.kind}, "
                f"{len(self.skipped)} skipped; ")
        if self.meta:
            return head + "model memory: sizes unknown (tensors on the meta device)"
        mib = 1 << 20
        ratio = self.bytes_before / self.bytes_after if self.bytes_after else float("inf")
        return head + (f"model memory {self.bytes_before / mib:.2f} MiB -> "
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


def _has_meta(model: nn.Module) -> bool:
    """Whether any parameter, buffer or quantization-state tensor is on the meta device."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for p in model.parameters() for t in _state_tensors(p)]
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors)


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


def _keeps_float_weight(cls) -> bool:
    """The switchback / fp8 layers: nn.Linear subclasses with nn.Linear's float parameters
    (the quantized layers have a ``from_linear`` that quantizes)."""
    return not hasattr(cls, "from_linear")


def _skip_names(skip) -> tuple:
    if skip is None:
        return ()
    if isinstance(skip, str):
        return (skip,)
    try:
        names = tuple(skip)
    except TypeError:
        names = None
    if names is None or not all(isinstance(s, str) for s in names):
        raise TypeError(f"replace_linear: skip must be a layer name or a sequence of layer names (str), or None; "
                        f"got {skip!r}")
    return names


def _skipped(name: str, skip) -> bool:
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


@dataclasses.dataclass
class _Target:
    """One nn.Linear object to convert and every qualified name it is reachable under."""
    module: nn.Linear
    names: list


def _find_targets(model: nn.Module, skip) -> tuple[list, list]:
    """(targets, skipped names): every nn.Linear object once, with all its names; an object
    with any skipped name is skipped under all of them."""
    by_id = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear:
            by_id.setdefault(id(module), _Target(module, [])).names.append(name)
    targets, skipped = [], []
    for t in by_id.values():
        if any(_skipped(n, skip) for n in t.names):
            skipped += t.names
        else:
            targets.append(t)
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    skipped.sort(key=order.__getitem__)
    return targets, skipped


def _meta_layer(cls, in_features: int, out_features: int, bias: bool, dtype, options: dict):
    """A layer of ``cls`` on the meta device, built the way the conversion builds it (so a
    bad option or shape raises here, where nothing has changed yet)."""
    if _keeps_float_weight(cls):
        return cls(in_features, out_features, bias=bias, device="meta", dtype=dtype, **options)
    return cls(in_features, out_features, bias, device="meta", **options)


def _check_target(kind: str, cls, t: _Target, options: dict, built: set) -> None:
    name, lin = t.names[0], t.module
    w = lin.weight
    if not isinstance(w, torch.Tensor) or w.dtype not in _WEIGHT_DTYPES:
        dtype = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"replace_linear(kind={kind!r}): layer {name!r} has a {dtype} weight; "
                        f"{cls.__name__} takes float16, bfloat16 or float32 weights. Nothing was "
                        f"converted: cast the model first (e.g. model.float()) or add {name!r} to skip")
    if tuple(w.shape) != (lin.out_features, lin.in_features):
        raise ValueError(f"replace_linear(kind={kind!r}): layer {name!r} has a weight of shape "
                         f"{tuple(w.shape)} but in_features={lin.in_features}, out_features="
                         f"{lin.out_features}. Nothing was converted")
    key = (lin.in_features, lin.out_features, lin.bias is not None, w.dtype)
    if key in built:
        return
    try:
        _meta_layer(cls, *key, options)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
        message = (f"replace_linear(kind={kind!r}): cannot build {cls.__name__} for layer "
                   f"{name!r} ({lin.in_features} -> {lin.out_features}) with options ({shown}): "
                   f"{e}. Nothing was converted")
        try:
            error = type(e)(message)
        except Exception:   # an exception class with another constructor: keep it as it is
            raise e from None
        raise error from e
    built.add(key)


def _check_ties(model: nn.Module, kind: str, cls, targets: list) -> None:
    """Quantized kinds: a converted layer's weight must not be held by anything that is not
    converted (its quantized copy would silently untie them)."""
    converted = {f"{n}.weight" for t in targets for n in t.names}
    holders = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(pname)
    for t in targets:
        others = [h for h in holders.get(id(t.module.weight), []) if h not in converted]
        if others:
            owner_name = others[0].rpartition(".")[0]
            owner = model.get_submodule(owner_name) if owner_name else model
            what = f"the {'skipped ' if type(owner) is nn.Linear else ''}" \
                   f"{type(owner).__name__} {owner_name!r}" if owner_name else "the model itself"
            name = t.names[0]
            raise ValueError(
                f"replace_linear(kind={kind!r}): layer {name!r} shares its weight Parameter with "
                f"{others[0]!r} (of {what}), which is not converted; a {cls.__name__} holds its "
                f"own quantized weight, so converting {name!r} would untie them. Nothing was "
                f"converted: add {name!r} to skip (keep it in float) or untie the weights first")


def _build(cls, t: _Target, options: dict, shared: dict) -> nn.Module:
    """The new layer for target ``t`` (the model is not touched). ``shared``: id of an old
    weight Parameter -> the quantized weight already made from it (tied weights)."""
    linear = t.module
    if _keeps_float_weight(cls):
        layer = _meta_layer(cls, linear.in_features, linear.out_features, linear.bias is not None,
                            linear.weight.dtype, options)
        layer.weight = linear.weight
    elif id(linear.weight) in shared:
        layer = _meta_layer(cls, linear.in_features, linear.out_features, linear.bias is not None,
                            linear.weight.dtype, options)
        layer.weight = shared[id(linear.weight)]
    else:
        layer = cls.from_linear(linear, **options)
        shared[id(linear.weight)] = layer.weight
    if linear.bias is not None:
        layer.bias = linear.bias
    layer.train(linear.training)
    return layer


def replace_linear(model: nn.Module, kind: str, skip=("lm_head",), *, verbose: bool = True,
                   progress: bool | None = None, progress_min: int = 32, **options) -> ReplaceReport:
    """Replace every ``nn.Linear`` of ``model`` (exactly nn.Linear, not a subclass that is
    already one of ours) by ``kind``'s layer, in place, except those whose qualified name,
    or last name component, is in ``skip`` (a name, a sequence of names, or None).

    Shared layers are converted once (every name gets the new layer); tied weights stay
    tied (switchback / fp8: the same float Parameter; int8 / nf4 / fp4: one quantized weight
    among converted layers, and a ValueError naming both when a quantized layer's weight is
    tied to a module that is not converted). Everything is validated and every new layer
    built before the model changes: on an error the model is unchanged. See the module
    docstring for kinds, options and the details.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"replace_linear: model must be an nn.Module; got {type(model).__name__}")
    cls, defaults = _layer_class(kind)
    if type(model) is nn.Linear:
        single = (f"use {cls.__name__}.from_linear(layer) or wrap it (nn.Sequential(layer))"
                  if hasattr(cls, "from_linear") else "wrap it (nn.Sequential(layer))")
        raise TypeError(f"replace_linear converts the nn.Linear layers inside a model; for a "
                        f"single layer {single}")
    opts = {**defaults, **options}
    skip = _skip_names(skip)
    targets, skipped = _find_targets(model, skip)

    # 1. validate: nothing is built yet, nothing changes
    built = set()
    for t in targets:
        _check_target(kind, cls, t, opts, built)
    if not _keeps_float_weight(cls):
        _check_ties(model, kind, cls, targets)

    # 2. build every new layer (quantizing); the model is still untouched
    before, meta = model_bytes(model), _has_meta(model)
    show = progress if progress is not None else len(targets) > progress_min
    todo = targets
    if show:
        try:
            from tqdm.auto import tqdm
            todo = tqdm(targets, desc=f"replace_linear -> {kind}", unit="layer", file=sys.stderr)
        except ImportError:
            pass
    shared = {}
    new = [_build(cls, t, opts, shared) for t in todo]

    # 3. put them in place
    for t, layer in zip(targets, new):
        for name in t.names:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    replaced = sorted((n for t in targets for n in t.names), key=order.__getitem__)
    del targets, new, shared, todo
    report = ReplaceReport(kind, replaced, skipped, before, model_bytes(model),
                           meta or _has_meta(model))
    if verbose:
        print(report, file=sys.stderr)
    return report
