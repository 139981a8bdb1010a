// Activations prepared once per call for the integer small-batch kernels (XBuf), in only the forms the
// weights' kernels read (x_forms).
#pragma once

#include "common.h"

#ifdef HAVE_BF16DOT
namespace levante {

// x is prepared once per call (XBuf) in the forms the kernels read:
// * bf16 split: x_hi = bf16(x), x_lo = bf16(x - x_hi) (~16 significant bits, relative error <= 2^-17);
//   integer codes are exact in bf16, so vdpbf16ps gives exact products with f32 sums (Q4_0 / Q4_1's
//   unpaired last block);
// * int16 per 32-block, pair order (Q4_0 / Q4_1: vpdpwssd over two blocks, scales applied per block);
// * int16 per 256-block, natural order (Q4_K / Q5_K / Q6_K: codes times their sub-block scales are
//   int16, so a whole superblock sums in int32 and one FMA applies d * dx);
// * f32 (Q8_0: int8 -> bf16 costs more than it saves) and f32 sums per 32 elements (mins).
// Every int16 rounding of x is within 2^-16 of its block's largest |x|.
// These kernels need AVX512_BF16 and AVX512_VNNI (vpdpwssd, vpdpbusd): HAVE_BF16DOT in common.h.

inline uint16_t bf16_of(float f) {  // exact for the small integers used here
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

struct Tables {
  alignas(64) int16_t i4[32];      // (i & 15) - 8 as int16
  alignas(64) uint16_t u4[32];     // (i & 15) - 8 as bf16 (Q4_1 / Q4_K: centred, less cancellation against the mins)
  alignas(64) int16_t q6w[8][32];  // word w of 32-element group G belongs to 16-element sub-block 2G + w / 16
  Tables() {
    for (int i = 0; i < 32; ++i) {
      i4[i] = (int16_t)((i & 15) - 8);
      u4[i] = bf16_of((float)((i & 15) - 8));
    }
    for (int g = 0; g < 8; ++g)
      for (int w = 0; w < 32; ++w) q6w[g][w] = (int16_t)(2 * g + (w >> 4));
  }
};
inline const Tables TB;

struct XP {  // prepared activations, m rows
  const uint16_t* xh;
  const uint16_t* xl;
  const float* xf;  // original x
  const float* xs;  // sums of x per 32 elements [m][k/32]
  int64_t k;
  // x as int16 per 32-block (x ~ dx * q16), each pair of blocks a, b re-ordered [a0..15 b0..15 | a16..31 b16..31]
  const int16_t* q16;
  const float* dx;  // the int16 scale of each 32-block [m][k/32]
  // x as int16 per 256-block in natural order (x ~ dxk * q16k), for the K types; only when k % 256 == 0
  const int16_t* q16k;
  const float* dxk;     // [m][k/256]
  const float* sk;      // sums of the rounded x per 32 elements, dxk * sum(q16k) [m][k/32]
  const int32_t* qs;    // sums of q16 per 32-block [m][k/32] (Q4_0x16's -8 offset)
  const int32_t* ks16;  // sums of q16k per 16 elements [m][k/16] (Q4_Kx16 / Q6_Kx16's offsets)
  // q16k in two bytes, q16k = 256 * kh + kl (kh signed, kl unsigned: Q4_Kx16's vpdpbusd) [m][k]
  const uint8_t* kl;
  const int8_t* kh;
  // the per-32-block int16 x (q16's values) in two bytes, natural order (Q4_0x16's vpdpbusd) [m][k]
  const uint8_t* bl;
  const int8_t* bh;
};

inline int g_pair = 1;  // benchmarking knob (set_pair): use the two-block kernels where a type has them

// the forms of x a type's small-batch kernel reads (XBuf builds only those)
enum : int { XF_SPLIT = 1, XF_Q16 = 2, XF_K = 4, XF_SUM = 8, XF_K8 = 16, XF_B8 = 32 };
inline int x_forms(int64_t qt, int64_t k) {
  const int tail = ((k / 32) % 2 || !g_pair) ? XF_SPLIT : 0;  // Q4_0 / Q4_1's one-block bf16 kernel
  switch (qt) {
    case 0: return XF_Q16 | tail;
    case 1: return XF_Q16 | XF_SUM | tail;
    case 7:
    case 8: return XF_K | XF_SUM;
    case 9: return XF_K;
    case X16: return XF_B8;
    case X41: return XF_B8 | XF_SUM;
    case 11: return XF_K | XF_SUM | XF_K8;
    case 13: return XF_K | XF_SUM;
    case 12: return XF_K | XF_K8;
    case 14: return XF_Q16;
    default: return 0;  // Q8_0 and the generic loop read x as float
  }
}

// 16 ints in int16 range -> their low (unsigned) and high (signed) bytes, v = 256 hi + lo
inline void store_bytes(__m512i v, uint8_t* lo, int8_t* hi) {
  _mm_storeu_si128((__m128i*)lo, _mm512_cvtepi32_epi8(v));  // truncation: the low byte
  _mm_storeu_si128((__m128i*)hi, _mm512_cvtepi32_epi8(_mm512_srai_epi32(v, 8)));
}

struct XBuf {  // owns the prepared activations (not copyable: p points into the buffers)
  std::vector<uint16_t> h, l;
  std::vector<int16_t> q16, q16k;
  std::vector<float> dx, dxk, sk;
  std::vector<int32_t> qs, ks16;
  std::vector<uint8_t> kl, bl;
  std::vector<int8_t> kh, bh;
  std::vector<float> s;
  XP p;
  int64_t m;
  XBuf(const XBuf&) = delete;
  XBuf& operator=(const XBuf&) = delete;
  XBuf(const float* xf, int64_t m_, int64_t k, int forms) : m(m_) {
    if (forms & XF_SPLIT) build_split(xf, k);
    if (forms & XF_SUM) {
      s.resize(m * (k / 32));
      for (int64_t g = 0; g < m * (k / 32); ++g)
        s[g] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(xf + 32 * g), _mm512_loadu_ps(xf + 32 * g + 16)));
    }
    if (forms & (XF_Q16 | XF_B8)) build_q16(xf, k, forms);
    if ((forms & (XF_K | XF_K8)) && k % 256 == 0) build_q16k(xf, k, forms & XF_K8);
    p = XP{h.data(),   l.data(),  xf,        s.data(),    k,         q16.data(), dx.data(), q16k.data(),
           dxk.data(), sk.data(), qs.data(), ks16.data(), kl.data(), kh.data(),  bl.data(), bh.data()};
  }

 private:
  void build_split(const float* xf, int64_t k) {
    h.resize(m * k);
    l.resize(m * k);
    for (int64_t i = 0; i < m * k; i += 16) {  // k is a multiple of 32
      const __m512 v = _mm512_loadu_ps(xf + i);
      const __m256i hi = (__m256i)_mm512_cvtneps_pbh(v);
      const __m512 hf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hf));
      _mm256_storeu_si256((__m256i*)(h.data() + i), hi);
      _mm256_storeu_si256((__m256i*)(l.data() + i), lo);
    }
  }

  // int16 per 32-block, stored in pair order: per 64 elements (blocks a, b of a row)
  // [a0..15 b0..15 a16..31 b16..31]; a row's last odd block stays in natural order
  // (and / or, XF_B8: the same values as two bytes in natural order, v = 256 bh + bl)
  void build_q16(const float* xf, int64_t k, int forms) {
    const int64_t nb = k / 32;
    const bool pairs = forms & XF_Q16, bytes = forms & XF_B8;
    if (pairs) q16.resize(m * k);
    if (bytes) bl.resize(m * k), bh.resize(m * k);
    dx.resize(m * nb);
    qs.resize(m * nb);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t g = 0; g < nb; ++g) {
        const float* v = xf + i * k + 32 * g;
        const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
        dx[i * nb + g] = amax / 32767.f;
        // round to nearest even (the MXCSR default), like std::nearbyint
        const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        qs[i * nb + g] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        if (bytes) {
          const int64_t o = i * k + 32 * g;
          store_bytes(i0, bl.data() + o, bh.data() + o);
          store_bytes(i1, bl.data() + o + 16, bh.data() + o + 16);
        }
        if (!pairs) continue;
        const __m256i c0 = _mm512_cvtepi32_epi16(i0), c1 = _mm512_cvtepi32_epi16(i1);
        int16_t* o = q16.data() + i * k + 32 * (g & ~int64_t(1));
        if ((g & 1) == 0 && g + 1 == nb) {  // unpaired last block: natural order
          _mm256_storeu_si256((__m256i*)o, c0);
          _mm256_storeu_si256((__m256i*)(o + 16), c1);
        } else {
          _mm256_storeu_si256((__m256i*)(o + ((g & 1) ? 16 : 0)), c0);
          _mm256_storeu_si256((__m256i*)(o + ((g & 1) ? 48 : 32)), c1);
        }
      }
  }

  // int16 per 256-block, natural order (the K types' integer kernels)
  // (bytes: also as two bytes, v = 256 kh + kl)
  void build_q16k(const float* xf, int64_t k, bool bytes) {
    q16k.resize(m * k);
    if (bytes) kl.resize(m * k), kh.resize(m * k);
    dxk.resize(m * (k / 256));
    sk.resize(m * (k / 32));
    ks16.resize(m * (k / 16));
    for (int64_t g = 0; g < m * (k / 256); ++g) {
      const float* v = xf + 256 * g;
      __m512 mx = _mm512_setzero_ps();
      for (int t = 0; t < 256; t += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(v + t)));
      const float amax = _mm512_reduce_max_ps(mx);
      const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
      dxk[g] = amax / 32767.f;
      for (int t = 0; t < 256; t += 32) {
        const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + t), inv));
        const __m512i c1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + t + 16), inv));
        _mm256_storeu_si256((__m256i*)(q16k.data() + 256 * g + t), _mm512_cvtepi32_epi16(c0));
        _mm256_storeu_si256((__m256i*)(q16k.data() + 256 * g + t + 16), _mm512_cvtepi32_epi16(c1));
        if (bytes) {
          store_bytes(c0, kl.data() + 256 * g + t, kh.data() + 256 * g + t);
          store_bytes(c1, kl.data() + 256 * g + t + 16, kh.data() + 256 * g + t + 16);
        }
        const int32_t s0 = _mm512_reduce_add_epi32(c0), s1 = _mm512_reduce_add_epi32(c1);
        ks16[16 * g + t / 16] = s0;
        ks16[16 * g + t / 16 + 1] = s1;
        sk[8 * g + t / 32] = dxk[g] * (float)(s0 + s1);
      }
    }
  }
};

}  // namespace levante
#endif  // HAVE_BF16DOT
