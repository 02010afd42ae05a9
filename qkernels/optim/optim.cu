// Fused Adam/AdamW updates. Reference: reference/optim.py. Launcher: _cupy.py.
//
// optimizer_update_8bit_blockwise<DT>   (one launch per parameter tensor per step)
//   in/out: p (n,) of DT; state1, state2 uint8 (n,) codes of m (signed map qmap1) and v
//           (unsigned map qmap2); absmax1, absmax2 float32 (nblocks,), nblocks = ceil(n/256)
//   in:     g (n,) of DT; qmap1/qmap2 float32 (256,); table1 = search_table(qmap1) (both
//           signs), table2 = the non-negative half of search_table(qmap2) (v >= 0 always),
//           both with the base column stored as int32 bits (see code_of); neg1 = the number
//           of leading qmap1 entries with the sign bit set when the sign bits are 1...1 0...0
//           (the sign fix then compares indices), else -1 (it reads qmap1); the float32
//           scalars of reference.optim.adam_scalars; gnorm_scale_ptr (device float32 or
//           null: then gnorm_scale); nonfinite (device int32 counter or null)
//   One warp owns one 256-element quantization block at a time: each lane holds 8
//   consecutive elements (16/32-byte vectors of p and g, 8-byte vectors of each state).
//   Pass 1 dequantizes, computes m, v and p in float32 with every operation rounded once
//   (__fmul_rn etc.: no FMA contraction, so the result is the NumPy oracle's bit for bit)
//   and writes p; redux.sync gives the block's new absmax of m and v (and the count of
//   non-finite gradients); pass 2 writes the requantized codes (search tables in shared
//   memory, then the sign fix for m). Warp-uniform fast paths skip the non-finite
//   bookkeeping when the block's gradients are all finite, and the NaN/clamp handling of
//   pass 2 when its absmax and reciprocals are finite; the last, partial block (or an
//   unaligned tensor) goes element by element.
//   Persistent grid of one 768-thread CTA per SM (24 warps, <= 80 registers), blocks
//   strided over the warps. Each warp loads its next block's g, codes and absmax into
//   registers before updating the current block, and loads p first thing in the update,
//   so memory latency hides behind the arithmetic. Each CTA stages the 2 codebooks and
//   the 2 search tables (~75 KB) in shared memory once, with cp.async, while the first
//   block's loads are in flight.
//   Traffic per element: 2*ES (p) + ES (g) + 2 + 2 (codes) bytes, +16 bytes per block.
// optimizer_update_32bit<DT>
//   in/out: p (n,) of DT; state1, state2 float32 (n,). in: g, scalars, update_scale_ptr
//   (device float32 or null: max_unorm's factor on the step size). 8 elements per thread,
//   grid-stride. Traffic: 3*ES + 16 bytes per element.
#include "common.cuh"

// A bit test instead of signbit: NVRTC compiles this without any C++ math header.
__device__ __forceinline__ u32 sign_bit_f32(float x) { return __float_as_uint(x) >> 31; }

struct AdamArgs {  // reference.optim.AdamScalars, float32
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps_c2, step_size, decay;
};

// m, v and the new p of one element; false when g is NaN or +-Inf (then m = v = 0 and p
// is left as it was). Operation order and rounding: reference/optim.py _moments/_new_param.
// Branch-free: the update is computed for every element and selected, so a warp never
// diverges on the finiteness test.
__device__ __forceinline__ bool adam_element(float g, float m0, float v0, float& p, float& m,
                                             float& v, const AdamArgs& a, float step_size) {
  const float m1 = __fadd_rn(__fmul_rn(m0, a.beta1), __fmul_rn(g, a.one_minus_beta1));
  const float v1 = __fadd_rn(__fmul_rn(v0, a.beta2), __fmul_rn(__fmul_rn(g, g), a.one_minus_beta2));
  const float u = __fdiv_rn(m1, __fadd_rn(__fsqrt_rn(v1), a.eps_c2));
  const float p1 = __fmul_rn(__fadd_rn(__fmul_rn(u, step_size), p), a.decay);
  const bool ok = fabsf(g) < __int_as_float(0x7F800000);  // false for NaN and +-Inf
  m = ok ? m1 : 0.0f;
  v = ok ? v1 : 0.0f;
  p = ok ? p1 : p;
  return ok;
}

// ---- 8-bit blockwise -----------------------------------------------------------------------

// Warp-wide reductions in one instruction each (sm_80+).
__device__ __forceinline__ u32 warp_max_u32(u32 x) {
  u32 r;
  asm volatile("redux.sync.max.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(x));
  return r;
}
__device__ __forceinline__ u32 warp_sum_u32(u32 x) {
  u32 r;
  asm volatile("redux.sync.add.u32 %0, %1, 0xffffffff;" : "=r"(r) : "r"(x));
  return r;
}

// Max over the warp of non-negative float32 values or NaN, NaN if any lane has NaN (the
// reference's absmax rule): non-negative floats order like their bit patterns as unsigned
// integers, and a NaN with a clear sign bit (nan_max's canonical 0x7FFFFFFF) is above +Inf.
__device__ __forceinline__ float warp_nan_max_nonneg(float x) {
  return __uint_as_float(warp_max_u32(__float_as_uint(x)));
}

// Copy `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared
// memory with cp.async, strided over the CTA; completes at cp_async_wait_all().
__device__ __forceinline__ void cp_async_to_shared(void* dst, const void* src, int bytes) {
  u32 base;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(base) : "l"(dst));
  for (int off = 16 * threadIdx.x; off < bytes; off += 16 * blockDim.x)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;"
                 :: "r"(base + off), "l"(static_cast<const char*>(src) + off) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Nearest code of float32 y through reference.blockwise.search_table, entries (threshold,
// base) with the base stored as int32 bits (no float-to-int conversion per element):
// code = base + (threshold < y). Both signs: the negative half follows the positive one.
// IN_RANGE: |y| < 2 (y = m / absmax, rounded), so only the low end needs clamping.
template <bool IN_RANGE>
__device__ __forceinline__ int code_of(const float2* table, float y, int key_offset, int rows128) {
  const u32 u = __float_as_uint(y);
  int i = max((int)((u >> 16) & 0x7FFFu) - key_offset, 0);
  if (!IN_RANGE) i = min(i, rows128 - 1);
  const float2 e = table[i + (int)(u >> 31) * rows128];
  return __float_as_int(e.y) + (e.x < y ? 1 : 0);
}
// code_of with only the non-negative half of the table (the second moment, v >= 0; a
// negative y from a corrupt state still reads inside the table).
template <bool IN_RANGE>
__device__ __forceinline__ int code_of_nonneg(const float2* table, float y, int key_offset, int rows128) {
  int i = max((int)((__float_as_uint(y) >> 16) & 0x7FFFu) - key_offset, 0);
  if (!IN_RANGE) i = min(i, rows128 - 1);
  const float2 e = table[i];
  return __float_as_int(e.y) + (e.x < y ? 1 : 0);
}

// What a warp loads ahead for its next block: per lane the raw bits of 8 gradients (16-byte
// vectors: fp32 2, 16-bit 1), the two 8-byte code vectors, and the block's two absmax
// values. p is loaded when the block is updated (it is needed last; see update_tile).
template <int DT>
struct Tile {
  static constexpr int PV = Storage<DT>::bytes / 2;
  uint4 g[PV];
  uint2 c1, c2;
  float a1, a2;
};

// The 8 values of raw 16-byte vectors as float32 (bf16: the bits shifted into place).
template <int DT>
__device__ __forceinline__ void raw_to_f32(const uint4 (&w)[Tile<DT>::PV], float (&v)[8]) {
#pragma unroll
  for (int k = 0; k < Tile<DT>::PV; ++k) {
    const u32 words[4] = {w[k].x, w[k].y, w[k].z, w[k].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (DT == QK_DT_F32) {
        v[4 * k + i] = __uint_as_float(words[i]);
      } else if (DT == QK_DT_BF16) {
        v[2 * i] = __uint_as_float(words[i] << 16);
        v[2 * i + 1] = __uint_as_float(words[i] & 0xFFFF0000u);
      } else {
        v[2 * i] = f16_to_f32((u16)(words[i] & 0xFFFFu));
        v[2 * i + 1] = f16_to_f32((u16)(words[i] >> 16));
      }
    }
  }
}

// Two float32 values rounded (nearest even) to DT and packed, `lo` in the low half.
template <int DT>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  if (DT == QK_DT_BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <int DT>
__device__ __forceinline__ void f32_to_raw(const float (&v)[8], uint4 (&w)[Tile<DT>::PV]) {
  if (DT == QK_DT_F32) {
#pragma unroll
    for (int k = 0; k < Tile<DT>::PV; ++k)
      w[k] = make_uint4(__float_as_uint(v[4 * k]), __float_as_uint(v[4 * k + 1]),
                        __float_as_uint(v[4 * k + 2]), __float_as_uint(v[4 * k + 3]));
  } else {
    w[0] = make_uint4(pack2<DT>(v[0], v[1]), pack2<DT>(v[2], v[3]), pack2<DT>(v[4], v[5]),
                      pack2<DT>(v[6], v[7]));
  }
}

template <int DT>
struct Optim8bit {  // the kernel's arguments, passed to its helpers by reference
  typedef typename Storage<DT>::type T;
  T* p;
  const T* g;
  u8 *state1, *state2;
  float *absmax1, *absmax2;
  const float *qmap1, *qmap2;      // shared memory
  const float2 *table1, *table2;   // shared memory
  int key_offset1, rows128_1, key_offset2, rows128_2, neg1;
  AdamArgs a;
  float gs;
  int* nonfinite;
  i64 n;
};

// `full`: every element of the block exists and the arrays are 16-byte aligned, so each
// array is one or two vector accesses per lane; otherwise element by element, zeros past n.
template <int DT>
__device__ __forceinline__ void load_raw8(const typename Storage<DT>::type* x, i64 start, i64 n,
                                          bool full, uint4 (&w)[Tile<DT>::PV]) {
  typedef typename Storage<DT>::type T;
  if (full) {
#pragma unroll
    for (int k = 0; k < Tile<DT>::PV; ++k) w[k] = __ldg(reinterpret_cast<const uint4*>(x + start) + k);
  } else {
    union { uint4 v[Tile<DT>::PV]; T e[8]; } u;
#pragma unroll
    for (int j = 0; j < 8; ++j) u.e[j] = start + j < n ? x[start + j] : (T)0;
#pragma unroll
    for (int k = 0; k < Tile<DT>::PV; ++k) w[k] = u.v[k];
  }
}

__device__ __forceinline__ uint2 load_codes8(const u8* c, i64 start, i64 n, bool full) {
  if (full) return *reinterpret_cast<const uint2*>(c + start);
  union { uint2 v; u8 e[8]; } u;
#pragma unroll
  for (int j = 0; j < 8; ++j) u.e[j] = start + j < n ? c[start + j] : (u8)0;
  return u.v;
}

// Loads block b's tile for this lane (elements start .. start+8).
template <int DT>
__device__ __forceinline__ void load_tile(Tile<DT>& t, const Optim8bit<DT>& o, i64 b, i64 start,
                                          bool full) {
  load_raw8<DT>(o.g, start, o.n, full, t.g);
  t.c1 = load_codes8(o.state1, start, o.n, full);
  t.c2 = load_codes8(o.state2, start, o.n, full);
  t.a1 = o.absmax1[b];
  t.a2 = o.absmax2[b];
}

__device__ __forceinline__ u32 byte_of(uint2 c, int j) { return ((j < 4 ? c.x : c.y) >> (8 * (j & 3))) & 0xFFu; }

// Pass 1 over one lane's 8 elements: dequantized moments, new m, v and p (adam_element's
// arithmetic). CHECKED: some gradient of the warp's block is NaN or +-Inf, so each element
// takes the rule of docs/FORMATS.md §11.3 for them (m = v = 0, p kept) and they are counted; otherwise (almost
// always) the selects and the count are skipped. Returns the count among the first
// `valid` elements (the others lie past the end of the arrays).
template <int DT, bool CHECKED>
__device__ __forceinline__ u32 moments(const Tile<DT>& t, const Optim8bit<DT>& o, const float (&gs)[8],
                                       int valid, float (&pv)[8], float (&m)[8], float (&v)[8]) {
  u32 bad = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float m0 = __fmul_rn(o.qmap1[byte_of(t.c1, j)], t.a1);
    const float v0 = __fmul_rn(o.qmap2[byte_of(t.c2, j)], t.a2);
    if (CHECKED) {
      const bool ok = adam_element(gs[j], m0, v0, pv[j], m[j], v[j], o.a, o.a.step_size);
      bad += (ok || j >= valid) ? 0 : 1;
    } else {
      m[j] = __fadd_rn(__fmul_rn(m0, o.a.beta1), __fmul_rn(gs[j], o.a.one_minus_beta1));
      v[j] = __fadd_rn(__fmul_rn(v0, o.a.beta2), __fmul_rn(__fmul_rn(gs[j], gs[j]), o.a.one_minus_beta2));
      const float u = __fdiv_rn(m[j], __fadd_rn(__fsqrt_rn(v[j]), o.a.eps_c2));
      pv[j] = __fmul_rn(__fadd_rn(__fmul_rn(u, o.a.step_size), pv[j]), o.a.decay);
    }
  }
  return bad;
}

// Pass 2: the codes of m and v (r1, r2: the reciprocals of the block's new absmax).
// CLEAN: r1, r2 and the absmax are finite, the usual case: then every |m| <= absmax gives
// |y| < 2 and no NaN. Otherwise y can be NaN (0/0, Inf*0, NaN), searched as 0.0 (the
// reference.blockwise rule), or +-Inf, and the table index is clamped at both ends.
template <bool CLEAN>
__device__ __forceinline__ void requantize(const float (&m)[8], const float (&v)[8], float r1, float r2,
                                           const float* qmap1, const float2* table1, int key_offset1,
                                           int rows128_1, int neg1, const float2* table2,
                                           int key_offset2, int rows128_2, uint2& c1, uint2& c2) {
  c1 = make_uint2(0, 0);
  c2 = make_uint2(0, 0);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float y1 = __fmul_rn(m[j], r1), y2 = __fmul_rn(v[j], r2);
    if (!CLEAN && y1 != y1) y1 = 0.0f;
    if (!CLEAN && y2 != y2) y2 = 0.0f;
    int q1 = code_of<CLEAN>(table1, y1, key_offset1, rows128_1);
    // sign fix: a code whose value's sign bit differs from m's moves one index towards m
    const bool code_neg = neg1 >= 0 ? q1 < neg1 : sign_bit_f32(qmap1[q1]) != 0;
    if (code_neg != ((int)__float_as_uint(m[j]) < 0)) q1 += m[j] > 0.0f ? 1 : -1;
    const u32 q2 = (u32)code_of_nonneg<CLEAN>(table2, y2, key_offset2, rows128_2);
    if (j < 4) {
      c1.x |= ((u32)q1 & 0xFFu) << (8 * j);
      c2.x |= q2 << (8 * j);
    } else {
      c1.y |= ((u32)q1 & 0xFFu) << (8 * (j - 4));
      c2.y |= q2 << (8 * (j - 4));
    }
  }
}

// One warp's update of block b from its loaded tile. FULL: the whole block exists and the
// arrays are aligned (every block but possibly the last): no per-element bounds.
template <int DT, bool FULL>
__device__ __forceinline__ void update_tile(const Tile<DT>& t, const Optim8bit<DT>& o, i64 b,
                                            i64 start, int lane) {
  const int valid = FULL ? 8 : (int)max((i64)0, min((i64)8, o.n - start));
  float pv[8], gs[8], m[8], v[8];
  {
    uint4 w[Tile<DT>::PV];  // its latency hides behind the moments' arithmetic
    load_raw8<DT>(o.p, start, o.n, FULL, w);
    raw_to_f32<DT>(w, pv);
  }
  raw_to_f32<DT>(t.g, gs);
  float gmax = 0.0f;  // NaN or Inf if any scaled gradient of this lane is
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    gs[j] = __fmul_rn(gs[j], o.gs);
    gmax = nan_max(fabsf(gs[j]), gmax);
  }
  u32 bad = 0;
  if (__all_sync(0xFFFFFFFFu, gmax < __int_as_float(0x7F800000)))
    moments<DT, false>(t, o, gs, valid, pv, m, v);
  else
    bad = moments<DT, true>(t, o, gs, valid, pv, m, v);
  float max1 = 0.0f, max2 = 0.0f;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (!FULL && j >= valid) {  // past the end: outside the block's absmax and count
      m[j] = 0.0f;
      v[j] = 0.0f;
    }
    max1 = nan_max(fabsf(m[j]), max1);
    max2 = nan_max(fabsf(v[j]), max2);
  }
  if (FULL) {
    uint4 w[Tile<DT>::PV];
    f32_to_raw<DT>(pv, w);
#pragma unroll
    for (int k = 0; k < Tile<DT>::PV; ++k) reinterpret_cast<uint4*>(o.p + start)[k] = w[k];
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < valid) o.p[start + j] = from_f32<DT>(pv[j]);
  }
  max1 = warp_nan_max_nonneg(max1);
  max2 = warp_nan_max_nonneg(max2);
  bad = warp_sum_u32(bad);
  const float r1 = __fdiv_rn(1.0f, max1), r2 = __fdiv_rn(1.0f, max2);  // inf for zero blocks
  uint2 c1, c2;
  if (nan_max(nan_max(r1, r2), nan_max(max1, max2)) < __int_as_float(0x7F800000))  // all finite
    requantize<true>(m, v, r1, r2, o.qmap1, o.table1, o.key_offset1, o.rows128_1, o.neg1, o.table2,
                     o.key_offset2, o.rows128_2, c1, c2);
  else
    requantize<false>(m, v, r1, r2, o.qmap1, o.table1, o.key_offset1, o.rows128_1, o.neg1, o.table2,
                     o.key_offset2, o.rows128_2, c1, c2);
  if (FULL) {
    *reinterpret_cast<uint2*>(o.state1 + start) = c1;
    *reinterpret_cast<uint2*>(o.state2 + start) = c2;
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < valid) {
        o.state1[start + j] = (u8)byte_of(c1, j);
        o.state2[start + j] = (u8)byte_of(c2, j);
      }
    }
  }
  if (lane == 0) {
    o.absmax1[b] = max1;
    o.absmax2[b] = max2;
    if (bad && o.nonfinite) atomicAdd(o.nonfinite, (int)bad);
  }
}

template <int DT>
__global__ void __launch_bounds__(768, 1)
optimizer_update_8bit_blockwise(typename Storage<DT>::type* __restrict__ p,
                                const typename Storage<DT>::type* __restrict__ g,
                                u8* __restrict__ state1, u8* __restrict__ state2,
                                float* __restrict__ absmax1, float* __restrict__ absmax2,
                                const float* __restrict__ qmap1_g, const float* __restrict__ qmap2_g,
                                const float2* __restrict__ table1_g, int key_offset1, int rows128_1,
                                const float2* __restrict__ table2_g, int key_offset2, int rows128_2,
                                int neg1, float beta1, float one_minus_beta1, float beta2,
                                float one_minus_beta2, float eps_c2, float step_size, float decay,
                                float gnorm_scale, const float* __restrict__ gnorm_scale_ptr,
                                int* __restrict__ nonfinite, i64 n, int vec_ok) {
  constexpr int BLOCK = 256, VEC = 8;
  extern __shared__ __align__(16) float smem[];
  float* qmap1 = smem;
  float* qmap2 = smem + 256;
  float2* table1 = reinterpret_cast<float2*>(smem + 512);
  float2* table2 = table1 + 2 * rows128_1;
  cp_async_to_shared(qmap1, qmap1_g, 256 * 4);
  cp_async_to_shared(qmap2, qmap2_g, 256 * 4);
  cp_async_to_shared(table1, table1_g, 2 * rows128_1 * 8);
  cp_async_to_shared(table2, table2_g, rows128_2 * 8);

  const Optim8bit<DT> o = {p, g, state1, state2, absmax1, absmax2, qmap1, qmap2, table1, table2,
                           key_offset1, rows128_1, key_offset2, rows128_2, neg1,
                           {beta1, one_minus_beta1, beta2, one_minus_beta2, eps_c2, step_size, decay},
                           gnorm_scale_ptr ? *gnorm_scale_ptr : gnorm_scale, nonfinite, n};
  const int lane = threadIdx.x & 31;
  const i64 nblocks = (n + BLOCK - 1) / BLOCK;
  const i64 stride = (i64)gridDim.x * (blockDim.x >> 5);
  i64 b = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  // a block is `full` when all of it exists and the arrays are aligned (warp-uniform)
  Tile<DT> cur;
  if (b < nblocks) load_tile(cur, o, b, b * BLOCK + lane * VEC, vec_ok && (b + 1) * BLOCK <= n);
  cp_async_wait_all();
  __syncthreads();  // the tables are in shared memory; no CTA-wide barrier after this
  if (b >= nblocks) return;
  for (;;) {
    const i64 next = b + stride;
    Tile<DT> nxt;
    if (next < nblocks) load_tile(nxt, o, next, next * BLOCK + lane * VEC, vec_ok && (next + 1) * BLOCK <= n);
    if (vec_ok && (b + 1) * BLOCK <= n)
      update_tile<DT, true>(cur, o, b, b * BLOCK + lane * VEC, lane);
    else
      update_tile<DT, false>(cur, o, b, b * BLOCK + lane * VEC, lane);
    if (next >= nblocks) break;
    cur = nxt;
    b = next;
  }
}

// ---- 32-bit state --------------------------------------------------------------------------

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
