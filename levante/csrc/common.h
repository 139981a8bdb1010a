// levante's CPU extension: what every source shares. Type ids, block sizes, f16 -> f32, the checks on a raw
// weight, and which instruction-set paths this build has.
//
// The extension is compiled for the machine it runs on (-march=native, see levante/quant/extension.py), so
// the paths below follow the compiler's target macros:
// * HAVE_DOT1 (AVX-512F): vectorised dequantizers and the one-row generic GEMV;
// * HAVE_BF16DOT (AVX-512F/BW/VNNI/BF16): the integer small-batch kernels, the 16-row group layouts and the
//   fused decode-step ops.
// Without them everything still builds and runs the scalar code.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#ifdef __AVX512F__
#define HAVE_DOT1 1
#endif
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define HAVE_BF16DOT 1
#endif

namespace levante {

constexpr int64_t GEMV_MAX = 64;  // = GEMV_MAX_ROWS in Python

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

// one block of raw GGML bytes -> its 32 or 256 float32 weights
typedef void (*deq_fn)(const uint8_t*, float*);

// Type ids 0-9 are the GGML types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (QTYPES in
// Python); ids 10-15 are levante's own 16-row group layouts of Q4_0, Q4_K, Q6_K, Q5_K, Q8_0 and Q4_1 (see
// grouped16_layout.h): a "row" of raw is a group of 16 weight rows, the 16 GGML blocks of each column block
// moved together.
inline constexpr int BLK[16] = {32, 32, 32, 32, 32, 256, 256, 256, 256, 256, 32, 256, 256, 256, 32, 32};
inline constexpr int BYT[16] = {18, 20, 22, 24, 34, 84, 110, 144, 176, 210, 288, 2304, 3360, 2816, 544, 320};
constexpr int64_t NQT = 16;  // type ids
// Q4_0x16, Q4_Kx16, Q6_Kx16, Q5_Kx16, Q8_0x16, Q4_1x16
constexpr int64_t X16 = 10, X4K = 11, X6K = 12, X5K = 13, X80 = 14, X41 = 15;
inline bool grouped(int64_t qt) { return qt >= X16; }
inline int64_t rows_of(const torch::Tensor& raw, int64_t qt) { return grouped(qt) ? 16 * raw.size(0) : raw.size(0); }

inline float dot(const float* __restrict a, const float* __restrict b, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void check(const torch::Tensor& raw, int64_t qt, int64_t k) {
  TORCH_CHECK(qt >= 0 && qt < NQT, "unknown qtype id ", qt);
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2 && raw.is_contiguous(),
              "raw must be contiguous uint8 2-D");
  TORCH_CHECK(k % BLK[qt] == 0 && raw.size(1) == k / BLK[qt] * BYT[qt], "row bytes do not match in_features");
}

}  // namespace levante
