"""Benchmark section "inference_layers": LinearNF4 (bf16) and Linear8bitLt inference (fp16,
has_fp16_weights=False, threshold 0 and 6) beside torch's nn.Linear in the same dtype and
bitsandbytes' layers, at batch 1, 16 and 4096 on 4096 -> 4096 and 4096 -> 14336 (issue 6).

Module time at the call site: a CUDA graph over ROTATE layers with distinct weights (one
reused weight would sit in L2), plus the eager time. Paths with a host synchronization
(bitsandbytes: its threshold path counts outlier columns on the host and it launches off
torch's stream) are timed eagerly only and say so in the note; ours, threshold 6 included,
is captured (the outlier count stays on the device). Bytes: the weight read once plus x and
out."""
from __future__ import annotations

from .timing import Row, bitsandbytes_or_none, cpu_interleaved_us, cuda_graph_us, eager_us

SECTION = "inference_layers"
SHAPES = {"small": [(4096, 4096)], "full": [(4096, 4096), (4096, 14336)]}
BATCHES = {"small": [1, 4096], "full": [1, 16, 4096]}
ROTATE = 4



def _time(layers, xs, graph: bool):
    import torch
    calls = [lambda m=m, x=x: m(x) for m, x in zip(layers, xs)]
    with torch.no_grad():
        eager = eager_us(calls)
        if not graph:
            return eager, eager, "eager loop"
        try:
            return cuda_graph_us(calls), eager, ""
        except Exception as e:  # a path that cannot be captured is reported, not fatal
            return eager, eager, f"eager (graph failed: {type(e).__name__})"


def _linears(in_f, out_f, dtype):
    import torch
    return [torch.nn.Linear(in_f, out_f, device="cuda", dtype=dtype) for _ in range(ROTATE)]


def _rows_for(op, size, dtype, results, weight_bytes, batch, in_f, out_f, es):
    rows = []
    ours = [k for k in results if k.startswith("qkernels")]
    for backend, (us, eager, note) in results.items():
        row = Row(SECTION, op, size, dtype, backend, us, eager,
                  bytes=weight_bytes + batch * (in_f + out_f) * es,
                  flops=2.0 * batch * in_f * out_f, note=note)
        if backend in ours:
            if "bitsandbytes" in results:
                row.ratios["bnb"] = results["bitsandbytes"][0] / us
            if "torch" in results:
                row.ratios["torch"] = results["torch"][0] / us
        rows.append(row)
    return rows


def gpu_rows(sizes: str = "full") -> list[Row]:
    import torch
    from torch_ops.linear4bit import LinearNF4
    from torch_ops.linear8bit import Linear8bitLt
    bnb = bitsandbytes_or_none()
    rows = []
    for in_f, out_f in SHAPES[sizes]:
        size_base = f"{in_f}->{out_f}"
        # NF4, bf16
        base = _linears(in_f, out_f, torch.bfloat16)
        ours = [LinearNF4.from_linear(m) for m in base]
        theirs = []
        if bnb is not None:
            for m in base:
                b = bnb.nn.Linear4bit(in_f, out_f, compute_dtype=torch.bfloat16, quant_type="nf4")
                b.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
                theirs.append(b.cuda())
        wbytes = ours[0].quantized_bytes()
        for batch in BATCHES[sizes]:
            xs = [torch.randn(batch, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATE)]
            results = {"qkernels": _time(ours, xs, True), "torch": _time(base, xs, True)}
            if theirs:
                results["bitsandbytes"] = _time(theirs, xs, False)
            rows += _rows_for("LinearNF4", f"{size_base} b{batch}", "bfloat16", results, wbytes,
                              batch, in_f, out_f, 2)
        del base, ours, theirs
        torch.cuda.empty_cache()
        # LLM.int8(), fp16
        base = _linears(in_f, out_f, torch.float16)
        for threshold in (0.0, 6.0):
            ours = [Linear8bitLt.from_linear(m, threshold=threshold) for m in base]
            theirs = []
            if bnb is not None:
                for m in base:
                    b = bnb.nn.Linear8bitLt(in_f, out_f, has_fp16_weights=False, threshold=threshold)
                    b.load_state_dict({k: v.cpu() for k, v in m.state_dict().items()})
                    theirs.append(b.cuda().eval())
            wbytes = ours[0].quantized_bytes()
            for batch in BATCHES[sizes]:
                xs = [torch.randn(batch, in_f, device="cuda", dtype=torch.float16) for _ in range(ROTATE)]
                if threshold:
                    for x in xs:
                        x[:, :: in_f // 8] *= 20  # ~8 outlier columns, as in LLM.int8()'s models
                results = {f"qkernels t={threshold:g}": _time(ours, xs, True),
                           "torch": _time(base, xs, True)}
                if theirs:
                    results["bitsandbytes"] = _time(theirs, xs, False)
                rows += _rows_for("Linear8bitLt", f"{size_base} b{batch}", "float16", results,
                                  wbytes, batch, in_f, out_f, 2)
            del ours, theirs
            torch.cuda.empty_cache()
        del base
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """The CPU path (NumPy reference) of both layers beside bitsandbytes' CPU backend at
    1024 -> 1024, batch 1, float32."""
    import torch
    from torch_ops.linear4bit import LinearNF4
    from torch_ops.linear8bit import Linear8bitLt
    lin = torch.nn.Linear(1024, 1024)
    x = torch.randn(1, 1024)
    fns = {"qkernels NF4": LinearNF4.from_linear(lin), "qkernels int8": Linear8bitLt.from_linear(lin),
           "torch": lin}
    bnb = bitsandbytes_or_none()
    if bnb is not None:
        b4 = bnb.nn.Linear4bit(1024, 1024, quant_type="nf4")
        b4.load_state_dict(lin.state_dict())
        b8 = bnb.nn.Linear8bitLt(1024, 1024, has_fp16_weights=False)
        b8.load_state_dict(lin.state_dict())
        fns["bitsandbytes NF4"], fns["bitsandbytes int8"] = b4.to("cpu").eval(), b8.to("cpu").eval()
    with torch.no_grad():
        us = cpu_interleaved_us({k: (lambda m=m: m(x)) for k, m in fns.items()})
    return [Row(SECTION, "layer forward", "1024->1024 b1", "float32", k + " (CPU)", v,
                bytes=0.0, flops=2.0 * 1024 * 1024) for k, v in us.items()]
