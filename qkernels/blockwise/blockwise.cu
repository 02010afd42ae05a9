// Blockwise 8-bit quantization. Reference: reference/blockwise.py. Launcher: _cupy.py.
//
// quantize_blockwise<DT, BLOCK>
//   in:  x (n,) of storage type DT, contiguous; table float2 (table_len,) = search_table(code)
//   out: codes uint8 (n,); absmax float32 (nblocks,), nblocks = ceil(n / BLOCK)
//   A group of G threads owns one quantization block; each thread loads NV 16-byte vectors
//   (VEC = 8 half or 4 float values each; see QuantizeShape), the group reduces the NaN-propagating
//   absmax (warp shuffles, then shared memory when G > 32), and each thread writes its VEC
//   codes. The grid is persistent: each CTA copies the search table (24-76 KB) into shared
//   memory once and walks tiles of 1024 / G blocks. Traffic: ES bytes read + 1 written per
//   element, plus 4 bytes per block.
// dequantize_blockwise<DT, BLOCK>
//   in:  codes uint8 (n,), code float32 (256,), absmax float32 (nblocks,)
//   out: y (n,) of DT = code[c] * absmax[block], rounded once to DT
//   Each thread turns V codes into one 16-byte store, U of them per iteration. Traffic: 1 + ES bytes.
#include "common.cuh"
#define QK_INF __int_as_float(0x7f800000)

// Vectors (16 bytes) per thread: several loads in flight per thread keep HBM busy while
// the group reduces; large blocks also get fewer threads, so fewer cross-warp steps.
// Groups larger than a warp synchronize on a named barrier each, so a CTA holds at most 8.
template <int DT, int BLOCK> struct QuantizeShape {
  enum { VEC = 16 / Storage<DT>::bytes,
         NV = (BLOCK / VEC >= 256) ? 4 : (BLOCK / VEC >= 8 ? 2 : 1),
         G = BLOCK / (VEC * NV),  // threads per quantization block
         CTA = G <= 32 ? 1024 : (G * 8 < 1024 ? G * 8 : 1024) };
};

template <int DT, int BLOCK>
__global__ void __launch_bounds__(1024)
quantize_blockwise(const typename Storage<DT>::type* __restrict__ x,
                   const float2* __restrict__ table_g, int table_len, int key_offset, int rows128,
                   u8* __restrict__ codes, float* __restrict__ absmax, i64 n, int vec_ok) {
  constexpr int VEC = QuantizeShape<DT, BLOCK>::VEC;
  constexpr int NV = QuantizeShape<DT, BLOCK>::NV;
  constexpr int G = QuantizeShape<DT, BLOCK>::G;
  extern __shared__ float2 table[];
  __shared__ float warp_max[32];
  for (int i = threadIdx.x; i < table_len; i += blockDim.x) table[i] = table_g[i];
  __syncthreads();

  const int groups = blockDim.x / G;
  const int g = threadIdx.x / G, lane_g = threadIdx.x % G;
  const i64 nblocks = (n + BLOCK - 1) / BLOCK;
  // vector k of this thread starts at element qb*BLOCK + (k*G + lane_g)*VEC: the group's
  // loads of one k are contiguous (coalesced). The next tile's vectors are loaded before
  // this tile is reduced and coded, so HBM reads stay in flight through the reduction.
  uint4 next[NV];
  load_block_raw16<DT, BLOCK, G, NV>(x, (i64)blockIdx.x * groups + g, lane_g, n, vec_ok, next);
  for (i64 tile = blockIdx.x; tile * groups < nblocks; tile += gridDim.x) {
    const i64 qb = tile * groups + g;
    uint4 raw[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) raw[k] = next[k];
    load_block_raw16<DT, BLOCK, G, NV>(x, (tile + gridDim.x) * groups + g, lane_g, n, vec_ok, next);
    float v[NV][VEC];
#pragma unroll
    for (int k = 0; k < NV; ++k) raw16_to_f32<DT>(raw[k], v[k]);
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k)
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = nan_max(fabsf(v[k][j]), m);
#pragma unroll
    for (int off = (G < 32 ? G : 32) / 2; off >= 1; off /= 2)
      m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
    if (G > 32) {  // across the group's warps; a named barrier per group (ids 1..15)
      if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
      asm volatile("bar.sync %0, %1;" ::"r"(g + 1), "r"(G) : "memory");
      const int first = g * (G / 32);
      m = warp_max[first];
      for (int w = 1; w < G / 32; ++w) m = nan_max(warp_max[first + w], m);
      asm volatile("bar.sync %0, %1;" ::"r"(g + 1), "r"(G) : "memory");
    }
    const float r = 1.0f / m;  // IEEE division: inf for an all-zero block
    // 0/0, Inf*0 and NaN blocks: y may be NaN, which searches as 0.0 (reference rule)
    const bool odd = !(fabsf(r) < QK_INF && fabsf(m) < QK_INF);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const i64 start = qb * BLOCK + (i64)(k * G + lane_g) * VEC;
      u8 c[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float y = v[k][j] * r;
        if (odd && y != y) y = 0.0f;
        c[j] = table_code(table, y, key_offset, rows128);
      }
      if (start + VEC <= n && vec_ok) {
        if (VEC == 8) {
          *reinterpret_cast<uint2*>(codes + start) = make_uint2(
              c[0] | (c[1] << 8) | (c[2] << 16) | ((u32)c[3] << 24),
              c[4 % VEC] | (c[5 % VEC] << 8) | (c[6 % VEC] << 16) | ((u32)c[7 % VEC] << 24));
        } else {
          *reinterpret_cast<u32*>(codes + start) = c[0] | (c[1] << 8) | (c[2] << 16) | ((u32)c[3] << 24);
        }
      } else {
        for (int j = 0; j < VEC; ++j)
          if (start + j < n) codes[start + j] = c[j];
      }
    }
    if (lane_g == 0 && qb < nblocks) absmax[qb] = m;
  }
}

template <int DT, int BLOCK>
__global__ void __launch_bounds__(256)
dequantize_blockwise(const u8* __restrict__ codes, const float* __restrict__ code_g,
                     const float* __restrict__ absmax, typename Storage<DT>::type* __restrict__ y,
                     i64 n, int vec_ok) {
  // Each thread turns V codes into one 16-byte store (V = 8 half or 4 float values), U
  // vectors per loop iteration, so that lanes store consecutive 16-byte chunks (coalesced)
  // and U loads are in flight per thread.
  constexpr int V = 16 / Storage<DT>::bytes;
  constexpr int U = 4;
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = code_g[i];
  __syncthreads();
  const i64 nvec = (n + V - 1) / V;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 t0 = (i64)blockIdx.x * blockDim.x + threadIdx.x; t0 < nvec; t0 += stride * U) {
    u32 w[U][V / 4];
    float s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const i64 i = (t0 + u * stride) * V;
      if (vec_ok && i + V <= n) {
        if (V == 8) {
          uint2 p = __ldg(reinterpret_cast<const uint2*>(codes + i));
          w[u][0] = p.x;
          w[u][(V / 4) - 1] = p.y;
        } else {
          w[u][0] = __ldg(reinterpret_cast<const u32*>(codes + i));
        }
      }
      s[u] = (i < n) ? __ldg(absmax + i / BLOCK) : 0.0f;  // V divides BLOCK
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const i64 i = (t0 + u * stride) * V;
      if (vec_ok && i + V <= n) {
        float out[V];
#pragma unroll
        for (int j = 0; j < V; ++j) out[j] = code[(w[u][j / 4] >> (8 * (j % 4))) & 0xFF] * s[u];
        store_vec<DT, V>(y + i, out);
      } else {
        for (int j = 0; j < V && i + j < n; ++j) y[i + j] = from_f32<DT>(code[codes[i + j]] * s[u]);
      }
    }
  }
}
