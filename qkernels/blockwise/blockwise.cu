// Blockwise 8-bit quantization. Reference: reference/blockwise.py. Launcher: _cupy.py.
//
// quantize_blockwise<DT, BLOCK>
//   in:  x (n,) of storage type DT, contiguous; table float2 (table_len,) = search_table(code)
//   out: codes uint8 (n,); absmax float32 (nblocks,), nblocks = ceil(n / BLOCK)
//   A group of G = BLOCK / VEC threads owns one quantization block; each thread loads one
//   16-byte vector (VEC = 8 half or 4 float values), the group reduces the NaN-propagating
//   absmax (warp shuffles, then shared memory when G > 32), and each thread writes its VEC
//   codes. The grid is persistent: each CTA copies the search table (24-76 KB) into shared
//   memory once and walks tiles of 1024 / G blocks. Traffic: ES bytes read + 1 written per
//   element, plus 4 bytes per block.
// dequantize_blockwise<DT, BLOCK>
//   in:  codes uint8 (n,), code float32 (256,), absmax float32 (nblocks,)
//   out: y (n,) of DT = code[c] * absmax[block], rounded once to DT
//   Each thread turns 16 codes (one 16-byte load) into 16 values. Traffic: 1 + ES bytes.
#include "common.cuh"

template <int DT, int BLOCK>
__global__ void __launch_bounds__(1024)
quantize_blockwise(const typename Storage<DT>::type* __restrict__ x,
                   const float2* __restrict__ table_g, int table_len, int key_offset, int rows128,
                   u8* __restrict__ codes, float* __restrict__ absmax, i64 n, int vec_ok) {
  constexpr int ES = Storage<DT>::bytes;
  constexpr int VEC = 16 / ES;
  constexpr int G = BLOCK / VEC;
  extern __shared__ float2 table[];
  __shared__ float warp_max[32];
  for (int i = threadIdx.x; i < table_len; i += blockDim.x) table[i] = table_g[i];
  __syncthreads();

  const int groups = blockDim.x / G;
  const int g = threadIdx.x / G, lane_g = threadIdx.x % G;
  const i64 nblocks = (n + BLOCK - 1) / BLOCK;
  for (i64 tile = blockIdx.x; tile * groups < nblocks; tile += gridDim.x) {
    const i64 qb = tile * groups + g;
    const i64 start = qb * BLOCK + (i64)lane_g * VEC;
    float v[VEC];
    load_f32<DT, VEC>(x, start, n, vec_ok, v);
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) m = nan_max(fabsf(v[j]), m);
#pragma unroll
    for (int off = (G < 32 ? G : 32) / 2; off >= 1; off /= 2)
      m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
    if (G > 32) {
      if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
      __syncthreads();
      const int first = g * (G / 32);
      m = warp_max[first];
      for (int w = 1; w < G / 32; ++w) m = nan_max(warp_max[first + w], m);
      __syncthreads();
    }
    const float r = 1.0f / m;  // IEEE division: inf for an all-zero block
    u8 c[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float y = v[j] * r;
      if (y != y) y = 0.0f;  // 0/0, Inf*0 and NaN blocks search as 0.0 (reference rule)
      c[j] = table_code(table, y, key_offset, rows128);
    }
    if (start + VEC <= n && vec_ok) {
      if (VEC == 8) {
        *reinterpret_cast<uint2*>(codes + start) = *reinterpret_cast<uint2*>(c);
      } else {
        *reinterpret_cast<u32*>(codes + start) = *reinterpret_cast<u32*>(c);
      }
    } else {
      for (int j = 0; j < VEC; ++j)
        if (start + j < n) codes[start + j] = c[j];
    }
    if (lane_g == 0 && qb < nblocks) absmax[qb] = m;
  }
}

template <int DT, int BLOCK>
__global__ void __launch_bounds__(256)
dequantize_blockwise(const u8* __restrict__ codes, const float* __restrict__ code_g,
                     const float* __restrict__ absmax, typename Storage<DT>::type* __restrict__ y,
                     i64 n, int vec_ok) {
  typedef typename Storage<DT>::type T;
  constexpr int V = 16;  // codes per thread: one 16-byte load
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code_g[i];
  __syncthreads();
  const i64 nvec = (n + V - 1) / V;
  for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < nvec; t += (i64)gridDim.x * blockDim.x) {
    const i64 i = t * V;
    const float scale = __ldg(absmax + i / BLOCK);  // V divides BLOCK: one block per vector
    if (vec_ok && i + V <= n) {
      uint4 w = __ldg(reinterpret_cast<const uint4*>(codes + i));
      const u8* c = reinterpret_cast<const u8*>(&w);
      float out[V];
#pragma unroll
      for (int j = 0; j < V; ++j) out[j] = code[c[j]] * scale;
      store_vec<DT, V>(y + i, out);
    } else {
      for (int j = 0; j < V && i + j < n; ++j) y[i + j] = from_f32<DT>(code[codes[i + j]] * scale);
    }
  }
}
