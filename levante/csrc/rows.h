// The per-row small-batch kernels' driver: one weight row (or 2 / 4 at m == 1) per pass, x rows in groups of
// up to 4, for the GGML types with an integer kernel (block32.h, kquant.h).
#pragma once

#include "block32.h"
#include "kquant.h"

#ifdef HAVE_BF16DOT
namespace levante {

template <class T, class = void>
struct HasPair : std::false_type {};
template <class T>
struct HasPair<T, std::void_t<decltype(&T::template run2<1, 1>)>> : std::true_type {};

inline int g_pfd = 8192;  // software prefetch distance in bytes (0: off); measured best of 2-16 KB
template <class T, int NR, int M>
inline void rows_bf(const uint8_t* src, int64_t rb, int64_t r, const XP& x, float* y, int64_t ldy) {
  Acc<NR, M> a;
  const uint8_t* b[NR];
  for (int j = 0; j < NR; ++j) b[j] = src + (r + j) * rb;
  const int64_t nb = x.k / T::BL;
  // software prefetch: the NR rows are read as NR interleaved streams, which the hardware prefetcher
  // follows badly from DRAM; prefetch the (contiguous) row group linearly g_pfd bytes ahead instead
  const char* pfb = (const char*)(src + r * rb) + g_pfd;
  int64_t pfc = 0, used = 0;
  int64_t ib = 0;
  for (; ib + 2 <= nb; ib += 2) {
    if (NR > 1 && g_pfd) {  // a single row stream is prefetched well by the hardware (measured)
      used += 2 * NR * T::BY;
      for (; pfc < used; pfc += 64) _mm_prefetch(pfb + pfc, _MM_HINT_T0);
    }
    if constexpr (HasPair<T>::value) {
      if (g_pair) {
        T::template run2<NR, M>(b, x, ib * T::BL, a);
        for (int j = 0; j < NR; ++j) b[j] += 2 * T::BY;
        continue;
      }
    }
    T::template run<NR, M, 0>(b, x, ib * T::BL, a);
    for (int j = 0; j < NR; ++j) b[j] += T::BY;
    T::template run<NR, M, 1>(b, x, (ib + 1) * T::BL, a);
    for (int j = 0; j < NR; ++j) b[j] += T::BY;
  }
  if (ib < nb) T::template run<NR, M, 0>(b, x, ib * T::BL, a);
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < M; ++i) {
      const float mn = _mm512_reduce_add_ps(_mm512_insertf32x8(_mm512_setzero_ps(), a.mn[j][i], 0));
      y[i * ldy + r + j] = _mm512_reduce_add_ps(_mm512_add_ps(a.v[j][i][0], a.v[j][i][1])) + a.s[j][i] - mn;
    }
}

inline int g_nr1 = 0;  // 0: the type's NR1 (measured: 4 for Q4_0 / Q4_1, 1 for the others)
// one row range of one weight; x rows processed in groups of up to 4 per weight row
template <class T>
void range_bf(const uint8_t* src, int64_t rb, int64_t r0, int64_t r1, const XP& x, int64_t m, float* y, int64_t ldy) {
  if (m == 1) {
    int64_t r = r0;
    const int nr = g_nr1 ? g_nr1 : T::NR1;
    if (nr == 4)
      for (; r + 4 <= r1; r += 4) rows_bf<T, 4, 1>(src, rb, r, x, y, ldy);
    if (nr >= 2)
      for (; r + 2 <= r1; r += 2) rows_bf<T, 2, 1>(src, rb, r, x, y, ldy);
    for (; r < r1; ++r) rows_bf<T, 1, 1>(src, rb, r, x, y, ldy);
    return;
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
      XP xi = x;
      xi.xh += i0 * x.k;
      xi.xl += i0 * x.k;
      xi.xf += i0 * x.k;
      xi.xs += i0 * (x.k / 32);
      xi.q16 += i0 * x.k;
      xi.dx += i0 * (x.k / 32);
      xi.q16k += i0 * x.k;
      xi.dxk += i0 * (x.k / 256);
      xi.sk += i0 * (x.k / 32);
      xi.qs += i0 * (x.k / 32);
      xi.ks16 += i0 * (x.k / 16);
      xi.kl += i0 * x.k;
      xi.kh += i0 * x.k;
      xi.bl += i0 * x.k;
      xi.bh += i0 * x.k;
      float* yi = y + i0 * ldy;
      switch (std::min<int64_t>(4, m - i0)) {
        case 1: rows_bf<T, 1, 1>(src, rb, r, xi, yi, ldy); break;
        case 2: rows_bf<T, 1, 2>(src, rb, r, xi, yi, ldy); break;
        case 3: rows_bf<T, 1, 3>(src, rb, r, xi, yi, ldy); break;
        default: rows_bf<T, 1, 4>(src, rb, r, xi, yi, ldy); break;
      }
    }
}

// rows per parallel task: at least ~48 KB of weights (x rows count as extra work)
inline int64_t grain_rows(int64_t rb, int64_t m) {
  return std::max<int64_t>(4, (49152 / (1 + (m - 1) / 2) + rb - 1) / rb);
}

inline bool bf_type(int64_t qt) { return qt == 0 || qt == 1 || qt == 4 || qt == 7 || qt == 8 || qt == 9; }

inline void range_bf_any(int64_t qt, const uint8_t* src, int64_t rb, int64_t r0, int64_t r1, const XP& x, int64_t m,
                         float* y, int64_t ldy) {
  switch (qt) {
    case 0: range_bf<K_q4_0>(src, rb, r0, r1, x, m, y, ldy); break;
    case 1: range_bf<K_q4_1>(src, rb, r0, r1, x, m, y, ldy); break;
    case 4: range_bf<K_q8_0>(src, rb, r0, r1, x, m, y, ldy); break;
    case 7: range_bf<K_q4_k>(src, rb, r0, r1, x, m, y, ldy); break;
    case 8: range_bf<K_q5_k>(src, rb, r0, r1, x, m, y, ldy); break;
    case 9: range_bf<K_q6_k>(src, rb, r0, r1, x, m, y, ldy); break;
  }
}

}  // namespace levante
#endif  // HAVE_BF16DOT
