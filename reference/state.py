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
        prefix (``weight.absmax``). Unknown keys are rejected."""
        d = dict(qs_dict)
        packed_keys = [k for k in d if "quant_state" in k.split(".")]
        if packed_keys:
            if len(packed_keys) != 1:
                raise ValueError(f"expected exactly one packed quant_state key; got {packed_keys}")
            key = packed_keys[0]
            qtype = key.rsplit("bitsandbytes__", 1)[-1] if "bitsandbytes__" in key else None
            if qtype not in _QUANT_TYPES:
                raise ValueError(f"packed key {key!r} must end in 'quant_state.bitsandbytes__nf4' "
                                 "or '__fp4'")
            record = json.loads(bytes(_host(d.pop(key)).astype(np.uint8).tolist()).decode("utf-8"))
            d.update(record)
        elif "quant_type" not in {k.split(".")[-1] for k in d}:
            raise ValueError("expected a packed 'quant_state.bitsandbytes__*' item or an unpacked "
                             "'quant_type' item; found neither")
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = set(d) - _VALID_KEYS
        if unknown:
            raise ValueError(f"unknown QuantState keys {sorted(unknown)}; valid: {sorted(_VALID_KEYS)}")
        missing = {"absmax", "quant_map", "blocksize", "dtype"} - set(d)
        if missing:
            raise ValueError(f"QuantState dict is missing {sorted(missing)}")
        state2 = offset = None
        if "nested_absmax" in d:
            state2 = cls(absmax=d["nested_absmax"], code=d["nested_quant_map"],
                         blocksize=int(d["nested_blocksize"]), dtype=d["nested_dtype"])
            offset = float(d["nested_offset"])
        shape = d.get("shape")
        return cls(absmax=d["absmax"], shape=tuple(shape) if shape is not None else None,
                   code=d["quant_map"], dtype=str(d["dtype"]).replace("torch.", ""),
                   blocksize=int(d["blocksize"]), quant_type=d.get("quant_type"),
                   offset=offset, state2=state2)
