// Native float8 quantizers: the operands of the native FP8 layers' torch._scaled_mm GEMMs.
// Reference: reference/fp8.py (quantize_fp8_rowwise_f32, quantize_fp8_global_f32). Launcher: _cupy.py.
//
// DT is the input's storage type (common.cuh: 0 = float32, 1 = float16, 2 = bfloat16); E5M2
// picks float8_e5m2 (max 57344) over float8_e4m3fn (max 448). Codes are the float8 bytes.
// The rule, per row or over the whole tensor, in float32 (the reference's, bit for bit):
//   amax = max |x| (NaN propagates)   scale = amax > 0 ? amax * f32(1/fmax) : 1
//   (NaN amax: scale NaN row-wise, 1 for the global scale)   code = fp8(clamp(x / scale))
// The division is IEEE (__fdiv_rn) and the float8 rounding is cvt.rn.satfinite (nearest even,
// sm_89+) on |y| clamped to fmax, with the sign put back and a NaN quotient giving 0x7F.
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

// The codes of a and b (a in the low byte) for the scale s: y = f32(x / s), IEEE division.
template <bool E5M2>
__device__ __forceinline__ u32 fp8x2(float a, float b, float s) {
  return fp8_pair<E5M2>(__fdiv_rn(a, s), __fdiv_rn(b, s));
}

// Codes of V floats (V a multiple of 4), packed little-endian into V / 4 words.
template <bool E5M2, int V>
__device__ __forceinline__ void fp8_codes(const float (&v)[V], float s, u32 (&w)[V / 4]) {
#pragma unroll
  for (int k = 0; k < V / 4; ++k)
    w[k] = fp8x2<E5M2>(v[4 * k], v[4 * k + 1], s) | (fp8x2<E5M2>(v[4 * k + 2], v[4 * k + 3], s) << 16);
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
    const float s = fp8_scale<E5M2, true>(m);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const i64 c = ((i64)k * nt + tid) * VEC;
      if (c < cols) {
        float v[VEC];
        u32 w[VEC / 4];
        raw16_to_f32<DT>(raw[k], v);
        fp8_codes<E5M2>(v, s, w);
        store_codes<VEC>(qr, c, cols, vec_ok, w);
      }
    }
    for (i64 c = cached + (i64)tid * VEC; c < cols; c += (i64)nt * VEC) {
      float v[VEC];
      u32 w[VEC / 4];
      raw16_to_f32<DT>(load_raw16<DT>(xr, c, cols, vec_ok), v);
      fp8_codes<E5M2>(v, s, w);
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
  const float s = fp8_scale<E5M2, false>(__uint_as_float(absmax_bits[0]));
  const i64 stride = (i64)gridDim.x * blockDim.x;
  const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (first == 0) scale[0] = s;
  const i64 nvec = vec_ok ? n / VEC : 0;
  for (i64 t = nvec - 1 - first; t >= 0; t -= stride) {
    float v[VEC];
    u32 w[VEC / 4];
    raw16_to_f32<DT>(load_raw16<DT>(x, t * VEC, n, true), v);
    fp8_codes<E5M2>(v, s, w);
    store_codes<VEC>(q, t * VEC, n, true, w);
  }
  for (i64 i = n - 1 - first; i >= nvec * VEC; i -= stride) {
    const float v = to_f32<DT>(x[i]);
    q[i] = (u8)fp8_pair<E5M2>(__fdiv_rn(v, s), 0.0f);
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
  __shared__ float s_tile[FP8_TILE];
  const int tid = threadIdx.x;
  // reverse tile order: the absmax pass read the end of x last
  const int tiles_k = (K + FP8_TILE - 1) / FP8_TILE;
  const int lin = tiles_k * gridDim.y - 1 - (blockIdx.y * tiles_k + blockIdx.x);
  const int k0 = (lin % tiles_k) * FP8_TILE, n0 = (lin / tiles_k) * FP8_TILE;
  if (tid < FP8_TILE) {
    const float m = __uint_as_float(absmax_bits[PER_COL ? min(k0 + tid, K - 1) : 0]);
    const float s = fp8_scale<E5M2, PER_COL>(m);
    s_tile[tid] = s;
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
      if (PER_COL) {  // a scale per element: one per column k of the tile
        float y[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) y[i] = __fdiv_rn(v[j + i], s_tile[kv + j + i]);
        w[j4] = fp8_pair<E5M2>(y[0], y[1]) | (fp8_pair<E5M2>(y[2], y[3]) << 16);
      } else {
        w[j4] = fp8x2<E5M2>(v[j], v[j + 1], s_tile[0]) | (fp8x2<E5M2>(v[j + 2], v[j + 3], s_tile[0]) << 16);
      }
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
