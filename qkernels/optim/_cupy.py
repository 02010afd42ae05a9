"""CuPy launchers for optim.cu (kernels optimizer_update_8bit_blockwise / optimizer_update_32bit).

These are the optimizers' hot path: arguments are raw device pointers (``t.data_ptr()``,
``cupy_array.data.ptr``), the device index and the CUDA stream handle to launch on
(``torch.cuda.current_stream().cuda_stream``); nothing here synchronizes or allocates per
call. The argument list of each kernel is built from one typed signature (CuPy checks
nothing: a width mismatch would silently shift every later argument). Codebooks arrive as
host float32 (256,) arrays; their device copies and search tables are cached per device,
and so is everything else a launch needs but the pointers and the step's scalars (a launch
costs a few microseconds of Python).
"""
from __future__ import annotations

import functools

import numpy as np

from reference.blockwise import search_table
from reference.optim import BLOCKSIZE, AdamScalars
from .._cuda import DTYPE_CODES as _DT, get_kernel, multiprocessor_count
from .._interop import _external_stream

_CTA_8BIT = 768    # 24 warps, one 256-element block each at a time; one CTA per SM (~75 KB
                   # of tables in shared memory, <= 80 registers: __launch_bounds__(768, 1))
_CTA_32BIT = 256

_P, _I32, _I64, _F32 = np.uint64, np.int32, np.int64, np.float32
_SCALARS = (("beta1", _F32), ("one_minus_beta1", _F32), ("beta2", _F32),
            ("one_minus_beta2", _F32), ("eps_c2", _F32), ("step_size", _F32), ("decay", _F32),
            ("gnorm_scale", _F32))
SIG_8BIT = (("p", _P), ("g", _P), ("state1", _P), ("state2", _P), ("absmax1", _P),
            ("absmax2", _P), ("qmap1", _P), ("qmap2", _P), ("table1", _P), ("key_offset1", _I32),
            ("rows128_1", _I32), ("table2", _P), ("key_offset2", _I32), ("rows128_2", _I32),
            ("neg1", _I32), *_SCALARS, ("gnorm_scale_ptr", _P), ("nonfinite", _P), ("n", _I64),
            ("vec_ok", _I32))
SIG_32BIT = (("p", _P), ("g", _P), ("state1", _P), ("state2", _P), *_SCALARS,
             ("gnorm_scale_ptr", _P), ("update_scale_ptr", _P), ("nonfinite", _P), ("n", _I64),
             ("vec_ok", _I32))


class _Signature:
    """A kernel's typed argument list. ``part(**values)`` casts a run of consecutive
    arguments to their C types in signature order, so that a launcher can cache the runs
    that do not change between calls; ``check`` counts the concatenated runs."""

    def __init__(self, signature):
        self.names = tuple(name for name, _ in signature)
        self.types = dict(signature)
        self._runs: dict = {}  # names of a run -> their C types

    def part(self, **values) -> tuple:
        names = tuple(values)
        types = self._runs.get(names)
        if types is None:
            i = self.names.index(names[0])
            if self.names[i:i + len(names)] != names:
                raise TypeError(f"{names} is not a run of consecutive arguments of {list(self.names)}")
            types = self._runs[names] = tuple(self.types[name] for name in names)
        return tuple([t(v) for t, v in zip(types, values.values())])

    def check(self, args: tuple) -> tuple:
        if len(args) != len(self.names):
            raise TypeError(f"{len(args)} kernel arguments for a signature of {len(self.names)}")
        return args


_SIG8, _SIG32 = _Signature(SIG_8BIT), _Signature(SIG_32BIT)


class _Tables:
    """Device copies of the two codebooks and their search tables on one device, and the
    kernel arguments that describe them (the table1 .. neg1 run of SIG_8BIT)."""

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
            self.table1 = cupy.asarray(_int_bases(table1))
            self.table2 = cupy.asarray(_int_bases(table2[: self.rows128_2]))  # v >= 0: positive half
        self.key_offset1, self.key_offset2 = (emin1 - 1) << 7, (emin2 - 1) << 7
        self.smem = 4 * 512 + 8 * (2 * self.rows128_1 + self.rows128_2)
        # the sign fix compares indices when qmap1's sign bits are 1...1 0...0 (always, but
        # for a map holding +0.0 before -0.0); else the kernel reads the sign from qmap1
        neg = np.signbit(np.asarray(qmap1, np.float32))
        count = int(neg.sum())
        self.neg1 = count if neg[:count].all() else -1
        self.args = _SIG8.part(qmap1=self.qmap1.data.ptr, qmap2=self.qmap2.data.ptr,
                               table1=self.table1.data.ptr, key_offset1=self.key_offset1,
                               rows128_1=self.rows128_1, table2=self.table2.data.ptr,
                               key_offset2=self.key_offset2, rows128_2=self.rows128_2,
                               neg1=self.neg1)


def _int_bases(table: np.ndarray) -> np.ndarray:
    """search_table's (threshold, base) float32 pairs with each base (an integer 0..255)
    replaced by its int32 bit pattern, which the kernel reads without a conversion."""
    out = np.array(table, np.float32)
    out[:, 1] = table[:, 1].astype(np.int32).view(np.float32)
    return out


@functools.lru_cache(maxsize=16)
def _tables(device: int, qmap1_bytes: bytes, qmap2_bytes: bytes) -> _Tables:
    return _Tables(device, np.frombuffer(qmap1_bytes, np.float32),
                   np.frombuffer(qmap2_bytes, np.float32))


_tables_of_maps: dict = {}  # (device, id(qmap1), id(qmap2)) -> (qmap1, qmap2, _Tables)


def _tables_for(device: int, qmap1: np.ndarray, qmap2: np.ndarray) -> _Tables:
    """_tables for host codebooks; read-only arrays (reference.codebooks' maps) are looked
    up by identity, without hashing their bytes on every call."""
    key = (device, id(qmap1), id(qmap2))
    hit = _tables_of_maps.get(key)
    if hit is not None and hit[0] is qmap1 and hit[1] is qmap2:
        return hit[2]
    t = _tables(device, np.ascontiguousarray(qmap1, np.float32).tobytes(),
                np.ascontiguousarray(qmap2, np.float32).tobytes())
    if isinstance(qmap1, np.ndarray) and isinstance(qmap2, np.ndarray) \
            and not qmap1.flags.writeable and not qmap2.flags.writeable:
        _tables_of_maps[key] = (qmap1, qmap2, t)
    return t


@functools.lru_cache(maxsize=None)
def _kernel(device: int, name: str, smem: int):
    import cupy
    with cupy.cuda.Device(device):
        kernel = get_kernel(__package__, "optim.cu", name)
        if smem > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = smem
        return kernel


@functools.lru_cache(maxsize=64)
def _scalar_args(s: AdamScalars, gnorm_scale) -> tuple:
    """The beta1 .. gnorm_scale run of both signatures (the same names in each)."""
    return _SIG8.part(beta1=s.beta1, one_minus_beta1=s.one_minus_beta1, beta2=s.beta2,
                      one_minus_beta2=s.one_minus_beta2, eps_c2=s.eps_c2, step_size=s.step_size,
                      decay=s.decay, gnorm_scale=s.gnorm_scale if gnorm_scale is None else gnorm_scale)


def _aligned(*ptrs: int) -> int:
    return int(all(int(ptr) % 16 == 0 for ptr in ptrs))


class _Launch:
    """What one (kernel, device) launch needs besides its arguments: the kernel, the grid
    limit and CuPy's view of the caller's stream."""

    def __init__(self, device: int, name: str, smem: int, ctas_per_sm: int):
        self.kernel = _kernel(device, name, smem)
        self.smem = smem
        self.max_grid = ctas_per_sm * multiprocessor_count(device)
        self.device = device

    def __call__(self, grid: int, block: int, args: tuple, stream: int) -> None:
        import cupy
        if cupy.cuda.runtime.getDevice() == self.device:
            self.kernel((grid,), (block,), args, shared_mem=self.smem, stream=_external_stream(stream))
        else:
            with cupy.cuda.Device(self.device):
                self.kernel((grid,), (block,), args, shared_mem=self.smem,
                            stream=_external_stream(stream))


@functools.lru_cache(maxsize=None)
def _launch_8bit(device: int, dtype: str, smem: int) -> _Launch:
    return _Launch(device, f"optimizer_update_8bit_blockwise<{_DT[dtype]}>", smem, 1)


@functools.lru_cache(maxsize=None)
def _launch_32bit(device: int, dtype: str) -> _Launch:
    return _Launch(device, f"optimizer_update_32bit<{_DT[dtype]}>", 0, 8)


def optimizer_update_8bit_blockwise(p: int, g: int, state1: int, state2: int, absmax1: int,
                                    absmax2: int, *, qmap1: np.ndarray, qmap2: np.ndarray, n: int,
                                    dtype: str, scalars: AdamScalars, gnorm_scale_ptr: int = 0,
                                    nonfinite: int = 0, device: int = 0, stream: int = 0) -> None:
    """One fused 8-bit blockwise Adam step over n elements (pointers; see optim.cu).

    p, g: n elements of ``dtype``; state1/state2: n uint8; absmax1/absmax2: ceil(n/256)
    float32; qmap1/qmap2: host float32 (256,); gnorm_scale_ptr: device float32 or 0 (then
    ``scalars.gnorm_scale``); nonfinite: device int32 counter or 0; stream: a CUDA stream
    handle (0: the legacy default stream)."""
    if n == 0:
        return
    t = _tables_for(device, qmap1, qmap2)
    launch = _launch_8bit(device, dtype, t.smem)
    grid = min(-(-(-(-n // BLOCKSIZE)) // (_CTA_8BIT // 32)), launch.max_grid)
    args = _SIG8.check(
        _SIG8.part(p=p, g=g, state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2)
        + t.args + _scalar_args(scalars, None)
        + _SIG8.part(gnorm_scale_ptr=gnorm_scale_ptr, nonfinite=nonfinite, n=n,
                     vec_ok=_aligned(p, g, state1, state2)))
    launch(grid, _CTA_8BIT, args, stream)


def optimizer_update_32bit(p: int, g: int, state1: int, state2: int, *, n: int, dtype: str,
                           scalars: AdamScalars, gnorm_scale_ptr: int = 0,
                           update_scale_ptr: int = 0, nonfinite: int = 0, device: int = 0,
                           stream: int = 0) -> None:
    """One fused Adam step with float32 state (pointers); update_scale_ptr: device float32
    factor on the step size (max_unorm) or 0."""
    if n == 0:
        return
    launch = _launch_32bit(device, dtype)
    grid = min(-(-n // (8 * _CTA_32BIT)), launch.max_grid)
    args = _SIG32.check(
        _SIG32.part(p=p, g=g, state1=state1, state2=state2) + _scalar_args(scalars, None)
        + _SIG32.part(gnorm_scale_ptr=gnorm_scale_ptr, update_scale_ptr=update_scale_ptr,
                      nonfinite=nonfinite, n=n, vec_ok=_aligned(p, g, state1, state2)))
    launch(grid, _CTA_32BIT, args, stream)
