// Per-row integer kernels for the K types Q4_K / Q5_K / Q6_K (256-element superblocks).
#pragma once

#include "acc.h"

#ifdef HAVE_BF16DOT
namespace levante {

// Q4_K / Q5_K: the 12 packed bytes of 6-bit scales and mins -> 16 bytes: 8 scales, then 8 mins
inline __m128i k_scales_u8(const uint8_t* b) {
  uint32_t u[4];
  std::memcpy(u, b + 4, 12);
  const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
  const uint32_t t = u[1] & k1;
  u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
  u[2] = t;
  u[0] &= k1;
  return _mm_loadu_si128((const __m128i*)u);
}

// Q4_K (144-byte superblocks) and Q5_K (176: the same plus a fifth bit per weight in 32 bytes qh)
template <bool Q5>
struct K_q45_k {
  static constexpr int BL = 256, BY = Q5 ? 176 : 144;
  static constexpr int NR1 = 1;  // weight rows per step at m == 1 (measured: 1 beats 2 and 4 here)
  // Integer kernel: x is int16 per 256-block (q16k), each code times its 6-bit scale is an int16
  // (<= 31 * 63), vpdpwssd sums the exact products of the whole superblock in int32 (at most
  // 16 * 1953 * 32767 < 2^31 per lane), and one FMA per superblock applies d * dx. The mins multiply the
  // f32 block sums of x (xs), and the codes are centred (q - 8, Q5: q - 16) after
  // the fact: d*sc*C times the sums of the *rounded* x (sk), which halves the error of x's rounding
  // (it is multiplied by the centred codes) for two FMAs per superblock instead of an op per 32 codes.
  template <int NR, int M, int P>
  static inline void run(const uint8_t* const* b, const XP& x, int64_t e0, Acc<NR, M>& a) {
    const __m512i m4 = _mm512_set1_epi16(15), m10 = _mm512_set1_epi16(0x10);
    alignas(16) int16_t sc[NR][8];
    __m512i qh[NR], acc[NR][M][2];  // two accumulators: two dependency chains of vpdpwssd
    float d[NR];
    for (int j = 0; j < NR; ++j) {
      const __m128i v = k_scales_u8(b[j]);
      _mm_store_si128((__m128i*)sc[j], _mm_cvtepu8_epi16(v));
      d[j] = h2f(b[j]);
      const __m256 dsc = _mm256_mul_ps(_mm256_set1_ps(d[j]), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)));
      // subtracted at the end: dmin*m * sum(x) + C*d*sc * (sum(rounded x) - sum(x))
      const __m256 dc = _mm256_mul_ps(_mm256_set1_ps(Q5 ? 16.f : 8.f), dsc);
      const __m256 dm = _mm256_fmsub_ps(_mm256_set1_ps(h2f(b[j] + 2)),
                                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8))), dc);
      for (int i = 0; i < M; ++i) {
        const int64_t o = i * (x.k / 32) + e0 / 32;
        a.mn[j][i] = _mm256_fmadd_ps(dm, _mm256_loadu_ps(x.xs + o), a.mn[j][i]);
        a.mn[j][i] = _mm256_fmadd_ps(dc, _mm256_loadu_ps(x.sk + o), a.mn[j][i]);
        acc[j][i][0] = acc[j][i][1] = _mm512_setzero_si512();
      }
      if constexpr (Q5) qh[j] = _mm512_slli_epi16(u8w(b[j] + 16), 4);  // bit s of qh at bit 4 + s
    }
    for (int p = 0; p < 4; ++p) {
      __m512i wl[NR], wh[NR];
      for (int j = 0; j < NR; ++j) {
        const __m512i q = u8w(b[j] + (Q5 ? 48 : 16) + 32 * p);
        __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_srli_epi16(q, 4);
        if constexpr (Q5) {
          lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_srli_epi16(qh[j], 2 * p), m10));
          hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_srli_epi16(qh[j], 2 * p + 1), m10));
        }
        wl[j] = _mm512_mullo_epi16(lo, _mm512_set1_epi16(sc[j][2 * p]));
        wh[j] = _mm512_mullo_epi16(hi, _mm512_set1_epi16(sc[j][2 * p + 1]));
      }
      for (int i = 0; i < M; ++i) {
        const int16_t* xq = x.q16k + i * x.k + e0 + 64 * p;
        const __m512i xl = _mm512_loadu_si512(xq), xh = _mm512_loadu_si512(xq + 32);
        for (int j = 0; j < NR; ++j) {
          acc[j][i][0] = _mm512_dpwssd_epi32(acc[j][i][0], wl[j], xl);
          acc[j][i][1] = _mm512_dpwssd_epi32(acc[j][i][1], wh[j], xh);
        }
      }
    }
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < M; ++i)
        a.v[j][i][P] = _mm512_fmadd_ps(_mm512_set1_ps(d[j] * x.dxk[i * (x.k / 256) + e0 / 256]),
                                       _mm512_cvtepi32_ps(_mm512_add_epi32(acc[j][i][0], acc[j][i][1])), a.v[j][i][P]);
  }
};
using K_q4_k = K_q45_k<false>;
using K_q5_k = K_q45_k<true>;

struct K_q6_k {
  static constexpr int BL = 256, BY = 210;
  static constexpr int NR1 = 1;  // weight rows per step at m == 1
  // Integer kernel (see K_q45_k): code - 32 times its int8 scale is an int16 (|.| <= 4096), and the
  // superblock's 16 products per int32 lane stay below 16 * 4096 * 32767 < 2^31.
  template <int NR, int M, int P>
  static inline void run(const uint8_t* const* b, const XP& x, int64_t e0, Acc<NR, M>& a) {
    const __m512i m4 = _mm512_set1_epi16(15), m30 = _mm512_set1_epi16(0x30), e32 = _mm512_set1_epi16(32);
    __m512i sc[NR], acc[NR][M][2];  // two accumulators: two dependency chains of vpdpwssd
    float d[NR];
    for (int j = 0; j < NR; ++j) {
      sc[j] = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(b[j] + 192))));
      d[j] = h2f(b[j] + 208);
      for (int i = 0; i < M; ++i) acc[j][i][0] = acc[j][i][1] = _mm512_setzero_si512();
    }
    for (int g = 0; g < 2; ++g) {
      __m512i qh[NR], ql0[NR], ql1[NR];
      for (int j = 0; j < NR; ++j) {
        qh[j] = u8w(b[j] + 128 + 32 * g);
        ql0[j] = u8w(b[j] + 64 * g);
        ql1[j] = u8w(b[j] + 64 * g + 32);
      }
#define Q6I(S, H, HS)                                                                          \
  {                                                                                            \
    const int G = g * 4 + (S) * 2 + (H);                                                       \
    const __m512i gi = _mm512_load_si512(TB.q6w[G]);                                           \
    __m512i w[NR];                                                                             \
    for (int j = 0; j < NR; ++j) {                                                             \
      const __m512i l = (H) ? ql1[j] : ql0[j];                                                 \
      const __m512i lo = (S) ? _mm512_srli_epi16(l, 4) : _mm512_and_si512(l, m4);              \
      const __m512i v = _mm512_sub_epi16(_mm512_or_si512(lo, _mm512_and_si512(HS, m30)), e32); \
      w[j] = _mm512_mullo_epi16(v, _mm512_permutexvar_epi16(gi, sc[j]));                       \
    }                                                                                          \
    for (int i = 0; i < M; ++i) {                                                              \
      const __m512i xv = _mm512_loadu_si512(x.q16k + i * x.k + e0 + 32 * G);                   \
      for (int j = 0; j < NR; ++j) acc[j][i][H] = _mm512_dpwssd_epi32(acc[j][i][H], w[j], xv); \
    }                                                                                          \
  }
      Q6I(0, 0, _mm512_slli_epi16(qh[j], 4))
      Q6I(0, 1, _mm512_slli_epi16(qh[j], 2))
      Q6I(1, 0, qh[j])
      Q6I(1, 1, _mm512_srli_epi16(qh[j], 2))
#undef Q6I
    }
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < M; ++i)
        a.v[j][i][P] = _mm512_fmadd_ps(_mm512_set1_ps(d[j] * x.dxk[i * (x.k / 256) + e0 / 256]),
                                       _mm512_cvtepi32_ps(_mm512_add_epi32(acc[j][i][0], acc[j][i][1])), a.v[j][i][P]);
  }
};

}  // namespace levante
#endif  // HAVE_BF16DOT
