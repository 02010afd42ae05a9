// Native float8 quantizers: the operands of the native FP8 layers' torch._scaled_mm GEMMs.
// Reference: reference/fp8.py (quantize_fp8_rowwise_f32, quantize_fp8_global_f32). Launcher: _cupy.py.
//
// DT is the input's storage type (common.cuh: 0 = float32, 1 = float16, 2 = bfloat16); E5M2
// picks float8_e5m2 (max 57344) over float8_e4m3fn (max 448). Codes are the float8 bytes.
// The rule, per row or over the whole tensor, in float32 (the reference's, bit for bit):
//   amax = max |x| (NaN propagates)   scale = amax > 0 ? amax * f32(1/fmax) : 1
//   (NaN amax: scale NaN row-wise, 1 for the global scale)   code = fp8(clamp(x / scale))
// The quotient is IEEE (__fdiv_rn's), though formed without dividing wherever that is proven to
// give the same code (fp8x4); the float8 rounding is cvt.rn.satfinite (nearest even, sm_89+) on
// |y| clamped to fmax, with the sign put back and a NaN quotient giving 0x7F.
//
// fp8_quantize_rows<DT, E5M2, NV>       a CTA per row at a time, grid-stride over rows
//   in:  x (rows, cols) DT row-major.   out: q u8 (rows, cols), scale f32 (rows,)
//   Each thread caches NV 16-byte vectors of its row in registers (NV * blockDim * 16 bytes
//   per row, 16K elements of a 16-bit row at 1024 threads), so the row is read once: the
//   absmax, a CTA max, then the codes from the registers; the CTA's next row is loaded
//   meanwhile (the launcher starts one wave of CTAs, as int8.cu's row_quant). Columns past
//   the cache are read twice. Traffic: ES + 1 bytes per element.
// fp8_absmax_global<DT>                  grid-stride NaN-propagating max |x|, one atomicMax per
//   CTA on the float's bits into out u32 (1,) (zeroed by the caller; NaN's bits sort above Inf).
// fp8_quantize_global<DT, E5M2>          codes with the one scale of that absmax; writes scale
//   f32 (1,). Walks the array backwards: the absmax pass read the tail last, L2 still has it.
// fp8_col_absmax<DT>                     x (N, K): per-column absmax into out u32 (K,) (zeroed
//   by the caller). CTA (32, 8): 32 column vectors x 8 row lanes over a slab of rows, reduced
//   in shared memory, one atomicMax per column and CTA.
// fp8_quantize_transpose<DT, E5M2, PER_COL>   x (N, K) -> qT u8 (K, N) = codes of x^T, one scale
//   per column of x (PER_COL: row-wise quantization of x^T, from fp8_col_absmax) or one global
//   scale; writes scale f32 (K,) or (1,). 64 x 64 tiles, 256 threads: coalesced 16-byte loads of
//   x, codes through shared memory, coalesced 16-byte stores of qT rows.
//
// A gradient G (M, N) feeds two GEMMs of the backward: dX needs its row-wise codes, dW those of
// G^T (a scale per column of G), and dbias is G's column sums. Two kernels give all three in
// two reads of G (the separate row, column-absmax and transpose passes and G.sum(0) read it four
// times):
// fp8_absmax_rows_cols<DT>     x (M, N) -> row_amax u32 (M,), col_amax u32 (N,) (both zeroed by
//   the caller; NaN-propagating, float bits, one atomicMax per row / column and CTA) and
//   colsum f32 (gridDim.y, N) unless null: each CTA's column sums over its slab of rows (not atomics, so
//   that the sum is the same every run). CTA: 8 warps over a strip of 64 16-byte vectors of the
//   columns and a slab of rows_per_cta rows, warp w taking rows w, w + 8, ...; one atomicMax per
//   row and strip, and per column and CTA after a reduction over the warps in shared memory
//   (few atomics on one address: narrow matrices stay memory-bound).
// fp8_quantize_rows_cols<DT, RFMT, CFMT>   x (M, N) -> q u8 (M, N) row-wise codes (RFMT: 0 e4m3,
//   1 e5m2), qT u8 (N, M) the row-wise codes of x^T (CFMT), their scales srow (M,), scol (N,),
//   and, with parts > 0, dbias (N,) DT = sum over the parts of colsum in a fixed order (the
//   CTAs of the first tile row). 128 x 128 tiles; a thread takes 4 rows x one 16-byte vector
//   (lanes: 8 row groups x 4 vectors), writes the row codes straight out (8 bytes a row) and
//   packs the column codes of its 4 rows into words of a transposed shared tile (33-word rows:
//   no bank conflicts), read out as 16-byte stores of qT rows.
#include "common.cuh"

__device__ __forceinline__ float fp8_max(bool e5m2) { return e5m2 ? 57344.0f : 448.0f; }
__device__ __forceinline__ float fp8_inv_max(bool e5m2) {   // f32(1/57344), f32(1/448)
  return __int_as_float(e5m2 ? 0x37924925 : 0x3b124925);
}

template <bool E5M2, bool NAN_SCALE>
__device__ __forceinline__ float fp8_scale(float amax) {
  const float s = amax > 0.0f ? __fmul_rn(amax, fp8_inv_max(E5M2)) : 1.0f;
  return (NAN_SCALE && amax != amax) ? amax : s;
}

// The float8 codes of the float32 quotients ya, yb (ya in the low byte): round |y| clamped to
// fmax, then the sign; a NaN quotient gives 0x7F.
template <bool E5M2>
__device__ __forceinline__ u32 fp8_pair(float ya, float yb) {
  const float m = fp8_max(E5M2);
  const float ca = fminf(fabsf(ya), m), cb = fminf(fabsf(yb), m);  // NaN -> m, fixed below
  u16 h;
  if (E5M2) asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(h) : "f"(cb), "f"(ca));
  else asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(h) : "f"(cb), "f"(ca));
  u32 r = (u32)h | ((__float_as_uint(ya) >> 24) & 0x80u) | ((__float_as_uint(yb) >> 16) & 0x8000u);
  if (ya != ya) r = (r & 0xFF00u) | 0x7Fu;
  if (yb != yb) r = (r & 0x00FFu) | 0x7F00u;
  return r;
}

// The reciprocal that fp8x4 multiplies by: f32(1/s) for 2^-60 <= s <= 2^125, else 0, which
// makes fp8x4 divide. (The bound below keeps fp8x4's residuals s * y - x clear of underflow.)
__device__ __forceinline__ float fp8_recip(float s) {
  return (s >= 0x1p-60f && s <= 0x1p125f) ? __frcp_rn(s) : 0.0f;
}

// Four float8 codes of float32 values (a in the low byte), rounded nearest-even and saturated.
template <bool E5M2>
__device__ __forceinline__ u32 fp8_cvt4(float a, float b, float c, float d) {
  u16 lo, hi;
  if (E5M2) {
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
  } else {
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
  }
  return (u32)lo | ((u32)hi << 16);
}

// The rule's codes by IEEE division, out of line: fp8x4's rare fallback.
template <bool E5M2>
__device__ __noinline__ u32 fp8x4_divide(float x0, float x1, float x2, float x3, float s0, float s1,
                                         float s2, float s3) {
  return fp8_pair<E5M2>(__fdiv_rn(x0, s0), __fdiv_rn(x1, s1)) |
         (fp8_pair<E5M2>(__fdiv_rn(x2, s2), __fdiv_rn(x3, s3)) << 16);
}

// The codes of x[0..3] (x[0] in the low byte) for scales s[i], r[i] = fp8_recip(s[i]): those
// of the IEEE quotients f32(x / s) (fp8_pair(__fdiv_rn(x, s))), mostly without dividing.
// NARROW (16-bit inputs: at most 11 significant bits): q = y - (s y - x) r with y = f32(x r),
// one Newton step from the reciprocal's product (Markstein's correction; two FMAs), equals
// f32(x / s) itself for every 16-bit x and every scale of the rule (f32(amax * f32(1 / fmax))
// of a 16-bit amax >= |x|, or 1): tests/test_fp8_quotient.py checks all pairs of mantissas at
// every exponent distance where a code can be non-zero, and with 2^-60 <= s <= 2^125 nothing
// underflows, so the check covers every exponent. (Written s y - x, not x - s y, so that
// x = -0 keeps its sign.) Wider inputs (float32): y = (x / s)(1 + d), |d| < 2^-22; y (1 -+
// 2^-21), rounded, lie below and above both x / s and f32(x / s), and rounding to float8 is
// monotone, so when the two give one code it is f32(x / s)'s (signs included: the rounding is
// symmetric); a float8 rounding boundary within about 8 ulps (some 16 in 2^20 quotients)
// divides. Either way a zero r (an out-of-range or NaN scale) divides. MAY_NAN: x may hold a NaN
// or Inf while r != 0 (a global scale, which stays finite): those divide too; row and column
// scales are NaN or Inf (r = 0) wherever their x holds a NaN or Inf.
template <int DT> constexpr bool kNarrow = Storage<DT>::bytes == 2;  // fp8x4's NARROW for DT
template <bool E5M2, bool MAY_NAN, bool NARROW>
__device__ __forceinline__ u32 fp8x4(const float (&x)[4], const float (&s)[4], const float (&r)[4]) {
  bool ok = r[0] != 0.0f && r[1] != 0.0f && r[2] != 0.0f && r[3] != 0.0f;
  if (MAY_NAN) {
#pragma unroll
    for (int i = 0; i < 4; ++i) ok = ok && fabsf(x[i]) < __int_as_float(0x7F800000);
  }
  if (NARROW) {
    float q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float y = __fmul_rn(x[i], r[i]);
      q[i] = __fmaf_rn(-__fmaf_rn(s[i], y, -x[i]), r[i], y);
    }
    if (ok) return fp8_cvt4<E5M2>(q[0], q[1], q[2], q[3]);
  } else {
    float lo[4], hi[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float y = __fmul_rn(x[i], r[i]);
      lo[i] = __fmul_rn(y, 0x1.fffffcp-1f);  // 1 - 2^-21
      hi[i] = __fmul_rn(y, 0x1.000008p+0f);  // 1 + 2^-21
    }
    const u32 cl = fp8_cvt4<E5M2>(lo[0], lo[1], lo[2], lo[3]);
    const u32 ch = fp8_cvt4<E5M2>(hi[0], hi[1], hi[2], hi[3]);
    if (ok && cl == ch) return cl;
  }
  return fp8x4_divide<E5M2>(x[0], x[1], x[2], x[3], s[0], s[1], s[2], s[3]);
}

// Codes of V floats (V a multiple of 4) for one scale s and r = fp8_recip(s), packed
// little-endian into V / 4 words.
template <bool E5M2, bool MAY_NAN, bool NARROW, int V>
__device__ __forceinline__ void fp8_codes(const float (&v)[V], float s, float r, u32 (&w)[V / 4]) {
  const float s4[4] = {s, s, s, s}, r4[4] = {r, r, r, r};
#pragma unroll
  for (int k = 0; k < V / 4; ++k) {
    const float x4[4] = {v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]};
    w[k] = fp8x4<E5M2, MAY_NAN, NARROW>(x4, s4, r4);
  }
}

// Store the V codes of elements i .. i+V-1 of a row of n codes: one 4- or 8-byte store when
// `vec` (aligned, whole vector inside the row), else byte by byte up to n.
template <int V>
__device__ __forceinline__ void store_codes(u8* __restrict__ q, i64 i, i64 n, bool vec, const u32 (&w)[V / 4]) {
  if (vec && i + V <= n) {
    if (V == 8) *reinterpret_cast<uint2*>(q + i) = make_uint2(w[0], w[V / 4 - 1]);
    else *reinterpret_cast<u32*>(q + i) = w[0];
  } else {
#pragma unroll
    for (int j = 0; j < V; ++j)
      if (i + j < n) q[i + j] = (u8)(w[j / 4] >> (8 * (j % 4)));
  }
}

template <int VEC>
__device__ __forceinline__ float absmax_of(const float (&v)[VEC], float m) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) m = nan_max(fabsf(v[j]), m);
  return m;
}

// ------------------------------------------------------------------------------------------
template <int DT, bool E5M2, int NV>
__global__ void __launch_bounds__(1024)
fp8_quantize_rows(const typename Storage<DT>::type* __restrict__ x, u8* __restrict__ q,
                  float* __restrict__ scale, int rows, int cols, int vec_ok) {
  typedef typename Storage<DT>::type T;
  constexpr int VEC = 16 / Storage<DT>::bytes;
  __shared__ float red[32];
  const int tid = threadIdx.x, nt = blockDim.x;
  const i64 cached = (i64)NV * VEC * nt;  // columns held in registers
  uint4 next[NV];                          // the CTA's next row, loaded a row ahead
  auto fetch = [&](int row) {
#pragma unroll
    for (int k = 0; k < NV; ++k)
      next[k] = row < rows ? load_raw16<DT>(x + (i64)row * cols, ((i64)k * nt + tid) * VEC, cols, vec_ok)
                           : make_uint4(0u, 0u, 0u, 0u);  // zeros past cols
  };
  fetch(blockIdx.x);
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + (i64)row * cols;
    u8* qr = q + (i64)row * cols;
    uint4 raw[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) raw[k] = next[k];
    fetch(row + gridDim.x);                // in flight during this row's reduction and stores
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      float v[VEC];
      raw16_to_f32<DT>(raw[k], v);
      m = absmax_of(v, m);
    }
    for (i64 c = cached + (i64)tid * VEC; c < cols; c += (i64)nt * VEC) {
      float v[VEC];
      raw16_to_f32<DT>(load_raw16<DT>(xr, c, cols, vec_ok), v);
      m = absmax_of(v, m);
    }
    m = block_max(m, red);
    const float s = fp8_scale<E5M2, true>(m), rs = fp8_recip(s);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const i64 c = ((i64)k * nt + tid) * VEC;
      if (c < cols) {
        float v[VEC];
        u32 w[VEC / 4];
        raw16_to_f32<DT>(raw[k], v);
        fp8_codes<E5M2, false, kNarrow<DT>>(v, s, rs, w);
        store_codes<VEC>(qr, c, cols, vec_ok, w);
      }
    }
    for (i64 c = cached + (i64)tid * VEC; c < cols; c += (i64)nt * VEC) {
      float v[VEC];
      u32 w[VEC / 4];
      raw16_to_f32<DT>(load_raw16<DT>(xr, c, cols, vec_ok), v);
      fp8_codes<E5M2, false, kNarrow<DT>>(v, s, rs, w);
      store_codes<VEC>(qr, c, cols, vec_ok, w);
    }
    if (tid == 0) scale[row] = s;
  }
}

// ------------------------------------------------------------------------------------------
template <int DT>
__global__ void __launch_bounds__(256)
fp8_absmax_global(const typename Storage<DT>::type* __restrict__ x, i64 n, u32* __restrict__ out,
                  int vec_ok) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  __shared__ float red[32];
  float m = 0.0f;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 nvec = vec_ok ? n / VEC : 0;
  i64 t = first;
  for (; t + stride < nvec; t += 2 * stride) {  // two independent 16-byte loads in flight
    float a[VEC], b[VEC];
    raw16_to_f32<DT>(load_raw16<DT>(x, t * VEC, n, true), a);
    raw16_to_f32<DT>(load_raw16<DT>(x, (t + stride) * VEC, n, true), b);
    m = absmax_of(b, absmax_of(a, m));
  }
  for (; t < nvec; t += stride) {
    float a[VEC];
    raw16_to_f32<DT>(load_raw16<DT>(x, t * VEC, n, true), a);
    m = absmax_of(a, m);
  }
  for (i64 i = nvec * VEC + first; i < n; i += stride) m = nan_max(fabsf(to_f32<DT>(x[i])), m);
  m = block_max(m, red);
  if (threadIdx.x == 0) atomicMax(out, __float_as_uint(m));
}

// ------------------------------------------------------------------------------------------
template <int DT, bool E5M2>
__global__ void __launch_bounds__(256)
fp8_quantize_global(const typename Storage<DT>::type* __restrict__ x, const u32* __restrict__ absmax_bits,
                    u8* __restrict__ q, float* __restrict__ scale, i64 n, int vec_ok) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  const float s = fp8_scale<E5M2, false>(__uint_as_float(absmax_bits[0])), rs = fp8_recip(s);
  const i64 stride = (i64)gridDim.x * blockDim.x;
  const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (first == 0) scale[0] = s;
  const i64 nvec = vec_ok ? n / VEC : 0;
  for (i64 t = nvec - 1 - first; t >= 0; t -= stride) {
    float v[VEC];
    u32 w[VEC / 4];
    raw16_to_f32<DT>(load_raw16<DT>(x, t * VEC, n, true), v);
    fp8_codes<E5M2, true, kNarrow<DT>>(v, s, rs, w);
    store_codes<VEC>(q, t * VEC, n, true, w);
  }
  for (i64 i = n - 1 - first; i >= nvec * VEC; i -= stride) {
    const float v = to_f32<DT>(x[i]);
    const float x4[4] = {v, 0.0f, 0.0f, 0.0f}, s4[4] = {s, s, s, s}, r4[4] = {rs, rs, rs, rs};
    q[i] = (u8)fp8x4<E5M2, true, kNarrow<DT>>(x4, s4, r4);
  }
}

// ------------------------------------------------------------------------------------------
template <int DT>
__global__ void __launch_bounds__(256)
fp8_col_absmax(const typename Storage<DT>::type* __restrict__ x, int rows, int cols, int rows_per_cta,
               u32* __restrict__ out, int vec_ok) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  __shared__ float red[8][32 * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int c0 = (blockIdx.x * 32 + tx) * VEC;
  const int r0 = blockIdx.y * rows_per_cta;
  const int r1 = min(rows, r0 + rows_per_cta);
  float m[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) m[j] = 0.0f;
  if (c0 < cols) {
#pragma unroll 4
    for (int r = r0 + ty; r < r1; r += 8) {  // unrolled: 4 independent 16-byte loads in flight
      float v[VEC];
      raw16_to_f32<DT>(load_raw16<DT>(x + (i64)r * cols, c0, cols, vec_ok), v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m[j] = nan_max(fabsf(v[j]), m[j]);
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
#define FP8_TILE 64
#define FP8_RL 68  // shared row length in bytes: 4-byte aligned rows, few bank conflicts
template <int DT, bool E5M2, bool PER_COL>
__global__ void __launch_bounds__(256)
fp8_quantize_transpose(const typename Storage<DT>::type* __restrict__ x, const u32* __restrict__ absmax_bits,
                       u8* __restrict__ qT, float* __restrict__ scale, int N, int K, int vec_in,
                       int vec_out) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  constexpr int VPR = FP8_TILE / VEC;  // vectors per tile row
  __shared__ __align__(16) u8 tile[FP8_TILE * FP8_RL];
  __shared__ float s_tile[FP8_TILE], r_tile[FP8_TILE];
  const int tid = threadIdx.x;
  // reverse tile order: the absmax pass read the end of x last
  const int tiles_k = (K + FP8_TILE - 1) / FP8_TILE;
  const int lin = tiles_k * gridDim.y - 1 - (blockIdx.y * tiles_k + blockIdx.x);
  const int k0 = (lin % tiles_k) * FP8_TILE, n0 = (lin / tiles_k) * FP8_TILE;
  if (tid < FP8_TILE) {
    const float m = __uint_as_float(absmax_bits[PER_COL ? min(k0 + tid, K - 1) : 0]);
    const float s = fp8_scale<E5M2, PER_COL>(m);
    s_tile[tid] = s;
    r_tile[tid] = fp8_recip(s);
    if (PER_COL && n0 == 0 && k0 + tid < K) scale[k0 + tid] = s;
    if (!PER_COL && lin == 0 && tid == 0) scale[0] = s;
  }
  __syncthreads();
  for (int e = tid; e < FP8_TILE * VPR; e += 256) {
    const int r = e / VPR, kv = (e % VPR) * VEC;
    const int n = n0 + r, k = k0 + kv;
    float v[VEC];
    if (n < N) {
      raw16_to_f32<DT>(load_raw16<DT>(x + (i64)n * K, k, K, vec_in), v);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = 0.0f;
    }
    u32 w[VEC / 4];
#pragma unroll
    for (int j4 = 0; j4 < VEC / 4; ++j4) {
      const int j = 4 * j4;
      const float x4[4] = {v[j], v[j + 1], v[j + 2], v[j + 3]};
      float s4[4], r4[4];  // a scale per column k of the tile, or one
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s4[i] = s_tile[PER_COL ? kv + j + i : 0];
        r4[i] = r_tile[PER_COL ? kv + j + i : 0];
      }
      w[j4] = fp8x4<E5M2, !PER_COL, kNarrow<DT>>(x4, s4, r4);
    }
#pragma unroll
    for (int j4 = 0; j4 < VEC / 4; ++j4) *reinterpret_cast<u32*>(tile + r * FP8_RL + kv + 4 * j4) = w[j4];
  }
  __syncthreads();
  // qT row k0 + kk, columns n0 + 16 c .. +15: gather 16 codes down a tile column
  const int kk = tid >> 2, c = tid & 3;
  const int k = k0 + kk, n = n0 + c * 16;
  if (k < K && n < N) {
    u32 w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = 0; i < 16; ++i) w[i >> 2] |= (u32)tile[(c * 16 + i) * FP8_RL + kk] << (8 * (i & 3));
    u8* dst = qT + (i64)k * N + n;
    if (vec_out && n + 16 <= N) {
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      for (int i = 0; i < 16 && n + i < N; ++i) dst[i] = (u8)(w[i >> 2] >> (8 * (i & 3)));
    }
  }
}

// ------------------------------------------------------------------------------------------
#define RC_VPT 2   // 16-byte vectors per lane and row: a warp spans 64 vectors of a row
#define RC_ROWS 4  // rows a warp loads together
template <int DT>
__global__ void __launch_bounds__(256, 3)
fp8_absmax_rows_cols(const typename Storage<DT>::type* __restrict__ x, int M, int N, int rows_per_cta,
                     u32* __restrict__ row_amax, u32* __restrict__ col_amax, float* __restrict__ colsum,
                     int vec_ok) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  constexpr int SPAN = 32 * RC_VPT * VEC;  // columns of the CTA's strip
  __shared__ float red[8][SPAN];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const i64 c0 = (i64)blockIdx.x * SPAN;
  const int r0 = blockIdx.y * rows_per_cta, r1 = min(M, r0 + rows_per_cta);
  float cm[RC_VPT][VEC], cs[RC_VPT][VEC];
#pragma unroll
  for (int k = 0; k < RC_VPT; ++k)
#pragma unroll
    for (int j = 0; j < VEC; ++j) cm[k][j] = cs[k][j] = 0.0f;
  // warp w takes rows r0 + w, r0 + w + 8, ...: RC_ROWS of them at a time, their loads in flight
  for (int r = r0 + warp; r < r1; r += 8 * RC_ROWS) {
    uint4 raw[RC_ROWS][RC_VPT];
#pragma unroll
    for (int h = 0; h < RC_ROWS; ++h)
#pragma unroll
      for (int k = 0; k < RC_VPT; ++k) {
        const int row = r + 8 * h;
        const i64 c = c0 + ((i64)k * 32 + lane) * VEC;
        raw[h][k] = row < r1 ? load_raw16<DT>(x + (i64)row * N, c, N, vec_ok) : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
    for (int h = 0; h < RC_ROWS; ++h) {
      float m = 0.0f;
#pragma unroll
      for (int k = 0; k < RC_VPT; ++k) {
        float v[VEC];
        raw16_to_f32<DT>(raw[h][k], v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float a = fabsf(v[j]);
          m = nan_max(a, m);
          cm[k][j] = nan_max(a, cm[k][j]);
          cs[k][j] += v[j];
        }
      }
#pragma unroll
      for (int off = 16; off >= 1; off /= 2) m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
      if (lane == 0 && r + 8 * h < r1) atomicMax(row_amax + r + 8 * h, __float_as_uint(m));
    }
  }
  // the strip's column maxima, then its column sums, over the 8 warps in a fixed order
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
    if (pass == 1 && colsum == nullptr) break;
#pragma unroll
    for (int k = 0; k < RC_VPT; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) red[warp][(k * 32 + lane) * VEC + j] = pass == 0 ? cm[k][j] : cs[k][j];
    __syncthreads();
    for (int i = tid; i < SPAN; i += 256) {
      const i64 c = c0 + i;
      float a = red[0][i];
#pragma unroll
      for (int w = 1; w < 8; ++w) a = pass == 0 ? nan_max(red[w][i], a) : a + red[w][i];
      if (c < N) {
        if (pass == 0) atomicMax(col_amax + c, __float_as_uint(a));
        else colsum[(i64)blockIdx.y * N + c] = a;
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------
#define RQ_TILE 128
#define RQ_WR 33  // words per row of the transposed shared tile
template <int DT, int RFMT, int CFMT>
__global__ void __launch_bounds__(256)
fp8_quantize_rows_cols(const typename Storage<DT>::type* __restrict__ x, const u32* __restrict__ row_amax,
                       const u32* __restrict__ col_amax, u8* __restrict__ q, u8* __restrict__ qT,
                       float* __restrict__ srow, float* __restrict__ scol,
                       const float* __restrict__ colsum, int parts,
                       typename Storage<DT>::type* __restrict__ dbias, int M, int N, int vec_in,
                       int vec_row, int vec_t) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
  constexpr bool RE5 = RFMT == 1, CE5 = CFMT == 1;
  __shared__ u32 tileT[RQ_TILE * RQ_WR];
  __shared__ float rs[RQ_TILE], rr[RQ_TILE], cs_[RQ_TILE], cr[RQ_TILE];
  __shared__ float dsum[RQ_TILE];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int n0 = blockIdx.x * RQ_TILE, m0 = blockIdx.y * RQ_TILE;
  if (tid < RQ_TILE) {
    const int m = m0 + tid;
    const float s = fp8_scale<RE5, true>(__uint_as_float(row_amax[min(m, M - 1)]));
    rs[tid] = s;
    rr[tid] = fp8_recip(s);
    if (n0 == 0 && m < M) srow[m] = s;
  } else {
    const int i = tid - RQ_TILE, n = n0 + i;
    const float s = fp8_scale<CE5, true>(__uint_as_float(col_amax[min(n, N - 1)]));
    cs_[i] = s;
    cr[i] = fp8_recip(s);
    if (m0 == 0 && n < N) scol[n] = s;
  }
  if (parts > 0 && m0 == 0) {  // dbias of this tile's columns: two threads a column, fixed order
    const int i = tid & (RQ_TILE - 1), half = tid >> 7, n = n0 + i;
    float a = 0.0f;
    if (n < N)
      for (int p = half; p < parts; p += 2) a += colsum[(i64)p * N + n];
    if (half) dsum[i] = a;
    __syncthreads();
    if (!half && n < N) dbias[n] = from_f32<DT>(a + dsum[i]);
  }
  __syncthreads();
  // A warp covers 32 rows x 4 vectors per step: lane = 4 * row group + vector.
  constexpr int TV = RQ_TILE / VEC;             // vectors per tile row
  constexpr int STEPS = (RQ_TILE / 32) * (TV / 4);
  const int rg = lane >> 2, vl = lane & 3;
  for (int s0 = warp; s0 < STEPS; s0 += 16) {  // two steps' loads in flight (8 x 16 bytes)
  uint4 raws[2][4];
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int step = s0 + 8 * u;
    const int rb = (step % (RQ_TILE / 32)) * 32 + rg * 4;
    const int n = n0 + ((step / (RQ_TILE / 32)) * 4 + vl) * VEC;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + rb + i;
      raws[u][i] = (m < M) ? load_raw16<DT>(x + (i64)m * N, n, N, vec_in) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
#pragma unroll
  for (int u = 0; u < 2; ++u) {
    const int step = s0 + 8 * u;
    const int rb = (step % (RQ_TILE / 32)) * 32 + rg * 4;  // the thread's first row in the tile
    const int kv = ((step / (RQ_TILE / 32)) * 4 + vl) * VEC;
    const int n = n0 + kv;
    float v[4][VEC];
#pragma unroll
    for (int i = 0; i < 4; ++i) raw16_to_f32<DT>(raws[u][i], v[i]);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + rb + i;
      if (m < M && n < N) {
        u32 w[VEC / 4];
        fp8_codes<RE5, false, kNarrow<DT>>(v[i], rs[rb + i], rr[rb + i], w);
        store_codes<VEC>(q + (i64)m * N, n, N, vec_row, w);
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {  // column kv + j: the codes of rows rb .. rb + 3, one word
      const float x4[4] = {v[0][j], v[1][j], v[2][j], v[3][j]};
      const float s4[4] = {cs_[kv + j], cs_[kv + j], cs_[kv + j], cs_[kv + j]};
      const float r4[4] = {cr[kv + j], cr[kv + j], cr[kv + j], cr[kv + j]};
      tileT[(kv + j) * RQ_WR + rb / 4] = fp8x4<CE5, false, kNarrow<DT>>(x4, s4, r4);
    }
  }
  }
  __syncthreads();
  // qT rows n0 .. n0 + 127, columns m0 .. m0 + 127: 8 threads a row, 16 bytes each
  for (int e = tid; e < RQ_TILE * 8; e += 256) {
    const int i = e >> 3, ch = e & 7;
    const int n = n0 + i, m = m0 + ch * 16;
    if (n < N && m < M) {
      const u32* src = tileT + i * RQ_WR + ch * 4;
      u8* dst = qT + (i64)n * M + m;
      if (vec_t && m + 16 <= M) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(src[0], src[1], src[2], src[3]);
      } else {
        for (int b = 0; b < 16 && m + b < M; ++b) dst[b] = (u8)(src[b >> 2] >> (8 * (b & 3)));
      }
    }
  }
}
