// The conv part of the fused Mamba streaming step (mamba_step_api.h), compiled once per ISA like the
// other kernels (the build defines one of M2REC_ISA_AVX512 / _AVX2 / _GENERIC).
//
// Per batch row: per channel, the window's K values are shifted left, the new input appended and the
// taps dot formed in the same pass (K is small: 2 to 4 in practice, a compile-time constant for those);
// then SiLU over the row's channels in vectors of W lanes.
//
// The small products (rows_gemm): at batch 64 and widths 4 to 256, torch's BLAS calls cost 2-3x their
// arithmetic (measured: in_proj (64 x 64) x (64 x 256) 30 us on one Zen 4 thread), so they are done here
// by the textbook register-blocked form: 4 rows x 2 vectors of output columns accumulated in registers,
// one broadcast of an input element and two vector FMAs per k, the weight read transposed (K, n_pad).
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mamba_step_api.h"
#include "simd.h"

namespace {

using m2rec_mamba_step::ConvStepParams;
using m2rec_mamba_step::GateNormParams;

constexpr int W = Vec::W;

template <int kK>  // kK > 0: K known at compile time; 0: read it from p
void row_conv(const ConvStepParams& p, int64_t b, float* pre) {
  const int64_t K = kK > 0 ? kK : p.K;
  float* win = p.window + b * p.w_sb;
  const float* x = p.x + b * p.x_sb;
  for (int64_t d = 0; d < p.dim; ++d) {
    float* w = win + d * p.w_sd;
    const float* t = p.taps + d * K;
    float acc = p.bias ? p.bias[d] : 0.0f;
    for (int64_t k = 0; k + 1 < K; ++k) {
      const float v = w[k + 1];
      w[k] = v;
      acc += v * t[k];
    }
    w[K - 1] = x[d];
    acc += x[d] * t[K - 1];
    pre[d] = acc;
  }
}

void silu_row(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec a = Vec::load(v + i);
    (a * sigmoid(a)).store(v + i);
  }
  if (i < n) {
    alignas(64) float tmp[W] = {};
    memcpy(tmp, v + i, sizeof(float) * (n - i));
    const Vec a = Vec::load(tmp);
    (a * sigmoid(a)).store(tmp);
    memcpy(v + i, tmp, sizeof(float) * (n - i));
  }
}


// kR rows starting at row b, output columns [j0, j0 + kV W) (the last ones may be past n: not stored).
template <int kR, int kV>
inline void gemm_block(const m2rec_mamba_step::RowsGemmParams& p, int64_t b, int64_t j0) {
  Vec acc[kR][kV];
  for (int v = 0; v < kV; ++v) {
    const int64_t j = j0 + v * W;
    const int lanes = static_cast<int>(j >= p.n ? 0 : (p.n - j < W ? p.n - j : W));
    const Vec init = p.bias && lanes > 0 ? load_n(p.bias + j, lanes) : Vec::zero();
    for (int r = 0; r < kR; ++r) acc[r][v] = init;
  }
  const float* in = p.in + b * p.in_sb;
  for (int64_t k = 0; k < p.K; ++k) {
    Vec w[kV];
    for (int v = 0; v < kV; ++v) w[v] = Vec::load(p.wt + k * p.n_pad + j0 + v * W);
    for (int r = 0; r < kR; ++r) {
      const Vec a = Vec::bcast(in[r * p.in_sb + k]);
      for (int v = 0; v < kV; ++v) acc[r][v] = fma(a, w[v], acc[r][v]);
    }
  }
  for (int v = 0; v < kV; ++v) {
    const int64_t j = j0 + v * W;
    if (j >= p.n) break;
    const int lanes = static_cast<int>(p.n - j < W ? p.n - j : W);
    for (int r = 0; r < kR; ++r) store_n(acc[r][v], p.out + (b + r) * p.out_sb + j, lanes);
  }
}

template <int kR>
inline void gemm_rows(const m2rec_mamba_step::RowsGemmParams& p, int64_t b) {
  int64_t j0 = 0;
  for (; j0 + 2 * W <= p.n_pad; j0 += 2 * W) gemm_block<kR, 2>(p, b, j0);
  if (j0 < p.n_pad) gemm_block<kR, 1>(p, b, j0);
}

void rows_gemm(const m2rec_mamba_step::RowsGemmParams& p, int64_t begin, int64_t end) {
  int64_t b = begin;
  for (; b + 4 <= end; b += 4) gemm_rows<4>(p, b);
  for (; b < end; ++b) gemm_rows<1>(p, b);
}

// The M2Rec layer step's gate and LayerNorms (gate_norm, residual_norm; fusion_step_ops.cpp): per row,
// the k gate logits accumulated together in vectors (each branch vector loaded once), softmax, the
// mix, and LayerNorm in vector passes — the same row loops in the ops file (no ISA flags) cost ~3x.

// GELU, erf form (torch's default): x Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2, with erfc(u) for u >= 0 by
// Abramowitz & Stegun 7.1.26 (t = 1 / (1 + 0.3275911 u), a degree-5 polynomial in t times e^-u^2,
// absolute error < 1.5e-7) and erfc(-u) = 2 - erfc(u): the tail for negative x is formed directly,
// without the cancellation of 1 + erf(x).
inline Vec gelu_vec(Vec x) {
  const Vec u0 = x * Vec::bcast(-0.70710678118654752f);  // -x / sqrt 2
  const Vec u = max(u0, Vec::zero() - u0);                // |u0|
  const Vec one = Vec::bcast(1.0f);
  const Vec t = one / fma(Vec::bcast(0.3275911f), u, one);
  Vec poly = fma(Vec::bcast(1.061405429f), t, Vec::bcast(-1.453152027f));
  poly = fma(poly, t, Vec::bcast(1.421413741f));
  poly = fma(poly, t, Vec::bcast(-0.284496736f));
  poly = fma(poly, t, Vec::bcast(0.254829592f));
  const Vec tail = poly * t * exp(Vec::zero() - u * u);  // erfc(|u0|)
  const Vec erfc_u0 = where_greater(u0, Vec::zero(), tail, Vec::bcast(2.0f) - tail);
  return x * Vec::bcast(0.5f) * erfc_u0;
}

void gelu(float* v, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) gelu_vec(Vec::load(v + i)).store(v + i);
  if (i < n) store_n(gelu_vec(load_n(v + i, static_cast<int>(n - i))), v + i, static_cast<int>(n - i));
}

// LayerNorm of one row of d values in place: mean, then the biased variance of (v - mean), in vectors
// with the tail lanes summed after them (torch's two-pass form).
inline void norm_row(float* v, int64_t d, const float* weight, const float* bias, float eps) {
  int64_t c = 0;
  Vec s = Vec::zero();
  for (; c + W <= d; c += W) s = s + Vec::load(v + c);
  float sum = sum_lanes(s);
  for (; c < d; ++c) sum += v[c];
  const float mean = sum / static_cast<float>(d);
  const Vec mv = Vec::bcast(mean);
  Vec q = Vec::zero();
  for (c = 0; c + W <= d; c += W) {
    const Vec x = Vec::load(v + c) - mv;
    q = fma(x, x, q);
  }
  float sq = sum_lanes(q);
  for (; c < d; ++c) sq += (v[c] - mean) * (v[c] - mean);
  const float inv = 1.0f / std::sqrt(sq / static_cast<float>(d) + eps);
  const Vec iv = Vec::bcast(inv);
  for (c = 0; c + W <= d; c += W)
    fma((Vec::load(v + c) - mv) * iv, Vec::load(weight + c), Vec::load(bias + c)).store(v + c);
  for (; c < d; ++c) v[c] = (v[c] - mean) * inv * weight[c] + bias[c];
}

// Gate logits z[i0 .. i0 + kN) of row r: gate_bias[i] + sum_j gate_weight[i][j d ..] · branch_j[r], the
// kN logits accumulated together so that each branch vector is loaded once.
template <int kN>
inline void gate_logits(const GateNormParams& p, int64_t r, int64_t i0, float* z) {
  const int64_t k = p.k, d = p.d;
  Vec acc[kN];
  float tail[kN];
  for (int i = 0; i < kN; ++i) {
    acc[i] = Vec::zero();
    tail[i] = p.gate_bias[i0 + i];
  }
  for (int64_t j = 0; j < k; ++j) {
    const float* b = p.branches[j] + r * p.branch_sr[j];
    const float* w = p.gate_weight + i0 * k * d + j * d;
    int64_t c = 0;
    for (; c + W <= d; c += W) {
      const Vec bv = Vec::load(b + c);
      for (int i = 0; i < kN; ++i) acc[i] = fma(Vec::load(w + i * k * d + c), bv, acc[i]);
    }
    for (; c < d; ++c)
      for (int i = 0; i < kN; ++i) tail[i] += w[i * k * d + c] * b[c];
  }
  for (int i = 0; i < kN; ++i) z[i] = tail[i] + sum_lanes(acc[i]);
}

void gate_norm(const GateNormParams& p, int64_t begin, int64_t end) {
  const int64_t k = p.k, d = p.d;
  float small[8];
  std::vector<float> large(k > 8 ? k : 0);
  float* z = k > 8 ? large.data() : small;
  for (int64_t r = begin; r < end; ++r) {
    int64_t i0 = 0;
    for (; i0 + 4 <= k; i0 += 4) gate_logits<4>(p, r, i0, z + i0);
    if (k - i0 == 3) gate_logits<3>(p, r, i0, z + i0);
    if (k - i0 == 2) gate_logits<2>(p, r, i0, z + i0);
    if (k - i0 == 1) gate_logits<1>(p, r, i0, z + i0);
    const float top = *std::max_element(z, z + k);
    float total = 0.0f;
    for (int64_t i = 0; i < k; ++i) total += (z[i] = std::exp(z[i] - top));
    for (int64_t i = 0; i < k; ++i) z[i] /= total;
    float* out = p.out + r * d;
    const float* h = p.h + r * p.h_sr;
    int64_t c = 0;
    for (; c + W <= d; c += W) {
      Vec o = Vec::load(h + c);
      for (int64_t i = 0; i < k; ++i) o = fma(Vec::bcast(z[i]), Vec::load(p.branches[i] + r * p.branch_sr[i] + c), o);
      o.store(out + c);
    }
    for (; c < d; ++c) {
      float o = h[c];
      for (int64_t i = 0; i < k; ++i) o += z[i] * p.branches[i][r * p.branch_sr[i] + c];
      out[c] = o;
    }
    norm_row(out, d, p.norm_weight, p.norm_bias, p.eps);
  }
}

void residual_norm(float* out, const float* res, int64_t rows, int64_t d, const float* weight, const float* bias,
                   float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * d;
    const float* x = res + r * d;
    int64_t c = 0;
    for (; c + W <= d; c += W) (Vec::load(o + c) + Vec::load(x + c)).store(o + c);
    for (; c < d; ++c) o[c] += x[c];
    norm_row(o, d, weight, bias, eps);
  }
}

void run(const ConvStepParams& p, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    float* out = p.out + b * p.dim;
    switch (p.K) {
      case 2: row_conv<2>(p, b, out); break;
      case 3: row_conv<3>(p, b, out); break;
      case 4: row_conv<4>(p, b, out); break;
      default: row_conv<0>(p, b, out); break;
    }
    silu_row(out, p.dim);
  }
}

}  // namespace

namespace m2rec_mamba_step {

#if defined(M2REC_ISA_AVX512)
#define M2REC_CONV_STEP_KERNELS_FN conv_step_kernels_avx512
#define M2REC_ISA_NAME "avx512"
#elif defined(M2REC_ISA_AVX2)
#define M2REC_CONV_STEP_KERNELS_FN conv_step_kernels_avx2
#define M2REC_ISA_NAME "avx2"
#else
#define M2REC_CONV_STEP_KERNELS_FN conv_step_kernels_generic
#define M2REC_ISA_NAME "generic"
#endif

const ConvStepKernelTable* M2REC_CONV_STEP_KERNELS_FN() {
  static const ConvStepKernelTable table = {M2REC_ISA_NAME, W, &run, &rows_gemm, &gelu, &gate_norm, &residual_norm};
  return &table;
}

}  // namespace m2rec_mamba_step
