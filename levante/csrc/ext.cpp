// The Python module: the ops of ops.h, and what this build can do.
#include "ops.h"

namespace {

// the instruction-set extensions this build was compiled for, and the kernel paths they enable (common.h)
std::vector<std::string> isa() {
  std::vector<std::string> r;
#ifdef __F16C__
  r.push_back("f16c");
#endif
#ifdef __AVX2__
  r.push_back("avx2");
#endif
#ifdef __FMA__
  r.push_back("fma");
#endif
#ifdef __AVX512F__
  r.push_back("avx512f");
#endif
#ifdef __AVX512BW__
  r.push_back("avx512bw");
#endif
#ifdef __AVX512VNNI__
  r.push_back("avx512vnni");
#endif
#ifdef __AVX512BF16__
  r.push_back("avx512bf16");
#endif
#ifdef HAVE_DOT1
  r.push_back("path:avx512_dequant");
#endif
#ifdef HAVE_BF16DOT
  r.push_back("path:int_kernels");
#endif
  return r;
}

// the fused decode-step ops, the integer kernels and the 16-row group layouts are compiled in
bool decode_ops() {
#ifdef HAVE_BF16DOT
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace levante;
  m.def("dequant", &dequant, "raw blocks -> float32 rows");
  m.def("dequant_into", &dequant_into, "dequant into a given buffer");
  m.def("regroup_rows", &regroup_rows, "GGML rows -> 16-row groups");
  m.def("ungroup_rows", &ungroup_rows, "16-row groups -> GGML rows");
  m.def("grouped_rows", &grouped_rows, "some rows of a grouped weight, dequantized");
  m.def("gemv", &gemv, "x @ W.T for raw weights");
  m.def("gemv_multi", &gemv_multi, "x @ [W1; W2; ...].T in one parallel region");
  m.def("set_nr1", &set_nr1, "benchmarking knob: weight rows per pass at m == 1");
  m.def("set_pair", &set_pair, "benchmarking knob: two-block kernels on / off");
  m.def("set_pf", &set_pf, "benchmarking knob: software prefetch distance");
  m.def("decode_ops", &decode_ops, "whether the integer kernels and fused decode ops are built");
  m.def("isa", &isa, "instruction-set extensions and kernel paths of this build");
  m.def("rmsnorm", &rmsnorm, "RMSNorm of float32 rows");
  m.def("attn_decode", &attn_decode, "RoPE, KV-cache write and attention for one new token per row");
  m.def("ffn_decode", &ffn_decode, "SwiGLU feed-forward / mixture of experts for a few rows");
  m.def("layer_decode", &layer_decode, "a whole decoder layer for one new token per row");
}
