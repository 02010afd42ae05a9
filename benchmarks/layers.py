"""Benchmark section "layers": forward + backward of one training layer (SwitchBackLinear
variants, LinearFP8Mixed / LinearFP8Global, simulated and native) beside bf16 nn.Linear and,
where importable, bitsandbytes' Triton SwitchBack. Shapes are issue 5's (tokens x in -> out).

Three times per layer, each a median of CUDA events:
- graph: the step (forward, then ``torch.autograd.grad`` of the output against the input,
  weight and bias) captured into a CUDA graph over 4 rotated input sets: GPU time, host cost
  excluded. Only for the layers whose step is capturable (no host synchronization, no
  allocator outside torch): nn.Linear, SwitchBack int8 and fp8, LinearFP8Mixed native.
- eager: 4 steps launched back to back from Python (a training loop's steady state: the host
  may run ahead of the GPU while it can).
- one step from idle (in the note): a single eager step after a synchronization, so the host
  time before the first kernel and between kernels is all exposed.
FLOPs: 6 * tokens * in * out."""
from __future__ import annotations

from .timing import Row, cuda_graph_us, eager_us

SECTION = "layers"
GPU_SIZES = {"small": [(4096, 1024, 4096)],
             "full": [(16384, 4096, 16384), (32768, 1024, 4096), (32768, 4096, 1024)]}


def _layers(k: int, n: int):
    import torch
    from torch_ops import fp8, switchback as sb
    kw = dict(device="cuda", dtype=torch.bfloat16)
    out = {
        "nn.Linear": lambda: torch.nn.Linear(k, n, **kw),
        "SwitchBackLinearGlobal": lambda: sb.SwitchBackLinearGlobal(k, n, **kw),
        "SwitchBackLinearGlobalMemEfficient": lambda: sb.SwitchBackLinearGlobalMemEfficient(k, n, **kw),
        "SwitchBackLinearVectorwise": lambda: sb.SwitchBackLinearVectorwise(k, n, **kw),
        "LinearFP8Mixed": lambda: fp8.LinearFP8Mixed(k, n, **kw),
        "LinearFP8Global": lambda: fp8.LinearFP8Global(k, n, **kw),
    }
    if torch.cuda.get_device_capability() >= (8, 9):
        out["SwitchBackLinear fp8"] = lambda: sb.SwitchBackLinear(k, n, quant_dtype="fp8", **kw)
        out["LinearFP8Mixed native"] = lambda: fp8.LinearFP8Mixed(k, n, native=True, **kw)
        out["LinearFP8Mixed native, fp8 dW"] = lambda: fp8.LinearFP8Mixed(
            k, n, native=True, fp8_weight_grad=True, **kw)
    try:
        from bitsandbytes.nn.triton_based_modules import SwitchBackLinearGlobal as BnbSB
        out["bnb SwitchBackLinearGlobal (Triton)"] = lambda: BnbSB(k, n, **kw)
    except Exception:
        pass
    return out


_CAPTURABLE = ("nn.Linear", "SwitchBackLinear", "LinearFP8Mixed native")


def _fwd_bwd_us(name, make, xs, gs) -> tuple[float, float, float]:
    """(graph, eager, one step from idle) microseconds per forward + backward step."""
    import torch
    layer = make()
    params = list(layer.parameters())

    def step(x, g):
        xx = x.detach().requires_grad_()
        torch.autograd.grad(layer(xx), [xx] + params, g)

    steps = [lambda x=x, g=g: step(x, g) for x, g in zip(xs, gs)]
    for fn in steps:
        fn()
    idle = eager_us(steps[:1], rounds=7)
    eager = eager_us(steps, rounds=7)
    graph = float("nan")
    if name.startswith(_CAPTURABLE):
        graph = cuda_graph_us(steps, replays=5, target_ms=60.0)
    return graph, eager, idle


def gpu_rows(sizes: str = "full") -> list[Row]:
    import torch
    rows = []
    for m, k, n in GPU_SIZES[sizes]:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        gs = [torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        times = {}
        for name, make in _layers(k, n).items():
            try:
                times[name] = _fwd_bwd_us(name, make, xs, gs)
            except Exception as exc:  # a variant that cannot run here is reported, not fatal
                rows.append(Row(SECTION, name, f"{m}x{k}->{n}", "bfloat16", "-", float("nan"),
                                note=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
            torch.cuda.empty_cache()
        base = times.get("nn.Linear")
        for name, (graph, eager, idle) in times.items():
            captured = graph == graph
            note = f"fwd+bwd; one step from idle {idle:.0f} us"
            if name != "nn.Linear" and base is not None:
                note += f"; eager vs nn.Linear {base[1] / eager:.2f}x"
            row = Row(SECTION, name, f"{m}x{k}->{n}", "bfloat16",
                      "torch" if name == "nn.Linear" else "qkernels",
                      graph if captured else eager, eager, flops=6.0 * m * k * n,
                      note=note + ("" if captured else "; not capturable: time is eager"))
            if name != "nn.Linear" and base is not None:
                # graph against graph where both exist, else eager against eager
                row.ratios["torch"] = base[0] / graph if captured else base[1] / eager
            bnb = "bnb SwitchBackLinearGlobal (Triton)"
            if bnb in times and name.startswith("SwitchBack") and name != bnb:
                row.ratios["bnb"] = times[bnb][1] / eager
            rows.append(row)
        del xs, gs
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """CPU (the NumPy reference path): one small layer, for orientation only."""
    import torch
    from .timing import cpu_us
    from torch_ops import fp8, switchback as sb
    m, k, n = 256, 512, 512
    x = torch.randn(m, k)
    g = torch.randn(m, n)
    rows = []
    makes = {"nn.Linear": lambda: torch.nn.Linear(k, n),
             "SwitchBackLinearGlobal": lambda: sb.SwitchBackLinearGlobal(k, n),
             "LinearFP8Mixed": lambda: fp8.LinearFP8Mixed(k, n)}
    times = {}
    for name, make in makes.items():
        layer = make()

        def step(layer=layer):
            layer.zero_grad(set_to_none=True)
            layer(x.detach().requires_grad_()).backward(g)
        times[name] = cpu_us(step)
    for name, us in times.items():
        row = Row(SECTION, name, f"{m}x{k}->{n}", "float32", "numpy (CPU)", us,
                  flops=6.0 * m * k * n, note="fwd+bwd")
        if name != "nn.Linear":
            row.ratios["torch"] = times["nn.Linear"] / us
        rows.append(row)
    return rows
