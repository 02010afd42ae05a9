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

Saving is atomic: the checkpoint is written to the sibling folder
``<path>.save_checkpoint-partial`` (every file fsynced, ``.metadata`` last) and renamed to
``path`` only once complete; the previous checkpoint is renamed to
``<path>.save_checkpoint-previous`` for the moment between the two renames, then removed. A
process killed during a save (SIGKILL, OOM, preemption) leaves at ``path`` the previous
checkpoint, or the new one complete, never a partial or mixed one; a kill between the two
renames leaves no ``path``, and load_checkpoint then reads the previous one from its
``-previous`` folder (with a RuntimeWarning) until the next save puts it back. ``path`` is
replaced as a whole: other files kept in that folder do not survive a save.

Loading is all or nothing: DCP reads into new tensors, not into the model's and optimizer's,
which change only once everything was read and checked (a truncated or corrupt file raises a
ValueError naming the checkpoint and changes nothing). That costs, while loading, memory for
one more copy of this rank's model and optimizer state.

Loading never runs code stored in a checkpoint. DCP pickles its ``.metadata`` file and
every non-tensor item (``extra`` values, optimizer hyperparameters, step counts), and its
default load planner unpickles those items with ``weights_only=False``, which executes
whatever a crafted pickle asks for. Here the metadata goes through an unpickler that admits
only DCP's own metadata classes, and each non-tensor item through
``torch.load(weights_only=True)``; anything else is refused with a ValueError.
"""
from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import shutil
import warnings

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
    ``path``; every rank must call it. ``extra``: a dict of small values saved beside (e.g.
    the step count) and returned by load_checkpoint, each plain data (int, float, str, bool,
    None, and lists, tuples and str-keyed dicts of these) or a tensor; anything else raises
    a TypeError here, since load_checkpoint would refuse it (DCP flattens a dict value: {"d":
    {"a": 1}} comes back as {"d.a": 1}). ``no_dist=True``: this process
    alone (default: alone exactly when no process group is initialized).

    Atomic (module docstring): written to ``<path>.save_checkpoint-partial``, then renamed
    to ``path`` (by rank 0, once every rank's files and ``.metadata`` are written) replacing
    the previous checkpoint as a whole; a kill mid-save leaves the previous one loadable.
    (An fsspec URL is written in place by DCP, not atomically.)"""
    dcp, dcp_sd = _dcp()
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None; got {type(extra).__name__}")
    _check_plain(dict(extra or {}), "extra")
    sd = {"model": dcp_sd.get_model_state_dict(model), "extra": dict(extra or {})}
    if optimizer is not None:
        sd["optim"] = optimizer_checkpoint_state(model, optimizer)
    alone = not _distributed() if no_dist is None else no_dist
    if "://" in str(path):  # an fsspec URL (load_checkpoint reads local folders only): as DCP
        dcp.save(sd, checkpoint_id=str(path), no_dist=alone)  # writes it, in place
        return
    final, partial, previous = _siblings(path)
    if os.path.exists(final) and not os.path.isdir(final):
        raise NotADirectoryError(f"save_checkpoint: {final} exists and is not a folder")
    lead = alone or dist.get_rank() == 0
    if lead:  # what a killed save left: its partial folder, or the previous checkpoint
        _restore_previous(final, previous)
        shutil.rmtree(partial, ignore_errors=True)
    if not alone:
        dist.barrier()  # nobody writes into the partial folder before it was emptied
    dcp.save(sd, checkpoint_id=partial, no_dist=alone)  # returns once .metadata is written
    if alone:
        _move_into_place(final, partial, previous)
        return
    error = None
    if lead:
        try:
            _move_into_place(final, partial, previous)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    box = [error]
    dist.broadcast_object_list(box, src=0)  # every rank returns once it is in place
    if box[0] is not None:
        raise OSError(f"save_checkpoint: the checkpoint was written to {partial} but could not "
                      f"be moved to {final} ({box[0]})")


_PARTIAL, _PREVIOUS = ".save_checkpoint-partial", ".save_checkpoint-previous"


def _siblings(path) -> tuple[str, str, str]:
    """(the checkpoint folder, the folder a save writes first, the folder the previous
    checkpoint waits in between the two renames)."""
    final = os.path.normpath(os.fspath(path))
    return final, final + _PARTIAL, final + _PREVIOUS


def _restore_previous(final: str, previous: str) -> None:
    """Undo what a save killed after its first rename left: the previous checkpoint back at
    ``final`` when there is none, else the leftover removed."""
    if os.path.isdir(previous):
        if not os.path.exists(final):
            os.rename(previous, final)
        else:
            shutil.rmtree(previous, ignore_errors=True)


def _fsync_dir(folder: str) -> None:
    """Make renames and new entries in ``folder`` durable (best effort: not every platform
    or file system can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _move_into_place(final: str, partial: str, previous: str) -> None:
    """``partial`` (complete, its files fsynced by DCP) becomes ``final``; the checkpoint
    there before is removed only after that."""
    _fsync_dir(partial)
    if os.path.exists(final):
        os.rename(final, previous)
    os.rename(partial, final)
    _fsync_dir(os.path.dirname(final) or ".")
    shutil.rmtree(previous, ignore_errors=True)


def _readable_folder(path) -> str:
    """``path``, or its ``-previous`` folder where a save was killed between its renames."""
    final, _, previous = _siblings(path)
    if not os.path.exists(final) and os.path.isdir(previous):
        warnings.warn(f"checkpoint {final}: a save was interrupted while replacing it; loading "
                      f"the previous checkpoint from {previous} (the next save puts it back)",
                      RuntimeWarning, stacklevel=3)
        return previous
    return final


def _fresh(value):
    """An uninitialized tensor like ``value`` (a DTensor sharded alike) for DCP to read
    into; anything else as it is."""
    return torch.empty_like(value) if isinstance(value, torch.Tensor) else value


def load_checkpoint(path, model: torch.nn.Module, optimizer=None, *, no_dist: bool | None = None) -> dict:
    """Load a save_checkpoint folder into ``model`` (and ``optimizer``), resharding to this
    run's world size (1 with no process group, or with ``no_dist=True``: a plain model in
    one process of a distributed job). Returns the saved ``extra`` dict.

    Safe on a checkpoint from anywhere: nothing in it is executed. Tensors load as tensors;
    every non-tensor item (``extra`` values, optimizer hyperparameters, step counts) loads
    with ``torch.load(weights_only=True)``, so it may be plain data only: int, float, str,
    bool, None, lists, tuples and dicts of these (and tensors, torch dtypes/devices); an
    item holding any other object (a class instance, a function) raises a ValueError naming
    it, and the object is never built. The ``.metadata`` file may hold DCP's own metadata
    classes only (else a ValueError).

    All or nothing: a checkpoint that cannot be read (a file truncated, corrupt or missing)
    or does not fit raises (a ValueError, or FileNotFoundError without ``.metadata``) and
    leaves ``model`` and ``optimizer`` as they were, also an optimizer that had no state yet.
    The optimizer's state is swapped in first (Optimizer8bit.load_state_dict checks it all
    before), then the model's parameters are copied."""
    dcp, dcp_sd = _dcp()
    path = _readable_folder(path)
    reader = _safe_reader(path)
    meta = reader.read_metadata().state_dict_metadata
    # DCP loads into the tensors it is given: new ones, so a read that fails half-way has
    # written nothing the model or the optimizer holds
    sd = {"model": {k: _fresh(v) for k, v in dcp_sd.get_model_state_dict(model).items()},
          "extra": {}}
    for key in meta:
        if key.startswith("extra."):
            sd["extra"][key[len("extra."):]] = None
    created = []  # parameters whose (zero) state optimizer_checkpoint_state makes as a template
    if optimizer is not None:
        created = [p for g in optimizer.param_groups for p in g["params"]
                   if not optimizer.state.get(p)]
    try:
        if optimizer is not None:
            template = optimizer_checkpoint_state(model, optimizer)
            _check_optimizer_layout(template, meta, path)
            template["state"] = {name: {k: _fresh(v) for k, v in st.items()}
                                 for name, st in template["state"].items()}
            sd["optim"] = template
        try:
            dcp.load(sd, storage_reader=reader, planner=_plain_data_planner(path),
                     no_dist=not _distributed() if no_dist is None else no_dist)
        except dcp.CheckpointException as exc:  # DCP wraps each rank's error: surface ours
            refused = [e for e, _ in exc.failures.values() if isinstance(e, _RefusedItem)]
            if refused:
                raise ValueError(str(refused[0])) from None
            # a BaseException: made an ordinary error, naming the checkpoint and the cause
            rank, (err, _) = next(iter(exc.failures.items()))
            raise ValueError(f"checkpoint {path} could not be read (rank {rank}: "
                             f"{type(err).__name__}: {err}); nothing was loaded") from exc
        if optimizer is not None:
            optimizer.load_state_dict(_to_index_keyed(optimizer, sd["optim"], _names(model)))
    except BaseException:
        for p in created:
            optimizer.state.pop(p, None)
        raise
    dcp_sd.set_model_state_dict(model, sd["model"])
    return sd["extra"]


# --- loading without running code -----------------------------------------------------------

_PLAIN = (int, float, str, bool, type(None))


def _check_plain(value, where: str) -> None:
    """TypeError naming ``where`` unless ``value`` is plain data (int, float, str, bool, None,
    lists/tuples of plain data, dicts with str keys) or a tensor: what loads back safely."""
    # exact types: a subclass (np.float64 is a float, an IntEnum an int, a namedtuple a
    # tuple) pickles as its own class, which loading refuses
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if type(value) in (dict, collections.OrderedDict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a key {k!r} of type {type(k).__name__}; checkpoint "
                                "dicts need str keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    hint = " (a NumPy scalar: pass .item())" if type(value).__module__ == "numpy" else ""
    raise TypeError(f"{where} must be plain data (int, float, str, bool, None, or lists, tuples "
                    f"and dicts of these) or a tensor; got {type(value).__name__}{hint}")


class _RefusedItem(ValueError):
    """A checkpoint item that would run code to load (raised inside dcp.load)."""


def _load_plain(data: io.BytesIO, fqn: str, path: str):
    """One non-tensor DCP item (torch.save bytes) loaded without running code."""
    try:
        return torch.load(data, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        why = next((line for line in reason if "Unsupported global" in line),
                   reason[0] if reason else "")
        raise _RefusedItem(f"checkpoint {path}: item {fqn!r} is not plain data and was not loaded "
                         f"(refusing to build objects a checkpoint names: {why.strip()}); "
                         "non-tensor items may hold int, float, str, bool, None, lists, tuples, "
                         "dicts and tensors only") from None


def _plain_data_planner(path: str):
    """DCP's default load planner with non-tensor items read by ``_load_plain`` (its own
    ``load_bytes`` calls ``torch.load(..., weights_only=False)``)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class _PlainDataLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            obj = _load_plain(value, fqn, path)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return _PlainDataLoadPlanner()


# Globals a DCP .metadata pickle names (Metadata and its parts, torch.Size, dtypes, layouts,
# the storage path); everything else is refused before its module is even imported.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"), ("pathlib", "Path"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, admitting only the classes DCP writes there."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module in _METADATA_MODULES:
            import importlib
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise ValueError(f"checkpoint metadata {self.path}: refusing to load {module}.{name} "
                         "(a DCP .metadata file holds only DCP's metadata classes; this one "
                         "names something else, which loading would run)")


def _safe_reader(path: str):
    """A DCP FileSystemReader whose ``read_metadata`` uses ``_MetadataUnpickler``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            name = ".metadata" if rank is None else f"__{rank}.metadata"
            file = self.fs.concat_path(self.path, name)
            with self.fs.create_stream(file, "rb") as stream:
                try:
                    metadata = _MetadataUnpickler(stream, str(file)).load()
                except ValueError:
                    raise
                except Exception as exc:  # truncated or garbled pickle
                    raise ValueError(f"checkpoint metadata {file} cannot be read: "
                                     f"{type(exc).__name__}: {exc}") from None
            if not hasattr(metadata, "state_dict_metadata"):
                raise ValueError(f"checkpoint metadata {file} holds a {type(metadata).__name__}, "
                                 "not DCP Metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader(path)


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
