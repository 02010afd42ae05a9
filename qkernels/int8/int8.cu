// INT8 quantizers, dequantizers and the int8 GEMM with a fused dequantizing epilogue.
// Reference: reference/int8.py. Launcher: _cupy.py.
//
// Storage types: DT / SDT / ODT / BDT are 0 = float32, 1 = float16, 2 = bfloat16 (common.cuh);
// BDT = -1 means "no bias"; ODT = 3 is int32 (the GEMM's raw product). The quantizer rule is
// q = clamp(rint(f32(x) * f32(127 / m)), -127, 127) with NaN products giving 0 (quant8 below);
// every multiply is __fmul_rn and every add __fadd_rn, so no multiply-add is contracted and the
// kernels match the NumPy oracle bit for bit.
//
// Two-pass quantizers (global, columnwise): pass 1 finds the absmax and pass 2 re-reads x, in
// reverse order, so that its first reads hit the tail of x that pass 1 read last. Pass 1 reads
// all but the last `keep` bytes with evict-first (.cs) loads and pass 2 streams (.cs) its reads
// and writes, so the normal-priority tail is what L2 keeps.
//
// row_quant<DT, SDT, NV, THRESH>           one CTA per row (grid-stride over rows)
//   in:  x (rows, cols) DT row-major; threshold (THRESH: |x| >= threshold is an outlier)
//   out: q int8 (rows, cols); stats (rows,) SDT = row absmax without outliers; flags u8 (cols,)
//        set to 1 for columns holding an outlier (THRESH only; the caller zeroes them first).
//   Each thread caches NV 16-byte vectors of its row in registers, so the row is read from
//   memory once (columns beyond NV * VEC * blockDim are read twice); with 16-byte vectors the
//   next row's are loaded while this row is reduced and stored (the launcher gives each CTA
//   several rows). Traffic: ES + 1 bytes
//   per element. THRESH: a thread keeps the same columns in every row, so it ORs its outlier
//   hits into a register mask and sets each flag once per CTA, not once per row (the launcher
//   gives each CTA ~8 rows).
// outlier_cols                             after row_quant<THRESH>: every CTA scans the flags
//   (chunks of 4096 columns, a block prefix sum) into the ascending list of outlier columns
//   and zeroes those columns of q in its slice of rows (a warp per row); CTA 0 also writes the
//   list as idx int64 (count,) and count int32. 256 threads. The host reads count once, to
//   size the result.
// absmax_global<DT>                        grid-stride NaN-propagating absmax of the whole
//   array, one atomicMax per CTA on the float's bits (|x| bits order like the floats; NaN's
//   bits sort above +Inf). out: u32 (1,) zeroed by the caller. Vectors from keep_vec on are
//   read last, with normal loads (the L2-resident tail).
// col_absmax<DT, THRESH>                   blocks (32, 8): 32 column vectors x 8 row lanes;
//   the CTAs of a column strip interleave their rows (row stride 8 * gridDim.y), so the whole
//   grid sweeps x top to bottom and rows from keep_row on are read last, with normal loads;
//   reduce in shared memory, one atomicMax per column and CTA.
// quant_global<DT, SDT>                    q = quant8(x, 127 / absmax) elementwise, walking the
//   array in reverse (2 vectors in flight per thread), streaming loads and stores.
// quant_transpose<DT, SDT, PER_COL>        tiles of 128 rows x 256 bytes of x (N, K): 128 x 128
//   (16-bit) or 128 x 64 (fp32), one per CTA, in reverse order. Phase A: 8 16-byte loads per
//   thread (a warp reads 4 rows x 128 bytes), codes as 4-code words (4 consecutive k of one
//   n) into shared memory at [k / 4][n], 16-byte chunks of n XOR-swizzled. Phase B: a thread
//   reads 4 x 4 words (k 4kq.., n 16n16..) with 16-byte shared loads, transposes the 4 x 4 byte
//   blocks with byte_perm and writes 16 bytes to each of 4 rows of q^T (K, N). Shared accesses
//   are bank-conflict free on both sides. PER_COL: per-column absmax (columnwise_and_transpose)
//   else one global absmax. Also writes the state (SDT). Traffic: ES + 1 bytes per element.
// quant_cols<DT, THRESH>                   q = quant8(x, 127 / colmax[col]) elementwise, not
//   transposed (int8_double_quant's CAt); outliers get code 0.
// zero_cols                                q[:, idx[j]] = 0 for the outlier columns.
// dequant_rows<SDT, ODT>                   out = f32(q) * stats[row] * f32(1/127), rounded to ODT.
// mm_dequant<ODT, BDT>                     out = f32(C) * r[row] * c[col] * K (+ bias[col]).
// int8_gemm<ODT, RDT, CDT, BDT, CGLOBAL, ALIGNED>
//   in:  A int8 (M, K) row-major (lda = K), B int8 (N, K) row-major (ldb = K): out = A @ B^T.
//        row_scale (M,) RDT, col_scale (N,) CDT or one value (CGLOBAL), bias (N,) BDT.
//   out: (M, N) ODT: ((f32(acc) * r) * c) * K (+ bias), or the int32 acc itself (ODT = 3).
//   CTA tile 128 x 128 x 64, 8 warps each 64 x 32 (4 x 4 mma.m16n8k32 s8 tiles, 64 int32
//   accumulators per thread; <= 128 registers so 2 CTAs fit an SM), a 4-deep cp.async
//   pipeline (ALIGNED: K % 16 == 0 and 16-byte aligned bases) or synchronous byte loads with
//   bounds (any K), zero-filled past M, N, K. 64 KB of dynamic shared memory.
//   Shared tiles are 64-byte rows whose 16-byte chunks are XOR-swizzled with (row >> 1) & 3,
//   so each ldmatrix (8 rows x 16 bytes) hits all 32 banks once. The epilogue works on the
//   accumulator registers and writes each output once; the int32 product never reaches memory.
#include "common.cuh"

#define QK_RCP127 __int_as_float(0x3c010204)   // f32(1/127)
#define QK_KDEQ __int_as_float(0x38820610)     // f32(1/(127*127))

__device__ __forceinline__ int quant8(float x, float scale) {
  float y = __fmul_rn(x, scale);
  if (y != y) return 0;
  int q = __float2int_rn(y);                   // half to even; +-Inf saturate
  return max(-127, min(127, q));
}

__device__ __forceinline__ float scale_of(float m) { return __fdiv_rn(127.0f, m); }

template <int DT>
__device__ __forceinline__ float ld1(const typename Storage<DT>::type* p) { return to_f32<DT>(p[0]); }

// VEC elements (one 16-byte vector) from an aligned address.
template <int DT, int VEC>
__device__ __forceinline__ void ld_vec(const typename Storage<DT>::type* p, float (&v)[VEC]) {
  typedef typename Storage<DT>::type T;
  uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = to_f32<DT>(e[j]);
}

// VEC codes as VEC / 4 words, the first code in the low byte.
template <int VEC>
__device__ __forceinline__ void pack_codes(const int (&c)[VEC], u32 (&w)[VEC / 4]) {
#pragma unroll
  for (int k = 0; k < VEC / 4; ++k)
    w[k] = (u32)(c[4 * k] & 0xff) | ((u32)(c[4 * k + 1] & 0xff) << 8) |
           ((u32)(c[4 * k + 2] & 0xff) << 16) | ((u32)(c[4 * k + 3] & 0xff) << 24);
}

// VEC int8 codes (4 or 8 bytes) to an aligned address.
template <int VEC>
__device__ __forceinline__ void st_codes(i8* p, const int (&c)[VEC]) {
  u32 w[VEC / 4];
  pack_codes<VEC>(c, w);
  if (VEC == 8) *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[VEC / 4 - 1]);
  else *reinterpret_cast<u32*>(p) = w[0];
}

// Streaming 16-byte load and stores (.cs: evict-first in L1 and L2) for data touched once.
// volatile: the loads sit behind bounds checks and must not be hoisted past them.
__device__ __forceinline__ uint4 ld_cs16(const void* p) {
  uint4 v;
  asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
template <bool CS>
__device__ __forceinline__ uint4 ld16(const void* p) {
  return CS ? ld_cs16(p) : __ldg(reinterpret_cast<const uint4*>(p));
}
__device__ __forceinline__ void st_cs(void* p, u32 a) {
  asm volatile("st.global.cs.u32 [%0], %1;" :: "l"(p), "r"(a) : "memory");
}
__device__ __forceinline__ void st_cs(void* p, uint2 a) {
  asm volatile("st.global.cs.v2.u32 [%0], {%1, %2};" :: "l"(p), "r"(a.x), "r"(a.y) : "memory");
}
__device__ __forceinline__ void st_cs(void* p, uint4 a) {
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(p), "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w) : "memory");
}

// The VEC elements of a raw 16-byte vector as float32.
template <int DT, int VEC>
__device__ __forceinline__ void unpack16(uint4 w, float (&v)[VEC]) {
  typedef typename Storage<DT>::type T;
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int j = 0; j < VEC; ++j) v[j] = to_f32<DT>(e[j]);
}

// 16 bytes from p, element by element: the first `avail` elements (any alignment), zeros after.
template <int DT>
__device__ __forceinline__ uint4 ld16_bounded(const typename Storage<DT>::type* p, int avail) {
  typedef typename Storage<DT>::type T;
  union { uint4 v; T e[16 / sizeof(T)]; } u;
  u.v = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int j = 0; j < (int)(16 / sizeof(T)); ++j)
    if (j < avail) u.e[j] = p[j];
  return u.v;
}

// VEC codes (4 or 8 bytes) to an aligned address, streaming.
template <int VEC>
__device__ __forceinline__ void st_codes_cs(i8* p, const int (&c)[VEC]) {
  u32 w[VEC / 4];
  pack_codes<VEC>(c, w);
  if constexpr (VEC == 8) st_cs(p, make_uint2(w[0], w[1]));
  else st_cs(p, w[0]);
}

// ------------------------------------------------------------------------------------------
template <int DT, int SDT, int NV, bool THRESH>
__global__ void __launch_bounds__(1024)
row_quant(const typename Storage<DT>::type* __restrict__ x, i8* __restrict__ q,
          typename Storage<SDT>::type* __restrict__ stats, u8* __restrict__ flags,
          int rows, int cols, float threshold, int vec_ok) {
  typedef typename Storage<DT>::type T;
  constexpr int VEC = 16 / Storage<DT>::bytes;
  constexpr int PER = NV * VEC;
  static_assert(PER <= 32, "one bit of `seen` per cached element");
  __shared__ float red[32];
  const int tid = threadIdx.x, nt = blockDim.x;
  const int cached = PER * nt;  // columns held in registers
  u32 seen = 0;                 // THRESH: bit e: cached element e was an outlier in some row
  uint4 raw[NV];                // vec_ok: the next row's vectors, loaded a row ahead
  auto fetch = [&](int row) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int c0 = (i * nt + tid) * VEC;
      raw[i] = make_uint4(0u, 0u, 0u, 0u);
      if (row < rows && c0 < cols) raw[i] = __ldg(reinterpret_cast<const uint4*>(x + (i64)row * cols + c0));
    }
  };
  if (vec_ok) fetch(blockIdx.x);
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + (i64)row * cols;
    i8* qr = q + (i64)row * cols;
    float v[PER];
    float m = 0.0f;
    if (vec_ok) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        float w[VEC];
        unpack16<DT, VEC>(raw[i], w);  // zeros past cols
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i * VEC + j] = w[j];
      }
      fetch(row + gridDim.x);       // in flight during this row's reduction and stores
    } else {
#pragma unroll
      for (int e = 0; e < PER; ++e) {
        const int c = e * nt + tid;
        v[e] = c < cols ? ld1<DT>(xr + c) : 0.0f;
      }
    }
#pragma unroll
    for (int e = 0; e < PER; ++e) {
      if (THRESH && fabsf(v[e]) >= threshold) {  // an outlier (padding is 0.0f < threshold):
        seen |= 1u << e;                         // left out of m, and its code is quant8(0) = 0
        v[e] = 0.0f;
      }
      m = nan_max(fabsf(v[e]), m);
    }
    for (int c = cached + tid; c < cols; c += nt) {  // rows longer than the register cache
      const float a = fabsf(ld1<DT>(xr + c));
      if (THRESH && a >= threshold) {
        if (!flags[c]) flags[c] = 1;  // read first: a store per column and SM, not per row
      } else {
        m = nan_max(a, m);
      }
    }
    m = block_max(m, red);
    const float s = scale_of(m);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      int code[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        code[j] = quant8(v[i * VEC + j], s);  // THRESH: outliers already zeroed
      }
      if (vec_ok) {
        const int c0 = (i * nt + tid) * VEC;
        if (c0 < cols) st_codes<VEC>(qr + c0, code);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const int c = (i * VEC + j) * nt + tid;
          if (c < cols) qr[c] = (i8)code[j];
        }
      }
    }
    for (int c = cached + tid; c < cols; c += nt) {
      const float val = ld1<DT>(xr + c);
      qr[c] = (i8)((THRESH && fabsf(val) >= threshold) ? 0 : quant8(val, s));
    }
    if (tid == 0) stats[row] = from_f32<SDT>(m);
  }
  if (THRESH) {
    while (seen) {
      const int e = __ffs(seen) - 1;
      seen &= seen - 1;
      const int c = vec_ok ? ((e / VEC) * nt + tid) * VEC + (e % VEC) : e * nt + tid;
      if (c < cols) flags[c] = 1;
    }
  }
}

// ------------------------------------------------------------------------------------------
#define OC_CHUNK 4096  // columns scanned per step: 256 threads x 16 flags
__global__ void __launch_bounds__(256)
outlier_cols(const u8* __restrict__ flags, int cols, i8* __restrict__ q, int rows,
             long long* __restrict__ idx, int* __restrict__ count) {
  __shared__ int list[OC_CHUNK];
  __shared__ int warp_sum[8];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r0 = (int)((i64)rows * blockIdx.x / gridDim.x);
  const int r1 = (int)((i64)rows * (blockIdx.x + 1) / gridDim.x);
  int base = 0;  // outlier columns before this chunk
  for (int c0 = 0; c0 < cols; c0 += OC_CHUNK) {
    const int cb = c0 + tid * 16;
    u32 bits = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (cb + i < cols && flags[cb + i]) bits |= 1u << i;
    const int mine = __popc(bits);
    int incl = mine;  // inclusive prefix sum over the warp, then over the warps
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += y;
    }
    if (lane == 31) warp_sum[warp] = incl;
    __syncthreads();
    int pos = incl - mine, total = 0;
#pragma unroll
    for (int w = 0; w < 8; ++w) {
      const int s = warp_sum[w];
      if (w < warp) pos += s;
      total += s;
    }
    while (bits) {
      const int c = cb + __ffs(bits) - 1;
      bits &= bits - 1;
      list[pos] = c;
      if (blockIdx.x == 0) idx[base + pos] = c;
      ++pos;
    }
    __syncthreads();
    for (int r = r0 + warp; r < r1; r += 8) {  // a warp per row, its lanes along the list
      i8* qr = q + (i64)r * cols;
      for (int j = lane; j < total; j += 32) qr[list[j]] = 0;
    }
    base += total;
    __syncthreads();  // list and warp_sum are reused by the next chunk
  }
  if (blockIdx.x == 0 && tid == 0) *count = base;
}

// ------------------------------------------------------------------------------------------
// absmax over the vectors [lo, hi) of a grid-stride sweep, two 16-byte loads in flight.
template <int DT, bool CS>
__device__ __forceinline__ float absmax_sweep(const typename Storage<DT>::type* __restrict__ x,
                                              i64 lo, i64 hi, i64 first, i64 stride, float m) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  i64 t = lo + first;
  for (; t + stride < hi; t += 2 * stride) {
    const uint4 wa = ld16<CS>(x + t * VEC), wb = ld16<CS>(x + (t + stride) * VEC);
    float a[VEC], b[VEC];
    unpack16<DT, VEC>(wa, a);
    unpack16<DT, VEC>(wb, b);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = nan_max(fabsf(b[j]), nan_max(fabsf(a[j]), m));
  }
  for (; t < hi; t += stride) {
    float a[VEC];
    unpack16<DT, VEC>(ld16<CS>(x + t * VEC), a);
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = nan_max(fabsf(a[j]), m);
  }
  return m;
}

template <int DT>
__global__ void __launch_bounds__(256, 8)
absmax_global(const typename Storage<DT>::type* __restrict__ x, i64 n, u32* __restrict__ out,
              int vec_ok, i64 keep_vec) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  __shared__ float red[32];
  float m = 0.0f;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec_ok) {
    const i64 nvec = n / VEC;
    const i64 keep = max((i64)0, min(keep_vec, nvec));
    m = absmax_sweep<DT, true>(x, 0, keep, first, stride, m);      // streamed
    m = absmax_sweep<DT, false>(x, keep, nvec, first, stride, m);  // read last, left in L2
    for (i64 i = nvec * VEC + first; i < n; i += stride) m = nan_max(fabsf(ld1<DT>(x + i)), m);
  } else {
    for (i64 i = first; i < n; i += stride) m = nan_max(fabsf(ld1<DT>(x + i)), m);
  }
  m = block_max(m, red);
  if (threadIdx.x == 0) atomicMax(out, __float_as_uint(m));
}

// ------------------------------------------------------------------------------------------
// col_absmax's row loop over rows r, r + rstride, ... < r_end; returns the first row left.
template <int DT, bool THRESH, bool CS, bool VECTOR>
__device__ __forceinline__ int col_absmax_sweep(const typename Storage<DT>::type* __restrict__ x,
                                                int cols, int c0, int r, int r_end, int rstride,
                                                float threshold, float (&m)[16 / Storage<DT>::bytes]) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
#pragma unroll 4
  for (; r < r_end; r += rstride) {  // unrolled: 4 independent 16-byte loads in flight
    const typename Storage<DT>::type* p = x + (i64)r * cols + c0;
    float v[VEC];
    if (VECTOR) {
      unpack16<DT, VEC>(ld16<CS>(p), v);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = c0 + j < cols ? ld1<DT>(p + j) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = fabsf(v[j]);
      if (!(THRESH && a >= threshold)) m[j] = nan_max(a, m[j]);
    }
  }
  return r;
}

template <int DT, bool THRESH>
__global__ void __launch_bounds__(256, 6)
col_absmax(const typename Storage<DT>::type* __restrict__ x, int rows, int cols, float threshold,
           int keep_row, u32* __restrict__ out, int vec_ok) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  __shared__ float red[8][32 * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c0 = (blockIdx.x * 32 + tx) * VEC;
  const int rstride = 8 * gridDim.y;
  const int keep = max(0, min(keep_row, rows));
  float m[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) m[j] = 0.0f;
  if (c0 < cols) {
    const int r = blockIdx.y * 8 + ty;
    if (vec_ok) {
      const int rk = col_absmax_sweep<DT, THRESH, true, true>(x, cols, c0, r, keep, rstride, threshold, m);
      col_absmax_sweep<DT, THRESH, false, true>(x, cols, c0, rk, rows, rstride, threshold, m);
    } else {
      col_absmax_sweep<DT, THRESH, false, false>(x, cols, c0, r, rows, rstride, threshold, m);
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) red[ty][tx * VEC + j] = m[j];
  __syncthreads();
  for (int i = ty * 32 + tx; i < 32 * VEC; i += 256) {
    float a = red[0][i];
#pragma unroll
    for (int k = 1; k < 8; ++k) a = nan_max(red[k][i], a);
    const int c = blockIdx.x * 32 * VEC + i;
    if (c < cols) atomicMax(out + c, __float_as_uint(a));
  }
}

// ------------------------------------------------------------------------------------------
template <int DT, int SDT>
__global__ void __launch_bounds__(256, 8)
quant_global(const typename Storage<DT>::type* __restrict__ x, const u32* __restrict__ absmax_bits,
             i8* __restrict__ q, typename Storage<SDT>::type* __restrict__ state, i64 n, int vec_ok) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  const float m = __uint_as_float(absmax_bits[0]);
  const float s = scale_of(m);
  const i64 stride = (i64)gridDim.x * blockDim.x;
  const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (first == 0) state[0] = from_f32<SDT>(m);
  if (vec_ok) {
    const i64 nvec = n / VEC;
    i64 t = nvec - 1 - first;  // reverse: L2 still holds the tail
    for (; t >= stride; t -= 2 * stride) {
      const uint4 wa = ld_cs16(x + t * VEC), wb = ld_cs16(x + (t - stride) * VEC);
      float a[VEC], b[VEC];
      int ca[VEC], cb[VEC];
      unpack16<DT, VEC>(wa, a);
      unpack16<DT, VEC>(wb, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        ca[j] = quant8(a[j], s);
        cb[j] = quant8(b[j], s);
      }
      st_codes_cs<VEC>(q + t * VEC, ca);
      st_codes_cs<VEC>(q + (t - stride) * VEC, cb);
    }
    if (t >= 0) {
      float a[VEC];
      int ca[VEC];
      unpack16<DT, VEC>(ld_cs16(x + t * VEC), a);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ca[j] = quant8(a[j], s);
      st_codes_cs<VEC>(q + t * VEC, ca);
    }
    for (i64 i = nvec * VEC + first; i < n; i += stride) q[i] = (i8)quant8(ld1<DT>(x + i), s);
  } else {
    for (i64 i = n - 1 - first; i >= 0; i -= stride) q[i] = (i8)quant8(ld1<DT>(x + i), s);
  }
}

// ------------------------------------------------------------------------------------------
#define QT_TN 128  // tile rows of x = tile columns of q^T
template <int DT, int SDT, bool PER_COL>
__global__ void __launch_bounds__(256, 4)
quant_transpose(const typename Storage<DT>::type* __restrict__ x, const u32* __restrict__ absmax_bits,
                i8* __restrict__ qT, typename Storage<SDT>::type* __restrict__ state, int N, int K,
                int vec_in, int vec_out) {
  typedef typename Storage<DT>::type T;
  constexpr int VEC = 16 / Storage<DT>::bytes;  // elements per 16-byte vector
  constexpr int KW = VEC / 4;                   // 4-code words per vector
  constexpr int TK = 16 * VEC;                  // tile columns of x: 16 vectors, 256 bytes
  constexpr int KQ = TK / 4;                    // 4-code groups along k
  // tile[kq * QT_TN + 4 * ((n / 4) ^ ((kq / KW) % 8)) + n % 4] = codes of k = 4 kq .. 4 kq + 3
  // (low byte first) at tile row n
  __shared__ __align__(16) u32 tile[KQ * QT_TN];
  __shared__ float scale[PER_COL ? TK : 1];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tiles_k = (K + TK - 1) / TK;
  const int lin = (int)(gridDim.x - 1 - blockIdx.x);  // reverse: pass 1 read the end of x last
  const int k0 = (lin % tiles_k) * TK, n0 = (lin / tiles_k) * QT_TN;
  float s = 0.0f;
  if (PER_COL) {
    if (tid < TK) {
      const float m = __uint_as_float(absmax_bits[min(k0 + tid, K - 1)]);
      scale[tid] = scale_of(m);
      if (n0 == 0 && k0 + tid < K) state[k0 + tid] = from_f32<SDT>(m);
    }
    __syncthreads();
  } else {
    const float m = __uint_as_float(absmax_bits[0]);
    s = scale_of(m);
    if (lin == 0 && tid == 0) state[0] = from_f32<SDT>(m);
  }

  // Phase A: group g (0..63) = tile rows 4 (g / 2) .. + 3, vectors 8 (g % 2) .. + 7; lane l
  // takes row + l / 8, vector + l % 8. All 8 loads are issued before the first is used.
  uint4 raw[8];
#pragma unroll
  for (int it = 0; it < 8; ++it) {
    const int g = it * 8 + warp;
    const int n = (g >> 1) * 4 + (lane >> 3), j = (g & 1) * 8 + (lane & 7);
    const int gn = n0 + n, gk = k0 + j * VEC;
    const T* p = x + (i64)gn * K + gk;
    if (vec_in && gn < N && gk < K) raw[it] = ld_cs16(p);
    else raw[it] = ld16_bounded<DT>(p, gn < N ? K - gk : 0);
  }
#pragma unroll
  for (int it = 0; it < 8; ++it) {
    const int g = it * 8 + warp;
    const int n = (g >> 1) * 4 + (lane >> 3), j = (g & 1) * 8 + (lane & 7);
    float v[VEC];
    unpack16<DT, VEC>(raw[it], v);
    int c[VEC];
#pragma unroll
    for (int jj = 0; jj < VEC; ++jj) c[jj] = quant8(v[jj], PER_COL ? scale[j * VEC + jj] : s);
    u32 w[KW];
    pack_codes<VEC>(c, w);
    // a warp's 32 lanes: n % 4 and j % 8 all differ, n / 4 is shared: 32 distinct banks
#pragma unroll
    for (int h = 0; h < KW; ++h) tile[(KW * j + h) * QT_TN + (((n >> 2) ^ (j & 7)) << 2) + (n & 3)] = w[h];
  }
  __syncthreads();

  // Phase B: task (kq, n16): codes k = 4 kq .. + 3, n = 16 n16 .. + 15. Each quarter warp
  // (8 lanes, one 16-byte shared load phase) has 8 kq with distinct (kq / KW) % 8, so its
  // chunks land in 8 different 16-byte bank groups.
  constexpr int TASKS = KQ * (QT_TN / 16);  // 256 (16-bit x) or 128 (fp32)
  if (tid < TASKS) {
    const int sub = lane & 7, rest = warp >> 1;
    const int kq = KW * (8 * (rest & 1) + sub) + (rest >> 1);
    const int n16 = (lane >> 3) + 4 * (warp & 1);
    u32 o[4][4];  // o[kk][i]: codes of k = 4 kq + kk at n = 16 n16 + 4 i .. + 3
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int c = 4 * n16 + i;
      const uint4 t = *reinterpret_cast<const uint4*>(&tile[kq * QT_TN + ((c ^ sub) << 2)]);
      // t.x .. t.w: n = 4c .. 4c + 3, bytes k = 4 kq .. + 3: a 4 x 4 byte transpose
      const u32 lo0 = __byte_perm(t.x, t.y, 0x5140), hi0 = __byte_perm(t.x, t.y, 0x7362);
      const u32 lo1 = __byte_perm(t.z, t.w, 0x5140), hi1 = __byte_perm(t.z, t.w, 0x7362);
      o[0][i] = __byte_perm(lo0, lo1, 0x5410);
      o[1][i] = __byte_perm(lo0, lo1, 0x7632);
      o[2][i] = __byte_perm(hi0, hi1, 0x5410);
      o[3][i] = __byte_perm(hi0, hi1, 0x7632);
    }
    const int n = n0 + 16 * n16;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int k = k0 + 4 * kq + kk;
      if (k < K && n < N) {
        i8* dst = qT + (i64)k * N + n;
        if (vec_out && n + 16 <= N) {
          st_cs(dst, make_uint4(o[kk][0], o[kk][1], o[kk][2], o[kk][3]));
        } else {
#pragma unroll
          for (int i = 0; i < 16; ++i)
            if (n + i < N) dst[i] = (i8)(o[kk][i >> 2] >> (8 * (i & 3)));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
template <int DT, bool THRESH>
__global__ void __launch_bounds__(256)
quant_cols(const typename Storage<DT>::type* __restrict__ x, const u32* __restrict__ colmax_bits,
           float threshold, i8* __restrict__ q, int rows, int cols) {
  const i64 n = (i64)rows * cols;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const int c = (int)(i % cols);
    const float v = ld1<DT>(x + i);
    const float s = scale_of(__uint_as_float(__ldg(colmax_bits + c)));
    q[i] = (i8)((THRESH && fabsf(v) >= threshold) ? 0 : quant8(v, s));
  }
}

__global__ void __launch_bounds__(256)
zero_cols(i8* __restrict__ q, int rows, int cols, const long long* __restrict__ idx, int nidx) {
  const i64 n = (i64)rows * nidx;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
    q[(i / nidx) * cols + idx[i % nidx]] = 0;
}

// ------------------------------------------------------------------------------------------
template <int SDT, int ODT>
__global__ void __launch_bounds__(256)
dequant_rows(const i8* __restrict__ q, const typename Storage<SDT>::type* __restrict__ stats,
             typename Storage<ODT>::type* __restrict__ out, int rows, int cols, int vec_ok) {
  constexpr int V = 16;
  const i64 n = (i64)rows * cols;
  const float k = QK_RCP127;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t * V < n; t += stride) {
    const i64 i = t * V;
    if (vec_ok) {  // cols % 16 == 0: one row per vector
      const float s = to_f32<SDT>(stats[i / cols]);
      uint4 w = __ldg(reinterpret_cast<const uint4*>(q + i));
      const i8* c = reinterpret_cast<const i8*>(&w);
      float o[V];
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = __fmul_rn(__fmul_rn((float)c[j], s), k);
      store_vec<ODT, V>(out + i, o);
    } else {
      for (int j = 0; j < V && i + j < n; ++j) {
        const float s = to_f32<SDT>(stats[(i + j) / cols]);
        out[i + j] = from_f32<ODT>(__fmul_rn(__fmul_rn((float)q[i + j], s), k));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
template <int ODT, int BDT>
__global__ void __launch_bounds__(256)
mm_dequant(const int* __restrict__ C, const float* __restrict__ r, const float* __restrict__ c,
           const void* __restrict__ bias, typename Storage<ODT>::type* __restrict__ out,
           int rows, int cols) {
  const i64 n = (i64)rows * cols;
  for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
    const int row = (int)(i / cols), col = (int)(i % cols);
    float v = __fmul_rn(__fmul_rn(__fmul_rn((float)C[i], __ldg(r + row)), __ldg(c + col)), QK_KDEQ);
    out[i] = from_f32<ODT>(Bias<BDT>::add(v, bias, col));
  }
}

// ------------------------------------------------------------------------------------------
// The GEMM.
#define G_BM 128
#define G_BN 128
#define G_BK 64
#define G_STAGES 4
#define G_THREADS 256
#define G_TILE_BYTES (G_BM * G_BK)                 // one operand's tile: 128 rows x 64 bytes
#define G_STAGE_BYTES (2 * G_TILE_BYTES)
#define G_SMEM (G_STAGES * G_STAGE_BYTES)           // 64 KB

// byte offset of 16-byte chunk `chunk` (0..3) of tile row `row`
__device__ __forceinline__ int swz(int row, int chunk) { return row * G_BK + ((chunk ^ ((row >> 1) & 3)) << 4); }

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Load one operand's 128 x 64 tile (rows row0.., k0..) of a (rows, K) row-major int8 matrix.
template <bool ALIGNED>
__device__ __forceinline__ void load_tile(u8* tile, const i8* __restrict__ g, int rows, int K,
                                          int row0, int k0) {
#pragma unroll
  for (int i = 0; i < (G_BM * G_BK / 16) / G_THREADS; ++i) {
    const int e = threadIdx.x + i * G_THREADS;
    const int r = e >> 2, ch = e & 3;
    const int gr = row0 + r, gk = k0 + ch * 16;
    if (ALIGNED) {
      const bool valid = gr < rows && gk < K;  // K % 16 == 0: a chunk is all in or all out
      const i8* src = valid ? g + (i64)gr * K + gk : g;
      cp_async16(smem_u32(tile + swz(r, ch)), src, valid);
    } else {
      u32 w[4] = {0u, 0u, 0u, 0u};
      if (gr < rows) {
        const u8* src = reinterpret_cast<const u8*>(g + (i64)gr * K);
#pragma unroll
        for (int j = 0; j < 16; ++j)
          if (gk + j < K) w[j >> 2] |= (u32)src[gk + j] << (8 * (j & 3));
      }
      *reinterpret_cast<uint4*>(tile + swz(r, ch)) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

template <int ODT> struct GemmOut { typedef typename Storage<ODT>::type type; };
template <> struct GemmOut<3> { typedef int type; };

template <int ODT, int RDT, int CDT, int BDT, bool CGLOBAL>
__device__ __forceinline__ void store_pair(typename GemmOut<ODT>::type* __restrict__ out, int M, int N,
                                           int row, int col, int a0, int a1,
                                           const void* __restrict__ rs, const void* __restrict__ cs,
                                           const void* __restrict__ bias, bool vec_out) {
  if (row >= M || col >= N) return;
  const bool pair = col + 1 < N;
  if constexpr (ODT == 3) {  // the raw int32 product
    int* p = out + (i64)row * N + col;
    if (vec_out && pair) {
      *reinterpret_cast<int2*>(p) = make_int2(a0, a1);
    } else {
      p[0] = a0;
      if (pair) p[1] = a1;
    }
  } else {
    typedef typename Storage<CDT>::type CT;
    const float r = to_f32<RDT>(reinterpret_cast<const typename Storage<RDT>::type*>(rs)[row]);
    const int col1 = pair ? col + 1 : col;
    const float c0 = to_f32<CDT>(reinterpret_cast<const CT*>(cs)[CGLOBAL ? 0 : col]);
    const float c1 = to_f32<CDT>(reinterpret_cast<const CT*>(cs)[CGLOBAL ? 0 : col1]);
    const float v0 = Bias<BDT>::add(__fmul_rn(__fmul_rn(__fmul_rn((float)a0, r), c0), QK_KDEQ), bias, col);
    const float v1 = Bias<BDT>::add(__fmul_rn(__fmul_rn(__fmul_rn((float)a1, r), c1), QK_KDEQ), bias, col1);
    typename Storage<ODT>::type* p = out + (i64)row * N + col;
    if (vec_out && pair) {
      if constexpr (ODT == QK_DT_F32) {
        *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
      } else {
        *reinterpret_cast<u32*>(p) = (u32)from_f32<ODT>(v0) | ((u32)from_f32<ODT>(v1) << 16);
      }
    } else {
      p[0] = from_f32<ODT>(v0);
      if (pair) p[1] = from_f32<ODT>(v1);
    }
  }
}

template <int ODT, int RDT, int CDT, int BDT, bool CGLOBAL, bool ALIGNED>
__global__ void __launch_bounds__(G_THREADS, 2)
int8_gemm(const i8* __restrict__ A, const i8* __restrict__ B, int M, int N, int K,
          const void* __restrict__ row_scale, const void* __restrict__ col_scale,
          const void* __restrict__ bias, typename GemmOut<ODT>::type* __restrict__ out, int vec_out) {
  extern __shared__ __align__(128) u8 smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 1, warp_n = warp >> 1;  // 2 x 4 warps of 64 x 32

  // grouped raster: 8 M-tiles share each B panel while it is in L2
  const int tiles_m = (M + G_BM - 1) / G_BM, tiles_n = (N + G_BN - 1) / G_BN;
  const int per_group = 8 * tiles_n;
  const int pid = blockIdx.x;
  const int first_m = (pid / per_group) * 8;
  const int gsize = min(tiles_m - first_m, 8);
  const int tm = first_m + (pid % per_group) % gsize;
  const int tn = (pid % per_group) / gsize;
  const int m0 = tm * G_BM, n0 = tn * G_BN;

  int acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[i][j][k] = 0;

  const int KT = (K + G_BK - 1) / G_BK;
#pragma unroll
  for (int s = 0; s < G_STAGES - 1; ++s) {
    if (s < KT) {
      load_tile<ALIGNED>(smem + s * G_STAGE_BYTES, A, M, K, m0, s * G_BK);
      load_tile<ALIGNED>(smem + s * G_STAGE_BYTES + G_TILE_BYTES, B, N, K, n0, s * G_BK);
    }
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    cp_async_wait<G_STAGES - 2>();
    __syncthreads();  // tile kt has landed; every warp is done with tile kt - 1
    const int nk = kt + G_STAGES - 1;
    if (nk < KT) {
      u8* st = smem + (nk % G_STAGES) * G_STAGE_BYTES;
      load_tile<ALIGNED>(st, A, M, K, m0, nk * G_BK);
      load_tile<ALIGNED>(st + G_TILE_BYTES, B, N, K, n0, nk * G_BK);
    }
    cp_async_commit();

    const u8* sa = smem + (kt % G_STAGES) * G_STAGE_BYTES;
    const u8* sb = sa + G_TILE_BYTES;
#pragma unroll
    for (int kk = 0; kk < G_BK / 32; ++kk) {
      u32 a[4][4], b[4][2];
      // A: matrices (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31)
      // = a0..a3 of the m16n8k32 row-major fragment; lane l addresses row l & 15, chunk l >> 4.
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int row = warp_m * 64 + mi * 16 + (lane & 15);
        ldsm_x4(smem_u32(sa + swz(row, kk * 2 + (lane >> 4))), a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
      }
      // B (N, K rows): matrices (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31)
      // = b0, b1 of n-tile 2 nj and b0, b1 of n-tile 2 nj + 1.
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int mt = lane >> 3;
        const int row = warp_n * 32 + nj * 16 + (mt >> 1) * 8 + (lane & 7);
        ldsm_x4(smem_u32(sb + swz(row, kk * 2 + (mt & 1))),
                b[2 * nj][0], b[2 * nj][1], b[2 * nj + 1][0], b[2 * nj + 1][1]);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_s8(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  }
  cp_async_wait<0>();

  // accumulator (mi, ni, i): row g (+8 for i >= 2), column 2 t (+1 for odd i), g = lane / 4, t = lane % 4
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const int row = m0 + warp_m * 64 + mi * 16 + g;
      const int col = n0 + warp_n * 32 + ni * 8 + 2 * t;
      store_pair<ODT, RDT, CDT, BDT, CGLOBAL>(out, M, N, row, col, acc[mi][ni][0], acc[mi][ni][1],
                                              row_scale, col_scale, bias, vec_out);
      store_pair<ODT, RDT, CDT, BDT, CGLOBAL>(out, M, N, row + 8, col, acc[mi][ni][2], acc[mi][ni][3],
                                              row_scale, col_scale, bias, vec_out);
    }
}
