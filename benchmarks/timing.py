"""Timing and ceilings shared by every benchmark section.

Kernel time: a CUDA graph of many calls cycling over >= 4 input sets (so inputs larger than
L2 come from HBM), replayed several times; the median per-call time of CUDA events over the
replays. Eager time: the same calls launched one by one from Python, as a user's call site
sees them (host overhead included). CPU time: the median of wall-clock repeats.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Sequence


def bitsandbytes_or_none():
    """The bitsandbytes module when it imports (its rows sit beside ours), else None."""
    try:
        import bitsandbytes
        return bitsandbytes
    except Exception:  # missing, or a build without this machine's CUDA
        return None


@dataclasses.dataclass
class Row:
    """One line of a results table."""
    section: str
    op: str
    size: str
    dtype: str
    backend: str
    us: float                      # median per-call time (graph on GPU, wall on CPU)
    eager_us: float | None = None  # per-call time of eager launches (GPU only)
    bytes: float = 0.0             # bytes read + written per call
    flops: float = 0.0             # operations per call (GEMMs)
    note: str = ""
    ratios: dict = dataclasses.field(default_factory=dict)  # name -> other_time / our_time

    @property
    def gbps(self) -> float:
        return self.bytes / self.us / 1e3 if self.bytes else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / self.us / 1e6 if self.flops else 0.0


def cuda_graph_us(calls: Sequence[Callable[[], object]], replays: int = 7,
                  target_ms: float = 20.0) -> float:
    """Median microseconds per call of ``calls`` (one closure per rotated input set),
    captured into one CUDA graph that runs the rotation enough times to last ~target_ms."""
    import torch
    for fn in calls:  # warm-up: compile, cache tables, allocate outside the capture
        fn()
    torch.cuda.synchronize()
    est = eager_us(calls, rounds=2) / 1e3
    reps = max(1, min(200, int(target_ms / max(est, 1e-3)) // len(calls)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for fn in calls:  # warm-up on the capture stream
            fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                for fn in calls:
                    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / (reps * len(calls)))
    return statistics.median(per_call)


def eager_us(calls: Sequence[Callable[[], object]], rounds: int = 5) -> float:
    """Microseconds per call of ``calls`` launched one by one (CUDA events, median round)."""
    import torch
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for fn in calls:
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(per_call)


def steady_eager_us(calls: Sequence[Callable[[], object]], n: int = 20, rounds: int = 7) -> float:
    """Microseconds per call of ``n`` calls launched back to back from Python (cycling over
    ``calls``), as a model's layers run under ``generate()``: the host's time per call when
    it exceeds the GPU's, the GPU's otherwise. Median of ``rounds`` CUDA-event rounds."""
    import torch
    seq = [calls[i % len(calls)] for i in range(n)]
    for fn in seq:  # warm-up
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for fn in seq:
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) * 1e3 / n)
    return statistics.median(per_call)


def host_us(fn: Callable[[], object], n: int = 1000, rounds: int = 5) -> float:
    """Host microseconds per call: ``n`` calls of ``fn`` and one synchronize at the end, wall
    clock; on a tiny layer (GPU time negligible) this is the Python and launch cost. Median of
    ``rounds``."""
    import torch
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times) * 1e6


def cpu_us(fn: Callable[[], object], repeat: int = 7) -> float:
    """Median wall-clock microseconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def cpu_interleaved_us(fns: dict, repeat: int = 7) -> dict:
    """Median wall-clock microseconds of each ``fns[name]()``, the repeats interleaved so
    that load from other processes hits every contender alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


_COPY_KERNEL = r"""
extern "C" __global__ void copy16(const uint4* __restrict__ src, uint4* __restrict__ dst, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) if (i + u * stride < n) v[u] = __ldg(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) if (i + u * stride < n) dst[i + u * stride] = v[u];
  }
}
"""


def copy_ceiling_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written): the best of torch's
    copy and a 16-byte-vector copy kernel, over 2 rotated 1 GiB buffers."""
    import torch
    n = nbytes // 4
    pairs = [(torch.empty(n, device="cuda"), torch.randn(n, device="cuda")) for _ in range(2)]
    best = cuda_graph_us([lambda d=d, s=s: d.copy_(s) for d, s in pairs], target_ms=50)
    try:
        import cupy
        import numpy as np
        kernel = cupy.RawKernel(_COPY_KERNEL, "copy16")
        sm = torch.cuda.get_device_properties(0).multi_processor_count

        def launch(d, s):
            stream = torch.cuda.current_stream().cuda_stream
            with cupy.cuda.ExternalStream(stream):
                kernel((sm * 8,), (256,), (cupy.from_dlpack(s), cupy.from_dlpack(d),
                                           np.int64(nbytes // 16)))
        best = min(best, cuda_graph_us([lambda d=d, s=s: launch(d, s) for d, s in pairs],
                                       target_ms=50))
    except Exception:  # no CuPy: torch's copy is the ceiling
        pass
    return 2 * nbytes / best / 1e3


def gemm_ceiling_tflops(n: int = 8192) -> float:
    """Measured bf16 cuBLAS rate on an n x n x n product of random data."""
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    us = cuda_graph_us([lambda: torch.matmul(a, b, out=out)], target_ms=50)
    return 2 * n**3 / us / 1e6
