// Kernels for XLA:CPU, as XLA FFI custom calls (agcg_jax/models/cpu_kernels.py builds this file on
// first use and registers the handlers): a 3x3 convolution (direct, or Winograd F(4x4, 3x3) for the
// stride-1 ones of 16k -> 64k channels), thin 7x7 convolutions, padding and instance norm.
//
// Convolution: stride s (1 or 2), any dilation d, NHWC input already padded, HWIO kernel, float32:
//   forward      y[b, r, x, k]  = sum_{i, j, c} in[b, s r + i d, s x + j d, c] w[i, j, c, k]
//   kernel grad  dw[i, j, c, k] = sum_{b, r, x} in[b, s r + i d, s x + j d, c] g[b, r, x, k]
// The input gradient of a stride-1 conv is the forward of the padded output gradient with the
// flipped, transposed kernel (cpu_kernels.py); a stride-2 conv's is XLA's. Output channels are
// held in 16-float vectors (GCC/Clang vector extensions: one AVX-512 register, two AVX2 ones);
// the channel counts are template parameters so the inner loops unroll. Large calls are split
// over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
typedef float v16 __attribute__((vector_size(64)));  // one AVX-512 register
#else
// Without 512-bit registers GCC keeps arrays of 64-byte vectors in memory and the kernels ran 20-30x
// slower than with AVX-512 (an AVX2 build on this Zen 4 machine: 1.5-4 GMAC/s, 2026-11-29). Here a
// 16-float vector is two (AVX) or four (SSE, NEON) of the machine's own.
#if defined(__AVX__)
constexpr int kLaneBytes = 32;
#else
constexpr int kLaneBytes = 16;
#endif
typedef float vlane __attribute__((vector_size(kLaneBytes)));
constexpr int kLanes = 64 / kLaneBytes;
struct v16 {
  vlane part[kLanes];
};
inline v16 operator+(v16 a, v16 b) {
  for (int i = 0; i < kLanes; ++i) a.part[i] += b.part[i];
  return a;
}
inline v16 operator-(v16 a, v16 b) {
  for (int i = 0; i < kLanes; ++i) a.part[i] -= b.part[i];
  return a;
}
inline v16 operator*(v16 a, v16 b) {
  for (int i = 0; i < kLanes; ++i) a.part[i] *= b.part[i];
  return a;
}
inline v16 operator*(float s, v16 a) {
  for (int i = 0; i < kLanes; ++i) a.part[i] *= s;
  return a;
}
inline v16& operator+=(v16& a, v16 b) {
  for (int i = 0; i < kLanes; ++i) a.part[i] += b.part[i];
  return a;
}
inline v16 operator+(v16 a, float s) {
  for (int i = 0; i < kLanes; ++i) a.part[i] += s;
  return a;
}
#endif

// A vector of 16 copies of `a`, written so the compiler emits one broadcast (from memory where `a`
// is loaded). `v16{} + a` cost a scalar add of zero before every broadcast (0 + a is not a for a
// = -0, so it may not be dropped): 2 extra instructions per broadcast in the register tiles.
#if defined(__AVX512F__)
inline v16 Splat(float a) { return v16{a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
#else
inline v16 Splat(float a) {
  vlane lane;
  for (int i = 0; i < kLaneBytes / 4; ++i) lane[i] = a;
  v16 r;
  for (int i = 0; i < kLanes; ++i) r.part[i] = lane;
  return r;
}
#endif

// The register tiles are sized for 32 vector registers of 16 floats (AVX-512); with fewer or
// narrower ones they spill. cpu_kernels.py asks which (AgcgVectorBits) and keeps the wide convs
// (where XLA is faster then) off without AVX-512.
#if defined(__AVX512F__)
constexpr int kVectorBits = 512;
#elif defined(__AVX__)
constexpr int kVectorBits = 256;
#else
constexpr int kVectorBits = 128;
#endif
inline v16 Load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }
// A store past the caches, for buffers written once and read much later; p 64-byte aligned.
inline void StoreStream(float* p, v16 v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  for (int i = 0; i < kLanes; ++i) _mm256_stream_ps(p + 8 * i, reinterpret_cast<__m256>(v.part[i]));
#elif defined(__SSE__)
  for (int i = 0; i < kLanes; ++i) _mm_stream_ps(p + 4 * i, reinterpret_cast<__m128>(v.part[i]));
#else
  Store(p, v);
#endif
}

// Below this many multiply-adds a call runs on the calling thread alone: at the demo's sizes XLA
// already runs independent ops on the other cores, and splitting small calls made the step slower
// and its time erratic (2 cores: 96-134 ms per step threaded, 105-108 single; 2026-11-29).
constexpr int64_t kMinParallelMacs = int64_t{1} << 25;

// body(lo, hi) over [0, n) items of `macs_per_item` work, in chunks on the pool's threads and the
// calling one. The caller waits only for chunks some thread has claimed (so is running), never for
// a queued task: no deadlock when every pool thread is itself inside such a call. `body` lives on
// the caller's stack and is touched only by a thread holding a claimed chunk, i.e. before the
// caller returns.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t macs_per_item, const F& body) {
  const int64_t threads =
      n * macs_per_item < kMinParallelMacs ? 1 : std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::min<int64_t>(n, 2 * threads);
  if (threads <= 1 || chunks <= 1) {
    body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, chunks, n, f = &body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      (*f)(c * n / chunks, (c + 1) * n / chunks);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < threads; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

// PB consecutive output pixels of one row x KB blocks of 16 output channels, in registers.
template <int C, int KB, int PB, int S, bool FULL>
inline void ForwardTile(const float* __restrict in, const float* __restrict w, float* __restrict out,
                        int64_t wp, int64_t d, int64_t x0, int64_t np) {
  constexpr int K = 16 * KB;
  v16 acc[PB][KB];
  for (int p = 0; p < PB; ++p)
    for (int q = 0; q < KB; ++q) acc[p][q] = v16{};
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const float* row = in + (i * d * wp + S * x0 + j * d) * C;
      const float* tap = w + (i * 3 + j) * C * K;
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) {
        v16 wv[KB];
        for (int q = 0; q < KB; ++q) wv[q] = Load(tap + c * K + 16 * q);
        for (int p = 0; p < PB; ++p) {
          if (FULL || p < np) {
            const v16 v = Splat(row[p * S * C + c]);
            for (int q = 0; q < KB; ++q) acc[p][q] += v * wv[q];
          }
        }
      }
    }
  for (int p = 0; p < PB; ++p)
    if (FULL || p < np)
      for (int q = 0; q < KB; ++q) Store(out + (x0 + p) * K + 16 * q, acc[p][q]);
}

// The same tile with the dilation D a compile-time constant: each input value of a kernel row is
// broadcast once and feeds every output pixel of the tile that reads it (through up to 3 taps),
// instead of once per tap. The tile's S (PB - 1) + 2 D + 1 input pixels of a row are all in range.
template <int C, int KB, int PB, int S, int D, bool FULL>
inline void ForwardTileShared(const float* __restrict in, const float* __restrict w,
                              float* __restrict out, int64_t wp, int64_t x0, int64_t np) {
  constexpr int K = 16 * KB, T = S * (PB - 1) + 2 * D + 1;
  const int64_t used = S * (np - 1) + 2 * D + 1;  // input pixels a partial tile may read
  v16 acc[PB][KB];
  for (int p = 0; p < PB; ++p)
    for (int q = 0; q < KB; ++q) acc[p][q] = v16{};
  for (int i = 0; i < 3; ++i) {
    const float* row = in + (i * D * wp + S * x0) * C;
    const float* taps = w + i * 3 * C * K;
    for (int c = 0; c < C; ++c) {
      v16 wv[3][KB];
      for (int j = 0; j < 3; ++j)
        for (int q = 0; q < KB; ++q) wv[j][q] = Load(taps + (j * C + c) * K + 16 * q);
#pragma GCC unroll 64
      for (int t = 0; t < T; ++t) {
        if (!FULL && t >= used) break;
        const v16 v = Splat(row[t * C + c]);
#pragma GCC unroll 3
        for (int j = 0; j < 3; ++j) {
          const int u = t - j * D;  // output pixel S * p = u reads this value through tap j
          if (u >= 0 && u % S == 0 && u / S < PB)
            for (int q = 0; q < KB; ++q) acc[u / S][q] += v * wv[j][q];
        }
      }
    }
  }
  for (int p = 0; p < PB; ++p)
    if (FULL || p < np)
      for (int q = 0; q < KB; ++q) Store(out + (x0 + p) * K + 16 * q, acc[p][q]);
}

// D > 0: the dilation is D (ForwardTileShared); D == 0: any dilation d (ForwardTile).
template <int C, int KB, int S, int D>
void ForwardStrided(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t batch,
                    int64_t hp, int64_t wp, int64_t h, int64_t wo, int64_t d) {
  constexpr int K = 16 * KB, PB = 16 / KB;
  ParallelFor(pool, batch * h, wo * 9 * C * K, [&](int64_t lo, int64_t hi) {
    for (int64_t br = lo; br < hi; ++br) {
      const int64_t b = br / h, r = br % h;
      const float* in = x + (b * hp + S * r) * wp * C;
      float* out = y + (b * h + r) * wo * K;
      int64_t x0 = 0;
      if constexpr (D > 0) {
        for (; x0 + PB <= wo; x0 += PB)
          ForwardTileShared<C, KB, PB, S, D, true>(in, w, out, wp, x0, PB);
        if (x0 < wo) ForwardTileShared<C, KB, PB, S, D, false>(in, w, out, wp, x0, wo - x0);
      } else {
        for (; x0 + PB <= wo; x0 += PB) ForwardTile<C, KB, PB, S, true>(in, w, out, wp, d, x0, PB);
        if (x0 < wo) ForwardTile<C, KB, PB, S, false>(in, w, out, wp, d, x0, wo - x0);
      }
    }
  });
}

template <int C, int KB>
void Forward(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t batch,
             int64_t hp, int64_t wp, int64_t h, int64_t wo, int64_t d, int64_t s) {
  // The networks' dilations (1, 2, 4) and stride 2 compiled in; others take the general tile, as
  // do 64 output channels (their 3 x 4 weight vectors and 16 accumulators leave no registers).
  if constexpr (KB > 2) {
    if (s == 1)
      ForwardStrided<C, KB, 1, 0>(pool, x, w, y, batch, hp, wp, h, wo, d);
    else
      ForwardStrided<C, KB, 2, 0>(pool, x, w, y, batch, hp, wp, h, wo, d);
  } else if (s == 1 && d == 1) {
    ForwardStrided<C, KB, 1, 1>(pool, x, w, y, batch, hp, wp, h, wo, d);
  } else if (s == 1 && d == 2) {
    ForwardStrided<C, KB, 1, 2>(pool, x, w, y, batch, hp, wp, h, wo, d);
  } else if (s == 1 && d == 4) {
    ForwardStrided<C, KB, 1, 4>(pool, x, w, y, batch, hp, wp, h, wo, d);
  } else if (s == 1) {
    ForwardStrided<C, KB, 1, 0>(pool, x, w, y, batch, hp, wp, h, wo, d);
  } else if (d == 1) {
    ForwardStrided<C, KB, 2, 1>(pool, x, w, y, batch, hp, wp, h, wo, d);
  } else {
    ForwardStrided<C, KB, 2, 0>(pool, x, w, y, batch, hp, wp, h, wo, d);
  }
}

// dw of one tap (i, j), input channels [c0, c0 + CB) x output channels [k0, k0 + 16 KB) of K, in
// registers: a sum over every output pixel.
template <int KB, int CB, int S>
void KernelGradUnit(const float* __restrict x, const float* __restrict g, float* __restrict dw,
                    int64_t batch, int64_t hp, int64_t wp, int64_t h, int64_t wo, int64_t C,
                    int64_t K, int64_t d, int i, int j, int64_t c0, int64_t k0) {
  v16 acc[CB][KB];
  for (int q = 0; q < CB; ++q)
    for (int k = 0; k < KB; ++k) acc[q][k] = v16{};
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < h; ++r) {
      const float* in = x + ((b * hp + S * r + i * d) * wp + j * d) * C + c0;
      const float* gr = g + (b * h + r) * wo * K + k0;
      for (int64_t col = 0; col < wo; ++col) {
        v16 gv[KB];
        for (int k = 0; k < KB; ++k) gv[k] = Load(gr + col * K + 16 * k);
        for (int q = 0; q < CB; ++q) {
          const v16 v = Splat(in[col * S * C + q]);
          for (int k = 0; k < KB; ++k) acc[q][k] += v * gv[k];
        }
      }
    }
  for (int q = 0; q < CB; ++q)
    for (int k = 0; k < KB; ++k)
      Store(dw + ((i * 3 + j) * C + c0 + q) * K + k0 + 16 * k, acc[q][k]);
}

template <int C, int KB>
void KernelGrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dw, int64_t batch,
                int64_t hp, int64_t wp, int64_t h, int64_t wo, int64_t d, int64_t s) {
  constexpr int CB = (C < 16 / KB) ? C : 16 / KB;
  constexpr int NC = C / CB;
  ParallelFor(pool, 9 * NC, batch * h * wo * CB * 16 * KB, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      const int i = u / NC / 3, j = u / NC % 3, c0 = (u % NC) * CB;
      (s == 1 ? KernelGradUnit<KB, CB, 1> : KernelGradUnit<KB, CB, 2>)(
          x, g, dw, batch, hp, wp, h, wo, C, 16 * KB, d, i, j, c0, 0);
    }
  });
}

// ---- Wide 3x3 convolutions: C input channels (a multiple of 16) and K output channels (a
// multiple of 64), both at run time: the paper-sized networks' 64-512 channel layers, which XLA:CPU
// runs at ~35-45 GMAC/s per core. Outputs go in chunks of 64 channels (4 vectors) x 6 pixels of a
// row (24 accumulators); the input channels in blocks of kWideCBlock, so that a chunk's weights
// (9 x 128 x 64 floats, 295 KB) stay in L2 over all the rows the calling thread computes.
constexpr int kWideKB = 4, kWidePB = 6;
constexpr int64_t kWideCBlock = 128;

inline bool Compiled(int64_t c, int64_t k) {
  return (c == 8 || c == 16 || c == 32 || c == 64) && (k == 16 || k == 32 || k == 64);
}
inline bool Wide(int64_t c, int64_t k) { return c % 16 == 0 && k % 64 == 0; }

// Input channels [c0, c1) of PB pixels x 64 output channels; `in` at the tile's first window, `w`
// and `out` at the chunk's first output channel. Adds to `out` unless c0 == 0.
template <int PB, int S, bool FULL>
inline void WideTile(const float* __restrict in, const float* __restrict w, float* __restrict out,
                     int64_t C, int64_t K, int64_t wp, int64_t d, int np, int64_t c0, int64_t c1) {
  constexpr int KB = kWideKB;
  v16 acc[PB][KB];
  for (int p = 0; p < PB; ++p)
    for (int q = 0; q < KB; ++q)
      acc[p][q] = (c0 == 0 || !(FULL || p < np)) ? v16{} : Load(out + p * K + 16 * q);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) {
      const float* row = in + (i * d * wp + j * d) * C;
      const float* tap = w + (i * 3 + j) * C * K;
#pragma GCC unroll 4
      for (int64_t c = c0; c < c1; ++c) {
        v16 wv[KB];
        for (int q = 0; q < KB; ++q) wv[q] = Load(tap + c * K + 16 * q);
        for (int p = 0; p < PB; ++p)
          if (FULL || p < np) {
            const v16 v = Splat(row[p * S * C + c]);
            for (int q = 0; q < KB; ++q) acc[p][q] += v * wv[q];
          }
      }
    }
  for (int p = 0; p < PB; ++p)
    if (FULL || p < np)
      for (int q = 0; q < KB; ++q) Store(out + p * K + 16 * q, acc[p][q]);
}

// Items are (output chunk, image row), chunk-major: a thread's run of rows shares one chunk.
template <int S>
void WideForward(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t batch,
                 int64_t hp, int64_t wp, int64_t h, int64_t wo, int64_t C, int64_t K, int64_t d) {
  constexpr int PB = kWidePB, KC = 16 * kWideKB;
  const int64_t rows = batch * h;
  ParallelFor(pool, K / KC * rows, wo * 9 * C * KC, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi;) {
      const int64_t k0 = u / rows * KC, end = std::min(hi, (u / rows + 1) * rows);
      for (int64_t c0 = 0; c0 < C; c0 += kWideCBlock) {
        const int64_t c1 = std::min(C, c0 + kWideCBlock);
        for (int64_t v = u; v < end; ++v) {
          const int64_t b = v % rows / h, r = v % rows % h;
          const float* in = x + (b * hp + S * r) * wp * C;
          float* out = y + (b * h + r) * wo * K + k0;
          int64_t x0 = 0;
          for (; x0 + PB <= wo; x0 += PB)
            WideTile<PB, S, true>(in + S * x0 * C, w + k0, out + x0 * K, C, K, wp, d, PB, c0, c1);
          if (x0 < wo)
            WideTile<PB, S, false>(in + S * x0 * C, w + k0, out + x0 * K, C, K, wp, d,
                                   int(wo - x0), c0, c1);
        }
      }
      u = end;
    }
  });
}

// Items are (output chunk, tap, block of 6 input channels; the last block holds C % 6 (0, 2 or 4)
// when C is not a multiple of 6): chunk-major, so a thread's run shares the chunk's output
// gradient (in L2).
template <int S>
void WideKernelGrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dw,
                    int64_t batch, int64_t hp, int64_t wp, int64_t h, int64_t wo, int64_t C,
                    int64_t K, int64_t d) {
  constexpr int KC = 16 * kWideKB;
  const int64_t blocks = (C + 5) / 6, pixels = batch * h * wo;
  ParallelFor(pool, K / KC * 9 * blocks, pixels * 6 * KC, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t k0 = u / (9 * blocks) * KC, c0 = u % blocks * 6;
      const int t = int(u / blocks % 9), i = t / 3, j = t % 3;
      const auto unit = C - c0 >= 6   ? KernelGradUnit<kWideKB, 6, S>
                        : C - c0 == 4 ? KernelGradUnit<kWideKB, 4, S>
                                      : KernelGradUnit<kWideKB, 2, S>;
      unit(x, g, dw, batch, hp, wp, h, wo, C, K, d, i, j, c0, k0);
    }
  });
}

// ---- Winograd F(4x4, 3x3) for the stride-1 3x3 convs (any dilation) of 16k -> 64k channels ----
// Each m x m block of outputs ("tile", m = 4) comes from an n x n input window d, n = m + 2:
//   y = A^T [(G w G^T) . (B^T d B)] A.
// The n^2 elementwise products summed over input channels are n^2 matrix products
//   M[t][p][k] = sum_c V[t][p][c] U[t][c][k],  V = B^T d B per tile p, U = G w G^T,
// 36 C K multiply-adds per 16 outputs instead of 144 C K (4x fewer; F(2x2), used until session 10,
// 2.25x). The transforms cost O(C + K) per tile, not O(C K). The products run on the wide
// kernel's register tile (6 tiles x 64 outputs). Tiles are taken in chunks whose transformed
// inputs and products fit kWinogradFloats, so a large batch needs no large buffer.
// Rounding: the transforms' larger coefficients cost accuracy. Relative to the largest output of a
// 256 -> 256 conv (numpy, float32 against float64): direct 3e-7, F(2x2) 6e-7, F(4x4) on Lavin's
// points 0, +-1, +-2 1e-5, F(4x4) on 0, +-1, 1/2, -2 (Barabasz et al., 2019, "Error analysis and
// improving the accuracy of Winograd convolution") 4e-6: the points used here. The matrices below
// come from those points by the Toom-Cook construction (checked against float64 sums in
// tests/test_cpu_kernels.py and benchmarks/wide_convs.py); another m needs only its own three.
constexpr int64_t kWinogradFloats = int64_t{1} << 22;  // 16 MB of transformed tiles per chunk

template <int M>
struct Winograd;
template <>
struct Winograd<4> {  // points 0, 1, -1, 1/2, -2, infinity
  static constexpr int N = 6;
  static constexpr float BT[6][6] = {
      {1, -1.5f, -2, 1.5f, 1, 0}, {0, -1, .5f, 2.5f, 1, 0},  {0, 1, -2.5f, .5f, 1, 0},
      {0, -2, -1, 2, 1, 0},       {0, .5f, -1, -.5f, 1, 0}, {0, 1, -1.5f, -2, 1.5f, 1}};
  static constexpr float G[6][3] = {{1, 0, 0},
                                    {1.f / 3, 1.f / 3, 1.f / 3},
                                    {-1.f / 3, 1.f / 3, -1.f / 3},
                                    {-16.f / 15, -8.f / 15, -4.f / 15},
                                    {1.f / 15, -2.f / 15, 4.f / 15},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, .5f, -2, 0}, {0, 1, 1, .25f, 4, 0}, {0, 1, -1, .125f, -8, 1}};
};

// out = mat in (TRANSPOSE: mat^T in) for a matrix known at compile time: its zeros cost nothing,
// its ones and minus ones no multiply.
template <bool TRANSPOSE, int R, int C>
[[gnu::always_inline]] inline void Apply(const float (&mat)[R][C], const v16* in, v16* out) {
  constexpr int rows = TRANSPOSE ? C : R, cols = TRANSPOSE ? R : C;
#pragma GCC unroll 8
  for (int t = 0; t < rows; ++t) {
    v16 s{};
    bool any = false;
#pragma GCC unroll 8
    for (int k = 0; k < cols; ++k) {
      const float a = TRANSPOSE ? mat[k][t] : mat[t][k];
      if (a == 0.f) continue;
      const v16 term = a == 1.f ? in[k] : a * in[k];
      s = any ? s + term : term;
      any = true;
    }
    out[t] = s;
  }
}

// L x R^T for x [RX][CX] and compile-time L [*][RX], R [*][CX] (TRANSPOSE: L^T x R).
template <bool TRANSPOSE, int RX, int CX, int RO, int CO, typename LM, typename RM>
[[gnu::always_inline]] inline void Apply2(const LM& left, const RM& right, const v16 (&x)[RX][CX],
                                          v16 (&out)[RO][CO]) {
  v16 tmp[RO][CX];
#pragma GCC unroll 8
  for (int j = 0; j < CX; ++j) {
    v16 col[RX], res[RO];
    for (int i = 0; i < RX; ++i) col[i] = x[i][j];
    Apply<TRANSPOSE>(left, col, res);
    for (int i = 0; i < RO; ++i) tmp[i][j] = res[i];
  }
#pragma GCC unroll 8
  for (int i = 0; i < RO; ++i) Apply<TRANSPOSE>(right, tmp[i], out[i]);
}

// The transformed arrays hold T = n^2 planes (U[t], V[t], H[t], P[t], M[t]) that every transform
// writes and reads together. Planes a multiple of 4 KB apart share the same L1 and L2 sets (36
// streams, 8 ways), so each plane starts one cache line after the previous one would: F(4x4)'s
// weight transform at 512 -> 256 took 3.4 ms with plain strides.
constexpr int64_t kSkew = 16;
inline int64_t Skewed(int64_t plane) { return plane + kSkew; }

// Per calling thread, grown to the largest call and reused. 64-byte aligned: a large `new float[]`
// starts 16 bytes into a page, and every 16-float store then straddled two cache lines (the input
// transform was 20-30% slower).
struct WinogradScratch {
  struct Free {
    void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<float[], Free> data;
  int64_t size = 0;
  float* Get(int64_t n) {
    if (n > size) data.reset(new (std::align_val_t(64)) float[n]), size = n;
    return data.get();
  }
};

// The tiles of a VALID 3x3 conv of dilation d: input hp x wp, output ho x wo. A dilated conv is d^2
// undilated ones, one per phase (output rows and columns a + d i, b + d j read only input rows and
// columns a + d i', b + d j'), so a tile is M x M outputs d apart: its output (i, j) is at
// (r0 + d i, x0 + d j) of image `Image(n)`, its input window (i', j') at (r0 + d i', x0 + d j').
// Each phase has th x tw tiles (those of the phase with the most rows and columns; the others' last
// outputs fall outside and are neither read nor written).
template <int M>
struct WinogradTiles {
  int64_t hp, wp, d, ho, wo, th, tw;
  WinogradTiles(int64_t hp_, int64_t wp_, int64_t d_)
      : hp(hp_), wp(wp_), d(d_), ho(hp_ - 2 * d_), wo(wp_ - 2 * d_),
        th(((ho + d - 1) / d + M - 1) / M), tw(((wo + d - 1) / d + M - 1) / M) {}
  int64_t count(int64_t batch) const { return batch * d * d * th * tw; }
  int64_t Image(int64_t n) const { return n / (d * d * th * tw); }
  int64_t Row(int64_t n) const { return n / (d * th * tw) % d + d * M * (n / tw % th); }
  int64_t Col(int64_t n) const { return n / (th * tw) % d + d * M * (n % tw); }
};

// U[t][k / 64][c][k % 64] = (G w[:, :, c, k] G^T)[t]: the 64 outputs a product reads are one run
// of memory. Written 64 outputs at a time (36 streams advancing 256 bytes per input channel) and
// past the caches (U is 4x the kernel, 9.4 MB at 256 -> 256, and read once per t): 3.7 -> 0.8 ms
// at 512 -> 256 (one core, 2026-11-29).
template <int M>
void WinogradWeights(const float* w, float* u, int64_t C, int64_t K) {
  constexpr int N = Winograd<M>::N;
  for (int64_t k0 = 0; k0 < K; k0 += 64)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = k0; k < k0 + 64; k += 16) {
        v16 g[3][3], r[N][N];
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j) g[i][j] = Load(w + ((i * 3 + j) * C + c) * K + k);
        Apply2<false>(Winograd<M>::G, Winograd<M>::G, g, r);
        for (int t = 0; t < N * N; ++t)
          StoreStream(u + t * Skewed(C * K) + (k0 * C + c * 64) + k - k0, r[t / N][t % N]);
      }
}

// dst[t][n - first][c] = (L s L^T)[t] for the tiles n in [lo, hi), L = `mat` (TRANSPOSE: its
// transpose): s is the R x R window of `src` (h x w x C per image) at the tile's origin, d apart,
// zeros past its edge. The inputs' V = B^T d B (R = n), the output gradient's H = A g A^T (R = m).
template <int M, int R, bool TRANSPOSE, typename Mat>
void TransformTiles(const Mat& mat, const float* src, int64_t h, int64_t w, int64_t C, float* dst,
                    const WinogradTiles<M>& tl, int64_t first, int64_t count, int64_t lo,
                    int64_t hi) {
  constexpr int N = Winograd<M>::N;
  const int64_t d = tl.d;
  for (int64_t n = lo; n < hi; ++n) {
    const int64_t b = tl.Image(n), r0 = tl.Row(n), x0 = tl.Col(n);
    for (int64_t c = 0; c < C; c += 16) {
      v16 win[R][R], r[N][N];
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < R; ++j)
          win[i][j] = (r0 + d * i < h && x0 + d * j < w)
                          ? Load(src + ((b * h + r0 + d * i) * w + x0 + d * j) * C + c) : v16{};
      Apply2<TRANSPOSE>(mat, mat, win, r);
      for (int t = 0; t < N * N; ++t)
        Store(dst + t * Skewed(count * C) + (n - first) * C + c, r[t / N][t % N]);
    }
  }
}

template <int M>
void WinogradInputs(const float* x, float* v, const WinogradTiles<M>& tl, int64_t C, int64_t first,
                    int64_t count, int64_t lo, int64_t hi) {
  TransformTiles<M, Winograd<M>::N, false>(Winograd<M>::BT, x, tl.hp, tl.wp, C, v, tl, first,
                                           count, lo, hi);
}

// The products of one t for the tiles [0, np) of a group (np <= 6; `vt` at its first tile's V[t]) x
// 64 outputs (`ut` at U[t][k0 / 64]), into rows [0, np) of `mt` (row stride K, at M[t][n][k0]).
template <bool FULL>
inline void WinogradProduct(const float* __restrict vt, const float* __restrict ut,
                            float* __restrict mt, int64_t C, int64_t K, int np) {
  constexpr int PB = kWidePB, KB = kWideKB;
  v16 acc[PB][KB];
  for (int p = 0; p < PB; ++p)
    for (int q = 0; q < KB; ++q) acc[p][q] = v16{};
#pragma GCC unroll 4
  for (int64_t c = 0; c < C; ++c) {
    v16 wv[KB];
    for (int q = 0; q < KB; ++q) wv[q] = Load(ut + c * 16 * KB + 16 * q);
    for (int p = 0; p < PB; ++p)
      if (FULL || p < np) {
        const v16 s = Splat(vt[p * C + c]);
        for (int q = 0; q < KB; ++q) acc[p][q] += s * wv[q];
      }
  }
  for (int p = 0; p < PB; ++p)
    if (FULL || p < np)
      for (int q = 0; q < KB; ++q) Store(mt + p * K + 16 * q, acc[p][q]);
}

// The products run t-major: t's planes U[t] (C x K) and V[t] (tiles x C) stay in L2 while all of
// M[t] is computed, so each is read from memory once per chunk. (Taking every t of a few tiles at
// a time read U once per 6 tiles; F(4x4) was then no faster than F(2x2): 7.4 against 7.0 ms per
// call at 256 -> 256, 32 px, one core.) Items are (t, 64 outputs, run of kWinogradRun tiles).
constexpr int kWinogradRun = 48;

template <int M>
void WinogradForward(ffi::ThreadPool& pool, const float* x, const float* w, float* y,
                     int64_t batch, int64_t hp, int64_t wp, int64_t C, int64_t K, int64_t d) {
  constexpr int PB = kWidePB, KC = 16 * kWideKB, N = Winograd<M>::N, T = N * N;
  constexpr int RUN = kWinogradRun;
  const WinogradTiles<M> tl(hp, wp, d);
  const int64_t n_all = tl.count(batch);
  const int64_t chunk = std::min(n_all, std::max<int64_t>(PB, kWinogradFloats / (T * (C + K))));
  static thread_local WinogradScratch scratch;
  float* u = scratch.Get(T * (Skewed(C * K) + Skewed(chunk * C) + Skewed(chunk * K)));
  float* v = u + T * Skewed(C * K);
  float* m = v + T * Skewed(chunk * C);
  WinogradWeights<M>(w, u, C, K);
  for (int64_t first = 0; first < n_all; first += chunk) {
    const int64_t count = std::min(chunk, n_all - first), runs = (count + RUN - 1) / RUN;
    const int64_t vs = Skewed(count * C), ms = Skewed(count * K);
    ParallelFor(pool, count, 16 * T * C, [&](int64_t lo, int64_t hi) {
      WinogradInputs<M>(x, v, tl, C, first, count, first + lo, first + hi);
    });
    ParallelFor(pool, T * (K / KC) * runs, RUN * C * KC, [&](int64_t lo, int64_t hi) {
      for (int64_t item = lo; item < hi; ++item) {
        const int t = int(item / (K / KC * runs));
        const int64_t k0 = item / runs % (K / KC) * KC, n0 = item % runs * RUN;
        const int64_t n1 = std::min(count, n0 + RUN);
        const float* ut = u + t * Skewed(C * K) + k0 * C;
        for (int64_t n = n0; n < n1; n += PB) {
          const float* vt = v + t * vs + n * C;
          float* mt = m + t * ms + n * K + k0;
          if (n + PB <= n1)
            WinogradProduct<true>(vt, ut, mt, C, K, PB);
          else
            WinogradProduct<false>(vt, ut, mt, C, K, int(n1 - n));
        }
      }
    });
    // y = A^T M A per tile, where the outputs exist.
    ParallelFor(pool, count, T * K, [&](int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        const int64_t b = tl.Image(first + n), r0 = tl.Row(first + n), x0 = tl.Col(first + n);
        for (int64_t k = 0; k < K; k += 16) {
          v16 e[N][N], o[M][M];
          for (int t = 0; t < T; ++t) e[t / N][t % N] = Load(m + t * ms + n * K + k);
          Apply2<false>(Winograd<M>::AT, Winograd<M>::AT, e, o);
          for (int i = 0; i < M && r0 + tl.d * i < tl.ho; ++i)
            for (int j = 0; j < M && x0 + tl.d * j < tl.wo; ++j)
              Store(y + ((b * tl.ho + r0 + tl.d * i) * tl.wo + x0 + tl.d * j) * K + k, o[i][j]);
        }
      }
    });
  }
}

// The kernel gradient the same way, F(3x3, m x m): an m x m tile of the output gradient g and the
// n x n input window it reads give a 3x3 contribution dw += G^T [(A g A^T) . (B^T d B)] G, with the
// forward's matrices (the transpose of its identity: sum_y g y = sum_w w dw for every w). The
// products are summed over a chunk's tiles first, P[t][c][k] = sum_n V[t][n][c] H[t][n][k], and
// transformed once per chunk.

template <int M>
void WinogradGradTiles(const float* g, float* hbuf, const WinogradTiles<M>& tl, int64_t K,
                       int64_t first, int64_t count, int64_t lo, int64_t hi) {
  TransformTiles<M, M, true>(Winograd<M>::AT, g, tl.ho, tl.wo, K, hbuf, tl, first, count, lo, hi);
}

// pt[q][0 .. 64] (row stride 64) = sum over the chunk's tiles n of V[t][n][c0 + q] H[t][n][k0 ..
// k0 + 64], q < CB; `vt` at V[t][0][c0], `ht` at H[t][0][k0].
template <int CB>
void WinogradGradProduct(const float* __restrict vt, const float* __restrict ht,
                         float* __restrict pt, int64_t C, int64_t K, int64_t count) {
  constexpr int KB = kWideKB;
  v16 acc[CB][KB];
  for (int q = 0; q < CB; ++q)
    for (int k = 0; k < KB; ++k) acc[q][k] = v16{};
#pragma GCC unroll 2
  for (int64_t n = 0; n < count; ++n) {
    v16 hv[KB];
    for (int k = 0; k < KB; ++k) hv[k] = Load(ht + n * K + 16 * k);
    for (int q = 0; q < CB; ++q) {
      const v16 s = Splat(vt[n * C + q]);
      for (int k = 0; k < KB; ++k) acc[q][k] += s * hv[k];
    }
  }
  for (int q = 0; q < CB; ++q)
    for (int k = 0; k < KB; ++k) Store(pt + q * 16 * KB + 16 * k, acc[q][k]);
}

// Items are (64 outputs, kWinogradGradChannels inputs): for every t the products of the item's
// channels, in blocks of 6 (the last holds C % 6: 0, 2 or 4), into P[t][c][64] (442 KB, in L2),
// then G^T P G into dw (added to it after the first chunk). (With all of P, 36 C K floats, in
// memory and transformed at the end, the transform waited on memory: 1.2-1.4 of 6.2 ms per
// call at 256 -> 256, 32 px; now 4.5 ms.) Each item reads its t's tiles of V and H again, so
// chunks are short: at most kWinogradGradTiles tiles (64: 17.8 ms at batch 4, 128: 15.9, the
// whole batch in one chunk: 22.8, one core).
constexpr int kWinogradGradChannels = 48;
constexpr int kWinogradGradTiles = 128;

template <int M>
void WinogradKernelGrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dw,
                        int64_t batch, int64_t hp, int64_t wp, int64_t C, int64_t K,
                        int64_t d) {
  constexpr int KC = 16 * kWideKB, N = Winograd<M>::N, T = N * N, CR = kWinogradGradChannels;
  const WinogradTiles<M> tl(hp, wp, d);
  const int64_t n_all = tl.count(batch), ranges = (C + CR - 1) / CR;
  if (n_all == 0) {  // an empty batch: no tiles to sum
    std::memset(dw, 0, 9 * C * K * sizeof(float));
    return;
  }
  const int64_t chunk = std::min(
      n_all, std::max<int64_t>(kWidePB, std::min<int64_t>(kWinogradGradTiles,
                                                          kWinogradFloats / (T * (C + K)))));
  static thread_local WinogradScratch scratch;
  float* v = scratch.Get(T * (Skewed(chunk * C) + Skewed(chunk * K)));
  float* hbuf = v + T * Skewed(chunk * C);
  for (int64_t first = 0; first < n_all; first += chunk) {
    const int64_t count = std::min(chunk, n_all - first);
    const int64_t vs = Skewed(count * C), hs = Skewed(count * K);
    ParallelFor(pool, count, 16 * T * (C + K), [&](int64_t lo, int64_t hi) {
      WinogradInputs<M>(x, v, tl, C, first, count, first + lo, first + hi);
      WinogradGradTiles<M>(g, hbuf, tl, K, first, count, first + lo, first + hi);
    });
    ParallelFor(pool, K / KC * ranges, T * count * CR * KC, [&](int64_t lo, int64_t hi) {
      static thread_local WinogradScratch local;
      float* p = local.Get(T * Skewed(CR * KC));
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t k0 = item / ranges * KC, c_lo = item % ranges * CR;
        const int64_t c_hi = std::min(C, c_lo + CR);
        for (int t = 0; t < T; ++t)
          for (int64_t c0 = c_lo; c0 < c_hi; c0 += 6) {
            const auto product = c_hi - c0 >= 6   ? WinogradGradProduct<6>
                                 : c_hi - c0 == 4 ? WinogradGradProduct<4>
                                                  : WinogradGradProduct<2>;
            product(v + t * vs + c0, hbuf + t * hs + k0, p + t * Skewed(CR * KC) + (c0 - c_lo) * KC,
                    C, K, count);
          }
        for (int64_t c = c_lo; c < c_hi; ++c)
          for (int k = 0; k < KC; k += 16) {
            v16 m[N][N], r[3][3];
            for (int t = 0; t < T; ++t)
              m[t / N][t % N] = Load(p + t * Skewed(CR * KC) + (c - c_lo) * KC + k);
            Apply2<true>(Winograd<M>::G, Winograd<M>::G, m, r);
            for (int t = 0; t < 9; ++t) {
              float* out = dw + (t * C + c) * K + k0 + k;
              Store(out, first > 0 ? Load(out) + r[t / 3][t % 3] : r[t / 3][t % 3]);
            }
          }
      }
    });
  }
}

// Winograd takes the stride-1 convs (any dilation) of a multiple of 16 input and 64 output
// channels: every wide one, and with 512-bit vectors (where its register tile does not spill) the
// compiled widths' too (one core, 64 -> 64 at 64 px: forward 2.7 -> 1.1 ms, kernel gradient 3.4 ->
// 1.0 ms).
inline bool UseWinograd(int64_t c, int64_t k, int64_t stride) {
  return Wide(c, k) && stride == 1 && (!Compiled(c, k) || kVectorBits >= 512);
}

// Channel counts compiled in; cpu_kernels.py's CHANNELS_IN / CHANNELS_OUT must list the same.
#define AGCG_FOR_CHANNELS(FN, C, K, ...)                                                \
  switch ((C) * 1000 + (K)) {                                                           \
    case 8016: FN<8, 1>(__VA_ARGS__); break;                                            \
    case 16016: FN<16, 1>(__VA_ARGS__); break;                                          \
    case 32016: FN<32, 1>(__VA_ARGS__); break;                                          \
    case 64016: FN<64, 1>(__VA_ARGS__); break;                                          \
    case 8032: FN<8, 2>(__VA_ARGS__); break;                                            \
    case 16032: FN<16, 2>(__VA_ARGS__); break;                                          \
    case 32032: FN<32, 2>(__VA_ARGS__); break;                                          \
    case 64032: FN<64, 2>(__VA_ARGS__); break;                                          \
    case 8064: FN<8, 4>(__VA_ARGS__); break;                                            \
    case 16064: FN<16, 4>(__VA_ARGS__); break;                                          \
    case 32064: FN<32, 4>(__VA_ARGS__); break;                                          \
    case 64064: FN<64, 4>(__VA_ARGS__); break;                                          \
    default: return ffi::Error::InvalidArgument("agcg direct conv: channel counts not supported"); \
  }

ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                       ffi::Span<const int64_t> y, int64_t d, int64_t s) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || w[0] != 3 || w[1] != 3 || w[2] != x[3] ||
      d < 1 || (s != 1 && s != 2) || x[1] <= 2 * d || x[2] <= 2 * d || y[0] != x[0] ||
      y[1] != (x[1] - 2 * d - 1) / s + 1 || y[2] != (x[2] - 2 * d - 1) / s + 1 || y[3] != w[3])
    return ffi::Error::InvalidArgument("agcg direct conv: shapes do not match a 3x3 VALID conv");
  return ffi::Error::Success();
}

ffi::Error ForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t dilation, int64_t stride) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto err = CheckShapes(xd, wd, yd, dilation, stride); err.failure()) return err;
  if (UseWinograd(xd[3], wd[3], stride)) {
    WinogradForward<4>(pool, x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], xd[2],
                       xd[3], wd[3], dilation);
    return ffi::Error::Success();
  }
  if (!Compiled(xd[3], wd[3]) && Wide(xd[3], wd[3])) {  // stride 2
    WideForward<2>(pool, x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], xd[2],
                   yd[1], yd[2], xd[3], wd[3], dilation);
    return ffi::Error::Success();
  }
  AGCG_FOR_CHANNELS(Forward, xd[3], wd[3], pool, x.typed_data(), w.typed_data(), y->typed_data(),
                    xd[0], xd[1], xd[2], yd[1], yd[2], dilation, stride);
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t dilation, int64_t stride) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (auto err = CheckShapes(xd, wd, gd, dilation, stride); err.failure()) return err;
  if (UseWinograd(xd[3], gd[3], stride)) {
    WinogradKernelGrad<4>(pool, x.typed_data(), g.typed_data(), dw->typed_data(), xd[0], xd[1],
                          xd[2], xd[3], gd[3], dilation);
    return ffi::Error::Success();
  }
  if (!Compiled(xd[3], gd[3]) && Wide(xd[3], gd[3])) {  // stride 2
    WideKernelGrad<2>(pool, x.typed_data(), g.typed_data(), dw->typed_data(), xd[0], xd[1], xd[2],
                      gd[1], gd[2], xd[3], gd[3], dilation);
    return ffi::Error::Success();
  }
  AGCG_FOR_CHANNELS(KernelGrad, xd[3], gd[3], pool, x.typed_data(), g.typed_data(),
                    dw->typed_data(), xd[0], xd[1], xd[2], gd[1], gd[2], dilation, stride);
  return ffi::Error::Success();
}


// ---- Thin k x k convolutions: one input channel (1 -> F) or one output channel (C -> 1) ----
// The generator's and attention net's first and last 7x7 layers at full resolution. Stride 1, no
// dilation, input already padded; F and C multiples of 8, held in 8-float vectors.
//   in  forward      y[b, r, x, f] = sum_{i, j} in[b, r + i, x + j] w[i, j, f]
//       kernel grad  dw[i, j, f]   = sum_{b, r, x} in[b, r + i, x + j] g[b, r, x, f]
//   out forward      y[b, r, x]    = sum_i sum_{t < KS C} in[b, r + i, x C + t] w[i, t]
//                    (row i of the window and of the kernel are both KS * C contiguous floats)
//       kernel grad  dw[i, t]      = sum_{b, r, x} g[b, r, x] in[b, r + i, x C + t]
// The input gradient of each is the forward of the other (cpu_kernels.py).
typedef float v8 __attribute__((vector_size(32)));

inline v8 Splat8(float a) { return v8{a, a, a, a, a, a, a, a}; }  // see Splat
inline v8 Load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// PB consecutive output pixels x F channels in registers; `in` is the window's top-left pixel.
template <int KS, int F, int PB, bool FULL>
inline void ThinInTile(const float* __restrict in, const float* __restrict w,
                       float* __restrict out, int64_t wp, int np) {
  constexpr int FB = F / 8;
  v8 acc[PB][FB];
  for (int p = 0; p < PB; ++p)
    for (int q = 0; q < FB; ++q) acc[p][q] = v8{};
  for (int i = 0; i < KS; ++i)
    for (int j = 0; j < KS; ++j) {
      const float* row = in + i * wp + j;
      v8 wv[FB];
      for (int q = 0; q < FB; ++q) wv[q] = Load8(w + (i * KS + j) * F + 8 * q);
      for (int p = 0; p < PB; ++p)
        if (FULL || p < np) {
          const v8 v = Splat8(row[p]);
          for (int q = 0; q < FB; ++q) acc[p][q] += v * wv[q];
        }
    }
  for (int p = 0; p < PB; ++p)
    if (FULL || p < np)
      for (int q = 0; q < FB; ++q) Store8(out + p * F + 8 * q, acc[p][q]);
}

template <int KS, int F>
void ThinInForward(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t batch,
                   int64_t hp, int64_t wp, int64_t h, int64_t wo) {
  constexpr int PB = F >= 64 ? 2 : 128 / F;
  ParallelFor(pool, batch * h, wo * KS * KS * F, [&](int64_t lo, int64_t hi) {
    for (int64_t br = lo; br < hi; ++br) {
      const int64_t b = br / h, r = br % h;
      const float* in = x + (b * hp + r) * wp;
      float* out = y + br * wo * F;
      int64_t x0 = 0;
      for (; x0 + PB <= wo; x0 += PB) ThinInTile<KS, F, PB, true>(in + x0, w, out + x0 * F, wp, PB);
      if (x0 < wo) ThinInTile<KS, F, PB, false>(in + x0, w, out + x0 * F, wp, int(wo - x0));
    }
  });
}

// Kernel row i, FBB blocks of 8 output channels from f0: KS x FBB accumulators.
template <int KS, int F, int FBB>
void ThinInKernelGradPass(const float* __restrict x, const float* __restrict g,
                          float* __restrict dw, int64_t batch, int64_t hp, int64_t wp, int64_t h,
                          int64_t wo, int i, int f0) {
  v8 acc[KS][FBB];
  for (int j = 0; j < KS; ++j)
    for (int q = 0; q < FBB; ++q) acc[j][q] = v8{};
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < h; ++r) {
      const float* in = x + (b * hp + r + i) * wp;
      const float* gr = g + (b * h + r) * wo * F + f0;
      for (int64_t col = 0; col < wo; ++col) {
        v8 gv[FBB];
        for (int q = 0; q < FBB; ++q) gv[q] = Load8(gr + col * F + 8 * q);
        for (int j = 0; j < KS; ++j) {
          const v8 v = Splat8(in[col + j]);
          for (int q = 0; q < FBB; ++q) acc[j][q] += v * gv[q];
        }
      }
    }
  for (int j = 0; j < KS; ++j)
    for (int q = 0; q < FBB; ++q) Store8(dw + (i * KS + j) * F + f0 + 8 * q, acc[j][q]);
}

template <int KS, int F>
void ThinInKernelGrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dw,
                      int64_t batch, int64_t hp, int64_t wp, int64_t h, int64_t wo) {
  constexpr int FBB = F >= 16 ? 2 : 1, NG = F / 8 / FBB;
  ParallelFor(pool, KS * NG, batch * h * wo * KS * 8 * FBB, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u)
      ThinInKernelGradPass<KS, F, FBB>(x, g, dw, batch, hp, wp, h, wo, int(u / NG),
                                       int(u % NG) * 8 * FBB);
  });
}

// PB consecutive output pixels, each a dot product of KS rows of KS * C floats.
template <int KS, int C, int PB, bool FULL>
inline void ThinOutTile(const float* __restrict in, const float* __restrict w,
                        float* __restrict out, int64_t wp, int np) {
  constexpr int L = KS * C / 8;
  v8 acc[PB];
  for (int p = 0; p < PB; ++p) acc[p] = v8{};
  for (int i = 0; i < KS; ++i) {
    const float* row = in + i * wp * C;
    const float* wr = w + i * KS * C;
#pragma GCC unroll 8
    for (int u = 0; u < L; ++u) {
      const v8 wv = Load8(wr + 8 * u);
      for (int p = 0; p < PB; ++p)
        if (FULL || p < np) acc[p] += Load8(row + p * C + 8 * u) * wv;
    }
  }
  for (int p = 0; p < PB; ++p)
    if (FULL || p < np) {
      float s = 0.0f;
      for (int e = 0; e < 8; ++e) s += acc[p][e];
      out[p] = s;
    }
}

template <int KS, int C>
void ThinOutForward(ffi::ThreadPool& pool, const float* x, const float* w, float* y, int64_t batch,
                    int64_t hp, int64_t wp, int64_t h, int64_t wo) {
  constexpr int PB = 8;
  ParallelFor(pool, batch * h, wo * KS * KS * C, [&](int64_t lo, int64_t hi) {
    for (int64_t br = lo; br < hi; ++br) {
      const int64_t b = br / h, r = br % h;
      const float* in = x + (b * hp + r) * wp * C;
      float* out = y + br * wo;
      int64_t x0 = 0;
      for (; x0 + PB <= wo; x0 += PB)
        ThinOutTile<KS, C, PB, true>(in + x0 * C, w, out + x0, wp, PB);
      if (x0 < wo) ThinOutTile<KS, C, PB, false>(in + x0 * C, w, out + x0, wp, int(wo - x0));
    }
  });
}

// Kernel row i, UB vectors of it from u0: UB accumulators.
template <int KS, int C, int UB>
void ThinOutKernelGradPass(const float* __restrict x, const float* __restrict g,
                           float* __restrict dw, int64_t batch, int64_t hp, int64_t wp, int64_t h,
                           int64_t wo, int i, int u0) {
  v8 acc[UB];
  for (int u = 0; u < UB; ++u) acc[u] = v8{};
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < h; ++r) {
      const float* in = x + (b * hp + r + i) * wp * C + 8 * u0;
      const float* gr = g + (b * h + r) * wo;
      for (int64_t col = 0; col < wo; ++col) {
        const v8 v = Splat8(gr[col]);
        for (int u = 0; u < UB; ++u) acc[u] += v * Load8(in + col * C + 8 * u);
      }
    }
  for (int u = 0; u < UB; ++u) Store8(dw + i * KS * C + 8 * (u0 + u), acc[u]);
}

template <int KS, int C>
void ThinOutKernelGrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dw,
                       int64_t batch, int64_t hp, int64_t wp, int64_t h, int64_t wo) {
  constexpr int L = KS * C / 8, UB = L <= 16 ? L : (L % 14 == 0 ? 14 : 8);
  static_assert(L % UB == 0, "kernel row not a whole number of passes");
  constexpr int NG = L / UB;
  ParallelFor(pool, KS * NG, batch * h * wo * 8 * UB, [&](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u)
      ThinOutKernelGradPass<KS, C, UB>(x, g, dw, batch, hp, wp, h, wo, int(u / NG),
                                       int(u % NG) * UB);
  });
}

// Kernel sizes and channel counts compiled in; cpu_kernels.py's THIN_KERNEL / THIN_CHANNELS must
// list the same. CH is F for the one-input-channel kernels, C for the one-output-channel ones.
#define AGCG_FOR_THIN(FN, KS, CH, ...)                                                    \
  switch ((KS) * 1000 + (CH)) {                                                           \
    case 7008: FN<7, 8>(__VA_ARGS__); break;                                              \
    case 7016: FN<7, 16>(__VA_ARGS__); break;                                             \
    case 7032: FN<7, 32>(__VA_ARGS__); break;                                             \
    case 7064: FN<7, 64>(__VA_ARGS__); break;                                             \
    default: return ffi::Error::InvalidArgument("agcg thin conv: size or channels not compiled in"); \
  }

// x [B, Hp, Wp, C] and w [k, k, C, F] with C == 1 or F == 1; y [B, Hp - k + 1, Wp - k + 1, F].
ffi::Error CheckThin(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                     ffi::Span<const int64_t> y) {
  if (x.size() != 4 || w.size() != 4 || y.size() != 4 || w[0] != w[1] || w[2] != x[3] ||
      y[0] != x[0] || y[1] != x[1] - w[0] + 1 || y[2] != x[2] - w[0] + 1 || y[3] != w[3] ||
      (w[2] != 1 && w[3] != 1))
    return ffi::Error::InvalidArgument("agcg thin conv: shapes do not match a thin VALID conv");
  return ffi::Error::Success();
}

ffi::Error ThinForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto err = CheckThin(xd, wd, yd); err.failure()) return err;
  if (wd[2] == 1) {
    AGCG_FOR_THIN(ThinInForward, wd[0], wd[3], pool, x.typed_data(), w.typed_data(),
                  y->typed_data(), xd[0], xd[1], xd[2], yd[1], yd[2]);
  } else {
    AGCG_FOR_THIN(ThinOutForward, wd[0], wd[2], pool, x.typed_data(), w.typed_data(),
                  y->typed_data(), xd[0], xd[1], xd[2], yd[1], yd[2]);
  }
  return ffi::Error::Success();
}

ffi::Error ThinKernelGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (auto err = CheckThin(xd, wd, gd); err.failure()) return err;
  if (wd[2] == 1) {
    AGCG_FOR_THIN(ThinInKernelGrad, wd[0], wd[3], pool, x.typed_data(), g.typed_data(),
                  dw->typed_data(), xd[0], xd[1], xd[2], gd[1], gd[2]);
  } else {
    AGCG_FOR_THIN(ThinOutKernelGrad, wd[0], wd[2], pool, x.typed_data(), g.typed_data(),
                  dw->typed_data(), xd[0], xd[1], xd[2], gd[1], gd[2]);
  }
  return ffi::Error::Success();
}


// ---- Padding H and W of an NHWC array by p: 'reflect' (numpy's, edge not repeated) or zeros ----
//   forward   y[b, r, x, c] = in[b, m(r - p, H), m(x - p, W), c], m reflecting (or 0 outside)
//   backward  (reflect) dx[b, i, j, c] = sum of g over the padded pixels that read (i, j)
// XLA:CPU runs both as per-element loops at ~2 GB/s on these channel counts; here they are row
// copies and row adds. Needs p < H and p < W (cpu_kernels.py checks).
inline int64_t Mirror(int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * (n - 1) - i : i); }

void PadForward(const float* x, float* y, int64_t batch, int64_t h, int64_t w, int64_t c,
                int64_t p, bool reflect) {
  const int64_t hp = h + 2 * p, wp = w + 2 * p, pixel = c * sizeof(float);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < hp; ++r) {
      float* dst = y + (b * hp + r) * wp * c;
      const int64_t sr = r - p;
      if (!reflect && (sr < 0 || sr >= h)) {
        std::memset(dst, 0, wp * pixel);
        continue;
      }
      const float* src = x + (b * h + Mirror(sr, h)) * w * c;
      for (int64_t e = 0; e < p; ++e) {  // the left and right borders
        if (reflect) {
          std::memcpy(dst + e * c, src + (p - e) * c, pixel);
          std::memcpy(dst + (p + w + e) * c, src + (w - 2 - e) * c, pixel);
        } else {
          std::memset(dst + e * c, 0, pixel);
          std::memset(dst + (p + w + e) * c, 0, pixel);
        }
      }
      std::memcpy(dst + p * c, src, w * pixel);
    }
}

void PadBackwardReflect(const float* g, float* dx, int64_t batch, int64_t h, int64_t w, int64_t c,
                        int64_t p) {
  const int64_t hp = h + 2 * p, wp = w + 2 * p;
  std::memset(dx, 0, batch * h * w * c * sizeof(float));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < hp; ++r) {
      const float* src = g + (b * hp + r) * wp * c;
      float* dst = dx + (b * h + Mirror(r - p, h)) * w * c;
      for (int64_t e = 0; e < w * c; ++e) dst[e] += src[p * c + e];
      for (int64_t e = 0; e < p; ++e)
        for (int64_t k = 0; k < c; ++k) {
          dst[(p - e) * c + k] += src[e * c + k];
          dst[(w - 2 - e) * c + k] += src[(p + w + e) * c + k];
        }
    }
}

ffi::Error PadForwardImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y, int64_t pad,
                          int64_t reflect) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || pad < 0 || pad >= xd[1] || pad >= xd[2] ||
      yd[0] != xd[0] || yd[1] != xd[1] + 2 * pad || yd[2] != xd[2] + 2 * pad || yd[3] != xd[3])
    return ffi::Error::InvalidArgument("agcg pad: shapes do not match [B, H, W, C] padded by p");
  PadForward(x.typed_data(), y->typed_data(), xd[0], xd[1], xd[2], xd[3], pad, reflect != 0);
  return ffi::Error::Success();
}

ffi::Error PadBackwardImpl(ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx, int64_t pad) {
  auto gd = g.dimensions(), xd = dx->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || pad < 0 || pad >= xd[1] || pad >= xd[2] ||
      gd[0] != xd[0] || gd[1] != xd[1] + 2 * pad || gd[2] != xd[2] + 2 * pad || gd[3] != xd[3])
    return ffi::Error::InvalidArgument("agcg pad: shapes do not match [B, H, W, C] padded by p");
  PadBackwardReflect(g.typed_data(), dx->typed_data(), xd[0], xd[1], xd[2], xd[3], pad);
  return ffi::Error::Success();
}

// ---- Instance norm over (H, W) per image and channel, NHWC ----
//   forward   y = (x - mean) * rstd * scale + bias, rstd = 1 / sqrt(var + eps) (two-pass variance);
//             also returns mean and rstd [B, C] for the backward.
//   backward  with xhat = (x - mean) * rstd and P pixels per image:
//             dbias = sum g, dscale = sum g * xhat (over B, H, W),
//             dx = rstd * scale * (g - sum_p(g) / P - xhat * sum_p(g * xhat) / P).
// Channels are the inner, vectorised loop; C is a template parameter (cpu_kernels.py's NORM_CHANNELS).
template <int C>
void NormForward(const float* x, const float* scale, const float* bias, float* y, float* mean,
                 float* rstd, int64_t batch, int64_t pixels, float eps) {
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * pixels * C;
    float* yb = y + b * pixels * C;
    float m[C] = {}, v[C] = {}, r[C], a[C], s[C];
    for (int64_t p = 0; p < pixels; ++p)
      for (int c = 0; c < C; ++c) m[c] += xb[p * C + c];
    for (int c = 0; c < C; ++c) m[c] /= pixels;
    for (int64_t p = 0; p < pixels; ++p)
      for (int c = 0; c < C; ++c) {
        const float t = xb[p * C + c] - m[c];
        v[c] += t * t;
      }
    for (int c = 0; c < C; ++c) {
      r[c] = 1.0f / std::sqrt(v[c] / pixels + eps);
      a[c] = r[c] * scale[c];
      s[c] = bias[c] - m[c] * a[c];
      mean[b * C + c] = m[c];
      rstd[b * C + c] = r[c];
    }
    for (int64_t p = 0; p < pixels; ++p)
      for (int c = 0; c < C; ++c) yb[p * C + c] = xb[p * C + c] * a[c] + s[c];
  }
}

template <int C>
void NormBackward(const float* x, const float* scale, const float* mean, const float* rstd,
                  const float* g, float* dx, float* dscale, float* dbias, int64_t batch,
                  int64_t pixels) {
  for (int c = 0; c < C; ++c) dscale[c] = dbias[c] = 0.0f;
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = x + b * pixels * C;
    const float* gb = g + b * pixels * C;
    float* db = dx + b * pixels * C;
    const float* m = mean + b * C;
    const float* r = rstd + b * C;
    float sg[C] = {}, sgx[C] = {}, k[C], kg[C], kx[C];
    for (int64_t p = 0; p < pixels; ++p)
      for (int c = 0; c < C; ++c) {
        sg[c] += gb[p * C + c];
        sgx[c] += gb[p * C + c] * (xb[p * C + c] - m[c]);
      }
    for (int c = 0; c < C; ++c) {
      sgx[c] *= r[c];  // sum g * xhat
      dbias[c] += sg[c];
      dscale[c] += sgx[c];
      k[c] = r[c] * scale[c];
      kg[c] = k[c] * sg[c] / pixels;
      kx[c] = k[c] * sgx[c] / pixels * r[c];  // on (x - mean)
    }
    for (int64_t p = 0; p < pixels; ++p)
      for (int c = 0; c < C; ++c)
        db[p * C + c] = k[c] * gb[p * C + c] - kg[c] - kx[c] * (xb[p * C + c] - m[c]);
  }
}

#define AGCG_FOR_NORM_CHANNELS(FN, C, ...)                                                 \
  switch (C) {                                                                             \
    case 8: FN<8>(__VA_ARGS__); break;                                                     \
    case 16: FN<16>(__VA_ARGS__); break;                                                   \
    case 32: FN<32>(__VA_ARGS__); break;                                                   \
    case 64: FN<64>(__VA_ARGS__); break;                                                   \
    case 128: FN<128>(__VA_ARGS__); break;                                                 \
    case 256: FN<256>(__VA_ARGS__); break;                                                 \
    default: return ffi::Error::InvalidArgument("agcg instance norm: channels not compiled in"); \
  }

ffi::Error NormForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                           ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                           float epsilon) {
  auto xd = x.dimensions();
  if (xd.size() != 4 || scale.element_count() != xd[3] || bias.element_count() != xd[3])
    return ffi::Error::InvalidArgument("agcg instance norm: shapes do not match [B, H, W, C]");
  AGCG_FOR_NORM_CHANNELS(NormForward, xd[3], x.typed_data(), scale.typed_data(), bias.typed_data(),
                         y->typed_data(), mean->typed_data(), rstd->typed_data(), xd[0],
                         xd[1] * xd[2], epsilon);
  return ffi::Error::Success();
}

ffi::Error NormBackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                            ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dx,
                            ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias) {
  auto xd = x.dimensions();
  if (xd.size() != 4 || scale.element_count() != xd[3] || g.element_count() != x.element_count() ||
      mean.element_count() != xd[0] * xd[3] || rstd.element_count() != xd[0] * xd[3])
    return ffi::Error::InvalidArgument("agcg instance norm: shapes do not match [B, H, W, C]");
  AGCG_FOR_NORM_CHANNELS(NormBackward, xd[3], x.typed_data(), scale.typed_data(),
                         mean.typed_data(), rstd.typed_data(), g.typed_data(), dx->typed_data(),
                         dscale->typed_data(), dbias->typed_data(), xd[0], xd[1] * xd[2]);
  return ffi::Error::Success();
}

}  // namespace

// Both conv handlers: the pool, two float32 arrays in, one out, the dilation and the stride.
static auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("dilation")
      .Attr<int64_t>("stride");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgConv3x3Forward, ForwardImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgConv3x3KernelGrad, KernelGradImpl, ConvBinding());

// Both thin conv handlers: the pool, two float32 arrays in, one out.
static auto ThinBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgThinForward, ThinForwardImpl, ThinBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgThinKernelGrad, ThinKernelGradImpl, ThinBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgPadForward, PadForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad")
                                  .Attr<int64_t>("reflect"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgPadBackward, PadBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgInstanceNormForward, NormForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgcgInstanceNormBackward, NormBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int AgcgVectorBits() { return kVectorBits; }
