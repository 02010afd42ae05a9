// Device helpers shared by every kernel family (included by each .cu file).
// Header-free on purpose: fp16/bf16 go through PTX conversions on their raw bits, so
// NVRTC needs no CUDA include path. DT is the storage type: 0 = float32, 1 = float16,
// 2 = bfloat16 (the logical dtypes of qkernels' public API).
#pragma once

typedef signed char i8;
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define QK_DT_F32 0
#define QK_DT_F16 1
#define QK_DT_BF16 2

template <int DT> struct Storage { typedef u16 type; enum { bytes = 2 }; };
template <> struct Storage<QK_DT_F32> { typedef float type; enum { bytes = 4 }; };

__device__ __forceinline__ float f16_to_f32(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {  // round to nearest even
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {  // round to nearest even, NaN kept
  u16 b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
}

template <int DT> __device__ __forceinline__ float to_f32(typename Storage<DT>::type v);
template <> __device__ __forceinline__ float to_f32<QK_DT_F32>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<QK_DT_F16>(u16 v) { return f16_to_f32(v); }
template <> __device__ __forceinline__ float to_f32<QK_DT_BF16>(u16 v) { return bf16_to_f32(v); }

template <int DT> __device__ __forceinline__ typename Storage<DT>::type from_f32(float v);
template <> __device__ __forceinline__ float from_f32<QK_DT_F32>(float v) { return v; }
template <> __device__ __forceinline__ u16 from_f32<QK_DT_F16>(float v) { return f32_to_f16(v); }
template <> __device__ __forceinline__ u16 from_f32<QK_DT_BF16>(float v) { return f32_to_bf16(v); }

// v + bias[col] in float32, rounded once; the bias is of storage type BDT, or absent (BDT -1).
template <int BDT> struct Bias {
  __device__ static __forceinline__ float add(float v, const void* b, int col) {
    return __fadd_rn(v, to_f32<BDT>(reinterpret_cast<const typename Storage<BDT>::type*>(b)[col]));
  }
};
template <> struct Bias<-1> {
  __device__ static __forceinline__ float add(float v, const void*, int) { return v; }
};

// The 32-bit shared-window address of a pointer into shared memory (cp.async, ldmatrix and
// wgmma descriptors take it), without cuda_runtime's __cvta_generic_to_shared.
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// max that propagates NaN (as NumPy's max does): the reference's absmax rule. One FMNMX.NAN.
__device__ __forceinline__ float nan_max(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// NaN-propagating max over a CTA (every thread gets it); `red`: 32 floats of shared memory.
// Every thread of the CTA must call it (three barriers).
__device__ __forceinline__ float block_max(float m, float* red) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nwarps = (blockDim.x + 31) >> 5;
  if (lane == 0) red[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < nwarps ? red[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
    if (lane == 0) red[0] = m;
  }
  __syncthreads();
  m = red[0];
  __syncthreads();
  return m;
}

// Load VEC consecutive elements starting at x[i] as float32; zeros past n.
// `vec_ok`: the base pointer is 16-byte aligned (then full vectors load as one 16-byte access).
template <int DT, int VEC>
__device__ __forceinline__ void load_f32(const typename Storage<DT>::type* __restrict__ x, i64 i,
                                         i64 n, bool vec_ok, float (&v)[VEC]) {
  typedef typename Storage<DT>::type T;
  if (vec_ok && i + VEC <= n) {
    const uint4* p = reinterpret_cast<const uint4*>(x + i);
#pragma unroll
    for (int k = 0; k < VEC * (int)sizeof(T) / 16; ++k) {
      uint4 w = __ldg(p + k);
      const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
      for (int j = 0; j < 16 / (int)sizeof(T); ++j) v[k * (16 / sizeof(T)) + j] = to_f32<DT>(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = (i + j < n) ? to_f32<DT>(x[i + j]) : 0.0f;
  }
}

// 16 bytes of x starting at element i, as raw bits (zeros past n). `vec_ok`: x is 16-byte
// aligned, so a full vector loads as one access; otherwise element by element.
template <int DT>
__device__ __forceinline__ uint4 load_raw16(const typename Storage<DT>::type* __restrict__ x, i64 i,
                                            i64 n, bool vec_ok) {
  typedef typename Storage<DT>::type T;
  constexpr int VEC = 16 / sizeof(T);
  if (vec_ok && i + VEC <= n) return __ldg(reinterpret_cast<const uint4*>(x + i));
  union { uint4 v; T e[VEC]; } u;
  u.v = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    if (i + j < n) u.e[j] = x[i + j];
  return u.v;
}

// The blockwise and 4-bit quantizers' loads: the NV raw 16-byte vectors of this thread's
// share of quantization block qb (BLOCK elements of x, owned by a group of G threads; this
// thread is `lane` of its group). Vector k starts at element qb * BLOCK + (k * G + lane) *
// VEC, VEC = 16 / sizeof(T), so the group's k-th loads are contiguous (coalesced). Zeros
// past n; `vec_ok` as in load_raw16.
template <int DT, int BLOCK, int G, int NV>
__device__ __forceinline__ void load_block_raw16(const typename Storage<DT>::type* __restrict__ x, i64 qb,
                                                 int lane, i64 n, int vec_ok, uint4 (&v)[NV]) {
  constexpr int VEC = 16 / Storage<DT>::bytes;
#pragma unroll
  for (int k = 0; k < NV; ++k) v[k] = load_raw16<DT>(x, qb * BLOCK + (i64)(k * G + lane) * VEC, n, vec_ok);
}

// The 16 / sizeof(T) values of a raw 16-byte vector as float32.
template <int DT>
__device__ __forceinline__ void raw16_to_f32(uint4 w, float (&v)[16 / Storage<DT>::bytes]) {
  const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (DT == QK_DT_F32) {
      v[k] = __uint_as_float(words[k]);
    } else {
      v[2 * k % (16 / Storage<DT>::bytes)] = to_f32<DT>((typename Storage<DT>::type)(words[k] & 0xFFFFu));
      v[(2 * k + 1) % (16 / Storage<DT>::bytes)] = to_f32<DT>((typename Storage<DT>::type)(words[k] >> 16));
    }
  }
}

// Nearest code of float32 y through the table of reference.blockwise.search_table, entries
// (threshold, base): code = base + (threshold < y).
__device__ __forceinline__ u8 table_code(const float2* table, float y, int key_offset, int rows128) {
  u32 u = __float_as_uint(y);
  int h = (int)((u >> 16) & 0x7FFFu) - key_offset;
  int i = min(max(h, 0), rows128 - 1) + (int)(u >> 31) * rows128;
  float2 e = table[i];
  return (u8)((int)e.y + (e.x < y ? 1 : 0));
}

// Store V float32 values to y[0..V) as DT in 16-byte stores (V*bytes a multiple of 16); y aligned.
template <int DT, int V>
__device__ __forceinline__ void store_vec(typename Storage<DT>::type* __restrict__ y, const float (&v)[V]) {
  uint4* dst = reinterpret_cast<uint4*>(y);
  if (DT == QK_DT_F32) {
#pragma unroll
    for (int k = 0; k < V / 4; ++k)
      dst[k] = make_uint4(__float_as_uint(v[4 * k]), __float_as_uint(v[4 * k + 1]),
                          __float_as_uint(v[4 * k + 2]), __float_as_uint(v[4 * k + 3]));
  } else {
    u32 w[V / 2];
#pragma unroll
    for (int j = 0; j < V / 2; ++j)
      w[j] = (u32)from_f32<DT>(v[2 * j]) | ((u32)from_f32<DT>(v[2 * j + 1]) << 16);
#pragma unroll
    for (int k = 0; k < V / 8; ++k) dst[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
    (void)w;
  }
}

// table_code for y >= 0 (or NaN-free +0.0) with only the non-negative half of the table
// (rows128 entries) staged: the optimizer's second moment, which is never negative.
__device__ __forceinline__ u8 table_code_nonneg(const float2* table, float y, int key_offset, int rows128) {
  u32 u = __float_as_uint(y);
  int h = (int)((u >> 16) & 0x7FFFu) - key_offset;
  float2 e = table[min(max(h, 0), rows128 - 1)];
  return (u8)((int)e.y + (e.x < y ? 1 : 0));
}
