"""Candidate for closing the 4-bit decode gap: Q4_0 repacked at load into 16-row interleaved blocks.

    python benchmarks/q4_0_interleaved.py [--out benchmarks/results/q4_0_interleaved.md]

The current Q4_0 GEMV (`levante/quant/kernels.py`, `K_q4p::run2`) reads each row's 18-byte blocks and
spends most of its instructions per 32 weights on unpacking codes and applying that row's block
scale. This candidate (not used by levante yet) stores, per group of 16 rows and per 32-element block,
the 16 f16 scales (32 bytes) then the 16 rows' codes (256 bytes) — the same 288 bytes — with each
row's codes in one int32 lane, nibbles ordered so that one AND (and a shift) yields the int16 pairs
(c0, c1), (c2, c3), ... of all 16 rows: `vpdpwssd` with a broadcast int16 pair of x then works on 16
rows at once, and the block scales are one vector (16 rows) per block instead of one per row. x is
rounded to int16 per 32-block as in levante's kernel (same error rule); the check below compares with
the exact GGML dequantization.

Prints and writes a table: GB/s of weight bytes read, M = 1, 48 matrices 3584 x 1024 (DRAM-resident),
best of 4 passes, four alternating rounds per thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent))

from test_kernels import make_raw, reference  # noqa: E402

from levante.quant import kernels as kq  # noqa: E402

CPP = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
// repack: raw [n, nb*18] Q4_0 -> [n/16][nb][32 B scales + 256 B codes]; codes: zmm k (k = 0..3), lane j
// (row j): dword = nibbles [c0 c2 c4 c6 c1 c3 c5 c7] of the block's codes 8k..8k+7 (code i < 16: low
// nibble of byte i, code i >= 16: high nibble of byte i - 16)
torch::Tensor repack(torch::Tensor raw, int64_t k) {
  const int64_t n = raw.size(0), nb = k / 32;
  auto out = torch::empty({n / 16, nb * 288}, torch::kUInt8);
  const uint8_t* s = raw.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for (int64_t g = 0; g < n / 16; ++g)
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* dst = o + (g * nb + b) * 288;
      for (int j = 0; j < 16; ++j) {
        const uint8_t* blk = s + (g * 16 + j) * nb * 18 + b * 18;
        std::memcpy(dst + 2 * j, blk, 2);
        uint8_t q[32];
        for (int i = 0; i < 16; ++i) { q[i] = blk[2 + i] & 15; q[i + 16] = blk[2 + i] >> 4; }
        for (int kk = 0; kk < 4; ++kk) {
          const uint8_t* c = q + 8 * kk;
          uint32_t d = c[0] | (c[2] << 4) | (c[4] << 8) | (c[6] << 12) | (c[1] << 16) | (c[3] << 20) |
                       (c[5] << 24) | ((uint32_t)c[7] << 28);
          std::memcpy(dst + 32 + kk * 64 + 4 * j, &d, 4);
        }
      }
    }
  return out;
}
// y[n] = W x; x float [k]; x quantized per 32-block to int16 (dx), block sums of x16 (sx)
torch::Tensor gemv_r16(torch::Tensor rp, int64_t n, int64_t k, torch::Tensor x) {
  const int64_t nb = k / 32;
  std::vector<int16_t> xq(k); std::vector<float> dx(nb); std::vector<int32_t> sx(nb);
  const float* xf = x.data_ptr<float>();
  for (int64_t b = 0; b < nb; ++b) {
    float amax = 0; for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xf[32*b+i]));
    const float inv = amax > 0 ? 32767.f / amax : 0.f; dx[b] = amax / 32767.f; int32_t s = 0;
    for (int i = 0; i < 32; ++i) { xq[32*b+i] = (int16_t)std::nearbyint(xf[32*b+i]*inv); s += xq[32*b+i]; }
    sx[b] = s;
  }
  auto y = torch::empty({n}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  const uint8_t* base = rp.data_ptr<uint8_t>();
  at::parallel_for(0, n / 16, 4, [&](int64_t g0, int64_t g1) {
    const __m512i m = _mm512_set1_epi32(0x000F000F);
    for (int64_t g = g0; g < g1; ++g) {
      __m512 acc = _mm512_setzero_ps();
      const uint8_t* p = base + g * nb * 288;
      _mm_prefetch((const char*)p + 4096, _MM_HINT_T0);
      for (int64_t b = 0; b < nb; ++b, p += 288) {
        const int32_t* xp = (const int32_t*)(xq.data() + 32 * b);
        __m512i t0 = _mm512_set1_epi32(-8 * sx[b]), t1 = _mm512_setzero_si512();
        for (int kk = 0; kk < 4; ++kk) {
          const __m512i d = _mm512_loadu_si512(p + 32 + 64 * kk);
          // pairs (c0,c1) (c2,c3) (c4,c5) (c6,c7) of codes 8kk..8kk+7 -> x pairs xp[4kk + 0..3]
          t0 = _mm512_dpwssd_epi32(t0, _mm512_and_si512(d, m), _mm512_set1_epi32(xp[4 * kk]));
          t1 = _mm512_dpwssd_epi32(t1, _mm512_and_si512(_mm512_srli_epi32(d, 4), m), _mm512_set1_epi32(xp[4 * kk + 1]));
          t0 = _mm512_dpwssd_epi32(t0, _mm512_and_si512(_mm512_srli_epi32(d, 8), m), _mm512_set1_epi32(xp[4 * kk + 2]));
          const __m512i c67 = _mm512_srli_epi32(_mm512_and_si512(d, _mm512_set1_epi32(0xF000F000)), 12);
          t1 = _mm512_dpwssd_epi32(t1, c67, _mm512_set1_epi32(xp[4 * kk + 3]));
        }
        const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(dv, _mm512_set1_ps(dx[b])), _mm512_cvtepi32_ps(_mm512_add_epi32(t0, t1)),
                              acc);
      }
      _mm512_storeu_ps(yp + 16 * g, acc);
    }
  });
  return y;
}
'''


def build():
    d = Path.home() / ".cache" / "levante" / "bench_q4_0_interleaved"
    d.mkdir(parents=True, exist_ok=True)
    return load_inline("q4_0_interleaved", [CPP], functions=["repack", "gemv_r16"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       build_directory=str(d), verbose=False)


def best_time(f, passes: int = 4) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "results" / "q4_0_interleaved.md"))
    args = ap.parse_args()
    ext, cur = build(), kq.extension()
    if cur is None:
        sys.exit("levante's C++ extension is not available on this machine")
    n, k = 3584, 1024
    raw = make_raw("Q4_0", n, k, seed=3)
    x = torch.randn(1, k)
    w = reference(raw, "Q4_0").double()
    y = ext.gemv_r16(ext.repack(torch.from_numpy(raw), k), n, k, x[0].contiguous()).double()
    err = float(((y - (x.double() @ w.T)[0]).abs() / (x.double().abs() @ w.abs().T)[0]).max())
    raws = [torch.from_numpy(make_raw("Q4_0", n, k, seed=i)) for i in range(48)]
    packed = [ext.repack(r, k) for r in raws]
    nbytes = raws[0].numel() * len(raws)
    tid = kq.QTYPES["Q4_0"][0]
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for _ in range(4):
            t_cur = best_time(lambda: [cur.gemv(r, tid, k, x) for r in raws])  # noqa: B023
            t_new = best_time(lambda: [ext.gemv_r16(p, n, k, x[0]) for p in packed])  # noqa: B023
            rows.append((threads, nbytes / t_cur / 1e9, nbytes / t_new / 1e9))
            print(rows[-1], flush=True)
    text = ["# Q4_0 GEMV: levante's kernel vs a 16-row interleaved layout (candidate)", "",
            f"M = 1, 48 matrices {n} x {k} (DRAM-resident), GB/s of Q4_0 bytes; candidate's max error "
            f"{err:.1e} of sum |x||w| (rule 1e-3).", "",
            "| threads | levante (K_q4p::run2) GB/s | interleaved candidate GB/s | ratio |", "|---|---|---|---|"]
    text += [f"| {t} | {a:.1f} | {b:.1f} | {b / a:.2f}x |" for t, a, b in rows]
    Path(args.out).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
