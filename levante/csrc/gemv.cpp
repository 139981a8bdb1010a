// Matrix times x for raw GGML / grouped weights: one weight (gemv), several weights sharing x in one parallel
// region (gemv_multi, run_jobs), and the benchmarking knobs of the per-row kernels.
#include "generic.h"
#include "grouped16.h"
#include "jobs.h"
#include "ops.h"
#include "rows.h"

namespace levante {

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
      at::parallel_for(0, raw.size(0), grain_rows(raw.size(1), mi),
                       [&](int64_t g0, int64_t g1) { range_grouped(qt, src, g0, g1, xb.p, mi, yp + i0 * n, n); });
    }
    return out;
  }
  if (m <= GEMV_MAX && bf_type(qt) && n > 0) {
    const uint8_t* src = raw.data_ptr<uint8_t>();
    float* yp = out.data_ptr<float>();
    const int64_t rb = raw.size(1);
    XBuf xb(x.data_ptr<float>(), m, k, x_forms(qt, k));
    at::parallel_for(0, n, grain_rows(rb, m),
                     [&](int64_t r0, int64_t r1) { range_bf_any(qt, src, rb, r0, r1, xb.p, m, yp, n); });
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
// a job's parallel units: rows, or groups of 16 rows for the grouped layouts (rb: bytes per unit)
static int64_t job_units(const Job& j) { return grouped(j.qt) ? j.n / 16 : j.n; }

static void job_range(const Job& j, int64_t lo, int64_t hi) {  // units [lo, hi)
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

}  // namespace levante
