"""torch_ops.fsdp4bit: 4-bit weights FSDP2 can shard (QLoRA under fully_shard), on CPU.

Single process: conversion keeps outputs and gradients bit-identical; row splits of the
subclass are the rows of the dequantized weight; the all-gather hooks rebuild the weight;
unsupported ops and shapes raise.
Two processes (gloo, CPU device mesh): fully_shard over converted LoRA + Linear4bit layers
gives the single-process outputs and adapter gradients, with half of each weight per rank.
"""
from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from torch_ops.fsdp4bit import Shardable4bitWeight, prepare_for_fsdp
from torch_ops.linear4bit import Linear4bit, LinearNF4
from torch_ops.lora import LoRA

WORLD = 2
# fp32 everywhere; the FSDP run computes the same products on the same values (the only
# new arithmetic is FSDP's gradient average of two identical gradients), so ~1 ulp at most
RTOL, ATOL = 1e-6, 1e-7


def _layer(quant_type, compress_statistics, out_f=96, in_f=256, seed=0):
    torch.manual_seed(seed)
    return Linear4bit(in_f, out_f, quant_type=quant_type,
                      compress_statistics=compress_statistics).to("cpu")


FORMATS = [(qt, cs) for qt in ("nf4", "fp4") for cs in (False, True)]


@pytest.mark.parametrize("quant_type,compress_statistics", FORMATS)
@pytest.mark.parametrize("out_f,in_f", [(96, 256), (10, 128)])
def test_conversion_keeps_forward_and_backward(quant_type, compress_statistics, out_f, in_f):
    layer = _layer(quant_type, compress_statistics, out_f, in_f)
    x = torch.randn(3, 5, in_f, requires_grad=True)
    y0 = layer(x)
    (y0 * torch.linspace(-1, 1, out_f)).sum().backward()
    gx0, gb0 = x.grad.clone(), layer.bias.grad.clone()
    x.grad = layer.bias.grad = None
    w_before = layer.weight

    assert prepare_for_fsdp(layer) is layer
    w = layer.weight
    assert isinstance(w, Shardable4bitWeight) and isinstance(w, nn.Parameter)
    assert not w.requires_grad and w.shape == (out_f, in_f) and w.dtype == torch.float32
    assert w.packed.shape == (out_f, in_f // 2) and w.packed.dtype == torch.uint8
    assert w.absmax.shape == (out_f, in_f // 64) and w.absmax.dtype == torch.float32
    y1 = layer(x)
    (y1 * torch.linspace(-1, 1, out_f)).sum().backward()
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, x.grad)
    assert torch.equal(gb0, layer.bias.grad)
    assert w.grad is None
    # the bytes are Params4bit's own, row by row
    assert torch.equal(w.packed.reshape(-1), w_before.data.reshape(-1))


@pytest.mark.parametrize("quant_type,compress_statistics", FORMATS)
def test_dim0_shards_are_the_weight_rows(quant_type, compress_statistics):
    from qkernels.fourbit import dequantize_4bit
    layer = _layer(quant_type, compress_statistics, out_f=96, in_f=256)
    full = dequantize_4bit(layer.weight.data, layer.weight.quant_state, out_dtype=torch.float32)
    w = prepare_for_fsdp(layer).weight
    assert torch.equal(w.dequantize(), full)
    assert w.dequantize(torch.bfloat16).dtype == torch.bfloat16
    for parts in (torch.chunk(w, 2), torch.chunk(w, 5, dim=0), torch.split(w, [7, 64, 25])):
        start = 0
        for part in parts:
            rows = part.shape[0]
            assert isinstance(part, Shardable4bitWeight) and part.packed.shape[0] == rows
            assert torch.equal(part.dequantize(), full[start:start + rows])
            start += rows
        assert start == w.shape[0]
    assert torch.equal(w.narrow(0, 30, 17).dequantize(), full[30:47])
    # FSDP2's padding path: new_zeros + narrow + copy_, then flat view and identity as_strided
    padded = w.new_zeros((50, 256))
    assert torch.equal(padded.dequantize().abs(), torch.zeros(50, 256))
    padded.narrow(0, 0, 48).copy_(torch.chunk(w, 2)[1])
    assert torch.equal(padded.dequantize()[:48], full[48:])
    assert padded.view(-1).shape == (50 * 256,)
    same = torch.as_strided(w, (96, 256), (256, 1), 0)
    assert torch.equal(same.dequantize(), full)
    assert torch.equal(w.clone().dequantize(), full)
    assert torch.equal(w.to(torch.bfloat16).dequantize(torch.float32), full)


class _Mesh:
    """Stand-in for a 1-D DeviceMesh (the hooks only ask its size)."""

    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_all_gather_hooks_rebuild_the_weight(compress_statistics):
    w = prepare_for_fsdp(_layer("fp4", compress_statistics)).weight
    full = w.dequantize()
    shards = torch.chunk(w, 3)
    inputs = [s.fsdp_pre_all_gather(_Mesh(3), w.shape, w.stride(), None, None) for s in shards]
    (packed0, absmax0), metadata = inputs[0]
    assert packed0.shape == (32, 128) and absmax0.shape == (32, 4)
    # what FSDP2's all-gather hands back: every rank's inputs concatenated in rank order
    gathered = tuple(torch.cat([i[0][k] for i in inputs]) for k in range(2))
    rebuilt, inner = shards[1].fsdp_post_all_gather(gathered, metadata, torch.float32)
    assert isinstance(rebuilt, Shardable4bitWeight) and rebuilt.shape == w.shape
    assert torch.equal(rebuilt.dequantize(), full)
    assert inner[0] is gathered[0] and inner[1] is gathered[1]
    # the reuse path: fills ``out`` in place (here from other storage, so by copying)
    out = w.new_zeros(w.shape)
    assert shards[0].fsdp_post_all_gather(gathered, metadata, torch.float32, out=out) is None
    assert torch.equal(out.dequantize(), full)
    with pytest.raises(ValueError, match="multiple of the shard world size"):
        shards[0].fsdp_pre_all_gather(_Mesh(5), w.shape, w.stride(), None, None)


def test_unsupported_ops_and_shapes_raise():
    w = prepare_for_fsdp(_layer("nf4", True)).weight
    with pytest.raises(NotImplementedError, match="aten.add.Tensor"):
        w + 1
    with pytest.raises(NotImplementedError, match="aten.mm"):
        torch.mm(torch.ones(2, 96), w)
    with pytest.raises(NotImplementedError, match="dim 0"):
        torch.chunk(w, 2, dim=1)
    with pytest.raises(NotImplementedError, match="as_strided"):
        torch.as_strided(w, (48, 256), (256, 1), 256)
    with pytest.raises(NotImplementedError, match="copy_ from a plain tensor"):
        w.copy_(torch.zeros(96, 256))
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        prepare_for_fsdp(Linear4bit(96, 8, quant_type="nf4").to("cpu"))  # in=96, blocksize 64
    with pytest.raises(ValueError, match="not quantized yet"):
        prepare_for_fsdp(Linear4bit(128, 8, device="meta"))


# --- two processes: FSDP2 over gloo ------------------------------------------------------------

def _model(seed=0):
    """Two LoRA-wrapped NF4 layers 256 -> 256 (double quantization, as QLoRA), B non-zero."""
    torch.manual_seed(seed)
    model = nn.Sequential(LoRA(LinearNF4(256, 256, compress_statistics=True), rank=8),
                          nn.GELU(),
                          LoRA(LinearNF4(256, 256, compress_statistics=True), rank=8)).to("cpu")
    for m in model.modules():
        if isinstance(m, LoRA):
            nn.init.normal_(m.lora_B.weight, std=0.02)  # a zero B would give A a zero grad
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 256, generator=g) for _ in range(2)]


def _run(model, fsdp: bool):
    """Two forward/backward steps; returns ([outputs], [{adapter name: full grad}])."""
    outs, grads = [], []
    for x in _inputs():
        y = model(x)
        (y ** 2).mean().backward()
        step = {}
        for name, p in model.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if fsdp else p.grad
                step[name] = g.detach().clone()
        outs.append(y.detach().clone())
        grads.append(step)
        model.zero_grad(set_to_none=True)
    return outs, grads


def _worker(rank, port, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = prepare_for_fsdp(_model())
        for m in model:
            if isinstance(m, LoRA):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        outs, grads = _run(model, fsdp=True)
        # after backward every weight is resharded: this rank's half of the rows
        local = {}
        for name, p in model.named_parameters():
            if name.endswith("base_layer.weight"):
                shard = p.to_local()
                assert isinstance(shard, Shardable4bitWeight), type(shard)
                local[name] = (shard.packed.numel(), shard.absmax.numel(), shard.dequantize())
        result = {"outs": outs, "grads": grads, "local": local}
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_ranks_match_single_process(tmp_path):
    import torch.multiprocessing as mp
    from torch.distributed.fsdp import fully_shard  # noqa: F401  imported once, before the fork
    # fork, not spawn: the ranks inherit the imported modules instead of importing torch,
    # torch.distributed and dynamo again (most of this test's time); each uses one thread
    path = os.path.join(tmp_path, "fsdp.pt")
    mp.start_processes(_worker, args=(_free_port(), path), nprocs=WORLD, join=True,
                       start_method="fork")
    per_rank = torch.load(path, weights_only=False)

    ref = prepare_for_fsdp(_model())  # the same (converted) model in one process
    ref_outs, ref_grads = _run(ref, fsdp=False)
    plain_outs, plain_grads = _run(_model(), fsdp=False)  # never converted
    for a, b in zip(ref_outs, plain_outs):
        assert torch.equal(a, b)
    for step_a, step_b in zip(ref_grads, plain_grads):
        assert step_a.keys() == step_b.keys()
        assert all(torch.equal(step_a[k], step_b[k]) for k in step_a)

    adapters = {n for n, _ in ref.named_parameters() if ".lora_" in n}
    assert len(adapters) == 4
    for rank, res in enumerate(per_rank):
        for y, y_ref in zip(res["outs"], ref_outs):
            torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
        for step, step_ref in zip(res["grads"], ref_grads):
            assert set(step) == adapters == set(step_ref)  # only adapters get gradients
            for name in adapters:
                assert step[name].abs().max() > 0
                torch.testing.assert_close(step[name], step_ref[name], rtol=RTOL, atol=ATOL)
        assert len(res["local"]) == 2
        for name, (packed_numel, absmax_numel, rows) in res["local"].items():
            w = ref.get_parameter(name)
            assert packed_numel * WORLD == w.packed.numel() == 256 * 256 // 2
            assert absmax_numel * WORLD == w.absmax.numel()
            half = w.shape[0] // WORLD
            assert torch.equal(rows, w.dequantize()[rank * half:(rank + 1) * half])


# --- FSDP1 (FullyShardedDataParallel), two processes over gloo ---------------------------------

def _qlora_model(quant_type, seed=0):
    """bitsandbytes' tests/fsdp_state_dict_save.py model: a frozen 4-bit base and an adapter."""
    torch.manual_seed(seed)
    model = nn.ModuleDict({"base": Linear4bit(64, 64, bias=False, quant_type=quant_type),
                           "adapter": nn.Linear(64, 64, bias=False)}).to("cpu")
    model.base.weight.requires_grad_(False)
    return model


def _flat_model(seed=0):
    """NF4 with bfloat16 quant_storage (what FSDP1 can flatten and shard) and a bf16 Linear."""
    torch.manual_seed(seed)
    model = nn.Sequential(LinearNF4(64, 64, quant_storage=torch.bfloat16, compute_dtype=torch.bfloat16),
                          nn.Linear(64, 32)).to("cpu").to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def _fsdp1_worker(rank, port, path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        cpu = torch.device("cpu")
        result = {}
        # bitsandbytes' fsdp_state_dict_save: the frozen uint8 base is ignored by FSDP; the full
        # state_dict walks "base.weight.absmax" etc. by getattr (Params4bit's accessors).
        # cpu_offload=True (bitsandbytes' script, on CUDA) is left out: on CPU with two ranks
        # torch itself crashes there, with or without 4-bit layers (torch 2.13)
        for quant_type in ("nf4", "fp4"):
            model = _qlora_model(quant_type)
            fsdp = FSDP(model, device_id=cpu, ignored_states=list(model.base.parameters()),
                        use_orig_params=True)
            options = StateDictOptions(full_state_dict=True)
            result[quant_type] = get_model_state_dict(fsdp, options=options)
        # FSDP1 shards the flattened bf16 payload and hands the layer plain views in forward
        x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
        for use_orig_params in (True, False):
            fsdp = FSDP(_flat_model(), device_id=cpu, use_orig_params=use_orig_params)
            result[f"forward_{use_orig_params}"] = [fsdp(x).detach().clone() for _ in range(2)]
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, path)
    finally:
        dist.destroy_process_group()


def test_fsdp1_state_dict_save_and_sharded_forward(tmp_path):
    import torch.multiprocessing as mp
    from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401  before the fork
    path = os.path.join(tmp_path, "fsdp1.pt")
    mp.start_processes(_fsdp1_worker, args=(_free_port(), path), nprocs=WORLD, join=True,
                       start_method="fork")
    per_rank = torch.load(path, weights_only=False)
    x = torch.randn(3, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _flat_model()(x)
    for res in per_rank:
        for quant_type in ("nf4", "fp4"):
            sd = res[quant_type]
            ref = _qlora_model(quant_type).state_dict()
            assert set(sd) == set(ref), (sorted(sd), sorted(ref))
            assert {"base.weight", "base.weight.absmax", "base.weight.quant_map",
                    f"base.weight.quant_state.bitsandbytes__{quant_type}", "adapter.weight"} <= set(sd)
            for key, value in ref.items():
                assert torch.equal(sd[key], value), key
        for use_orig_params in (True, False):
            for y in res[f"forward_{use_orig_params}"]:
                assert torch.equal(y, expected)
