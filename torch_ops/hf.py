"""Hugging Face transformers integration: ``QKernelsConfig`` and its quantizer.

    from transformers import AutoModelForCausalLM
    from torch_ops import QKernelsConfig
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=QKernelsConfig(kind="nf4", compute_dtype=torch.bfloat16, skip=["lm_head"]),
        device_map="auto")                       # or None (CPU), {"": 0}, ...
    model.save_pretrained(out)                   # config.json records quant_method "qkernels" and the kind
    AutoModelForCausalLM.from_pretrained(out)    # reloads quantized (this module must have been imported)

Importing this module imports transformers and registers, through transformers' public API
(``register_quantization_config`` / ``register_quantizer``), the quant_method ``"qkernels"``.
``torch_ops.QKernelsConfig`` imports it on first use; ``import torch_ops`` alone does not.

Kinds and their options (anything else is a ValueError naming it, raised by the constructor,
so before from_pretrained reads a weight):
    "nf4", "fp4"  Linear4bit: compute_dtype (None: follow the input), compress_statistics
                  (True), blocksize (64), quant_storage (torch.uint8)
    "int8"        Linear8bitLt (inference, has_fp16_weights=False): threshold (0.0; 6.0 is
                  LLM.int8()'s outlier decomposition). "int8-lt" is "int8" with threshold 6.0.
Every kind: ``skip``, module names (or suffixes, or regexes, as transformers matches them)
kept in float; None keeps transformers' defaults (the output embedding, tied weights, the
last module). Only ``nn.Linear`` modules are converted.

Quantize while loading: the model is built on the meta device, its nn.Linear layers are
replaced by ours (``replace_linear``), and each weight is quantized on its target device as
soon as it is read from the checkpoint (one float tensor at a time), so host memory peaks
near one checkpoint shard plus the quantized model.

Checkpoints: ours and bitsandbytes' have the same state_dict keys. A checkpoint saved with
``BitsAndBytesConfig`` (4-bit nf4/fp4 or 8-bit) loads through ``QKernelsConfig`` when its
kind matches; its runtime options (compute dtype, int8 threshold) are kept unless the
QKernelsConfig sets them. A checkpoint of another kind raises a ValueError naming both
kinds, before any weight is read; it is never re-quantized. To make that comparison,
``from_pretrained`` must see both configs, which transformers' public API does not offer:
this module wraps ``AutoHfQuantizer.merge_quantization_configs`` so that it handles a
``QKernelsConfig`` argument itself and passes every other call through unchanged.
"""
from __future__ import annotations

import copy
import importlib.util
import math

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AutoHfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ._layers import LoadReport
from .linear4bit import Linear4bit
from .linear8bit import Linear8bitLt, _check_weight_format

__all__ = ["QKernelsConfig", "QKernelsHfQuantizer", "QUANT_METHOD"]

QUANT_METHOD = "qkernels"
KINDS = ("nf4", "fp4", "int8")
_FOURBIT_OPTIONS = ("compute_dtype", "compress_statistics", "blocksize", "quant_storage")
_OPTIONS = {"nf4": _FOURBIT_OPTIONS, "fp4": _FOURBIT_OPTIONS, "int8": ("threshold",)}
_RUNTIME_OPTIONS = ("compute_dtype", "threshold")   # may differ from the checkpoint's
_STORAGE_OPTIONS = ("compress_statistics", "blocksize", "quant_storage")   # fixed by the checkpoint
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "uint8": torch.uint8, "int8": torch.int8, "float64": torch.float64,
           "int16": torch.int16, "int32": torch.int32, "int64": torch.int64}
_QUANTIZED = (Linear4bit, Linear8bitLt)


def _dtype(name: str, value):
    """A torch.dtype from a dtype or its name ("bfloat16", "torch.bfloat16")."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"QKernelsConfig: {name} must be a torch.dtype or its name; got {value!r}")


def _dtype_name(value):
    return None if value is None else str(value).removeprefix("torch.")


@register_quantization_config(QUANT_METHOD)
class QKernelsConfig(QuantizationConfigMixin):
    """``QKernelsConfig(kind="nf4", skip=None, *, compute_dtype=None, compress_statistics=None,
    blocksize=None, quant_storage=None, threshold=None)``: from_pretrained's
    ``quantization_config`` for this library's layers (module docstring: kinds, options).

    None means the kind's default. An unknown kind, an unknown option or an option that does
    not apply to the kind raises a ValueError naming it; so does a bad value (the layer's own
    checks run on a meta-device layer here)."""

    def __init__(self, kind: str = "nf4", skip=None, compute_dtype=None, compress_statistics=None,
                 blocksize=None, quant_storage=None, threshold=None, **kwargs):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if method != QUANT_METHOD:
            raise ValueError(f"QKernelsConfig: quant_method must be {QUANT_METHOD!r}; got {method!r}")
        if kwargs:
            raise ValueError(f"QKernelsConfig: unknown option(s) {', '.join(sorted(kwargs))}; the "
                             f"options are skip, {', '.join(sorted({*_FOURBIT_OPTIONS, 'threshold'}))}")
        if kind == "int8-lt":
            kind, threshold = "int8", 6.0 if threshold is None else threshold
        if kind not in KINDS:
            raise ValueError(f"QKernelsConfig: kind must be one of {', '.join(KINDS)} (or 'int8-lt'); "
                             f"got {kind!r}")
        given = {"compute_dtype": compute_dtype, "compress_statistics": compress_statistics,
                 "blocksize": blocksize, "quant_storage": quant_storage, "threshold": threshold}
        wrong = sorted(k for k, v in given.items() if v is not None and k not in _OPTIONS[kind])
        if wrong:
            raise ValueError(f"QKernelsConfig(kind={kind!r}): option(s) {', '.join(wrong)} do not apply "
                             f"to kind {kind!r} (its options: {', '.join(_OPTIONS[kind])})")
        self.quant_method = QUANT_METHOD
        self.kind = kind
        self.skip = _skip_list(skip)
        self._user_set = {k for k, v in given.items() if v is not None}
        if kind == "int8":
            t = 0.0 if threshold is None else threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                raise ValueError(f"QKernelsConfig(kind='int8'): threshold must be a finite number >= 0; "
                                 f"got {threshold!r}")
            self.threshold = float(t)
        else:
            self.compute_dtype = _dtype("compute_dtype", compute_dtype)
            self.compress_statistics = True if compress_statistics is None else compress_statistics
            if not isinstance(self.compress_statistics, bool):
                raise ValueError(f"QKernelsConfig: compress_statistics must be a bool; got "
                                 f"{compress_statistics!r}")
            self.blocksize = 64 if blocksize is None else blocksize
            self.quant_storage = _dtype("quant_storage", quant_storage) or torch.uint8
            try:   # the layer's own argument checks, on a layer that holds no memory
                Linear4bit(64, 64, False, device="meta", **self.layer_options())
            except (TypeError, ValueError) as e:
                raise ValueError(f"QKernelsConfig(kind={kind!r}): {e}") from e

    # -- what the layers get -------------------------------------------------------------
    @property
    def storage_kind(self) -> str:
        """What the checkpoint bytes are: "nf4", "fp4" or "int8"."""
        return self.kind

    def layer_options(self) -> dict:
        """Keyword arguments of the layer (Linear4bit or Linear8bitLt) for this kind."""
        if self.kind == "int8":
            return {"threshold": self.threshold, "has_fp16_weights": False}
        return {"quant_type": self.kind, "compute_dtype": self.compute_dtype,
                "compress_statistics": self.compress_statistics, "blocksize": self.blocksize,
                "quant_storage": self.quant_storage}

    def replace_kind(self) -> str:
        """The ``replace_linear`` kind."""
        return self.kind

    # -- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"quant_method": QUANT_METHOD, "kind": self.kind, "skip": copy.deepcopy(self.skip)}
        for k in _OPTIONS[self.kind]:
            v = getattr(self, k)
            d[k] = _dtype_name(v) if isinstance(v, torch.dtype) else v
        return d

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __eq__(self, other):
        return isinstance(other, QKernelsConfig) and self.to_dict() == other.to_dict()

    def __deepcopy__(self, memo):
        new = QKernelsConfig(**self.to_dict())
        new._user_set = set(self._user_set)
        return new

    # -- a checkpoint that is already quantized ---------------------------------------------
    def merged_with_checkpoint(self, checkpoint) -> "QKernelsConfig":
        """The config to load a quantized checkpoint with: the checkpoint's kind and skip list
        (they describe its tensors), and the runtime options (compute_dtype, threshold) this
        config set explicitly, else the checkpoint's. ``checkpoint``: its quantization_config
        (a dict from config.json, a QKernelsConfig or a BitsAndBytesConfig). Raises a
        ValueError naming both kinds if they differ."""
        ckpt = _checkpoint_config(checkpoint)
        if ckpt.storage_kind != self.storage_kind:
            raise ValueError(
                f"the checkpoint is quantized as {ckpt.storage_kind!r} ({_describe(checkpoint)}) but "
                f"from_pretrained was given QKernelsConfig(kind={self.kind!r}); a quantized checkpoint "
                f"is never re-quantized: pass QKernelsConfig(kind={ckpt.storage_kind!r}), or load the "
                f"float model and quantize that")
        for k in _STORAGE_OPTIONS:   # they describe the bytes too: set explicitly, they must agree
            if k in self._user_set and getattr(self, k) != getattr(ckpt, k):
                raise ValueError(
                    f"the checkpoint is quantized with {k}={_shown(getattr(ckpt, k))} ({_describe(checkpoint)}) "
                    f"but from_pretrained was given QKernelsConfig({k}={_shown(getattr(self, k))}); a quantized "
                    f"checkpoint is never re-quantized: leave {k} out")
        merged = copy.deepcopy(ckpt)
        for k in _RUNTIME_OPTIONS:
            if k in self._user_set:
                setattr(merged, k, getattr(self, k))
        return merged


def _skip_list(skip):
    """replace_linear's skip check (a name or names), as the config's list; None stays None."""
    if skip is None:
        return None
    from .replace import _skip_names
    try:
        return list(_skip_names(skip))
    except TypeError:
        raise ValueError(f"QKernelsConfig: skip must be None, a module name or a list of module names; "
                         f"got {skip!r}") from None


def _shown(value):
    return _dtype_name(value) if isinstance(value, torch.dtype) else value


def _describe(checkpoint) -> str:
    d = checkpoint if isinstance(checkpoint, dict) else checkpoint.to_dict()
    return f"quant_method {str(d.get('quant_method')).removeprefix('QuantizationMethod.')!r}"


def _checkpoint_config(checkpoint) -> QKernelsConfig:
    """A checkpoint's quantization_config as a QKernelsConfig (bitsandbytes' translated)."""
    if isinstance(checkpoint, QKernelsConfig):
        return checkpoint
    d = dict(checkpoint if isinstance(checkpoint, dict) else checkpoint.to_dict())
    method = getattr(d.get("quant_method"), "value", d.get("quant_method"))
    if method == QUANT_METHOD:
        return QKernelsConfig.from_dict(d)
    if method == "bitsandbytes" or d.get("load_in_4bit") or d.get("load_in_8bit"):
        skip = d.get("llm_int8_skip_modules")
        if d.get("load_in_4bit") or d.get("_load_in_4bit"):
            return QKernelsConfig(kind=d.get("bnb_4bit_quant_type", "fp4"), skip=skip,
                                  compute_dtype=d.get("bnb_4bit_compute_dtype"),
                                  compress_statistics=bool(d.get("bnb_4bit_use_double_quant", False)),
                                  quant_storage=d.get("bnb_4bit_quant_storage"))
        return QKernelsConfig(kind="int8", skip=skip, threshold=float(d.get("llm_int8_threshold", 6.0)))
    raise ValueError(f"the checkpoint is quantized with quant_method {method!r}; QKernelsConfig loads "
                     f"float checkpoints and checkpoints quantized by qkernels or bitsandbytes")


def _install_merge_hook() -> None:
    """Make from_pretrained hand a QKernelsConfig both configs (module docstring)."""
    original = AutoHfQuantizer.__dict__["merge_quantization_configs"]
    if getattr(original, "_qkernels", False):
        return

    def merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, QKernelsConfig):
            return quantization_config_from_args.merged_with_checkpoint(quantization_config)
        return original.__func__(cls, quantization_config, quantization_config_from_args)

    merge_quantization_configs._qkernels = True
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge_quantization_configs)


_install_merge_hook()


# --- host memory while quantizing ------------------------------------------------------------

class _CheckpointPages:
    """Gives back the host pages of each float weight once it has been quantized.

    transformers maps every safetensors shard of the checkpoint into memory and reads each
    tensor through that mapping (a CPU tensor is a view of it; a GPU tensor is copied from
    it). The pages read stay resident, and counted in the process's RSS, until the shard is
    unmapped, which is after the whole load (or never, while any float parameter still
    views it): without this, host RSS grows by the whole checkpoint. After a weight is
    quantized its float bytes are not needed again, so the pages that lie wholly inside its
    byte range are dropped with ``madvise(MADV_DONTNEED)``. That is safe because nothing else
    lives in those pages and nothing wrote to them: a later read would fault the file's
    bytes back in. Linux only; anywhere else, or for a tensor we cannot place in a mapped
    ``.safetensors`` file, it does nothing."""

    _MADV_DONTNEED = 4

    def __init__(self, checkpoint_files, prefix: str = ""):
        import sys
        self.ranges = {}   # checkpoint key -> (path, first byte, end byte) in the file
        self.prefix = prefix
        self.enabled = sys.platform.startswith("linux")
        self._madvise = None
        if not self.enabled:
            return
        import json
        import os
        import struct
        for path in checkpoint_files or ():
            if not str(path).endswith(".safetensors"):
                continue
            try:
                with open(path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(n))
            except (OSError, ValueError, struct.error):
                continue
            real = os.path.realpath(path)
            for key, meta in header.items():
                if key != "__metadata__":
                    s, e = meta["data_offsets"]
                    self.ranges[key] = (real, 8 + n + s, 8 + n + e)

    def _mappings(self):
        """(start, end, file offset, path, writable) of every file mapping of this process."""
        out = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or not parts[5].strip().endswith(".safetensors"):
                    continue
                lo, hi = (int(a, 16) for a in parts[0].split("-"))
                out.append((lo, hi, int(parts[2], 16), parts[5].strip()))
        return out

    def _advise(self, lo: int, hi: int) -> None:
        import mmap
        page = mmap.PAGESIZE
        lo, hi = -(-lo // page) * page, hi // page * page   # whole pages inside [lo, hi) only
        if hi <= lo:
            return
        if self._madvise is None:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            self._madvise = libc.madvise
        self._madvise(lo, hi - lo, self._MADV_DONTNEED)

    def release(self, key: str, value: torch.Tensor) -> None:
        """Drop the pages that held checkpoint tensor ``key`` (the model's name for it) or
        that ``value`` (a CPU view of the mapping) occupies."""
        if not self.enabled:
            return
        try:
            maps = self._mappings()
            if not maps:
                return
            if value.device.type == "cpu":
                ptr = value.data_ptr()
                end = ptr + value.numel() * value.element_size()
                for lo, hi, _, _ in maps:
                    if lo <= ptr and end <= hi:
                        self._advise(ptr, end)
                        return
            found = self.ranges.get(key) or self.ranges.get(self.prefix + key) or \
                self.ranges.get(key.removeprefix(self.prefix))
            if found is None:
                return
            path, s, e = found
            for lo, hi, off, mpath in maps:
                if mpath == path and off <= s and e - off <= hi - lo:
                    self._advise(lo + s - off, lo + e - off)
                    return
        except (OSError, ValueError, AttributeError):
            return


# --- loading operations ----------------------------------------------------------------------

class _Op:
    """Base of our conversion operations (transformers' ConversionOps protocol: ``convert``
    maps {name: [tensor]} to {name: tensor}). Having ``hf_quantizer`` tells transformers not
    to cast what we receive (packed bytes stay bytes)."""
    supports_many_to_many = False

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    @staticmethod
    def _first(value):
        return value[0] if isinstance(value, list) else value


class QKernelsQuantize(_Op):
    """Quantize one float weight as soon as it is read, on the device it was read to."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        out = {}
        for name, value in input_dict.items():
            value = self._first(value)
            module, _ = get_module_from_name(model, name)
            old = module.weight
            if isinstance(module, Linear4bit):
                new = old._rewrap(value, quant_state=None, bnb_quantized=False).to(value.device)
            else:
                new = old._rewrap(value, CB=None, SCB=None).to(value.device)
            module._plan = None
            module._is_hf_initialized = True
            out[name] = new
            pages = getattr(self.hf_quantizer, "checkpoint_pages", None)
            if pages is not None:
                pages.release(name, value)
        return out


class QKernelsDeserialize(_Op):
    """Rebuild a quantized weight from its checkpoint tensors (``weight`` and the QuantState or
    SCB keys), validated by the layer's own state_dict loader (kind, shape, keys)."""

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        values = {k: self._first(v) for k, v in input_dict.items()}
        module, pname = get_module_from_name(model, full_layer_name)
        if not isinstance(module, _QUANTIZED):   # a float "weight" the pattern also matched
            ref = getattr(module, pname, None)
            w = values["weight"]
            if isinstance(ref, torch.Tensor) and ref.is_floating_point() and w.is_floating_point():
                w = w.to(ref.dtype)
            return {"weight": w}
        report = LoadReport(full_layer_name[: -len(pname)])
        if isinstance(module, Linear8bitLt):
            _check_weight_format(values.get("weight_format"), report.prefix)
        new = module._checked_weight(values, report)
        problems = report.errors + [f"{report.prefix}{k}: missing" for k in report.missing]
        if problems or new is None:
            raise ValueError("; ".join(problems) or f"{full_layer_name}: nothing to load")
        if not isinstance(new, nn.Parameter):   # a float weight: quantize it as configured
            return QKernelsQuantize(self.hf_quantizer).convert({full_layer_name: new}, model=model)
        module._plan = None
        module._is_hf_initialized = True
        return {"weight": new}


_FOURBIT_KEYS = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
                 "weight.quant_state.bitsandbytes__fp4"]
_INT8_KEYS = ["weight", "SCB", "weight_format"]


@register_quantizer(QUANT_METHOD)
class QKernelsHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``QKernelsConfig`` (module docstring)."""

    requires_calibration = False
    quantization_config: QKernelsConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert = []
        self.checkpoint_pages = None

    @property
    def serialized_names(self) -> dict:
        return {"weight": _INT8_KEYS if self.quantization_config.kind == "int8" else _FOURBIT_KEYS}

    @property
    def quantized_element_size(self) -> float:
        return 1.0 if self.quantization_config.kind == "int8" else 0.5

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("QKernelsConfig: offloading quantized layers to disk is not supported; give "
                             "a device_map without 'disk' (or more max_memory)")

    def update_device_map(self, device_map):
        if device_map is None and torch.cuda.is_available():
            device_map = {"": torch.cuda.current_device()}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, _QUANTIZED) and name == "weight"

    def get_quantize_ops(self):
        return QKernelsQuantize(self)

    def get_load_operations(self) -> dict:
        return {"deserialize": QKernelsDeserialize}

    def _process_model_before_weight_loading(self, model, device_map=None, checkpoint_files=None, **kwargs):
        from .replace import replace_linear
        cfg = self.quantization_config
        if not self.pre_quantized:
            prefix = getattr(model, "base_model_prefix", "") or ""
            self.checkpoint_pages = _CheckpointPages(checkpoint_files, prefix + "." if prefix else "")
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.skip, getattr(model, "_keep_in_fp32_modules", None))
        keep = [n for n, m in model.named_modules()
                if type(m) is nn.Linear and not should_convert_module(n, self.modules_to_not_convert)]
        replace_linear(model, cfg.replace_kind(), skip=keep, verbose=False, progress=False,
                       **cfg.layer_options())
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.checkpoint_pages = None
        if importlib.util.find_spec("peft") is not None:
            try:   # registers our LoRA layers with PEFT, for get_peft_model on this model
                from . import peft_lora as _peft  # noqa: F401
            except ImportError:   # a peft this integration cannot use: only PEFT is affected
                pass
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True   # adapters (PEFT LoRA, torch_ops.add_lora) train on top

    def _dequantize(self, model, dtype=None):
        from .lora import dequantized_weight
        for name, module in list(model.named_modules()):
            if not isinstance(module, _QUANTIZED):
                continue
            w = dequantized_weight(module)
            lin = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                            device=w.device, dtype=dtype or w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w)
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, lin)
        return model
