// GEMV kernels on the 16-row group layouts (grouped16_layout.h): one instruction works on 16 weight rows at
// once and a block's scales are one vector for the 16 rows; 1, 2 or 4 rows of x per pass over a group.
#pragma once

#include "grouped16_layout.h"
#include "xprep.h"

#ifdef HAVE_BF16DOT
namespace levante {

// The grouped kernels handle R = 1, 2 or 4 rows of x per pass over a group's codes (prefill: the codes
// are unpacked once for R rows). The int16-pair kernels (Q5_K, Q6_K, Q8_0) keep C independent int32
// accumulator chains per row of x.
template <int R, int C>
inline void zero_acc(__m512i (&t)[R][C]) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) t[r][c] = _mm512_setzero_si512();
}
template <int R, int C>
inline __m512 sum_acc(const __m512i (&t)[R][C], int r) {
  __m512i s = t[r][0];
  for (int c = 1; c < C; ++c) s = _mm512_add_epi32(s, t[r][c]);
  return _mm512_cvtepi32_ps(s);
}
// t[r][n % C] += codes . (the int16 pair xp[r][e] of x row r, broadcast)
template <int R, int C>
inline void dp(__m512i (&t)[R][C], int n, __m512i codes, const int32_t* const* xp, int64_t e) {
  for (int r = 0; r < R; ++r) t[r][n % C] = _mm512_dpwssd_epi32(t[r][n % C], codes, _mm512_set1_epi32(xp[r][e]));
}

// The byte kernels (Q4_0x16, Q4_Kx16, Q6_Kx16) read x's int16 as 256 h + l in two bytes, h signed and l
// unsigned, so codes . x = 256 (codes . h) + (l . codes), exact in int32 with vpdpbusd (which takes the
// unsigned bytes first: x's low bytes, or the codes against x's high bytes).
// tl[r] / th[r] += 4 codes of 16 rows (bytes) . x row r's 4 elements at int32 index e
template <int R>
inline void dpb(__m512i (&tl)[R], __m512i (&th)[R], __m512i codes, const int32_t* const* xl, const int32_t* const* xh,
                int64_t e) {
  for (int r = 0; r < R; ++r) {
    tl[r] = _mm512_dpbusd_epi32(tl[r], _mm512_set1_epi32(xl[r][e]), codes);
    th[r] = _mm512_dpbusd_epi32(th[r], codes, _mm512_set1_epi32(xh[r][e]));
  }
}
inline __m512 sum_b(__m512i tl, __m512i th) {  // 256 th + tl as float
  return _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(th, 8), tl));
}

// Q4_0x16 (MIN false) / Q4_1x16 (MIN true): y[(i0 + r) * ldy + j] for the group at base, x rows i0 .. i0 + R. The
// codes are bytes (pack8b order) read with vpdpbusd against x's two bytes per element (as x4k_rows), centred
// (q - 8, exact in int32); Q4_1's w = d q + m = d (q - 8) + (m + 8 d), the second term times the block's f32 x sum
template <int R, bool MIN>
void x4q_rows(const uint8_t* base, const XP& x, int64_t i0, float* y, int64_t ldy) {
  constexpr int BY = MIN ? 320 : 288, CODES = MIN ? 64 : 32;
  const int64_t nb = x.k / 32;
  const __m512i m0f = _mm512_set1_epi8(15);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* p = base;
  for (int64_t b = 0; b < nb; ++b, p += BY) {
    __m512i tl[R], th[R];  // sum (q - 8) xq = 256 th + tl, exact in int32; tl starts at -8 sum(xq)
    const int32_t* xl[R];
    const int32_t* xh[R];
    for (int r = 0; r < R; ++r) {
      tl[r] = _mm512_set1_epi32(-8 * x.qs[(i0 + r) * nb + b]);
      th[r] = _mm512_setzero_si512();
      xl[r] = (const int32_t*)(x.bl + (i0 + r) * x.k + 32 * b);
      xh[r] = (const int32_t*)(x.bh + (i0 + r) * x.k + 32 * b);
    }
#pragma GCC unroll 4
    for (int kk = 0; kk < 4; ++kk) {
      const __m512i v = _mm512_loadu_si512(p + CODES + 64 * kk);
      const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      dpb(tl, th, lo, xl, xh, 2 * kk);
      dpb(tl, th, hi, xl, xh, 2 * kk + 1);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(x.dx[(i0 + r) * nb + b])), sum_b(tl[r], th[r]), acc[r]);
    if constexpr (MIN) {
      const __m512 mn =
          _mm512_fmadd_ps(_mm512_set1_ps(8.f), d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 32))));
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(x.xs[(i0 + r) * nb + b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (i0 + r) * ldy, acc[r]);
}

// The head of a Q4_Kx16 / Q5_Kx16 group superblock: d, dmin and the 6-bit scales and mins of 16 rows
// (k_scales_u8 with one row per lane). With the codes' centre ct, w = d sc q - dmin m = d sc (q - ct) + bm.
struct KHead16 {
  __m512 d, dmin, dc;
  __m512i sc[2], mn[2];
  KHead16(const uint8_t* p, float ct) {
    const __m512i k1 = _mm512_set1_epi32(0x3f3f3f3f), k2 = _mm512_set1_epi32(0x0f0f0f0f),
                  k3 = _mm512_set1_epi32(0x03030303);
    d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    dmin = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p + 32)));
    dc = _mm512_mul_ps(d, _mm512_set1_ps(ct));
    const __m512i u0 = _mm512_loadu_si512(p + 64), u1 = _mm512_loadu_si512(p + 128), u2 = _mm512_loadu_si512(p + 192);
    sc[0] = _mm512_and_si512(u0, k1);
    sc[1] =
        _mm512_or_si512(_mm512_and_si512(u2, k2), _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 6), k3), 4));
    mn[0] = _mm512_and_si512(u1, k1);
    mn[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u2, 4), k2),
                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u1, 6), k3), 4));
  }
  // sub-block s: dsc = d sc, bm = ct d sc - dmin m
  inline void sub(int s, __m512& dsc, __m512& bm) const {
    const __m512i mff = _mm512_set1_epi32(0xff);
    const int sh = 8 * (s & 3);
    const __m512 scf = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(sc[s >> 2], sh), mff));
    const __m512 mnf = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(mn[s >> 2], sh), mff));
    dsc = _mm512_mul_ps(d, scf);
    bm = _mm512_fmsub_ps(dc, scf, _mm512_mul_ps(dmin, mnf));
  }
};

// Q5_Kx16: as Q4_Kx16 (scales, mins), the codes in pack8 order with the fifth bits after each sub-block's codes,
// read as int16 pairs (vpdpwssd)
template <int R>
void x5k_rows(const uint8_t* base, const XP& x, int64_t i0, float* y, int64_t ldy) {
  constexpr int C = 2;                // int32 accumulator chains per row of x (4 measured no faster at R = 1)
  constexpr int GB = 2816, SB = 320;  // bytes per group superblock, per sub-block
  constexpr float CT = 16.f;          // the codes' centre
  const int64_t nb = x.k / 256;
  const __m512i mk = _mm512_set1_epi32(0x000F000F), m10 = _mm512_set1_epi32(0x00100010);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = base + b * GB;
    const KHead16 hd(p, CT);
    const int32_t* xp[R];
    for (int r = 0; r < R; ++r) xp[r] = (const int32_t*)(x.q16k + (i0 + r) * x.k + 256 * b);
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m512 dsc, bm;  // sum over the sub-block of (q - CT) xq in int32, then times dsc, plus bm sum(x)
      hd.sub(s, dsc, bm);
      __m512i t[R][C];
      zero_acc(t);
      for (int r = 0; r < R; ++r) {
        const int32_t* ks = x.ks16 + (i0 + r) * (x.k / 16) + 16 * b + 2 * s;
        t[r][0] = _mm512_set1_epi32(-(int)CT * (ks[0] + ks[1]));
      }
      const uint8_t* cv = p + 256 + SB * s;
      const __m512i hv = _mm512_loadu_si512(cv + 256);
#pragma GCC unroll 4
      for (int kk = 0; kk < 4; ++kk) {
        const __m512i v = _mm512_loadu_si512(cv + 64 * kk);
        const int64_t e = 16 * s + 4 * kk;
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {  // pair P = 4 kk + u: its fifth bits from bits P and 16 + P to 4 and 20
          const int P = 4 * kk + u;
          const __m512i lo = u ? _mm512_srli_epi32(v, 4 * u) : v;
          const __m512i hs = P < 4 ? _mm512_slli_epi32(hv, 4 - P) : _mm512_srli_epi32(hv, P - 4);
          dp(t, P, _mm512_ternarylogic_epi32(lo, mk, _mm512_and_si512(hs, m10), 0xEA), xp, e + u);
        }
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = i0 + r;
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dsc, _mm512_set1_ps(x.dxk[i * nb + b])), sum_acc(t, r), acc[r]);
        acc[r] = _mm512_fmadd_ps(bm, _mm512_set1_ps(x.xs[i * (x.k / 32) + 8 * b + s]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (i0 + r) * ldy, acc[r]);
}

// Q4_Kx16: the codes as bytes (pack8b) times x's two int8 halves with vpdpbusd (4 products per lane): one AND
// (and a shift) unpacks 4 codes of 16 rows, where the int16 pairs of the Q5_K / Q8_0 kernels need two ops per 2 codes
template <int R>
void x4k_rows(const uint8_t* base, const XP& x, int64_t i0, float* y, int64_t ldy) {
  const int64_t nb = x.k / 256;
  const __m512i m0f = _mm512_set1_epi8(15);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = base + b * 2304;
    const KHead16 hd(p, 8.f);
    const int32_t* xl[R];
    const int32_t* xh[R];
    for (int r = 0; r < R; ++r) {
      xl[r] = (const int32_t*)(x.kl + (i0 + r) * x.k + 256 * b);
      xh[r] = (const int32_t*)(x.kh + (i0 + r) * x.k + 256 * b);
    }
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      __m512 dsc, bm;
      hd.sub(s, dsc, bm);
      __m512i tl[R], th[R];  // sum (q - 8) xq = 256 th + tl, exact in int32; tl starts at -8 sum(xq)
      for (int r = 0; r < R; ++r) {
        const int32_t* ks = x.ks16 + (i0 + r) * (x.k / 16) + 16 * b + 2 * s;
        tl[r] = _mm512_set1_epi32(-8 * (ks[0] + ks[1]));
        th[r] = _mm512_setzero_si512();
      }
      const uint8_t* cv = p + 256 + 256 * s;
#pragma GCC unroll 4
      for (int kk = 0; kk < 4; ++kk) {
        const __m512i v = _mm512_loadu_si512(cv + 64 * kk);
        const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
        const int64_t e = 8 * s + 2 * kk;  // int32 index of elements 32 s + 8 kk .. + 3
        dpb(tl, th, lo, xl, xh, e);
        dpb(tl, th, hi, xl, xh, e + 1);
      }
      for (int r = 0; r < R; ++r) {
        const int64_t i = i0 + r;
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dsc, _mm512_set1_ps(x.dxk[i * nb + b])), sum_b(tl[r], th[r]), acc[r]);
        acc[r] = _mm512_fmadd_ps(bm, _mm512_set1_ps(x.xs[i * (x.k / 32) + 8 * b + s]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (i0 + r) * ldy, acc[r]);
}

// Q8_0x16 (x as int16 pairs in XBuf's pair order, as Q4_0x16)
template <int R>
void x80_rows(const uint8_t* base, const XP& x, int64_t i0, float* y, int64_t ldy) {
  constexpr int C = 2;  // int32 accumulator chains per row of x (4 measured no faster at R = 1)
  const int64_t nb = x.k / 32;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* p = base;
  for (int64_t b = 0; b < nb; ++b, p += 544) {
    const bool natural = (b % 2 == 0) && (b + 1 == nb);
    const int64_t c = 32 * (b & ~int64_t(1)),
                  lo = c + (natural   ? 0
                            : (b & 1) ? 16
                                      : 0),
                  hi = c + (natural   ? 16
                            : (b & 1) ? 48
                                      : 32);
    __m512i t[R][C];
    zero_acc(t);
    const int32_t* xl[R];
    const int32_t* xh[R];
    for (int r = 0; r < R; ++r) {
      xl[r] = (const int32_t*)(x.q16 + (i0 + r) * x.k + lo);
      xh[r] = (const int32_t*)(x.q16 + (i0 + r) * x.k + hi);
    }
#pragma GCC unroll 8
    for (int kk = 0; kk < 8; ++kk) {
      const __m512i v = _mm512_loadu_si512(p + 32 + 64 * kk);
      const int64_t e = 2 * (kk & 3);
      const int32_t* const* xq = kk < 4 ? xl : xh;
      dp(t, 2 * kk, _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), xq, e);  // (c0, c1), sign-extended
      dp(t, 2 * kk + 1, _mm512_srai_epi16(v, 8), xq, e + 1);                // (c2, c3)
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(x.dx[(i0 + r) * nb + b])), sum_acc(t, r), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (i0 + r) * ldy, acc[r]);
}

template <int R>
void x6k_rows(const uint8_t* base, const XP& x, int64_t i0, float* y, int64_t ldy) {
  const int64_t nb = x.k / 256;
  const __m512i m0f = _mm512_set1_epi8(15), m30 = _mm512_set1_epi8(0x30);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = base + b * 3360;
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    const int32_t* xl[R];
    const int32_t* xh[R];
    for (int r = 0; r < R; ++r) {
      xl[r] = (const int32_t*)(x.kl + (i0 + r) * x.k + 256 * b);
      xh[r] = (const int32_t*)(x.kh + (i0 + r) * x.k + 256 * b);
    }
    __m512i sv = _mm512_setzero_si512();
#pragma GCC unroll 16
    for (int s = 0; s < 16; ++s) {
      if ((s & 3) == 0) sv = _mm512_loadu_si512(p + 32 + 16 * s);
      // the int8 scale s of each row, sign-extended
      const __m512i sc = _mm512_srai_epi32(_mm512_slli_epi32(sv, 24 - 8 * (s & 3)), 24);
      const __m512 dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
      const uint8_t* cv = p + 288 + 192 * s;
      const __m512i v0 = _mm512_loadu_si512(cv), v1 = _mm512_loadu_si512(cv + 64), hv = _mm512_loadu_si512(cv + 128);
      __m512i tl[R], th[R];  // sum (q - 32) xq = 256 th + tl, exact in int32; tl starts at -32 sum(xq)
      for (int r = 0; r < R; ++r) {
        tl[r] = _mm512_set1_epi32(-32 * x.ks16[(i0 + r) * (x.k / 16) + 16 * b + s]);
        th[r] = _mm512_setzero_si512();
      }
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {  // codes 4g .. 4g + 3 of the sub-block, as bytes
        const __m512i v = g < 2 ? v0 : v1;
        const __m512i lo = (g & 1) ? _mm512_srli_epi16(v, 4) : v;
        const __m512i hs = g == 0   ? _mm512_slli_epi32(hv, 4)
                           : g == 1 ? _mm512_slli_epi32(hv, 2)
                           : g == 2 ? hv
                                    : _mm512_srli_epi32(hv, 2);
        const __m512i c = _mm512_ternarylogic_epi32(lo, m0f, _mm512_and_si512(hs, m30), 0xEA);  // (lo & 15) | hi
        dpb(tl, th, c, xl, xh, 4 * s + g);
      }
      for (int r = 0; r < R; ++r)
        acc[r] =
            _mm512_fmadd_ps(_mm512_mul_ps(dsc, _mm512_set1_ps(x.dxk[(i0 + r) * nb + b])), sum_b(tl[r], th[r]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (i0 + r) * ldy, acc[r]);
}

typedef void (*rows_fn)(const uint8_t*, const XP&, int64_t, float*, int64_t);

// y[i * ldy + 16 g + j] for groups [g0, g1), x rows i < m, four rows of x per pass
inline void range_grouped(int64_t qt, const uint8_t* src, int64_t g0, int64_t g1, const XP& x, int64_t m, float* y,
                          int64_t ldy) {
  rows_fn f1 = x4q_rows<1, false>, f2 = x4q_rows<2, false>, f4 = x4q_rows<4, false>;
  if (qt == X41) f1 = x4q_rows<1, true>, f2 = x4q_rows<2, true>, f4 = x4q_rows<4, true>;
  if (qt == X4K) f1 = x4k_rows<1>, f2 = x4k_rows<2>, f4 = x4k_rows<4>;
  if (qt == X5K) f1 = x5k_rows<1>, f2 = x5k_rows<2>, f4 = x5k_rows<4>;
  if (qt == X6K) f1 = x6k_rows<1>, f2 = x6k_rows<2>, f4 = x6k_rows<4>;
  if (qt == X80) f1 = x80_rows<1>, f2 = x80_rows<2>, f4 = x80_rows<4>;
  const int64_t gbytes = x.k / BLK[qt] * BYT[qt];
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* base = src + g * gbytes;
    _mm_prefetch((const char*)base + 4096, _MM_HINT_T0);
    float* yg = y + 16 * g;
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) f4(base, x, i, yg, ldy);
    if (i + 2 <= m) f2(base, x, i, yg, ldy), i += 2;
    if (i < m) f1(base, x, i, yg, ldy);
  }
}

}  // namespace levante
#endif  // HAVE_BF16DOT
