"""Benchmark section "host_path": the inference layers as users call them, eagerly.

Three measurements, each beside nn.Linear in the same dtype and, where importable,
bitsandbytes' layer, all in one run:
- host time per forward: a 64 -> 64 layer, 1 row (GPU time negligible), 1,000 calls and one
  synchronize at the end, wall clock per call (``timing.host_us``): the Python, allocation and
  launch cost of one forward. The "time" column holds it.
- steady eager: 20 forwards back to back over 4 rotated weights (one reused weight would sit
  in L2), CUDA events (``timing.steady_eager_us``), as ``model.generate()`` runs its layers;
  in the "eager" column, with the graph time of the same calls in "time" (graph against
  graph, eager against eager: the ratios compare eager with eager).
- shapes: LinearNF4 bf16 4096 -> 14336 at 1 and 16 rows; Linear8bitLt fp16 4096 -> 4096
  (has_fp16_weights=False) at 1 and 16 rows, threshold 0 and 6 (with ~8 outlier columns).
"""
from __future__ import annotations

from .timing import Row, bitsandbytes_or_none, cuda_graph_us, host_us, steady_eager_us

SECTION = "host_path"
ROTATE = 4



def _bnb_layer(bnb, kind: str, linear, threshold: float = 0.0):
    """bitsandbytes' layer with ``linear``'s weights, on the GPU."""
    import torch
    in_f, out_f = linear.in_features, linear.out_features
    if kind == "nf4":
        b = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.bfloat16, quant_type="nf4")
    else:
        b = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False, threshold=threshold)
    b.load_state_dict({k: v.cpu() for k, v in linear.state_dict().items()})
    return b.cuda().eval()


def _contenders(kind: str, in_f: int, out_f: int, threshold: float, count: int):
    """{name: [layers]}: ours, nn.Linear and bitsandbytes' (when importable), same weights."""
    import torch
    from torch_ops import Linear8bitLt, LinearNF4
    dtype = torch.bfloat16 if kind == "nf4" else torch.float16
    base = [torch.nn.Linear(in_f, out_f, device="cuda", dtype=dtype) for _ in range(count)]
    if kind == "nf4":
        ours = [LinearNF4.from_linear(m) for m in base]
    else:
        ours = [Linear8bitLt.from_linear(m, threshold=threshold) for m in base]
    out = {"qkernels": ours, "torch": base}
    bnb = bitsandbytes_or_none()
    if bnb is not None:
        out["bitsandbytes"] = [_bnb_layer(bnb, kind, m, threshold) for m in base]
    return out, dtype


def _inputs(rows: int, in_f: int, dtype, threshold: float):
    import torch
    xs = [torch.randn(rows, in_f, device="cuda", dtype=dtype) for _ in range(ROTATE)]
    if threshold:
        for x in xs:
            x[:, :: in_f // 8] *= 20  # ~8 outlier columns, as in LLM.int8()'s models
    return xs


def _label(kind: str, threshold: float) -> tuple[str, str]:
    if kind == "nf4":
        return "LinearNF4", "bfloat16"
    return f"Linear8bitLt t={threshold:g}", "float16"


def _ratios(rows: list[Row], attr: str) -> None:
    """Row.ratios of our row against the others of the same measurement."""
    times = {r.backend: getattr(r, attr) for r in rows}
    ours = [r for r in rows if r.backend == "qkernels"]
    for r in ours:
        for other, key in (("bitsandbytes", "bnb"), ("torch", "torch")):
            if other in times:
                r.ratios[key] = times[other] / getattr(r, attr)


def host_rows() -> list[Row]:
    import torch
    rows = []
    for kind, threshold in (("nf4", 0.0), ("int8", 0.0), ("int8", 6.0)):
        layers, dtype = _contenders(kind, 64, 64, threshold, 1)
        x = _inputs(1, 64, dtype, threshold)[0]
        op, name = _label(kind, threshold)
        group = []
        with torch.no_grad():
            for backend, (layer,) in layers.items():
                us = host_us(lambda m=layer: m(x))
                group.append(Row(SECTION, f"{op} host time", "64->64 b1", name, backend, us,
                                 note="1000 calls, one sync"))
        _ratios(group, "us")
        rows += group
    return rows


def steady_rows(sizes: str) -> list[Row]:
    import torch
    cases = [("nf4", 4096, 14336, 0.0), ("int8", 4096, 4096, 0.0), ("int8", 4096, 4096, 6.0)]
    batches = [1, 16] if sizes == "full" else [1]
    rows = []
    for kind, in_f, out_f, threshold in cases:
        layers, dtype = _contenders(kind, in_f, out_f, threshold, ROTATE)
        op, name = _label(kind, threshold)
        for batch in batches:
            xs = _inputs(batch, in_f, dtype, threshold)
            group = []
            with torch.no_grad():
                for backend, mods in layers.items():
                    calls = [lambda m=m, x=x: m(x) for m, x in zip(mods, xs)]
                    eager = steady_eager_us(calls)
                    # bitsandbytes launches some kernels off torch's stream and syncs the host
                    # on its threshold path: not captured (a failed capture spoils the process)
                    graph, note = (cuda_graph_us(calls), "") if backend != "bitsandbytes" else \
                        (float("nan"), "eager only")
                    group.append(Row(SECTION, f"{op} steady eager", f"{in_f}->{out_f} b{batch}", name,
                                     backend, graph, eager,
                                     bytes=_weight_bytes(mods[0]) + batch * (in_f + out_f) * 2,
                                     note=note))
            _ratios(group, "eager_us")
            rows += group
        del layers
        torch.cuda.empty_cache()
    return rows


def _weight_bytes(layer) -> float:
    if hasattr(layer, "quantized_bytes"):
        return float(layer.quantized_bytes())
    w = layer.weight
    return float(w.numel() * w.element_size())


def gpu_rows(sizes: str = "full") -> list[Row]:
    return host_rows() + steady_rows(sizes)


def cpu_rows(sizes: str = "full") -> list[Row]:
    return []  # a host-path measurement of CUDA launches: GPU only
