// The per-row kernels' accumulators and shared helpers (bf16 dot products, nibble unpacking).
#pragma once

#include "xprep.h"

#ifdef HAVE_BF16DOT
namespace levante {

template <int NR, int M>
struct Acc {
  __m512 v[NR][M][2];
  __m256 mn[NR][M];
  float s[NR][M];
  Acc() {
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < M; ++i) {
        v[j][i][0] = v[j][i][1] = _mm512_setzero_ps();
        mn[j][i] = _mm256_setzero_ps();
        s[j][i] = 0.f;
      }
  }
};

inline __m512 bdot(__m512i w, __m512i xh, __m512i xl) {
  __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, (__m512bh)xh);
  return _mm512_dpbf16_ps(t, (__m512bh)w, (__m512bh)xl);
}

// acc[j][i][P] += d[j] * (w[j] . x[i][e .. e+32))
template <int NR, int M, int P>
inline void dot_group(const __m512i (&w)[NR], const __m512 (&d)[NR], const XP& x, int64_t e, Acc<NR, M>& a) {
  for (int i = 0; i < M; ++i) {
    const __m512i xh = _mm512_loadu_si512(x.xh + i * x.k + e), xl = _mm512_loadu_si512(x.xl + i * x.k + e);
    for (int j = 0; j < NR; ++j) a.v[j][i][P] = _mm512_fmadd_ps(d[j], bdot(w[j], xh, xl), a.v[j][i][P]);
  }
}

// 16 bytes -> 32 words: [bytes (low nibble in bits 0-3), bytes >> 4]
inline __m512i nib32(const uint8_t* q) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
  return _mm512_inserti64x4(_mm512_castsi256_si512(w), _mm256_srli_epi16(w, 4), 1);
}
inline __m512i u8w(const uint8_t* q) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)q)); }
inline __m512 bc_h(const uint8_t* p) { return _mm512_set1_ps(h2f(p)); }

}  // namespace levante
#endif  // HAVE_BF16DOT
