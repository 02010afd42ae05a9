"""4-bit weights that PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) can shard: QLoRA
under FSDP2.

    model = ...                         # Linear4bit layers, moved to their device (quantized)
    add_lora(model, rank=16)            # optional: LoRA adapters (torch_ops.lora)
    prepare_for_fsdp(model)             # every Linear4bit weight -> Shardable4bitWeight
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)

A ``Params4bit`` is a flat (ceil(out*in/2), 1) byte buffer with its QuantState in a Python
attribute: FSDP2 would shard and all-gather only the bytes, as a plain tensor, and leave the
state (absmax) behind, unsharded and detached from the gathered weight.
``Shardable4bitWeight`` is a tensor subclass with the weight's logical shape (out, in)
whose inner tensors are kept *row-major*:

    packed  uint8   (out, in / 2)          the bytes of Params4bit, unchanged: row r holds
                                           bytes [r*in/2, (r+1)*in/2) of the flat payload
                                           (element 2k in the high nibble, 2k+1 in the low)
    absmax  float32 (out, in / blocksize)  the per-block scales; row r holds blocks
                                           [r*in/bs, (r+1)*in/bs) of the flat absmax
    code    float32 (16,)                  the codebook (constant, never sharded)

With ``in % blocksize == 0`` no block (and, in is even, no byte) crosses a row, so any range
of rows is a self-contained 4-bit tensor: splitting dim 0 (FSDP2's ``torch.chunk``) splits
both inner tensors by rows, and all-gathering the two inner tensors rank after rank rebuilds
the whole weight. ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` are FSDP2's
extension hooks (torch/distributed/fsdp/_fully_shard/_fsdp_param.py).

Double quantization: a nested absmax (uint8 codes + a float32 state per 256 blocks + an
offset) does not split along rows (its blocks of 256 straddle row boundaries), so
conversion dequantizes it once to float32 -- the values every forward computes anyway --
costing 4 bytes instead of ~1 per block (about 0.13 -> 0.5 extra bits per weight at
blocksize 64). Forward results are unchanged: the scales are bit-identical.

CPU: the kernels there are NumPy, and ``Tensor.numpy()`` marks a storage non-resizable
for good, while FSDP2 frees gathered parameters by resizing their storage to 0; the forward
hands NumPy copies of the (small) packed bytes, scales and bias.

Limits: FSDP2 must shard out_features evenly (``out % shard world size == 0``; FSDP2's
all-gather extension cannot pad quantized rows, a ValueError says so); ``state_dict()`` of a
converted Linear4bit raises (the frozen base weights are saved before conversion; the
trained adapters are saved on their own).
"""
from __future__ import annotations

import torch
from torch import nn

from reference.state import QuantState
from ._checks import check_linear_input
from qkernels.fourbit.ops import matmul_4bit_op
from .linear4bit import Linear4bit, Params4bit, _fourbit
from ._layers import plain

__all__ = ["Shardable4bitWeight", "prepare_for_fsdp", "linear_forward"]

aten = torch.ops.aten
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def _rows_of(shape, in_features: int) -> int:
    """Rows described by a logical shape: (rows, in) or the flat (rows * in,)."""
    shape = tuple(shape)
    if len(shape) == 2 and shape[1] == in_features:
        return shape[0]
    if len(shape) == 1 and shape[0] % in_features == 0:
        return shape[0] // in_features
    raise NotImplementedError(f"Shardable4bitWeight: shape {shape} is not whole rows of "
                              f"{in_features} elements ((rows, {in_features}) or (rows*"
                              f"{in_features},))")


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, str(name).replace("torch.", ""))


def _float_absmax(state: QuantState) -> torch.Tensor:
    """The state's per-block scales as float32, the nested statistics dequantized exactly as
    dequantize_4bit does (code2[q] * absmax2[block] + float32(offset))."""
    if state.state2 is None:
        return state.absmax.to(torch.float32)
    from qkernels.blockwise import dequantize_blockwise
    s2 = state.state2
    inner = QuantState(absmax=s2.absmax, code=s2.code, dtype="float32", blocksize=s2.blocksize)
    a = dequantize_blockwise(state.absmax.reshape(-1), inner, out_dtype="float32")
    offset = torch.as_tensor(state.offset, dtype=torch.float32, device=a.device)
    return a + offset


class Shardable4bitWeight(torch.Tensor):
    """A frozen NF4/FP4 weight of logical shape (out, in) (or its flat view (out*in,)) and a
    float logical dtype, stored as row-major inner tensors (module docstring): ``packed``
    uint8 (rows, in/2), ``absmax`` float32 (rows, in/blocksize), ``code`` float32 (16,).

    Supported aten ops are those FSDP2 uses to shard and gather a parameter (split / chunk /
    slice / narrow along dim 0, new_zeros, copy_, view, identity as_strided, detach, clone,
    _to_copy, empty_like, pinning); any other op raises NotImplementedError naming it --
    compute with ``dequantize()`` (or through Linear4bit's forward) instead.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, packed, absmax, code, quant_type, blocksize, in_features, shape=None,
                dtype=torch.float32):
        bs, in_f = int(blocksize), int(in_features)
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4'; got {quant_type!r}")
        if in_f % 2 or in_f % bs:
            raise ValueError(f"in_features ({in_f}) must be even and a multiple of the blocksize "
                             f"({bs}) so that no byte or block crosses a row")
        if dtype not in _FLOAT:
            raise ValueError(f"the logical dtype must be float16, bfloat16 or float32; got {dtype}")
        rows = packed.shape[0] if packed.dim() == 2 else -1
        if (packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, in_f // 2)
                or absmax.dtype != torch.float32 or tuple(absmax.shape) != (rows, in_f // bs)
                or code.dtype != torch.float32 or tuple(code.shape) != (16,)):
            raise ValueError(
                f"expected packed uint8 (rows, {in_f // 2}), absmax float32 (rows, {in_f // bs}) "
                f"and code float32 (16,); got {packed.dtype} {tuple(packed.shape)}, "
                f"{absmax.dtype} {tuple(absmax.shape)}, {code.dtype} {tuple(code.shape)}")
        shape = (rows, in_f) if shape is None else tuple(shape)
        if _rows_of(shape, in_f) != rows:
            raise ValueError(f"logical shape {shape} does not hold {rows} rows of {in_f}")
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device,
                                                   requires_grad=False)
        self.packed, self.absmax, self.code = packed, absmax, code
        self.quant_type, self.blocksize, self.in_features = quant_type, bs, in_f
        return self

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_params4bit(cls, weight: Params4bit, dtype: torch.dtype | None = None):
        """The same quantized weight, re-laid out by rows. ``weight``: a quantized Params4bit
        of shape (out, in) (any quant_storage, nested or not); ``dtype``: the logical dtype
        (default: the original weight's dtype). The payload bytes are shared, not copied."""
        if not isinstance(weight, Params4bit) or not weight.bnb_quantized:
            raise ValueError("from_params4bit needs a quantized Params4bit (move the layer to its "
                             "device first: that quantizes it)")
        state = weight.synced_state()
        if state.shape is None or len(state.shape) != 2:
            raise ValueError(f"expected a 2-D (out, in) weight; got shape {state.shape}")
        out_f, in_f = (int(s) for s in state.shape)
        bs = int(state.blocksize)
        if in_f % 2 or in_f % bs:
            raise ValueError(f"cannot shard a 4-bit weight by rows: in_features ({in_f}) must be "
                             f"even and a multiple of the blocksize ({bs})")
        raw = plain(weight).contiguous().view(torch.uint8).reshape(-1)
        packed = raw[: out_f * in_f // 2].view(out_f, in_f // 2)
        absmax = _float_absmax(state).reshape(out_f, in_f // bs)
        return cls(packed, absmax, state.code.to(torch.float32), state.quant_type, bs, in_f,
                   dtype=dtype or _torch_dtype(state.dtype))

    def _like(self, packed, absmax, shape=None, dtype=None, code=None):
        """A weight with this one's metadata over other inner tensors."""
        return Shardable4bitWeight(packed, absmax, self.code if code is None else code,
                                   self.quant_type, self.blocksize, self.in_features,
                                   shape=shape, dtype=dtype or self.dtype)

    # -- use -------------------------------------------------------------------------------------
    def layer_forward(self, layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
        """Linear4bit's forward with this weight (the layer asks its weight's type, so
        linear4bit does not import this module): ``linear_forward(layer, x)``."""
        return linear_forward(layer, x)

    def as_packed_state(self) -> tuple[torch.Tensor, QuantState]:
        """(packed uint8 (rows*in/2, 1), a plain QuantState with float32 absmax
        (rows*in/blocksize,)): Params4bit's layout, for qkernels.fourbit's functions. On the
        CPU these are copies (see below)."""
        packed, absmax = self.packed, self.absmax
        if packed.device.type == "cpu":
            # the CPU kernels are NumPy, and Tensor.numpy() marks a storage non-resizable for
            # good; FSDP2 frees its all-gathered storage with resize_(0), so give NumPy copies
            packed, absmax = packed.clone(), absmax.clone()
        state = QuantState(absmax=absmax.reshape(-1), shape=(packed.shape[0], self.in_features),
                           code=self.code, dtype=str(self.dtype).replace("torch.", ""),
                           blocksize=self.blocksize, quant_type=self.quant_type)
        return packed.reshape(-1, 1), state

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a plain tensor of this logical shape, in ``dtype`` (default: the
        logical dtype), computed in float32 and rounded once (qkernels.fourbit.dequantize_4bit)."""
        packed, state = self.as_packed_state()
        w = _fourbit().dequantize_4bit(packed, state, out_dtype=dtype or self.dtype)
        return w.reshape(self.shape)

    # -- FSDP2 all-gather extension ----------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """All-gather inputs: this shard's (packed, absmax); metadata: the constant rest."""
        world = mesh.size()
        if outer_size[0] % world:
            raise ValueError(f"FSDP2 shards a 4-bit weight only evenly: out_features "
                             f"({outer_size[0]}) must be a multiple of the shard world size "
                             f"({world})")
        return (self.packed, self.absmax), (self.code, self.quant_type, self.blocksize,
                                            self.in_features)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """Rebuild the unsharded weight from the gathered (packed (out, in/2), absmax (out,
        in/bs)): rank after rank, i.e. the rows in order. Returns (weight, the inner tensors
        FSDP frees after use and re-allocates before the next all-gather); with ``out`` (the
        weight built by an earlier call) fills it in place."""
        packed, absmax = all_gather_outputs
        code, quant_type, blocksize, in_features = metadata
        if out is not None:
            # FSDP re-allocates the same all-gather output storage, which out's inner tensors
            # already view; copy only if they are not those views
            for dst, src in ((out.packed, packed), (out.absmax, absmax)):
                if dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
                    dst.copy_(src)
            return None
        weight = Shardable4bitWeight(packed, absmax, code, quant_type, blocksize, in_features,
                                     dtype=param_dtype)
        return weight, (packed, absmax)

    # -- tensor subclass protocol --------------------------------------------------------------------
    def __tensor_flatten__(self):
        return ["packed", "absmax", "code"], (self.quant_type, self.blocksize, self.in_features,
                                              self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        quant_type, blocksize, in_features, dtype = meta
        return Shardable4bitWeight(inner["packed"], inner["absmax"], inner["code"], quant_type,
                                   blocksize, in_features, shape=outer_size, dtype=dtype)

    def __repr__(self):
        return (f"Shardable4bitWeight({self.quant_type}, shape={tuple(self.shape)}, "
                f"blocksize={self.blocksize}, dtype={self.dtype}, device={self.device})")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        impl = _OPS.get(func)
        if impl is None:
            raise NotImplementedError(
                f"Shardable4bitWeight does not support the aten op {func} (only what FSDP2 "
                "needs to shard and gather it); use weight.dequantize() for arithmetic")
        return impl(*args, **(kwargs or {}))


# --- aten ops -------------------------------------------------------------------------------------

_OPS = {}


def _implements(*ops):
    def register(fn):
        for op in ops:
            _OPS[op] = fn
        return fn
    return register


def _check_dim0(w: Shardable4bitWeight, dim: int, op: str) -> None:
    if w.dim() != 2 or dim not in (0, -2):
        raise NotImplementedError(f"Shardable4bitWeight: {op} only along dim 0 of the (out, in) "
                                  f"weight (whole rows); got dim={dim} on shape {tuple(w.shape)}")


@_implements(aten.detach.default, aten.alias.default)
def _alias(w):
    return w._like(w.packed, w.absmax, shape=w.shape)


@_implements(aten.split.Tensor)
def _split(w, split_size, dim=0):
    _check_dim0(w, dim, "split")
    return [w._like(p, a) for p, a in zip(w.packed.split(split_size), w.absmax.split(split_size))]


@_implements(aten.split_with_sizes.default)
def _split_with_sizes(w, split_sizes, dim=0):
    _check_dim0(w, dim, "split_with_sizes")
    return [w._like(p, a) for p, a in zip(w.packed.split(split_sizes), w.absmax.split(split_sizes))]


@_implements(aten.slice.Tensor)
def _slice(w, dim=0, start=None, end=None, step=1):
    if w.dim() == 2 and dim in (1, -1) and step == 1 and (start or 0) == 0 \
            and (end is None or end >= w.shape[1]):
        return _alias(w)  # the whole row: a no-op slice
    _check_dim0(w, dim, "slice")
    if step != 1:
        raise NotImplementedError(f"Shardable4bitWeight: slice with step {step}")
    return w._like(w.packed[start:end], w.absmax[start:end])


def _new_weight(w, size, make, dtype=None, device=None):
    """A weight of ``size`` (whole rows) whose inner tensors come from ``make(like, shape)``."""
    rows = _rows_of(size, w.in_features)
    if dtype is not None and dtype not in _FLOAT:
        raise NotImplementedError(f"Shardable4bitWeight: cannot create a {dtype} weight")
    device = w.device if device is None else torch.device(device)
    packed = make(w.packed, (rows, w.in_features // 2), device)
    absmax = make(w.absmax, (rows, w.in_features // w.blocksize), device)
    return w._like(packed, absmax, shape=size, dtype=dtype, code=w.code.to(device))


@_implements(aten.new_zeros.default)
def _new_zeros(w, size, dtype=None, layout=None, device=None, pin_memory=None):
    # zero codes with zero scales dequantize to (signed) zeros, as new_zeros promises
    return _new_weight(w, size, lambda t, s, d: t.new_zeros(s, device=d), dtype, device)


@_implements(aten.new_empty.default)
def _new_empty(w, size, dtype=None, layout=None, device=None, pin_memory=None):
    return _new_weight(w, size, lambda t, s, d: t.new_empty(s, device=d), dtype, device)


@_implements(aten.empty_like.default)
def _empty_like(w, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return _new_weight(w, w.shape, lambda t, s, d: torch.empty(s, dtype=t.dtype, device=d),
                       dtype, device)


@_implements(aten.copy_.default)
def _copy(dst, src, non_blocking=False):
    if not isinstance(src, Shardable4bitWeight):
        raise NotImplementedError("Shardable4bitWeight: copy_ from a plain tensor would need a "
                                  "re-quantization; copy only from another Shardable4bitWeight")
    if (tuple(src.shape) != tuple(dst.shape) or src.quant_type != dst.quant_type
            or src.blocksize != dst.blocksize or src.in_features != dst.in_features
            or not torch.equal(src.code.to(dst.code.device), dst.code)):
        raise ValueError(f"copy_ between different 4-bit formats: {src!r} -> {dst!r}")
    dst.packed.copy_(src.packed, non_blocking)
    dst.absmax.copy_(src.absmax, non_blocking)
    return dst


@_implements(aten.view.default)
def _view(w, size):
    size = list(size)
    if size.count(-1) == 1:
        known = 1
        for s in size:
            known *= s if s != -1 else 1
        size[size.index(-1)] = w.numel() // max(known, 1)
    if _rows_of(size, w.in_features) != w.packed.shape[0]:
        raise RuntimeError(f"Shardable4bitWeight: cannot view shape {tuple(w.shape)} as {size}")
    return w._like(w.packed, w.absmax, shape=size)


@_implements(aten.as_strided.default)
def _as_strided(w, size, stride, storage_offset=None):
    contiguous = [1] * len(size)
    for i in range(len(size) - 2, -1, -1):
        contiguous[i] = contiguous[i + 1] * size[i + 1]
    if list(size) != list(w.shape) or list(stride) != contiguous or (storage_offset or 0) != 0:
        raise NotImplementedError(f"Shardable4bitWeight: as_strided only as the identity; got "
                                  f"size {list(size)} stride {list(stride)} offset {storage_offset}")
    return _alias(w)


@_implements(aten.clone.default)
def _clone(w, memory_format=None):
    return w._like(w.packed.clone(), w.absmax.clone(), shape=w.shape, code=w.code.clone())


@_implements(aten._to_copy.default)
def _to_copy(w, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    """A move (the bytes and scales are copied as they are) and/or a new logical dtype."""
    if dtype is not None and dtype not in _FLOAT:
        raise NotImplementedError(f"Shardable4bitWeight: cannot convert a 4-bit weight to {dtype}")
    move = lambda t: t.to(device=device, non_blocking=non_blocking, copy=True)  # noqa: E731
    out = w._like(move(w.packed), move(w.absmax), shape=w.shape, dtype=dtype, code=move(w.code))
    return _pin(out) if pin_memory else out


@_implements(aten.is_pinned.default)
def _is_pinned(w, device=None):
    return all(t.is_pinned() for t in (w.packed, w.absmax, w.code))


@_implements(aten._pin_memory.default)
def _pin(w, device=None):
    return w._like(w.packed.pin_memory(), w.absmax.pin_memory(), shape=w.shape,
                   code=w.code.pin_memory())


@_implements(aten.is_same_size.default)
def _is_same_size(a, b):
    return tuple(a.shape) == tuple(b.shape)


# --- model conversion and the forward --------------------------------------------------------------

def prepare_for_fsdp(model: nn.Module) -> nn.Module:
    """Convert, in place, every Linear4bit of ``model`` (the model itself included) so that its
    weight is a frozen ``nn.Parameter`` holding a Shardable4bitWeight; nothing else changes
    (biases, adapters, other layers). Call it after quantization (moving the model to its
    device) and before ``fully_shard``. Layers already converted are left alone. Returns
    ``model``. The logical dtype of each weight is the layer's compute_dtype, or the original
    weight's dtype when compute_dtype is None."""
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit) or isinstance(module.weight, Shardable4bitWeight):
            continue
        if not getattr(module.weight, "bnb_quantized", False):
            raise ValueError(f"prepare_for_fsdp: {name or type(module).__name__} is not quantized "
                             "yet; move the model to its device first (that quantizes it)")
        weight = Shardable4bitWeight.from_params4bit(module.weight, dtype=module.compute_dtype)
        module.weight = nn.Parameter(weight, requires_grad=False)
    return model


def linear_forward(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit.forward for a Shardable4bitWeight: ``x @ W.T + bias`` with W dequantized by
    the same declared op as a Params4bit weight (so the same numbers: bit-identical on CPU),
    gradients to x and the bias, none to W. x (*, in) -> (*, out) in x's dtype."""
    w = layer.weight
    name = type(layer).__name__
    if not isinstance(w, Shardable4bitWeight):
        raise TypeError(f"{name}.weight is a {type(w).__name__}; expected a Params4bit or a "
                        "Shardable4bitWeight (an FSDP2-sharded weight is usable only inside the "
                        "FSDP forward, which all-gathers it)")
    check_linear_input(x, layer.in_features, w, name)
    if tuple(w.shape) != (layer.out_features, layer.in_features):
        raise RuntimeError(f"{name}: the weight holds shape {tuple(w.shape)}, not the whole "
                           f"({layer.out_features}, {layer.in_features}) (a shard?)")
    cd = layer.compute_dtype or x.dtype
    bias = None if layer.bias is None else layer.bias.to(cd)
    if bias is not None and bias.device.type == "cpu":
        bias = bias.clone()  # FSDP2 may resize the bias storage: keep NumPy off it (as_packed_state)
    packed, state = w.as_packed_state()
    return matmul_4bit_op(x.to(cd), packed, state, bias).to(x.dtype)
