"""Benchmark section "fourbit": quantize_4bit / dequantize_4bit (NF4, bf16, blocksize 64,
with and without double quantization) and matmul_4bit at batch 1 / 16 / 64 / 4096, beside
torch bf16 and bitsandbytes. Bytes: quantize reads 2 and writes 1/2 byte per element (+4 per
block); dequantize the reverse; the fused matmuls read the packed weight, absmax, x and
write out. The matmul rows for batch 1-64 show each kernel that can take the batch side by
side (qkernels.fourbit._cupy.choose_kernel's choice, forced with kernel=): gemv_4bit (one
row), the tensor-core kernel matmul_4bit_mma (1-64 rows), the CUDA-core matmul_4bit (up to
16 rows) and dequantize + cuBLAS; their crossovers set the choice. Every matmul row's note
gives its time as a fraction of the same run's bf16 cuBLAS linear (issue 26's yardstick)."""
from __future__ import annotations

import numpy as np

from qkernels._backend import HOST_BACKENDS

from .timing import Row, cpu_interleaved_us, cuda_graph_us, eager_us

SECTION = "fourbit"
ROTATE = 4
QUANT_SIZES = {"small": [(4096, 4096)], "full": [(4096, 4096), (8192, 8192)]}
MATMUL_SHAPES = {"small": [(4096, 4096)], "full": [(4096, 14336), (8192, 8192), (4096, 4096)]}
BATCHES = {"small": [1, 16, 64], "full": [1, 2, 4, 8, 16, 32, 64, 4096]}


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        return bnb, F
    except Exception:
        return None, None


def _size(shape) -> str:
    return "x".join(map(str, shape))


def gpu_rows(sizes: str = "full") -> list[Row]:
    import torch
    import qkernels
    import qkernels.fourbit as qf
    bnb, F = _bnb()
    rows: list[Row] = []
    dt = torch.bfloat16
    for shape in QUANT_SIZES[sizes]:
        n = shape[0] * shape[1]
        xs = [torch.randn(shape, device="cuda", dtype=dt) for _ in range(ROTATE)]
        qbytes = n * 2 + n / 2 + 4 * n / 64
        for nested in (False, True):
            tag = f"{_size(shape)} bs64" + (" dq" if nested else "")
            results = {}
            for backend in qkernels.available_backends():
                if backend in HOST_BACKENDS:  # host data only; timed by the cpu section
                    continue
                with qkernels.use_backend(backend):
                    qcalls = [lambda x=x: qf.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                                           compress_statistics=nested) for x in xs]
                    qs = [q() for q in qcalls]
                    dcalls = [lambda q=q: qf.dequantize_4bit(*q) for q in qs]
                    results[backend] = (cuda_graph_us(qcalls), eager_us(qcalls),
                                        cuda_graph_us(dcalls), eager_us(dcalls))
            if F is not None:
                bq = [lambda x=x: F.quantize_4bit(x, blocksize=64, quant_type="nf4",
                                                  compress_statistics=nested) for x in xs]
                bqs = [f() for f in bq]
                bd = [lambda q=q: F.dequantize_4bit(*q) for q in bqs]
                # bitsandbytes may launch off torch's current stream: timed as an eager loop
                results["bitsandbytes"] = (eager_us(bq), None, eager_us(bd), None)
            for backend, (q_us, q_eager, d_us, d_eager) in results.items():
                note = "eager loop" if backend == "bitsandbytes" else ""
                rq = Row(SECTION, "quantize_4bit nf4", tag, "bfloat16", backend, q_us, q_eager,
                         bytes=qbytes, note=note)
                rd = Row(SECTION, "dequantize_4bit nf4", tag, "bfloat16", backend, d_us, d_eager,
                         bytes=qbytes, note=note)
                if "bitsandbytes" in results and backend != "bitsandbytes":
                    rq.ratios["bnb"] = results["bitsandbytes"][0] / q_us
                    rd.ratios["bnb"] = results["bitsandbytes"][2] / d_us
                rows += [rq, rd]
        del xs
        torch.cuda.empty_cache()
    rows += _matmul_rows(sizes)
    return rows


def _matmul_rows(sizes: str) -> list[Row]:
    import torch
    import qkernels.fourbit as qf
    from qkernels.blockwise import dequantize_blockwise
    from qkernels.fourbit import _cupy
    bnb, F = _bnb()
    dt = torch.bfloat16
    rows: list[Row] = []
    for out_f, in_f in MATMUL_SHAPES[sizes]:
        ws = [torch.randn(out_f, in_f, device="cuda", dtype=dt) * 0.02 for _ in range(ROTATE)]
        quant = [qf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) for w in ws]
        # the nested statistics as float32 (bitsandbytes' dequantize_4bit forms them so)
        absmax = [(dequantize_blockwise(s.absmax, s.state2, out_dtype="float32") + s.offset).contiguous()
                  for _, s in quant]
        bnb_q = [F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                 for w in ws] if F is not None else None
        packed_bytes = out_f * in_f / 2 + 4 * out_f * in_f / 64
        for batch in BATCHES[sizes]:
            xs = [torch.randn(batch, in_f, device="cuda", dtype=dt) for _ in range(ROTATE)]
            size = f"{batch} x {in_f} -> {out_f}"
            flops = 2 * batch * in_f * out_f
            nbytes = packed_bytes + 2 * batch * (in_f + out_f)
            big = batch > _cupy.MMA_MAX_ROWS  # the fused kernels' largest row count
            torch_calls = [lambda x=x, w=w: torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)]
            t_us = cuda_graph_us(torch_calls)
            timed = {}
            if not big:
                # each fused kernel that takes this batch, forced; the absmax is float32 here
                for kernel, label in (("gemv", "fused, gemv_4bit"), ("mma", "fused, tensor cores"),
                                      ("fused", "fused, matmul_4bit")):
                    try:
                        _cupy.choose_kernel(batch, out_f, in_f, 0, "bfloat16", 0, 0, kernel)
                    except ValueError:
                        continue
                    fused = [lambda x=x, q=q, a=a, k=kernel: _cupy.matmul_4bit_torch(
                                 x, q[0], a, q[1].code, blocksize=64, out_features=out_f, kernel=k)
                             for x, q, a in zip(xs, quant, absmax)]
                    timed[label] = (cuda_graph_us(fused), None)
            public = [lambda x=x, q=q: qf.matmul_4bit(x, *q) for x, q in zip(xs, quant)]
            deq = [lambda x=x, q=q: torch.nn.functional.linear(x, qf.dequantize_4bit(*q, out_dtype=dt))
                   for x, q in zip(xs, quant)]
            timed["dequantize + cuBLAS"] = (cuda_graph_us(deq), eager_us(deq))
            timed["public matmul_4bit"] = (cuda_graph_us(public), eager_us(public))
            b_us = None
            if F is not None:
                bcalls = [lambda x=x, q=q: bnb.matmul_4bit(x, q[0].t(), quant_state=q[1])
                          for x, q in zip(xs, bnb_q)]
                b_us = eager_us(bcalls)
                rows.append(Row(SECTION, "matmul_4bit nf4", size, "bfloat16", "bitsandbytes", b_us,
                                bytes=0 if big else nbytes, flops=flops if big else 0.0,
                                note=f"eager loop; {b_us / t_us:.2f} of bf16 cuBLAS time"))
            rows.append(Row(SECTION, "linear (unquantized)", size, "bfloat16", "torch", t_us,
                            bytes=0 if big else 2 * out_f * in_f + 2 * batch * (in_f + out_f),
                            flops=flops if big else 0.0))
            for name, (us, e_us) in timed.items():
                r = Row(SECTION, "matmul_4bit nf4", size, "bfloat16", f"cupy ({name})", us, e_us,
                        bytes=0 if big else nbytes, flops=flops if big else 0.0,
                        note=f"{us / t_us:.2f} of bf16 cuBLAS time")
                r.ratios["torch"] = t_us / us
                if b_us is not None:
                    r.ratios["bnb"] = b_us / us
                rows.append(r)
            del xs
        del ws, quant, absmax, bnb_q
        torch.cuda.empty_cache()
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """The NumPy reference against bitsandbytes' CPU backend: a 4096x4096 float32 weight to
    NF4, blocksize 64, and back (interleaved repeats, the same process)."""
    from reference import fourbit as ref
    shape = (4096, 4096) if sizes == "full" else (1024, 4096)
    n = shape[0] * shape[1]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    packed, state = ref.quantize_4bit(x, 64, "nf4")
    fns = {("numpy", "q"): lambda: ref.quantize_4bit(x, 64, "nf4"),
           ("numpy", "d"): lambda: ref.dequantize_4bit(packed, state)}
    _, F = _bnb()
    if F is not None:
        import torch
        t = torch.from_numpy(x)
        q, s = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
        fns[("bitsandbytes", "q")] = lambda: F.quantize_4bit(t, blocksize=64, quant_type="nf4")
        fns[("bitsandbytes", "d")] = lambda: F.dequantize_4bit(q, s)
    us = cpu_interleaved_us(fns, repeat=5)
    times = {b: (us[(b, "q")], us[(b, "d")]) for b in dict.fromkeys(k[0] for k in fns)}
    nbytes = n * 4 + n / 2 + 4 * n / 64
    rows = []
    for backend, (q_us, d_us) in times.items():
        rq = Row(SECTION, "quantize_4bit nf4", f"{_size(shape)} bs64", "float32", backend + " (CPU)",
                 q_us, bytes=nbytes)
        rd = Row(SECTION, "dequantize_4bit nf4", f"{_size(shape)} bs64", "float32",
                 backend + " (CPU)", d_us, bytes=nbytes)
        if "bitsandbytes" in times and backend != "bitsandbytes":
            rq.ratios["bnb"] = times["bitsandbytes"][0] / q_us
            rd.ratios["bnb"] = times["bitsandbytes"][1] / d_us
        rows += [rq, rd]
    return rows
