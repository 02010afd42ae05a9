"""Benchmark section "blockwise": quantize_blockwise / dequantize_blockwise per backend,
beside bitsandbytes. Bytes per element: quantize reads the input and writes one code
(+4 bytes per block); dequantize reads the code and writes the output."""
from __future__ import annotations

import numpy as np

from qkernels._backend import HOST_BACKENDS

from .timing import Row, cpu_interleaved_us, cuda_graph_us, eager_us

SECTION = "blockwise"
GPU_SIZES = {"small": [1 << 24], "full": [1 << 24, 1 << 28]}
ROTATE = 4


def _bnb():
    try:
        import bitsandbytes.functional as F
        return F
    except Exception:
        return None


def gpu_rows(sizes: str = "full") -> list[Row]:
    import torch
    import qkernels
    F = _bnb()
    rows = []
    for n in GPU_SIZES[sizes]:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            es = torch.finfo(dtype).bits // 8
            for blocksize in (256, 4096):
                xs = [torch.randn(n, device="cuda", dtype=dtype) for _ in range(ROTATE)]
                name = str(dtype).replace("torch.", "")
                size = f"2^{n.bit_length() - 1} bs{blocksize}"
                qbytes = n * (es + 1) + 4 * n / blocksize
                results = {}
                for backend in qkernels.available_backends():
                    if backend in HOST_BACKENDS:  # host data only; timed by the cpu section
                        continue
                    with qkernels.use_backend(backend):
                        qs = [qkernels.quantize_blockwise(x, blocksize=blocksize) for x in xs]
                        qcalls = [lambda x=x: qkernels.quantize_blockwise(x, blocksize=blocksize) for x in xs]
                        dcalls = [lambda q=q: qkernels.dequantize_blockwise(*q) for q in qs]
                        results[backend] = (cuda_graph_us(qcalls), eager_us(qcalls),
                                            cuda_graph_us(dcalls), eager_us(dcalls))
                if F is not None:
                    bq = [lambda x=x: F.quantize_blockwise(x, blocksize=blocksize) for x in xs]
                    bqs = [F.quantize_blockwise(x, blocksize=blocksize) for x in xs]
                    bd = [lambda q=q: F.dequantize_blockwise(*q) for q in bqs]
                    # bitsandbytes launches off torch's current stream, so a captured graph
                    # would replay nothing: it is timed as an eager loop.
                    results["bitsandbytes"] = (eager_us(bq), None, eager_us(bd), None)
                for backend, (q_us, q_eager, d_us, d_eager) in results.items():
                    rq = Row(SECTION, "quantize_blockwise", size, name, backend, q_us, q_eager,
                             bytes=qbytes, note="eager loop" if backend == "bitsandbytes" else "")
                    rd = Row(SECTION, "dequantize_blockwise", size, name, backend, d_us, d_eager,
                             bytes=qbytes, note=rq.note)
                    if "bitsandbytes" in results and backend != "bitsandbytes":
                        rq.ratios["bnb"] = results["bitsandbytes"][0] / q_us
                        rd.ratios["bnb"] = results["bitsandbytes"][2] / d_us
                    rows += [rq, rd]
                del xs
                torch.cuda.empty_cache()
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """The NumPy reference against bitsandbytes' CPU backend on 2^24 float32, blocksize 4096."""
    from reference import blockwise as ref
    n = 1 << 24
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    codes, state = ref.quantize_blockwise(x, blocksize=4096)
    fns = {("numpy", "q"): lambda: ref.quantize_blockwise(x, blocksize=4096),
           ("numpy", "d"): lambda: ref.dequantize_blockwise(codes, state)}
    F = _bnb()
    if F is not None:
        import torch
        t = torch.from_numpy(x)
        q, s = F.quantize_blockwise(t, blocksize=4096)
        fns[("bitsandbytes", "q")] = lambda: F.quantize_blockwise(t, blocksize=4096)
        fns[("bitsandbytes", "d")] = lambda: F.dequantize_blockwise(q, s)
    us = cpu_interleaved_us(fns)
    times = {b: (us[(b, "q")], us[(b, "d")]) for b in dict.fromkeys(k[0] for k in fns)}
    rows = []
    for backend, (q_us, d_us) in times.items():
        rq = Row(SECTION, "quantize_blockwise", "2^24 bs4096", "float32", backend + " (CPU)", q_us,
                 bytes=n * 5 + n / 1024)
        rd = Row(SECTION, "dequantize_blockwise", "2^24 bs4096", "float32", backend + " (CPU)", d_us,
                 bytes=n * 5 + n / 1024)
        if "bitsandbytes" in times and backend != "bitsandbytes":
            rq.ratios["bnb"] = times["bitsandbytes"][0] / q_us
            rd.ratios["bnb"] = times["bitsandbytes"][1] / d_us
        rows += [rq, rd]
    return rows
