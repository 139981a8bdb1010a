// The extension's Python-facing ops (bound in ext.cpp). Type ids: common.h; every op checks its arguments.
#pragma once

#include "common.h"

namespace levante {

// dequant.cpp: raw weights [N, row bytes] uint8 (grouped ids: [N / 16, group bytes]) -> float32 [N, k]
torch::Tensor dequant(torch::Tensor raw, int64_t qt, int64_t k);
torch::Tensor dequant_into(torch::Tensor raw, int64_t qt, int64_t k, torch::Tensor out);
torch::Tensor regroup_rows(torch::Tensor raw, int64_t qt, int64_t k);
torch::Tensor ungroup_rows(torch::Tensor raw, int64_t qt, int64_t k);
torch::Tensor grouped_rows(torch::Tensor raw, int64_t qt, int64_t k, torch::Tensor ids);

// gemv.cpp: y [m, n] = x [m, k] @ W.T
torch::Tensor gemv(torch::Tensor raw, int64_t qt, int64_t k, torch::Tensor x);
torch::Tensor gemv_multi(std::vector<torch::Tensor> raws, std::vector<int64_t> qts, int64_t k, torch::Tensor x);
int64_t set_nr1(int64_t v);
int64_t set_pair(int64_t v);
int64_t set_pf(int64_t v);

// decode.cpp: the fused decode-step ops
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor attn_decode(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                          int64_t row0, int64_t row_stride, torch::Tensor slots, torch::Tensor bias, int64_t nh,
                          int64_t nkv);
torch::Tensor ffn_decode(torch::Tensor x, torch::Tensor logits, std::vector<torch::Tensor> ws, std::vector<int64_t> qts,
                         int64_t top_k);
torch::Tensor layer_decode(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps,
                           std::vector<torch::Tensor> attn, std::vector<int64_t> attn_qts, torch::Tensor cos,
                           torch::Tensor sin, torch::Tensor kc, torch::Tensor vc, int64_t row0, int64_t row_stride,
                           torch::Tensor slots, torch::Tensor bias, int64_t nh, int64_t nkv, torch::Tensor router,
                           std::vector<torch::Tensor> ffn, std::vector<int64_t> ffn_qts, int64_t top_k);

}  // namespace levante
