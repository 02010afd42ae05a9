"""Soak (issue 25): 10,000 calls of every layer's forward and backward and of an 8-bit optimizer
step on one GPU. After the first 100 calls (warm-up: kernels compiled, plans and routes made,
the caching allocator's pools settled), allocated GPU memory stays within 1 MiB and no cache
of ours grows: a leak of one small tensor per call, or a plan kept per call, shows within
10,000 calls. The row count cycles through a few values, as prompts and decode steps do, so
caches keyed by shape are exercised rather than hit once.

Run on the device: ``python3 -m pytest -q -m gpu tests/test_soak.py -s`` prints one line per
layer (calls, seconds, allocated MiB after warm-up and at the end, cache sizes).
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import torch_ops
from torch_ops import optim as qoptim

CALLS = 10_000
WARMUP = 100
ROWS = (1, 3, 16, 5)  # cycled: decode-like and prefill-like row counts
SLACK = 1 << 20  # 1 MiB

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cache_sizes(layer) -> dict:
    """Sizes of the per-layer and per-process caches that a long run could grow."""
    from qkernels.fourbit import ops as ops4
    from qkernels.fp8 import ops as ops_fp8
    sizes = {"4bit_op_plans": len(ops4._OP_PLANS._plans), "fp8_routes": len(ops_fp8.fp8_scaled_mm_routes())}
    prepared = getattr(getattr(layer, "_plan", None), "_cuda", None)  # PreparedWeight4bit / 8bit
    for name in ("_matmul", "_dequant", "_launches", "_routes", "_row_quant_ctas"):
        d = getattr(prepared, name, None)
        if isinstance(d, dict):
            sizes[name] = len(d)
    return sizes


def _layers():
    IN, OUT = 512, 384
    yield "LinearNF4 bf16", torch_ops.LinearNF4(IN, OUT, compute_dtype=torch.bfloat16), torch.bfloat16
    yield "LinearFP4 fp16", torch_ops.LinearFP4(IN, OUT, compute_dtype=torch.float16), torch.float16
    yield "Linear4bit nf4 nested", torch_ops.Linear4bit(IN, OUT, quant_type="nf4",
                                                          compress_statistics=True), torch.bfloat16
    yield "Linear8bitLt t0", torch_ops.Linear8bitLt(IN, OUT, has_fp16_weights=False), torch.float16
    yield "Linear8bitLt t6", torch_ops.Linear8bitLt(IN, OUT, has_fp16_weights=False,
                                                    threshold=6.0), torch.float16
    yield "SwitchBackLinear", torch_ops.SwitchBackLinear(IN, OUT), torch.bfloat16
    yield "SwitchBackLinearGlobal", torch_ops.SwitchBackLinearGlobal(IN, OUT), torch.bfloat16
    yield "SwitchBackLinearVectorwise", torch_ops.SwitchBackLinearVectorwise(IN, OUT), torch.bfloat16
    yield "LinearFP8Mixed", torch_ops.LinearFP8Mixed(IN, OUT), torch.bfloat16
    yield "LinearFP8Global", torch_ops.LinearFP8Global(IN, OUT), torch.bfloat16


def _soak(step, warmup_then_measure) -> tuple[int, int, float]:
    """Run ``step(i)`` CALLS times; return (allocated after WARMUP calls, allocated at the end,
    seconds). ``warmup_then_measure()`` runs once after the warm-up (to record cache sizes)."""
    for i in range(WARMUP):
        step(i)
    torch.cuda.synchronize()
    warmup_then_measure()
    start_mem = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for i in range(WARMUP, CALLS):
        step(i)
    torch.cuda.synchronize()
    return start_mem, torch.cuda.memory_allocated(), time.perf_counter() - t0


@pytest.mark.parametrize("name,make,dtype", list(_layers()), ids=[n for n, _, _ in _layers()])
def test_layer_forward_backward_soak(name, make, dtype):
    torch.manual_seed(0)
    layer = make.cuda()
    IN = layer.in_features
    xs = {r: (torch.randn(r, IN, device="cuda", dtype=dtype) * 2).requires_grad_() for r in ROWS}
    for x in xs.values():
        with torch.no_grad():
            x[:, 7] = 9.0  # an outlier column for the threshold-6 layer

    def step(i):
        x = xs[ROWS[i % len(ROWS)]]
        if i % 2:  # forward only, as under generate()
            with torch.no_grad():
                layer(x)
        else:
            layer(x).float().square().mean().backward()
            x.grad = None
            for p in layer.parameters():
                p.grad = None

    warm = {}
    start, end, secs = _soak(step, lambda: warm.update(_cache_sizes(layer)))
    after = _cache_sizes(layer)
    print(f"\nsoak {name}: {CALLS} calls in {secs:.1f} s; allocated {start / 2**20:.2f} MiB after "
          f"{WARMUP} calls, {end / 2**20:.2f} MiB at the end; caches {after}")
    assert abs(end - start) <= SLACK, f"{name}: allocated memory moved by {(end - start) / 2**20:.2f} MiB"
    assert after == warm, f"{name}: caches grew after warm-up: {warm} -> {after}"


@pytest.mark.parametrize("opt_name", ["AdamW8bit", "Adam8bit", "PagedAdamW8bit"])
def test_optimizer_step_soak(opt_name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda()
    opt = getattr(qoptim, opt_name)(model.parameters(), lr=1e-4)
    x = torch.randn(8, 1024, device="cuda")

    def step(i):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    start, end, secs = _soak(step, lambda: None)
    print(f"\nsoak {opt_name}: {CALLS} steps in {secs:.1f} s; allocated {start / 2**20:.2f} MiB "
          f"after {WARMUP} steps, {end / 2**20:.2f} MiB at the end")
    assert abs(end - start) <= SLACK
    assert all(torch.isfinite(p).all() for p in model.parameters())
