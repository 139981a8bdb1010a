"""Fast CPU matmul for GGML block-quantized weights, exact w.r.t. the GGML dequantization.

Measured on a 2-core AVX-512 EPYC (see benchmarks/README.md): torch's packed int4 / int8 ops
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are only fast with bf16 activations and
bf16 scales, which cannot hold GGML's f16 scales (11-bit significand) exactly; their float32 path
is a slow reference loop (20-100x slower than F.linear). So the fast exact path is our own:

* decode / small batches (rows of x <= `gemv_max_rows(qtype)`): a C++ kernel (`levante_ggml_<hash>`
  extension, built with torch.utils.cpp_extension at first use, cached under
  ~/.cache/levante/torch_extensions, or $LEVANTE_EXTENSIONS_DIR) that reads the raw GGML blocks,
  dequantizes them with AVX-512 using the reference arithmetic (bit-identical to
  `gguf.quants.dequantize`) and accumulates float32 FMAs: for one row of x the weights go from
  registers into the accumulators, for 2-8 rows through a 256-float L1 buffer; threads
  (at::parallel_for, torch's thread count) split the output rows. On CPUs with AVX512_BF16 the
  main types (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) use faster integer paths instead, with x rounded
  once per call to int16 (error <= 2^-16 of its block's largest |x|; llama.cpp uses int8):
  Q4_0 / Q4_1 per 32-block: the codes q - 8 are int16 and vpdpwssd sums exact integer products for
  two blocks per register (lanes 0-7 block a, 8-15 block b), so one scale vector and one FMA serve
  both blocks (measured 1.3x / 1.1x faster at one thread than the bf16-split kernel before it).
  Q4_0, Q4_K, Q5_K, Q6_K and Q8_0 weights with a multiple of 16 rows are regrouped once at load
  (`Grouped16Weight`: per 16 rows and column block, the 16 rows' GGML blocks moved so that one int32
  lane holds one row; the same bytes): one instruction then works on 16 rows at once, and a block's
  scales are one vector for the 16 rows (the K types: their sub-block scales applied in f32 per 16
  rows instead of a `vpmullw` per row and 32 codes). Q4_0 / Q4_K codes are bytes read with `vpdpbusd`
  against x's int16 in two bytes; Q5_K / Q6_K / Q8_0 codes are int16 pairs read with `vpdpwssd`.
  1.3-2x the per-row kernels at one thread (benchmarks/grouped16.py); every number of rows of x
  (prefill too: 1, 2 or 4 rows of x per pass over a group, 1.7-4x dequantized tiles + MKL). The GGUF
  reader then releases the mapped pages of the regrouped tensors, so the weights are in memory once.
  The per-row kernels serve the other types and row counts:
  Q4_K / Q5_K / Q6_K per 256-block: each code times its sub-block's integer scale is an int16, so
  vpdpwssd sums a whole superblock exactly in int32 and one FMA applies d * dx. Q8_0 keeps f32
  products with the scale per block.
  At m == 1 Q4_0 / Q4_1 read 4 weight rows per pass; that group is prefetched linearly in
  software 8 KiB ahead (the hardware prefetcher follows 4 interleaved row streams badly: 2.5x slower
  from DRAM without it). Typical output error ~1e-5 of sum |x||w|; a block holding one huge
  channel next to tiny ones loses the tiny ones (adversarial test, 200x channels: worst seen 7e-4 at
  k >= 576, 1.6e-3 at k = 96 where a row has only 3 blocks).
  `fused_matmul` runs several weights that share x (q/k/v, gate/up) in one such call.
* prefill (more rows): dequantize row tiles (C++ or torch) to float32 and run MKL's F.linear per tile,
  so transient memory stays bounded by `TILE_BYTES` — except the 16-row groups, whose integer kernels
  beat that at any number of rows and so run prefill too.

Every weight value used is exactly the GGML float32 dequantization (no second rounding of
weights); only the summation order differs from `x @ W.T` (plus, on the small-batch paths, x's
rounding to ~16 bits and the scales applied per block). When the compiler or the build is not
available everything falls back to the pure-torch dequantizers of `levante.quant.ggml` (slower,
same numbers).

`int4pack_from_ggml` converts Q4_0 / Q4_1 / Q4_K to torch's int4pack layout (w = (q - 8)·s + z,
scales_and_zeros [K/32, N, 2]) for callers that accept bf16 activations; `Int4PackWeight` wraps it.
It is not chosen by `fast_weight` because it is not exact (see benchmarks/README.md).
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import QuantWeight, tiled_linear

# type name -> (type id in the C++ code, elements per block, bytes per block)
QTYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (0, 32, 18),
    "Q4_1": (1, 32, 20),
    "Q5_0": (2, 32, 22),
    "Q5_1": (3, 32, 24),
    "Q8_0": (4, 32, 34),
    "Q2_K": (5, 256, 84),
    "Q3_K": (6, 256, 110),
    "Q4_K": (7, 256, 144),
    "Q5_K": (8, 256, 176),
    "Q6_K": (9, 256, 210),
}

GEMV_MAX_ROWS = 64  # x rows up to which the C++ kernel beats tile-dequant + MKL (measured: 2-8x at 8-32 rows,
# ~1.2-2x at 64, MKL ahead from 128; benchmarks/README.md); same constant as GEMV_MAX in the C++ code
# Types without the bf16 kernel (Q5_0, Q5_1, Q2_K, Q3_K; every type on CPUs without AVX512_BF16) run a
# dequantize-256 + FMA loop per row of x, which tile dequant + MKL overtakes from ~32 rows (Q5_0 4096x4096,
# 2 threads, ms gemv / tile: m=32 12.6 / 13.3, m=64 29.5 / 18.2).
GENERIC_GEMV_MAX_ROWS = 32
BF16_PATH_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # bf_type() in the C++ code
TILE_BYTES = 32 << 20  # float32 bytes of dequantized weight per prefill tile

# ----------------------------------------------------------------------------------- C++ source

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

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

// Each dequantizer writes one block (32 or 256 floats) with gguf.quants' arithmetic: f16 -> f32
// first, then the same products / sums in the same order (every product below is exact in f32,
// except Q6_K's dd*q, which is rounded exactly as the reference rounds it).

void deq_q4_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (float)((int)(qs[j] & 0x0F) - 8);
    y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
  }
}

void deq_q4_1(const uint8_t* b, float* y) {
  const float d = h2f(b), m = h2f(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = d * (float)(qs[j] & 0x0F) + m;
    y[j + 16] = d * (float)(qs[j] >> 4) + m;
  }
}

void deq_q5_0(const uint8_t* b, float* y) {
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

void deq_q5_1(const uint8_t* b, float* y) {
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

void deq_q8_0(const uint8_t* b, float* y) {
  const float d = h2f(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = (float)qs[j] * d;
}

void deq_q2_k(const uint8_t* b, float* y) {
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

void deq_q3_k(const uint8_t* b, float* y) {
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

void deq_q4_k(const uint8_t* b, float* y) {
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

void deq_q5_k(const uint8_t* b, float* y) {
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

void deq_q6_k(const uint8_t* b, float* y) {
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

#define DEF_V(t)                                                                             \
  void deq_##t##_v(const uint8_t* b, float* y) {                                             \
    blk_##t(b, [&](int o, __m512 v) { _mm512_storeu_ps(y + o, v); });                        \
  }                                                                                          \
  struct dot_##t {                                                                           \
    static inline void run(const uint8_t* b, const float* x, __m512& a0, __m512& a1) {       \
      blk_##t(b, [&](int o, __m512 v) {                                                      \
        if ((o >> 4) & 1) a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + o), a1);               \
        else a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(x + o), a0);                            \
      });                                                                                    \
    }                                                                                        \
  };
DEF_V(q4_0)
DEF_V(q4_1)
DEF_V(q5_0)
DEF_V(q5_1)
DEF_V(q8_0)
DEF_V(q4_k)
DEF_V(q5_k)
DEF_V(q6_k)
#define HAVE_DOT1 1
#define V(name) name##_v
#else
#define V(name) name
#endif

typedef void (*deq_fn)(const uint8_t*, float*);
// ids 10-14 are levante's own 16-row group layouts of Q4_0, Q4_K, Q6_K, Q5_K and Q8_0 (see `regroup`): a
// "row" of raw is a group of 16 weight rows, the 16 GGML blocks of each column block moved together
const int BLK[15] = {32, 32, 32, 32, 32, 256, 256, 256, 256, 256, 32, 256, 256, 256, 32};
const int BYT[15] = {18, 20, 22, 24, 34, 84, 110, 144, 176, 210, 288, 2304, 3360, 2816, 544};
constexpr int64_t NQT = 15;  // type ids
constexpr int64_t X16 = 10;  // Q4_0x16 (11: Q4_Kx16, 12: Q6_Kx16, 13: Q5_Kx16, 14: Q8_0x16)
inline bool grouped(int64_t qt) { return qt >= X16; }
inline int64_t rows_of(const torch::Tensor& raw, int64_t qt) { return grouped(qt) ? 16 * raw.size(0) : raw.size(0); }

inline float dot(const float* __restrict a, const float* __restrict b, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void check(const torch::Tensor& raw, int64_t qt, int64_t k) {
  TORCH_CHECK(qt >= 0 && qt < NQT, "unknown qtype id ", qt);
  TORCH_CHECK(raw.dtype() == torch::kUInt8 && raw.dim() == 2 && raw.is_contiguous(),
              "raw must be contiguous uint8 2-D");
  TORCH_CHECK(k % BLK[qt] == 0 && raw.size(1) == k / BLK[qt] * BYT[qt], "row bytes do not match in_features");
}

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
void range_gen(const uint8_t* src, int64_t rb, int64_t r0, int64_t r1, const float* xp, int64_t m, int64_t k,
               float* yp, int64_t ldy) {
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

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
// ------------------------------------------------------------------ small-batch dot products
// x is prepared once per call (XBuf) in the forms the kernels read:
// * bf16 split: x_hi = bf16(x), x_lo = bf16(x - x_hi) (~16 significant bits, relative error <= 2^-17);
//   integer codes are exact in bf16, so vdpbf16ps gives exact products with f32 sums (Q4_0 / Q4_1's
//   unpaired last block);
// * int16 per 32-block, pair order (Q4_0 / Q4_1: vpdpwssd over two blocks, scales applied per block);
// * int16 per 256-block, natural order (Q4_K / Q5_K / Q6_K: codes times their sub-block scales are
//   int16, so a whole superblock sums in int32 and one FMA applies d * dx);
// * f32 (Q8_0: int8 -> bf16 costs more than it saves) and f32 sums per 32 elements (mins).
// Every int16 rounding of x is within 2^-16 of its block's largest |x|.
// These kernels need AVX512_BF16, which every CPU with it pairs with AVX512_VNNI (vpdpwssd).
#define HAVE_BF16DOT 1

inline uint16_t bf16_of(float f) {  // exact for the small integers used here
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)(u >> 16);
}

struct Tables {
  alignas(64) int16_t i4[32];     // (i & 15) - 8 as int16
  alignas(64) uint16_t u4[32];    // (i & 15) - 8 as bf16 (Q4_1 / Q4_K: centred, less cancellation against the mins)
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
const Tables TB;

struct XP {  // prepared activations, m rows
  const uint16_t* xh;
  const uint16_t* xl;
  const float* xf;  // original x
  const float* xs;  // sums of x per 32 elements [m][k/32]
  int64_t k;
  // x as int16 per 32-block (x ~ dx * q16), each pair of blocks a, b re-ordered [a0..15 b0..15 | a16..31 b16..31]
  const int16_t* q16;
  const float* dx;     // the int16 scale of each 32-block [m][k/32]
  // x as int16 per 256-block in natural order (x ~ dxk * q16k), for the K types; only when k % 256 == 0
  const int16_t* q16k;
  const float* dxk;    // [m][k/256]
  const float* sk;     // sums of the rounded x per 32 elements, dxk * sum(q16k) [m][k/32]
  const int32_t* qs;   // sums of q16 per 32-block [m][k/32] (Q4_0x16's -8 offset)
  const int32_t* ks16; // sums of q16k per 16 elements [m][k/16] (Q4_Kx16 / Q6_Kx16's offsets)
  // q16k in two bytes, q16k = 256 * kh + kl (kh signed, kl unsigned: Q4_Kx16's vpdpbusd) [m][k]
  const uint8_t* kl;
  const int8_t* kh;
  // the per-32-block int16 x (q16's values) in two bytes, natural order (Q4_0x16's vpdpbusd) [m][k]
  const uint8_t* bl;
  const int8_t* bh;
};

template <int NR, int M>
struct Acc {
  __m512 v[NR][M][2];
  __m256 mn[NR][M];
  float s[NR][M];
  Acc() {
    for (int j = 0; j < NR; ++j)
      for (int i = 0; i < M; ++i) {
        v[j][i][0] = v[j][i][1] = _mm512_setzero_ps();
        mn[j][i] = _mm256_setzero_ps();
        s[j][i] = 0.f;
      }
  }
};

inline __m512 bdot(__m512i w, __m512i xh, __m512i xl) {
  __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)w, (__m512bh)xh);
  return _mm512_dpbf16_ps(t, (__m512bh)w, (__m512bh)xl);
}

// acc[j][i][P] += d[j] * (w[j] . x[i][e .. e+32))
template <int NR, int M, int P>
inline void dot_group(const __m512i (&w)[NR], const __m512 (&d)[NR], const XP& x, int64_t e, Acc<NR, M>& a) {
  for (int i = 0; i < M; ++i) {
    const __m512i xh = _mm512_loadu_si512(x.xh + i * x.k + e), xl = _mm512_loadu_si512(x.xl + i * x.k + e);
    for (int j = 0; j < NR; ++j) a.v[j][i][P] = _mm512_fmadd_ps(d[j], bdot(w[j], xh, xl), a.v[j][i][P]);
  }
}

// 16 bytes -> 32 words: [bytes (low nibble in bits 0-3), bytes >> 4]
inline __m512i nib32(const uint8_t* q) {
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
  return _mm512_inserti64x4(_mm512_castsi256_si512(w), _mm256_srli_epi16(w, 4), 1);
}
inline __m512i u8w(const uint8_t* q) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)q)); }
inline __m512 bc_h(const uint8_t* p) { return _mm512_set1_ps(h2f(p)); }

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
      const __m256i q = _mm256_inserti128_si256(_mm256_castsi128_si256(qa),
                                                _mm_loadu_si128((const __m128i*)(b[j] + 2 * BY - 16)), 1);
      const __m512i w = _mm512_cvtepu8_epi16(q);  // vpermw reads index bits 0-4; the table ignores bit 4
      wl[j] = _mm512_permutexvar_epi16(w, tab);
      wh[j] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tab);
      uint16_t ha, hb;
      std::memcpy(&ha, b[j], 2);
      std::memcpy(&hb, b[j] + BY, 2);
      d[j] = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short)ha)),
                                                     _mm_set1_epi16((short)hb), 1));
      if constexpr (MIN) {  // d*q + m = d*(q-8) + (m + 8d); the second term multiplies the block sums of x
        uint16_t ma, mb;
        std::memcpy(&ma, b[j] + 2, 2);
        std::memcpy(&mb, b[j] + BY + 2, 2);
        const __m512 m = _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_set1_epi16((short)ma)),
                                                                 _mm_set1_epi16((short)mb), 1));
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
                                       _mm512_cvtepi32_ps(_mm512_add_epi32(acc[j][i][0], acc[j][i][1])),
                                       a.v[j][i][P]);
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
#define Q6I(S, H, HS)                                                                              \
  {                                                                                                \
    const int G = g * 4 + (S) * 2 + (H);                                                           \
    const __m512i gi = _mm512_load_si512(TB.q6w[G]);                                               \
    __m512i w[NR];                                                                                 \
    for (int j = 0; j < NR; ++j) {                                                                 \
      const __m512i l = (H) ? ql1[j] : ql0[j];                                                     \
      const __m512i lo = (S) ? _mm512_srli_epi16(l, 4) : _mm512_and_si512(l, m4);                 \
      const __m512i v = _mm512_sub_epi16(_mm512_or_si512(lo, _mm512_and_si512(HS, m30)), e32);    \
      w[j] = _mm512_mullo_epi16(v, _mm512_permutexvar_epi16(gi, sc[j]));                           \
    }                                                                                              \
    for (int i = 0; i < M; ++i) {                                                                  \
      const __m512i xv = _mm512_loadu_si512(x.q16k + i * x.k + e0 + 32 * G);                      \
      for (int j = 0; j < NR; ++j) acc[j][i][H] = _mm512_dpwssd_epi32(acc[j][i][H], w[j], xv);     \
    }                                                                                              \
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
                                       _mm512_cvtepi32_ps(_mm512_add_epi32(acc[j][i][0], acc[j][i][1])),
                                       a.v[j][i][P]);
  }

};

template <class T, class = void>
struct HasPair : std::false_type {};
template <class T>
struct HasPair<T, std::void_t<decltype(&T::template run2<1, 1>)>> : std::true_type {};
int g_pair = 1;  // benchmarking knob: use the two-block kernels where a type has them

int g_pfd = 8192;  // software prefetch distance in bytes (0: off); measured best of 2-16 KB
template <class T, int NR, int M>
inline void rows_bf(const uint8_t* src, int64_t rb, int64_t r, const XP& x, float* y, int64_t ldy) {
  Acc<NR, M> a;
  const uint8_t* b[NR];
  for (int j = 0; j < NR; ++j) b[j] = src + (r + j) * rb;
  const int64_t nb = x.k / T::BL;
  // software prefetch: the NR rows are read as NR interleaved streams, which the hardware prefetcher
  // follows badly from DRAM; prefetch the (contiguous) row group linearly g_pfd bytes ahead instead
  const char* pfb = (const char*)(src + r * rb) + g_pfd;
  int64_t pfc = 0, used = 0;
  int64_t ib = 0;
  for (; ib + 2 <= nb; ib += 2) {
    if (NR > 1 && g_pfd) {  // a single row stream is prefetched well by the hardware (measured)
      used += 2 * NR * T::BY;
      for (; pfc < used; pfc += 64) _mm_prefetch(pfb + pfc, _MM_HINT_T0);
    }
    if constexpr (HasPair<T>::value) {
      if (g_pair) {
        T::template run2<NR, M>(b, x, ib * T::BL, a);
        for (int j = 0; j < NR; ++j) b[j] += 2 * T::BY;
        continue;
      }
    }
    T::template run<NR, M, 0>(b, x, ib * T::BL, a);
    for (int j = 0; j < NR; ++j) b[j] += T::BY;
    T::template run<NR, M, 1>(b, x, (ib + 1) * T::BL, a);
    for (int j = 0; j < NR; ++j) b[j] += T::BY;
  }
  if (ib < nb) T::template run<NR, M, 0>(b, x, ib * T::BL, a);
  for (int j = 0; j < NR; ++j)
    for (int i = 0; i < M; ++i) {
      const float mn = _mm512_reduce_add_ps(_mm512_insertf32x8(_mm512_setzero_ps(), a.mn[j][i], 0));
      y[i * ldy + r + j] = _mm512_reduce_add_ps(_mm512_add_ps(a.v[j][i][0], a.v[j][i][1])) + a.s[j][i] - mn;
    }
}

int g_nr1 = 0;  // 0: the type's NR1 (measured: 4 for Q4_0 / Q4_1, 1 for the others)
// one row range of one weight; x rows processed in groups of up to 4 per weight row
template <class T>
void range_bf(const uint8_t* src, int64_t rb, int64_t r0, int64_t r1, const XP& x, int64_t m, float* y, int64_t ldy) {
  if (m == 1) {
    int64_t r = r0;
    const int nr = g_nr1 ? g_nr1 : T::NR1;
    if (nr == 4) for (; r + 4 <= r1; r += 4) rows_bf<T, 4, 1>(src, rb, r, x, y, ldy);
    if (nr >= 2) for (; r + 2 <= r1; r += 2) rows_bf<T, 2, 1>(src, rb, r, x, y, ldy);
    for (; r < r1; ++r) rows_bf<T, 1, 1>(src, rb, r, x, y, ldy);
    return;
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t i0 = 0; i0 < m; i0 += 4) {
      XP xi = x;
      xi.xh += i0 * x.k;
      xi.xl += i0 * x.k;
      xi.xf += i0 * x.k;
      xi.xs += i0 * (x.k / 32);
      xi.q16 += i0 * x.k;
      xi.dx += i0 * (x.k / 32);
      xi.q16k += i0 * x.k;
      xi.dxk += i0 * (x.k / 256);
      xi.sk += i0 * (x.k / 32);
      xi.qs += i0 * (x.k / 32);
      xi.ks16 += i0 * (x.k / 16);
      xi.kl += i0 * x.k;
      xi.kh += i0 * x.k;
      xi.bl += i0 * x.k;
      xi.bh += i0 * x.k;
      float* yi = y + i0 * ldy;
      switch (std::min<int64_t>(4, m - i0)) {
        case 1: rows_bf<T, 1, 1>(src, rb, r, xi, yi, ldy); break;
        case 2: rows_bf<T, 1, 2>(src, rb, r, xi, yi, ldy); break;
        case 3: rows_bf<T, 1, 3>(src, rb, r, xi, yi, ldy); break;
        default: rows_bf<T, 1, 4>(src, rb, r, xi, yi, ldy); break;
      }
    }
}

// rows per parallel task: at least ~48 KB of weights (x rows count as extra work)
inline int64_t grain_rows(int64_t rb, int64_t m) {
  return std::max<int64_t>(4, (49152 / (1 + (m - 1) / 2) + rb - 1) / rb);
}

inline bool bf_type(int64_t qt) { return qt == 0 || qt == 1 || qt == 4 || qt == 7 || qt == 8 || qt == 9; }

void range_bf_any(int64_t qt, const uint8_t* src, int64_t rb, int64_t r0, int64_t r1, const XP& x, int64_t m,
                  float* y, int64_t ldy) {
  switch (qt) {
    case 0: range_bf<K_q4_0>(src, rb, r0, r1, x, m, y, ldy); break;
    case 1: range_bf<K_q4_1>(src, rb, r0, r1, x, m, y, ldy); break;
    case 4: range_bf<K_q8_0>(src, rb, r0, r1, x, m, y, ldy); break;
    case 7: range_bf<K_q4_k>(src, rb, r0, r1, x, m, y, ldy); break;
    case 8: range_bf<K_q5_k>(src, rb, r0, r1, x, m, y, ldy); break;
    case 9: range_bf<K_q6_k>(src, rb, r0, r1, x, m, y, ldy); break;
  }
}

// the forms of x a type's small-batch kernel reads (XBuf builds only those)
enum : int { XF_SPLIT = 1, XF_Q16 = 2, XF_K = 4, XF_SUM = 8, XF_K8 = 16, XF_B8 = 32 };
inline int x_forms(int64_t qt, int64_t k) {
  const int tail = ((k / 32) % 2 || !g_pair) ? XF_SPLIT : 0;  // Q4_0 / Q4_1's one-block bf16 kernel
  switch (qt) {
    case 0: return XF_Q16 | tail;
    case 1: return XF_Q16 | XF_SUM | tail;
    case 7: case 8: return XF_K | XF_SUM;
    case 9: return XF_K;
    case X16: return XF_B8;
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
    p = XP{h.data(), l.data(), xf, s.data(), k, q16.data(), dx.data(), q16k.data(), dxk.data(), sk.data(), qs.data(),
            ks16.data(), kl.data(), kh.data(), bl.data(), bh.data()};
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

// ------------------------------------------------------------------ 16-row groups (Grouped16Weight)
// Q4_0x16: per group of 16 rows and per 32-column block, the 16 rows' f16 scales (32 bytes), then their codes
// as four 64-byte vectors: vector kk, int32 lane j = row j's codes 8kk..8kk+7 as bytes [c0 | c4 << 4,
// c1 | c5 << 4, c2 | c6 << 4, c3 | c7 << 4] (pack8b), so v & 0x0F.. gives codes 0-3 and (v >> 4) & 0x0F.. codes
// 4-7 of all 16 rows as bytes. The same 288 bytes as the 16 GGML blocks, only moved. The GEMV runs vpdpbusd
// on 16 rows at once with a broadcast 4 bytes of x (x as int16 in two bytes: two vpdpbusd per 4 codes), and
// a block's scales are one vector for the 16 rows (benchmarks/grouped16.py).

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

// Q4_0x16: y[(i0 + r) * ldy + j] for the group at base, x rows i0 .. i0 + R. The codes are bytes (pack8b order)
// read with vpdpbusd against x's two bytes per element (as x4k_rows)
template <int R>
void x16_rows(const uint8_t* base, const XP& x, int64_t i0, float* y, int64_t ldy) {
  const int64_t nb = x.k / 32;
  const __m512i m0f = _mm512_set1_epi8(15);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const uint8_t* p = base;
  for (int64_t b = 0; b < nb; ++b, p += 288) {
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
      const __m512i v = _mm512_loadu_si512(p + 32 + 64 * kk);
      const __m512i lo = _mm512_and_si512(v, m0f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m0f);
      dpb(tl, th, lo, xl, xh, 2 * kk);
      dpb(tl, th, hi, xl, xh, 2 * kk + 1);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(x.dx[(i0 + r) * nb + b])), sum_b(tl[r], th[r]), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (i0 + r) * ldy, acc[r]);
}

// ------------------------------------------------------------------ Q4_Kx16 / Q6_Kx16: K types in 16-row groups
// The Q4_0x16 idea for the K types: per group of 16 rows and per 256 columns, the same bytes as the 16 GGML
// superblocks, moved so that one int32 lane holds one row. vpdpwssd then sums a sub-block of 16 rows at once
// in int32 (exact), and the sub-block scales are applied in f32 per 16 rows (one FMA), where the per-row
// kernels spend a vpmullw on every 32 codes.
// Q4_Kx16 (2304 bytes): d[16] f16 | dmin[16] f16 | 3 x 64 bytes: lane j = packed scale bytes 4u..4u+3 of
// row j | 32 x 64 bytes: vector kk, lane j = row j's codes 8kk..8kk+7 (pack8b order: as bytes for vpdpbusd).
// Q6_Kx16 (3360 bytes): d[16] f16 | 4 x 64 bytes: lane j = int8 scales 4v..4v+3 of row j | per 16-element
// sub-block s: two code vectors (low nibbles, pack8b order) and one vector of the high bits (lane j: code e's
// two bits in byte e % 4 at bits 2 (e / 4)), so codes 4g..4g+3 come out as bytes with an AND, a shift and
// a ternary-logic op, read with vpdpbusd as Q4_Kx16.

// Q5_Kx16 (2816 bytes): as Q4_Kx16, but the codes in pack8 order and per sub-block the four code vectors are
// followed by one vector of the fifth bits (lane j: element 2P's bit at bit P, element 2P+1's at bit 16 + P).
// Q8_0x16 (544 bytes): d[16] f16 | 8 x 64 bytes: vector kk, lane j = row j's codes 4kk .. 4kk+3 as bytes
// [c0 c2 c1 c3], so the int16 words' low and high bytes are the pairs (c0, c1) and (c2, c3).
constexpr int64_t X4K = 11, X6K = 12, X5K = 13, X80 = 14;

// 8 nibbles -> [c0 c2 c4 c6 | c1 c3 c5 c7]: (v >> 4s) & 0x000F000F is the int16 pair (c_2s, c_2s+1)
inline uint32_t pack8(const uint8_t* c) {
  return (uint32_t)c[0] | (uint32_t)c[2] << 4 | (uint32_t)c[4] << 8 | (uint32_t)c[6] << 12 | (uint32_t)c[1] << 16 |
         (uint32_t)c[3] << 20 | (uint32_t)c[5] << 24 | (uint32_t)c[7] << 28;
}
// 8 codes -> [c0 | c4 << 4, c1 | c5 << 4, c2 | c6 << 4, c3 | c7 << 4]: one AND gives c0..c3 as bytes, a shift
// and an AND c4..c7 (Q4_Kx16, read with vpdpbusd)
inline uint32_t pack8b(const uint8_t* c) {
  uint32_t d = 0;
  for (int b = 0; b < 4; ++b) d |= (uint32_t)(c[b] | c[b + 4] << 4) << (8 * b);
  return d;
}
inline void unpack8b(uint32_t d, uint8_t* c) {
  for (int b = 0; b < 4; ++b) {
    c[b] = (d >> (8 * b)) & 15;
    c[b + 4] = (d >> (8 * b + 4)) & 15;
  }
}
inline void unpack8(uint32_t d, uint8_t* c) {
  for (int t = 0; t < 4; ++t) {
    c[2 * t] = (d >> (4 * t)) & 15;
    c[2 * t + 1] = (d >> (16 + 4 * t)) & 15;
  }
}

// one row's GGML superblock <-> its 256 codes in element order
inline void q4k_get(const uint8_t* b, uint8_t* q) {
  for (int p = 0; p < 4; ++p)
    for (int i = 0; i < 32; ++i) {
      q[64 * p + i] = b[16 + 32 * p + i] & 15;
      q[64 * p + 32 + i] = b[16 + 32 * p + i] >> 4;
    }
}
inline void q4k_put(const uint8_t* q, uint8_t* b) {
  for (int p = 0; p < 4; ++p)
    for (int i = 0; i < 32; ++i) b[16 + 32 * p + i] = (uint8_t)(q[64 * p + i] | q[64 * p + 32 + i] << 4);
}
// Q6_K element e = g*128 + s*64 + h*32 + j: low nibble (shift 4s) of ql[g*64 + h*32 + j], high bits
// (shift 2*(2s+h)) of qh[g*32 + j] (as deq_q6_k)
inline void q6k_get(const uint8_t* b, uint8_t* q) {
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 2; ++s)
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 32; ++j)
          q[g * 128 + s * 64 + h * 32 + j] = (uint8_t)(((b[g * 64 + h * 32 + j] >> (4 * s)) & 15) |
                                                       (((b[128 + g * 32 + j] >> (2 * (2 * s + h))) & 3) << 4));
}
inline void q6k_put(const uint8_t* q, uint8_t* b) {
  std::memset(b, 0, 192);
  for (int g = 0; g < 2; ++g)
    for (int s = 0; s < 2; ++s)
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 32; ++j) {
          const uint8_t v = q[g * 128 + s * 64 + h * 32 + j];
          b[g * 64 + h * 32 + j] |= (uint8_t)((v & 15) << (4 * s));
          b[128 + g * 32 + j] |= (uint8_t)((v >> 4) << (2 * (2 * s + h)));
        }
}

// row j's GGML block (base type) <-> lane j of a group block (grouped type); `to` selects the direction
template <bool TO>
void lane_x16(const uint8_t* blk, uint8_t* dst, int j) {  // Q4_0: 18 <-> 288 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[32];
  if (TO) {
    std::memcpy(dst + 2 * j, b, 2);
    for (int i = 0; i < 16; ++i) q[i] = b[2 + i] & 15, q[i + 16] = b[2 + i] >> 4;
    for (int kk = 0; kk < 4; ++kk) {
      const uint32_t d = pack8b(q + 8 * kk);
      std::memcpy(dst + 32 + 64 * kk + 4 * j, &d, 4);
    }
  } else {
    std::memcpy(b, dst + 2 * j, 2);
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t d;
      std::memcpy(&d, dst + 32 + 64 * kk + 4 * j, 4);
      unpack8b(d, q + 8 * kk);
    }
    for (int i = 0; i < 16; ++i) b[2 + i] = (uint8_t)(q[i] | q[i + 16] << 4);
  }
}
template <bool TO>
void lane_x4k(const uint8_t* blk, uint8_t* dst, int j) {  // Q4_K: 144 <-> 2304 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[256];
  auto mv = [&](uint8_t* grp, uint8_t* row, int n) { TO ? std::memcpy(grp, row, n) : std::memcpy(row, grp, n); };
  mv(dst + 2 * j, b, 2);
  mv(dst + 32 + 2 * j, b + 2, 2);
  for (int u = 0; u < 3; ++u) mv(dst + 64 + 64 * u + 4 * j, b + 4 + 4 * u, 4);
  if (TO) {
    q4k_get(b, q);
    for (int kk = 0; kk < 32; ++kk) {
      const uint32_t d = pack8b(q + 8 * kk);
      std::memcpy(dst + 256 + 64 * kk + 4 * j, &d, 4);
    }
  } else {
    for (int kk = 0; kk < 32; ++kk) {
      uint32_t d;
      std::memcpy(&d, dst + 256 + 64 * kk + 4 * j, 4);
      unpack8b(d, q + 8 * kk);
    }
    q4k_put(q, b);
  }
}
// Q6_Kx16: the high two bits of a sub-block's code e sit in byte e % 4 of the lane, at bits 2 (e / 4)
#define Q6HI(e) (8 * ((e) % 4) + 2 * ((e) / 4))
template <bool TO>
void lane_x6k(const uint8_t* blk, uint8_t* dst, int j) {  // Q6_K: 210 <-> 3360 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[256];
  auto mv = [&](uint8_t* grp, uint8_t* row, int n) { TO ? std::memcpy(grp, row, n) : std::memcpy(row, grp, n); };
  mv(dst + 2 * j, b + 208, 2);
  for (int v = 0; v < 4; ++v) mv(dst + 32 + 64 * v + 4 * j, b + 192 + 4 * v, 4);
  if (TO) q6k_get(b, q);
  for (int s = 0; s < 16; ++s) {
    uint8_t* o = dst + 288 + 192 * s;
    uint8_t* c = q + 16 * s;
    if (TO) {
      uint8_t lo[16];
      uint32_t hi = 0;
      for (int e = 0; e < 16; ++e) {
        lo[e] = c[e] & 15;
        hi |= (uint32_t)(c[e] >> 4) << Q6HI(e);
      }
      const uint32_t d0 = pack8b(lo), d1 = pack8b(lo + 8);
      std::memcpy(o + 4 * j, &d0, 4);
      std::memcpy(o + 64 + 4 * j, &d1, 4);
      std::memcpy(o + 128 + 4 * j, &hi, 4);
    } else {
      uint32_t d0, d1, hi;
      std::memcpy(&d0, o + 4 * j, 4);
      std::memcpy(&d1, o + 64 + 4 * j, 4);
      std::memcpy(&hi, o + 128 + 4 * j, 4);
      unpack8b(d0, c);
      unpack8b(d1, c + 8);
      for (int e = 0; e < 16; ++e) c[e] |= (uint8_t)(((hi >> Q6HI(e)) & 3) << 4);
    }
  }
  if (!TO) q6k_put(q, b);
}

template <bool TO>
void lane_x5k(const uint8_t* blk, uint8_t* dst, int j) {  // Q5_K: 176 <-> 2816 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  uint8_t q[256];
  auto mv = [&](uint8_t* grp, uint8_t* row, int n) { TO ? std::memcpy(grp, row, n) : std::memcpy(row, grp, n); };
  mv(dst + 2 * j, b, 2);
  mv(dst + 32 + 2 * j, b + 2, 2);
  for (int u = 0; u < 3; ++u) mv(dst + 64 + 64 * u + 4 * j, b + 4 + 4 * u, 4);
  // element 32 s + e: low nibble (shift 4 (s & 1)) of qs[32 (s >> 1) + e], fifth bit (shift s) of qh[e]
  if (TO)
    for (int s = 0; s < 8; ++s)
      for (int e = 0; e < 32; ++e)
        q[32 * s + e] = (uint8_t)(((b[48 + 32 * (s >> 1) + e] >> (4 * (s & 1))) & 15) | (((b[16 + e] >> s) & 1) << 4));
  for (int s = 0; s < 8; ++s) {
    uint8_t* o = dst + 256 + 320 * s;
    uint8_t* c = q + 32 * s;
    if (TO) {
      uint8_t lo[32];
      uint32_t hi = 0;
      for (int e = 0; e < 32; ++e) {
        lo[e] = c[e] & 15;
        hi |= (uint32_t)(c[e] >> 4) << ((e & 1) * 16 + (e >> 1));
      }
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t d = pack8(lo + 8 * kk);
        std::memcpy(o + 64 * kk + 4 * j, &d, 4);
      }
      std::memcpy(o + 256 + 4 * j, &hi, 4);
    } else {
      uint32_t hi;
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t d;
        std::memcpy(&d, o + 64 * kk + 4 * j, 4);
        unpack8(d, c + 8 * kk);
      }
      std::memcpy(&hi, o + 256 + 4 * j, 4);
      for (int e = 0; e < 32; ++e) c[e] |= (uint8_t)(((hi >> ((e & 1) * 16 + (e >> 1))) & 1) << 4);
    }
  }
  if (!TO) {
    std::memset(b + 16, 0, 160);
    for (int s = 0; s < 8; ++s)
      for (int e = 0; e < 32; ++e) {
        b[48 + 32 * (s >> 1) + e] |= (uint8_t)((q[32 * s + e] & 15) << (4 * (s & 1)));
        b[16 + e] |= (uint8_t)((q[32 * s + e] >> 4) << s);
      }
  }
}
template <bool TO>
void lane_x80(const uint8_t* blk, uint8_t* dst, int j) {  // Q8_0: 34 <-> 544 bytes
  uint8_t* b = const_cast<uint8_t*>(blk);
  static constexpr int ORD[4] = {0, 2, 1, 3};  // byte t of a lane holds code ORD[t]
  if (TO) std::memcpy(dst + 2 * j, b, 2);
  else std::memcpy(b, dst + 2 * j, 2);
  for (int kk = 0; kk < 8; ++kk)
    for (int t = 0; t < 4; ++t) {
      uint8_t* g = dst + 32 + 64 * kk + 4 * j + t;
      uint8_t* r = b + 2 + 4 * kk + ORD[t];
      if (TO) *g = *r;
      else *r = *g;
    }
}

inline int64_t base_of(int64_t qt) {
  switch (qt) {
    case X16: return 0;
    case X4K: return 7;
    case X6K: return 9;
    case X5K: return 8;
    default: return 4;
  }
}

typedef void (*lane_fn)(const uint8_t*, uint8_t*, int);
// a grouped type's lane codec (TO: GGML block -> group block) and its base type's reference dequantizer
template <bool TO>
lane_fn lane_of(int64_t qt) {
  switch (qt) {
    case X16: return lane_x16<TO>;
    case X4K: return lane_x4k<TO>;
    case X6K: return lane_x6k<TO>;
    case X5K: return lane_x5k<TO>;
    default: return lane_x80<TO>;
  }
}
inline deq_fn base_deq(int64_t qt) {
  switch (qt) {
    case X16: return V(deq_q4_0);
    case X4K: return V(deq_q4_k);
    case X6K: return V(deq_q6_k);
    case X5K: return V(deq_q5_k);
    default: return V(deq_q8_0);
  }
}

// row r of a grouped weight -> float32 dst[0, k), through the row's GGML blocks and the reference dequantizer
inline void grouped_row(const uint8_t* src, int64_t qt, int64_t r, float* dst, int64_t k) {
  const int64_t bl = BLK[qt], nb = k / bl, gy = BYT[qt];
  const lane_fn lane = lane_of<false>(qt);
  const deq_fn deq = base_deq(qt);
  alignas(64) uint8_t blk[256];
  for (int64_t b = 0; b < nb; ++b) {
    lane(blk, const_cast<uint8_t*>(src) + ((r / 16) * nb + b) * gy, (int)(r % 16));
    deq(blk, dst + b * bl);
  }
}

// rows ids of the grouped weight (groups [ng, ...]) -> float32 [n_ids, k]
void dequant_grouped_rows(const uint8_t* src, int64_t qt, const int64_t* ids, int64_t n, float* dst, int64_t k) {
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) grouped_row(src, qt, ids[i], dst + i * k, k);
  });
}

// groups [0, ng) -> float32 rows (row stride k)
void dequant_grouped(const uint8_t* src, int64_t qt, float* dst, int64_t ng, int64_t k) {
  at::parallel_for(0, 16 * ng, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) grouped_row(src, qt, r, dst + r * k, k);
  });
}

// GGML rows [N, k / BL * BY] <-> groups [N / 16, k / BL * 16 BY] (TO: rows -> groups)
template <bool TO>
void regroup(uint8_t* rows, uint8_t* groups, int64_t qt, int64_t ng, int64_t k) {
  const int64_t bt = base_of(qt), nb = k / BLK[bt], by = BYT[bt], gy = BYT[qt];
  const lane_fn f = lane_of<TO>(qt);
  at::parallel_for(0, ng, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b)
        for (int j = 0; j < 16; ++j) f(rows + ((g * 16 + j) * nb + b) * by, groups + (g * nb + b) * gy, j);
  });
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
    sc[1] = _mm512_or_si512(_mm512_and_si512(u2, k2),
                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(u0, 6), k3), 4));
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
  constexpr int C = 2;  // int32 accumulator chains per row of x (4 measured no faster at R = 1)
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
// (and a shift) unpacks 4 codes of 16 rows, where the int16 pairs of x16_rows need two ops per 2 codes
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
    const int64_t c = 32 * (b & ~int64_t(1)), lo = c + (natural ? 0 : (b & 1) ? 16 : 0),
                  hi = c + (natural ? 16 : (b & 1) ? 48 : 32);
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
        const __m512i hs = g == 0 ? _mm512_slli_epi32(hv, 4) : g == 1 ? _mm512_slli_epi32(hv, 2)
                                                               : g == 2 ? hv : _mm512_srli_epi32(hv, 2);
        const __m512i c = _mm512_ternarylogic_epi32(lo, m0f, _mm512_and_si512(hs, m30), 0xEA);  // (lo & 15) | hi
        dpb(tl, th, c, xl, xh, 4 * s + g);
      }
      for (int r = 0; r < R; ++r)
        acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dsc, _mm512_set1_ps(x.dxk[(i0 + r) * nb + b])), sum_b(tl[r], th[r]),
                                 acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + (i0 + r) * ldy, acc[r]);
}

typedef void (*rows_fn)(const uint8_t*, const XP&, int64_t, float*, int64_t);

// y[i * ldy + 16 g + j] for groups [g0, g1), x rows i < m, four rows of x per pass
void range_grouped(int64_t qt, const uint8_t* src, int64_t g0, int64_t g1, const XP& x, int64_t m, float* y,
                   int64_t ldy) {
  rows_fn f1 = x16_rows<1>, f2 = x16_rows<2>, f4 = x16_rows<4>;
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
#endif

#define DISPATCH(QT, FN, ...)                                   \
  switch (QT) {                                                 \
    case 0: FN<V(deq_q4_0), 32, 18>(__VA_ARGS__); break;           \
    case 1: FN<V(deq_q4_1), 32, 20>(__VA_ARGS__); break;           \
    case 2: FN<V(deq_q5_0), 32, 22>(__VA_ARGS__); break;           \
    case 3: FN<V(deq_q5_1), 32, 24>(__VA_ARGS__); break;           \
    case 4: FN<V(deq_q8_0), 32, 34>(__VA_ARGS__); break;           \
    case 5: FN<deq_q2_k, 256, 84>(__VA_ARGS__); break;          \
    case 6: FN<deq_q3_k, 256, 110>(__VA_ARGS__); break;         \
    case 7: FN<V(deq_q4_k), 256, 144>(__VA_ARGS__); break;         \
    case 8: FN<V(deq_q5_k), 256, 176>(__VA_ARGS__); break;         \
    case 9: FN<V(deq_q6_k), 256, 210>(__VA_ARGS__); break;         \
  }

}  // namespace

void dequant_any(const torch::Tensor& raw, int64_t qt, int64_t k, float* out) {
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

// y[m, n] = sum_k x[m, k] * W[n, k], W given as raw blocks; x float32 [M, k] contiguous.
torch::Tensor gemv(torch::Tensor raw, int64_t qt, int64_t k, torch::Tensor x) {
  check(raw, qt, k);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) == k, "bad x");
  const int64_t n = rows_of(raw, qt), m = x.size(0);
  auto out = torch::empty({m, n}, torch::kFloat32);
#ifdef HAVE_BF16DOT
  if (grouped(qt)) {  // any number of rows (Q4_0x16: 1.2-1.6x tile dequant + MKL at 128-512 rows)
    if (m == 0 || n == 0) return out;
    const uint8_t* src = raw.data_ptr<uint8_t>();
    float* yp = out.data_ptr<float>();
    for (int64_t i0 = 0; i0 < m; i0 += GEMV_MAX) {  // x in chunks of 64 rows, whose int16 form stays in L2
      const int64_t mi = std::min(GEMV_MAX, m - i0);
      XBuf xb(x.data_ptr<float>() + i0 * k, mi, k, x_forms(qt, k));
      at::parallel_for(0, raw.size(0), grain_rows(raw.size(1), mi), [&](int64_t g0, int64_t g1) {
        range_grouped(qt, src, g0, g1, xb.p, mi, yp + i0 * n, n);
      });
    }
    return out;
  }
  if (m <= GEMV_MAX && bf_type(qt) && n > 0) {
    const uint8_t* src = raw.data_ptr<uint8_t>();
    float* yp = out.data_ptr<float>();
    const int64_t rb = raw.size(1);
    XBuf xb(x.data_ptr<float>(), m, k, x_forms(qt, k));
    at::parallel_for(0, n, grain_rows(rb, m), [&](int64_t r0, int64_t r1) {
      range_bf_any(qt, src, rb, r0, r1, xb.p, m, yp, n);
    });
    return out;
  }
#endif
#ifdef HAVE_DOT1
  if (m == 1 && qt != 5 && qt != 6) {
    const uint8_t* s = raw.data_ptr<uint8_t>();
    const float* xp = x.data_ptr<float>();
    float* yp = out.data_ptr<float>();
    switch (qt) {
      case 0: gemv1_t<dot_q4_0, 32, 18>(s, xp, yp, n, k); break;
      case 1: gemv1_t<dot_q4_1, 32, 20>(s, xp, yp, n, k); break;
      case 2: gemv1_t<dot_q5_0, 32, 22>(s, xp, yp, n, k); break;
      case 3: gemv1_t<dot_q5_1, 32, 24>(s, xp, yp, n, k); break;
      case 4: gemv1_t<dot_q8_0, 32, 34>(s, xp, yp, n, k); break;
      case 7: gemv1_t<dot_q4_k, 256, 144>(s, xp, yp, n, k); break;
      case 8: gemv1_t<dot_q5_k, 256, 176>(s, xp, yp, n, k); break;
      case 9: gemv1_t<dot_q6_k, 256, 210>(s, xp, yp, n, k); break;
    }
    return out;
  }
#endif
  TORCH_CHECK(!grouped(qt), "the 16-row group layouts need the AVX512_BF16 build");
  DISPATCH(qt, gemv_t, raw.data_ptr<uint8_t>(), x.data_ptr<float>(), out.data_ptr<float>(), n, k, m);
  return out;
}

// benchmarking knob: weight rows processed together at m == 1 (1, 2 or 4); returns the old value
int64_t set_nr1(int64_t v) {
#ifdef HAVE_BF16DOT
  const int64_t o = g_nr1;
  g_nr1 = (int)v;
  return o;
#else
  return 0;
#endif
}

// benchmarking knob: two-block kernels on (1) / off (0); returns the old value
int64_t set_pair(int64_t v) {
#ifdef HAVE_BF16DOT
  const int64_t o = g_pair;
  g_pair = (int)v;
  return o;
#else
  return 0;
#endif
}


// benchmarking knob: software prefetch distance in bytes at m == 1 (0: off); returns the old value
int64_t set_pf(int64_t v) {
#ifdef HAVE_BF16DOT
  const int64_t o = g_pfd;
  g_pfd = (int)v;
  return o;
#else
  return 0;
#endif
}

// ------------------------------------------------------------------ jobs: several matmuls, one parallel region
#ifdef HAVE_BF16DOT
struct Job {  // y [m, n] (row stride ldy) = x [m, k] @ W.T, W = n rows of raw blocks
  int64_t qt;
  const uint8_t* raw;
  int64_t rb, n;
  const XBuf* x;
  float* y;
  int64_t ldy;
};

// a job's parallel units: rows, or groups of 16 rows for the grouped layouts (rb: bytes per unit)
inline int64_t job_units(const Job& j) { return grouped(j.qt) ? j.n / 16 : j.n; }

void job_range(const Job& j, int64_t lo, int64_t hi) {  // units [lo, hi)
  const XP& x = j.x->p;
  const int64_t m = j.x->m;
  if (grouped(j.qt)) {
    range_grouped(j.qt, j.raw, lo, hi, x, m, j.y, j.ldy);
  } else if (bf_type(j.qt)) {
    range_bf_any(j.qt, j.raw, j.rb, lo, hi, x, m, j.y, j.ldy);
  } else {
    DISPATCH(j.qt, range_gen, j.raw, j.rb, lo, hi, x.xf, m, x.k, j.y, j.ldy);
  }
}

// every job's rows in one parallel region. Threads split the work, not the units: a unit (a row, or a group
// of 16 rows) of one weight can hold several times the bytes of another's (q/k/v: a Q8_0 group of k/v is
// 1.9x a Q4_K group of q), and an even split of units left one thread waiting for the other at the end.
void run_jobs(const std::vector<Job>& jobs) {
  const size_t nj = jobs.size();
  std::vector<int64_t> off(nj + 1, 0), w(nj);
  for (size_t j = 0; j < nj; ++j) {
    w[j] = std::max<int64_t>(1, jobs[j].rb * (1 + (jobs[j].x->m - 1) / 2));  // work per unit (as grain_rows)
    off[j + 1] = off[j] + job_units(jobs[j]) * w[j];
  }
  constexpr int64_t Q = 64;  // work quantum
  const int64_t nq = (off[nj] + Q - 1) / Q;
  if (nq == 0) return;
  auto cdiv = [](int64_t x, int64_t y) { return x <= 0 ? int64_t(0) : (x + y - 1) / y; };
  at::parallel_for(0, nq, 49152 / Q, [&](int64_t q0, int64_t q1) {
    for (size_t j = 0; j < nj; ++j) {  // the units whose work starts in [q0 Q, q1 Q)
      const int64_t lo = cdiv(q0 * Q - off[j], w[j]), hi = std::min(job_units(jobs[j]), cdiv(q1 * Q - off[j], w[j]));
      if (lo < hi) job_range(jobs[j], lo, hi);
    }
  });
}
#endif

bool decode_ops() {  // the fused decode-step ops below are compiled in (AVX512_BF16 machines)
#ifdef HAVE_BF16DOT
  return true;
#else
  return false;
#endif
}

// several weights sharing x (q/k/v, gate/up): y [m, sum n_i] = x @ [W_1; W_2; ...].T, one parallel region
torch::Tensor gemv_multi(std::vector<torch::Tensor> raws, std::vector<int64_t> qts, int64_t k, torch::Tensor x) {
  TORCH_CHECK(raws.size() == qts.size() && !raws.empty(), "raws / qtypes mismatch");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous() && x.size(1) == k, "bad x");
  const int64_t m = x.size(0), nw = (int64_t)raws.size();
  int64_t N = 0;
  for (int64_t w = 0; w < nw; ++w) {
    check(raws[w], qts[w], k);
    N += rows_of(raws[w], qts[w]);
  }
#ifdef HAVE_BF16DOT
  if (m <= GEMV_MAX) {
    auto out = torch::empty({m, N}, torch::kFloat32);
    if (m == 0 || N == 0) return out;
    int forms = 0;
    for (int64_t w = 0; w < nw; ++w) forms |= x_forms(qts[w], k);
    XBuf xb(x.data_ptr<float>(), m, k, forms);
    std::vector<Job> jobs;
    int64_t off = 0;
    for (int64_t w = 0; w < nw; ++w) {
      const int64_t n = rows_of(raws[w], qts[w]);
      jobs.push_back(Job{qts[w], raws[w].data_ptr<uint8_t>(), raws[w].size(1), n, &xb, out.data_ptr<float>() + off, N});
      off += n;
    }
    run_jobs(jobs);
    return out;
  }
#endif
  std::vector<torch::Tensor> ys;
  for (int64_t w = 0; w < nw; ++w) ys.push_back(gemv(raws[w], qts[w], k, x));
  return torch::cat(ys, 1);
}

// ------------------------------------------------------------------ decode-step ops
// One new token per row (m <= GEMV_MAX rows, float32): RMSNorm, attention over the KV cache and the whole
// feed-forward (router softmax / top-k, expert gate+up, SiLU, down, weighted sum) are one call each,
// so a decode step costs a handful of calls per layer instead of ~150 small torch ops.

#ifdef __AVX512F__
// r[l] = sum of the 16 lanes of v[l], l = 0..15 (a 4-stage shuffle tree: ~3 ops per vector instead of ~8)
inline __m512 hsum16(__m512 (&v)[16]) {
  __m512 w[8], u[4], z[2];
  for (int i = 0; i < 8; ++i) w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                                   _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                                                   _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#endif

// the KV cache holds float32 or float16 (c10::Half: llama.cpp's default KV type, half the bytes to read)
inline float to_f(float v) { return v; }
inline float to_f(c10::Half v) { return (float)v; }
#ifdef __AVX512F__
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif

// s[j] = q . K[j] for keys j < n (rows of hd values); 16 keys at a time when hd is a multiple of 16
template <class T>
inline void scores(const float* q, const T* K, int64_t n, int64_t hd, float* s) {
  int64_t j = 0;
#ifdef __AVX512F__
  if (hd % 16 == 0 && hd <= 256) {
    const int nc = (int)(hd / 16);
    __m512 qv[16];
    for (int c = 0; c < nc; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
    for (; j + 16 <= n; j += 16) {
      __m512 acc[16];
      for (int l = 0; l < 16; ++l) {
        const T* k = K + (j + l) * hd;
        __m512 a = _mm512_mul_ps(qv[0], ld16(k));
        for (int c = 1; c < nc; ++c) a = _mm512_fmadd_ps(qv[c], ld16(k + 16 * c), a);
        acc[l] = a;
      }
      _mm512_storeu_ps(s + j, hsum16(acc));
    }
  }
#endif
  for (; j < n; ++j) {
    const T* k = K + j * hd;
    float t = 0.f;
    for (int64_t d = 0; d < hd; ++d) t += q[d] * to_f(k[d]);
    s[j] = t;
  }
}

// o += sum_j p[j] V[j] (rows of hd values); accumulators in registers when hd is a multiple of 16
template <class T>
inline void weighted_sum(const float* p, const T* V, int64_t n, int64_t hd, float* o) {
#ifdef __AVX512F__
  if (hd % 16 == 0 && hd <= 256) {
    const int nc = (int)(hd / 16);
    __m512 acc[16];
    for (int c = 0; c < nc; ++c) acc[c] = _mm512_loadu_ps(o + 16 * c);
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] == 0.f) continue;
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int c = 0; c < nc; ++c) acc[c] = _mm512_fmadd_ps(pj, ld16(V + j * hd + 16 * c), acc[c]);
    }
    for (int c = 0; c < nc; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    const float pj = p[j];
    const T* v = V + j * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] += pj * to_f(v[d]);
  }
}

#ifdef __AVX512F__
// exp(x) for x in [-87.3, 88.7] (smaller x give exp(-87.3) ~ 1e-38): Cephes-style polynomial, max relative
// error ~2e-7, like expf
inline __m512 exp512(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 c1 = _mm512_set1_ps(0.693359375f), c2 = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fnmadd_ps(fx, c2, _mm512_fnmadd_ps(fx, c1, x));
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, fx);
}
#endif

inline void add_into(float* y, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += x[j];
}

// o[j] = silu(g[j]) * u[j] = g u / (1 + exp(-g))
inline void silu_mul(const float* g, const float* u, float* o, int64_t n) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.f);
  for (; j + 16 <= n; j += 16) {
    const __m512 gv = _mm512_loadu_ps(g + j);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    _mm512_storeu_ps(o + j, _mm512_div_ps(_mm512_mul_ps(gv, _mm512_loadu_ps(u + j)), _mm512_add_ps(one, e)));
  }
#endif
  for (; j < n; ++j) o[j] = g[j] * u[j] / (1.f + std::exp(-g[j]));
}

// p[j] = exp(p[j] - mx) in place (exactly 0 where p[j] = -inf), returns the sum; 16 keys at a time
inline float exp_sub_sum(float* p, int64_t n, float mx) {
  int64_t j = 0;
  float sum = 0.f;
#ifdef __AVX512F__
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(p + j);
    const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(v, vmx)));
    _mm512_storeu_ps(p + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    p[j] = p[j] == -INFINITY ? 0.f : std::exp(p[j] - mx);
    sum += p[j];
  }
  return sum;
}

torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "rmsnorm: x must be f32 [m, h]");
  TORCH_CHECK(w.dtype() == torch::kFloat32 && w.is_contiguous() && w.numel() == x.size(1), "rmsnorm: bad weight");
  const int64_t m = x.size(0), h = x.size(1);
  auto out = torch::empty_like(x);
  const float* wp = w.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) {
    const float* r = x.data_ptr<float>() + i * h;
    float* o = out.data_ptr<float>() + i * h;
    const float inv = 1.f / std::sqrt(dot(r, r, (int)h) / (float)h + (float)eps);
#pragma omp simd
    for (int64_t d = 0; d < h; ++d) o[d] = r[d] * inv * wp[d];
  }
  return out;
}

// qkv [m, (nh + 2 nkv) hd]: RoPE on q and k (cos / sign-folded sin [m, hd], see model.Rotary), k and v
// written to cache rows row0 + i at slots[i] (kc, vc: one layer's [B, nkv, cap, hd]), then attention of
// each query head over the first nk slots with the additive mask bias [m, nk]. Returns [m, nh hd].
template <class T>
void attn_cache(torch::Tensor& q, torch::Tensor& out, const torch::Tensor& qkv, const torch::Tensor& cos,
                const torch::Tensor& sin, T* kp, T* vp, int64_t cap, int64_t row0, const torch::Tensor& slots,
                const torch::Tensor& bias, int64_t nh, int64_t nkv);

torch::Tensor attn_decode(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc,
                          torch::Tensor vc, int64_t row0, torch::Tensor slots, torch::Tensor bias, int64_t nh,
                          int64_t nkv) {
  const auto f32 = torch::kFloat32;
  TORCH_CHECK(cos.dtype() == f32 && cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.dtype() == f32 && sin.is_contiguous(), "attn_decode: bad cos/sin");
  const int64_t m = cos.size(0), hd = cos.size(1);
  TORCH_CHECK(hd % 2 == 0 && nh > 0 && nkv > 0 && nh % nkv == 0, "attn_decode: bad head counts");
  TORCH_CHECK(qkv.dtype() == f32 && qkv.is_contiguous() && qkv.dim() == 2 && qkv.size(0) == m &&
                  qkv.size(1) == (nh + 2 * nkv) * hd, "attn_decode: bad qkv");
  TORCH_CHECK((kc.dtype() == f32 || kc.dtype() == torch::kHalf) && vc.dtype() == kc.dtype() && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(1) == nkv &&
                  kc.size(3) == hd, "attn_decode: bad cache");
  const int64_t cap = kc.size(2);
  TORCH_CHECK(row0 >= 0 && row0 + m <= kc.size(0), "attn_decode: rows out of range");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && slots.numel() == m && slots.is_contiguous(), "attn_decode: bad slots");
  TORCH_CHECK(bias.dtype() == f32 && bias.dim() == 2 && bias.size(0) == m && bias.is_contiguous() &&
                  bias.size(1) <= cap, "attn_decode: bad bias");
  auto q = torch::empty({m, nh, hd}, f32);
  auto out = torch::empty({m, nh * hd}, f32);
  if (kc.dtype() == torch::kHalf)
    attn_cache<c10::Half>(q, out, qkv, cos, sin, kc.data_ptr<c10::Half>(), vc.data_ptr<c10::Half>(), cap, row0, slots,
                          bias, nh, nkv);
  else
    attn_cache<float>(q, out, qkv, cos, sin, kc.data_ptr<float>(), vc.data_ptr<float>(), cap, row0, slots, bias, nh,
                      nkv);
  return out;
}

// attn_decode's work on a cache of T (float or c10::Half): rope q and the new k, store k / v at the slots,
// attention over the first bias.size(1) keys
template <class T>
void attn_cache(torch::Tensor& q, torch::Tensor& out, const torch::Tensor& qkv, const torch::Tensor& cos,
                const torch::Tensor& sin, T* kp, T* vp, int64_t cap, int64_t row0, const torch::Tensor& slots,
                const torch::Tensor& bias, int64_t nh, int64_t nkv) {
  const int64_t m = cos.size(0), hd = cos.size(1), half = hd / 2;
  const int64_t nk = bias.size(1), stride = (nh + 2 * nkv) * hd;
  float* qp = q.data_ptr<float>();
  const float *src = qkv.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  auto rope = [&](const float* x, auto* y, const float* c, const float* s) {
    for (int64_t d = 0; d < hd; ++d) y[d] = x[d] * c[d] + x[d < half ? d + half : d - half] * s[d];
  };
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < cap, "attn_decode: slot out of range");
    const float *row = src + i * stride, *c = cp + i * hd, *s = sp + i * hd;
    for (int64_t h = 0; h < nh; ++h) rope(row + h * hd, qp + (i * nh + h) * hd, c, s);
    for (int64_t h = 0; h < nkv; ++h) {
      const int64_t at = (((row0 + i) * nkv + h) * cap + slot[i]) * hd;
      rope(row + (nh + h) * hd, kp + at, c, s);
      const float* v = row + (nh + nkv + h) * hd;
      for (int64_t d = 0; d < hd; ++d) vp[at + d] = v[d];
    }
  }
  const float scale = 1.f / std::sqrt((float)hd);
  const int64_t grp = nh / nkv;
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // One task per (row, kv head): its grp query heads walk the keys in blocks of ~64 KB, all heads per
  // block, so each K / V block is read from memory once and re-read by the other heads from L2 (one
  // head after the other over the whole cache re-read it from L3 or DRAM once the cache outgrows L2).
  const int64_t kb = std::max<int64_t>(16, (65536 / (int64_t)sizeof(T) / hd) / 16 * 16);
  at::parallel_for(0, m * nkv, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, nk * hd * grp)),
                   [&](int64_t t0, int64_t t1) {
    std::vector<float> p(grp * nk), inv(grp);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / nkv, g = t % nkv;
      const T* K = kp + ((row0 + i) * nkv + g) * cap * hd;
      const T* V = vp + ((row0 + i) * nkv + g) * cap * hd;
      const float* Q = qp + (i * nh + g * grp) * hd;
      float* O = op + (i * nh + g * grp) * hd;
      for (int64_t j0 = 0; j0 < nk; j0 += kb)
        for (int64_t h = 0; h < grp; ++h)
          scores(Q + h * hd, K + j0 * hd, std::min(kb, nk - j0), hd, p.data() + h * nk + j0);
      for (int64_t h = 0; h < grp; ++h) {
        float* ph = p.data() + h * nk;
        float mx = -INFINITY;
        for (int64_t j = 0; j < nk; ++j) {
          ph[j] = ph[j] * scale + bp[i * nk + j];
          mx = std::max(mx, ph[j]);
        }
        inv[h] = 1.f / exp_sub_sum(ph, nk, mx);
        std::fill(O + h * hd, O + (h + 1) * hd, 0.f);
      }
      for (int64_t j0 = 0; j0 < nk; j0 += kb)
        for (int64_t h = 0; h < grp; ++h)
          weighted_sum(p.data() + h * nk + j0, V + j0 * hd, std::min(kb, nk - j0), hd, O + h * hd);
      for (int64_t h = 0; h < grp; ++h) {
        float* o = O + h * hd;
        const float w = inv[h];
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) o[d] *= w;
      }
    }
  });
}

// SwiGLU feed-forward of x [m, h] (already normalised): dense (ws = [w1, w3, w2], logits empty) or a
// mixture of E experts (ws = [w1_0, w3_0, w2_0, w1_1, ...], router logits [m, E]: softmax, top_k,
// weights renormalised). Gate+up of every active expert run in one parallel region, downs in another.
#ifdef HAVE_BF16DOT
torch::Tensor ffn_decode(torch::Tensor x, torch::Tensor logits, std::vector<torch::Tensor> ws,
                         std::vector<int64_t> qts, int64_t top_k) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "ffn_decode: x must be f32 [m, h]");
  TORCH_CHECK(ws.size() == qts.size() && !ws.empty() && ws.size() % 3 == 0, "ffn_decode: weights / qtypes mismatch");
  const int64_t m = x.size(0), h = x.size(1), E = (int64_t)ws.size() / 3, inter = rows_of(ws[0], qts[0]);
  for (int64_t e = 0; e < E; ++e) {
    check(ws[3 * e], qts[3 * e], h);
    check(ws[3 * e + 1], qts[3 * e + 1], h);
    check(ws[3 * e + 2], qts[3 * e + 2], inter);
    TORCH_CHECK(rows_of(ws[3 * e], qts[3 * e]) == inter && rows_of(ws[3 * e + 1], qts[3 * e + 1]) == inter &&
                    rows_of(ws[3 * e + 2], qts[3 * e + 2]) == h, "ffn_decode: expert shapes differ");
  }
  // routing: chosen[i][j], weight[i][j]
  const int64_t k = E == 1 ? 1 : top_k;
  TORCH_CHECK(k >= 1 && k <= E, "ffn_decode: bad top_k");
  std::vector<int64_t> chosen(m * k);
  std::vector<float> weight(m * k);
  if (E == 1) {
    std::fill(chosen.begin(), chosen.end(), 0);
    std::fill(weight.begin(), weight.end(), 1.f);
  } else {
    TORCH_CHECK(logits.dtype() == torch::kFloat32 && logits.is_contiguous() && logits.dim() == 2 &&
                    logits.size(0) == m && logits.size(1) == E, "ffn_decode: bad router logits");
    std::vector<float> pr(E);
    std::vector<int64_t> idx(E);
    for (int64_t i = 0; i < m; ++i) {
      const float* l = logits.data_ptr<float>() + i * E;
      const float mx = *std::max_element(l, l + E);
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += (pr[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) pr[e] /= sum;
      for (int64_t e = 0; e < E; ++e) idx[e] = e;
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                        [&](int64_t a, int64_t b) { return pr[a] > pr[b] || (pr[a] == pr[b] && a < b); });
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += pr[idx[j]];
      for (int64_t j = 0; j < k; ++j) {
        chosen[i * k + j] = idx[j];
        weight[i * k + j] = pr[idx[j]] / s;
      }
    }
  }
  // rows of x per active expert
  std::vector<std::vector<int64_t>> rows(E);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < k; ++j) rows[chosen[i * k + j]].push_back(i);
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (!rows[e].empty()) active.push_back(e);
  const int64_t na = (int64_t)active.size();
  std::vector<std::vector<float>> xs(na), gu(na), ys(na);
  std::vector<std::vector<float>> hs(na);  // XBuf keeps a pointer to its x
  std::vector<std::unique_ptr<XBuf>> xb(na), hb(na);
  std::vector<Job> jobs;
  for (int64_t a = 0; a < na; ++a) {
    const int64_t e = active[a], me = (int64_t)rows[e].size();
    xs[a].resize(me * h);
    for (int64_t r = 0; r < me; ++r)
      std::memcpy(xs[a].data() + r * h, x.data_ptr<float>() + rows[e][r] * h, h * sizeof(float));
    xb[a] = std::make_unique<XBuf>(xs[a].data(), me, h, x_forms(qts[3 * e], h) | x_forms(qts[3 * e + 1], h));
    gu[a].resize(me * 2 * inter);  // [me, 2 inter]: gate | up
    jobs.push_back(Job{qts[3 * e], ws[3 * e].data_ptr<uint8_t>(), ws[3 * e].size(1), inter, xb[a].get(),
                       gu[a].data(), 2 * inter});
    jobs.push_back(Job{qts[3 * e + 1], ws[3 * e + 1].data_ptr<uint8_t>(), ws[3 * e + 1].size(1), inter,
                       xb[a].get(), gu[a].data() + inter, 2 * inter});
  }
  run_jobs(jobs);
  jobs.clear();
  for (int64_t a = 0; a < na; ++a) {
    const int64_t e = active[a], me = (int64_t)rows[e].size();
    hs[a].resize(me * inter);
    for (int64_t r = 0; r < me; ++r)
      silu_mul(gu[a].data() + r * 2 * inter, gu[a].data() + r * 2 * inter + inter, hs[a].data() + r * inter, inter);
    hb[a] = std::make_unique<XBuf>(hs[a].data(), me, inter, x_forms(qts[3 * e + 2], inter));
    ys[a].resize(me * h);
    jobs.push_back(Job{qts[3 * e + 2], ws[3 * e + 2].data_ptr<uint8_t>(), ws[3 * e + 2].size(1), h, hb[a].get(),
                       ys[a].data(), h});
  }
  run_jobs(jobs);
  auto out = torch::zeros({m, h}, torch::kFloat32);
  std::vector<int64_t> slot_of(E, -1), next(E, 0);
  for (int64_t a = 0; a < na; ++a) slot_of[active[a]] = a;
  for (int64_t i = 0; i < m; ++i) {
    float* o = out.data_ptr<float>() + i * h;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = chosen[i * k + j], a = slot_of[e];
      const float* y = ys[a].data() + next[e]++ * h;
      const float w = weight[i * k + j];
      for (int64_t d = 0; d < h; ++d) o[d] += y[d] * w;
    }
  }
  return out;
}

// A whole decoder layer for one new token per row, GGML weights only: x + attn(norm(x)), then
// + ffn(norm(.)). attn = [wq, wk, wv, wo]; router: float32 [E, h] (empty for a dense MLP); the rest as
// in attn_decode / ffn_decode. Saves the Python glue between those calls (~25 us per layer).
torch::Tensor layer_decode(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps,
                           std::vector<torch::Tensor> attn, std::vector<int64_t> attn_qts, torch::Tensor cos,
                           torch::Tensor sin, torch::Tensor kc, torch::Tensor vc, int64_t row0, torch::Tensor slots,
                           torch::Tensor bias, int64_t nh, int64_t nkv, torch::Tensor router,
                           std::vector<torch::Tensor> ffn, std::vector<int64_t> ffn_qts, int64_t top_k) {
  TORCH_CHECK(attn.size() == 4 && attn_qts.size() == 4, "layer_decode: need wq, wk, wv, wo");
  const int64_t h = x.size(1);
  auto hn = rmsnorm(x, attn_norm, eps);
  auto qkv = gemv_multi({attn[0], attn[1], attn[2]}, {attn_qts[0], attn_qts[1], attn_qts[2]}, h, hn);
  auto a = attn_decode(qkv, cos, sin, kc, vc, row0, slots, bias, nh, nkv);
  auto x1 = gemv(attn[3], attn_qts[3], a.size(1), a);
  add_into(x1.data_ptr<float>(), x.data_ptr<float>(), x.numel());  // residual (x checked by rmsnorm)
  auto hf = rmsnorm(x1, ffn_norm, eps);
  torch::Tensor logits;
  if (router.numel() > 0) {
    TORCH_CHECK(router.dtype() == torch::kFloat32 && router.dim() == 2 && router.size(1) == h &&
                    router.is_contiguous(), "layer_decode: bad router");
    const int64_t E = router.size(0), m = x.size(0);
    logits = torch::empty({m, E}, torch::kFloat32);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t e = 0; e < E; ++e)
        logits.data_ptr<float>()[i * E + e] =
            dot(hf.data_ptr<float>() + i * h, router.data_ptr<float>() + e * h, (int)h);
  } else {
    logits = torch::empty({0}, torch::kFloat32);
  }
  auto y = ffn_decode(hf, logits, ffn, ffn_qts, top_k);
  add_into(y.data_ptr<float>(), x1.data_ptr<float>(), x1.numel());
  return y;
}
#else
torch::Tensor ffn_decode(torch::Tensor, torch::Tensor, std::vector<torch::Tensor>, std::vector<int64_t>, int64_t) {
  TORCH_CHECK(false, "ffn_decode needs AVX512_BF16");
}
torch::Tensor layer_decode(torch::Tensor, torch::Tensor, torch::Tensor, double, std::vector<torch::Tensor>,
                           std::vector<int64_t>, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t,
                           torch::Tensor, torch::Tensor, int64_t, int64_t, torch::Tensor, std::vector<torch::Tensor>,
                           std::vector<int64_t>, int64_t) {
  TORCH_CHECK(false, "layer_decode needs AVX512_BF16");
}
#endif
"""

_EXT = None
_EXT_TRIED = False
_EXT_LOCK = threading.Lock()


def _build_dir() -> Path:
    base = os.environ.get("LEVANTE_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "levante", "torch_extensions"
    )
    return Path(base)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        import platform

        return platform.processor()


def extension():
    """The compiled `_levante_ggml` module, or None (no compiler, build failure, LEVANTE_NO_EXT=1)."""
    global _EXT, _EXT_TRIED
    if _EXT_TRIED:
        return _EXT
    with _EXT_LOCK:
        if _EXT_TRIED:
            return _EXT
        if os.environ.get("LEVANTE_NO_EXT", "") not in ("", "0"):
            _EXT_TRIED = True
            return None
        try:
            from torch.utils.cpp_extension import load_inline

            # -march=native: the cached binary is only valid for this source, torch and CPU feature set
            tag = hashlib.sha1((_CPP + torch.__version__ + _cpu_flags()).encode()).hexdigest()[:10]
            name = f"levante_ggml_{tag}"
            build = _build_dir() / name
            build.mkdir(parents=True, exist_ok=True)
            _EXT = load_inline(
                name=name,
                cpp_sources=[_CPP],
                functions=["dequant", "dequant_into", "regroup_rows", "ungroup_rows", "grouped_rows", "gemv",
                           "gemv_multi", "set_nr1", "set_pf", "set_pair", "decode_ops", "rmsnorm", "attn_decode",
                           "ffn_decode", "layer_decode"],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build),
                verbose=False,
            )
        except Exception as e:  # no compiler, no headers, ... : the torch path gives the same numbers
            msg = f"levante: GGML C++ kernels unavailable, using the slower torch path ({e!s:.200})"
            warnings.warn(msg, stacklevel=2)
            _EXT = None
        _EXT_TRIED = True
    return _EXT


def gemv_max_rows(qtype: str, ext) -> int:
    """Rows of x up to which `ext.gemv` is used for weights of `qtype` (else tile dequant + F.linear)."""
    if ext is not None and qtype in BF16_PATH_TYPES and ext.decode_ops():
        return GEMV_MAX_ROWS
    return GENERIC_GEMV_MAX_ROWS


# ------------------------------------------------------------------------------- dequantization


def _as_u8_tensor(raw) -> Tensor:
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # read-only memory maps are fine: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw))
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw GGML data must be uint8, got {raw.dtype}")
    return raw


def dequantize_raw(raw: Tensor, qtype: str, in_features: int) -> Tensor:
    """Raw blocks uint8 [rows, bytes_per_row] -> float32 [rows, in_features], bit-exact with gguf."""
    raw = _as_u8_tensor(raw)
    ext = extension()
    if ext is not None and qtype in QTYPES and raw.device.type == "cpu" and raw.shape[0] > 0:
        return ext.dequant(raw.contiguous(), QTYPES[qtype][0], int(in_features))
    from .ggml import dequantize

    return dequantize(raw, qtype).reshape(raw.shape[0], in_features)


def _row_bytes(qtype: str, in_features: int) -> int:
    _, bs, ts = QTYPES[qtype]
    if in_features % bs:
        raise ValueError(f"{qtype}: in_features {in_features} is not a multiple of the block size {bs}")
    return in_features // bs * ts


# --------------------------------------------------------------------------------- weight classes


class GGMLKernelWeight(QuantWeight):
    """GGML blocks kept as-is (uint8 [out, bytes_per_row]); fused C++ matmul, exact dequantization.

    x rows <= `gemv_max_rows(qtype)`: the fused C++ kernel (weights dequantized 256 at a time in L1).
    More rows: float32 row tiles of at most TILE_BYTES, then F.linear (MKL) per tile.
    Any x dtype is accepted; the arithmetic is float32 and the result is cast back to x.dtype.
    """

    def __init__(self, raw: Tensor, qtype: str, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        if qtype not in QTYPES:
            raise ValueError(f"unsupported GGML type {qtype}; supported: {', '.join(QTYPES)}")
        raw = _as_u8_tensor(raw)
        rb = _row_bytes(qtype, in_features)
        if tuple(raw.shape) != (out_features, rb):
            raw = raw.reshape(out_features, rb)
        self.qtype = qtype
        self.kernel_id = QTYPES[qtype][0]  # the C++ code's type id
        self.register_buffer("data", raw.contiguous(), persistent=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_raw(self.data, self.qtype, self.in_features).to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        sel = self.data.index_select(0, ids.reshape(-1).to(torch.long))
        return dequantize_raw(sel, self.qtype, self.in_features).to(dtype).reshape(*ids.shape, self.in_features)

    def _tile_rows(self) -> int:
        return max(1, min(self.out_features, TILE_BYTES // (4 * self.in_features)))

    def _kernel_max_rows(self, ext) -> int:
        """Rows of x up to which the C++ kernel runs (above: dequantized tiles + MKL)."""
        return gemv_max_rows(self.qtype, ext)

    def matmul(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        ext = extension() if self.data.device.type == "cpu" else None
        if ext is not None and x2.shape[0] <= self._kernel_max_rows(ext):
            y = ext.gemv(self.data, self.kernel_id, self.in_features, x2)
        else:
            rows = self._tile_rows()
            if ext is not None:
                # tiles are dequantized into one reused buffer: a fresh 10-30 MB tensor per call would be
                # fresh pages for the kernel to fault in and zero (~4 % of a MoE prefill, measured)
                buf = _tile_buffer(rows * self.in_features)
                tile = lambda s, e: ext.dequant_into(self.data[s:e], self.kernel_id, self.in_features, buf)  # noqa: E731
            else:
                tile = lambda s, e: dequantize_raw(self.data[s:e], self.qtype, self.in_features)  # noqa: E731
            y = tiled_linear(x2, self.out_features, rows, tile)
        return y.to(x.dtype).reshape(*lead, self.out_features)


# GGML type -> id of its 16-row group layout in the C++ code (`regroup` there)
GROUPED_IDS: dict[str, int] = {"Q4_0": 10, "Q4_K": 11, "Q6_K": 12, "Q5_K": 13, "Q8_0": 14}


class Grouped16Weight(GGMLKernelWeight):
    """Q4_0 / Q4_K / Q5_K / Q6_K / Q8_0 in levante's 16-row group layouts (`regroup` in the C++ code): per
    16 rows and column block, the 16 rows' GGML blocks moved so that one int32 lane holds one row, so the
    GEMV works on 16 rows at once (vpdpbusd / vpdpwssd with broadcast x) and a block's scales are one
    vector for the 16 rows: 1.8-2.8x the per-row kernels at one thread (benchmarks/grouped16.py), and
    ahead of tile dequant + MKL at every batch size. The same bytes, moved once at load: data is uint8
    [out / 16, 16 * row bytes]. Values, `dequantize` and `rows` are exactly the GGML type's; moving the
    weight off the CPU turns it back into a GGMLKernelWeight of GGML blocks.
    """

    def __init__(self, raw: Tensor, qtype: str, out_features: int, in_features: int) -> None:
        super().__init__(raw, qtype, out_features, in_features)
        if qtype not in GROUPED_IDS:
            raise ValueError(f"no 16-row group layout for {qtype}; have: {', '.join(GROUPED_IDS)}")
        if out_features % 16:
            raise ValueError(f"{qtype}x16 needs out_features divisible by 16, got {out_features}")
        self.kernel_id = GROUPED_IDS[qtype]
        self.data = extension().regroup_rows(self.data, self.kernel_id, in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return extension().dequant(self.data, self.kernel_id, self.in_features).to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        out = extension().grouped_rows(self.data, self.kernel_id, self.in_features, ids)
        return out.to(dtype).reshape(*ids.shape, self.in_features)

    def _kernel_max_rows(self, ext) -> int:
        # the 16-row kernels at any number of rows of x: they beat tile dequant + MKL even at 128-512 rows
        # (2 threads, 3584x1024 and 1024x3584; benchmarks/README.md), so prefill uses them too
        return sys.maxsize

    def ggml_blocks(self) -> Tensor:
        """The weight as GGML blocks of its type, uint8 [out, row bytes]."""
        return extension().ungroup_rows(self.data.cpu(), self.kernel_id, self.in_features)

    def _apply(self, fn, recurse=True):
        if fn(torch.empty(0)).device.type != "cpu":  # off the CPU: back to GGML blocks and the generic class
            self.data = self.ggml_blocks()
            self.kernel_id = QTYPES[self.qtype][0]
            self.__class__ = GGMLKernelWeight
            return GGMLKernelWeight._apply(self, fn, recurse)
        return super()._apply(fn, recurse)


_SCRATCH = threading.local()


def _tile_buffer(numel: int) -> Tensor:
    """This thread's reusable float32 buffer for dequantized weight tiles (at least `numel` elements)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, TILE_BYTES // 4), dtype=torch.float32)
        _SCRATCH.buf = buf
    return buf


def fused_matmul(weights, x: Tensor, cat: bool = False) -> list[Tensor] | Tensor:
    """[w(x) for w in weights] for weights that share x (q/k/v, gate/up), in one C++ call when possible.

    When every weight is a CPU `GGMLKernelWeight` with in_features == x.shape[-1] and x has at most
    `gemv_max_rows` rows, one `gemv_multi` call prepares x once and runs one parallel region over the
    rows of all weights; otherwise each weight's own `matmul` (or `__call__` for other modules) is
    used, so callers can use it unconditionally. Results have x's dtype and shape [..., out_i]
    (with `cat`: one tensor [..., sum out_i]).
    """
    weights = list(weights)
    if not weights:
        return []
    lead, k = x.shape[:-1], x.shape[-1]
    ext = extension()
    if (
        ext is not None
        and x.device.type == "cpu"
        and all(isinstance(w, GGMLKernelWeight) and w.data.device.type == "cpu" and w.in_features == k for w in weights)
    ):
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        if 0 < x2.shape[0] <= min(gemv_max_rows(w.qtype, ext) for w in weights):
            y = ext.gemv_multi([w.data for w in weights], [w.kernel_id for w in weights], k, x2)
            if cat:
                return y.to(x.dtype).reshape(*lead, y.shape[1])
            parts = torch.split(y, [w.out_features for w in weights], dim=1)
            return [p.to(x.dtype).reshape(*lead, p.shape[1]) for p in parts]
    ys = [w(x) for w in weights]  # module calls, so forward hooks (e.g. calibration) still see them
    return torch.cat(ys, dim=-1) if cat else ys


def decode_ext():
    """The extension when its fused decode-step ops (rmsnorm, attn_decode, ffn_decode) are built, else None."""
    ext = extension()
    return ext if ext is not None and ext.decode_ops() else None


def ggml_raw(weights) -> tuple[list[Tensor], list[int]] | None:
    """(raw blocks, type ids) of `weights` for the fused decode ops; None unless all are CPU GGML weights."""
    raws, qts = [], []
    for w in weights:
        if not isinstance(w, GGMLKernelWeight) or w.data.device.type != "cpu":
            return None
        raws.append(w.data)
        qts.append(w.kernel_id)
    return raws, qts


def ffn_raw(mlps) -> tuple[list[Tensor], list[int]] | None:
    """`ggml_raw` of [w1, w3, w2] per MLP, the order `ffn_decode` takes."""
    return ggml_raw(w for mlp in mlps for w in (mlp.w1, mlp.w3, mlp.w2))


# ----------------------------------------------------------------------------- int4pack (lossy)

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def int4_codes_from_ggml(raw: Tensor, qtype: str, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q uint8 [N, K] in 0..15, scale f32 [N, K/32], zero f32 [N, K/32]) with w = (q - 8)·scale + zero.

    Q4_0: scale = d, zero = 0. Q4_1: scale = d, zero = m + 8d. Q4_K: scale = d·sc, zero = 8·d·sc − dmin·m
    (per 32-element sub-block). In float32 these scales are exact; the zero is exact unless its terms
    differ by more than 2^24 in magnitude (counted by `int4_exactness`).
    """
    raw = _as_u8_tensor(raw).reshape(raw.shape[0], -1)
    n = raw.shape[0]
    if qtype in ("Q4_0", "Q4_1"):
        ts = QTYPES[qtype][2]
        b = raw.reshape(n, -1, ts)
        d = b[..., 0:2].contiguous().view(torch.float16).float()[..., 0]
        qs = b[..., ts - 16 :]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, in_features)
        if qtype == "Q4_0":
            return q, d, torch.zeros_like(d)
        m = b[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
        return q, d, m + 8 * d
    if qtype == "Q4_K":
        b = raw.reshape(n, -1, 144)
        nb = b.shape[1]
        d = b[..., 0:2].contiguous().view(torch.float16).float()
        dmin = b[..., 2:4].contiguous().view(torch.float16).float()
        s = b[..., 4:16]
        lo, mi, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1).float()
        mn = torch.cat([mi & 0x3F, (hi >> 4) | ((mi >> 2) & 0x30)], dim=-1).float()
        dd = d * sc
        dm = dmin * mn
        qs = b[..., 16:].reshape(n, nb, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(n, in_features)
        return q, dd.reshape(n, -1), (8 * dd - dm).reshape(n, -1)
    raise ValueError(f"{qtype} has no int4 form; int4 types: {INT4_TYPES}")


def int4pack_from_ggml(raw: Tensor, qtype: str, in_features: int, dtype: torch.dtype = torch.bfloat16):
    """(packed uint8 [N', K/2], scales_and_zeros [K/32, N', 2] in `dtype`) for _weight_int4pack_mm_for_cpu.

    N' is N rounded up to a multiple of 16 (the op's requirement); the extra rows are zero."""
    q, s, z = int4_codes_from_ggml(raw, qtype, in_features)
    pad = -q.shape[0] % 16  # the op needs N divisible by 16: pad with zero rows (sliced off by the caller)
    if pad:
        q = F.pad(q, (0, 0, 0, pad), value=8)
        s, z = F.pad(s, (0, 0, 0, pad)), F.pad(z, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([s.T, z.T], dim=-1).to(dtype).contiguous()
    return packed, sz


class Int4PackWeight(QuantWeight):
    """Q4_0 / Q4_1 / Q4_K through torch's int4pack op with bf16 activations and bf16 scales.

    Fast for prefill and decode, but NOT exact: bf16 scales keep 8 of the 11 significant bits of
    GGML's f16 d (relative weight error up to 2^-9), and activations are rounded to bf16.
    """

    def __init__(self, raw: Tensor, qtype: str, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        if in_features % 32:
            raise ValueError("int4pack needs in_features divisible by 32")
        packed, sz = int4pack_from_ggml(raw, qtype, in_features, torch.bfloat16)
        self.qtype = qtype
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", sz, persistent=False)

    def matmul(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, 32, self.scales_zeros)
        return y[:, : self.out_features].to(x.dtype).reshape(*lead, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, 32, self.scales_zeros)
        return w[:, : self.out_features].T.contiguous().to(dtype)


def int4_exactness(raw: Tensor, qtype: str, in_features: int, dtype: torch.dtype = torch.float32) -> dict:
    """Compare (q - 8)·s + z with scales/zeros stored in `dtype` against the exact GGML values."""
    q, s, z = int4_codes_from_ggml(raw, qtype, in_features)
    ref = dequantize_raw(raw, qtype, in_features).double()
    s2 = s.to(dtype).double().repeat_interleave(32, dim=1)
    z2 = z.to(dtype).double().repeat_interleave(32, dim=1)
    w = ((q.double() - 8) * s2 + z2).float().double()  # one f32 rounding, as an fma in f32 does
    diff = (w - ref).abs()
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return {
        "exact_fraction": float((diff == 0).double().mean()),
        "max_ulps": float((diff / ulp).max()),
        "max_rel": float((diff / ref.abs().clamp_min(1e-30)).max()),
        "rel_norm": float(diff.norm() / ref.norm().clamp_min(1e-30)),
    }


# -------------------------------------------------------------------------------------- factory


def fast_weight(raw_u8: Tensor, qtype: str, out_features: int, in_features: int) -> QuantWeight:
    """The fastest exact weight for GGML `qtype` (all of QTYPES use the fused kernel / tile path; Q4_0, Q4_K
    and Q6_K are regrouped in 16-row groups where the AVX512_BF16 kernels are built and out_features allows)."""
    if (
        qtype in GROUPED_IDS
        and out_features % 16 == 0
        and out_features > 0
        and in_features >= 64
        and decode_ext()
    ):
        return Grouped16Weight(raw_u8, qtype, out_features, in_features)
    if qtype in QTYPES:
        return GGMLKernelWeight(raw_u8, qtype, out_features, in_features)
    from .ggml import GGMLWeight

    return GGMLWeight(_as_u8_tensor(raw_u8), qtype, (out_features, in_features))
