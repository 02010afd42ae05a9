// The 4-bit matmul on tensor cores, for 2-64 rows of x. Reference: reference/fourbit.py
// matmul_4bit. Launcher: _cupy.py (mma_launch_shape, _mma_function, matmul_4bit_torch,
// PreparedWeight4bit.matmul; choose_kernel picks it).
//
// matmul_4bit_mma<DT, NT, NESTED>
//   in:  x (M, K) of DT (1 = float16, 2 = bfloat16; common.cuh) row-major, M <= 8 * NT, any
//        2-byte aligned address (x_vec = 1 when x is 16-byte aligned: cp.async staging, else
//        element loads); packed weight W (N, K), flattened row-major, two codes a byte (element
//        2i in the high nibble of byte i), K % 32 == 0, 16-byte aligned; the scale of flat
//        element e is absmax[e >> log2_block] (float32), or with NESTED
//        f32(code2[qabs[blk]] * absmax2[blk >> 8]) + offset (offset_p, or offset_v when
//        offset_p is null), exactly as dequantize_4bit; code float32 (16,); bias (N,) of DT
//        or null. With gridDim.y = S > 1 (split-K): ws float32 (gridDim.x, S, M, R) (R rows
//        of W per CTA), counters u32 (gridDim.x,) zeroed before the launch.
//   out: y (M, N) of DT = x @ W^T + bias, float32 accumulation, rounded once.
//
//   Each weight is decoded once, in registers, exactly as dequantize_4bit decodes it to DT:
//   f32(code[nibble] * scale) rounded to DT, so the tensor cores see the same W as
//   ``linear(x, dequantize_4bit(W, dtype=x.dtype))`` and differ from it only in the order of
//   the float32 sums. W is the MMA's A operand (16 rows of W per m16 tile), x^T its B operand
//   (8 rows of x per n8 tile: NT tiles), so D = W x^T holds out^T.
//
//   mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16} fragments (PTX ISA), lane = 4 g + t
//   (g = groupID = lane >> 2, t = threadID_in_group = lane & 3):
//     A (16 x 16, row): 4 .b32 registers, each two 16-bit values, the lower-indexed one in
//       the low half: reg0 = (a0, a1) row g,     cols 2t, 2t+1
//                     reg1 = (a2, a3) row g + 8, cols 2t, 2t+1
//                     reg2 = (a4, a5) row g,     cols 2t+8, 2t+9
//                     reg3 = (a6, a7) row g + 8, cols 2t+8, 2t+9
//     B (16 x 8, col): reg0 = (b0, b1) rows (k) 2t, 2t+1, col (n) g
//                      reg1 = (b2, b3) rows 2t+8, 2t+9, col g
//     C/D (16 x 8, f32): c0, c1 row g, cols 2t, 2t+1; c2, c3 row g + 8, cols 2t, 2t+1.
//   A dot product does not depend on the order of k, so each k16 step permutes its 16 k
//   alike in A and B: lane t's four k slots {2t, 2t+1, 2t+8, 2t+9} hold four consecutive
//   k: base_t + {0, 1, 2, 3}. Then one packed byte gives (a0, a1) (high, low nibble) and the
//   next byte (a4, a5), and x's 8 bytes at base_t are (b0, b1), (b2, b3) as stored.
//
//   Tiles. A CTA of 8 warps owns R = 128 * WT rows of W (warp w: rows 16 WT w .. + 16 WT, WT
//   m16 tiles) and the k range of its split (blockIdx.y), walked in chunks of KC = 256. In a
//   chunk, lane (g, t) owns, for each of its rows (g and g + 8 of each m16 tile), the two
//   32-column pieces h = 0, 1 at chunk + 128 h + 32 t: 16 packed bytes each (one 16-byte
//   load; the 4 lanes of a row read 64 contiguous bytes) and one scale each (a piece lies
//   in one quantization block: blocksize >= 32 and 32 | K). Piece h, word jp (4 bytes = 8
//   columns at + 8 jp) feeds k16 steps (h, jp, lo) with columns + 0..3 and (h, jp, hi) with
//   + 4..7. x: the chunk's 8 NT rows x 256 columns are staged in shared memory (cp.async,
//   3 buffers) in fragment order: 16-byte slot ((nt * 2 + h) * 4 + jp) * 32 + lane holds x
//   row 8 nt + g, columns chunk + 128 h + 32 t + 8 jp .. + 8, i.e. B of steps (h, jp, lo)
//   (.x, .y) and (h, jp, hi) (.z, .w), one conflict-free 16-byte load per lane. Rows >= M
//   and columns >= the split's end are zero in x and in W (so a non-finite x elsewhere
//   cannot leak into a kept output). W's words and scales for the next chunk load while
//   this chunk computes.
//   End: the accumulators go through shared memory (out^T tile, rows padded by 4 floats
//   against bank conflicts) to coalesced rows of out: with S = 1, + bias, rounded to DT;
//   with S > 1, each CTA's M x R tile to its slot of ws (16-byte stores), and the last CTA
//   of each row block (a counter) sums the S tiles in split order (deterministic: its own
//   from shared memory, the others with 16-byte L2 loads, several in flight), adds bias
//   and rounds.
#include "common.cuh"

#define MMA_THREADS 256
#define MMA_KC 256      // columns per chunk
#define MMA_STAGES 3    // x staging buffers

// Shapes of matmul_4bit_mma for NT n8 tiles of x rows (mirrored in _cupy.py _mma_tile).
template <int NT> struct MmaShape {
  enum { WT = NT >= 4 ? 2 : 1,              // m16 tiles of W per warp
         R = 8 * 16 * WT,                   // rows of W per CTA
         MIN_CTAS = NT >= 4 ? 1 : 2,        // launch bound (<= 255 / 128 registers)
         XSTAGE = NT * 8 * MMA_KC * 2,      // bytes of one staged x chunk
         RS = R + 4,                        // epilogue tile row stride (floats)
         SMEM = MMA_STAGES * XSTAGE };      // dynamic shared memory (bytes)
};

// --- PTX wrappers (tests/test_fourbit_mma_emulated.py swaps this block for host code) ---
__device__ __forceinline__ u32 mma_smem_u32(const void* p) {  // shared-window address
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// 16 bytes global -> shared, asynchronously; src_bytes 0 fills the 16 bytes with zeros.
__device__ __forceinline__ void mma_cp_async16(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void mma_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void mma_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// L2 load (not L1: another CTA wrote it) of 4 split-K partials.
__device__ __forceinline__ float4 mma_ld_cg4(const float4* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p)
               : "memory");
  return v;
}

// Two float32 values rounded (to nearest even) to DT and packed: lo in the low 16 bits.
template <int DT> __device__ __forceinline__ u32 mma_pack(float lo, float hi);
template <> __device__ __forceinline__ u32 mma_pack<QK_DT_F16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ u32 mma_pack<QK_DT_BF16>(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// d += A (16 x 16) B (16 x 8), float32 accumulators; fragments as in the header.
template <int DT> __device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1);
template <> __device__ __forceinline__ void mma_16816<QK_DT_F16>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<QK_DT_BF16>(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// --- end of PTX wrappers ---

// The 8 codes of packed word w (byte b: element 2b in the high nibble, 2b + 1 in the low)
// from the 16-entry table in shared memory (fourbit.cu decode_word: 4 * nibble is each
// code's byte offset, one byte permute per value extracts it).
__device__ __forceinline__ void mma_decode_word(u32 w, const float* code, float (&out)[8]) {
  const u32 hi = (w >> 2) & 0x3C3C3C3Cu;  // 4 * high nibble of each byte
  const u32 lo = (w << 2) & 0x3C3C3C3Cu;  // 4 * low nibble
  const char* base = reinterpret_cast<const char*>(code);
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    out[2 * b] = *reinterpret_cast<const float*>(base + __byte_perm(hi, 0u, 0x4440u + b));
    out[2 * b + 1] = *reinterpret_cast<const float*>(base + __byte_perm(lo, 0u, 0x4440u + b));
  }
}

__device__ __forceinline__ u32 mma_word(const uint4& v, int i) {  // i a compile-time constant
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

template <int DT, int NT, int NESTED>
__global__ void __launch_bounds__(MMA_THREADS, MmaShape<NT>::MIN_CTAS)
matmul_4bit_mma(const u16* __restrict__ x, const u8* __restrict__ packed, const void* __restrict__ absmax_v,
                const float* __restrict__ code_g, const float* __restrict__ code2_g,
                const float* __restrict__ absmax2, const float* __restrict__ offset_p, float offset_v,
                const u16* __restrict__ bias, u16* __restrict__ out, float* __restrict__ ws,
                u32* __restrict__ counters, int M, int N, int K, int log2_block, int cps, int x_vec) {
  static_assert(DT == QK_DT_F16 || DT == QK_DT_BF16, "the tensor-core kernel takes float16 or bfloat16 x");
  typedef MmaShape<NT> Shape;
  constexpr int WT = Shape::WT, R = Shape::R, RS = Shape::RS, XSTAGE = Shape::XSTAGE;
  static_assert(8 * NT * RS * 4 <= Shape::SMEM, "the epilogue tile fits in the staging buffers");
  static_assert(NT * 8 * (MMA_KC / 8) == NT * MMA_THREADS, "x staging: NT 16-byte items per thread");
  extern __shared__ __align__(16) unsigned char mma_smem[];
  __shared__ float code[16];
  __shared__ float code2[NESTED ? 256 : 1];
  __shared__ u32 last_cta;
  if (threadIdx.x < 16) code[threadIdx.x] = code_g[threadIdx.x];
  if (NESTED)
    for (int i = threadIdx.x; i < 256; i += MMA_THREADS) code2[i] = code2_g[i];
  const float offset = NESTED ? (offset_p ? __ldg(offset_p) : offset_v) : 0.0f;
  __syncthreads();  // the tables are read before the main loop's first barrier

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * R;
  const int kb = blockIdx.y * cps * MMA_KC;                 // this split's columns [kb, ke)
  const int ke = min(K, kb + cps * MMA_KC);
  const int nchunks = (ke - kb + MMA_KC - 1) / MMA_KC;      // >= 1: the launcher leaves no split empty
  int rows[WT][2];                                          // rows[wt][rr]: W row of g + 8 rr in tile wt
#pragma unroll
  for (int wt = 0; wt < WT; ++wt)
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) rows[wt][rr] = n0 + warp * 16 * WT + 16 * wt + g + 8 * rr;

  // W pieces of chunk c: words, absmax (or absmax2) and nested code; q = 256 marks a piece
  // outside W (row >= N or column >= ke), whose scale is 0.
  uint4 wn[WT][2][2];
  float an[WT][2][2];
  u32 qn[WT][2][2];
  auto load_w = [&](int c) {
    const int kc = kb + c * MMA_KC;
#pragma unroll
    for (int wt = 0; wt < WT; ++wt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int k = kc + 128 * h + 32 * t;
          wn[wt][rr][h] = make_uint4(0u, 0u, 0u, 0u);
          an[wt][rr][h] = 0.0f;
          qn[wt][rr][h] = 256u;
          if (rows[wt][rr] < N && k < ke) {
            const i64 e = (i64)rows[wt][rr] * K + k;  // flat element index (even)
            const i64 blk = e >> log2_block;
            wn[wt][rr][h] = __ldg(reinterpret_cast<const uint4*>(packed + (e >> 1)));
            if (NESTED) {
              qn[wt][rr][h] = __ldg(reinterpret_cast<const u8*>(absmax_v) + blk);
              an[wt][rr][h] = __ldg(absmax2 + (blk >> 8));
            } else {
              qn[wt][rr][h] = 0u;
              an[wt][rr][h] = __ldg(reinterpret_cast<const float*>(absmax_v) + blk);
            }
          }
        }
  };

  // x columns [kc, kc + 256) of rows 0 .. 8 NT - 1 into staging buffer buf (fragment order,
  // see the header). Item q of the chunk: row q / 32, 16-byte vector q % 32 of that row, so
  // consecutive threads read consecutive global bytes.
  auto stage_x = [&](int c, int buf) {
    const int kc = kb + c * MMA_KC;
    unsigned char* dst = mma_smem + buf * XSTAGE;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int q = threadIdx.x + i * MMA_THREADS;
      const int m = q >> 5, v = q & 31;
      const int h = v >> 4, tt = (v >> 2) & 3, jp = v & 3;  // column 8 v = 128 h + 32 tt + 8 jp
      const int slot = (((m >> 3) * 2 + h) * 4 + jp) * 32 + (m & 7) * 4 + tt;
      const int k = kc + 8 * v;
      const bool valid = m < M && k < ke;  // 8 | ke: a vector is all in or all out
      const u16* src = x + (i64)m * K + k;
      if (x_vec) {
        mma_cp_async16(mma_smem_u32(dst + slot * 16), valid ? (const void*)src : (const void*)x, valid);
      } else {
        u32 w[4] = {0u, 0u, 0u, 0u};
        if (valid) {
#pragma unroll
          for (int j = 0; j < 4; ++j) w[j] = (u32)src[2 * j] | ((u32)src[2 * j + 1] << 16);
        }
        *reinterpret_cast<uint4*>(dst + slot * 16) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  };

  float acc[WT][NT][4];
#pragma unroll
  for (int wt = 0; wt < WT; ++wt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[wt][nt][0] = acc[wt][nt][1] = acc[wt][nt][2] = acc[wt][nt][3] = 0.0f;

  load_w(0);
#pragma unroll
  for (int c = 0; c < MMA_STAGES - 1; ++c) {
    if (c < nchunks) stage_x(c, c);
    mma_cp_async_commit();  // one group per chunk index, empty or not
  }
  for (int c = 0; c < nchunks; ++c) {
    uint4 wc[WT][2][2];
    float sc[WT][2][2];
#pragma unroll
    for (int wt = 0; wt < WT; ++wt)
#pragma unroll
      for (int rr = 0; rr < 2; ++rr)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wc[wt][rr][h] = wn[wt][rr][h];
          const u32 q = qn[wt][rr][h];
          sc[wt][rr][h] = q < 256u ? (NESTED ? __fadd_rn(__fmul_rn(code2[q], an[wt][rr][h]), offset)
                                             : an[wt][rr][h])
                                   : 0.0f;
        }
    if (c + 1 < nchunks) load_w(c + 1);
    mma_cp_async_wait<MMA_STAGES - 2>();  // this thread's copies of chunk c have landed
    __syncthreads();                      // everyone's have; everyone is done with chunk c - 1
    if (c + MMA_STAGES - 1 < nchunks) stage_x(c + MMA_STAGES - 1, (c + MMA_STAGES - 1) % MMA_STAGES);
    mma_cp_async_commit();
    const uint4* xs = reinterpret_cast<const uint4*>(mma_smem + (c % MMA_STAGES) * XSTAGE);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        u32 alo[WT][4], ahi[WT][4];  // A of the k16 steps (h, jp, lo) and (h, jp, hi)
#pragma unroll
        for (int wt = 0; wt < WT; ++wt)
#pragma unroll
          for (int rr = 0; rr < 2; ++rr) {
            float f[8];
            mma_decode_word(mma_word(wc[wt][rr][h], jp), code, f);
            const float s = sc[wt][rr][h];
            alo[wt][rr] = mma_pack<DT>(f[0] * s, f[1] * s);      // slots 2t, 2t+1: columns + 0, 1
            alo[wt][2 + rr] = mma_pack<DT>(f[2] * s, f[3] * s);  // slots 2t+8, 2t+9: + 2, 3
            ahi[wt][rr] = mma_pack<DT>(f[4] * s, f[5] * s);      // + 4, 5
            ahi[wt][2 + rr] = mma_pack<DT>(f[6] * s, f[7] * s);  // + 6, 7
          }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint4 b = xs[((nt * 2 + h) * 4 + jp) * 32 + lane];
#pragma unroll
          for (int wt = 0; wt < WT; ++wt) {
            mma_16816<DT>(acc[wt][nt], alo[wt], b.x, b.y);
            mma_16816<DT>(acc[wt][nt], ahi[wt], b.z, b.w);
          }
        }
      }
  }
  mma_cp_async_wait<0>();
  __syncthreads();  // the staging buffers are free: they hold the out^T tile red[m][r]

  float* red = reinterpret_cast<float*>(mma_smem);
#pragma unroll
  for (int wt = 0; wt < WT; ++wt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int r = warp * 16 * WT + 16 * wt + g;  // D rows g, g + 8: W rows
      const int m = 8 * nt + 2 * t;                // D cols 2t, 2t + 1: x rows
      red[m * RS + r] = acc[wt][nt][0];
      red[(m + 1) * RS + r] = acc[wt][nt][1];
      red[m * RS + r + 8] = acc[wt][nt][2];
      red[(m + 1) * RS + r + 8] = acc[wt][nt][3];
    }
  __syncthreads();
  const int S = gridDim.y;
  if (S == 1) {
    for (int e = threadIdx.x; e < M * R; e += MMA_THREADS) {
      const int m = e / R, r = e % R, n = n0 + r;
      if (n < N) {
        const float b = bias ? to_f32<DT>(bias[n]) : 0.0f;
        out[(i64)m * N + n] = from_f32<DT>(red[m * RS + r] + b);
      }
    }
    return;
  }
  // split-K: this CTA's M x R partial tile, as float4 (R / 4 per row), to its slot of ws
  // (row block, split), then the last CTA of the row block sums the S tiles in split order
  constexpr int V = R / 4;
  float4* tiles = reinterpret_cast<float4*>(ws) + (i64)blockIdx.x * S * M * V;
  for (int e = threadIdx.x; e < M * V; e += MMA_THREADS)
    tiles[(i64)blockIdx.y * M * V + e] = *reinterpret_cast<const float4*>(red + (e / V) * RS + 4 * (e % V));
  __threadfence();  // this CTA's partials are visible device-wide before its count
  __syncthreads();
  if (threadIdx.x == 0) last_cta = atomicAdd(counters + blockIdx.x, 1u) == (u32)(S - 1);
  __syncthreads();
  if (!last_cta) return;
  __threadfence();
  constexpr int U = 4;  // float4 per thread per pass: U * (S - 1) loads in flight
  for (int e0 = threadIdx.x; e0 < M * V; e0 += U * MMA_THREADS) {
    float4 sum[U];
#pragma unroll
    for (int u = 0; u < U; ++u) sum[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 2
    for (int s = 0; s < S; ++s) {
      float4 p[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int e = e0 + u * MMA_THREADS;
        p[u] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (e < M * V)  // its own tile from shared memory: the same value, the same order
          p[u] = s == (int)blockIdx.y ? *reinterpret_cast<const float4*>(red + (e / V) * RS + 4 * (e % V))
                                      : mma_ld_cg4(tiles + (i64)s * M * V + e);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        sum[u].x += p[u].x;
        sum[u].y += p[u].y;
        sum[u].z += p[u].z;
        sum[u].w += p[u].w;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int e = e0 + u * MMA_THREADS;
      if (e < M * V) {
        const int m = e / V, n = n0 + 4 * (e % V);
        const float v[4] = {sum[u].x, sum[u].y, sum[u].z, sum[u].w};
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (n + c < N) {
            const float b = bias ? to_f32<DT>(bias[n + c]) : 0.0f;
            out[(i64)m * N + n + c] = from_f32<DT>(v[c] + b);
          }
      }
    }
  }
}
