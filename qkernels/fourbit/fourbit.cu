// 4-bit NF4/FP4 quantization and the fused 4-bit matmul. Reference: reference/fourbit.py. Launcher: _cupy.py.
//
// QT (quant type): 0 = NF4, 1 = FP4. DT (storage dtype): see common.cuh. Packing: element 2k
// in the high nibble, 2k + 1 in the low nibble of byte k; an odd count pads the last low
// nibble with the code of 0.0 (what a zero loaded past n encodes to).
//
// quantize_4bit<DT, BLOCK, QT>
//   in:  x (n,) of DT, contiguous
//   out: packed uint8 (ceil(n/2),); absmax float32 (ceil(n/BLOCK),)
//   A group of G = BLOCK / VEC threads owns one quantization block; each thread loads one
//   16-byte vector (VEC = 8 half or 4 float values), the group reduces the NaN-propagating
//   absmax (shuffles, then shared memory when G > 32), and each thread writes VEC/2 packed
//   bytes. Persistent grid walking tiles of blockDim / G blocks. Traffic per element: ES
//   bytes read + 1/2 written, plus 4 bytes per block.
// dequantize_4bit<DT, BLOCK, NESTED>
//   in:  packed uint8 (ceil(n/2),), code float32 (16,), absmax float32 (nblocks,) or, when
//        NESTED, absmax uint8 codes (nblocks,) + code2 float32 (256,) + absmax2 float32
//        (ceil(nblocks/256),) + offset float32 (1,) (scale = f32(code2[q] * absmax2) + offset)
//   out: y (n,) of DT = code[nibble] * scale, rounded once to DT
//   Each thread turns 16 packed bytes (one 16-byte load) into 32 values of one block (BLOCK
//   >= 32). Traffic per element: 1/2 byte read + ES written.
// matmul_4bit<DT, MT>
//   in:  x (M, K) of DT row-major, M <= MT <= 16; packed weight W (N, K) flattened row-major
//        (K % 32 == 0, 16-byte aligned); absmax float32 (N*K / 2^log2_block,); code float32
//        (16,); bias (N,) of DT or null
//   out: y (M, N) of DT = x @ W^T + bias, float32 accumulation, rounded once
//   One warp per output row n: each lane takes 16 packed bytes (32 weights of one block) at
//   a time, multiplies them with the 32 matching x values of every row m, sums unscaled
//   code * x products and scales once per 32; a shuffle reduction ends the row. Every packed
//   byte is read exactly once; x (M * K * ES bytes) is re-read through L1/L2.
#include "common.cuh"

// NF4 decision thresholds: float32 midpoints of consecutive NF4 values (reference:
// midpoints(nf4_map())); index 15 is padding.
__device__ __forceinline__ float nf4_threshold(int i) {
  switch (i) {
    case 0: return -0.848096371f;  case 1: return -0.610632896f;  case 2: return -0.45999527f;
    case 3: return -0.33967942f;   case 4: return -0.234607399f;  case 5: return -0.137911737f;
    case 6: return -0.0455250181f; case 7: return 0.0397901498f;  case 8: return 0.120255247f;
    case 9: return 0.203521252f;   case 10: return 0.292013764f;  case 11: return 0.389312536f;
    case 12: return 0.501663446f;  case 13: return 0.64278692f;   default: return 0.861478448f;
  }
}

// #{i : t_i < y} by binary search over the thresholds kept in shared memory (16 floats in
// 16 banks: conflict-free for any access pattern).
__device__ __forceinline__ u32 nf4_code(const float* thr, float y) {
  u32 c = (y > thr[7]) ? 8u : 0u;
  c += (y > thr[c + 3]) ? 4u : 0u;
  c += (y > thr[c + 1]) ? 2u : 0u;
  c += (y > thr[c]) ? 1u : 0u;
  return c;
}

// bitsandbytes' FP4 rule with its float32 literals (SPEC.md section 4).
__device__ __forceinline__ u32 fp4_code(float y) {
  const float a = fabsf(y);
  const u32 sign = (y < 0.0f) ? 8u : 0u;
  u32 mag;
  if (a > 0.29166667f)
    mag = (a > 0.583333f) ? ((a > 0.8333333f) ? 3u : 2u) : ((a > 0.4166667f) ? 5u : 4u);
  else
    mag = (a > 0.0859375f) ? ((a > 0.20833333f) ? 7u : 6u) : ((a > 0.00260417f) ? 1u : 0u);
  return sign | mag;
}

template <int QT>
__device__ __forceinline__ u32 code_4bit(const float* thr, float y) {
  if (y != y) y = 0.0f;  // 0/0, Inf*0 and NaN blocks code as 0.0 (reference rule)
  return QT == 0 ? nf4_code(thr, y) : fp4_code(y);
}

template <int DT, int BLOCK, int QT>
__global__ void __launch_bounds__(1024)
quantize_4bit(const typename Storage<DT>::type* __restrict__ x, u8* __restrict__ packed,
              float* __restrict__ absmax, i64 n, int vec_ok) {
  constexpr int ES = Storage<DT>::bytes;
  constexpr int VEC = 16 / ES;
  constexpr int G = BLOCK / VEC;
  static_assert(G >= 1 && G <= 1024, "BLOCK / VEC threads per quantization block");
  __shared__ float thr[16];
  __shared__ float warp_max[32];
  if (threadIdx.x < 16) thr[threadIdx.x] = nf4_threshold(threadIdx.x);
  __syncthreads();

  const int groups = blockDim.x / G;
  const int g = threadIdx.x / G, lane_g = threadIdx.x % G;
  const i64 nblocks = (n + BLOCK - 1) / BLOCK;
  const i64 nbytes = (n + 1) / 2;
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
    u8 b[VEC / 2];
#pragma unroll
    for (int j = 0; j < VEC / 2; ++j)
      b[j] = (u8)((code_4bit<QT>(thr, v[2 * j] * r) << 4) | code_4bit<QT>(thr, v[2 * j + 1] * r));
    const i64 byte0 = start / 2;
    if (vec_ok && start + VEC <= n) {
      if (VEC == 8) {
        *reinterpret_cast<u32*>(packed + byte0) = *reinterpret_cast<u32*>(b);
      } else {
        *reinterpret_cast<u16*>(packed + byte0) = *reinterpret_cast<u16*>(b);
      }
    } else {
      for (int j = 0; j < VEC / 2; ++j)
        if (byte0 + j < nbytes) packed[byte0 + j] = b[j];
    }
    if (lane_g == 0 && qb < nblocks) absmax[qb] = m;
  }
}

template <int DT, int BLOCK, int NESTED>
__global__ void __launch_bounds__(256)
dequantize_4bit(const u8* __restrict__ packed, const float* __restrict__ code_g,
                const void* __restrict__ absmax_v, const float* __restrict__ code2_g,
                const float* __restrict__ absmax2, const float* __restrict__ offset_p,
                typename Storage<DT>::type* __restrict__ y, i64 n, int vec_ok) {
  static_assert(BLOCK >= 32, "a thread's 32 values lie in one block");
  constexpr int V = 32;  // values per thread: one 16-byte load of packed bytes
  __shared__ float code[16];
  __shared__ float code2[NESTED ? 256 : 1];
  if (threadIdx.x < 16) code[threadIdx.x] = code_g[threadIdx.x];
  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = code2_g[i];
  __syncthreads();
  const float offset = NESTED ? __ldg(offset_p) : 0.0f;
  const i64 nvec = (n + V - 1) / V;
  for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < nvec; t += (i64)gridDim.x * blockDim.x) {
    const i64 i = t * V;
    const i64 qb = i / BLOCK;
    float scale;
    if (NESTED) {  // explicit roundings: no fused multiply-add (the reference rounds twice)
      const u8 q = __ldg(reinterpret_cast<const u8*>(absmax_v) + qb);
      scale = __fadd_rn(__fmul_rn(code2[q], __ldg(absmax2 + qb / 256)), offset);
    } else {
      scale = __ldg(reinterpret_cast<const float*>(absmax_v) + qb);
    }
    if (vec_ok && i + V <= n) {
      uint4 w = __ldg(reinterpret_cast<const uint4*>(packed + i / 2));
      const u8* c = reinterpret_cast<const u8*>(&w);
      float out[V];
#pragma unroll
      for (int j = 0; j < V / 2; ++j) {
        out[2 * j] = code[c[j] >> 4] * scale;
        out[2 * j + 1] = code[c[j] & 15] * scale;
      }
      store_vec<DT, V>(y + i, out);
    } else {
      for (int j = 0; j < V && i + j < n; ++j) {
        const u8 c = packed[(i + j) / 2];
        y[i + j] = from_f32<DT>(code[((i + j) & 1) ? (c & 15) : (c >> 4)] * scale);
      }
    }
  }
}

// 32 consecutive x values (one lane's k range) as float32; p is 16-byte aligned.
template <int DT>
__device__ __forceinline__ void load32_f32(const typename Storage<DT>::type* __restrict__ p, float (&v)[32]) {
  load_f32<DT, 32>(p, 0, 32, true, v);
}

template <int DT, int MT>
__global__ void __launch_bounds__(256)
matmul_4bit(const typename Storage<DT>::type* __restrict__ x, const u8* __restrict__ packed,
            const float* __restrict__ absmax, const float* __restrict__ code_g,
            const typename Storage<DT>::type* __restrict__ bias, typename Storage<DT>::type* __restrict__ out,
            int M, int N, int K, int log2_block) {
  typedef typename Storage<DT>::type T;
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = code_g[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= N) return;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
  const i64 row_elem = (i64)row * K;
  const uint4* wrow = reinterpret_cast<const uint4*>(packed + row_elem / 2);
  // software pipelining: the next 16 packed bytes and their scale load while this one computes
  int k = lane * 32;
  uint4 w_next = make_uint4(0, 0, 0, 0);
  float s_next = 0.0f;
  if (k < K) {
    w_next = __ldg(wrow + k / 32);
    s_next = __ldg(absmax + ((row_elem + k) >> log2_block));
  }
  for (; k < K; k += 32 * 32) {
    const uint4 w = w_next;
    const float s = s_next;
    const int kn = k + 32 * 32;
    if (kn < K) {
      w_next = __ldg(wrow + kn / 32);
      s_next = __ldg(absmax + ((row_elem + kn) >> log2_block));
    }
    const u8* c = reinterpret_cast<const u8*>(&w);
    float wv[32];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      wv[2 * j] = code[c[j] >> 4];
      wv[2 * j + 1] = code[c[j] & 15];
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m < M) {
        float xv[32];
        load32_f32<DT>(x + (i64)m * K + k, xv);
        float part = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; ++j) part = fmaf(wv[j], xv[j], part);
        acc[m] = fmaf(part, s, acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  if (lane == 0) {
    const float b = bias ? to_f32<DT>(bias[row]) : 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) out[(i64)m * N + row] = from_f32<DT>(acc[m] + b);
  }
}
