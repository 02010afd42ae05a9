"""QuantState: everything needed to dequantize, and its dict format (docs/FORMATS.md §3).

A QuantState holds arrays of whatever kind produced it (NumPy here; CuPy or torch when
qkernels or torch_ops made it): the reference never converts them. ``as_dict`` /
``from_dict`` use bitsandbytes' key names and packed JSON record, so a state written by
either library loads in the other.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["QuantState", "as_quant_state", "is_quant_state_like"]

_PACKED_PREFIX = "quant_state.bitsandbytes__"
_QUANT_TYPES = ("nf4", "fp4")
_VALID_KEYS = {
    "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state",
    "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
    "nested_offset",
}


def _like(template, values: np.ndarray):
    """``values`` as an array of ``template``'s library (numpy or torch) and device."""
    module = sys.modules.get(type(template).__module__.split(".")[0])
    if isinstance(template, np.ndarray) or module is None:
        return values
    if hasattr(module, "from_numpy"):  # torch
        return module.from_numpy(values).to(template.device)
    if hasattr(module, "asarray"):  # cupy
        return module.asarray(values)
    return values


def host_array(array) -> np.ndarray:
    """A host NumPy copy (or view) of a NumPy, torch, CuPy or Numba device array, or of a
    number; duck-typed, so this module imports none of those libraries."""
    if hasattr(array, "detach"):  # torch
        array = array.detach().cpu().numpy()
    elif hasattr(array, "get") and not isinstance(array, np.ndarray):  # cupy
        array = array.get()
    elif hasattr(array, "copy_to_host"):  # numba device array
        array = array.copy_to_host()
    return np.asarray(array)


@dataclasses.dataclass(eq=False)
class QuantState:
    """State of a blockwise (8-bit) or 4-bit quantization; bitsandbytes' QuantState.

    absmax:     float32 (nblocks,) block scales; uint8 codes when nested (then see state2)
    shape:      shape of the original tensor (tuple), or None for 8-bit states
    code:       float32 codebook (256 or 16 values)
    blocksize:  elements per block
    quant_type: "nf4", "fp4", or None for 8-bit blockwise
    dtype:      the original dtype. Stored as its name ("float16", "bfloat16", "float32"; a
                NumPy or torch dtype given here is reduced to its name); read back as a
                ``torch.dtype`` when absmax is a torch tensor (as bitsandbytes' QuantState,
                whose users pass it to torch), else as the name.
    offset:     mean of the absmax vector when nested (float, or a one-element array), else None
    state2:     the nested QuantState of the absmax vector, or None

    The constructor's positional order is bitsandbytes' (absmax, shape, code, blocksize,
    quant_type, dtype, offset, state2). ``==`` compares contents as bitsandbytes does
    (arrays within atol 1e-6); a state still hashes by identity, so it can key a cache.
    ``state[i]`` / iteration give bitsandbytes' legacy list layout.
    """

    absmax: Any
    shape: tuple | None = None
    code: Any = None
    blocksize: int = 4096
    quant_type: str | None = None
    dtype: Any = "float32"
    offset: Any = None
    state2: "QuantState | None" = None

    valid_quant_types = _QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{t}" for t in _QUANT_TYPES]
    valid_qs_keys = sorted(_VALID_KEYS)

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    __hash__ = object.__hash__

    def __eq__(self, other):
        """Contents equal (bitsandbytes' rule): absmax and code within atol 1e-6, the same
        shape (where both have one), dtype, blocksize, quant_type and offset, nested states
        equal. ``other`` may be bitsandbytes' QuantState."""
        if not is_quant_state_like(other):
            return NotImplemented
        other = as_quant_state(other, "other")
        return (_arrays_close(self.absmax, other.absmax) and _arrays_close(self.code, other.code)
                and _shapes_equal(self.shape, other.shape)
                and _dtype_name(self.dtype) == _dtype_name(other.dtype)
                and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                and _offsets_equal(self.offset, other.offset)
                and (self.state2 == other.state2 if self.nested and other.nested
                     else self.state2 is None and other.state2 is None))

    def __getitem__(self, idx):
        """bitsandbytes' legacy list layout: [absmax, shape, dtype, blocksize,
        [offset, state2] or None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    def __getattr__(self, name):
        # FSDP's state_dict traversal resolves the packed key "quant_state.bitsandbytes__nf4"
        # as getattr(state, "bitsandbytes__nf4")
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            if "quant_state." + name in packed:
                return packed["quant_state." + name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to(self, device) -> "QuantState":
        """Move the arrays (absmax, code, an array offset, the nested state's) to ``device``, in
        place, as bitsandbytes does; returns the state. torch tensors move with ``.to``; NumPy
        arrays stay on the host for a CPU device and become torch tensors otherwise."""
        self.absmax = _move(self.absmax, device, "absmax")
        self.code = _move(self.code, device, "code")
        if _is_array(self.offset):
            self.offset = _move(self.offset, device, "offset")
        if self.state2 is not None:
            self.state2.to(device)
        return self

    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' dict. ``packed=True`` keeps the arrays and packs everything else into
        one uint8 array under ``quant_state.bitsandbytes__<quant_type>`` (4-bit states only;
        an 8-bit state returns the unpacked dict). The codebooks are copies: many states
        share one codebook array, and safetensors refuses (or drops) tensors that share
        memory in one state_dict."""
        d = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": int(self.blocksize),
            "quant_map": _copy(self.code),
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(int(s) for s in self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": int(self.state2.blocksize),
                "nested_quant_map": _copy(self.state2.code),
                "nested_dtype": _dtype_name(self.state2.dtype),
                "nested_offset": _as_float(self.offset, "offset"),
            })
        if not packed or self.quant_type is None:
            return d
        record = {k: d[k] for k in ("quant_type", "blocksize", "dtype", "shape")}
        record["shape"] = list(record["shape"])
        if self.nested:
            for k in ("nested_blocksize", "nested_dtype", "nested_offset"):
                record[k] = d[k]
        arrays = {k: v for k, v in d.items() if k not in record and k != "shape"}
        raw = np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8).copy()
        arrays[_PACKED_PREFIX + self.quant_type] = _like(self.absmax, raw)
        return arrays

    @classmethod
    def from_dict(cls, qs_dict: dict, device=None) -> "QuantState":
        """Rebuild a state from ``as_dict`` output, packed or not, keys with or without a
        prefix (``weight.absmax``), values from NumPy, torch or CuPy; then, if ``device`` is
        given (bitsandbytes' second argument), move it there as ``to`` does. ``qs_dict`` is
        not modified.

        Arrays (``absmax``, ``quant_map``, ``nested_absmax``, ``nested_quant_map``, the packed
        uint8 record) must be arrays; ``blocksize``/``nested_blocksize`` integers (or integer
        0-d tensors), ``shape`` a list/tuple of integers or None, ``dtype``/``nested_dtype`` a
        dtype name or dtype, ``nested_offset`` a number, ``quant_type`` "nf4", "fp4" or None.
        Unknown keys, a partial nested group and anything else raise a ValueError/TypeError
        naming the key."""
        d = _checked_keys(qs_dict)
        packed_keys = [k for k in d if "quant_state" in k.split(".")]
        if packed_keys:
            if len(packed_keys) != 1:
                raise ValueError(f"expected exactly one packed quant_state key; got {packed_keys}")
            key = packed_keys[0]
            qtype = key.rsplit("bitsandbytes__", 1)[-1] if "bitsandbytes__" in key else None
            if qtype not in _QUANT_TYPES:
                raise ValueError(f"packed key {key!r} must end in 'quant_state.bitsandbytes__nf4' "
                                 "or '__fp4'")
            d.update(_packed_record(d.pop(key), key))
        elif "quant_type" not in {k.split(".")[-1] for k in d}:
            raise ValueError("expected a packed 'quant_state.bitsandbytes__*' item or an unpacked "
                             "'quant_type' item; found neither")
        full = {}                                   # short name -> the key as given
        for k in d:
            short = k.split(".")[-1]
            if short in full:
                raise ValueError(f"keys {full[short]!r} and {k!r} both give {short!r}")
            full[short] = k
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = set(d) - _VALID_KEYS
        if unknown:
            raise ValueError(f"unknown QuantState keys {sorted(unknown)}; valid: {sorted(_VALID_KEYS)}")
        missing = {"absmax", "quant_map", "blocksize", "dtype"} - set(d)
        if missing:
            raise ValueError(f"QuantState dict is missing {sorted(missing)}")
        nested = [k for k in _NESTED_KEYS if k in d]
        if nested and len(nested) != len(_NESTED_KEYS):
            raise ValueError(f"a nested QuantState dict needs all of {list(_NESTED_KEYS)}; "
                             f"missing {sorted(set(_NESTED_KEYS) - set(nested))}")
        for k in _ARRAY_KEYS:
            if k in d:
                _check_array(d[k], full[k])
        state2 = offset = None
        if nested:
            state2 = cls(absmax=d["nested_absmax"], code=d["nested_quant_map"],
                         blocksize=_as_int(d["nested_blocksize"], full["nested_blocksize"]),
                         dtype=_as_dtype_name(d["nested_dtype"], full["nested_dtype"]))
            offset = _as_float(d["nested_offset"], full["nested_offset"])
        state = cls(absmax=d["absmax"], shape=_as_shape(d.get("shape"), full.get("shape")),
                    code=d["quant_map"], dtype=_as_dtype_name(d["dtype"], full["dtype"]),
                    blocksize=_as_int(d["blocksize"], full["blocksize"]),
                    quant_type=_as_quant_type(d.get("quant_type"), full.get("quant_type")),
                    offset=offset, state2=state2)
        return state if device is None else state.to(device)


def _get_dtype(self):
    name = self.__dict__.get("dtype")
    torch = _torch_of(self.__dict__.get("absmax"))
    if torch is not None and isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return name


def _set_dtype(self, value) -> None:
    self.__dict__["dtype"] = None if value is None else _dtype_name(value)


# The field keeps its default and its place in __init__; reads and writes go through these
# (the name lives in the instance __dict__, so vars(state) and dataclasses.replace still work).
QuantState.dtype = property(_get_dtype, _set_dtype, doc="the original dtype (see the class doc)")


# --- bitsandbytes' QuantState and ours, duck-typed (no import of bitsandbytes or torch) ------

_STATE_ATTRS = ("absmax", "code", "blocksize", "dtype", "quant_type", "offset", "state2", "shape")


def is_quant_state_like(obj) -> bool:
    """Our QuantState, or an object with QuantState's attributes and ``as_dict`` (bitsandbytes')."""
    return isinstance(obj, QuantState) or (
        callable(getattr(type(obj), "as_dict", None)) and all(hasattr(obj, a) for a in _STATE_ATTRS))


def as_quant_state(obj, argname: str = "state") -> QuantState:
    """``obj`` itself if it is our QuantState; a QuantState over the same arrays if it is
    bitsandbytes' (or any object with its attributes: absmax, shape, code, blocksize,
    quant_type, dtype, offset, state2); a TypeError naming ``argname`` otherwise."""
    if isinstance(obj, QuantState):
        return obj
    if not is_quant_state_like(obj):
        raise TypeError(f"{argname} must be a QuantState; got {type(obj).__name__}")
    s2 = obj.state2
    return QuantState(absmax=obj.absmax, shape=None if obj.shape is None else tuple(obj.shape),
                      code=obj.code, blocksize=obj.blocksize, quant_type=obj.quant_type,
                      dtype=obj.dtype, offset=obj.offset,
                      state2=None if s2 is None else as_quant_state(s2, f"{argname}.state2"))


def _torch_of(x):
    """The torch module if ``x`` is a torch tensor (torch already imported), else None."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def _dtype_name(dtype) -> str | None:
    """"float16", "bfloat16", ... for a name, a NumPy dtype/type or a torch dtype."""
    if dtype is None or isinstance(dtype, str):
        return None if dtype is None else dtype.replace("torch.", "")
    if isinstance(dtype, np.dtype) or isinstance(dtype, type):
        try:
            return np.dtype(dtype).name
        except TypeError:
            pass
    return str(dtype).replace("torch.", "")


def _shapes_equal(a, b) -> bool:
    """Equal shapes; an 8-bit state may carry none (bitsandbytes' never does: the codes have it)."""
    if a is None or b is None:
        return True
    return tuple(int(s) for s in a) == tuple(int(s) for s in b)


def _arrays_close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = host_array(a), host_array(b)
    if a.shape != b.shape:
        return False
    return bool(np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=1e-5, atol=1e-6))


def _offsets_equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return _as_float(a, "offset") == _as_float(b, "offset")


def _copy(array):
    """A copy of an array of any kind (torch ``clone``, NumPy/CuPy ``copy``); None stays None."""
    if array is None:
        return None
    return array.clone() if hasattr(array, "clone") else array.copy()


def _move(array, device, what: str):
    if array is None:
        return None
    if hasattr(array, "to") and not isinstance(array, np.ndarray):
        return array.to(device)
    if isinstance(array, np.ndarray):
        if str(device).split(":")[0] == "cpu":
            return array
        torch = sys.modules.get("torch")
        if torch is not None:
            return torch.from_numpy(np.ascontiguousarray(array)).to(device)
    raise TypeError(f"cannot move the state's {what} ({type(array).__name__}) to {device!r}; "
                    "to() moves torch tensors, and NumPy arrays to a torch device")


# --- from_dict's value checks: each names the key as the caller wrote it ---------------------

_ARRAY_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_NESTED_KEYS = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype",
                "nested_offset")


def _checked_keys(qs_dict) -> dict:
    """A copy of ``qs_dict`` after checking that it is a mapping with str keys."""
    if not isinstance(qs_dict, Mapping):
        raise TypeError("qs_dict must be a dict (QuantState.as_dict() output or a module's "
                        f"state_dict items); got {type(qs_dict).__name__}")
    for k in qs_dict:
        if not isinstance(k, str):
            raise TypeError(f"qs_dict keys must be str; got {type(k).__name__} {k!r}")
    return dict(qs_dict)


def _is_array(v) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype") and not isinstance(v, (str, bytes))


def _check_array(v, key: str) -> None:
    if not _is_array(v):
        raise TypeError(f"{key!r} must be an array (NumPy, torch or CuPy); got {type(v).__name__}")


def _packed_record(raw, key: str) -> dict:
    """The dict packed as UTF-8 JSON bytes in the uint8 array ``raw``."""
    _check_array(raw, key)
    what = f"{key!r} must hold the UTF-8 JSON record of bitsandbytes' packed QuantState"
    try:
        record = json.loads(bytes(host_array(raw).astype(np.uint8).reshape(-1).tolist()).decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{what}: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{what}; got a JSON {type(record).__name__}, not an object")
    return record


def _scalar(v, key: str, kind: str):
    """A Python scalar from a number or a one-element array (a 0-d tensor); TypeError else."""
    if _is_array(v):
        if int(np.prod(v.shape)) != 1:
            raise TypeError(f"{key!r} must be {kind}; got an array of shape {tuple(v.shape)}")
        v = host_array(v).reshape(-1)[0].item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{key!r} must be {kind}; got {type(v).__name__}")
    return v


def _as_int(v, key: str) -> int:
    v = _scalar(v, key, "an integer")
    if not float(v).is_integer():
        raise TypeError(f"{key!r} must be an integer; got {type(v).__name__} {v!r}")
    return int(v)


def _as_float(v, key: str) -> float:
    return float(_scalar(v, key, "a number"))


def _as_shape(v, key: str | None) -> tuple | None:
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"{key!r} must be a list or tuple of integers or None; "
                        f"got {type(v).__name__}")
    return tuple(_as_int(s, f"{key}[{i}]") for i, s in enumerate(v))


def _as_dtype_name(v, key: str) -> str:
    is_dtype = isinstance(v, np.dtype) or (type(v).__name__ == "dtype"
                                           and type(v).__module__.split(".")[0] == "torch")
    if not (isinstance(v, str) or is_dtype):
        raise TypeError(f"{key!r} must be a dtype name (e.g. 'bfloat16') or a NumPy/torch dtype; "
                        f"got {type(v).__name__}")
    return str(v).replace("torch.", "")


def _as_quant_type(v, key: str | None):
    if v is None or (isinstance(v, str) and v in _QUANT_TYPES):
        return v
    err = ValueError if isinstance(v, str) else TypeError
    raise err(f"{key!r} must be 'nf4', 'fp4' or None; got {v!r}")
