"""Where a profiled training step goes, from torch.profiler events (the FSDP2 issue's first
question): collective time and how much of it overlaps compute, the optimizer's kernels,
and the time the GPU sits idle while the host prepares the next launch.

``breakdown(events, steps, wall_us)`` takes ``prof.events()`` (FunctionEvent objects: a
name, a device type and a ``time_range`` in microseconds) of ``steps`` training steps that
took ``wall_us`` in all, and returns per-step milliseconds:

- ``step``: wall time;
- ``gpu_busy``: the union of every GPU kernel's interval; ``idle`` = step - gpu_busy (host
  gaps: launch overhead, synchronizations, Python);
- ``comm``: the union of the collective kernels (NCCL; on CPU, gloo's and c10d's ops);
  ``comm_exposed``: the part of it during which no other kernel runs (what overlap would
  hide);
- ``optim`` / ``optim_launches``: the 8-bit optimizer's kernels (time, and launches per
  step: one per parameter tensor unless batched);
- ``compute``: the union of every other kernel.

Intervals are merged before they are summed, so concurrent kernels on several streams count
once. Without GPU kernels (a CPU run) only ``step`` and ``comm`` mean anything.
"""
from __future__ import annotations

_COMM_GPU = ("nccl",)
_COMM_CPU = ("gloo", "c10d::", "nccl:", "record_param_comms")
_OPTIM = ("optimizer_update",)


def union(intervals) -> list[tuple[float, float]]:
    """Sorted, disjoint intervals covering the same points as ``intervals`` ((start, end)
    pairs, end >= start)."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def length(intervals) -> float:
    return sum(e - s for s, e in union(intervals))


def overlap(a, b) -> float:
    """The total length covered by both interval sets."""
    a, b = union(a), union(b)
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            total += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _kind(name: str, on_gpu: bool) -> str:
    low = name.lower()
    if any(k in low for k in (_COMM_GPU if on_gpu else _COMM_CPU)):
        return "comm"
    if any(k in low for k in _OPTIM):
        return "optim"
    return "compute"


def breakdown(events, steps: int, wall_us: float) -> dict[str, float]:
    """Per-step figures (module docstring) of ``events`` covering ``steps`` steps."""
    gpu = {"comm": [], "optim": [], "compute": []}
    cpu_comm = []
    for ev in events:
        device = str(getattr(ev, "device_type", "")).rsplit(".", 1)[-1]
        span = (float(ev.time_range.start), float(ev.time_range.end))
        if device == "CUDA":
            gpu[_kind(ev.name, True)].append(span)
        elif _kind(ev.name, False) == "comm":
            cpu_comm.append(span)
    per = 1e-3 / max(1, steps)  # us in all -> ms per step
    every = gpu["comm"] + gpu["optim"] + gpu["compute"]
    busy = length(every)
    if every:
        comm = length(gpu["comm"])
        exposed = comm - overlap(gpu["comm"], gpu["optim"] + gpu["compute"])
    else:
        comm = exposed = length(cpu_comm)
    return {"step": wall_us * per, "gpu_busy": busy * per, "idle": (wall_us - busy) * per if every else 0.0,
            "comm": comm * per, "comm_exposed": exposed * per, "optim": length(gpu["optim"]) * per,
            "optim_launches": len(gpu["optim"]) / max(1, steps), "compute": length(gpu["compute"]) * per}


def describe(part: str, b: dict[str, float]) -> str:
    """One report line of a breakdown."""
    if b["gpu_busy"] == 0.0:
        return (f"- {part} profile (rank 0, CPU): step {b['step']:.1f} ms, of which collectives "
                f"{b['comm']:.1f} ms")
    return (f"- {part} profile (rank 0): step {b['step']:.1f} ms = GPU busy {b['gpu_busy']:.1f} ms + idle "
            f"{b['idle']:.1f} ms; collectives {b['comm']:.1f} ms, {b['comm_exposed']:.1f} ms of it with "
            f"nothing else running; compute {b['compute']:.1f} ms; optimizer {b['optim']:.2f} ms in "
            f"{b['optim_launches']:.0f} launches a step")
