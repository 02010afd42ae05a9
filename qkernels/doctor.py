"""``python -m qkernels doctor``: versions, devices, which backends load and why not, and a
smoke test of every backend against the NumPy reference, as one short table."""
from __future__ import annotations

import importlib.metadata
import platform
import time

import numpy as np

from ._backend import BACKENDS, backend_status


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _devices() -> list[str]:
    try:
        import torch
        if torch.cuda.is_available():
            return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    except Exception as exc:  # a broken torch install should not stop the report
        return [f"torch cannot query CUDA: {exc}"]
    return ["no CUDA device (CPU only)"]


def _smoke(backend: str) -> str:
    """Quantize and dequantize a small array on ``backend``; compare with the reference."""
    from . import dequantize_blockwise, quantize_blockwise, use_backend
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4 * 64 + 5) * 3).astype(np.float32)
    want_codes, want_state = quantize_blockwise(x, blocksize=64)
    want = dequantize_blockwise(want_codes, want_state)
    t0 = time.perf_counter()
    with use_backend(backend):
        codes, state = quantize_blockwise(x, blocksize=64)
        got = dequantize_blockwise(codes, state)
    ms = (time.perf_counter() - t0) * 1e3
    same = np.array_equal(codes, want_codes) and np.array_equal(got, want) \
        and np.array_equal(state.absmax, want_state.absmax)
    return f"{'ok' if same else 'MISMATCH'} ({ms:.0f} ms, first call includes compilation)"


def doctor() -> int:
    from . import __version__
    from ._cuda import cache_dirs
    rows = [("qkernels", __version__), ("python", platform.python_version())]
    rows += [(d, _version(d)) for d in ("numpy", "torch", "numba", "numba-cuda", "cupy-cuda12x",
                                         "cupy-cuda13x", "bitsandbytes")]
    rows += [("device", d) for d in _devices()]
    failed = False
    for name in BACKENDS:
        ok, why = backend_status(name)
        if ok:
            try:
                result = _smoke(name)
            except Exception as exc:  # report, never crash: this is the diagnostic tool
                result = f"FAILED: {type(exc).__name__}: {exc}".splitlines()[0][:160]
            failed |= not result.startswith("ok")
            detail = ""
            if name == "cpu":  # its fixed cost per op is the threading layer's (_numba_cpu)
                from ._numba_cpu import LAYER
                detail = f", Numba threading layer {LAYER}"
            rows.append((f"backend {name}", f"loads ({why}{detail}); smoke test {result}"))
        else:
            rows.append((f"backend {name}", f"not available: {why}"))
    rows += list(cache_dirs().items())
    width = max(len(k) for k, _ in rows)
    print("qkernels doctor")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 1 if failed else 0
