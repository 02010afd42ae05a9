"""QuantState: everything needed to dequantize, and its dict format (SPEC.md section 3).

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

__all__ = ["QuantState"]

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


def _host(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch
        array = array.detach().cpu().numpy()
    elif hasattr(array, "get") and not isinstance(array, np.ndarray):  # cupy
        array = array.get()
    return np.asarray(array)


@dataclasses.dataclass(eq=False)
class QuantState:
    """State of a blockwise (8-bit) or 4-bit quantization.

    absmax:     float32 (nblocks,) block scales; uint8 codes when nested (then see state2)
    shape:      shape of the original tensor (tuple), or None for 8-bit states
    code:       float32 codebook (256 or 16 values)
    dtype:      name of the original dtype: "float16", "bfloat16" or "float32"
    blocksize:  elements per block
    quant_type: "nf4", "fp4", or None for 8-bit blockwise
    offset:     mean of the absmax vector when nested (float), else None
    state2:     the nested QuantState of the absmax vector, or None
    """

    absmax: Any
    shape: tuple | None = None
    code: Any = None
    dtype: str = "float32"
    blocksize: int = 4096
    quant_type: str | None = None
    offset: float | None = None
    state2: "QuantState | None" = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def as_dict(self, packed: bool = False) -> dict:
        """bitsandbytes' dict. ``packed=True`` keeps the arrays and packs everything else into
        one uint8 array under ``quant_state.bitsandbytes__<quant_type>`` (4-bit states only;
        an 8-bit state returns the unpacked dict)."""
        d = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": int(self.blocksize),
            "quant_map": self.code,
            "dtype": self.dtype,
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": int(self.state2.blocksize),
                "nested_quant_map": self.state2.code,
                "nested_dtype": self.state2.dtype,
                "nested_offset": float(self.offset),
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
    def from_dict(cls, qs_dict: dict) -> "QuantState":
        """Rebuild a state from ``as_dict`` output, packed or not, keys with or without a
        prefix (``weight.absmax``), values from NumPy, torch or CuPy.

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
        return cls(absmax=d["absmax"], shape=_as_shape(d.get("shape"), full.get("shape")),
                   code=d["quant_map"], dtype=_as_dtype_name(d["dtype"], full["dtype"]),
                   blocksize=_as_int(d["blocksize"], full["blocksize"]),
                   quant_type=_as_quant_type(d.get("quant_type"), full.get("quant_type")),
                   offset=offset, state2=state2)


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
        record = json.loads(bytes(_host(raw).astype(np.uint8).reshape(-1).tolist()).decode("utf-8"))
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
        v = _host(v).reshape(-1)[0].item()
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
