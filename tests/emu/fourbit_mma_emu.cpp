// Host emulation of qkernels/fourbit/fourbit_mma.cu (run by tests/test_fourbit_mma_emulated.py).
//
// The kernel's own source is compiled for the host: tests/emu/common.cuh stands in for the
// CUDA built-ins, and the block of PTX wrappers is replaced by the functions below, written
// from the PTX ISA's definitions, not from the kernel:
//   - mma.sync m16n8k16 (row.col, f32 accumulators): the 32 lanes' fragments are gathered
//     into A (16 x 16), B (16 x 8) and C by the ISA's fragment tables, D = C + A B in double;
//   - cp.async: each committed group completes either at once or as late as the ISA allows
//     (at the cp.async.wait_group that needs it), chosen at random, so a read before its
//     wait or a copy into a buffer still being read shows up as a wrong result;
//   - a CTA's 256 threads are fibers (ucontext) on one OS thread; __syncthreads and the warp
//     collectives are barriers between them; CTAs run one at a time, in a random order.
//
// Input on stdin (little-endian): int32 DT, NT, NESTED, M, N, K, log2_block, cps, S,
// x_offset (elements), has_bias, seed; float32 offset_v; then x (x_offset + M*K uint16),
// packed (N*K/2 bytes), code (16 float32), and absmax (nb float32) or, NESTED, qabs (nb
// bytes), code2 (256 float32), absmax2 (ceil(nb/256) float32); bias (N uint16) if has_bias.
// Output on stdout: out (M*N uint16).
#include "common.cuh"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

dim3 threadIdx, blockIdx, gridDim, blockDim;

// --- fibers -----------------------------------------------------------------------------
static const int kThreads = 256;
static ucontext_t g_main;
static ucontext_t g_ctx[kThreads];
static std::vector<char> g_stacks;
static bool g_done[kThreads];
static int g_cur = 0;
static std::function<void()> g_body;
static std::mt19937_64 g_rng;

static void fiber_entry() {
  g_body();
  g_done[g_cur] = true;
}  // returns to g_main (uc_link)

static void yield() { swapcontext(&g_ctx[g_cur], &g_main); }

struct Barrier {
  int n = 0, arrived = 0;
  long gen = 0;
};
static Barrier g_cta_bar, g_warp_bar[kThreads / 32];
static void bar_wait(Barrier& b) {
  const long my = b.gen;
  if (++b.arrived == b.n) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == my) yield();
}
void __syncthreads() { bar_wait(g_cta_bar); }

// --- the PTX wrappers -------------------------------------------------------------------
unsigned char* emu_dynamic_smem = nullptr;

struct Copy { u32 dst; const void* src; bool valid; };
static std::vector<Copy> g_open[kThreads];                   // not yet committed
static std::vector<std::vector<Copy>> g_pending[kThreads];  // committed, not yet complete

static void perform(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.valid) std::memcpy(emu_dynamic_smem + c.dst, c.src, 16);
    else std::memset(emu_dynamic_smem + c.dst, 0, 16);
  }
}

inline u32 mma_smem_u32(const void* p) { return (u32)((const unsigned char*)p - emu_dynamic_smem); }
inline void mma_cp_async16(u32 dst, const void* src, bool valid) { g_open[threadIdx.x].push_back({dst, src, valid}); }
inline void mma_cp_async_commit() {
  auto& open = g_open[threadIdx.x];
  if (g_rng() & 1) {  // completes at once: queued empty, so the group count stays exact
    perform(open);
    g_pending[threadIdx.x].push_back({});
  } else {
    g_pending[threadIdx.x].push_back(open);
  }
  open.clear();
}
static void cp_async_wait(int n) {  // all but the n most recent committed groups complete
  auto& q = g_pending[threadIdx.x];
  while ((int)q.size() > n) {
    perform(q.front());
    q.erase(q.begin());
  }
}
template <int N> inline void mma_cp_async_wait() { cp_async_wait(N); }
inline float4 mma_ld_cg4(const float4* p) { return *p; }

template <int DT> inline u32 mma_pack(float lo, float hi) {
  return (u32)from_f32<DT>(lo) | ((u32)from_f32<DT>(hi) << 16);
}

struct Frag { u32 a[4], b[2]; float c[4]; };
static Frag g_frag[kThreads];

template <int DT> static double half_value(u32 reg, int upper) {
  const u16 h = (u16)(upper ? reg >> 16 : reg & 0xFFFFu);
  return DT == QK_DT_F16 ? (double)f16_to_f32(h) : (double)bf16_to_f32(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, fragments per the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"): groupID = lane >> 2,
// threadID_in_group = lane % 4;
//   A: a_i, i = 0..7, row = groupID (i in {0,1,4,5}) or groupID + 8 (i in {2,3,6,7}),
//      col = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 4); a_{2j}, a_{2j+1} in register j
//      (lower half first);
//   B: b_i, i = 0..3, row = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 2), col = groupID;
//   C/D: c_i, i = 0..3, row = groupID (i < 2) or groupID + 8, col = threadID_in_group * 2 + (i & 1).
template <int DT> void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Frag& f = g_frag[threadIdx.x];
  for (int i = 0; i < 4; ++i) f.a[i] = a[i], f.c[i] = d[i];
  f.b[0] = b0;
  f.b[1] = b1;
  bar_wait(g_warp_bar[warp]);
  double A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const Frag& o = g_frag[warp * 32 + l];
    const int gid = l >> 2, tig = l & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? gid : gid + 8;
      const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half_value<DT>(o.a[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) {
      const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][gid] = half_value<DT>(o.b[i / 2], i & 1);
    }
    for (int i = 0; i < 4; ++i) C[(i < 2) ? gid : gid + 8][tig * 2 + (i & 1)] = (double)o.c[i];
  }
  bar_wait(g_warp_bar[warp]);  // every lane has read the fragments
  const int gid = lane >> 2, tig = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = (i < 2) ? gid : gid + 8, col = tig * 2 + (i & 1);
    double s = C[row][col];
    for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
    d[i] = (float)s;
  }
}

#include "kernel_body.inc"  // fourbit_mma.cu without its include line and PTX wrappers

// --- the launch -------------------------------------------------------------------------
template <int DT, int NT, int NESTED>
static void launch(const u16* x, const u8* packed, const void* absmax, const float* code, const float* code2,
                   const float* absmax2, float offset_v, const u16* bias, u16* out, int M, int N, int K,
                   int log2_block, int cps, int S, int x_vec) {
  typedef MmaShape<NT> Shape;
  const int gx = (N + Shape::R - 1) / Shape::R;
  std::vector<unsigned char> smem(Shape::SMEM + 64);
  emu_dynamic_smem = smem.data();
  std::vector<float4> ws(S > 1 ? (size_t)gx * S * M * Shape::R / 4 : 1);  // (row block, split, M, R)
  std::vector<u32> counters(gx, 0u);
  std::vector<std::pair<int, int>> order;
  for (int by = 0; by < S; ++by)
    for (int bx = 0; bx < gx; ++bx) order.push_back({bx, by});
  std::shuffle(order.begin(), order.end(), g_rng);
  gridDim.x = gx;
  gridDim.y = S;
  blockDim.x = kThreads;
  g_stacks.assign((size_t)kThreads * (256 << 10), 0);
  for (auto [bx, by] : order) {
    blockIdx.x = bx;
    blockIdx.y = by;
    // stale shared memory from the previous CTA must not matter: fill with NaN bytes
    std::memset(smem.data(), 0xFF, smem.size());
    g_cta_bar = Barrier{kThreads, 0, 0};
    for (auto& w : g_warp_bar) w = Barrier{32, 0, 0};
    g_body = [&]() {
      matmul_4bit_mma<DT, NT, NESTED>(x, packed, absmax, code, code2, absmax2, nullptr, offset_v, bias, out,
                                      S > 1 ? reinterpret_cast<float*>(ws.data()) : nullptr, counters.data(), M, N, K, log2_block, cps,
                                      x_vec);
    };
    for (int i = 0; i < kThreads; ++i) {
      getcontext(&g_ctx[i]);
      g_ctx[i].uc_stack.ss_sp = g_stacks.data() + (size_t)i * (256 << 10);
      g_ctx[i].uc_stack.ss_size = 256 << 10;
      g_ctx[i].uc_link = &g_main;
      makecontext(&g_ctx[i], fiber_entry, 0);
      g_done[i] = false;
      g_open[i].clear();
      g_pending[i].clear();
    }
    for (bool alive = true; alive;) {
      alive = false;
      for (int i = 0; i < kThreads; ++i) {
        if (g_done[i]) continue;
        alive = true;
        g_cur = i;
        threadIdx.x = i;
        swapcontext(&g_main, &g_ctx[i]);
      }
    }
  }
  for (u32 c : counters)
    if (c != (u32)(S > 1 ? S : 0)) { std::fprintf(stderr, "counter %u != S\n", c); std::exit(3); }
}

template <class T> static std::vector<T> read_n(size_t n) {
  std::vector<T> v(n);
  if (n && std::fread(v.data(), sizeof(T), n, stdin) != n) { std::fprintf(stderr, "short input\n"); std::exit(2); }
  return v;
}

template <int DT, int NT, int NESTED>
static void run(const int* h, float offset_v) {
  const int M = h[3], N = h[4], K = h[5], log2_block = h[6], cps = h[7], S = h[8], xoff = h[9], has_bias = h[10];
  const i64 n = (i64)N * K, nb = (n + (1 << log2_block) - 1) >> log2_block;
  // x in a 16-byte aligned buffer at element offset xoff (x_vec when the address is aligned)
  std::vector<uint4> xbuf(((size_t)xoff + (size_t)M * K) / 8 + 2);
  std::vector<u16> xin = read_n<u16>((size_t)xoff + (size_t)M * K);
  std::memcpy(xbuf.data(), xin.data(), xin.size() * 2);
  const u16* x = reinterpret_cast<const u16*>(xbuf.data()) + xoff;
  std::vector<uint4> pbuf(n / 32 + 1);
  std::vector<u8> pin = read_n<u8>(n / 2);
  std::memcpy(pbuf.data(), pin.data(), pin.size());
  std::vector<float> code = read_n<float>(16);
  std::vector<float> absmax, code2, absmax2;
  std::vector<u8> qabs;
  if (NESTED) {
    qabs = read_n<u8>(nb);
    code2 = read_n<float>(256);
    absmax2 = read_n<float>((nb + 255) / 256);
  } else {
    absmax = read_n<float>(nb);
  }
  std::vector<u16> bias = has_bias ? read_n<u16>(N) : std::vector<u16>();
  std::vector<u16> out((size_t)M * N, 0xFFFF);
  const int x_vec = ((uintptr_t)x % 16) == 0;
  launch<DT, NT, NESTED>(x, reinterpret_cast<const u8*>(pbuf.data()),
                         NESTED ? (const void*)qabs.data() : (const void*)absmax.data(), code.data(),
                         NESTED ? code2.data() : nullptr, NESTED ? absmax2.data() : nullptr, offset_v,
                         has_bias ? bias.data() : nullptr, out.data(), M, N, K, log2_block, cps, S, x_vec);
  std::fwrite(out.data(), 2, out.size(), stdout);
}

template <int DT, int NT>
static void by_nested(const int* h, float o) { h[2] ? run<DT, NT, 1>(h, o) : run<DT, NT, 0>(h, o); }
template <int DT>
static void by_nt(const int* h, float o) {
  switch (h[1]) {
    case 1: by_nested<DT, 1>(h, o); break;
    case 2: by_nested<DT, 2>(h, o); break;
    case 4: by_nested<DT, 4>(h, o); break;
    case 8: by_nested<DT, 8>(h, o); break;
    default: std::fprintf(stderr, "bad NT\n"); std::exit(2);
  }
}

int main() {
  std::vector<int> h = read_n<int>(12);
  const float offset_v = read_n<float>(1)[0];
  g_rng.seed((uint64_t)h[11]);
  if (h[0] == QK_DT_F16) by_nt<QK_DT_F16>(h.data(), offset_v);
  else by_nt<QK_DT_BF16>(h.data(), offset_v);
  return 0;
}
