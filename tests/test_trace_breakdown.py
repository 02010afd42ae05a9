"""benchmarks/trace_breakdown.py: the interval arithmetic and the per-step figures, on
synthetic profiler events (the GPU traces themselves come from the device)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.trace_breakdown import breakdown, length, overlap, union


def _ev(name, start, end, device="DeviceType.CUDA"):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))


def test_union_length_overlap():
    assert union([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert length([(0, 2), (1, 3), (10, 11)]) == 4
    assert overlap([(0, 10)], [(2, 3), (5, 12)]) == 6
    assert overlap([(0, 1)], [(1, 2)]) == 0
    assert overlap([], [(0, 1)]) == 0


def test_breakdown_of_two_gpu_steps():
    """Per step: NCCL 0-40 us of which 10-30 overlaps a GEMM, two optimizer launches of 5 us,
    a GEMM on a second stream inside the first: busy 0-40 and 50-60 -> 50 us of a 100 us step."""
    events = []
    for base in (0, 100):
        events += [_ev("ncclDevKernel_AllGather_RING_LL", base + 0, base + 40),
                   _ev("sm90_xmma_gemm_bf16", base + 10, base + 30),
                   _ev("ampere_gemm_small", base + 12, base + 20),   # concurrent: counted once
                   _ev("optimizer_update_8bit_blockwise<float>", base + 50, base + 55),
                   _ev("optimizer_update_8bit_blockwise<float>", base + 55, base + 60),
                   _ev("aten::mm", base + 0, base + 90, device="DeviceType.CPU")]  # host op: not a kernel
    b = breakdown(events, steps=2, wall_us=200.0)
    assert b["step"] == pytest.approx(0.1)
    assert b["gpu_busy"] == pytest.approx(0.05) and b["idle"] == pytest.approx(0.05)
    assert b["comm"] == pytest.approx(0.04) and b["comm_exposed"] == pytest.approx(0.02)
    assert b["optim"] == pytest.approx(0.01) and b["optim_launches"] == 2
    assert b["compute"] == pytest.approx(0.02)


def test_breakdown_of_a_cpu_run_reports_collectives_only():
    events = [_ev("gloo:all_gather", 0, 30, "DeviceType.CPU"), _ev("c10d::allgather_", 20, 40, "DeviceType.CPU"),
              _ev("aten::addmm", 40, 90, "DeviceType.CPU")]
    b = breakdown(events, steps=1, wall_us=100.0)
    assert b["step"] == pytest.approx(0.1) and b["comm"] == pytest.approx(0.04)
    assert b["gpu_busy"] == 0 and b["idle"] == 0
