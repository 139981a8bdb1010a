// Per-row integer kernels for the 32-element block types: Q4_0 / Q4_1 (int16 pairs, two blocks per
// step) and Q8_0 (f32 products).
#pragma once

#include "acc.h"

#ifdef HAVE_BF16DOT
namespace levante {

// Q4_0 / Q4_1, two blocks per step with int16 dot products: x is quantized per 32-block to int16 (relative
// error <= 2^-16 of the block's largest |x|), codes q-8 are int16, vpdpwssd sums exact integer products.
// Blocks a and b share a register (lanes 0-7: a, 8-15: b), so one scale vector [da dxa x8, db dxb x8]
// and one FMA serve both blocks (x in the pair order, see XP::q16).
template <int BY_, bool MIN>  // Q4_0: 18-byte blocks (d, qs); Q4_1: 20-byte blocks (d, m, qs), w = d*q + m
struct K_q4p {
  static constexpr int BL = 32, BY = BY_;
  static constexpr int NR1 = 4;  // weight rows per step at m == 1

  // one block with the bf16-split dot products (a row's last odd block, or with the int16 kernels off)
  template <int NR, int M, int P>
  static inline void run(const uint8_t* const* b, const XP& x, int64_t e0, Acc<NR, M>& a) {
    const __m512i tab = _mm512_load_si512(TB.u4);
    __m512i w[NR];
    __m512 d[NR];
    for (int j = 0; j < NR; ++j) {
      d[j] = bc_h(b[j]);
      w[j] = _mm512_permutexvar_epi16(nib32(b[j] + BY - 16), tab);
      if constexpr (MIN) {
        const float m = h2f(b[j] + 2) + 8.f * h2f(b[j]);  // d*q + m = d*(q-8) + (m + 8d)
        for (int i = 0; i < M; ++i) a.s[j][i] += m * x.xs[i * (x.k / 32) + e0 / 32];
      }
    }
    dot_group<NR, M, P>(w, d, x, e0, a);
  }

  // two blocks with int16 dot products (see above)
  template <int NR, int M>
  static inline void run2(const uint8_t* const* b, const XP& x, int64_t e0, Acc<NR, M>& a) {
    const __m512i tab = _mm512_load_si512(TB.i4);
    __m512i wl[NR], wh[NR];
    __m512 d[NR], mn[NR];
    for (int j = 0; j < NR; ++j) {
      const __m128i qa = _mm_loadu_si128((const __m128i*)(b[j] + BY - 16));
      const __m256i q =
          _mm256_inserti128_si256(_mm256_castsi128_si256(qa), _mm_loadu_si128((const __m128i*)(b[j] + 2 * BY - 16)), 1);
      const __m512i w = _mm512_cvtepu8_epi16(q);  // vpermw reads index bits 0-4; the table ignores bit 4
      wl[j] = _mm512_permutexvar_epi16(w, tab);
      wh[j] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tab);
      uint16_t ha, hb;
      std::memcpy(&ha, b[j], 2);
      std::memcpy(&hb, b[j] + BY, 2);
      d[j] = _mm512_cvtph_ps(
          _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short)ha)), _mm_set1_epi16((short)hb), 1));
      if constexpr (MIN) {  // d*q + m = d*(q-8) + (m + 8d); the second term multiplies the block sums of x
        uint16_t ma, mb;
        std::memcpy(&ma, b[j] + 2, 2);
        std::memcpy(&mb, b[j] + BY + 2, 2);
        const __m512 m = _mm512_cvtph_ps(
            _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short)ma)), _mm_set1_epi16((short)mb), 1));
        mn[j] = _mm512_fmadd_ps(_mm512_set1_ps(8.f), d[j], m);
      }
    }
    for (int i = 0; i < M; ++i) {
      const int16_t* xq = x.q16 + i * x.k + e0;
      const __m512i xl = _mm512_loadu_si512(xq), xh = _mm512_loadu_si512(xq + 32);
      const float* dxp = x.dx + i * (x.k / 32) + e0 / 32;
      const __m512 dx = _mm512_insertf32x8(_mm512_set1_ps(dxp[0]), _mm256_set1_ps(dxp[1]), 1);
      __m512 sx = _mm512_setzero_ps();
      if constexpr (MIN) {  // lanes 0-7: sum of block a / 8, 8-15: block b / 8 (reduced over 16 lanes later)
        const float* xs = x.xs + i * (x.k / 32) + e0 / 32;
        sx = _mm512_insertf32x8(_mm512_set1_ps(xs[0] * 0.125f), _mm256_set1_ps(xs[1] * 0.125f), 1);
      }
      for (int j = 0; j < NR; ++j) {
        if constexpr (MIN) a.v[j][i][1] = _mm512_fmadd_ps(mn[j], sx, a.v[j][i][1]);
        const __m512i t = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), wl[j], xl), wh[j], xh);
        a.v[j][i][0] = _mm512_fmadd_ps(_mm512_mul_ps(d[j], dx), _mm512_cvtepi32_ps(t), a.v[j][i][0]);
      }
    }
  }
};

using K_q4_0 = K_q4p<18, false>;
using K_q4_1 = K_q4p<20, true>;

struct K_q8_0 {  // f32: exact products, scale per block
  static constexpr int BL = 32, BY = 34;
  static constexpr int NR1 = 1;  // weight rows per step at m == 1
  template <int NR, int M, int P>
  static inline void run(const uint8_t* const* b, const XP& x, int64_t e0, Acc<NR, M>& a) {
    __m512 w0[NR], w1[NR], d[NR];
    for (int j = 0; j < NR; ++j) {
      d[j] = bc_h(b[j]);
      const __m128i* q = (const __m128i*)(b[j] + 2);
      w0[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
      w1[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1)));
    }
    for (int i = 0; i < M; ++i) {
      const __m512 x0 = _mm512_loadu_ps(x.xf + i * x.k + e0), x1 = _mm512_loadu_ps(x.xf + i * x.k + e0 + 16);
      for (int j = 0; j < NR; ++j)
        a.v[j][i][P] = _mm512_fmadd_ps(d[j], _mm512_fmadd_ps(w0[j], x0, _mm512_mul_ps(w1[j], x1)), a.v[j][i][P]);
    }
  }
};

}  // namespace levante
#endif  // HAVE_BF16DOT
