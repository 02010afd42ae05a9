"""CuPy launchers for optim.cu (kernels optimizer_update_8bit_blockwise / optimizer_update_32bit).

These are the optimizers' hot path: arguments are raw device pointers (``t.data_ptr()``,
``cupy_array.data.ptr``), the device index and the CUDA stream handle to launch on
(``torch.cuda.current_stream().cuda_stream``); nothing here synchronizes or allocates per
call. The argument list of each kernel is built from one typed signature (CuPy checks
nothing: a width mismatch would silently shift every later argument). Codebooks arrive as
host float32 (256,) arrays; their device copies and search tables are cached per device.
"""
from __future__ import annotations

import functools

import numpy as np

from reference.blockwise import search_table
from reference.optim import BLOCKSIZE, AdamScalars
from .._cuda import get_kernel, multiprocessor_count
from .._interop import _external_stream

_DT = {"float32": 0, "float16": 1, "bfloat16": 2}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_CTA_8BIT = 512    # 16 warps, one 256-element block each; 2 CTAs per SM (~75 KB smem each)
_CTA_32BIT = 256

_P, _I32, _I64, _F32 = np.uint64, np.int32, np.int64, np.float32
_SCALARS = (("beta1", _F32), ("one_minus_beta1", _F32), ("beta2", _F32),
            ("one_minus_beta2", _F32), ("eps_c2", _F32), ("step_size", _F32), ("decay", _F32),
            ("gnorm_scale", _F32))
SIG_8BIT = (("p", _P), ("g", _P), ("state1", _P), ("state2", _P), ("absmax1", _P),
            ("absmax2", _P), ("qmap1", _P), ("qmap2", _P), ("table1", _P), ("key_offset1", _I32),
            ("rows128_1", _I32), ("table2", _P), ("key_offset2", _I32), ("rows128_2", _I32),
            *_SCALARS, ("gnorm_scale_ptr", _P), ("nonfinite", _P), ("n", _I64), ("vec_ok", _I32))
SIG_32BIT = (("p", _P), ("g", _P), ("state1", _P), ("state2", _P), *_SCALARS,
             ("gnorm_scale_ptr", _P), ("update_scale_ptr", _P), ("nonfinite", _P), ("n", _I64),
             ("vec_ok", _I32))


def _pack(signature, values: dict) -> tuple:
    """The kernel's argument tuple in signature order, each value cast to its C type."""
    if set(values) != {name for name, _ in signature}:
        raise TypeError(f"kernel arguments {sorted(values)} do not match the signature "
                        f"{[name for name, _ in signature]}")
    return tuple(ctype(values[name]) for name, ctype in signature)


class _Tables:
    """Device copies of the two codebooks and their search tables on one device."""

    def __init__(self, device: int, qmap1: np.ndarray, qmap2: np.ndarray):
        import cupy
        t1 = search_table(qmap1)
        t2 = search_table(qmap2)
        if t1 is None or t2 is None:
            raise NotImplementedError("the optimizer's codebooks have midpoints too close for "
                                      "the GPU search table; use the numpy backend")
        (table1, emin1), (table2, emin2) = t1, t2
        self.rows128_1, self.rows128_2 = (129 - emin1) * 128, (129 - emin2) * 128
        if float(qmap2.min()) < 0:
            raise ValueError("qmap2 (the second moment's map) must be non-negative")
        with cupy.cuda.Device(device):
            self.qmap1 = cupy.asarray(qmap1)
            self.qmap2 = cupy.asarray(qmap2)
            self.table1 = cupy.asarray(table1)
            self.table2 = cupy.asarray(table2[: self.rows128_2])  # v >= 0: positive half only
        self.key_offset1, self.key_offset2 = (emin1 - 1) << 7, (emin2 - 1) << 7
        self.smem = 4 * 512 + 8 * (2 * self.rows128_1 + self.rows128_2)


@functools.lru_cache(maxsize=16)
def _tables(device: int, qmap1_bytes: bytes, qmap2_bytes: bytes) -> _Tables:
    return _Tables(device, np.frombuffer(qmap1_bytes, np.float32),
                   np.frombuffer(qmap2_bytes, np.float32))


@functools.lru_cache(maxsize=None)
def _kernel(device: int, name: str, smem: int):
    import cupy
    with cupy.cuda.Device(device):
        kernel = get_kernel(__package__, "optim.cu", name)
        if smem > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = smem
        return kernel


def _aligned(*ptrs: int) -> int:
    return int(all(int(ptr) % 16 == 0 for ptr in ptrs))


def _scalars(s: AdamScalars, gnorm_scale) -> dict:
    return dict(beta1=s.beta1, one_minus_beta1=s.one_minus_beta1, beta2=s.beta2,
                one_minus_beta2=s.one_minus_beta2, eps_c2=s.eps_c2, step_size=s.step_size,
                decay=s.decay, gnorm_scale=s.gnorm_scale if gnorm_scale is None else gnorm_scale)


def optimizer_update_8bit_blockwise(p: int, g: int, state1: int, state2: int, absmax1: int,
                                    absmax2: int, qmap1: np.ndarray, qmap2: np.ndarray, n: int,
                                    dtype: str, scalars: AdamScalars, gnorm_scale_ptr: int = 0,
                                    nonfinite: int = 0, device: int = 0, stream: int = 0) -> None:
    """One fused 8-bit blockwise Adam step over n elements (pointers; see optim.cu).

    p, g: n elements of ``dtype``; state1/state2: n uint8; absmax1/absmax2: ceil(n/256)
    float32; qmap1/qmap2: host float32 (256,); gnorm_scale_ptr: device float32 or 0 (then
    ``scalars.gnorm_scale``); nonfinite: device int32 counter or 0; stream: a CUDA stream
    handle (0: the legacy default stream)."""
    import cupy
    if n == 0:
        return
    t = _tables(device, np.ascontiguousarray(qmap1, np.float32).tobytes(),
                np.ascontiguousarray(qmap2, np.float32).tobytes())
    kernel = _kernel(device, f"optimizer_update_8bit_blockwise<{_DT[dtype]}>", t.smem)
    warps = _CTA_8BIT // 32
    grid = min(-(-(-(-n // BLOCKSIZE)) // warps), 2 * multiprocessor_count(device))
    args = _pack(SIG_8BIT, dict(
        p=p, g=g, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2,
        qmap1=t.qmap1.data.ptr, qmap2=t.qmap2.data.ptr, table1=t.table1.data.ptr,
        key_offset1=t.key_offset1, rows128_1=t.rows128_1, table2=t.table2.data.ptr,
        key_offset2=t.key_offset2, rows128_2=t.rows128_2, **_scalars(scalars, None),
        gnorm_scale_ptr=gnorm_scale_ptr, nonfinite=nonfinite, n=n,
        vec_ok=_aligned(p, g, state1, state2)))
    with cupy.cuda.Device(device), _external_stream(stream):
        kernel((grid,), (_CTA_8BIT,), args, shared_mem=t.smem)


def optimizer_update_32bit(p: int, g: int, state1: int, state2: int, n: int, dtype: str,
                           scalars: AdamScalars, gnorm_scale_ptr: int = 0,
                           update_scale_ptr: int = 0, nonfinite: int = 0, device: int = 0,
                           stream: int = 0) -> None:
    """One fused Adam step with float32 state (pointers); update_scale_ptr: device float32
    factor on the step size (max_unorm) or 0."""
    import cupy
    if n == 0:
        return
    kernel = _kernel(device, f"optimizer_update_32bit<{_DT[dtype]}>", 0)
    grid = min(-(-n // (8 * _CTA_32BIT)), 8 * multiprocessor_count(device))
    args = _pack(SIG_32BIT, dict(
        p=p, g=g, state1=state1, state2=state2, **_scalars(scalars, None),
        gnorm_scale_ptr=gnorm_scale_ptr, update_scale_ptr=update_scale_ptr,
        nonfinite=nonfinite, n=n, vec_ok=_aligned(p, g, state1, state2)))
    with cupy.cuda.Device(device), _external_stream(stream):
        kernel((grid,), (_CTA_32BIT,), args)
