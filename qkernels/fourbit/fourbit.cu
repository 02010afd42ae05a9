// 4-bit NF4/FP4 quantization and the fused 4-bit matmul. Reference: reference/fourbit.py. Launcher: _cupy.py.
//
// QT (quant type): 0 = NF4, 1 = FP4. DT (storage dtype): see common.cuh. Packing: element 2k
// in the high nibble, 2k + 1 in the low nibble of byte k; an odd count pads the last low
// nibble with the code of 0.0 (what a zero loaded past n encodes to).
//
// quantize_4bit<DT, BLOCK, QT>
//   in:  x (n,) of DT, contiguous
//   out: packed uint8 (ceil(n/2),); absmax float32 (ceil(n/BLOCK),); when partials is not
//        null, partials double2 (gridDim.x,) = (sum, count) of this CTA's finite absmax values
//        (the nested offset's mean, finished by nest_absmax_4bit)
//   A group of G threads owns one quantization block; each thread loads NV 16-byte vectors
//   (VEC = 8 half or 4 float values; Quantize4Shape), the group's loads of one vector index
//   are contiguous. The group reduces the NaN-propagating absmax (shuffles, then shared
//   memory when G > 32) and each thread writes VEC/2 packed bytes per vector (a block whose
//   absmax is finite, nonzero and has a finite reciprocal skips the per-value NaN test,
//   being issue-bound: ~15 instructions per value). Persistent
//   grid of Q4_MIN_CTAS CTAs per SM (all resident) walking tiles of 256 / G blocks; the
//   next tile's vectors load while this one is coded. Traffic per element: ES bytes read
//   + 1/2 written, plus 4 bytes per block.
// nest_absmax_4bit<B2> (compress_statistics=True, B2 = 256; after quantize_4bit with partials)
//   in:  absmax float32 (nb,); partials double2 (np,); table float2 = search_table(code) of
//        the signed dynamic map (reference.blockwise)
//   out: qabs uint8 (nb,), absmax2 float32 (ceil(nb/256),), offset float32 (1,)
//   offset = f32(sum / max(count, 1)) (the float64 mean of the finite absmax values), then
//   exactly reference.blockwise.quantize_blockwise(absmax - offset, blocksize=256). Every
//   CTA sums the partials in the same fixed order, so all agree on the offset; a CTA of
//   1024 threads codes 4 nested blocks (one value per thread) per step of a persistent loop.
// dequantize_4bit<DT, BLOCK, NESTED>
//   in:  packed uint8 (ceil(n/2),), code float32 (16,), absmax float32 (nblocks,) or, when
//        NESTED, absmax uint8 codes (nblocks,) + code2 float32 (256,) + absmax2 float32
//        (ceil(nblocks/256),) + offset float32 (1,) (scale = f32(code2[q] * absmax2) + offset)
//   out: y (n,) of DT = code[nibble] * scale, rounded once to DT
//   A unit is one 16-byte store: V = 16 / ES values (8 half, 4 float) from V/2 packed bytes.
//   Lane l of a warp takes unit u + l, so every warp-wide load (4 or 2 bytes a lane) and
//   store (16 bytes a lane) is contiguous; each thread takes DQ_UNITS units per tile
//   (blockDim apart), all loads issued before the first store. Persistent grid of
//   DQ_MIN_CTAS CTAs per SM. Traffic per element: 1/2 byte read + ES written.
// matmul_4bit<DT, MT, NESTED>
//   in:  x (M, K) of DT row-major, M <= MT <= 16, 16-byte aligned; packed weight W (N, K)
//        flattened row-major (K % 32 == 0, 16-byte aligned); scales as in dequantize_4bit
//        (the nested offset from offset_p, or offset_v when offset_p is null), indexed by the
//        flat element index >> log2_block; code float32 (16,); bias (N,) of DT or null
//   out: y (M, N) of DT = x @ W^T + bias, float32 accumulation, rounded once
//   A CTA (8 warps) owns ROWS = 8 * RN rows of W and all of K (RN = 1 for MT <= 2, else 2;
//   MatmulShape). Lane (r = lane / 4, g = lane % 4) owns rows r (and r + 8 when RN = 2);
//   the warps and the g lanes split K: in CTA step s, lane g of warp w takes the UK columns
//   from s * BS + (4w + g) * UK (UK/2 packed bytes per row: one load and one scale). x is staged in shared memory as float32, KC columns of all M rows
//   at a time (read from L2 once per CTA, rows padded 4 floats per 32 against bank
//   conflicts); the 8 lanes of one g read the same x (broadcast). Each weight is decoded
//   once (16-entry table in shared memory) and multiplied with all M rows: per 16 columns
//   the unscaled sum code * x is scaled once into acc[RN][MT] (registers). The next chunk's
//   weights, scales and x load while this chunk computes. The end: shuffles over g, then
//   the 8 warps' partials summed in a fixed order in shared memory, bias, one rounding.
//   Every packed byte is read once; x M * K * ES bytes per CTA from L2.
// gemv_4bit<DT, NESTED, R, TW> (one row of x: the decode case; matmul_4bit's arguments, M = 1)
//   A CTA of TW warps owns R rows of W; its 32 * TW lanes split K into 32-column chunks
//   (lane t takes chunks t, t + 32 TW, ...). Per chunk a lane loads the R rows' 16 packed
//   bytes and scales together (R 16-byte loads in flight a lane) and the chunk's 32 x values
//   once into registers (x is small: L1/L2 hits), so each x value feeds R rows, with no
//   shared-memory staging and no barrier in the loop; the shared-memory traffic left is the
//   16-entry decode table. Per row and chunk: 4 partial sums (one per packed word), scaled
//   once. End: shuffles over the warp, the TW warps' partials summed in a fixed order in
//   shared memory, bias, one rounding. R = 8, TW = 4 measured best on H200 (1 x 4096 ->
//   14336: 16 us with float32 absmax, against 24 us for matmul_4bit<., 1, .>).
#include "common.cuh"
#define QK4_INF __int_as_float(0x7f800000)
typedef unsigned long long u64;

// Launch shapes shared with _cupy.py: the persistent kernels' grids are these CTA counts
// per SM, which the launch bounds guarantee are resident together.
#define Q4_THREADS 256
#define Q4_MIN_CTAS 5
#define DQ_THREADS 256
#define DQ_MIN_CTAS 8
#define DQ_UNITS 4
#define NEST_THREADS 1024
#define MM_THREADS 256

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
// 16 banks: conflict-free for any access pattern). c is kept as a byte offset (4 * code) so
// each probe is one shared load at register + constant; the first probe is a literal.
__device__ __forceinline__ u32 nf4_code(const float* thr, float y) {
  const char* t = reinterpret_cast<const char*>(thr);
  u32 c = (y > 0.0397901498f) ? 32u : 0u;  // thr[7]
  c += (y > *reinterpret_cast<const float*>(t + c + 12)) ? 16u : 0u;
  c += (y > *reinterpret_cast<const float*>(t + c + 4)) ? 8u : 0u;
  c += (y > *reinterpret_cast<const float*>(t + c)) ? 4u : 0u;
  return c >> 2;
}

// bitsandbytes' FP4 rule with its float32 literals (docs/FORMATS.md §4.3).
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

// CHECK: y may be NaN (a block whose absmax is 0, Inf or NaN); with a finite nonzero absmax
// every y = x / absmax is a number, and the check is left out of the hot loop.
template <int QT, bool CHECK>
__device__ __forceinline__ u32 code_4bit(const float* thr, float y) {
  if (CHECK && y != y) y = 0.0f;  // 0/0, Inf*0 and NaN blocks code as 0.0 (reference rule)
  return QT == 0 ? nf4_code(thr, y) : fp4_code(y);
}

// The VEC/2 packed bytes of VEC values scaled by r (value 2j in the high nibble of byte j).
template <int QT, bool CHECK, int VEC>
__device__ __forceinline__ void pack_codes(const float* thr, const float (&v)[VEC], float r,
                                           u8 (&b)[VEC / 2]) {
#pragma unroll
  for (int j = 0; j < VEC / 2; ++j)
    b[j] = (u8)((code_4bit<QT, CHECK>(thr, v[2 * j] * r) << 4) | code_4bit<QT, CHECK>(thr, v[2 * j + 1] * r));
}

// Several vectors per thread keep HBM reads in flight while the group reduces; large
// blocks also get fewer threads per block, so fewer cross-warp steps. G <= 256 always.
template <int DT, int BLOCK> struct Quantize4Shape {
  enum { VEC = 16 / Storage<DT>::bytes,
         NV = (BLOCK / VEC >= 256) ? 4 : (BLOCK / VEC >= 8 ? 2 : 1),
         G = BLOCK / (VEC * NV) };
};

// Sum over a CTA of blockDim.x threads (a multiple of 32, at most 1024) in a fixed order;
// the result is returned to every thread. `red` holds 32 doubles. Ends synchronized.
__device__ __forceinline__ double cta_sum(double v, double* red) {
#pragma unroll
  for (int off = 16; off >= 1; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < (int)(blockDim.x / 32); ++w) total += red[w];
  __syncthreads();
  return total;
}

template <int DT, int BLOCK, int QT>
__global__ void __launch_bounds__(Q4_THREADS, Q4_MIN_CTAS)
quantize_4bit(const typename Storage<DT>::type* __restrict__ x, u8* __restrict__ packed,
              float* __restrict__ absmax, i64 n, int vec_ok, double2* __restrict__ partials) {
  typedef Quantize4Shape<DT, BLOCK> Shape;
  constexpr int VEC = Shape::VEC;
  constexpr int NV = Shape::NV;
  constexpr int G = Shape::G;
  static_assert(G >= 1 && G <= Q4_THREADS, "a quantization block fits in a CTA");
  __shared__ float thr[16];
  __shared__ float warp_max[32];
  __shared__ double red[32];
  if (threadIdx.x < 16) thr[threadIdx.x] = nf4_threshold(threadIdx.x);
  __syncthreads();

  const int groups = blockDim.x / G;
  const int g = threadIdx.x / G, lane_g = threadIdx.x % G;
  const i64 nblocks = (n + BLOCK - 1) / BLOCK;
  const i64 nbytes = (n + 1) / 2;
  double fsum = 0.0, fcount = 0.0;  // finite absmax values this thread wrote
  // vector k of this thread starts at element qb*BLOCK + (k*G + lane_g)*VEC
  uint4 next[NV];
  load_block_raw16<DT, BLOCK, G, NV>(x, (i64)blockIdx.x * groups + g, lane_g, n, vec_ok, next);
  for (i64 tile = blockIdx.x; tile * groups < nblocks; tile += gridDim.x) {
    const i64 qb = tile * groups + g;
    uint4 raw[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) raw[k] = next[k];
    load_block_raw16<DT, BLOCK, G, NV>(x, (tile + gridDim.x) * groups + g, lane_g, n, vec_ok, next);
    float m = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      float v[VEC];
      raw16_to_f32<DT>(raw[k], v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = nan_max(fabsf(v[j]), m);
    }
#pragma unroll
    for (int off = (G < 32 ? G : 32) / 2; off >= 1; off /= 2)
      m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
    if (G > 32) {  // every group of the CTA takes this branch together
      if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
      __syncthreads();
      const int first = g * (G / 32);
      m = warp_max[first];
      for (int w = 1; w < G / 32; ++w) m = nan_max(warp_max[first + w], m);
      __syncthreads();
    }
    const float r = 1.0f / m;  // IEEE division: inf for an all-zero block
    // no y can be NaN: false for NaN, and for a subnormal absmax whose reciprocal is inf
    const bool clean = m > 0.0f && m < QK4_INF && r < QK4_INF;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      float v[VEC];
      raw16_to_f32<DT>(raw[k], v);
      u8 b[VEC / 2];
      if (clean)
        pack_codes<QT, false>(thr, v, r, b);
      else
        pack_codes<QT, true>(thr, v, r, b);
      const i64 start = qb * BLOCK + (i64)(k * G + lane_g) * VEC;
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
    }
    if (lane_g == 0 && qb < nblocks) {
      absmax[qb] = m;
      if (m < QK4_INF) {  // false for NaN and Inf
        fsum += (double)m;
        fcount += 1.0;
      }
    }
  }
  if (partials != nullptr) {  // the same pointer for every thread: the barriers are uniform
    fsum = cta_sum(fsum, red);
    fcount = cta_sum(fcount, red);
    if (threadIdx.x == 0) partials[blockIdx.x] = make_double2(fsum, fcount);
  }
}

template <int B2>  // the nested blocksize, 256 (reference.fourbit.NESTED_BLOCKSIZE)
__global__ void __launch_bounds__(NEST_THREADS)
nest_absmax_4bit(const float* __restrict__ absmax, const double2* __restrict__ partials, int np,
                 const float2* __restrict__ table, int key_offset, int rows128,
                 u8* __restrict__ qabs, float* __restrict__ absmax2, float* __restrict__ offset_out,
                 i64 nb) {
  static_assert(B2 % 32 == 0 && NEST_THREADS % B2 == 0, "whole warps per nested block");
  __shared__ double red[32];
  __shared__ float warp_max[32];
  double s = 0.0, c = 0.0;
  for (int i = threadIdx.x; i < np; i += blockDim.x) {
    const double2 p = partials[i];
    s += p.x;
    c += p.y;
  }
  s = cta_sum(s, red);
  c = cta_sum(c, red);
  const float offset = (float)(s / fmax(c, 1.0));  // 0 when no absmax is finite
  if (blockIdx.x == 0 && threadIdx.x == 0) *offset_out = offset;

  const int g = threadIdx.x / B2;  // nested block within the step
  for (i64 base = (i64)blockIdx.x * blockDim.x; base < nb; base += (i64)gridDim.x * blockDim.x) {
    const i64 i = base + threadIdx.x;
    const float v = i < nb ? absmax[i] - offset : 0.0f;  // f32(absmax - offset), as the reference
    float m = fabsf(v);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) m = nan_max(__shfl_xor_sync(0xffffffffu, m, off), m);
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
    __syncthreads();
    m = warp_max[g * (B2 / 32)];
    for (int w = 1; w < B2 / 32; ++w) m = nan_max(warp_max[g * (B2 / 32) + w], m);
    __syncthreads();
    const float r = 1.0f / m;  // quantize_blockwise's rule: inf for an all-zero block
    float y = v * r;
    if (y != y) y = 0.0f;      // 0/0, Inf*0, NaN blocks search as 0.0
    if (i < nb) qabs[i] = table_code(table, y, key_offset, rows128);
    const i64 b = base / B2 + g;
    if (threadIdx.x % B2 == 0 && b * B2 < nb) absmax2[b] = m;
  }
}

// Nested statistics: the scale of a 4-bit block is f32(code2[q] * absmax2) + offset,
// rounded twice as the reference does (no fused multiply-add).
__device__ __forceinline__ float nested_scale(float c2, float a2, float offset) {
  return __fadd_rn(__fmul_rn(c2, a2), offset);
}

template <int V> struct PackedWord;  // the V/2 packed bytes of a dequantize unit
template <> struct PackedWord<8> { typedef u32 type; };
template <> struct PackedWord<4> { typedef u16 type; };

// The scale inputs of 4-bit block blk: the absmax (a), or with NESTED the nested code (q)
// and its absmax2 (a), for nested_scale.
template <int NESTED>
__device__ __forceinline__ void load_scale(const void* __restrict__ absmax_v, const float* __restrict__ absmax2,
                                           i64 blk, u32& q, float& a) {
  if (NESTED) {
    q = __ldg(reinterpret_cast<const u8*>(absmax_v) + blk);
    a = __ldg(absmax2 + (blk >> 8));
  } else {
    a = __ldg(reinterpret_cast<const float*>(absmax_v) + blk);
  }
}

// The V values of packed word p (byte b holds element 2b high, 2b + 1 low) times scale.
template <int V>
__device__ __forceinline__ void decode_scaled(u32 p, const float* code, float scale, float (&out)[V]) {
#pragma unroll
  for (int b = 0; b < V / 2; ++b) {
    out[2 * b] = code[(p >> (8 * b + 4)) & 15u] * scale;
    out[2 * b + 1] = code[(p >> (8 * b)) & 15u] * scale;
  }
}

template <int DT, int BLOCK, int NESTED>
__global__ void __launch_bounds__(DQ_THREADS, DQ_MIN_CTAS)
dequantize_4bit(const u8* __restrict__ packed, const float* __restrict__ code_g,
                const void* __restrict__ absmax_v, const float* __restrict__ code2_g,
                const float* __restrict__ absmax2, const float* __restrict__ offset_p,
                typename Storage<DT>::type* __restrict__ y, i64 n, int vec_ok) {
  constexpr int V = 16 / Storage<DT>::bytes;  // values per unit
  constexpr int U = DQ_UNITS;
  static_assert(BLOCK % V == 0, "a unit lies in one block");
  typedef typename PackedWord<V>::type W;
  __shared__ float code[16];
  __shared__ float code2[NESTED ? 256 : 1];
  if (threadIdx.x < 16) code[threadIdx.x] = code_g[threadIdx.x];
  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = code2_g[i];
  __syncthreads();
  const float offset = NESTED ? __ldg(offset_p) : 0.0f;
  const u8* qabs = reinterpret_cast<const u8*>(absmax_v);
  const float* absmax = reinterpret_cast<const float*>(absmax_v);
  const W* words = reinterpret_cast<const W*>(packed);  // word t = the bytes of unit t
  const i64 nunits = (n + V - 1) / V;
  const i64 tile = (i64)blockDim.x * U;
  for (i64 base = (i64)blockIdx.x * tile; base < nunits; base += (i64)gridDim.x * tile) {
    if (vec_ok && (base + tile) * V <= n) {  // a full tile: every unit vectorized
      u32 p[U];
      float s[U];
      u32 q[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const i64 t = base + u * blockDim.x + threadIdx.x;
        const i64 qb = (i64)((u64)t * V / BLOCK);  // unsigned: a shift
        p[u] = __ldg(words + t);
        load_scale<NESTED>(absmax_v, absmax2, qb, q[u], s[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const i64 t = base + u * blockDim.x + threadIdx.x;
        const float scale = NESTED ? nested_scale(code2[q[u]], s[u], offset) : s[u];
        float out[V];
        decode_scaled<V>(p[u], code, scale, out);
        store_vec<DT, V>(y + t * V, out);
      }
    } else {  // the last tile, or unaligned data
      for (int u = 0; u < U; ++u) {
        const i64 t = base + u * blockDim.x + threadIdx.x;
        if (t >= nunits) break;
        const i64 i = t * V;
        const i64 qb = (i64)((u64)i / BLOCK);
        const float scale = NESTED ? nested_scale(code2[qabs[qb]], absmax2[qb >> 8], offset) : absmax[qb];
        if (vec_ok && i + V <= n) {
          float out[V];
          decode_scaled<V>(words[t], code, scale, out);
          store_vec<DT, V>(y + i, out);
        } else {
          for (int j = 0; j < V && i + j < n; ++j) {
            const u8 c = packed[(i + j) / 2];
            y[i + j] = from_f32<DT>(code[((i + j) & 1) ? (c & 15) : (c >> 4)] * scale);
          }
        }
      }
    }
  }
}

// Tile constants of matmul_4bit for MT rows of x (see the header). Few rows of x: one row
// of W per lane and 8 per CTA, so more CTAs stream W (memory-bound); more rows: two rows
// per lane, so each x value read from shared memory feeds two FMAs (FMA-bound). Shared
// memory for the staged x is MT * XS floats <= 36 KB; MIN_CTAS CTAs fit on an SM.
template <int MT> struct MatmulShape {
  enum { RN = MT <= 2 ? 1 : 2,                         // rows of W per lane: r, r + 8
         ROWS = 8 * RN,                                // rows of W per CTA
         MIN_CTAS = MT <= 2 ? 4 : 2,                   // launch bound: 64 or 128 registers
         UK = MT >= 16 ? 16 : 32,                      // columns per lane per step
         WORDS = UK / 8,                               // packed u32 words per row per step
         BS = (MM_THREADS / 32) * 4 * UK,              // columns per CTA step
         KC = MT >= 16 ? 512 : (MT >= 4 ? 1024 : 2048), // x columns staged at a time
         S = KC / BS,                                  // steps per chunk
         XS = KC + KC / 8 };                           // padded row stride (floats)
};

// Padded column of the staged x: 4 floats after every 32 columns.
__device__ __forceinline__ int xcol(int k) { return k + (k >> 5) * 4; }

// The 8 codes of packed word w (byte b: element 2b high nibble, 2b + 1 low) from the
// 16-entry table: 4 * nibble is each code's byte offset, and one byte permute per value
// extracts it from a word of four offsets (1.5 integer instructions per value, not 2).
__device__ __forceinline__ void decode_word(u32 w, const float* code, float* out) {
  const u32 hi = (w >> 2) & 0x3C3C3C3Cu;  // 4 * high nibble of each byte
  const u32 lo = (w << 2) & 0x3C3C3C3Cu;  // 4 * low nibble
  const char* base = reinterpret_cast<const char*>(code);
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    out[2 * b] = *reinterpret_cast<const float*>(base + __byte_perm(hi, 0u, 0x4440u + b));
    out[2 * b + 1] = *reinterpret_cast<const float*>(base + __byte_perm(lo, 0u, 0x4440u + b));
  }
}

// One row's packed words of one step: 16 bytes (UK = 32) or 8 bytes (UK = 16).
template <int WORDS>
__device__ __forceinline__ void load_words(const u8* __restrict__ p, u32 (&w)[WORDS]) {
  if (WORDS == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1 % WORDS] = v.y; w[2 % WORDS] = v.z; w[3 % WORDS] = v.w;
  } else {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1 % WORDS] = v.y;
  }
}

template <int DT, int MT, int NESTED>
__global__ void __launch_bounds__(MM_THREADS, MatmulShape<MT>::MIN_CTAS)
matmul_4bit(const typename Storage<DT>::type* __restrict__ x, const u8* __restrict__ packed,
            const void* __restrict__ absmax_v, const float* __restrict__ code_g,
            const float* __restrict__ code2_g, const float* __restrict__ absmax2,
            const float* __restrict__ offset_p, float offset_v,
            const typename Storage<DT>::type* __restrict__ bias, typename Storage<DT>::type* __restrict__ out,
            int M, int N, int K, int log2_block) {
  typedef MatmulShape<MT> Shape;
  constexpr int RN = Shape::RN, ROWS = Shape::ROWS;
  constexpr int UK = Shape::UK, WORDS = Shape::WORDS, BS = Shape::BS, KC = Shape::KC;
  constexpr int S = Shape::S, XS = Shape::XS;
  constexpr int XV = 16 / Storage<DT>::bytes;                     // x values per 16-byte load
  constexpr int XL = (MT * KC / XV + MM_THREADS - 1) / MM_THREADS; // x loads per thread per chunk
  static_assert(S >= 1 && KC % BS == 0, "a chunk is whole CTA steps");
  __shared__ __align__(16) float xs[MT * XS];
  __shared__ float code[16];
  __shared__ float code2[NESTED ? 256 : 1];
  if (threadIdx.x < 16) code[threadIdx.x] = code_g[threadIdx.x];
  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = code2_g[i];
  const float offset = NESTED ? (offset_p ? __ldg(offset_p) : offset_v) : 0.0f;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane & 3, r = lane >> 2;
  const int n0 = blockIdx.x * ROWS;
  int rows[RN];
#pragma unroll
  for (int i = 0; i < RN; ++i) rows[i] = n0 + r + 8 * i;

  // Weights and scale inputs of the S steps of one chunk: the lane's columns of step s start
  // at kc + s * BS + (4 * warp + g) * UK. Columns past K or rows past N load nothing.
  u32 wn[S][RN][WORDS];
  float an[S][RN];  // absmax, or absmax2 when NESTED
  u32 qn[S][RN];    // nested absmax code
  auto load_chunk_weights = [&](int kc) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int k = kc + s * BS + (4 * warp + g) * UK;
#pragma unroll
      for (int i = 0; i < RN; ++i) {
#pragma unroll
        for (int j = 0; j < WORDS; ++j) wn[s][i][j] = 0u;
        an[s][i] = 0.0f;
        qn[s][i] = 0u;
        if (k < K && rows[i] < N) {
          const i64 e = (i64)rows[i] * K + k;  // flat element index
          const i64 blk = e >> log2_block;
          load_words<WORDS>(packed + (e >> 1), wn[s][i]);
          load_scale<NESTED>(absmax_v, absmax2, blk, qn[s][i], an[s][i]);
        }
      }
    }
  };
  // x columns [kc, kc + KC) of rows < M as raw 16-byte vectors; item v of the chunk is
  // row v / (KC / XV), columns (v % (KC / XV)) * XV.
  uint4 xr[XL];
  auto load_chunk_x = [&](int kc) {
#pragma unroll
    for (int j = 0; j < XL; ++j) {
      const u32 v = threadIdx.x + j * MM_THREADS;
      const int m = v / (KC / XV), c = (v % (KC / XV)) * XV;
      xr[j] = make_uint4(0u, 0u, 0u, 0u);
      if (m < M && kc + c < K)
        xr[j] = __ldg(reinterpret_cast<const uint4*>(x + (i64)m * K + kc + c));
    }
  };
  auto store_chunk_x = [&](int kc) {
#pragma unroll
    for (int j = 0; j < XL; ++j) {
      const u32 v = threadIdx.x + j * MM_THREADS;
      const int m = v / (KC / XV), c = (v % (KC / XV)) * XV;
      if (m < M && kc + c < K) {
        float f[XV];
        raw16_to_f32<DT>(xr[j], f);
        float* dst = xs + m * XS + xcol(c);  // XV <= 8 columns: never across a pad
#pragma unroll
        for (int h = 0; h < XV; h += 4)
          *reinterpret_cast<float4*>(dst + h) = make_float4(f[h], f[h + 1], f[h + 2], f[h + 3]);
      }
    }
  };

  float acc[RN][MT];
#pragma unroll
  for (int i = 0; i < RN; ++i)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[i][m] = 0.0f;

  load_chunk_weights(0);
  load_chunk_x(0);
  for (int kc = 0; kc < K; kc += KC) {
    u32 wc[S][RN][WORDS];
    float ac[S][RN];
    u32 qc[S][RN];
#pragma unroll
    for (int s = 0; s < S; ++s)
#pragma unroll
      for (int i = 0; i < RN; ++i) {
        ac[s][i] = an[s][i];
        qc[s][i] = qn[s][i];
#pragma unroll
        for (int j = 0; j < WORDS; ++j) wc[s][i][j] = wn[s][i][j];
      }
    __syncthreads();  // the previous chunk's x is no longer read (and the tables are staged)
    store_chunk_x(kc);
    if (kc + KC < K) {
      load_chunk_x(kc + KC);
      load_chunk_weights(kc + KC);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int kk = s * BS + (4 * warp + g) * UK;  // column within the chunk
      if (kc + kk >= K) continue;
      float scale[RN];
#pragma unroll
      for (int i = 0; i < RN; ++i)
        scale[i] = NESTED ? nested_scale(code2[qc[s][i]], ac[s][i], offset) : ac[s][i];
#pragma unroll
      for (int h = 0; h < UK / 16; ++h) {  // 16 columns at a time: two packed words per row
        float wv[RN][16];
#pragma unroll
        for (int i = 0; i < RN; ++i) {
          decode_word(wc[s][i][2 * h], code, wv[i]);
          decode_word(wc[s][i][2 * h + 1], code, wv[i] + 8);
        }
        const float* xrow = xs + xcol(kk + 16 * h);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if (m < M) {
            float part[RN];
#pragma unroll
            for (int i = 0; i < RN; ++i) part[i] = 0.0f;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const float4 x4 = *reinterpret_cast<const float4*>(xrow + m * XS + 4 * q);
#pragma unroll
              for (int i = 0; i < RN; ++i) {
                part[i] = fmaf(wv[i][4 * q], x4.x, part[i]);
                part[i] = fmaf(wv[i][4 * q + 1], x4.y, part[i]);
                part[i] = fmaf(wv[i][4 * q + 2], x4.z, part[i]);
                part[i] = fmaf(wv[i][4 * q + 3], x4.w, part[i]);
              }
            }
#pragma unroll
            for (int i = 0; i < RN; ++i) acc[i][m] = fmaf(part[i], scale[i], acc[i][m]);
          }
        }
      }
    }
  }

  // the 4 g lanes of a row, then the 8 warps, in a fixed order
#pragma unroll
  for (int i = 0; i < RN; ++i)
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) {
        acc[i][m] += __shfl_xor_sync(0xffffffffu, acc[i][m], 1);
        acc[i][m] += __shfl_xor_sync(0xffffffffu, acc[i][m], 2);
      }
  __syncthreads();  // xs is free: it holds the partials red[warp][row][m]
  float* red = xs;
  if (g == 0)
#pragma unroll
    for (int i = 0; i < RN; ++i)
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) red[(warp * ROWS + r + 8 * i) * MT + m] = acc[i][m];
  __syncthreads();
  for (int e = threadIdx.x; e < ROWS * M; e += blockDim.x) {
    const int row = e % ROWS, m = e / ROWS;
    const int n = n0 + row;
    if (n < N) {
      float sum = 0.0f;
      for (int w = 0; w < MM_THREADS / 32; ++w) sum += red[(w * ROWS + row) * MT + m];
      const float b = bias ? to_f32<DT>(bias[n]) : 0.0f;
      out[(i64)m * N + n] = from_f32<DT>(sum + b);
    }
  }
}


template <int DT, int NESTED, int R, int TW>
__global__ void __launch_bounds__(32 * TW)
gemv_4bit(const typename Storage<DT>::type* __restrict__ x, const u8* __restrict__ packed,
          const void* __restrict__ absmax_v, const float* __restrict__ code_g,
          const float* __restrict__ code2_g, const float* __restrict__ absmax2,
          const float* __restrict__ offset_p, float offset_v,
          const typename Storage<DT>::type* __restrict__ bias, typename Storage<DT>::type* __restrict__ out,
          int M, int N, int K, int log2_block) {  // M == 1 (matmul_4bit's arguments)
  constexpr int T = 32 * TW;
  constexpr int XV = 16 / Storage<DT>::bytes;  // x values per 16-byte load
  __shared__ float code[16];
  __shared__ float code2[NESTED ? 256 : 1];
  __shared__ float red[TW][R];
  if (threadIdx.x < 16) code[threadIdx.x] = code_g[threadIdx.x];
  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = code2_g[i];
  __syncthreads();
  const float offset = NESTED ? (offset_p ? __ldg(offset_p) : offset_v) : 0.0f;
  const int n0 = blockIdx.x * R;
  const int chunks = K >> 5;

  float acc[R];
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i] = 0.0f;
  for (int c = threadIdx.x; c < chunks; c += T) {
    uint4 w[R];
    float a[R];
    u32 q[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      w[i] = make_uint4(0u, 0u, 0u, 0u);
      a[i] = 0.0f;
      q[i] = 0u;
      if (n0 + i < N) {
        const i64 e = (i64)(n0 + i) * K + 32 * c;  // flat element index of the chunk
        const i64 blk = e >> log2_block;             // blocksize >= 32: one block per chunk
        w[i] = __ldg(reinterpret_cast<const uint4*>(packed + (e >> 1)));
        load_scale<NESTED>(absmax_v, absmax2, blk, q[i], a[i]);
      }
    }
    float xv[32];
#pragma unroll
    for (int h = 0; h < 32 / XV; ++h) {
      float f[XV];
      raw16_to_f32<DT>(__ldg(reinterpret_cast<const uint4*>(x + 32 * c + h * XV)), f);
#pragma unroll
      for (int j = 0; j < XV; ++j) xv[h * XV + j] = f[j];
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const u32 words[4] = {w[i].x, w[i].y, w[i].z, w[i].w};
      float part[4];  // one per packed word: short chains (accuracy) and independent FMAs
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float wv[8];
        decode_word(words[j], code, wv);
        part[j] = wv[0] * xv[8 * j];
#pragma unroll
        for (int b = 1; b < 8; ++b) part[j] = fmaf(wv[b], xv[8 * j + b], part[j]);
      }
      const float scale = NESTED ? nested_scale(code2[q[i]], a[i], offset) : a[i];
      acc[i] = fmaf((part[0] + part[1]) + (part[2] + part[3]), scale, acc[i]);
    }
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    if (lane == 0) red[warp][i] = acc[i];
  }
  __syncthreads();
  if (threadIdx.x < R && n0 + (int)threadIdx.x < N) {
    const int n = n0 + threadIdx.x;
    float sum = 0.0f;
#pragma unroll
    for (int v = 0; v < TW; ++v) sum += red[v][threadIdx.x];
    const float b = bias ? to_f32<DT>(bias[n]) : 0.0f;
    out[n] = from_f32<DT>(sum + b);
  }
}
