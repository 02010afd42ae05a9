"""Small helpers shared by the Numba kernels, including the bit casts the CUDA simulator
lacks (libdevice is not simulated, so under NUMBA_ENABLE_CUDASIM=1 they are plain NumPy).

Only the ``_numba`` modules import this one, and the backend tables import those on the
first call of a Numba op (``qkernels._backend.lazy``): ``import qkernels`` never loads Numba.
"""
from __future__ import annotations

import functools

import numpy as np


def numpy_row_stack_shim(numba_cuda_version: str | None = None) -> bool:
    """Give NumPy back ``np.row_stack`` (an alias of ``np.vstack``, removed in NumPy 2.5) for
    numba-cuda 0.30.x, whose CUDA target registers an overload of it, unguarded, when it first
    compiles a kernel (numba/cuda/np/arrayobj.py). Only then: with a NumPy that still has
    row_stack, or another numba-cuda (``numba_cuda_version``, default the installed one),
    NumPy is left alone. Returns whether the alias was set."""
    if hasattr(np, "row_stack"):
        return False
    if numba_cuda_version is None:
        from importlib import metadata
        try:
            numba_cuda_version = metadata.version("numba-cuda")
        except metadata.PackageNotFoundError:
            return False
    if not numba_cuda_version.startswith("0.30."):
        return False
    np.row_stack = np.vstack
    return True


# Before the first kernel compiles (numba-cuda imports arrayobj then, not on ``import numba``).
numpy_row_stack_shim()

from numba import config, cuda, float32, int32, uint32, uint64  # noqa: E402

if config.ENABLE_CUDASIM:
    def float_bits(y):
        return int(np.float32(y).view(np.uint32))

    def bits_float(u):
        return float(np.uint32(u).view(np.float32))

    def f16_bits_to_f32(h):
        return np.float32(np.uint16(int(h) & 0xFFFF).view(np.float16))

    def f32_to_f16_bits(v):
        with np.errstate(over="ignore"):
            return int(np.float16(np.float32(v)).view(np.uint16))
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def float_bits(y):
        return uint32(libdevice.float_as_int(float32(y)))

    @cuda.jit(device=True, inline=True)
    def bits_float(u):
        return libdevice.int_as_float(int32(u))

    from llvmlite import ir as _ir
    from numba import types as _nbtypes
    from numba.cuda.extending import intrinsic as _intrinsic

    @_intrinsic
    def f16_bits_to_f32(typingctx, h):
        """float16 bits (the low 16 bits of an unsigned integer) -> float32: one cvt.f32.f16."""
        def codegen(context, builder, sig, args):
            bits = builder.trunc(args[0], _ir.IntType(16))
            return builder.fpext(builder.bitcast(bits, _ir.HalfType()), _ir.FloatType())
        return _nbtypes.float32(h), codegen

    @_intrinsic
    def f32_to_f16_bits(typingctx, v):
        """float32 -> float16 bits as uint32 (nearest, ties to even): one cvt.rn.f16.f32."""
        def codegen(context, builder, sig, args):
            half = builder.fptrunc(args[0], _ir.HalfType())
            return builder.zext(builder.bitcast(half, _ir.IntType(16)), _ir.IntType(32))
        return _nbtypes.uint32(_nbtypes.float32), codegen


def device_function(fn):
    """``@cuda.jit(device=True)``, inlined by NVVM (forceinline) rather than into Numba's IR
    (``inline=True``): compiled once per signature and shared by every kernel variant, which
    keeps the JIT time of the many variants down."""
    if config.ENABLE_CUDASIM:
        return cuda.jit(device=True)(fn)
    return cuda.jit(device=True, forceinline=True)(fn)


@cuda.jit(device=True, inline=True)
def nan_max(a, b):
    """max that propagates NaN, as the reference's absmax does."""
    return a if (a != a or a > b) else b


@cuda.jit(device=True, inline=True)
def load_f32(x, i, is_bf16):
    """x[i] as float32; ``is_bf16``: x holds bfloat16 bit patterns (uint16)."""
    if is_bf16:
        return bits_float(uint32(x[i]) << 16)
    return float32(x[i])


@cuda.jit(device=True, inline=True)
def f32_to_bf16_bits(v):
    """Round float32 to bfloat16 bits (nearest, ties to even; NaN stays NaN)."""
    u = float_bits(v)
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@cuda.jit(device=True, inline=True)
def table_code(table, y, key_offset, rows128):
    """Nearest code of float32 y via the (entries, 2) float32 table of
    reference.blockwise.search_table (see table_code in common.cuh)."""
    u = float_bits(y)
    h = int32((u >> 16) & 0x7FFF) - key_offset
    i = min(max(h, 0), rows128 - 1) + int32(u >> 31) * rows128
    return int32(table[i, 1]) + (1 if table[i, 0] < y else 0)


@device_function
def table_code_split(thresholds, bases, y, key_lo, key_hi, rows128):
    """table_code with the table's two columns as separate arrays (float32 thresholds,
    uint8 bases), so that they fit shared memory. Unsigned integers only (the table index
    needs no negative-index fix-up): key_lo = (emin - 1) << 7, key_hi = key_lo + rows128 - 1
    and rows128 as uint32. Returns the code as uint32."""
    u = uint32(float_bits(y))
    h = (u >> uint32(16)) & uint32(0x7FFF)
    i = min(max(h, key_lo), key_hi) - key_lo
    if u >> uint32(31):
        i += rows128
    return uint32(bases[i]) + (uint32(1) if thresholds[i] < y else uint32(0))


# Float32 arithmetic rounded once per operation (never contracted into a fused multiply-add:
# NVVM contracts a*b+c by default, which would break bit-equality with the NumPy oracle).
if config.ENABLE_CUDASIM:
    def mul_rn(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) * np.float32(b))

    def add_rn(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) + np.float32(b))

    def div_rn(a, b):
        with np.errstate(all="ignore"):
            return np.float32(np.float32(a) / np.float32(b))

    def sqrt_rn(a):
        with np.errstate(all="ignore"):
            return np.sqrt(np.float32(a))
else:
    @cuda.jit(device=True, inline=True)
    def mul_rn(a, b):
        return libdevice.fmul_rn(float32(a), float32(b))

    @cuda.jit(device=True, inline=True)
    def add_rn(a, b):
        return libdevice.fadd_rn(float32(a), float32(b))

    @cuda.jit(device=True, inline=True)
    def div_rn(a, b):
        return libdevice.fdiv_rn(float32(a), float32(b))

    @cuda.jit(device=True, inline=True)
    def sqrt_rn(a):
        return libdevice.fsqrt_rn(float32(a))


@cuda.jit(device=True, inline=True)
def sign_bit(y):
    """1 if float32 y has its sign bit set (also -0.0 and negative NaN), else 0."""
    return int32(float_bits(y) >> 31)


@cuda.jit(device=True, inline=True)
def store_f32(out, i, v, is_bf16):
    """out[i] = float32 v rounded to out's dtype; ``is_bf16``: out holds bfloat16 bits."""
    if is_bf16:
        out[i] = f32_to_bf16_bits(v)
    else:
        out[i] = v


@cuda.jit(device=True, inline=True)
def quant8(v, scale):
    """clamp(rint(f32(v * scale)), -127, 127), NaN -> 0: the int8 quantizer of reference/int8.py."""
    y = float32(v * scale)
    if y != y:
        return 0
    y = min(max(y, float32(-127.0)), float32(127.0))
    return int32(round(y))


# --- Vectorized access for the blockwise and 4-bit kernels ---------------------------------
# They move data as uint64 words (8 bytes: WORD_ELEMS[kind] values) instead of one value at a
# time. ``kind`` is the storage dtype, a compile-time constant of each kernel variant.
F32, F16, BF16 = 0, 1, 2
WORD_ELEMS = (2, 4, 4)  # values per uint64 word, by kind
RAW_DTYPES = (np.uint32, np.uint16, np.uint16)  # one value's raw bits, by kind
# Shared scratch for group_nan_max: one float per warp; the simulator's shuffle stand-in
# needs one per thread.
SCRATCH = 1024 if config.ENABLE_CUDASIM else 32


def storage_kind(dtype: str) -> int:
    return {"float32": F32, "float16": F16, "bfloat16": BF16}[dtype]


def raw_view(a, kind: int):
    """Device array ``a`` of storage ``kind`` as its raw bits (bfloat16 may arrive as int16)."""
    raw = np.dtype(RAW_DTYPES[kind])
    return a if a.dtype == raw else a.view(raw)


def quantize_shape(kind: int, blocksize: int) -> tuple[int, int]:
    """(NW words per thread, G threads per quantization block) of the blockwise and 4-bit
    quantizers: NW = 4 (16 half or 8 float values), 8 in blocks of 4 KB or more, as the
    CuPy blockwise kernel: several loads in flight per thread, few threads per block (few
    shuffle steps)."""
    w = WORD_ELEMS[kind]
    nw = 8 if blocksize * (4 if kind == F32 else 2) >= 4096 else 4
    return nw, blocksize // (w * nw)


def cta_size(threads: int, group: int, max_threads: int) -> int:
    """The quantizers' CTA size: ``threads`` clamped to [max(32, group), max_threads] and
    rounded down to a power of two, so that it is a multiple of the warp and of the group."""
    threads = max(32, group, min(threads, max_threads))
    return 1 << (threads.bit_length() - 1)


def kernel(max_threads: int):
    """``@cuda.jit`` promising at most ``max_threads`` threads per block (the compiler then
    never uses more registers than that allows; the simulator takes no bound)."""
    if config.ENABLE_CUDASIM:
        return cuda.jit
    return cuda.jit(launch_bounds=max_threads)


@device_function
def word_value(word, j, kind):
    """Value j of uint64 ``word`` of raw storage bits (little-endian) as float32."""
    if kind == F32:
        return float32(bits_float(uint32((word >> uint64(32 * j)) & uint64(0xFFFFFFFF))))
    h = uint32((word >> uint64(16 * j)) & uint64(0xFFFF))
    if kind == BF16:
        return float32(bits_float(h << uint32(16)))
    return float32(f16_bits_to_f32(h))


@device_function
def value_bits(v, kind):
    """float32 v rounded once to the storage dtype, as its raw bits (uint32)."""
    if kind == F32:
        return uint32(float_bits(v))
    if kind == BF16:
        return uint32(f32_to_bf16_bits(v))
    return uint32(f32_to_f16_bits(v))


@device_function
def load_word(xs, xw, vec_ok, wi, per_word):
    """Word ``wi`` of the raw array ``xs``: values wi * per_word ... as one uint64, zeros past
    the end. ``xw`` is ``xs``'s whole words as uint64 (used when ``vec_ok``: xs 8-byte aligned)."""
    i = wi * per_word
    n = xs.shape[0]
    if vec_ok and i + per_word <= n:
        return xw[wi]
    word = uint64(0)
    for j in range(per_word):
        if i + j < n:
            word |= uint64(xs[i + j]) << uint64(j * (64 // per_word))
    return word


@device_function
def store_word(outs, ow, vec_ok, wi, word, per_word):
    """Store uint64 ``word`` as values wi * per_word ... of the raw array ``outs`` (the part
    before its end); ``ow`` is ``outs``'s whole words as uint64, used when ``vec_ok``."""
    i = wi * per_word
    n = outs.shape[0]
    if vec_ok and i + per_word <= n:
        ow[wi] = word
    else:
        bits = 64 // per_word
        for j in range(per_word):
            if i + j < n:
                outs[i + j] = (word >> uint64(j * bits)) & uint64((1 << bits) - 1)


@device_function
def load_bytes(b, bw, vec_ok, wi, count):
    """Bytes wi * count ... wi * count + count - 1 of uint8 ``b`` (count = 1, 2 or 4) as one
    little-endian uint32, zeros past the end; ``bw`` is b's whole groups of ``count`` bytes
    as one unsigned integer each, used when ``vec_ok``."""
    i = wi * count
    n = b.shape[0]
    if vec_ok and i + count <= n:
        return uint32(bw[wi])
    v = uint32(0)
    for j in range(count):
        if i + j < n:
            v |= uint32(b[i + j]) << uint32(8 * j)
    return v


@device_function
def store_bytes(b, bw, vec_ok, wi, v, count):
    """Inverse of load_bytes: the ``count`` low bytes of uint32 v to b[wi * count ...],
    those before b's end."""
    i = wi * count
    n = b.shape[0]
    if vec_ok and i + count <= n:
        bw[wi] = v
    else:
        for j in range(count):
            if i + j < n:
                b[i + j] = (v >> uint32(8 * j)) & uint32(0xFF)


if config.ENABLE_CUDASIM:
    @cuda.jit(device=True)
    def shfl_xor(v, offset, scratch):
        """Stand-in for a full-warp cuda.shfl_xor_sync (the simulator has no warp
        operations): through shared memory, so every thread of the block must call it."""
        t = cuda.threadIdx.x
        scratch[t] = v
        cuda.syncthreads()
        other = scratch[t ^ offset]
        cuda.syncthreads()
        return other
else:
    @device_function
    def shfl_xor(v, offset, scratch):
        return cuda.shfl_xor_sync(0xFFFFFFFF, v, offset)


@device_function
def group_nan_max(m, width, scratch):
    """NaN-propagating max of float32 ``m`` over each group of ``width`` consecutive threads
    (threadIdx.x // width; width a power of two dividing a 1-D blockDim.x, itself a multiple
    of 32), returned to every thread of the group. Warp shuffles within a warp; across warps
    through ``scratch`` (shared float32, SCRATCH entries) and two barriers, so every thread
    of the block must call it at the same point."""
    offset = min(width, 32) // 2
    while offset > 0:
        m = nan_max(shfl_xor(m, offset, scratch), m)
        offset //= 2
    if width > 32:
        t = cuda.threadIdx.x
        if t % 32 == 0:
            scratch[t // 32] = m
        cuda.syncthreads()
        first = (t // width) * (width // 32)
        m = scratch[first]
        for w in range(1, width // 32):
            m = nan_max(scratch[first + w], m)
        cuda.syncthreads()  # scratch is free again
    return m


_INF32 = np.float32(np.inf)


@device_function
def load_block_words(xs, xw, vec_ok, w0, words, group, per_word, kind, scratch):
    """The blockwise and 4-bit quantizers' loads: words[k] <- word ``w0 + k * group`` of the
    raw array xs (k < words.shape[0], a uint64 local array; xw and vec_ok as load_word's;
    ``per_word`` values of storage ``kind`` a word), so that the k-th loads of a group of
    ``group`` threads are contiguous. Returns (m, r): m float32 the NaN-propagating absmax of
    the loaded values over the thread's group, r = f32(1 / m) (+inf for m == 0). Reduces with
    group_nan_max: every thread of the block must call it at the same point, with
    ``scratch`` its shared float32 (SCRATCH,) array."""
    m = float32(0.0)
    for k in range(words.shape[0]):
        words[k] = load_word(xs, xw, vec_ok, w0 + k * group, per_word)
        for j in range(per_word):
            m = nan_max(abs(word_value(words[k], j, kind)), m)
    m = group_nan_max(m, group, scratch)
    return m, float32(1.0) / m if m != 0 else _INF32


# --- host side ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    """The current device's multiprocessor count (the persistent grids' size; asked once per
    process); 1 under the simulator, whose device has no such attribute."""
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:
        return 1


def _address(a) -> int:
    """Device address of a Numba device array (host address under the simulator)."""
    if config.ENABLE_CUDASIM:
        return np.asarray(a._ary if hasattr(a, "_ary") else a).ctypes.data
    return int(a.__cuda_array_interface__["data"][0])


_dummies: dict = {}


def wide_view(a, wide):
    """(view, ok): the leading whole groups of 1-D contiguous ``a`` viewed as dtype ``wide``
    (wider than a's), ok = True, when a's address is aligned to ``wide``; otherwise a one-element
    placeholder of that dtype and ok = False (the kernels then access ``a`` value by value)."""
    wide = np.dtype(wide)
    k = wide.itemsize // a.dtype.itemsize
    m = a.shape[0] // k * k
    if m > 0 and _address(a) % wide.itemsize == 0:
        return (a if m == a.shape[0] else a[:m]).view(wide), True
    key = (wide.str, 0 if config.ENABLE_CUDASIM else cuda.get_current_device().id)
    if key not in _dummies:
        _dummies[key] = cuda.device_array(1, wide)
    return _dummies[key], False
