// LLM.int8() linear forward for a few rows of x, fused: quantize x, int8 dot products with
// dp4a (or tensor cores), the dequantizing epilogue. Reference: reference/int8.py
// (int8_vectorwise_quant, int8_linear_matmul, int8_mm_dequant). Launcher: _cupy_gemv.py.
//
// DT: x's and the output's storage type (common.cuh); BDT: the bias's, -1 = no bias.
// The math is int8.cu's, operation for operation: codes q = clamp(rint(f32(x) * f32(127 /
// absmax)), -127, 127) with NaN products giving 0; the int32 dot products (exact, wrapping
// like the reference's, so any summation order gives the same bits); then
// ((f32(acc) * absmax[m]) * SCB[n]) * K (+ bias[n]), each multiply and add rounded on its
// own (__fmul_rn / __fadd_rn: nothing contracted), cast once to DT.
//
// int8_gemv_quant<DT>                       one CTA per row of x
//   in:  x (M, K) DT row-major
//   out: codes int8 (M, Kp) row-major, Kp = K rounded up to 16, zeros in [K, Kp);
//        absmax float32 (M,) (NaN-propagating row absmax, as the reference's row_stats)
//   Traffic: ES + 1 bytes per element of x.
// int8_gemv<DT, BDT, MT, STAGED, ALIGNED>
//   in:  x (M, K) DT row-major with M <= MT <= 16 (STAGED), or the codes and absmax that
//        int8_gemv_quant wrote (!STAGED); CB int8 (N, K) row-major (ALIGNED: K % 16 == 0 and
//        a 16-byte aligned base, else byte loads); SCB float32 (N,); bias (N,) BDT or null
//   out: y (M, N) DT
//   STAGED: each CTA first quantizes all of x into shared memory (M * Kp bytes; x is re-read
//   from L2 by every CTA, so the launcher stages only a small x); the first weight loads are
//   issued before that, so they overlap it. !STAGED: the codes come from global memory and
//   stay in L1 (weights are loaded with L1::no_allocate so they do not evict them).
//   Persistent grid of GV_THREADS-thread CTAs; a warp task is 2 consecutive weight rows
//   (each code load serves both). Lane l takes the 16-byte chunks l, l + 32, ... of both
//   rows, GV_U chunks per row per step, the next step's loads issued before this step's
//   math; for every row m of x it loads the matching 16 code bytes once and issues 4 dp4a
//   per weight row. Every weight byte is read once from memory. At a task's end a
//   reduce-scatter across the warp (2*MT - 1 shuffles instead of 5 per sum) leaves each
//   lane one (weight row, x row) sum; those lanes apply the epilogue and store.
//   Tasks go to warps warp-major (warp w of CTA b is number w * gridDim.x + b), so a last,
//   partial round of tasks is spread over all SMs.
// Outlier columns (threshold > 0, !STAGED, both kernels): ocols non-null, int64 (K,) whose
//   first *count entries are the outlier columns, which the codes have zeroed (row_quant +
//   outlier_cols in int8.cu wrote codes, absmax, ocols and count). The epilogue then adds
//   (s * SCB[n]) * f32(1/127) after the bias, s = sum_j x[m, ocols[j]] * W[n, ocols[j]] in
//   float32 (add_outliers): x is read at those columns only. ocols null: threshold 0, as before.
#include "common.cuh"

typedef signed char i8;

#define GV_KDEQ __int_as_float(0x38820610)  // f32(1/(127*127)), as int8.cu's QK_KDEQ
#define GV_INV127 __int_as_float(0x3c010204)  // f32(1/127)
#define GV_THREADS 512
#define GV_WARPS (GV_THREADS / 32)
#define GV_U 2
#define GV_FULL 0xffffffffu

__device__ __forceinline__ int gv_quant8(float x, float scale) {  // int8.cu's quant8
  float y = __fmul_rn(x, scale);
  if (y != y) return 0;
  int q = __float2int_rn(y);
  return max(-127, min(127, q));
}

__device__ __forceinline__ u32 gv_pack4(int a, int b, int c, int d) {
  return (u32)(a & 0xff) | ((u32)(b & 0xff) << 8) | ((u32)(c & 0xff) << 16) | ((u32)(d & 0xff) << 24);
}

__device__ __forceinline__ int dp4a(u32 a, u32 b, int c) {
  int d;
  asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// acc + the dot product of 16 int8 weights and 16 int8 codes
__device__ __forceinline__ int dot16(const uint4& w, const uint4& q, int acc) {
  acc = dp4a(w.x, q.x, acc);
  acc = dp4a(w.y, q.y, acc);
  acc = dp4a(w.z, q.z, acc);
  return dp4a(w.w, q.w, acc);
}

// 16 weight bytes k = 16c .. 16c + 15 of one row; zeros past K.
template <bool ALIGNED>
__device__ __forceinline__ uint4 ld_w16(const i8* __restrict__ row, int c, int K) {
  uint4 v;
  if (ALIGNED) {  // read once: keep it out of L1, where the codes live
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(reinterpret_cast<const uint4*>(row) + c));
  } else {
    u32 w[4] = {0u, 0u, 0u, 0u};
    const int k0 = c * 16;
#pragma unroll
    for (int j = 0; j < 16; ++j)
      if (k0 + j < K) w[j >> 2] |= (u32)(u8)row[k0 + j] << (8 * (j & 3));
    v = make_uint4(w[0], w[1], w[2], w[3]);
  }
  return v;
}

// The step's chunks c0 + 32 u (u < GV_U) of weight rows n0 and n0 + 1 (zeros where absent).
template <bool ALIGNED>
__device__ __forceinline__ void load_step(const i8* __restrict__ W, int N, int K, int nch, int n0, int c0,
                                          uint4 (&buf)[2][GV_U]) {
  const i8* r0 = W + (i64)n0 * K;
  const bool has1 = n0 + 1 < N;
#pragma unroll
  for (int u = 0; u < GV_U; ++u) {
    const int c = c0 + 32 * u;
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    buf[0][u] = c < nch ? ld_w16<ALIGNED>(r0, c, K) : z;
    buf[1][u] = (has1 && c < nch) ? ld_w16<ALIGNED>(r0 + K, c, K) : z;
  }
}

// Codes and absmax of the M rows of x (M, K), by the whole CTA. codes: (M, nch) 16-byte
// chunks (shared or global memory), chunk c holding the codes of k = 16c .. 16c + 15 (zeros
// past K, which load as 0.0 and quantize to 0 whatever the scale). s_absmax: shared (MT,);
// red: shared scratch of (blockDim / 32) * MT floats. Ends with a __syncthreads.
template <int DT, int MT>
__device__ __forceinline__ void quantize_x(const typename Storage<DT>::type* __restrict__ x, int M, int K,
                                           int nch, bool vec_ok, uint4* codes, float* s_absmax, float* red) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  float a[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    a[m] = 0.0f;
    if (m < M) {
      for (int c = tid; c < nch; c += blockDim.x) {
        float v[16];
        load_f32<DT, 16>(x + (i64)m * K, (i64)c * 16, K, vec_ok, v);
#pragma unroll
        for (int j = 0; j < 16; ++j) a[m] = nan_max(fabsf(v[j]), a[m]);
      }
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) a[m] = nan_max(__shfl_xor_sync(GV_FULL, a[m], off), a[m]);
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m) red[warp * MT + m] = a[m];
  }
  __syncthreads();
  if (tid < MT) {
    float r = red[tid];
    for (int w = 1; w < nwarps; ++w) r = nan_max(red[w * MT + tid], r);
    s_absmax[tid] = r;
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m < M) {
      const float s = __fdiv_rn(127.0f, s_absmax[m]);  // f32(127 / absmax), rounded once
      for (int c = tid; c < nch; c += blockDim.x) {
        float v[16];
        load_f32<DT, 16>(x + (i64)m * K, (i64)c * 16, K, vec_ok, v);
        u32 w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
          w[k] = gv_pack4(gv_quant8(v[4 * k], s), gv_quant8(v[4 * k + 1], s),
                          gv_quant8(v[4 * k + 2], s), gv_quant8(v[4 * k + 3], s));
        codes[(i64)m * nch + c] = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }
  __syncthreads();
}

template <int DT>
__global__ void __launch_bounds__(GV_THREADS)
int8_gemv_quant(const typename Storage<DT>::type* __restrict__ x, uint4* __restrict__ codes,
                float* __restrict__ absmax, int K, int nch, int vec_ok) {
  __shared__ float red[GV_WARPS];
  __shared__ float s_absmax[1];
  const int row = blockIdx.x;
  quantize_x<DT, 1>(x + (i64)row * K, 1, K, nch, vec_ok != 0, codes + (i64)row * nch, s_absmax, red);
  if (threadIdx.x == 0) absmax[row] = s_absmax[0];
}

// Reduce-scatter of v[0..CNT) over the warp: each split step halves the values a lane keeps
// (the lane with bit O set keeps the upper half, its partner the lower) and adds the
// partner's copy; steps left once one value remains add across the remaining lanes. Ends
// with v[0] = the warp's sum of value number idx. Integer adds: exact in any order.
template <int NV, int CNT, int O>
__device__ __forceinline__ void reduce_scatter(int (&v)[NV], int lane, int& idx) {
  if constexpr (O >= 1) {
    if constexpr (CNT > 1) {
      constexpr int H = CNT / 2;
      const bool upper = (lane & O) != 0;
#pragma unroll
      for (int j = 0; j < H; ++j) {
        const int send = upper ? v[j] : v[j + H];
        const int keep = upper ? v[j + H] : v[j];
        v[j] = (int)((u32)keep + (u32)__shfl_xor_sync(GV_FULL, send, O));
      }
      if (upper) idx += H;
      reduce_scatter<NV, H, O / 2>(v, lane, idx);
    } else {
      v[0] = (int)((u32)v[0] + (u32)__shfl_xor_sync(GV_FULL, v[0], O));
      reduce_scatter<NV, 1, O / 2>(v, lane, idx);
    }
  }
}

template <int BDT>
__device__ __forceinline__ float add_bias(float v, const void* __restrict__ bias, int n) {
  if constexpr (BDT < 0) {
    return v;
  } else {
    return __fadd_rn(v, to_f32<BDT>(reinterpret_cast<const typename Storage<BDT>::type*>(bias)[n]));
  }
}

// y + (s * scb) * f32(1/127), s = the float32 dot product of x row m and weight row n over the
// cnt outlier columns idx[0 .. cnt) (products of a 16-bit x and an int8 weight are exact).
template <int DT>
__device__ __forceinline__ float add_outliers(float y, const typename Storage<DT>::type* __restrict__ x,
                                              const i8* __restrict__ W, int K, int m, int n, float scb,
                                              const long long* __restrict__ idx, int cnt) {
  float s = 0.0f;
  for (int j = 0; j < cnt; ++j) {
    const long long c = __ldg(idx + j);
    s = __fmaf_rn(to_f32<DT>(x[(i64)m * K + c]), (float)W[(i64)n * K + c], s);
  }
  return __fadd_rn(y, __fmul_rn(__fmul_rn(s, scb), GV_INV127));
}

template <int DT, int BDT, int MT, bool STAGED, bool ALIGNED>
__global__ void __launch_bounds__(GV_THREADS, 1)
int8_gemv(const typename Storage<DT>::type* __restrict__ x, const uint4* __restrict__ codes_g,
          const float* __restrict__ absmax_g, const i8* __restrict__ W, const float* __restrict__ scb,
          const void* __restrict__ bias, typename Storage<DT>::type* __restrict__ out,
          int M, int N, int K, int nch, int x_vec_ok, const long long* __restrict__ ocols,
          const int* __restrict__ count) {
  static_assert(MT >= 1 && MT <= 16 && (MT & (MT - 1)) == 0, "MT: a power of two <= 16");
  extern __shared__ uint4 smem_codes[];  // STAGED: (M, nch) chunks
  __shared__ float red[GV_WARPS * MT];
  __shared__ float s_absmax[MT];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ntasks = (N + 1) >> 1;
  const int nw = gridDim.x * GV_WARPS;
  const int gw = warp * gridDim.x + blockIdx.x;
  const int spt = (nch + 32 * GV_U - 1) / (32 * GV_U);  // steps per task
  const int steps = gw < ntasks ? ((ntasks - 1 - gw) / nw + 1) * spt : 0;

  uint4 cur[2][GV_U], nxt[2][GV_U];
  int lt = 0, li = 0;  // task (this warp's j-th) and step of the next load
  if (steps > 0) {
    load_step<ALIGNED>(W, N, K, nch, 2 * gw, li * 32 * GV_U + lane, cur);
    if (++li == spt) { li = 0; ++lt; }
  }
  if (STAGED) {
    quantize_x<DT, MT>(x, M, K, nch, x_vec_ok != 0, smem_codes, s_absmax, red);
  } else {
    if (tid < M) s_absmax[tid] = absmax_g[tid];
    __syncthreads();
  }
  const uint4* codes = STAGED ? smem_codes : codes_g;
  const int cnt = (!STAGED && ocols != nullptr) ? *count : 0;

  int acc[2][MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[0][m] = acc[1][m] = 0;
  int ct = 0, ci = 0;  // task and step of `cur`
  for (int s = 0; s < steps; ++s) {
    if (s + 1 < steps) {
      load_step<ALIGNED>(W, N, K, nch, 2 * (gw + lt * nw), li * 32 * GV_U + lane, nxt);
      if (++li == spt) { li = 0; ++lt; }
    }
    const int c0 = ci * 32 * GV_U + lane;
#pragma unroll
    for (int u = 0; u < GV_U; ++u) {
      const int c = c0 + 32 * u;
      if (c < nch) {
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            const uint4* p = codes + (i64)m * nch + c;
            const uint4 q = STAGED ? *p : __ldg(p);
            acc[0][m] = dot16(cur[0][u], q, acc[0][m]);
            acc[1][m] = dot16(cur[1][u], q, acc[1][m]);
          }
        }
      }
    }
    if (++ci == spt) {  // the task's last step: reduce, dequantize, store
      int v[2 * MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        v[m] = acc[0][m];
        v[MT + m] = acc[1][m];
        acc[0][m] = acc[1][m] = 0;
      }
      int idx = 0;
      reduce_scatter<2 * MT, 2 * MT, 16>(v, lane, idx);
      const int m = idx % MT, n = 2 * (gw + ct * nw) + idx / MT;
      const bool writer = (lane & (16 / MT - 1)) == 0;  // one lane of each group holding a copy
      if (writer && m < M && n < N) {
        const float sn = __ldg(scb + n);
        float y = add_bias<BDT>(__fmul_rn(__fmul_rn(__fmul_rn((float)v[0], s_absmax[m]), sn), GV_KDEQ), bias, n);
        if (cnt > 0) y = add_outliers<DT>(y, x, W, K, m, n, sn, ocols, cnt);
        out[(i64)m * N + n] = from_f32<DT>(y);
      }
      ci = 0;
      ++ct;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int u = 0; u < GV_U; ++u) cur[r][u] = nxt[r][u];
  }
}

// int8_gemv_mma<DT, BDT, NT> (up to 16 rows of x, after int8_gemv_quant; ALIGNED weights)
//   in/out as int8_gemv<DT, BDT, 16, false, true> (x is read only at outlier columns).
//   Tensor cores: mma.sync m16n8k32 s8 with the 16 rows of x as A (rows >= M load as zero)
//   and 8 rows of W as B. A CTA of 8 warps owns 8 * NT rows of W; its warps split K in
//   steps of 64 bytes (warp w takes steps w, w + 8, ...). In a step lane (g = lane / 4,
//   t = lane % 4) loads the 16 bytes at 64 s + 16 t of W row n0 + 8 nt + g (each nt) and of
//   x rows g and g + 8: a dot product does not depend on the order of k, so these bytes are
//   the fragments of two k32 mma as loaded (A's and B's k orders permuted alike), with no
//   shuffle or shared-memory staging; x is read from L1/L2 twice per weight byte. Integer
//   sums are exact (wrapping) in any order: the 8 warps' accumulators are added in shared
//   memory, then int8_gemv's epilogue, operation for operation.
__device__ __forceinline__ void mma_s8_16x8x32(int (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

#define GM_WARPS 8

template <int DT, int BDT, int NT>
__global__ void __launch_bounds__(GM_WARPS * 32)
int8_gemv_mma(const typename Storage<DT>::type* __restrict__ x, const uint4* __restrict__ codes,
              const float* __restrict__ absmax, const i8* __restrict__ W, const float* __restrict__ scb,
              const void* __restrict__ bias, typename Storage<DT>::type* __restrict__ out,
              int M, int N, int K, int nch, int x_vec_ok, const long long* __restrict__ ocols,
              const int* __restrict__ count) {
  __shared__ int red[GM_WARPS][NT][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * 8 * NT;
  const int steps = (nch + 3) >> 2;
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  int acc[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
#pragma unroll 2
  for (int s = warp; s < steps; s += GM_WARPS) {
    const int c = 4 * s + t;  // this lane's 16-byte chunk
    uint4 w[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int row = n0 + 8 * nt + g;
      w[nt] = (c < nch && row < N) ? ld_w16<true>(W + (i64)row * K, c, K) : z;
    }
    const uint4 xa = (c < nch && g < M) ? __ldg(codes + (i64)g * nch + c) : z;
    const uint4 xb = (c < nch && g + 8 < M) ? __ldg(codes + (i64)(g + 8) * nch + c) : z;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mma_s8_16x8x32(acc[nt], xa.x, xb.x, xa.y, xb.y, w[nt].x, w[nt].y);
      mma_s8_16x8x32(acc[nt], xa.z, xb.z, xa.w, xb.w, w[nt].z, w[nt].w);
    }
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    *reinterpret_cast<int4*>(&red[warp][nt][lane][0]) = make_int4(acc[nt][0], acc[nt][1], acc[nt][2], acc[nt][3]);
  __syncthreads();
  for (int e = threadIdx.x; e < NT * 128; e += GM_WARPS * 32) {
    const int nt = e >> 7, l = (e >> 2) & 31, i = e & 3;
    const int m = (l >> 2) + 8 * (i >> 1), n = n0 + 8 * nt + 2 * (l & 3) + (i & 1);
    if (m < M && n < N) {
      u32 sum = 0u;
#pragma unroll
      for (int v = 0; v < GM_WARPS; ++v) sum += (u32)red[v][nt][l][i];
      const float sn = __ldg(scb + n);
      float y = add_bias<BDT>(__fmul_rn(__fmul_rn(__fmul_rn((float)(int)sum, __ldg(absmax + m)), sn), GV_KDEQ), bias, n);
      if (ocols != nullptr) y = add_outliers<DT>(y, x, W, K, m, n, sn, ocols, *count);
      out[(i64)m * N + n] = from_f32<DT>(y);
    }
  }
}
