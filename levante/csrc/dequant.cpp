// Dequantization of raw GGML and grouped weights, and the conversions between GGML rows and 16-row groups.
#include "generic.h"
#include "grouped16_layout.h"
#include "ops.h"

namespace levante {

static void dequant_any(const torch::Tensor& raw, int64_t qt, int64_t k, float* out) {
  if (grouped(qt)) {
#ifdef HAVE_BF16DOT
    dequant_grouped(raw.data_ptr<uint8_t>(), qt, out, raw.size(0), k);
#else
    TORCH_CHECK(false, "the 16-row group layouts need the AVX512_BF16 build");
#endif
    return;
  }
  DISPATCH(qt, dequant_t, raw.data_ptr<uint8_t>(), out, raw.size(0), k);
}

// raw [N, row_bytes] uint8 -> float32 [N, k] (Q4_0x16: raw [N / 16, group bytes])
torch::Tensor dequant(torch::Tensor raw, int64_t qt, int64_t k) {
  check(raw, qt, k);
  auto out = torch::empty({rows_of(raw, qt), k}, torch::kFloat32);
  dequant_any(raw, qt, k, out.data_ptr<float>());
  return out;
}

// the same into out (float32, contiguous, at least rows * k elements); returns out's first rows * k as [rows, k]
torch::Tensor dequant_into(torch::Tensor raw, int64_t qt, int64_t k, torch::Tensor out) {
  check(raw, qt, k);
  const int64_t n = rows_of(raw, qt);
  TORCH_CHECK(out.dtype() == torch::kFloat32 && out.is_contiguous() && out.numel() >= n * k, "dequant_into: bad out");
  dequant_any(raw, qt, k, out.data_ptr<float>());
  return out.view({-1}).narrow(0, 0, n * k).view({n, k});
}

// GGML rows of the grouped type's base type (Q4_0, Q4_K, Q6_K) [N, row bytes], N a multiple of 16 ->
// the 16-row groups [N / 16, 16 * row bytes] (the same bytes, moved)
torch::Tensor regroup_rows(torch::Tensor raw, int64_t qt, int64_t k) {
  TORCH_CHECK(grouped(qt) && qt < NQT, "regroup_rows: not a grouped type id: ", qt);
#ifdef HAVE_BF16DOT
  check(raw, base_of(qt), k);
  TORCH_CHECK(raw.size(0) % 16 == 0, "regroup_rows: rows must be a multiple of 16");
  auto out = torch::empty({raw.size(0) / 16, raw.size(1) * 16}, torch::kUInt8);
  regroup<true>(raw.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), qt, out.size(0), k);
  return out;
#else
  TORCH_CHECK(false, "the 16-row group layouts need the AVX512_BF16 build");
#endif
}

// rows `ids` (int64, any shape) of a grouped weight -> float32 [ids.numel(), k]
torch::Tensor grouped_rows(torch::Tensor raw, int64_t qt, int64_t k, torch::Tensor ids) {
  TORCH_CHECK(grouped(qt) && qt < NQT, "grouped_rows: not a grouped type id: ", qt);
  check(raw, qt, k);
  ids = ids.to(torch::kLong).contiguous().view({-1});
  const int64_t n = ids.numel(), rows = rows_of(raw, qt);
  const int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < rows, "grouped_rows: row id out of range");
  auto out = torch::empty({n, k}, torch::kFloat32);
#ifdef HAVE_BF16DOT
  dequant_grouped_rows(raw.data_ptr<uint8_t>(), qt, ip, n, out.data_ptr<float>(), k);
#else
  TORCH_CHECK(false, "the 16-row group layouts need the AVX512_BF16 build");
#endif
  return out;
}

// the inverse: groups -> GGML rows of the base type
torch::Tensor ungroup_rows(torch::Tensor raw, int64_t qt, int64_t k) {
  TORCH_CHECK(grouped(qt) && qt < NQT, "ungroup_rows: not a grouped type id: ", qt);
#ifdef HAVE_BF16DOT
  check(raw, qt, k);
  auto out = torch::empty({raw.size(0) * 16, raw.size(1) / 16}, torch::kUInt8);
  regroup<false>(out.data_ptr<uint8_t>(), raw.data_ptr<uint8_t>(), qt, raw.size(0), k);
  return out;
#else
  TORCH_CHECK(false, "the 16-row group layouts need the AVX512_BF16 build");
#endif
}

}  // namespace levante
