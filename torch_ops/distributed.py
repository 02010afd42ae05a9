"""Training with torch.distributed (DDP, FSDP2 ``fully_shard``): sharded checkpoints of a
model and its 8-bit optimizer through ``torch.distributed.checkpoint`` (DCP), and a check
that every rank was given the same configuration.

    save_checkpoint("ckpt/step100", model, opt)      # every rank calls it; each writes its shards
    load_checkpoint("ckpt/step100", model, opt)      # any world size, also 1 (no process group)

The optimizer's state goes in keyed by parameter name. Under FSDP2 each parameter's
state1/state2 are DTensors sharded like the parameter and absmax1/absmax2 are saved as
(rows, blocks per row) DTensors sharded the same way (Optimizer8bit.state_dict), so DCP can
reshard a checkpoint to another world size; unsharded absmax is saved in the same 2-D
shape, so a 2-rank checkpoint loads into one process and the reverse. A parameter whose
rows are not whole 256-element blocks cannot have sharded 8-bit state saved (its blocks do
not split with its rows): saving it raises and names it.

Loading checks before reading any tensor that each parameter's state has the precision
(8-bit or 32-bit) this optimizer's configuration gives it and the same element count, and
raises a ValueError naming the parameter otherwise.
"""
from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "optimizer_checkpoint_state", "check_same_config"]

_ABSMAX = ("absmax1", "absmax2")


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dcp_sd
    return dcp, dcp_sd


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _names(model: torch.nn.Module) -> dict[int, str]:
    """Parameter names as the model's own (a DDP wrapper's ``module.`` prefix dropped, as
    get_model_state_dict does), so checkpoints move between DDP, FSDP2 and plain models."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}


def optimizer_checkpoint_state(model: torch.nn.Module, optimizer) -> dict:
    """``optimizer.state_dict()`` (an Optimizer8bit) keyed by parameter name, state tensors
    unwrapped from ``__bnb_optimizer_quant_state__``, absmax as (rows, blocks per row) where
    the rows are whole blocks: the layout save_checkpoint writes and load_checkpoint reads.
    Parameters without state yet (no step taken) get it initialized first, so that the
    result is a complete template for loading."""
    from .optim import QUANT_STATE_KEY, Optimizer8bit, _block_rows
    if not isinstance(optimizer, Optimizer8bit):
        raise TypeError(f"optimizer_checkpoint_state: expected a torch_ops.optim optimizer; got "
                        f"{type(optimizer).__name__} (use torch.distributed.checkpoint.state_dict "
                        "for torch's own optimizers)")
    optimizer.initialize_states()
    names = _names(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"optimizer parameters {missing} are not parameters of the model given "
                         "(build the optimizer after fully_shard, from this model's parameters)")
    sd = optimizer.state_dict()
    state = {}
    for index, st in sd["state"].items():
        p = params[index]
        st = dict(st)
        st.update(st.pop(QUANT_STATE_KEY, {}))
        per_row = _block_rows(p)
        for k in _ABSMAX:
            if k in st and not hasattr(st[k], "placements") and per_row is not None:
                st[k] = st[k].view(-1, per_row)
        state[names[id(p)]] = st
    groups = []
    for g, saved in zip(optimizer.param_groups, sd["param_groups"]):
        entry = {k: v for k, v in saved.items() if k != "params"}
        entry["params"] = [names[id(p)] for p in g["params"]]
        groups.append(entry)
    return {"state": state, "param_groups": groups}


def _to_index_keyed(optimizer, named: dict, names: dict[int, str]) -> dict:
    """The inverse of optimizer_checkpoint_state's keying: a dict load_state_dict accepts."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    index = {names[id(p)]: i for i, p in enumerate(params)}
    groups = []
    for g, saved in zip(optimizer.param_groups, named["param_groups"]):
        entry = dict(saved)
        entry["params"] = [index[n] for n in saved["params"]]
        groups.append(entry)
    return {"state": {index[n]: st for n, st in named["state"].items()}, "param_groups": groups}


def save_checkpoint(path, model: torch.nn.Module, optimizer=None, extra: dict | None = None,
                    *, no_dist: bool | None = None) -> None:
    """Write ``model`` (FSDP2, DDP or plain) and its torch_ops optimizer to the DCP folder
    ``path``; every rank must call it. ``extra``: small picklable values saved beside
    (e.g. the step count), returned by load_checkpoint. ``no_dist=True``: this process
    alone (default: alone exactly when no process group is initialized)."""
    dcp, dcp_sd = _dcp()
    sd = {"model": dcp_sd.get_model_state_dict(model), "extra": dict(extra or {})}
    if optimizer is not None:
        sd["optim"] = optimizer_checkpoint_state(model, optimizer)
    dcp.save(sd, checkpoint_id=str(path), no_dist=not _distributed() if no_dist is None else no_dist)


def load_checkpoint(path, model: torch.nn.Module, optimizer=None, *, no_dist: bool | None = None) -> dict:
    """Load a save_checkpoint folder into ``model`` (and ``optimizer``), resharding to this
    run's world size (1 with no process group, or with ``no_dist=True``: a plain model in
    one process of a distributed job). Returns the saved ``extra`` dict."""
    dcp, dcp_sd = _dcp()
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata().state_dict_metadata
    sd = {"model": dcp_sd.get_model_state_dict(model), "extra": {}}
    for key in meta:
        if key.startswith("extra."):
            sd["extra"][key[len("extra."):]] = None
    if optimizer is not None:
        sd["optim"] = optimizer_checkpoint_state(model, optimizer)
        _check_optimizer_layout(sd["optim"], meta, path)
    dcp.load(sd, storage_reader=reader, no_dist=not _distributed() if no_dist is None else no_dist)
    dcp_sd.set_model_state_dict(model, sd["model"])
    if optimizer is not None:
        optimizer.load_state_dict(_to_index_keyed(optimizer, sd["optim"], _names(model)))
    return sd["extra"]


def _check_optimizer_layout(template: dict, meta: dict, path) -> None:
    """Each parameter's saved state1 must have the dtype (8-bit uint8 or 32-bit float32) and
    the global size of this optimizer's, before DCP reads (and would cast) anything."""
    bits = {torch.uint8: 8, torch.float32: 32}
    for name, st in template["state"].items():
        key = f"optim.state.{name}.state1"
        if key not in meta:
            raise ValueError(f"checkpoint {path} has no optimizer state for parameter {name!r}")
        saved = meta[key]
        want_dtype = st["state1"].dtype
        saved_dtype = saved.properties.dtype
        if saved_dtype != want_dtype:
            raise ValueError(f"parameter {name!r}: its optimizer state was saved "
                             f"{bits.get(saved_dtype, saved_dtype)}-bit but this optimizer's "
                             f"configuration (optim_bits, min_8bit_size, GlobalOptimManager "
                             f"overrides) gives it {bits.get(want_dtype, want_dtype)}-bit state; "
                             "load with the configuration it was saved with")
        if math.prod(saved.size) != math.prod(st["state1"].shape):
            raise ValueError(f"parameter {name!r}: saved optimizer state has {tuple(saved.size)} "
                             f"elements, the model's parameter {tuple(st['state1'].shape)}")


def check_same_config(config: dict, what: str = "configuration") -> None:
    """Raise ValueError on every rank, naming the ranks and keys, when the JSON-serializable
    ``config`` differs between ranks (a collective: every rank must call it). Without a
    process group it does nothing."""
    if not _distributed():
        return
    text = json.dumps(config, sort_keys=True, default=str)
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, text)
    first = json.loads(gathered[0])
    for rank, other in enumerate(gathered):
        if other != gathered[0]:
            theirs = json.loads(other)
            keys = sorted(k for k in set(first) | set(theirs) if first.get(k) != theirs.get(k))
            diffs = ", ".join(f"{k}: rank 0 {first.get(k)!r} vs rank {rank} {theirs.get(k)!r}"
                              for k in keys)
            raise ValueError(f"ranks were given different {what}s ({diffs}); every rank must "
                             "build the same model")
