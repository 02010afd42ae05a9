// Global quantize-dequantize with a 256-entry codebook: the simulated-FP8 layers' qdq_global
// (torch_ops/fp8.py; SPEC.md section 2 with the whole tensor as one block).
// Reference: reference/fp8.py qdq_global_f32. Launcher: _cupy.py (qdq_global_torch).
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
#include "common.cuh"

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
      int c = 0;  // #{mid < q}: the largest c with mid[c - 1] < q
#pragma unroll
      for (int step = 128; step >= 1; step >>= 1)
        if (c + step <= 255 && s_mid[c + step - 1] < q) c += step;
      const long long i = i0 + u * stride;
      if (i < n) y[i] = from_f32<DT>(__fmul_rn(s_code[c], a));
    }
  }
}
