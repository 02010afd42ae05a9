"""Benchmark section "layers": forward + backward of one training layer (SwitchBackLinear
variants, LinearFP8Mixed / LinearFP8Global, simulated and native) beside bf16 nn.Linear and,
where importable, bitsandbytes' Triton SwitchBack. Shapes are issue 5's (tokens x in -> out).
Time is eager (CUDA events around forward + backward, median of rounds): autograd's
backward is not captured into a CUDA graph here. FLOPs: 6 * tokens * in * out."""
from __future__ import annotations

from .timing import Row, eager_us

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
    try:
        from bitsandbytes.nn.triton_based_modules import SwitchBackLinearGlobal as BnbSB
        out["bnb SwitchBackLinearGlobal (Triton)"] = lambda: BnbSB(k, n, **kw)
    except Exception:
        pass
    return out


def _fwd_bwd_us(make, x, g) -> float:
    layer = make()

    def step():
        layer.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        layer(xx).backward(g)

    for _ in range(3):
        step()
    return eager_us([step], rounds=7)


def gpu_rows(sizes: str = "full") -> list[Row]:
    import torch
    rows = []
    for m, k, n in GPU_SIZES[sizes]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        times = {}
        for name, make in _layers(k, n).items():
            try:
                times[name] = _fwd_bwd_us(make, x, g)
            except Exception as exc:  # a variant that cannot run here is reported, not fatal
                rows.append(Row(SECTION, name, f"{m}x{k}->{n}", "bfloat16", "-", float("nan"),
                                note=f"failed: {type(exc).__name__}: {str(exc)[:80]}"))
            torch.cuda.empty_cache()
        for name, us in times.items():
            row = Row(SECTION, name, f"{m}x{k}->{n}", "bfloat16",
                      "torch" if name == "nn.Linear" else "qkernels", us, us,
                      flops=6.0 * m * k * n, note="fwd+bwd, eager")
            if name != "nn.Linear":
                row.ratios["torch"] = times["nn.Linear"] / us
            bnb = "bnb SwitchBackLinearGlobal (Triton)"
            if bnb in times and name.startswith("SwitchBack") and name != bnb:
                row.ratios["bnb"] = times[bnb] / us
            rows.append(row)
        del x, g
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
