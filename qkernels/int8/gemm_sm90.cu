// The int8 GEMM with a fused dequantizing epilogue on Hopper tensor cores (wgmma, sm_90a).
// Reference: reference/int8.py (int8_matmul_*_dequantize, int8_linear_matmul). Launcher: the
// lead's launch_gemm in _cupy.py; standalone check and timing: /work/briefs/h7_bench.py.
// Build: NVRTC with -arch=sm_90a (wgmma does not exist on plain sm_90). Same arguments and the
// same first five template parameters as int8_gemm in int8.cu (a different grid: see below),
// which stays the fallback off Hopper, for K % 16 != 0 and for operand bases that are not
// 16-byte aligned (this kernel requires both).
//
// int8_gemm_sm90<ODT, RDT, CDT, BDT, CGLOBAL, BN, BK, STAGES>
//   in:  A int8 (M, K) row-major (lda = K), B int8 (N, K) row-major (ldb = K): out = A @ B^T.
//        row_scale (M,) RDT, col_scale (N,) CDT or one value (CGLOBAL), bias (N,) BDT (-1: none).
//   out: (M, N) ODT row-major: ((f32(acc) * r) * c) * K (+ bias), each op rounded, no FMA, then
//        rounded once to ODT, as int8_gemm does; or the int32 acc itself (ODT = 3).
//   Persistent CTAs of 256 threads = 2 warpgroups; launch min(tiles, SMs * CTAs per SM) of them
//   (1 per SM for BN = 256, 2 for BN = 128), 1-D grid, dynamic shared memory as below. CTA b
//   computes the 128 x BN output tiles b, b + gridDim.x, ... in a grouped raster (8 M-tiles
//   share each B panel while it is in L2). Warpgroup w owns tile rows 64 w .. 64 w + 63 and all
//   BN columns: one wgmma.m64nBNk32.s32.s8.s8 per 32-deep k step, both operands read from
//   shared memory through matrix descriptors, BN / 2 int32 accumulators per thread.
//   K is walked in BK-deep blocks (BK = 128 or 64 bytes) through a STAGES-deep ring of shared
//   stages [A tile 128 x BK | B tile BN x BK], both K-major: tile row r is BK contiguous bytes
//   and its 16-byte chunks are XOR-swizzled the way wgmma's BK-byte swizzle mode reads them
//   (128B: chunk ^ (r & 7); 64B: chunk ^ ((r >> 1) & 3); i.e. address bits [4, 7) ^= bits
//   [7, 10) within a 1024-byte-aligned atom). Every thread fills its share of a stage with
//   16-byte cp.async (zero-filled past M, N and K), STAGES - 2 blocks ahead of the block being
//   multiplied; one __syncthreads per block both publishes the block that landed and retires
//   the stage the wgmmas of two blocks ago read. The wgmmas of one block run while the next
//   block's loads are issued and waited for (wgmma.wait_group 1), so the tensor cores always
//   have the current block queued. The next tile's first STAGES - 2 blocks load while this
//   tile's epilogue runs.
//   Shared memory: STAGES * (128 + BN) * BK bytes + 1 KB for alignment; the defaults (256,
//   128, 4) take 193 KB (1 CTA per SM); (128, 128, 3) takes 97 KB (2 CTAs per SM).
//   Epilogue on the accumulator registers; the int32 product never reaches memory. 16-bit
//   outputs go through the two ring stages that the next tile's prologue leaves free (the
//   tile's rows BN * 2 + 16 bytes apart) and leave in coalesced 16-byte stores; float32 and
//   int32 outputs (and BK = 64, whose two stages are too small) are stored from the registers
//   as pairs of adjacent columns.
//   Traffic per CTA and block: (128 + BN) * BK bytes from L2 for 2 * 128 * BN * BK ops.
//   OUTL (LLM.int8()'s outlier columns, torch_ops/linear8bit.py): x (M, K) row-major in ODT's
//   storage (the activations A was quantized from, float16 / bfloat16 / float32), idx int64
//   (K,) whose first *count entries are the outlier columns (outlier_cols in int8.cu, which
//   zeroed those columns of A), count int32 on the device: the epilogue adds
//   (s * c) * f32(1/127) after the bias, s = sum_j x[row, idx[j]] * B[col, idx[j]] in float32
//   (see outlier_sums), before the one rounding to ODT. No host synchronization: the count is
//   read here. The first 16 columns' weight values are staged in BN * 48 more bytes of shared
//   memory per tile (stage_w_outliers). !OUTL ignores the three pointers (the kernel of
//   threshold 0, unchanged).
#include "common.cuh"

#ifndef QK_KDEQ
#define QK_KDEQ __int_as_float(0x38820610)     // f32(1/(127*127)), as in int8.cu
#endif
#define QK_INV127 __int_as_float(0x3c010204)   // f32(1/127)

namespace qk_sm90 {

typedef unsigned long long u64;

constexpr int BM = 128;
constexpr int THREADS = 256;

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory"); }

// cp.async writes shared memory through the generic proxy and wgmma reads it through the async
// proxy; the PTX ISA asks for a proxy fence between the two, so each writer fences before the
// barrier that hands the stage to the tensor cores. (CUTLASS's and Triton's cp.async + wgmma
// pipelines omit it; -DQK_SM90_PROXY_FENCE=0 does too, for timing the difference.)
#ifndef QK_SM90_PROXY_FENCE
#define QK_SM90_PROXY_FENCE 1
#endif
__device__ __forceinline__ void fence_proxy_async() {
#if QK_SM90_PROXY_FENCE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Pins the accumulators after wgmma.wait_group: the compiler may not read them earlier.
template <int R>
__device__ __forceinline__ void fence_acc(int (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i]) :: "memory");
}

// Shared-memory matrix descriptor of a K-major tile: 8-row core groups SBO = 8 * BK bytes
// apart, swizzle mode BK bytes (128B: 1, 64B: 2), leading offset unused for K-major swizzled
// layouts (1 by convention). The tile starts on a swizzle-atom boundary (base offset 0).
template <int BK>
__device__ __forceinline__ u64 make_desc(u32 saddr) {
  constexpr u64 mode = BK == 128 ? 1 : 2;
  return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)((8 * BK) >> 4) << 32) | (mode << 62);
}

// byte offset of 16-byte chunk `ch` of row `r` in a K-major tile of BK-byte rows
template <int BK>
__device__ __forceinline__ int swz(int r, int ch) {
  const int off = r * BK + ch * 16;
  return off ^ (((off >> 7) & (BK / 16 - 1)) << 4);
}

#define QK_R8(i) "+r"(d[i]), "+r"(d[i + 1]), "+r"(d[i + 2]), "+r"(d[i + 3]), \
                 "+r"(d[i + 4]), "+r"(d[i + 5]), "+r"(d[i + 6]), "+r"(d[i + 7])
#define QK_R32(i) QK_R8(i), QK_R8(i + 8), QK_R8(i + 16), QK_R8(i + 24)

// d (64 x 128 per warpgroup, int32) += A (64 x 32, desc a) * B (128 x 32, desc b)^T
__device__ __forceinline__ void wgmma_s8(int (&d)[64], u64 a, u64 b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"
      " %64, %65, p;\n}\n"
      : QK_R32(0), QK_R32(32)
      : "l"(a), "l"(b)
      : "memory");
}

// d (64 x 256 per warpgroup, int32) += A (64 x 32, desc a) * B (256 x 32, desc b)^T
__device__ __forceinline__ void wgmma_s8(int (&d)[128], u64 a, u64 b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127},"
      " %128, %129, p;\n}\n"
      : QK_R32(0), QK_R32(32), QK_R32(64), QK_R32(96)
      : "l"(a), "l"(b)
      : "memory");
}

#undef QK_R32
#undef QK_R8

// --- the outlier columns' float product (OUTL) ---------------------------------------------
// d += A (16 x 16, row-major) * B (16 x 8, column-major), float32 accumulators; A and B as
// pairs of 16-bit values, f16 or bf16.
template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if constexpr (BF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// x in 16-bit terms for the tensor cores: float16 / bfloat16 as they are (one term); float32
// as three bfloat16 terms h + m + l that add up to it exactly (8 + 8 + 8 significand bits),
// so every product with an int8 weight is exact in the float32 accumulators.
template <int XDT> struct XTerms {
  static constexpr int N = XDT == QK_DT_F32 ? 3 : 1;
  static constexpr bool BF16 = XDT != QK_DT_F16;
};

template <int XDT>
__device__ __forceinline__ void split_x(const void* __restrict__ x, i64 off, bool ok,
                                        u32 (&v)[XTerms<XDT>::N]) {
  if constexpr (XDT == QK_DT_F32) {
    float f = ok ? reinterpret_cast<const float*>(x)[off] : 0.0f;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const u16 h = f32_to_bf16(f);
      v[i] = h;
      f = __fsub_rn(f, bf16_to_f32(h));
    }
  } else {
    v[0] = ok ? reinterpret_cast<const u16*>(x)[off] : 0u;
  }
}

// The A fragments (all terms) of x rows row0 / row1 at the chunk's four column pairs: k =
// 2t, 2t + 1 (regs 0, 1) and 2t + 8, 2t + 9 (regs 2, 3) of the mma's 16 k. col[i] < 0: absent.
template <int XDT>
__device__ __forceinline__ void x_frags(const void* __restrict__ x, int M, int K, int row0, int row1,
                                        const long long (&col)[4], u32 (&a)[XTerms<XDT>::N][4]) {
  constexpr int T = XTerms<XDT>::N;
  u32 v[2][4][T];  // [row][k][term]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r ? row1 : row0;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      split_x<XDT>(x, (i64)row * K + (col[k] < 0 ? 0 : col[k]), row < M && col[k] >= 0, v[r][k]);
  }
#pragma unroll
  for (int i = 0; i < T; ++i) {
    a[i][0] = v[0][0][i] | (v[0][1][i] << 16);
    a[i][1] = v[1][0][i] | (v[1][1][i] << 16);
    a[i][2] = v[0][2][i] | (v[0][3][i] << 16);
    a[i][3] = v[1][2][i] | (v[1][3][i] << 16);
  }
}

// B fragment of weight row n (int8 codes, exact in f16 and bf16) at the chunk's columns.
template <bool BF16>
__device__ __forceinline__ void w_frag(const i8* __restrict__ B, int N, int K, int n,
                                       const long long (&col)[4], u32& b0, u32& b1) {
  u32 h[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float w = (n < N && col[k] >= 0) ? (float)B[(i64)n * K + col[k]] : 0.0f;
    h[k] = BF16 ? f32_to_bf16(w) : f32_to_f16(w);
  }
  b0 = h[0] | (h[1] << 16);
  b1 = h[2] | (h[3] << 16);
}

// The chunk's outlier columns at this lane's four k positions (-1 past the count).
__device__ __forceinline__ void chunk_cols(const long long* __restrict__ idx, int cnt, int kc, int t,
                                           long long (&col)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int j = kc * 16 + 2 * t + (k & 1) + 8 * (k >> 1);
    col[k] = j < cnt ? __ldg(idx + j) : -1;
  }
}

// The tile's weight rows n0 .. n0 + BN - 1 at the first 16 outlier columns as 16-bit values
// (int8 codes, exact), row n at wo + n * WO_STRIDE, zeros past N and past the count. The row
// stride of 24 halves (12 words) puts the 8 rows g of a B fragment load in distinct banks.
constexpr int WO_STRIDE = 24;
template <bool BF16, int BN>
__device__ __forceinline__ void stage_w_outliers(u16* __restrict__ wo, const i8* __restrict__ B, int N,
                                                 int K, int n0, const long long* __restrict__ idx,
                                                 int cnt) {
  for (int n = threadIdx.x; n < BN; n += THREADS) {
    const int wn = n0 + n;
    u32 h[8];
#pragma unroll
    for (int k = 0; k < 16; k += 2) {
      float w0 = 0.0f, w1 = 0.0f;
      if (wn < N && k < cnt) w0 = (float)B[(i64)wn * K + __ldg(idx + k)];
      if (wn < N && k + 1 < cnt) w1 = (float)B[(i64)wn * K + __ldg(idx + k + 1)];
      const u32 lo = BF16 ? f32_to_bf16(w0) : f32_to_f16(w0);
      const u32 hi = BF16 ? f32_to_bf16(w1) : f32_to_f16(w1);
      h[k / 2] = lo | (hi << 16);
    }
    uint4* dst = reinterpret_cast<uint4*>(wo + n * WO_STRIDE);
    dst[0] = make_uint4(h[0], h[1], h[2], h[3]);
    dst[1] = make_uint4(h[4], h[5], h[6], h[7]);
  }
}

template <int ODT> struct Out { typedef typename Storage<ODT>::type type; };
template <> struct Out<3> { typedef int type; };

// The two outputs of columns col, col + 1 (< N; col + 1 >= N repeats col) from accumulators
// a0, a1: int8_gemm's epilogue operation for operation, OUTL's sums s0, s1 added last.
template <int CDT, int BDT, bool CGLOBAL, bool OUTL>
__device__ __forceinline__ void pair_values(int N, int col, int a0, int a1, float r,
                                            const void* __restrict__ cs, const void* __restrict__ bias,
                                            float s0, float s1, float& v0, float& v1) {
  typedef typename Storage<CDT>::type CT;
  const int col1 = col + 1 < N ? col + 1 : col;
  const float c0 = to_f32<CDT>(reinterpret_cast<const CT*>(cs)[CGLOBAL ? 0 : col]);
  const float c1 = to_f32<CDT>(reinterpret_cast<const CT*>(cs)[CGLOBAL ? 0 : col1]);
  v0 = Bias<BDT>::add(__fmul_rn(__fmul_rn(__fmul_rn((float)a0, r), c0), QK_KDEQ), bias, col);
  v1 = Bias<BDT>::add(__fmul_rn(__fmul_rn(__fmul_rn((float)a1, r), c1), QK_KDEQ), bias, col1);
  if constexpr (OUTL) {
    v0 = __fadd_rn(v0, __fmul_rn(__fmul_rn(s0, c0), QK_INV127));
    v1 = __fadd_rn(v1, __fmul_rn(__fmul_rn(s1, c1), QK_INV127));
  }
}

// out[row, col], out[row, col + 1] from accumulators a0, a1 (the pair past N is dropped).
// r is row_scale[row] as float32; the epilogue is int8_gemm's operation for operation.
// OUTL: s0, s1 are the outlier sums of the two outputs (see OUTL above), added last.
template <int ODT, int CDT, int BDT, bool CGLOBAL, bool OUTL>
__device__ __forceinline__ void store_pair(typename Out<ODT>::type* __restrict__ out, int N, int row,
                                           int col, int a0, int a1, float r,
                                           const void* __restrict__ cs, const void* __restrict__ bias,
                                           bool vec_out, float s0, float s1) {
  if (col >= N) return;
  const bool pair = col + 1 < N;
  if constexpr (ODT == 3) {
    int* p = out + (i64)row * N + col;
    if (vec_out && pair) {
      *reinterpret_cast<int2*>(p) = make_int2(a0, a1);
    } else {
      p[0] = a0;
      if (pair) p[1] = a1;
    }
  } else {
    float v0, v1;
    pair_values<CDT, BDT, CGLOBAL, OUTL>(N, col, a0, a1, r, cs, bias, s0, s1, v0, v1);
    typename Storage<ODT>::type* p = out + (i64)row * N + col;
    if (vec_out && pair) {
      if constexpr (ODT == QK_DT_F32) {
        *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
      } else {
        *reinterpret_cast<u32*>(p) = (u32)from_f32<ODT>(v0) | ((u32)from_f32<ODT>(v1) << 16);
      }
    } else {
      p[0] = from_f32<ODT>(v0);
      if (pair) p[1] = from_f32<ODT>(v1);
    }
  }
}

// The whole kernel; a __device__ function in the namespace so that its unqualified helper
// names cannot collide with int8.cu's when both files are compiled together.
template <int ODT, int RDT, int CDT, int BDT, bool CGLOBAL, int BN, int BK, int STAGES, bool OUTL>
__device__ __forceinline__ void gemm(const i8* __restrict__ A, const i8* __restrict__ B, int M, int N,
                                     int K, const void* __restrict__ row_scale,
                                     const void* __restrict__ col_scale, const void* __restrict__ bias,
                                     typename Out<ODT>::type* __restrict__ out, int vec_out,
                                     const void* __restrict__ x, const long long* __restrict__ idx,
                                     const int* __restrict__ count) {
  static_assert(!OUTL || ODT != 3, "outliers need a float output");
  static_assert(BN == 128 || BN == 256, "BN: 128 or 256");
  static_assert(BK == 128 || BK == 64, "BK: 128 or 64 (the swizzle width)");
  static_assert(STAGES >= 3, "the loads run STAGES - 2 blocks ahead");
  constexpr int A_BYTES = BM * BK;
  constexpr int STAGE_BYTES = (BM + BN) * BK;
  constexpr int CPR = BK / 16;            // 16-byte chunks per tile row
  constexpr int RP = THREADS / CPR;       // tile rows one pass of all threads covers
  constexpr int A_PASSES = BM / RP, B_PASSES = BN / RP;
  constexpr int ACC = BN / 2;             // int32 accumulators per thread

  // 16-bit outputs are staged per tile in shared memory (the two ring stages the next tile's
  // prologue leaves free), rows OT_PITCH bytes apart (+16: the lanes' 4-byte writes of one
  // instruction fall in 32 different banks), then leave in coalesced 16-byte stores.
  // Where the tile does not fit in two stages (BK = 64), the accumulators are stored directly.
  constexpr int OT_PITCH = BN * 2 + 16;
  constexpr bool STAGED = (ODT == QK_DT_F16 || ODT == QK_DT_BF16) && BM * OT_PITCH <= 2 * STAGE_BYTES;

  extern __shared__ __align__(128) u8 smem_raw[];
  const u32 smem = (smem_u32(smem_raw) + 1023u) & ~1023u;  // swizzle atoms are 1024-aligned
  u8* const ot = smem_raw + (smem - smem_u32(smem_raw)) + (STAGES - 2) * STAGE_BYTES;
  // OUTL: BN x WO_STRIDE 16-bit weight values after the stages (the launcher adds the bytes)
  u16* const wo = reinterpret_cast<u16*>(smem_raw + (smem - smem_u32(smem_raw)) + STAGES * STAGE_BYTES);

  const int tid = threadIdx.x;
  const int wg = tid >> 7;                // warpgroup: output rows 64 wg .. 64 wg + 63

  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int tiles = tiles_m * tiles_n;
  const int KT = (K + BK - 1) / BK;

  // This thread's loads: chunk `ch` of tile rows r0 + RP i. Rows past M or N read row 0 of
  // the tile (in bounds) with 0 source bytes, i.e. zeros.
  const int ch = tid % CPR, r0 = tid / CPR;
  const int soff = swz<BK>(r0, ch);       // the swizzle depends on r0 only: RP is a multiple of 8
  int m0, n0;
  const i8* a_src[A_PASSES];
  const i8* b_src[B_PASSES];
  u32 a_ok, b_ok;
  auto setup_tile = [&](int tile) {       // grouped raster: 8 M-tiles share each B panel in L2
    const int per_group = 8 * tiles_n;
    const int first_m = (tile / per_group) * 8;
    const int gsize = min(tiles_m - first_m, 8);
    m0 = (first_m + (tile % per_group) % gsize) * BM;
    n0 = ((tile % per_group) / gsize) * BN;
    a_ok = 0;
    b_ok = 0;
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i) {
      const int r = m0 + r0 + i * RP;
      a_ok |= (u32)(r < M) << i;
      a_src[i] = A + (i64)(r < M ? r : m0) * K + ch * 16;
    }
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i) {
      const int r = n0 + r0 + i * RP;
      b_ok |= (u32)(r < N) << i;
      b_src[i] = B + (i64)(r < N ? r : n0) * K + ch * 16;
    }
  };
  auto load_block = [&](int stage, int kb) {
    const u32 sa = smem + stage * STAGE_BYTES + soff;
    const u32 sb = sa + A_BYTES;
    const bool k_ok = kb * BK + ch * 16 < K;  // K % 16 == 0: a chunk is all in or all out
    const int k = k_ok ? kb * BK : 0;         // past K: 0 bytes from an address in bounds
#pragma unroll
    for (int i = 0; i < A_PASSES; ++i)
      cp_async16(sa + i * RP * BK, a_src[i] + k, (k_ok && ((a_ok >> i) & 1)) ? 16 : 0);
#pragma unroll
    for (int i = 0; i < B_PASSES; ++i)
      cp_async16(sb + i * RP * BK, b_src[i] + k, (k_ok && ((b_ok >> i) & 1)) ? 16 : 0);
  };
  auto load_prologue = [&]() {            // blocks 0 .. STAGES - 3 into stages 0 .. STAGES - 3
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
      if (s < KT) load_block(s, s);
      cp_async_commit();
    }
  };

  const int lane = tid & 31, w = (tid >> 5) & 3;
  const int g = lane >> 2, t = lane & 3;

  int tile = blockIdx.x;
  if (tile >= tiles) return;
  const int cnt = OUTL ? *count : 0;      // written by the kernel before this one
  const int nck = (cnt + 15) >> 4;        // 16-column chunks of the outlier product
  setup_tile(tile);
  load_prologue();
  for (;;) {                              // persistent: tiles blockIdx.x, + gridDim.x, ...
    int acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0;

    int read = 0, write = STAGES - 2;
#pragma unroll 1
    for (int kt = 0; kt < KT; ++kt) {
      cp_async_wait<STAGES - 3>();        // this thread's part of block kt has landed
      fence_proxy_async();
      __syncthreads();                    // all of block kt landed; the wgmmas of kt - 2 retired
      const u32 sa = smem + read * STAGE_BYTES + wg * 64 * BK;
      const u32 sb = smem + read * STAGE_BYTES + A_BYTES;
      const u64 da = make_desc<BK>(sa), db = make_desc<BK>(sb);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 32; ++kk)  // +32 bytes along K = +2 in the descriptor's address
        wgmma_s8(acc, da + 2 * kk, db + 2 * kk);
      wgmma_commit();
      const int nk = kt + STAGES - 2;     // into the stage block kt - 2 used
      if (nk < KT) load_block(write, nk);
      cp_async_commit();
      wgmma_wait<1>();                    // block kt - 1's wgmmas are done
      read = read + 1 == STAGES ? 0 : read + 1;
      write = write + 1 == STAGES ? 0 : write + 1;
    }
    wgmma_wait<0>();
    fence_acc(acc);

    // The next tile's first blocks load while this tile's epilogue runs; the barrier makes
    // sure both warpgroups' wgmmas are done with every stage first.
    const int m_out = m0, n_out = n0;
    const int next = tile + gridDim.x;
    __syncthreads();
    if (next < tiles) {
      setup_tile(next);
      load_prologue();
    }

    // Accumulator i of a thread in warp w of the warpgroup, lane = 4 g + t: row 16 w + g
    // (+ 8 for i % 4 >= 2), column 8 (i / 4) + 2 t + (i % 2).
    const int row0 = m_out + wg * 64 + w * 16 + g, row1 = row0 + 8;
    float r0s = 0.0f, r1s = 0.0f;
    if constexpr (ODT != 3) {
      typedef typename Storage<RDT>::type RT;
      if (row0 < M) r0s = to_f32<RDT>(reinterpret_cast<const RT*>(row_scale)[row0]);
      if (row1 < M) r1s = to_f32<RDT>(reinterpret_cast<const RT*>(row_scale)[row1]);
    }
    // OUTL: the first chunk's columns and x fragments serve every 8-column block j (one chunk
    // holds up to 16 outlier columns); its weight values are staged once per tile in shared
    // memory (wo below: one coalesced pass instead of a dependent global load per j); further
    // chunks are reloaded from global memory per j.
    constexpr int XT = XTerms<OUTL ? ODT : QK_DT_F16>::N;
    constexpr bool XBF = XTerms<OUTL ? ODT : QK_DT_F16>::BF16;
    long long col0[4];
    u32 ax0[XT][4];
    if (OUTL && nck > 0) {
      chunk_cols(idx, cnt, 0, t, col0);
      x_frags<OUTL ? ODT : QK_DT_F16>(x, M, K, row0, row1, col0, ax0);
      stage_w_outliers<XBF, BN>(wo, B, N, K, n_out, idx, cnt);
      __syncthreads();                    // wo is complete (the mainloop's barriers order reuse)
    }
#pragma unroll
    for (int j = 0; j < ACC / 4; ++j) {
      const int col = n_out + 8 * j + 2 * t;
      float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if constexpr (OUTL) {
        const int wn = n_out + 8 * j + g;   // the weight row of this lane's B fragment
        for (int kc = 0; kc < nck; ++kc) {
          long long cl[4];
          u32 ax[XT][4];
          if (kc == 0) {
#pragma unroll
            for (int k = 0; k < 4; ++k) cl[k] = col0[k];
#pragma unroll
            for (int i = 0; i < XT; ++i)
#pragma unroll
              for (int k = 0; k < 4; ++k) ax[i][k] = ax0[i][k];
          } else {
            chunk_cols(idx, cnt, kc, t, cl);
            x_frags<ODT>(x, M, K, row0, row1, cl, ax);
          }
          u32 b0, b1;
          if (kc == 0) {
            const u16* wr = wo + (8 * j + g) * WO_STRIDE + 2 * t;
            b0 = *reinterpret_cast<const u32*>(wr);
            b1 = *reinterpret_cast<const u32*>(wr + 8);
          } else {
            w_frag<XBF>(B, N, K, wn, cl, b0, b1);
          }
#pragma unroll
          for (int i = 0; i < XT; ++i) mma_16816<XBF>(s, ax[i], b0, b1);
        }
      }
      if constexpr (STAGED) {             // two 16-bit outputs per word into the staged tile
        if (col < N) {
          float v[4];
          pair_values<CDT, BDT, CGLOBAL, OUTL>(N, col, acc[4 * j], acc[4 * j + 1], r0s, col_scale,
                                               bias, s[0], s[1], v[0], v[1]);
          pair_values<CDT, BDT, CGLOBAL, OUTL>(N, col, acc[4 * j + 2], acc[4 * j + 3], r1s, col_scale,
                                               bias, s[2], s[3], v[2], v[3]);
          const int lr = row0 - m_out, lc = 8 * j + 2 * t;
          const u32 w0 = (u32)from_f32<ODT>(v[0]) | ((u32)from_f32<ODT>(v[1]) << 16);
          const u32 w1 = (u32)from_f32<ODT>(v[2]) | ((u32)from_f32<ODT>(v[3]) << 16);
          *reinterpret_cast<u32*>(ot + lr * OT_PITCH + 2 * lc) = w0;
          *reinterpret_cast<u32*>(ot + (lr + 8) * OT_PITCH + 2 * lc) = w1;
        }
      } else {
        if (row0 < M)
          store_pair<ODT, CDT, BDT, CGLOBAL, OUTL>(out, N, row0, col, acc[4 * j], acc[4 * j + 1], r0s,
                                                   col_scale, bias, vec_out, s[0], s[1]);
        if (row1 < M)
          store_pair<ODT, CDT, BDT, CGLOBAL, OUTL>(out, N, row1, col, acc[4 * j + 2], acc[4 * j + 3], r1s,
                                                   col_scale, bias, vec_out, s[2], s[3]);
      }
    }
    if constexpr (STAGED) {               // the tile's rows leave in 16-byte coalesced stores
      __syncthreads();
      constexpr int CH = BN / 8;          // 16-byte chunks per tile row
      const bool vec16 = (N & 7) == 0 && (reinterpret_cast<unsigned long long>(out) & 15) == 0;
#pragma unroll 4
      for (int id = tid; id < BM * CH; id += THREADS) {
        const int lr = id / CH, c8 = (id % CH) * 8;
        const int row = m_out + lr, col = n_out + c8;
        if (row >= M || col >= N) continue;
        const u8* src = ot + lr * OT_PITCH + 2 * c8;
        typename Storage<ODT>::type* dst = out + (i64)row * N + col;
        if (vec16 && col + 8 <= N) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          const u16* h = reinterpret_cast<const u16*>(src);
          for (int e = 0; e < 8 && col + e < N; ++e) dst[e] = h[e];
        }
      }
      // the next tile's first wgmma waits at the barrier atop its main loop, after which
      // its loads may reuse these stages
    }
    if (next >= tiles) break;
    tile = next;
  }
  cp_async_wait<0>();                     // only empty groups can remain; retire them anyway
}

}  // namespace qk_sm90

template <int ODT, int RDT, int CDT, int BDT, bool CGLOBAL, int BN = 256, int BK = 128, int STAGES = 4,
          bool OUTL = false>
__global__ void __launch_bounds__(qk_sm90::THREADS, BN == 128 ? 2 : 1)
int8_gemm_sm90(const signed char* __restrict__ A, const signed char* __restrict__ B, int M, int N, int K,
               const void* __restrict__ row_scale, const void* __restrict__ col_scale,
               const void* __restrict__ bias, typename qk_sm90::Out<ODT>::type* __restrict__ out,
               int vec_out, const void* __restrict__ x, const long long* __restrict__ idx,
               const int* __restrict__ count) {
  qk_sm90::gemm<ODT, RDT, CDT, BDT, CGLOBAL, BN, BK, STAGES, OUTL>(A, B, M, N, K, row_scale, col_scale,
                                                                   bias, out, vec_out, x, idx, count);
}
