"""The "cpu" backend's AVX-512 4-bit kernels: the fused matmul for a few rows of x
(decoding), ``out (M, N) float32 = x (M, K) @ W^T`` with W never written out, and the
dequantization to bfloat16 (``dequantize_bf16``) with the same in-register lookup.

Dequantizing the whole weight and then multiplying (``_cpu.matmul_4bit``) costs a table
lookup and a store per weight element, about 8 ms for one row against a 4096 x 4096 NF4
weight on 2 cores. Here each 16 packed bytes (32 weights) become two 16-lane table lookups
(``vpermps``: the block's 16 code values, scaled by its absmax, sit in one register) and two
fused multiply-adds into 16-lane float32 accumulators, about 0.5 ms for the same call.
Numba cannot express a variable in-register lookup, so ``_row_dot`` is written as LLVM IR
(``numba.extending.intrinsic``).

Layout: packed uint8 (N * K / 2,), bnb's order (element 2i in the high nibble of byte i);
blocks of ``blocksize`` elements along each row (``fits``: blocksize % 32 == 0 and K %
blocksize == 0, so no block spans two rows); absmax float32 (N * K / blocksize,) already
unnested; code float32 (16,). x is split into its even and odd columns (xe, xo: (M, K / 2)),
which meet the high and low nibbles.

Arithmetic: each weight is f32(code * absmax), as the reference dequantizes it, multiplied
and summed in float32 in 32 interleaved partial sums (a different order from the
reference's, within its float64-bounded tolerance).
"""
from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import _numba_cpu  # noqa: F401  (the threading layer, before any kernel runs)

MAX_ROWS = 8  # above this, dequantize once and let torch's GEMM reuse the weight across rows


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether Numba compiles for this host (no NUMBA_CPU_NAME / NUMBA_CPU_FEATURES override,
    e.g. "generic" for portable caches, under which LLVM could not select the instruction)
    and the host CPU has AVX-512F (vpermps on 16 lanes)."""
    from numba.core import config
    if config.CPU_NAME not in (None, "host") or config.CPU_FEATURES is not None:
        return False
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # noqa: BLE001  (an unknown host: take the general route)
        return False


def fits(rows: int, N: int, K: int, blocksize: int) -> bool:
    """Whether ``gemv_4bit`` takes this call (module docstring)."""
    return 1 <= rows <= MAX_ROWS and N >= 1 and blocksize % 32 == 0 and K % blocksize == 0 and available()


class _IR:
    """What both intrinsics build with: LLVM types, array data pointers, and the two steps
    they share (the block's 16 scaled codes in one vector; 16 packed bytes as their high and
    low nibbles in 16 lanes each)."""

    def __init__(self, context, builder, signature):
        self.context, self.b, self.tys = context, builder, signature.args
        self.i32, self.i64 = ir.IntType(32), ir.IntType(64)
        self.v16f, self.v16i = ir.VectorType(ir.FloatType(), 16), ir.VectorType(self.i32, 16)
        self.v16b = ir.VectorType(ir.IntType(8), 16)

    def data(self, i: int, value):
        """The data pointer of array argument ``i``."""
        return self.context.make_array(self.tys[i])(self.context, self.b, value).data

    def as_i64(self, v):
        return v if v.type == self.i64 else self.b.sext(v, self.i64)

    def splat(self, v: int):
        return ir.Constant(self.v16i, [v] * 16)

    def scaled_codes(self, code_ptr, scale):
        """<16 x float> code[0..15] * scale, each product rounded once (f32(code * absmax))."""
        b = self.b
        codev = b.load(b.bitcast(code_ptr, self.v16f.as_pointer()), align=4)
        sv = b.insert_element(ir.Constant(self.v16f, ir.Undefined), scale, ir.Constant(self.i32, 0))
        sv = b.shuffle_vector(sv, ir.Constant(self.v16f, ir.Undefined), ir.Constant(self.v16i, [0] * 16))
        return b.fmul(codev, sv)

    def nibbles(self, byte_ptr):
        """(high, low) <16 x i32> nibbles of the 16 bytes at byte_ptr (high: element 2k)."""
        b = self.b
        b32 = b.zext(b.load(b.bitcast(byte_ptr, self.v16b.as_pointer()), align=1), self.v16i)
        return b.lshr(b32, self.splat(4)), b.and_(b32, self.splat(15))


@intrinsic
def _row_dot(typingctx, code, absmax, b0, nblocks, steps, packed, xe, xo, x0):
    """float32 sum over the blocks b0 .. b0 + nblocks - 1 (one row of W, ``steps`` 16-byte
    steps a block) of xe[x0 + k] * w[2k] + xo[x0 + k] * w[2k + 1], k counted from the row's
    first byte: two 16-lane accumulators (even and odd columns), one horizontal sum."""
    sig = types.float32(code, absmax, b0, nblocks, steps, packed, xe, xo, x0)

    def codegen(context, builder, signature, args):
        code_a, am_a, b0v, nbv, stv, pk_a, xe_a, xo_a, x0v = args
        g = _IR(context, builder, signature)
        perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(g.v16f, [g.v16f, g.v16i]),
                                              "llvm.x86.avx512.permvar.sf.512")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(g.v16f, [g.v16f] * 3),
                                             "llvm.fma.v16f32")
        b0, nb, st, x0 = g.as_i64(b0v), g.as_i64(nbv), g.as_i64(stv), g.as_i64(x0v)
        code_p, am_p, pk_p = g.data(0, code_a), g.data(1, am_a), g.data(5, pk_a)
        xe_p, xo_p = g.data(6, xe_a), g.data(7, xo_a)
        zeros = ir.Constant(g.v16f, [0.0] * 16)
        acc_even = cgutils.alloca_once_value(builder, zeros)
        acc_odd = cgutils.alloca_once_value(builder, zeros)
        sixteen = ir.Constant(g.i64, 16)
        row_start = builder.mul(b0, builder.mul(st, sixteen))  # the row's first packed byte
        with cgutils.for_range(builder, nb) as block:
            s = builder.load(builder.gep(am_p, [builder.add(b0, block.index)]))
            lut = g.scaled_codes(code_p, s)  # the block's 16 weights, f32(code * absmax)
            first = builder.mul(block.index, st)
            with cgutils.for_range(builder, st) as step:
                byte = builder.mul(builder.add(first, step.index), sixteen)  # from the row's start
                hi, lo = g.nibbles(builder.gep(pk_p, [builder.add(row_start, byte)]))
                w_even, w_odd = builder.call(perm, [lut, hi]), builder.call(perm, [lut, lo])
                at = builder.add(x0, byte)
                ve = builder.load(builder.bitcast(builder.gep(xe_p, [at]), g.v16f.as_pointer()), align=4)
                vo = builder.load(builder.bitcast(builder.gep(xo_p, [at]), g.v16f.as_pointer()), align=4)
                builder.store(builder.call(fma, [ve, w_even, builder.load(acc_even)]), acc_even)
                builder.store(builder.call(fma, [vo, w_odd, builder.load(acc_odd)]), acc_odd)
        acc = builder.fadd(builder.load(acc_even), builder.load(acc_odd))
        total = builder.extract_element(acc, ir.Constant(g.i32, 0))
        for i in range(1, 16):
            total = builder.fadd(total, builder.extract_element(acc, ir.Constant(g.i32, i)))
        return total

    return sig, codegen


@njit(parallel=True, cache=True, boundscheck=False)
def _gemv(xe, xo, packed, code, absmax, M, N, half_k, bpr, steps, out):
    for n in prange(N):
        for m in range(M):
            out[m, n] = _row_dot(code, absmax, n * bpr, bpr, steps, packed, xe, xo, m * half_k)


def gemv_4bit(x: np.ndarray, packed: np.ndarray, code: np.ndarray, absmax: np.ndarray,
              blocksize: int, N: int) -> np.ndarray:
    """x float32 (M, K) -> (M, N) float32 (module docstring; ``fits`` must hold)."""
    M, K = x.shape
    xe = np.ascontiguousarray(x[:, 0::2]).reshape(-1)
    xo = np.ascontiguousarray(x[:, 1::2]).reshape(-1)
    out = np.empty((M, N), np.float32)
    _gemv(xe, xo, np.ascontiguousarray(packed).reshape(-1), np.ascontiguousarray(code, np.float32),
          np.ascontiguousarray(absmax, np.float32).reshape(-1), M, N, K // 2, K // blocksize,
          blocksize // 32, out)
    return out


# --- dequantization to bfloat16 with the same lookup --------------------------------------------

@intrinsic
def _bf16_block(typingctx, code, scale, packed, p_off, steps, out, o_off):
    """One block to bfloat16: its 16 values f32(code * scale) rounded to bfloat16 as
    reference.dtypes.float32_to_bf16_bits does (nearest, ties to even; a NaN quieted), then
    ``steps`` times: 16 packed bytes at p_off -> 16 uint32 at out[o_off:], each the pair
    (element 2k in the low half, 2k + 1 in the high half: little-endian bfloat16 order)."""
    sig = types.void(code, scale, packed, p_off, steps, out, o_off)

    def codegen(context, builder, signature, args):
        code_a, sc, pk_a, poff, stv, out_a, ooff = args
        g = _IR(context, builder, signature)
        perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(g.v16i, [g.v16i, g.v16i]),
                                              "llvm.x86.avx512.permvar.si.512")
        u = builder.bitcast(g.scaled_codes(g.data(0, code_a), sc), g.v16i)
        # reference.dtypes.float32_to_bf16_bits on 16 lanes
        rounded = builder.lshr(builder.add(u, builder.add(g.splat(0x7FFF), builder.and_(
            builder.lshr(u, g.splat(16)), g.splat(1)))), g.splat(16))
        quieted = builder.or_(builder.lshr(u, g.splat(16)), g.splat(0x0040))
        is_nan = builder.icmp_unsigned(">", builder.and_(u, g.splat(0x7FFFFFFF)), g.splat(0x7F800000))
        lut = builder.select(is_nan, quieted, rounded)  # bfloat16 bits in the low half
        pk_p, out_p = g.data(2, pk_a), g.data(5, out_a)
        p0, o0 = g.as_i64(poff), g.as_i64(ooff)
        with cgutils.for_range(builder, g.as_i64(stv)) as step:
            at = builder.mul(step.index, ir.Constant(g.i64, 16))
            hi, lo = g.nibbles(builder.gep(pk_p, [builder.add(p0, at)]))
            even, odd = builder.call(perm, [lut, hi]), builder.call(perm, [lut, lo])
            dst = builder.gep(out_p, [builder.add(o0, at)])
            builder.store(builder.or_(even, builder.shl(odd, g.splat(16))),
                          builder.bitcast(dst, g.v16i.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True, boundscheck=False)
def _dequantize_bf16(packed, code, absmax, nblocks, blocksize, out32):
    steps = blocksize // 32
    half = blocksize // 2
    for b in prange(nblocks):
        _bf16_block(code, absmax[b], packed, b * half, steps, out32, b * half)


def dequantize_bf16(packed: np.ndarray, code: np.ndarray, absmax: np.ndarray, blocksize: int,
                    out_pairs: np.ndarray) -> None:
    """The whole blocks of a 4-bit weight to bfloat16: packed uint8 (>= nblocks * blocksize / 2,),
    absmax float32 (nblocks,) unnested, out_pairs uint32 (nblocks * blocksize / 2,), the
    bfloat16 output viewed in pairs (little-endian). Needs ``available()`` and blocksize % 32
    == 0; the same bits as the reference."""
    nblocks = absmax.shape[0]
    _dequantize_bf16(packed, np.ascontiguousarray(code, np.float32), absmax, nblocks, blocksize, out_pairs)
