// The generic kernels: any GGML type through its block dequantizer (dequant.h). Full dequantization, and the
// GEMV that dequantizes 256 weights at a time into L1 and runs f32 FMAs per row of x (the types and CPUs
// without the integer kernels of rows.h / grouped16.h).
#pragma once

#include "dequant.h"

namespace levante {

template <deq_fn F, int BL, int BY>
void dequant_t(const uint8_t* src, float* dst, int64_t n, int64_t k) {
  const int64_t nb = k / BL, rb = nb * BY;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < nb; ++i) F(src + r * rb + i * BY, dst + r * k + i * BL);
  });
}

// acc[0..16) += a[0..n) * b[0..n) lane-wise (n a multiple of 16); summed across lanes at row end.
inline void fma16(float* __restrict acc, const float* __restrict a, const float* __restrict b, int n) {
#ifdef __AVX512F__
  __m512 s0 = _mm512_loadu_ps(acc), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(_mm512_load_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(_mm512_load_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
  }
  for (; i < n; i += 16) s0 = _mm512_fmadd_ps(_mm512_load_ps(a + i), _mm512_loadu_ps(b + i), s0);
  _mm512_storeu_ps(acc, _mm512_add_ps(s0, s1));
#else
  float t[16];
  for (int l = 0; l < 16; ++l) t[l] = acc[l];
  for (int i = 0; i < n; i += 16) {
#pragma omp simd
    for (int l = 0; l < 16; ++l) t[l] += a[i + l] * b[i + l];
  }
  for (int l = 0; l < 16; ++l) acc[l] = t[l];
#endif
}

// rows [r0, r1) of y = x @ W.T (row stride ldy): dequantize 256 weights at a time into L1, f32 FMAs per x row
template <deq_fn F, int BL, int BY>
void range_gen(const uint8_t* src, int64_t rb, int64_t r0, int64_t r1, const float* xp, int64_t m, int64_t k, float* yp,
               int64_t ldy) {
  constexpr int CH = 256;
  alignas(64) float buf[CH];
  std::vector<float> acc(m * 16);
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.f);
    const uint8_t* row = src + r * rb;
    for (int64_t e0 = 0; e0 < k; e0 += CH) {
      const int len = (int)std::min<int64_t>(CH, k - e0);
      const uint8_t* blk = row + e0 / BL * BY;
      for (int e = 0; e < len; e += BL, blk += BY) F(blk, buf + e);
      for (int64_t i = 0; i < m; ++i) fma16(acc.data() + i * 16, buf, xp + i * k + e0, len);
    }
    for (int64_t i = 0; i < m; ++i) {
      float t = 0.f;
      for (int l = 0; l < 16; ++l) t += acc[i * 16 + l];
      yp[i * ldy + r] = t;
    }
  }
}

template <deq_fn F, int BL, int BY>
void gemv_t(const uint8_t* src, const float* xp, float* yp, int64_t n, int64_t k, int64_t m) {
  const int64_t rb = k / BL * BY;
  at::parallel_for(0, n, 8, [&](int64_t r0, int64_t r1) { range_gen<F, BL, BY>(src, rb, r0, r1, xp, m, k, yp, n); });
}

#ifdef HAVE_DOT1
// one row of x: weights go from registers straight into two fma accumulators, no buffer
template <class D, int BL, int BY>
void gemv1_t(const uint8_t* src, const float* xp, float* yp, int64_t n, int64_t k) {
  const int64_t nb = k / BL, rb = nb * BY;
  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      const uint8_t* blk = src + r * rb;
      for (int64_t i = 0; i < nb; ++i, blk += BY) D::run(blk, xp + i * BL, a0, a1);
      yp[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  });
}
#endif

}  // namespace levante
