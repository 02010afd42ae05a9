// Host stand-ins for qkernels/_cuda/common.cuh and the CUDA built-ins that
// qkernels/fourbit/fourbit_mma.cu uses, for the host emulation of that kernel
// (tests/emu/fourbit_mma_emu.cpp, run by tests/test_fourbit_mma_emulated.py).
// A CTA's threads are fibers on one OS thread (emu.h), so __shared__ variables are plain
// statics: one CTA runs at a time.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define QK_DT_F32 0
#define QK_DT_F16 1
#define QK_DT_BF16 2

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct alignas(16) uint4 { u32 x, y, z, w; };
inline uint4 make_uint4(u32 a, u32 b, u32 c, u32 d) { return uint4{a, b, c, d}; }
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
struct dim3 { unsigned x = 0, y = 0, z = 0; };
extern dim3 threadIdx, blockIdx, gridDim, blockDim;

void __syncthreads();
inline void __threadfence() {}
template <class T> inline T __ldg(const T* p) { return *p; }
inline u32 atomicAdd(u32* p, u32 v) { const u32 o = *p; *p = o + v; return o; }  // fibers: one OS thread
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
using std::min;

// __byte_perm without the sign-replicate mode (the kernel's selectors have no bit 3 set)
inline u32 __byte_perm(u32 x, u32 y, u32 s) {
  const uint64_t v = ((uint64_t)y << 32) | x;
  u32 r = 0;
  for (int i = 0; i < 4; ++i) r |= (u32)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return r;
}

template <int DT> struct Storage { typedef u16 type; enum { bytes = 2 }; };
template <> struct Storage<QK_DT_F32> { typedef float type; enum { bytes = 4 }; };

inline float f16_to_f32(u16 h) { _Float16 f; std::memcpy(&f, &h, 2); return (float)f; }
inline u16 f32_to_f16(float v) { _Float16 f = (_Float16)v; u16 h; std::memcpy(&h, &f, 2); return h; }
inline float bf16_to_f32(u16 b) { u32 u = (u32)b << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline u16 f32_to_bf16(float f) {  // round to nearest even; NaN -> canonical NaN
  u32 u; std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
  return (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
template <int DT> inline float to_f32(typename Storage<DT>::type v);
template <> inline float to_f32<QK_DT_F32>(float v) { return v; }
template <> inline float to_f32<QK_DT_F16>(u16 v) { return f16_to_f32(v); }
template <> inline float to_f32<QK_DT_BF16>(u16 v) { return bf16_to_f32(v); }
template <int DT> inline typename Storage<DT>::type from_f32(float v);
template <> inline float from_f32<QK_DT_F32>(float v) { return v; }
template <> inline u16 from_f32<QK_DT_F16>(float v) { return f32_to_f16(v); }
template <> inline u16 from_f32<QK_DT_BF16>(float v) { return f32_to_bf16(v); }
