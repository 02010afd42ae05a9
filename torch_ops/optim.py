"""8-bit and 32-bit Adam/AdamW optimizers with bitsandbytes' names, signatures and state
format (docs/FORMATS.md §11).

    opt = torch_ops.optim.AdamW8bit(model.parameters(), lr=1e-3)   # instead of torch.optim.AdamW

Each parameter tensor is updated by one fused kernel per step (qkernels/optim/optim.cu via
raw pointers on torch's current stream, or the Numba version when asked for), or on CPU by
the NumPy reference (reference/optim.py), in place through zero-copy NumPy views. Tensors
with fewer than ``min_8bit_size`` elements (counted globally: a DTensor's full shape under
FSDP2, never the local shard) keep float32 state.

Under FSDP2 each rank updates its shard with that shard's state (about 1/world of the
bytes). A parameter whose rows are whole 256-element blocks (hidden sizes that are multiples
of 256) has its blocks split with its rows, so the update equals the single-process one and
``state_dict()`` returns the state as DTensors that torch.distributed.checkpoint reshards
(torch_ops.distributed); other sharded 8-bit parameters warn once and cannot be saved
sharded. percentile_clipping and max_unorm need global norms: refused for sharded tensors.

Non-finite gradients (``nonfinite=``): "skip" (default) applies docs/FORMATS.md §11.3, in the kernel,
without a host synchronization: an element whose gradient is NaN or +-Inf keeps its
parameter value and its moments are reset to 0, so no block's state is poisoned; the
elements are counted on the device and a RuntimeWarning is issued once (on the GPU at the
next ``step()`` that finds the count ready, or at ``nonfinite_count()``). "raise" checks
every gradient of every group before touching any parameter or state and raises
FloatingPointError naming the parameter (one host synchronization per device on the GPU).
torch's GradScaler works unchanged: it unscales the gradients and skips ``step()`` when it
found an inf.

``step()`` checks everything (gradients, hyper-parameters of every group, state) before it
changes anything, and a failed ``load_state_dict`` leaves the state as it was. The kernels
write parameters through NumPy views or raw pointers, so each step bumps every updated
parameter's version counter itself (``torch.autograd.graph.increment_version``): caches
keyed on ``_version``, such as Linear8bitLt's int8 copy of its fp16 weight, see the update.
"""
from __future__ import annotations

import functools
import math
import warnings
from copy import deepcopy
from itertools import chain

import numpy as np
import torch

from qkernels._backend import requested_backend
from reference import optim as ref
from reference.codebooks import dynamic_map

__all__ = [
    "GlobalOptimManager", "Adam", "AdamW", "Adam8bit", "AdamW8bit", "Adam32bit", "AdamW32bit",
    "PagedAdam", "PagedAdamW", "PagedAdam8bit", "PagedAdamW8bit",
]

QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
# state entries wrapped under QUANT_STATE_KEY in state_dict() (bitsandbytes' set)
_WRAPPED = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "gnorm_vec", "unorm_vec",
            "max1", "max2", "new_max1", "new_max2")
_OVERRIDE_KEYS = ("lr", "betas", "eps", "weight_decay", "optim_bits", "min_8bit_size",
                  "percentile_clipping", "max_unorm")
_PAGED_MIN_NUMEL = 100_000


class GlobalOptimManager:
    """Per-parameter configuration overrides, read when a parameter's state is created.

        mng = GlobalOptimManager.get_instance()
        mng.register_parameters(model.parameters())          # optional, before the optimizer
        mng.override_config(model.emb.weight, "optim_bits", 32)
        mng.register_module_override(model.emb, "weight", {"optim_bits": 32})
    """

    _instance = None

    def __init__(self):
        raise RuntimeError("GlobalOptimManager is a singleton: use GlobalOptimManager.get_instance()")

    @classmethod
    def get_instance(cls) -> "GlobalOptimManager":
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def initialize(self) -> None:
        """Forget every registration and override."""
        self.pid2config: dict[int, dict] = {}
        self.index2config: dict[tuple[int, int], dict] = {}
        self.module_weight_config_triple: list = []
        self.uses_config_override = False

    def register_parameters(self, params) -> None:
        """Record the (group, index) position of already-overridden parameters."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(gi, pi)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None) -> None:
        """Override ``key`` (one of lr, betas, eps, weight_decay, optim_bits, min_8bit_size,
        percentile_clipping, max_unorm) for ``parameters`` (a tensor or a list of them)."""
        if key is not None and key_value_dict is not None:
            raise ValueError("override_config takes key/value or key_value_dict, not both")
        config = dict(key_value_dict or {})
        if key is not None:
            config[key] = value
        _check_override(config)
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        self.uses_config_override = True
        for p in parameters:
            self.pid2config.setdefault(id(p), {}).update(config)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: dict) -> None:
        """Override ``config`` for ``module``'s parameter ``param_name`` (applied at the first
        step of any optimizer holding it)."""
        if not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise ValueError(f"module {type(module).__name__} has no parameter {param_name!r}")
        _check_override(config)
        self.uses_config_override = True
        self.module_weight_config_triple.append((module, param_name, dict(config)))


def _check_override(config: dict) -> None:
    for k in config:
        if k not in _OVERRIDE_KEYS:
            raise ValueError(f"unknown optimizer override key {k!r}; known: {', '.join(_OVERRIDE_KEYS)}")
    _check_options(config)


def _is_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def _check_options(config: dict) -> None:
    """ValueError naming the first bad value among ``config``'s options: any subset of lr,
    betas, eps, weight_decay, optim_bits, min_8bit_size, percentile_clipping, max_unorm."""
    adam = ("lr", "betas", "eps", "weight_decay")
    if any(k in config for k in adam):  # the absent ones take a valid stand-in
        ref.check_adam_args(config.get("lr", 0.0), config.get("betas", (0.0, 0.0)),
                            config.get("eps", 0.0), config.get("weight_decay", 0.0))
    if "optim_bits" in config and config["optim_bits"] not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32; got {config['optim_bits']!r}")
    v = config.get("min_8bit_size", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"min_8bit_size must be an integer >= 0; got {v!r}")
    v = config.get("percentile_clipping", 100)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 100:
        raise ValueError(f"percentile_clipping must be an integer in [1, 100]; got {v!r}")
    v = config.get("max_unorm", 0.0)
    if not (_is_number(v) and math.isfinite(v) and v >= 0):
        raise ValueError(f"max_unorm must be a finite number >= 0; got {v!r}")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _global_numel(p: torch.Tensor) -> int:
    """The parameter's full element count: a DTensor's global shape, not its shard."""
    return math.prod(p.shape)


def _state_bits(p: torch.Tensor, config: dict) -> int:
    """8 or 32: the state precision ``config`` gives p (by its global size)."""
    return 32 if _global_numel(p) < config["min_8bit_size"] else config["optim_bits"]


def _is_sharded(p: torch.Tensor) -> bool:
    """A DTensor split across ranks (FSDP2's Shard(0)), not merely replicated."""
    return hasattr(p, "placements") and any(pl.is_shard() for pl in p.placements)


def _block_rows(p: torch.Tensor) -> int | None:
    """Blocks per row of a sharded parameter when every row holds whole 256-element blocks,
    else None. Only then do a shard's blocks line up with the unsharded tensor's (so the
    8-bit update equals the single-process one) and can absmax be saved as a (rows, blocks
    per row) DTensor sharded like the parameter, which torch.distributed.checkpoint can
    reshard to any world size."""
    if p.dim() < 1 or p.shape[0] == 0:
        return None
    row = _global_numel(p) // p.shape[0]
    return row // ref.BLOCKSIZE if row % ref.BLOCKSIZE == 0 else None


def _bump_version(p: torch.Tensor, local: torch.Tensor) -> None:
    """Tell torch that the kernels changed p: they write through NumPy views or raw pointers,
    which do not bump ``_version``, and caches keyed on it (Linear8bitLt's int8 copy of its
    fp16 weight, autograd's saved-tensor check) would miss the update. For a DTensor both
    the wrapper and its local shard. A host-side counter: no device work."""
    torch.autograd.graph.increment_version(p if local is p else (p, local))


def _options_key(config: dict) -> tuple | None:
    """A hashable stand-in for a parameter's options (None when one is unhashable)."""
    key = tuple(tuple(v) if isinstance(v, list) else v for v in config.values())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _as_dtensor(local: torch.Tensor, p: torch.Tensor, shape) -> torch.Tensor:
    """``local`` (this rank's piece, same row split as parameter p) as a DTensor of global
    ``shape`` with p's mesh and placements."""
    from torch.distributed.tensor import DTensor
    stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=tuple(stride))


def _host_view(t: torch.Tensor) -> np.ndarray:
    """Flat NumPy view sharing a CPU tensor's memory; bfloat16 as uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().reshape(-1).view(np.uint16)
    return t.numpy().reshape(-1)


_managed_bytes = 0  # managed memory this process asked for (never more than the GPU has free)


def _paged_zeros(like: torch.Tensor, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
    """A tensor of like's shape in CUDA managed memory (CuPy's managed allocator)."""
    global _managed_bytes
    import cupy
    n = like.numel()
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(like.device)
    if _managed_bytes + nbytes > free:
        raise RuntimeError(f"paged optimizer state: {nbytes} more bytes of managed memory would "
                           f"exceed the {free} bytes free on {like.device} ({_managed_bytes} "
                           f"already paged); managed memory is never oversubscribed here")
    with cupy.cuda.Device(like.device.index or 0):
        mem = cupy.cuda.malloc_managed(max(nbytes, 1))
        arr = cupy.ndarray((n,), dtype=np.dtype(str(dtype).replace("torch.", "")), memptr=mem)
        arr.fill(fill)
        cupy.cuda.get_current_stream().synchronize()  # filled before torch's stream uses it
    _managed_bytes += nbytes
    # through __cuda_array_interface__ (a pointer; DLPack would have to name managed memory)
    t = torch.as_tensor(arr, device=like.device).view(like.shape)
    t.is_paged = True
    return t


def _prefetch(t: torch.Tensor, stream: int) -> None:
    import cupy
    try:
        cupy.cuda.runtime.memPrefetchAsync(t.data_ptr(), t.numel() * t.element_size(),
                                           t.device.index or 0, stream)
    except Exception as exc:  # an optimization only: never fail a step for it
        _warn_once(f"paged optimizer: prefetch unavailable ({type(exc).__name__}: {exc})")


_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


class Optimizer8bit(torch.optim.Optimizer):
    """Adam/AdamW with 8-bit blockwise or 32-bit state; the classes below fix its options.
    Weight decay is decoupled and applied after the step, for Adam and AdamW alike (bnb)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False, *,
                 percentile_clipping=100, max_unorm=0.0, block_wise=True, nonfinite="skip"):
        ref.check_adam_args(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by the 8-bit/32-bit bitsandbytes-style "
                             "Adam optimizers; use torch.optim.Adam(amsgrad=True)")
        if args is not None:  # bitsandbytes' MockArgs: attributes override the keywords
            optim_bits = getattr(args, "optim_bits", optim_bits)
            min_8bit_size = getattr(args, "min_8bit_size", min_8bit_size)
            percentile_clipping = getattr(args, "percentile_clipping", percentile_clipping)
            max_unorm = getattr(args, "max_unorm", max_unorm)
        _check_options(dict(optim_bits=optim_bits, min_8bit_size=min_8bit_size,
                            percentile_clipping=percentile_clipping, max_unorm=max_unorm))
        if max_unorm > 0 and optim_bits == 8:
            raise ValueError("max_unorm applies to 32-bit state only (bitsandbytes ignores it "
                             "silently with 8-bit state); use optim_bits=32 or max_unorm=0")
        if not block_wise:
            raise ValueError("block_wise=False (one absmax per tensor) is not supported; the "
                             "8-bit state is blockwise (blocks of 256)")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise'; got {nonfinite!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=0.0,
                        t_alpha=None, t_beta3=None)
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.is_complex() or not p.is_floating_point() or p.dtype not in _DTYPES:
                    raise TypeError(f"param_groups[{gi}]['params'][{pi}] has dtype {p.dtype}: "
                                    f"parameters must be float32, float16 or bfloat16 "
                                    f"(complex parameters are not supported)")
        self.optim_bits, self.min_8bit_size = optim_bits, min_8bit_size
        self.percentile_clipping, self.max_unorm = percentile_clipping, max_unorm
        self.is_paged, self.nonfinite = is_paged, nonfinite
        self.mng = GlobalOptimManager.get_instance()
        self.initialized = False
        self._paged_cpu_warned = False
        self._qmaps: dict = {}           # device -> (qmap1, qmap2) tensors shared by all params
        self._counters: dict = {}        # device -> int32 (1,) count of non-finite gradients
        self._pinned: dict = {}          # device -> (pinned int32 (1,), event) copy of its counter
        self._pending: set = set()       # devices whose copy is in flight
        self._gpu_counts: dict = {}      # device -> last count read
        self._nonfinite_seen = 0
        self._gpu_seen = 0
        self._loaded_maps: dict = {}     # id(qmap tensor) -> (tensor, host float32 (256,))
        self._scalars: dict = {}         # (lr, beta1, beta2, eps, wd, step) -> AdamScalars
        self._streams = None             # device -> current stream handle, during step()

    # --- configuration -----------------------------------------------------------------
    def _apply_module_overrides(self) -> None:
        for module, name, config in self.mng.module_weight_config_triple:
            target = getattr(module, name)
            for gi, group in enumerate(self.param_groups):
                for pi, p in enumerate(group["params"]):
                    if p is target:
                        self.mng.pid2config[id(p)] = config
                        self.mng.index2config[(gi, pi)] = config

    def get_config(self, gindex: int, pindex: int, group: dict) -> dict:
        """The effective options of one parameter: its group's, then the manager's overrides."""
        config = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
        config.update(optim_bits=self.optim_bits, min_8bit_size=self.min_8bit_size,
                      percentile_clipping=self.percentile_clipping, max_unorm=self.max_unorm)
        config.update(self.mng.index2config.get((gindex, pindex), {}))
        config.update(self.mng.pid2config.get(id(group["params"][pindex]), {}))
        return config

    # --- state ---------------------------------------------------------------------------
    def _buffer(self, like: torch.Tensor, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
        if self.is_paged and like.device.type == "cpu" and not self._paged_cpu_warned:
            self._paged_cpu_warned = True
            warnings.warn("paged optimizers page state between GPU and host memory; on CPU "
                          "paging is ignored", RuntimeWarning, stacklevel=5)
        if self.is_paged and like.device.type == "cuda" and like.numel() >= _PAGED_MIN_NUMEL:
            return _paged_zeros(like, dtype, fill)
        return torch.full(like.shape, fill, dtype=dtype, device=like.device)

    def _device_qmaps(self, device: torch.device):
        if device not in self._qmaps:
            self._qmaps[device] = (torch.from_numpy(dynamic_map(True).copy()).to(device),
                                   torch.from_numpy(dynamic_map(False).copy()).to(device))
        return self._qmaps[device]

    @torch.no_grad()
    def init_state(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        """Create p's state (moments zero, step 0) as its configuration says: 8-bit codes
        with absmax, or float32 moments."""
        config = self.get_config(gindex, pindex, group)
        self._check_new_state(p, config, gindex, pindex)
        local = _local(p)
        bits = _state_bits(p, config)
        if _is_sharded(p):
            where = f"parameter [{gindex}][{pindex}] (shape {tuple(p.shape)})"
            if bits == 8 and _block_rows(p) is None:
                warnings.warn(f"{where} is sharded (FSDP2) and its rows are not whole 256-element "
                              "blocks: its 8-bit state is blocked per shard, so it differs slightly "
                              "from a single-process run and cannot be saved with "
                              "torch.distributed.checkpoint (keep it 32-bit with "
                              "GlobalOptimManager.override_config(p, 'optim_bits', 32))",
                              RuntimeWarning, stacklevel=4)
        state = self.state[p]
        state["step"] = 0
        if bits == 8:
            state["state1"] = self._buffer(local, torch.uint8, fill=127)  # code of 0.0
            state["qmap1"], state["qmap2"] = self._device_qmaps(local.device)
            state["state2"] = self._buffer(local, torch.uint8)
            nblocks = -(-local.numel() // ref.BLOCKSIZE)
            state["absmax1"] = torch.zeros(nblocks, dtype=torch.float32, device=local.device)
            state["absmax2"] = torch.zeros(nblocks, dtype=torch.float32, device=local.device)
        else:
            state["state1"] = self._buffer(local, torch.float32)
            state["state2"] = self._buffer(local, torch.float32)
        if config["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(100, dtype=torch.float32, device=local.device)
        if config["max_unorm"] > 0:
            state["unorm_vec"] = torch.zeros(1, dtype=torch.float32, device=local.device)

    @staticmethod
    def _check_new_state(p: torch.Tensor, config: dict, gindex: int, pindex: int) -> None:
        """Raise if p's state cannot be created with ``config`` (creates nothing)."""
        if _state_bits(p, config) == 8 and config["max_unorm"] > 0:
            raise ValueError(f"max_unorm applies to 32-bit state only; parameter "
                             f"[{gindex}][{pindex}] would get 8-bit state")
        if _is_sharded(p) and (config["percentile_clipping"] < 100 or config["max_unorm"] > 0):
            raise NotImplementedError(
                f"parameter [{gindex}][{pindex}] (shape {tuple(p.shape)}) is sharded (FSDP2): "
                "percentile_clipping and max_unorm need the global gradient norm, which this "
                "optimizer does not all-reduce; clip with torch.nn.utils.clip_grad_norm_ (it "
                "handles DTensors) instead")

    @torch.no_grad()
    def initialize_states(self) -> None:
        """Create, as the first step would, the state of every trainable parameter that has
        none yet (moments zero, step 0): a template for loading a checkpoint into."""
        if not self.initialized:
            self._apply_module_overrides()
            self.initialized = True
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.requires_grad and not self.state.get(p):
                    self.init_state(group, p, gi, pi)

    # --- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimization step over every parameter that has a gradient. Everything is
        checked first (gradients, hyper-parameters, state); a step that raises has changed
        no parameter and no state."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self._apply_module_overrides()
            self.initialized = True
        plan = self._checked_plan()
        self._create_missing_states(plan)
        self._poll_nonfinite(block=False)
        self._streams = {}  # device -> torch's current stream handle, looked up once per step
        try:
            for group, p, gi, pi, config in plan:
                self._update_step(p, config)
        finally:
            self._streams = None
        self._record_nonfinite()
        return loss

    @torch.no_grad()
    def update_step(self, group: dict, p: torch.Tensor, gindex: int, pindex: int) -> None:
        """bitsandbytes' per-parameter step: check, create the state if needed, update p."""
        plan = [(group, p, gindex, pindex, self._checked_config(group, p, gindex, pindex, set()))]
        if self.nonfinite == "raise":
            self._check_finite(plan)
        self._create_missing_states(plan)
        self._update_step(p, plan[0][4])

    def _checked_plan(self) -> list:
        """The parameters step() updates, as (group, p, gindex, pindex, config), once every
        one of them passed ``_checked_config`` and, with nonfinite="raise", every gradient
        is finite. Changes nothing."""
        plan, checked = [], set()
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    plan.append((group, p, gi, pi, self._checked_config(group, p, gi, pi, checked)))
        if self.nonfinite == "raise":
            self._check_finite(plan)
        return plan

    def _checked_config(self, group: dict, p: torch.Tensor, gindex: int, pindex: int,
                        checked: set) -> dict:
        """p's effective options after checking them, its gradient (dense, p's dtype) and its
        state (on p's device, or creatable). ``checked``: option tuples already found good
        during this step (most parameters share their group's)."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{_where(gindex, pindex)} has a sparse gradient; the 8-bit/32-bit "
                               f"Adam optimizers need dense gradients (use torch.optim.SparseAdam)")
        if grad.dtype != p.dtype:
            raise TypeError(f"{_where(gindex, pindex)}: gradient dtype {grad.dtype} differs from "
                            f"the parameter's {p.dtype}")
        config = self.get_config(gindex, pindex, group)
        key = _options_key(config)
        if key is None or key not in checked:
            try:
                _check_options(config)
            except ValueError as exc:
                raise ValueError(f"{_where(gindex, pindex)}: {exc}; no parameter or state was "
                                 f"changed") from None
            if key is not None:
                checked.add(key)
        state = self.state.get(p)
        if not state:
            self._check_new_state(p, config, gindex, pindex)
            return config
        device = _local(p).device
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in state and state[k].device != device:
                raise ValueError(f"{_where(gindex, pindex)} is on {device} but its optimizer state "
                                 f"{k} is on {state[k].device}; move the model before the first "
                                 f"step, or reload the state with load_state_dict()")
        return config

    @staticmethod
    def _check_finite(plan: list) -> None:
        """FloatingPointError naming the first parameter of ``plan`` whose gradient holds a
        NaN or Inf; one host synchronization per device (not per tensor)."""
        flags: dict = {}  # device -> [(position in plan, 0-dim bool tensor)]
        for k, (_, p, _, _, _) in enumerate(plan):
            g = _local(p.grad)
            flags.setdefault(g.device, []).append((k, torch.isfinite(g).all()))
        bad = []
        for items in flags.values():
            finite = torch.stack([f for _, f in items]).cpu().tolist()
            bad += [k for (k, _), ok in zip(items, finite) if not ok]
        if bad:
            _, p, gi, pi, _ = plan[min(bad)]
            raise FloatingPointError(f"{_where(gi, pi)} (shape {tuple(p.shape)}) has a NaN or Inf "
                                     f"gradient; no parameter or state was changed")

    def _create_missing_states(self, plan: list) -> None:
        """init_state for the parameters of ``plan`` that have none; all or nothing (an
        allocation that fails removes the states made here)."""
        created = []
        try:
            for group, p, gi, pi, _ in plan:
                if not self.state.get(p):
                    created.append(p)
                    self.init_state(group, p, gi, pi)
        except BaseException:
            for p in created:
                self.state.pop(p, None)
            raise

    def _update_step(self, p: torch.Tensor, config: dict) -> None:
        # the per-parameter hot path of step(), after every check: a few microseconds of
        # Python per tensor
        local, glocal = _local(p), _local(p.grad)
        if not glocal.is_contiguous():
            glocal = glocal.contiguous()
        state = self.state[p]
        state["step"] += 1
        work = local if local.is_contiguous() else local.contiguous()
        if local.device.type == "cpu":
            self._update_cpu(work, glocal, state, config)
        else:
            self._update_cuda(work, glocal, state, config)
        if work is not local:
            local.copy_(work)
        _bump_version(p, local)

    def _update_cpu(self, p, g, state, config) -> None:
        name = str(p.dtype).replace("torch.", "")
        pv, gv = _host_view(p), _host_view(g)
        gnorm_scale = 1.0
        if "gnorm_vec" in state:
            _, _, gnorm_scale = ref.percentile_clipping(gv, state["gnorm_vec"].numpy(),
                                                        state["step"],
                                                        config["percentile_clipping"], name)
        s = ref.adam_scalars(config["lr"], config["betas"], config["eps"],
                             config["weight_decay"], state["step"], gnorm_scale)
        s1, s2 = state["state1"], state["state2"]
        if s1.dtype == torch.uint8:
            # qkernels' host backends: the Numba CPU kernel (qkernels/optim/_cpu.py), else the
            # NumPy reference (asked for, or Numba cannot compile); the same bits either way
            from qkernels._backend import choose
            from qkernels.optim import _UPDATE_8BIT
            asked = requested_backend()
            update = (choose(_UPDATE_8BIT, on_gpu=False)[1] if asked in (None, "cpu", "numpy")
                      else _UPDATE_8BIT["numpy"])
            counter = np.zeros(1, np.int32)
            update(pv, gv, s1.numpy().reshape(-1), s2.numpy().reshape(-1), state["absmax1"].numpy(),
                   state["absmax2"].numpy(), state["qmap1"].numpy(), state["qmap2"].numpy(), name, s,
                   counter)
            count = int(counter[0])
        else:
            scale = 1.0
            if config["max_unorm"] > 0:
                unorm = ref.update_norm_32bit(gv, s1.numpy().reshape(-1), s2.numpy().reshape(-1),
                                              s, name)
                pnorm = float(np.linalg.norm(pv.astype(np.float64) if name != "bfloat16"
                                             else p.double().numpy().reshape(-1)))
                scale = ref.max_unorm_scale(unorm, pnorm, config["max_unorm"])
                state["unorm_vec"].fill_(unorm)
            count = ref.optimizer_update_32bit(pv, gv, s1.numpy().reshape(-1),
                                               s2.numpy().reshape(-1), s, name, scale)
        if count:
            self._nonfinite_seen += count
            self._warn_nonfinite()

    def _update_cuda(self, p, g, state, config) -> None:
        s = self._step_scalars(config, state["step"])
        gnorm_scale = None
        if "gnorm_vec" in state:
            gnorm_scale = _percentile_clipping_torch(g, state["gnorm_vec"], state["step"],
                                                     config["percentile_clipping"])
        device = p.device
        counter = self._counter(device)
        stream = self._current_stream(device)
        s1, s2 = state["state1"], state["state2"]
        if self.is_paged:
            for t in (s1, s2):
                if getattr(t, "is_paged", False):
                    _prefetch(t, stream)
        name = _DTYPE_NAMES[p.dtype]
        if requested_backend() == "numba":
            self._update_numba(p, g, state, config, s, gnorm_scale, counter, name)
            return
        launch = _cupy_launchers()
        gptr = 0 if gnorm_scale is None else gnorm_scale.data_ptr()
        if s1.dtype == torch.uint8:
            q1, q2 = self._host_qmaps(state)
            launch.optimizer_update_8bit_blockwise(
                p.data_ptr(), g.data_ptr(), s1.data_ptr(), s2.data_ptr(),
                state["absmax1"].data_ptr(), state["absmax2"].data_ptr(),
                qmap1=q1, qmap2=q2, n=p.numel(), dtype=name, scalars=s, gnorm_scale_ptr=gptr,
                nonfinite=counter.data_ptr(), device=device.index, stream=stream)
        else:
            uscale = _unorm_scale_torch(p, g, state, config, s) if config["max_unorm"] > 0 else None
            launch.optimizer_update_32bit(
                p.data_ptr(), g.data_ptr(), s1.data_ptr(), s2.data_ptr(), n=p.numel(), dtype=name,
                scalars=s, gnorm_scale_ptr=gptr, update_scale_ptr=0 if uscale is None else uscale.data_ptr(),
                nonfinite=counter.data_ptr(), device=device.index, stream=stream)

    def _step_scalars(self, config: dict, step: int) -> ref.AdamScalars:
        """reference.optim.adam_scalars for this step, computed once per step for all the
        parameters that share their hyper-parameters (plain numbers only are cached)."""
        lr, betas, eps, wd = config["lr"], config["betas"], config["eps"], config["weight_decay"]
        key = (lr, *betas, eps, wd, step) if type(betas) is tuple and len(betas) == 2 else ()
        if key and all(type(k) is float or type(k) is int for k in key):
            s = self._scalars.get(key)
            if s is None:
                if len(self._scalars) >= 64:
                    self._scalars.clear()
                s = self._scalars[key] = ref.adam_scalars(lr, betas, eps, wd, step)
            return s
        return ref.adam_scalars(lr, betas, eps, wd, step)

    def _current_stream(self, device: torch.device) -> int:
        """torch's current stream on ``device`` (a handle), looked up once per step()."""
        streams = self._streams
        if streams is None:
            return torch.cuda.current_stream(device).cuda_stream
        handle = streams.get(device)
        if handle is None:
            handle = streams[device] = torch.cuda.current_stream(device).cuda_stream
        return handle

    def _update_numba(self, p, g, state, config, s, gnorm_scale, counter, name) -> None:
        from numba import cuda
        from qkernels.optim import _numba

        def arr(t):
            t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
            return cuda.as_cuda_array(t.detach().reshape(-1))
        stream = cuda.external_stream(torch.cuda.current_stream(p.device).cuda_stream)
        gs = None if gnorm_scale is None else arr(gnorm_scale)
        if state["state1"].dtype == torch.uint8:
            q1, q2 = self._host_qmaps(state)
            _numba.optimizer_update_8bit_blockwise(
                arr(p), arr(g), arr(state["state1"]), arr(state["state2"]), arr(state["absmax1"]),
                arr(state["absmax2"]), qmap1=q1, qmap2=q2, dtype=name, scalars=s, gnorm_scale=gs,
                nonfinite=arr(counter), stream=stream)
        else:
            uscale = _unorm_scale_torch(p, g, state, config, s) if config["max_unorm"] > 0 else None
            _numba.optimizer_update_32bit(
                arr(p), arr(g), arr(state["state1"]), arr(state["state2"]), dtype=name, scalars=s,
                gnorm_scale=gs, update_scale=None if uscale is None else arr(uscale),
                nonfinite=arr(counter), stream=stream)

    def _host_qmaps(self, state) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of a state's codebooks: the defaults without a device read; a loaded
        non-default map is read once and cached (read-only, as the defaults are)."""
        out = []
        for key, signed in (("qmap1", True), ("qmap2", False)):
            t = state[key]
            if any(t is maps[0 if signed else 1] for maps in self._qmaps.values()):
                out.append(dynamic_map(signed))
                continue
            cached = self._loaded_maps.get(id(t))
            if cached is None or cached[0] is not t:
                host = t.detach().float().cpu().numpy().reshape(-1).copy()
                host.setflags(write=False)
                cached = self._loaded_maps[id(t)] = (t, host)
            out.append(cached[1])
        return out[0], out[1]

    # --- non-finite gradients --------------------------------------------------------------
    def _counter(self, device: torch.device) -> torch.Tensor:
        if device not in self._counters:
            self._counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return self._counters[device]

    def _record_nonfinite(self) -> None:
        """Queue a copy of each device's counter to pinned host memory (no synchronization);
        skipped while the previous copy is still in flight (the counters are cumulative)."""
        for device, counter in self._counters.items():
            if device in self._pending:
                continue
            host, event = self._pinned.get(device) or (None, None)
            if host is None:
                host, event = torch.empty(1, dtype=torch.int32, pin_memory=True), torch.cuda.Event()
                self._pinned[device] = (host, event)
            host.copy_(counter, non_blocking=True)
            event.record(torch.cuda.current_stream(device))
            self._pending.add(device)

    def _poll_nonfinite(self, block: bool) -> None:
        total = None
        for device in list(self._pending):
            host, event = self._pinned[device]
            if block:
                event.synchronize()
            elif not event.query():
                continue
            self._pending.discard(device)
            self._gpu_counts[device] = int(host[0])
            total = sum(self._gpu_counts.values())
        if block:
            for device, counter in self._counters.items():
                self._gpu_counts[device] = int(counter.item())
            total = sum(self._gpu_counts.values())
        if total is not None and total > self._gpu_seen:
            self._nonfinite_seen += total - self._gpu_seen
            self._gpu_seen = total
            self._warn_nonfinite()

    def _warn_nonfinite(self) -> None:
        if not getattr(self, "_nonfinite_warned", False):
            self._nonfinite_warned = True
            warnings.warn(f"{type(self).__name__}: {self._nonfinite_seen} gradient element(s) were "
                          f"NaN or Inf; their parameters were left unchanged and their moments "
                          f"reset to 0 (warned once; see nonfinite_count())", RuntimeWarning,
                          stacklevel=4)

    def nonfinite_count(self) -> int:
        """Total non-finite gradient elements seen so far (waits for pending GPU steps)."""
        self._poll_nonfinite(block=True)
        return self._nonfinite_seen

    # --- state_dict ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's format, with every state tensor wrapped under ``__bnb_optimizer_quant_state__``
        (bitsandbytes' layout, so FSDP's gathering skips them); ``step`` stays outside."""
        sd = super().state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        states = {}
        for index, st in sd["state"].items():
            st = dict(st)
            if _is_sharded(params[index]):
                st = self._sharded_state(st, params[index], index)
            wrapped = {k: st.pop(k) for k in list(st) if k in _WRAPPED}
            if wrapped:
                st[QUANT_STATE_KEY] = wrapped
            states[index] = st
        sd["state"] = states
        return sd

    @staticmethod
    def _sharded_state(st: dict, p: torch.Tensor, index) -> dict:
        """An FSDP2 parameter's state as DTensors sharded like it, for
        torch.distributed.checkpoint: state1/state2 with the parameter's shape, absmax1/2 as
        (rows, blocks per row); codebooks and norms stay plain (identical on every rank)."""
        out = dict(st)
        for k in ("state1", "state2"):
            out[k] = _as_dtensor(st[k], p, p.shape)
        if "absmax1" in st:
            per_row = _block_rows(p)
            if per_row is None:
                raise ValueError(f"optimizer state of parameter {index} (shape {tuple(p.shape)}) "
                                 "cannot be saved sharded: its rows are not whole 256-element "
                                 "blocks, so its 8-bit absmax does not split with the rows; keep "
                                 "it 32-bit (GlobalOptimManager.override_config(p, 'optim_bits', 32))")
            for k in ("absmax1", "absmax2"):
                out[k] = _as_dtensor(st[k].view(-1, per_row), p, (p.shape[0], per_row))
        return out

    def load_state_dict(self, state_dict: dict, move_to_device: bool = True) -> None:
        """Load a state from ``state_dict()`` here or from bitsandbytes (wrapped or not);
        tensors keep their dtype and move to their parameter's device (shard). Every entry
        is checked before anything changes (as torch.optim does): a bad state_dict raises
        ValueError and leaves this optimizer's state and param_groups as they were."""
        state_dict = deepcopy(state_dict)
        groups, saved = self.param_groups, state_dict["param_groups"]
        _check_saved_groups(groups, saved)
        id_map = dict(zip(chain.from_iterable(s["params"] for s in saved),
                          chain.from_iterable(g["params"] for g in groups)))
        position = {id(p): (gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}
        if not self.initialized:
            self._apply_module_overrides()
            self.initialized = True
        entries = []
        for index, st in state_dict["state"].items():
            if index not in id_map:
                raise ValueError(f"state_dict has state for unknown parameter index {index!r}")
            p = id_map[index]
            st = dict(st)
            st.update(st.pop(QUANT_STATE_KEY, {}))
            st = {k: _local(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            gi, pi = position[id(p)]
            bits = _state_bits(p, self.get_config(gi, pi, groups[gi]))
            _check_saved_state(st, _local(p).numel(), tuple(p.shape), index, bits)
            entries.append((p, st))
        loaded = {p: self._loaded_state(st, p, move_to_device) for p, st in entries}
        self.state.clear()
        self.state.update(loaded)
        for g, s in zip(groups, saved):
            for k, v in s.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else v

    def _loaded_state(self, st: dict, p: torch.Tensor, move: bool) -> dict:
        """A checked saved state (``_check_saved_state``) as p's state: step an int, tensors
        on p's device (shard) in p's layout, large ones paged for paged optimizers, the
        default codebooks shared."""
        local = _local(p)
        out = {}
        for k, v in st.items():
            if k == "step":
                out[k] = _saved_step(v)
            elif isinstance(v, torch.Tensor):
                v = v.to(local.device) if move else v
                if k in ("absmax1", "absmax2"):
                    v = v.reshape(-1).contiguous()
                if k in ("state1", "state2"):
                    v = v.reshape(local.shape).contiguous()
                    if self.is_paged and v.device.type == "cuda" and v.numel() >= _PAGED_MIN_NUMEL:
                        paged = _paged_zeros(v, v.dtype)
                        paged.copy_(v)
                        v = paged
                out[k] = v
            else:
                out[k] = v
        if out["state1"].dtype == torch.uint8:  # one codebook tensor per device when default
            q1, q2 = self._device_qmaps(local.device)
            if torch.equal(out["qmap1"].cpu(), q1.cpu()) and torch.equal(out["qmap2"].cpu(), q2.cpu()):
                out["qmap1"], out["qmap2"] = q1, q2
        return out


def _check_saved_groups(groups: list, saved: list) -> None:
    """ValueError unless the saved param_groups match ``groups`` in number and sizes and
    hold valid Adam hyper-parameters."""
    if len(groups) != len(saved):
        raise ValueError(f"state_dict has {len(saved)} parameter groups; this optimizer has "
                         f"{len(groups)}")
    for gi, (g, s) in enumerate(zip(groups, saved)):
        if len(g["params"]) != len(s["params"]):
            raise ValueError(f"state_dict's parameter group {gi} has {len(s['params'])} "
                             f"parameters; this optimizer's has {len(g['params'])}")
        try:
            _check_options({k: s[k] for k in ("lr", "betas", "eps", "weight_decay") if k in s})
        except ValueError as exc:
            raise ValueError(f"state_dict's param_groups[{gi}]: {exc}") from None


def _saved_step(v) -> int:
    """A saved ``step`` (an int, or a one-element tensor as torch.optim saves it) as an int
    >= 0; ValueError for anything else."""
    value = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
    if not (_is_number(value) and math.isfinite(value) and value >= 0
            and float(value).is_integer()):
        raise ValueError(f"step must be an integer >= 0; got {v!r}")
    return int(value)


def _check_saved_state(st: dict, n: int, shape: tuple, index, bits: int) -> None:
    """ValueError unless ``st`` (one parameter's saved state, unwrapped, local shards) is a
    valid ``bits``-bit state for a parameter of shape ``shape`` with ``n`` local elements."""
    if "state1" not in st or "state2" not in st or "step" not in st:
        raise ValueError(f"state of parameter {index} lacks step/state1/state2; got {sorted(st)}")
    try:
        _saved_step(st["step"])
    except ValueError as exc:
        raise ValueError(f"state of parameter {index}: {exc}") from None
    if not isinstance(st["state1"], torch.Tensor):
        raise ValueError(f"state of parameter {index}: state1 must be a tensor; got "
                         f"{type(st['state1']).__name__}")
    eight = st["state1"].dtype == torch.uint8
    if eight != (bits == 8):
        raise ValueError(f"state of parameter {index} (shape {shape}) was saved "
                         f"{'8' if eight else '32'}-bit but this optimizer's configuration "
                         f"(optim_bits, min_8bit_size, GlobalOptimManager overrides) gives it "
                         f"{bits}-bit state; load it with the configuration it was saved with")
    want = {"state1": (torch.uint8 if eight else torch.float32, n),
            "state2": (torch.uint8 if eight else torch.float32, n)}
    if eight:
        nb = -(-n // ref.BLOCKSIZE)
        want.update(absmax1=(torch.float32, nb), absmax2=(torch.float32, nb),
                    qmap1=(torch.float32, 256), qmap2=(torch.float32, 256))
    for k, (dt, size) in want.items():
        t = st.get(k)
        if not isinstance(t, torch.Tensor) or t.dtype != dt or t.numel() != size:
            got = ((t.dtype, t.numel()) if isinstance(t, torch.Tensor)
                   else "no such entry" if t is None else type(t).__name__)
            raise ValueError(f"state of parameter {index}: {k} must be a {dt} tensor of {size} "
                             f"elements; got {got}")


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _where(gindex: int, pindex: int) -> str:
    return f"param_groups[{gindex}]['params'][{pindex}]"


@functools.lru_cache(maxsize=None)
def _cupy_launchers():
    from qkernels.optim import _cupy
    return _cupy


def _percentile_clipping_torch(g: torch.Tensor, gnorm_vec: torch.Tensor, step: int,
                               percentile: int) -> torch.Tensor:
    """reference.optim.percentile_clipping with torch ops on the device (no host sync);
    returns gnorm_scale as a float32 (1,) device tensor."""
    gnorm2 = g.double().square().sum().float()
    if step == 1:
        gnorm_vec.copy_(gnorm2.expand(100))
    else:
        gnorm_vec[step % 100] = gnorm2
    clip = torch.sort(gnorm_vec).values[percentile].sqrt()
    gnorm = gnorm2.sqrt()
    return torch.where(gnorm > clip, clip / gnorm, torch.ones_like(gnorm)).reshape(1)


def _unorm_scale_torch(p, g, state, config, s) -> torch.Tensor:
    """max_unorm's factor (float32 (1,) on the device) per reference.optim.update_norm_32bit."""
    gf = g.float() * s.gnorm_scale
    bad = ~torch.isfinite(gf)
    m = state["state1"] * float(s.beta1) + gf * float(s.one_minus_beta1)
    v = state["state2"] * float(s.beta2) + (gf * gf) * float(s.one_minus_beta2)
    m = m.masked_fill(bad, 0.0)
    v = v.masked_fill(bad, 0.0)
    u = (m / float(s.c1)) / ((v / float(s.c2sq)).sqrt() + float(s.eps))
    unorm = u.double().square().sum().sqrt()
    limit = config["max_unorm"] * p.double().norm()
    state["unorm_vec"].copy_(unorm.float().reshape(1))
    return torch.where(unorm > limit, limit / unorm, torch.ones_like(unorm)).float().reshape(1)


class Adam(Optimizer8bit):
    """Adam with 32-bit (default) or 8-bit (``optim_bits=8``) state; bitsandbytes' ``Adam``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, is_paged, **kwargs)


class AdamW(Optimizer8bit):
    """AdamW (weight_decay 1e-2) with 32-bit or 8-bit state; bitsandbytes' ``AdamW``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, is_paged, **kwargs)


def _fixed_bits(bits: int, optim_bits: int, cls: str) -> int:
    if optim_bits != 32:  # bitsandbytes: the argument exists for the signature only
        raise ValueError(f"{cls} always uses {bits}-bit state; leave optim_bits at its default 32")
    return bits


class Adam8bit(Adam):
    """Adam with 8-bit blockwise state (tensors under ``min_8bit_size`` elements: 32-bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         _fixed_bits(8, optim_bits, "Adam8bit"), args, min_8bit_size, is_paged, **kwargs)


class AdamW8bit(AdamW):
    """AdamW with 8-bit blockwise state (tensors under ``min_8bit_size`` elements: 32-bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         _fixed_bits(8, optim_bits, "AdamW8bit"), args, min_8bit_size, is_paged, **kwargs)


class Adam32bit(Adam):
    """Adam with float32 state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         _fixed_bits(32, optim_bits, "Adam32bit"), args, min_8bit_size, is_paged, **kwargs)


class AdamW32bit(AdamW):
    """AdamW with float32 state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=False,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad,
                         _fixed_bits(32, optim_bits, "AdamW32bit"), args, min_8bit_size, is_paged, **kwargs)


class PagedAdam(Adam):
    """Adam whose state tensors of >= 1e5 elements live in CUDA managed memory."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=True,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, **kwargs)


class PagedAdamW(AdamW):
    """AdamW whose state tensors of >= 1e5 elements live in CUDA managed memory."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=True,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, **kwargs)


class PagedAdam8bit(Adam8bit):
    """Adam8bit with paged (CUDA managed) state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=True,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, **kwargs)


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit with paged (CUDA managed) state."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, optim_bits=32, args=None, min_8bit_size=4096, is_paged=True,
                 **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args,
                         min_8bit_size, True, **kwargs)
