// Fused Adam/AdamW updates. Reference: reference/optim.py. Launcher: _cupy.py.
//
// optimizer_update_8bit_blockwise<DT>   (one launch per parameter tensor per step)
//   in/out: p (n,) of DT; state1, state2 uint8 (n,) codes of m (signed map qmap1) and v
//           (unsigned map qmap2); absmax1, absmax2 float32 (nblocks,), nblocks = ceil(n/256)
//   in:     g (n,) of DT; qmap1/qmap2 float32 (256,); table1 = search_table(qmap1) (both
//           signs), table2 = the non-negative half of search_table(qmap2) (v >= 0 always);
//           the float32 scalars of reference.optim.adam_scalars; gnorm_scale_ptr (device
//           float32 or null: then gnorm_scale); nonfinite (device int32 counter or null)
//   One warp owns one 256-element quantization block: each lane loads 8 consecutive
//   elements (16/32-byte vectors of p and g, 8-byte vectors of each state), dequantizes,
//   computes m, v and p in float32 with every operation rounded once (__fmul_rn etc.: no
//   FMA contraction, so the result is the NumPy oracle's bit for bit), writes p, reduces
//   the new per-block absmax of m and v with warp shuffles and writes the requantized
//   codes (search table in shared memory, then the sign fix for m). Persistent grid; each
//   CTA stages the 2 codebooks and the 2 search tables (~75 KB) in shared memory once.
//   Traffic per element: 2*ES (p) + ES (g) + 2 + 2 (codes) bytes, +16 bytes per block.
// optimizer_update_32bit<DT>
//   in/out: p (n,) of DT; state1, state2 float32 (n,). in: g, scalars, update_scale_ptr
//   (device float32 or null: max_unorm's factor on the step size). 8 elements per thread,
//   grid-stride. Traffic: 3*ES + 16 bytes per element.
#include "common.cuh"

// Bit tests instead of isfinite/signbit: NVRTC compiles this without any C++ math header.
__device__ __forceinline__ bool is_finite_f32(float x) {
  return (__float_as_uint(x) & 0x7F800000u) != 0x7F800000u;
}
__device__ __forceinline__ u32 sign_bit_f32(float x) { return __float_as_uint(x) >> 31; }

struct AdamArgs {  // reference.optim.AdamScalars, float32
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps_c2, step_size, decay;
};

// m, v and the new p of one element; false when g is NaN or +-Inf (then m = v = 0 and p
// is left as it was). Operation order and rounding: reference/optim.py _moments/_new_param.
__device__ __forceinline__ bool adam_element(float g, float m0, float v0, float& p, float& m,
                                             float& v, const AdamArgs& a, float step_size) {
  m = __fadd_rn(__fmul_rn(m0, a.beta1), __fmul_rn(g, a.one_minus_beta1));
  v = __fadd_rn(__fmul_rn(v0, a.beta2), __fmul_rn(__fmul_rn(g, g), a.one_minus_beta2));
  if (!is_finite_f32(g)) {
    m = 0.0f;
    v = 0.0f;
    return false;
  }
  const float u = __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), a.eps_c2));
  p = __fmul_rn(__fadd_rn(__fmul_rn(u, step_size), p), a.decay);
  return true;
}

__device__ __forceinline__ float warp_nan_max(float x) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) x = nan_max(__shfl_xor_sync(0xffffffffu, x, off), x);
  return x;
}

__device__ __forceinline__ int warp_sum(int x) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// 8 codes at c[i..i+8): one 8-byte access when aligned and complete, else element-wise.
__device__ __forceinline__ void load_codes8(const u8* c, i64 i, i64 n, bool vec_ok, u8 (&out)[8]) {
  if (vec_ok && i + 8 <= n) {
    *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(c + i);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = (i + j < n) ? c[i + j] : (u8)0;
  }
}

__device__ __forceinline__ void store_codes8(u8* c, i64 i, i64 n, bool vec_ok, const u8 (&v)[8]) {
  if (vec_ok && i + 8 <= n) {
    *reinterpret_cast<uint2*>(c + i) = *reinterpret_cast<const uint2*>(v);
  } else {
    for (int j = 0; j < 8; ++j)
      if (i + j < n) c[i + j] = v[j];
  }
}

template <int DT>
__device__ __forceinline__ void store_f32x8(typename Storage<DT>::type* x, i64 i, i64 n, bool vec_ok,
                                            const float (&v)[8]) {
  if (vec_ok && i + 8 <= n) {
    store_vec<DT, 8>(x + i, v);
  } else {
    for (int j = 0; j < 8; ++j)
      if (i + j < n) x[i + j] = from_f32<DT>(v[j]);
  }
}

template <int DT>
__global__ void __launch_bounds__(512, 2)
optimizer_update_8bit_blockwise(typename Storage<DT>::type* __restrict__ p,
                                const typename Storage<DT>::type* __restrict__ g,
                                u8* __restrict__ state1, u8* __restrict__ state2,
                                float* __restrict__ absmax1, float* __restrict__ absmax2,
                                const float* __restrict__ qmap1_g, const float* __restrict__ qmap2_g,
                                const float2* __restrict__ table1_g, int key_offset1, int rows128_1,
                                const float2* __restrict__ table2_g, int key_offset2, int rows128_2,
                                float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                                float eps_c2, float step_size, float decay, float gnorm_scale,
                                const float* __restrict__ gnorm_scale_ptr, int* __restrict__ nonfinite,
                                i64 n, int vec_ok) {
  constexpr int BLOCK = 256, VEC = 8;
  const AdamArgs a = {beta1, one_minus_beta1, beta2, one_minus_beta2, eps_c2, step_size, decay};
  extern __shared__ float smem[];
  float* qmap1 = smem;
  float* qmap2 = smem + 256;
  float2* table1 = reinterpret_cast<float2*>(smem + 512);
  float2* table2 = table1 + 2 * rows128_1;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    qmap1[i] = qmap1_g[i];
    qmap2[i] = qmap2_g[i];
  }
  for (int i = threadIdx.x; i < 2 * rows128_1; i += blockDim.x) table1[i] = table1_g[i];
  for (int i = threadIdx.x; i < rows128_2; i += blockDim.x) table2[i] = table2_g[i];
  __syncthreads();

  const float gs = gnorm_scale_ptr ? *gnorm_scale_ptr : gnorm_scale;
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  const i64 nblocks = (n + BLOCK - 1) / BLOCK;
  for (i64 b = (i64)blockIdx.x * warps + (threadIdx.x >> 5); b < nblocks; b += (i64)gridDim.x * warps) {
    const i64 start = b * BLOCK + lane * VEC;
    float pv[VEC], gv[VEC], m[VEC], v[VEC];
    u8 c1[VEC], c2[VEC];
    load_f32<DT, VEC>(p, start, n, vec_ok, pv);
    load_f32<DT, VEC>(g, start, n, vec_ok, gv);
    load_codes8(state1, start, n, vec_ok, c1);
    load_codes8(state2, start, n, vec_ok, c2);
    const float a1 = absmax1[b], a2 = absmax2[b];
    float max1 = 0.0f, max2 = 0.0f;
    int bad = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float m0 = __fmul_rn(qmap1[c1[j]], a1);
      const float v0 = __fmul_rn(qmap2[c2[j]], a2);
      const bool ok = adam_element(__fmul_rn(gv[j], gs), m0, v0, pv[j], m[j], v[j], a, a.step_size);
      if (start + j >= n) {  // past the end: outside the block's absmax
        m[j] = 0.0f;
        v[j] = 0.0f;
      } else {
        bad += ok ? 0 : 1;
      }
      max1 = nan_max(fabsf(m[j]), max1);
      max2 = nan_max(fabsf(v[j]), max2);
    }
    store_f32x8<DT>(p, start, n, vec_ok, pv);
    max1 = warp_nan_max(max1);
    max2 = warp_nan_max(max2);
    bad = warp_sum(bad);
    const float r1 = __fdiv_rn(1.0f, max1), r2 = __fdiv_rn(1.0f, max2);  // inf for zero blocks
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float y1 = __fmul_rn(m[j], r1), y2 = __fmul_rn(v[j], r2);
      if (y1 != y1) y1 = 0.0f;  // 0/0, Inf*0, NaN: searched as 0.0 (reference.blockwise rule)
      if (y2 != y2) y2 = 0.0f;
      int q1 = table_code(table1, y1, key_offset1, rows128_1);
      if (sign_bit_f32(qmap1[q1]) != sign_bit_f32(m[j])) q1 += m[j] > 0.0f ? 1 : -1;
      c1[j] = (u8)q1;
      c2[j] = table_code_nonneg(table2, y2, key_offset2, rows128_2);
    }
    store_codes8(state1, start, n, vec_ok, c1);
    store_codes8(state2, start, n, vec_ok, c2);
    if (lane == 0) {
      absmax1[b] = max1;
      absmax2[b] = max2;
      if (bad && nonfinite) atomicAdd(nonfinite, bad);
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(256)
optimizer_update_32bit(typename Storage<DT>::type* __restrict__ p,
                       const typename Storage<DT>::type* __restrict__ g,
                       float* __restrict__ state1, float* __restrict__ state2,
                       float beta1, float one_minus_beta1, float beta2, float one_minus_beta2,
                       float eps_c2, float step_size, float decay, float gnorm_scale,
                       const float* __restrict__ gnorm_scale_ptr, const float* __restrict__ update_scale_ptr,
                       int* __restrict__ nonfinite, i64 n, int vec_ok) {
  constexpr int VEC = 8;
  const AdamArgs a = {beta1, one_minus_beta1, beta2, one_minus_beta2, eps_c2, step_size, decay};
  const float gs = gnorm_scale_ptr ? *gnorm_scale_ptr : gnorm_scale;
  const float scaled_step = update_scale_ptr ? __fmul_rn(*update_scale_ptr, step_size) : step_size;
  const i64 nvec = (n + VEC - 1) / VEC;
  for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < nvec; t += (i64)gridDim.x * blockDim.x) {
    const i64 start = t * VEC;
    float pv[VEC], gv[VEC], m[VEC], v[VEC];
    load_f32<DT, VEC>(p, start, n, vec_ok, pv);
    load_f32<DT, VEC>(g, start, n, vec_ok, gv);
    load_f32<QK_DT_F32, VEC>(state1, start, n, vec_ok, m);
    load_f32<QK_DT_F32, VEC>(state2, start, n, vec_ok, v);
    int bad = 0;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float m0 = m[j], v0 = v[j];
      if (!adam_element(__fmul_rn(gv[j], gs), m0, v0, pv[j], m[j], v[j], a, scaled_step) && start + j < n)
        ++bad;
    }
    store_f32x8<DT>(p, start, n, vec_ok, pv);
    store_f32x8<QK_DT_F32>(state1, start, n, vec_ok, m);
    store_f32x8<QK_DT_F32>(state2, start, n, vec_ok, v);
    if (bad && nonfinite) atomicAdd(nonfinite, bad);
  }
}
