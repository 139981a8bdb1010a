// The GGML block dequantizers: scalar reference versions for every type and AVX-512 versions of the hot
// ones, all bit-identical to gguf.quants.dequantize; DISPATCH instantiates a template per type id 0-9.
#pragma once

#include "common.h"

namespace levante {

// Each dequantizer writes one block (32 or 256 floats) with gguf.quants' arithmetic: f16 -> f32
// first, then the same products / sums in the same order (every product below is exact in f32,
// except Q6_K's dd*q, which is rounded exactly as the reference rounds it).

inline void deq_q4_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (float)((int)(qs[j] & 0x0F) - 8);
    y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
  }
}

inline void deq_q4_1(const uint8_t* b, float* y) {
  const float d = h2f(b), m = h2f(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (float)(qs[j] & 0x0F) + m;
    y[j + 16] = d * (float)(qs[j] >> 4) + m;
  }
}

inline void deq_q5_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int lo = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * (float)(lo - 16);
    y[j + 16] = d * (float)(hi - 16);
  }
}

inline void deq_q5_1(const uint8_t* b, float* y) {
  const float d = h2f(b), m = h2f(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int lo = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
    const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
    y[j] = d * (float)lo + m;
    y[j + 16] = d * (float)hi + m;
  }
}

inline void deq_q8_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = (float)qs[j] * d;
}

inline void deq_q2_k(const uint8_t* b, float* y) {
  const uint8_t* sc = b;
  const uint8_t* qs = b + 16;
  const float d = h2f(b + 80), dmin = h2f(b + 82);
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 4; ++s)
      for (int h = 0; h < 2; ++h) {
        const int sub = g * 8 + s * 2 + h;
        const float dl = d * (float)(sc[sub] & 0x0F);
        const float ml = dmin * (float)(sc[sub] >> 4);
        const uint8_t* q = qs + g * 32 + h * 16;
        float* o = y + sub * 16;
        for (int j = 0; j < 16; ++j) o[j] = dl * (float)((q[j] >> (2 * s)) & 3) - ml;
      }
}

inline void deq_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hm = b;
  const uint8_t* qs = b + 32;
  const uint8_t* sc = b + 96;
  const float d = h2f(b + 108);
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 4; ++s)
      for (int h = 0; h < 2; ++h) {
        const int sub = g * 8 + s * 2 + h;
        const int lo = sub < 8 ? (sc[sub] & 0x0F) : (sc[sub - 8] >> 4);
        const int hi = (sc[8 + (sub & 3)] >> (2 * (sub >> 2))) & 3;
        const float dl = d * (float)((int8_t)(uint8_t)(lo | (hi << 4)) - 32);
        const uint8_t* q = qs + g * 32 + h * 16;
        const uint8_t* m = hm + h * 16;
        const int hs = g * 4 + s;
        float* o = y + sub * 16;
        for (int j = 0; j < 16; ++j) {
          const int ql = (q[j] >> (2 * s)) & 3;
          const int hb = ((m[j] >> hs) & 1) ^ 1;
          o[j] = dl * (float)(ql - (hb << 2));
        }
      }
}

inline void k_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

inline void deq_q4_k(const uint8_t* b, float* y) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* qs = b + 16;
  for (int sub = 0; sub < 8; ++sub) {
    int sc, mn;
    k_scale_min(b + 4, sub, sc, mn);
    const float dd = d * (float)sc, dm = dmin * (float)mn;
    const uint8_t* q = qs + (sub >> 1) * 32;
    float* o = y + sub * 32;
    if (sub & 1) {
      for (int j = 0; j < 32; ++j) o[j] = dd * (float)(q[j] >> 4) - dm;
    } else {
      for (int j = 0; j < 32; ++j) o[j] = dd * (float)(q[j] & 0x0F) - dm;
    }
  }
}

inline void deq_q5_k(const uint8_t* b, float* y) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  for (int sub = 0; sub < 8; ++sub) {
    int sc, mn;
    k_scale_min(b + 4, sub, sc, mn);
    const float dd = d * (float)sc, dm = dmin * (float)mn;
    const uint8_t* q = qs + (sub >> 1) * 32;
    const int shift = (sub & 1) * 4;
    float* o = y + sub * 32;
    for (int j = 0; j < 32; ++j) {
      const int v = ((q[j] >> shift) & 0x0F) | (((qh[j] >> sub) & 1) << 4);
      o[j] = dd * (float)v - dm;
    }
  }
}

inline void deq_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = h2f(b + 208);
  // element e = g*128 + s*64 + h*32 + j: low nibble (shift 4s) of ql[g*64 + h*32 + j],
  // high bits (shift 2*(2s+h)) of qh[g*32 + j]
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 2; ++s)
      for (int h = 0; h < 2; ++h)
        for (int t = 0; t < 2; ++t) {
          const int e0 = g * 128 + s * 64 + h * 32 + t * 16;
          const float dd = d * (float)sc[e0 >> 4];
          const uint8_t* l = ql + g * 64 + h * 32 + t * 16;
          const uint8_t* u = qh + g * 32 + t * 16;
          const int ls = 4 * s, hs = 2 * (2 * s + h);
          float* o = y + e0;
          for (int j = 0; j < 16; ++j) {
            const int v = ((l[j] >> ls) & 0x0F) | (((u[j] >> hs) & 3) << 4);
            o[j] = dd * (float)(v - 32);
          }
        }
}

#ifdef __AVX512F__
// AVX-512 versions of the hot dequantizers: same per-element arithmetic (exact products, then the
// reference's single rounding of a sum, which an fma reproduces because the product is exact).
// Each emits 16 weights at a time as out(offset_in_block, __m512); the sink stores them (dequant,
// multi-row gemv) or multiplies them into an accumulator (single-row gemv), all inlined.
inline __m512i u8_i32(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }

template <class S>
inline void blk_q4_0(const uint8_t* b, S&& out) {
  const __m512 d = _mm512_set1_ps(h2f(b));
  const __m512i qs = u8_i32(b + 2), e8 = _mm512_set1_epi32(8), m4 = _mm512_set1_epi32(15);
  out(0, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(qs, m4), e8))));
  out(16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(qs, 4), e8))));
}

template <class S>
inline void blk_q4_1(const uint8_t* b, S&& out) {
  const __m512 d = _mm512_set1_ps(h2f(b)), m = _mm512_set1_ps(h2f(b + 2));
  const __m512i qs = u8_i32(b + 4), m4 = _mm512_set1_epi32(15);
  out(0, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(qs, m4)), m));
  out(16, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_srli_epi32(qs, 4)), m));
}

inline void q5_vals(const uint8_t* qhp, const uint8_t* qsp, __m512i& lo, __m512i& hi) {
  uint32_t qh;
  std::memcpy(&qh, qhp, 4);
  const __m512i qs = u8_i32(qsp), m4 = _mm512_set1_epi32(15), e16 = _mm512_set1_epi32(16);
  lo = _mm512_and_si512(qs, m4);
  hi = _mm512_srli_epi32(qs, 4);
  lo = _mm512_mask_add_epi32(lo, (__mmask16)(qh & 0xFFFF), lo, e16);
  hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh >> 16), hi, e16);
}

template <class S>
inline void blk_q5_0(const uint8_t* b, S&& out) {
  const __m512 d = _mm512_set1_ps(h2f(b));
  __m512i lo, hi;
  q5_vals(b + 2, b + 6, lo, hi);
  const __m512i e16 = _mm512_set1_epi32(16);
  out(0, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, e16))));
  out(16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, e16))));
}

template <class S>
inline void blk_q5_1(const uint8_t* b, S&& out) {
  const __m512 d = _mm512_set1_ps(h2f(b)), m = _mm512_set1_ps(h2f(b + 2));
  __m512i lo, hi;
  q5_vals(b + 4, b + 8, lo, hi);
  out(0, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lo), m));
  out(16, _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(hi), m));
}

template <class S>
inline void blk_q8_0(const uint8_t* b, S&& out) {
  const __m512 d = _mm512_set1_ps(h2f(b));
  const __m128i* q = (const __m128i*)(b + 2);
  out(0, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q))), d));
  out(16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q + 1))), d));
}

template <class S>
inline void blk_q4_k(const uint8_t* b, S&& out) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* qs = b + 16;
  const __m512i m4 = _mm512_set1_epi32(15);
  for (int sub = 0; sub < 8; ++sub) {
    int sc, mn;
    k_scale_min(b + 4, sub, sc, mn);
    const __m512 dd = _mm512_set1_ps(d * (float)sc), dm = _mm512_set1_ps(dmin * (float)mn);
    const uint8_t* q = qs + (sub >> 1) * 32;
    const int shift = (sub & 1) * 4;
    for (int h = 0; h < 2; ++h) {
      const __m512i v = _mm512_and_si512(_mm512_srli_epi32(u8_i32(q + 16 * h), shift), m4);
      out(sub * 32 + 16 * h, _mm512_fmsub_ps(dd, _mm512_cvtepi32_ps(v), dm));
    }
  }
}

template <class S>
inline void blk_q5_k(const uint8_t* b, S&& out) {
  const float d = h2f(b), dmin = h2f(b + 2);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  const __m512i m4 = _mm512_set1_epi32(15), one = _mm512_set1_epi32(1);
  for (int sub = 0; sub < 8; ++sub) {
    int sc, mn;
    k_scale_min(b + 4, sub, sc, mn);
    const __m512 dd = _mm512_set1_ps(d * (float)sc), dm = _mm512_set1_ps(dmin * (float)mn);
    const uint8_t* q = qs + (sub >> 1) * 32;
    const int shift = (sub & 1) * 4;
    for (int h = 0; h < 2; ++h) {
      __m512i v = _mm512_and_si512(_mm512_srli_epi32(u8_i32(q + 16 * h), shift), m4);
      const __m512i hb = _mm512_and_si512(_mm512_srli_epi32(u8_i32(qh + 16 * h), sub), one);
      v = _mm512_or_si512(v, _mm512_slli_epi32(hb, 4));
      out(sub * 32 + 16 * h, _mm512_fmsub_ps(dd, _mm512_cvtepi32_ps(v), dm));
    }
  }
}

template <class S>
inline void blk_q6_k(const uint8_t* b, S&& out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = h2f(b + 208);
  const __m512i m4 = _mm512_set1_epi32(15), m2 = _mm512_set1_epi32(3), e32 = _mm512_set1_epi32(32);
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 2; ++s)
      for (int h = 0; h < 2; ++h)
        for (int t = 0; t < 2; ++t) {
          const int e0 = g * 128 + s * 64 + h * 32 + t * 16;
          const __m512 dd = _mm512_set1_ps(d * (float)sc[e0 >> 4]);
          const __m512i l = _mm512_and_si512(_mm512_srli_epi32(u8_i32(ql + g * 64 + h * 32 + t * 16), 4 * s), m4);
          const __m512i u = _mm512_and_si512(_mm512_srli_epi32(u8_i32(qh + g * 32 + t * 16), 2 * (2 * s + h)), m2);
          const __m512i v = _mm512_sub_epi32(_mm512_or_si512(l, _mm512_slli_epi32(u, 4)), e32);
          out(e0, _mm512_mul_ps(dd, _mm512_cvtepi32_ps(v)));
        }
}

#define DEF_V(t)                                                                       \
  inline void deq_##t##_v(const uint8_t* b, float* y) {                                \
    blk_##t(b, [&](int o, __m512 v) { _mm512_storeu_ps(y + o, v); });                  \
  }                                                                                    \
  struct dot_##t {                                                                     \
    static inline void run(const uint8_t* b, const float* x, __m512& a0, __m512& a1) { \
      blk_##t(b, [&](int o, __m512 v) {                                                \
        if ((o >> 4) & 1)                                                              \
          a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + o), a1);                         \
        else                                                                           \
          a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + o), a0);                         \
      });                                                                              \
    }                                                                                  \
  };
DEF_V(q4_0)
DEF_V(q4_1)
DEF_V(q5_0)
DEF_V(q5_1)
DEF_V(q8_0)
DEF_V(q4_k)
DEF_V(q5_k)
DEF_V(q6_k)
#define V(name) name##_v
#else
#define V(name) name
#endif
// FN<dequantizer, elements per block, bytes per block>(...) for GGML type id QT
#define DISPATCH(QT, FN, ...)                              \
  switch (QT) {                                            \
    case 0: FN<V(deq_q4_0), 32, 18>(__VA_ARGS__); break;   \
    case 1: FN<V(deq_q4_1), 32, 20>(__VA_ARGS__); break;   \
    case 2: FN<V(deq_q5_0), 32, 22>(__VA_ARGS__); break;   \
    case 3: FN<V(deq_q5_1), 32, 24>(__VA_ARGS__); break;   \
    case 4: FN<V(deq_q8_0), 32, 34>(__VA_ARGS__); break;   \
    case 5: FN<deq_q2_k, 256, 84>(__VA_ARGS__); break;     \
    case 6: FN<deq_q3_k, 256, 110>(__VA_ARGS__); break;    \
    case 7: FN<V(deq_q4_k), 256, 144>(__VA_ARGS__); break; \
    case 8: FN<V(deq_q5_k), 256, 176>(__VA_ARGS__); break; \
    case 9: FN<V(deq_q6_k), 256, 210>(__VA_ARGS__); break; \
  }

}  // namespace levante
