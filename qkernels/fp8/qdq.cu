// Quantize-dequantize with a 256-entry codebook: the simulated-FP8 layers' qdq_global and
// qdq_blockwise (torch_ops/fp8.py; docs/FORMATS.md §2, with the whole tensor as one block or with
// blocks of 64 .. 4096 consecutive elements).
// Reference: reference/fp8.py qdq_global_f32, qdq_blockwise_f32. Launchers: _cupy.py
// (qdq_global_torch, qdq_blockwise_torch).
// No float8 instructions: any compute capability.
//
// qdq_global<DT>   in:  x (n,) DT (common.cuh: 0 = float32, 1 = float16, 2 = bfloat16);
//                       absmax_bits u32 (1,): the float bits of max |x| (NaN propagating; the
//                       int8 module's absmax_global); code f32 (256,) sorted; mid f32 (255,)
//                       its midpoints (reference/codebooks.py midpoints).
//                  out: y (n,) DT = rn_DT(code[c] * a), a = absmax, c = #{i : mid_i < q},
//                       q = x * rcp(a) (q = 0 where that is NaN), every op IEEE float32.
//   Grid-stride over elements, 4 per thread per step; the tables sit in shared memory and c
//   is found with 8 steps of a branch-free binary search.
// qdq_blockwise<DT, EPT>   in: x (n,) DT, blocksize B (a power of two, 64 .. 4096, B / EPT <= 256
//                       threads a block), code and mid as above.  out: y (n,) DT, qdq_global's
//                       rule in each block of B consecutive elements (the last one may be short),
//                       a = the block's NaN-propagating max |x|. One pass: a group of B / EPT
//                       threads holds a block in registers (EPT elements each, strided by the
//                       group size: coalesced), reduces its max with shuffles (and shared memory
//                       across warps for groups over 32), then writes y.
#include "common.cuh"

// c = #{i : mid_i < q} over the sorted shared table mid (255 entries): 8 branch-free steps.
__device__ __forceinline__ int code_index(const float* s_mid, float q) {
  int c = 0;
#pragma unroll
  for (int step = 128; step >= 1; step >>= 1)
    if (c + step <= 255 && s_mid[c + step - 1] < q) c += step;
  return c;
}

template <int DT>
__global__ void __launch_bounds__(256)
qdq_global(const typename Storage<DT>::type* __restrict__ x, long long n,
           const u32* __restrict__ absmax_bits, const float* __restrict__ code,
           const float* __restrict__ mid, typename Storage<DT>::type* __restrict__ y) {
  __shared__ float s_code[256];
  __shared__ float s_mid[256];
  s_code[threadIdx.x] = code[threadIdx.x];
  s_mid[threadIdx.x] = threadIdx.x < 255 ? mid[threadIdx.x] : 0.0f;
  __syncthreads();
  const float a = __uint_as_float(*absmax_bits);
  const float r = __frcp_rn(a);
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; i0 < n; i0 += 4 * stride) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const long long i = i0 + u * stride;
      v[u] = i < n ? to_f32<DT>(x[i]) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float q = __fmul_rn(v[u], r);
      if (q != q) q = 0.0f;
      const int c = code_index(s_mid, q);
      const long long i = i0 + u * stride;
      if (i < n) y[i] = from_f32<DT>(__fmul_rn(s_code[c], a));
    }
  }
}

// ------------------------------------------------------------------------------------------
template <int DT, int EPT>
__global__ void __launch_bounds__(256)
qdq_blockwise(const typename Storage<DT>::type* __restrict__ x, long long n, int blocksize,
              const float* __restrict__ code, const float* __restrict__ mid,
              typename Storage<DT>::type* __restrict__ y) {
  __shared__ float s_code[256];
  __shared__ float s_mid[256];
  __shared__ float red[8];  // the warps' maxima, for groups wider than a warp
  const int tid = threadIdx.x;
  s_code[tid] = code[tid];
  s_mid[tid] = tid < 255 ? mid[tid] : 0.0f;
  const int T = blocksize / EPT;           // threads a block: 16 .. 256, a power of two
  const int g = tid / T, t = tid % T;      // this thread's group (block) in the CTA, its lane
  const long long b0 = ((long long)blockIdx.x * (256 / T) + g) * blocksize;
  float v[EPT];
  float m = 0.0f;
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const long long i = b0 + t + (long long)e * T;
    v[e] = i < n ? to_f32<DT>(x[i]) : 0.0f;
    m = nan_max(fabsf(v[e]), m);
  }
  for (int off = min(T, 32) / 2; off >= 1; off /= 2) m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
  if (T > 32) {  // the group spans T / 32 whole warps
    if ((tid & 31) == 0) red[tid >> 5] = m;
    __syncthreads();
    m = red[(tid >> 5) & ~(T / 32 - 1)];
    for (int w = 1; w < T / 32; ++w) m = nan_max(red[((tid >> 5) & ~(T / 32 - 1)) + w], m);
  }
  __syncthreads();  // the tables
  const float a = m;
  const float r = __frcp_rn(a);
#pragma unroll
  for (int e = 0; e < EPT; ++e) {
    const long long i = b0 + t + (long long)e * T;
    float q = __fmul_rn(v[e], r);
    if (q != q) q = 0.0f;
    if (i < n) y[i] = from_f32<DT>(__fmul_rn(s_code[code_index(s_mid, q)], a));
  }
}
