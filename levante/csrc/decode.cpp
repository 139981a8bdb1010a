// The decode-step ops. One new token per row (m <= GEMV_MAX rows, float32): RMSNorm, attention over the KV cache and
// the whole feed-forward (router softmax / top-k, expert gate+up, SiLU, down, weighted sum) are one call each, so a
// decode step costs a handful of calls per layer instead of ~150 small torch ops.
#include "jobs.h"
#include "ops.h"

namespace levante {

#ifdef __AVX512F__
// r[l] = sum of the 16 lanes of v[l], l = 0..15 (a 4-stage shuffle tree: ~3 ops per vector instead of ~8)
inline __m512 hsum16(__m512 (&v)[16]) {
  __m512 w[8], u[4], z[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
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
// written to cache rows row0 + i rs at slots[i] (kc, vc: one layer's [B, nkv, cap, hd]; rs = 1: a row per new
// token, the decode step of a batch; rs = 0: all of them in row row0, several new tokens of one sequence, as
// speculative decoding verifies them, the bias masking causally), then attention of
// each query head over the first nk slots with the additive mask bias [m, nk]. Returns [m, nh hd].
template <class T>
void attn_cache(torch::Tensor& q, torch::Tensor& out, const torch::Tensor& qkv, const torch::Tensor& cos,
                const torch::Tensor& sin, T* kp, T* vp, int64_t cap, int64_t row0, int64_t rs,
                const torch::Tensor& slots, const torch::Tensor& bias, int64_t nh, int64_t nkv);

torch::Tensor attn_decode(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kc, torch::Tensor vc,
                          int64_t row0, int64_t row_stride, torch::Tensor slots, torch::Tensor bias, int64_t nh,
                          int64_t nkv) {
  const auto f32 = torch::kFloat32;
  TORCH_CHECK(cos.dtype() == f32 && cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes() &&
                  sin.dtype() == f32 && sin.is_contiguous(),
              "attn_decode: bad cos/sin");
  const int64_t m = cos.size(0), hd = cos.size(1);
  TORCH_CHECK(hd % 2 == 0 && nh > 0 && nkv > 0 && nh % nkv == 0, "attn_decode: bad head counts");
  TORCH_CHECK(qkv.dtype() == f32 && qkv.is_contiguous() && qkv.dim() == 2 && qkv.size(0) == m &&
                  qkv.size(1) == (nh + 2 * nkv) * hd,
              "attn_decode: bad qkv");
  TORCH_CHECK((kc.dtype() == f32 || kc.dtype() == torch::kHalf) && vc.dtype() == kc.dtype() && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.size(1) == nkv &&
                  kc.size(3) == hd,
              "attn_decode: bad cache");
  const int64_t cap = kc.size(2);
  TORCH_CHECK(row_stride == 0 || row_stride == 1, "attn_decode: row_stride must be 0 or 1");
  TORCH_CHECK(row0 >= 0 && row0 + (m - 1) * row_stride < kc.size(0), "attn_decode: rows out of range");
  TORCH_CHECK(slots.dtype() == torch::kInt64 && slots.numel() == m && slots.is_contiguous(), "attn_decode: bad slots");
  TORCH_CHECK(
      bias.dtype() == f32 && bias.dim() == 2 && bias.size(0) == m && bias.is_contiguous() && bias.size(1) <= cap,
      "attn_decode: bad bias");
  auto q = torch::empty({m, nh, hd}, f32);
  auto out = torch::empty({m, nh * hd}, f32);
  if (kc.dtype() == torch::kHalf)
    attn_cache<c10::Half>(q, out, qkv, cos, sin, kc.data_ptr<c10::Half>(), vc.data_ptr<c10::Half>(), cap, row0,
                          row_stride, slots, bias, nh, nkv);
  else
    attn_cache<float>(q, out, qkv, cos, sin, kc.data_ptr<float>(), vc.data_ptr<float>(), cap, row0, row_stride, slots,
                      bias, nh, nkv);
  return out;
}

// attn_decode's work on a cache of T (float or c10::Half): rope q and the new k, store k / v at the slots,
// attention over the first bias.size(1) keys
template <class T>
void attn_cache(torch::Tensor& q, torch::Tensor& out, const torch::Tensor& qkv, const torch::Tensor& cos,
                const torch::Tensor& sin, T* kp, T* vp, int64_t cap, int64_t row0, int64_t rs,
                const torch::Tensor& slots, const torch::Tensor& bias, int64_t nh, int64_t nkv) {
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
      const int64_t at = (((row0 + i * rs) * nkv + h) * cap + slot[i]) * hd;
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
      const T* K = kp + ((row0 + i * rs) * nkv + g) * cap * hd;
      const T* V = vp + ((row0 + i * rs) * nkv + g) * cap * hd;
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
torch::Tensor ffn_decode(torch::Tensor x, torch::Tensor logits, std::vector<torch::Tensor> ws, std::vector<int64_t> qts,
                         int64_t top_k) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "ffn_decode: x must be f32 [m, h]");
  TORCH_CHECK(ws.size() == qts.size() && !ws.empty() && ws.size() % 3 == 0, "ffn_decode: weights / qtypes mismatch");
  const int64_t m = x.size(0), h = x.size(1), E = (int64_t)ws.size() / 3, inter = rows_of(ws[0], qts[0]);
  for (int64_t e = 0; e < E; ++e) {
    check(ws[3 * e], qts[3 * e], h);
    check(ws[3 * e + 1], qts[3 * e + 1], h);
    check(ws[3 * e + 2], qts[3 * e + 2], inter);
    TORCH_CHECK(rows_of(ws[3 * e], qts[3 * e]) == inter && rows_of(ws[3 * e + 1], qts[3 * e + 1]) == inter &&
                    rows_of(ws[3 * e + 2], qts[3 * e + 2]) == h,
                "ffn_decode: expert shapes differ");
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
                    logits.size(0) == m && logits.size(1) == E,
                "ffn_decode: bad router logits");
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
    jobs.push_back(
        Job{qts[3 * e], ws[3 * e].data_ptr<uint8_t>(), ws[3 * e].size(1), inter, xb[a].get(), gu[a].data(), 2 * inter});
    jobs.push_back(Job{qts[3 * e + 1], ws[3 * e + 1].data_ptr<uint8_t>(), ws[3 * e + 1].size(1), inter, xb[a].get(),
                       gu[a].data() + inter, 2 * inter});
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
    jobs.push_back(
        Job{qts[3 * e + 2], ws[3 * e + 2].data_ptr<uint8_t>(), ws[3 * e + 2].size(1), h, hb[a].get(), ys[a].data(), h});
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
                           torch::Tensor sin, torch::Tensor kc, torch::Tensor vc, int64_t row0, int64_t row_stride,
                           torch::Tensor slots, torch::Tensor bias, int64_t nh, int64_t nkv, torch::Tensor router,
                           std::vector<torch::Tensor> ffn, std::vector<int64_t> ffn_qts, int64_t top_k) {
  TORCH_CHECK(attn.size() == 4 && attn_qts.size() == 4, "layer_decode: need wq, wk, wv, wo");
  const int64_t h = x.size(1);
  auto hn = rmsnorm(x, attn_norm, eps);
  auto qkv = gemv_multi({attn[0], attn[1], attn[2]}, {attn_qts[0], attn_qts[1], attn_qts[2]}, h, hn);
  auto a = attn_decode(qkv, cos, sin, kc, vc, row0, row_stride, slots, bias, nh, nkv);
  auto x1 = gemv(attn[3], attn_qts[3], a.size(1), a);
  add_into(x1.data_ptr<float>(), x.data_ptr<float>(), x.numel());  // residual (x checked by rmsnorm)
  auto hf = rmsnorm(x1, ffn_norm, eps);
  torch::Tensor logits;
  if (router.numel() > 0) {
    TORCH_CHECK(router.dtype() == torch::kFloat32 && router.dim() == 2 && router.size(1) == h && router.is_contiguous(),
                "layer_decode: bad router");
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
                           int64_t, torch::Tensor, torch::Tensor, int64_t, int64_t, torch::Tensor,
                           std::vector<torch::Tensor>, std::vector<int64_t>, int64_t) {
  TORCH_CHECK(false, "layer_decode needs AVX512_BF16");
}
#endif

}  // namespace levante
