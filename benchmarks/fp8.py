"""Benchmark section "fp8": the native float8 quantizers that feed torch._scaled_mm in the
native FP8 layers (issue 5), beside the plain-torch expression of the same rule.

Bytes count what must be read and written once: the bfloat16 input (2 bytes per element), one
code per element for each code layout written, and the scales. Backends: "cupy raw" is the torch
hot path the layers call (raw pointers, torch's stream); "cupy raw, separate" the same results
from the separate kernels (row codes, column absmax + transpose, and torch's G.sum(0)); "torch"
the torch expression (absmax, divide, clamp, cast: several passes).
"""
from __future__ import annotations

import numpy as np

from .timing import Row, cpu_interleaved_us, cuda_graph_us, eager_us

SECTION = "fp8"
ROTATE = 4
SIZES = {
    "small": [("rows e4m3", 4096, 4096), ("rows + cols^T + colsum e5m2", 4096, 4096)],
    "full": [("rows e4m3", 16384, 4096), ("rows e5m2", 16384, 16384),
             ("cols^T e4m3", 16384, 4096), ("global e4m3", 16384, 4096),
             ("rows + cols^T + colsum e5m2", 16384, 16384),
             ("rows + cols^T + colsum e5m2", 32768, 4096),
             ("rows + cols^T e4m3", 16384, 4096)],
}


def _bytes(op: str, M: int, N: int) -> int:
    codes = 2 if "cols^T" in op and op.startswith("rows") else 1
    scales = (M if op.startswith("rows") else 0) + (N if "cols^T" in op else 0) + (1 if "global" in op else 0)
    return M * N * (2 + codes) + 4 * scales + (2 * N if "colsum" in op else 0)


def _op_rows(op: str, M: int, N: int) -> list[Row]:
    import torch
    from qkernels.fp8 import _cupy as K
    from torch_ops import fp8 as P
    fmt = torch.float8_e5m2 if op.endswith("e5m2") else torch.float8_e4m3fn
    rot = ROTATE if M * N <= (1 << 26) else 2
    xs = [torch.randn(M, N, device="cuda", dtype=torch.bfloat16) for _ in range(rot)]
    fns: dict[str, list] = {}
    if op.startswith("rows +"):
        colsum = "colsum" in op
        fns["cupy raw"] = [lambda x=x: K.quantize_rows_cols_torch(x, fmt, fmt, colsum) for x in xs]

        def separate(x):
            out = K.quantize_rowwise_torch(x, fmt) + K.quantize_columnwise_transpose_torch(x, fmt)
            return out + ((x.sum(0),) if colsum else ())

        def plain(x):
            out = P._fp8_rowwise_torch(x, fmt) + P._fp8_rowwise_torch(x.t(), fmt)
            return out + ((x.sum(0),) if colsum else ())
        fns["cupy raw, separate"] = [lambda x=x: separate(x) for x in xs]
        fns["torch"] = [lambda x=x: plain(x) for x in xs]
    elif op.startswith("rows"):
        fns["cupy raw"] = [lambda x=x: K.quantize_rowwise_torch(x, fmt) for x in xs]
        fns["torch"] = [lambda x=x: P._fp8_rowwise_torch(x, fmt) for x in xs]
    elif op.startswith("cols^T"):
        fns["cupy raw"] = [lambda x=x: K.quantize_columnwise_transpose_torch(x, fmt) for x in xs]
        fns["torch"] = [lambda x=x: P._fp8_rowwise_torch(x.t(), fmt) for x in xs]
    else:
        fns["cupy raw"] = [lambda x=x: K.quantize_global_torch(x, fmt) for x in xs]
        fns["torch"] = [lambda x=x: P._fp8_global_torch(x, fmt) for x in xs]
    times = {name: (cuda_graph_us(calls), eager_us(calls)) for name, calls in fns.items()}
    rows = []
    for name, (us, eager) in times.items():
        r = Row(SECTION, op, f"{M}x{N}", "bfloat16", name, us, eager, bytes=_bytes(op, M, N))
        if name != "torch":
            r.ratios["torch"] = times["torch"][0] / us
        rows.append(r)
    del xs
    torch.cuda.empty_cache()
    return rows


def gpu_rows(sizes: str = "full") -> list[Row]:
    rows = []
    for op, M, N in SIZES[sizes]:
        rows += _op_rows(op, M, N)
    return rows


def cpu_rows(sizes: str = "full") -> list[Row]:
    """The NumPy reference's row-wise e4m3 quantizer on 2048 x 2048 float32."""
    from reference import fp8 as ref
    x = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    us = cpu_interleaved_us({"numpy": lambda: ref.quantize_fp8_rowwise_f32(x, "e4m3")})
    return [Row(SECTION, "rows e4m3", "2048x2048", "float32", "numpy (CPU)", us["numpy"],
                bytes=2048 * 2048 * 5 + 2048 * 4)]
