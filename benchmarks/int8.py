"""Benchmark section "int8": the SwitchBack quantizers, LLM.int8() quantization and the int8
GEMM with its fused dequantizing epilogue, beside torch and bitsandbytes (issue 4, Numbers).

Bytes (memory-bound rows) count what must be read and written once: a quantizer reads the
input (2 or 4 bytes per element) and writes one code per element plus the state. GEMM rows
count 2 * M * N * K operations. Backends: "cupy" is the public API (DLPack at the boundary),
"cupy raw" the torch hot-path entry point the layers call (raw pointers, torch's stream).
Baselines: "torch" is the plain-torch way to get the same result (for the GEMM:
``torch._int_mm`` followed by a separate dequantization pass), "torch _int_mm" cuBLASLt
without any epilogue, "torch bf16" the bf16 cuBLAS GEMM of the same shape.
"""
from __future__ import annotations

import numpy as np

from .timing import Row, cpu_interleaved_us, cuda_graph_us, eager_us

SECTION = "int8"
ROTATE = 4
K_DEQ = float(np.float32(1.0 / (127.0 * 127.0)))
QUANT_SIZES = {
    "small": [("quantize_rowwise", 8192, 1280), ("int8_vectorwise_quant", 16384, 4096)],
    "full": [("quantize_rowwise", 32768, 4096), ("quantize_rowwise", 8192, 1280),
             ("quantize_global", 16384, 4096), ("quantize_global", 4096, 1024),
             ("quantize_global_transpose", 16384, 4096), ("quantize_global_transpose", 4096, 1024),
             ("quantize_columnwise_and_transpose", 16384, 4096),
             ("int8_vectorwise_quant", 16384, 4096), ("int8_vectorwise_quant t=6", 16384, 4096)],
}
GEMM_SIZES = {  # (M, N, K): out (M, N) = A (M, K) @ W (N, K)^T
    "small": [(4096, 4096, 4096)],
    "full": [(16384, 4096, 16384), (16384, 16384, 4096), (16384, 4096, 4096), (32768, 1024, 4096)],
}


def _bnb():
    try:
        import bitsandbytes.functional as F
        return F
    except Exception:
        return None


def _torch_rowwise(x):
    """Plain torch: row absmax, then scale, round and cast (several passes)."""
    import torch
    m = x.abs().amax(dim=1, keepdim=True).float()
    return (x.float() * (127.0 / m)).round_().to(torch.int8), m


def _quant_rows(op: str, M: int, K: int) -> list[Row]:
    import torch
    import qkernels
    from qkernels.int8 import _cupy
    import qkernels.int8 as Q
    F = _bnb()
    xs = [torch.randn(M, K, device="cuda", dtype=torch.float16) for _ in range(ROTATE)]
    for x in xs:
        x[:, ::97] *= 4.0  # a few columns with |x| >= 6 for the threshold case
    threshold = 6.0 if op.endswith("t=6") else 0.0
    base = op.split(" ")[0]
    nbytes = M * K * 3 + (M * 4 if "vectorwise" in base else M * 2)
    if base == "quantize_columnwise_and_transpose":
        nbytes = M * K * 3 + K * 2
    elif base.startswith("quantize_global"):
        nbytes = M * K * 3 + 2
    fns: dict[str, list] = {}
    graph_ok = threshold == 0  # compacting the outlier columns synchronizes the host
    if base == "int8_vectorwise_quant":
        fns["cupy"] = [lambda x=x: Q.int8_vectorwise_quant(x, threshold) for x in xs]
        if threshold == 0:
            fns["cupy raw"] = [lambda x=x: _cupy.quantize_rowwise_torch(x, torch.float32) for x in xs]
        else:  # the same kernels without reading the count back (what Linear8bitLt runs)
            fns["cupy raw"] = [lambda x=x: _cupy.int8_outlier_quant_torch(x, threshold) for x in xs]
        if F is not None:
            fns["bitsandbytes"] = [lambda x=x: F.int8_vectorwise_quant(x, threshold) for x in xs]
        fns["torch"] = [lambda x=x: _torch_rowwise(x) for x in xs]
    elif base == "quantize_rowwise":
        fns["cupy"] = [lambda x=x: Q.quantize_rowwise(x) for x in xs]
        fns["cupy raw"] = [lambda x=x: _cupy.quantize_rowwise_torch(x) for x in xs]
        fns["torch"] = [lambda x=x: _torch_rowwise(x) for x in xs]
    elif base == "quantize_global":
        fns["cupy"] = [lambda x=x: Q.quantize_global(x) for x in xs]
        fns["cupy raw"] = [lambda x=x: _cupy.quantize_global_torch(x) for x in xs]
    elif base == "quantize_global_transpose":
        fns["cupy"] = [lambda x=x: Q.quantize_global_transpose(x) for x in xs]
        fns["cupy raw"] = [lambda x=x: _cupy.quantize_global_torch(x, transpose=True) for x in xs]
    else:
        fns["cupy"] = [lambda x=x: Q.quantize_columnwise_and_transpose(x) for x in xs]
        fns["cupy raw"] = [lambda x=x: _cupy.quantize_columnwise_and_transpose_torch(x) for x in xs]
    times = {}
    with qkernels.use_backend("cupy"):
        for name, calls in fns.items():
            eager = eager_us(calls)
            # bitsandbytes launches off torch's current stream: a captured graph would replay
            # nothing, so it is timed as an eager loop
            graph = (cuda_graph_us(calls) if (graph_ok or name == "cupy raw") and name != "bitsandbytes"
                     else None)
            times[name] = (graph if graph is not None else eager, eager, graph is None)
    rows = []
    for name, (us, eager, is_eager) in times.items():
        r = Row(SECTION, base, f"{M}x{K}" + (" t=6" if threshold else ""), "float16", name, us,
                None if is_eager else eager, bytes=nbytes, note="eager loop" if is_eager else "")
        for other, key in (("bitsandbytes", "bnb"), ("torch", "torch")):
            if other in times and name not in ("bitsandbytes", "torch"):
                r.ratios[key] = times[other][0] / us
        rows.append(r)
    del xs
    torch.cuda.empty_cache()
    return rows


def _gemm_rows(M: int, N: int, K: int) -> list[Row]:
    import torch
    from qkernels.int8 import _cupy
    import qkernels.int8 as Q
    F = _bnb()
    rot = ROTATE if M * K + N * K <= (1 << 29) else 2
    As = [torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8) for _ in range(rot)]
    Ws = [torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8) for _ in range(rot)]
    sa = torch.rand(M, device="cuda", dtype=torch.float16) + 0.5
    sw = torch.rand(N, device="cuda", dtype=torch.float16) + 0.5
    bias = torch.randn(N, device="cuda", dtype=torch.float16)
    sa32, sw32 = sa.float(), sw.float()
    pairs = list(zip(As, Ws))

    def torch_two_pass(a, w):
        c = torch._int_mm(a, w.t())
        return (c.float() * sa32[:, None] * sw32[None, :] * K_DEQ + bias.float()).half()

    fns = {
        "cupy raw": [lambda a=a, w=w: _cupy.int8_matmul_dequant_torch(a, w, sa, sw, bias) for a, w in pairs],
        "cupy": [lambda a=a, w=w: Q.int8_matmul_rowwise_dequantize(a, w.t(), sa, sw, bias) for a, w in pairs],
        "torch": [lambda a=a, w=w: torch_two_pass(a, w) for a, w in pairs],
        "torch _int_mm": [lambda a=a, w=w: torch._int_mm(a, w.t()) for a, w in pairs],
    }
    if torch.cuda.get_device_capability() == (9, 0) and K % 16 == 0:
        # the kernels the default path does not take: a Hopper tile variant, portable mma.sync
        for label, kernel in (("cupy raw sm90 BN=128", "sm90_bn128"), ("cupy raw mma.sync", "mma_sync")):
            fns[label] = [lambda a=a, w=w, kernel=kernel: _cupy.int8_matmul_dequant_torch(
                a, w, sa, sw, bias, kernel=kernel) for a, w in pairs]
    Ab = [a.to(torch.bfloat16) for a in As[:2]]
    Wb = [w.to(torch.bfloat16) for w in Ws[:2]]
    fns["torch bf16"] = [lambda a=a, w=w: a @ w.t() for a, w in zip(Ab, Wb)]
    times = {name: (cuda_graph_us(calls), eager_us(calls)) for name, calls in fns.items()}
    if F is not None:
        def bnb(a, w):
            c = F.int8_linear_matmul(a, w)
            return F.int8_mm_dequant(c, sa32, sw32, bias=bias)
        times["bitsandbytes"] = (eager_us([lambda a=a, w=w: bnb(a, w) for a, w in pairs]), None)
    rows = []
    flops = 2.0 * M * N * K
    for name, (us, eager) in times.items():
        note = {"torch": "_int_mm + separate dequant", "torch _int_mm": "no epilogue",
                "torch bf16": "bf16 cuBLAS, same shape", "bitsandbytes": "eager loop"}.get(name, "")
        r = Row(SECTION, "int8_matmul_rowwise_dequantize", f"{M}x{N}x{K}", "int8->float16", name,
                us, eager, flops=flops, note=note)
        if name.startswith("cupy"):
            r.ratios["torch"] = times["torch"][0] / us
            r.note = f"{times['torch bf16'][0] / us:.2f}x bf16 cuBLAS"
            if "bitsandbytes" in times:
                r.ratios["bnb"] = times["bitsandbytes"][0] / us
        rows.append(r)
    del As, Ws, Ab, Wb
    torch.cuda.empty_cache()
    return rows


def gpu_rows(sizes: str = "full") -> list[Row]:
    rows = []
    for op, M, K in QUANT_SIZES[sizes]:
        rows += _quant_rows(op, M, K)
    for M, N, K in GEMM_SIZES[sizes]:
        rows += _gemm_rows(M, N, K)
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """The NumPy reference against bitsandbytes' CPU backend: int8_vectorwise_quant on
    4096 x 4096 fp16 and int8_linear_matmul + int8_mm_dequant on 1024 x 1024 x 1024."""
    from reference import int8 as ref
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 4096)).astype(np.float16)
    a = rng.integers(-127, 128, (1024, 1024)).astype(np.int8)
    w = rng.integers(-127, 128, (1024, 1024)).astype(np.int8)
    rs = rng.uniform(0.5, 2, 1024).astype(np.float32)
    fns = {("numpy", "q"): lambda: ref.int8_vectorwise_quant(x),
           ("numpy", "mm"): lambda: ref.int8_mm_dequant(ref.int8_linear_matmul(a, w), rs, rs)}
    F = _bnb()
    if F is not None:
        import torch
        tx, ta, tw, trs = (torch.from_numpy(v) for v in (x, a, w, rs))
        fns[("bitsandbytes", "q")] = lambda: F.int8_vectorwise_quant(tx)
        fns[("bitsandbytes", "mm")] = lambda: F.int8_mm_dequant(F.int8_linear_matmul(ta, tw), trs, trs)
    us = cpu_interleaved_us(fns)
    rows = []
    for backend in dict.fromkeys(k[0] for k in fns):
        rq = Row(SECTION, "int8_vectorwise_quant", "4096x4096", "float16", backend + " (CPU)",
                 us[(backend, "q")], bytes=4096 * 4096 * 3 + 4096 * 4)
        rm = Row(SECTION, "int8_linear_matmul + int8_mm_dequant", "1024^3", "int8->float16",
                 backend + " (CPU)", us[(backend, "mm")], flops=2.0 * 1024 ** 3)
        if F is not None and backend != "bitsandbytes":
            rq.ratios["bnb"] = us[("bitsandbytes", "q")] / rq.us
            rm.ratios["bnb"] = us[("bitsandbytes", "mm")] / rm.us
        rows += [rq, rm]
    return rows
