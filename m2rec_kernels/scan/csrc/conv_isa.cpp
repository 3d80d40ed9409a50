// The causal depthwise conv1d (+ SiLU) in front of Mamba's scan, forward and backward, compiled once
// per ISA like scan_isa.cpp (the build defines one of M2REC_ISA_AVX512 / _AVX2 / _GENERIC).
//
//   y[b, c, t] = act(bias[c] + sum_{k < K} w[c, k] x[b, c, t - (K - 1) + k])   (x = 0 before t = 0)
//
// The inputs are time-major (conv_api.h): one vector holds W channels of one step, so a step of the
// conv is K vector FMAs per W channels, with no transposes — the layout Mamba's in_proj produces when
// it runs as a (batch * L, d) x (d, 2 * d_inner) matrix product. The x rows the K taps read were read
// at the previous steps, so they come from L1. (mamba's CUDA causal_conv1d, Dao-AILab/causal-conv1d,
// has a channel-last kernel for the same reason; this is our own loop for SIMD lanes.)
//
// Backward, per task, walking time in reverse: the pre-activation is recomputed from x (cheaper than
// saving it), dp = dy * silu'(pre) goes into a ring of the last K steps, and
//   dx[t] = sum_k w[k] dp[t + (K - 1) - k],   dw[k] += dp[t] x[t - (K - 1) + k],   dbias += dp[t]
// with the weight and bias sums kept per batch row (summed by the binding in a fixed order).
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "conv_api.h"
#include "simd.h"

namespace {

using m2rec_conv::ConvParams;

constexpr int W = Vec::W;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// W lanes from p, of which the first ``lanes`` are real (the rest read as 0, never out of bounds).
inline Vec load_n(const float* p, int lanes) {
  if (lanes == W) return Vec::load(p);
  alignas(64) float tmp[W] = {};
  memcpy(tmp, p, sizeof(float) * lanes);
  return Vec::load(tmp);
}
inline void store_n(Vec v, float* p, int lanes) {
  if (lanes == W) {
    v.store(p);
    return;
  }
  alignas(64) float tmp[W];
  v.store(tmp);
  memcpy(p, tmp, sizeof(float) * lanes);
}

// One task's channels: c0 .. c0 + nc, in nb vector blocks; taps transposed to [k][channel] (so a
// vector load gives tap k of W channels) and the bias, zero-padded to nb * W.
struct Group {
  int64_t b, c0;
  int nc, nb;
};

inline Group make_group(const ConvParams& p, int64_t task, float* taps, float* bias) {
  Group g;
  g.b = task / p.n_groups;
  g.c0 = (task % p.n_groups) * p.group;
  g.nc = static_cast<int>(min64(p.group, p.dim - g.c0));
  g.nb = (g.nc + W - 1) / W;
  const int padded = g.nb * W;
  for (int64_t k = 0; k < p.K; ++k)
    for (int c = 0; c < padded; ++c) taps[k * padded + c] = c < g.nc ? p.weight[(g.c0 + c) * p.K + k] : 0.0f;
  for (int c = 0; c < padded; ++c) bias[c] = (p.bias && c < g.nc) ? p.bias[g.c0 + c] : 0.0f;
  return g;
}

inline int lanes_of(const Group& g, int blk) { return static_cast<int>(min64(W, g.nc - blk * W)); }

// bias + sum_k w[k] x[t - (K - 1) + k] for one block of W channels; xt points at x[b, c0 + blk W, t].
inline Vec conv_at(const ConvParams& p, const float* taps, const float* bias, int padded, int blk, int lanes,
                   const float* xt, int64_t t) {
  Vec acc = Vec::load(bias + blk * W);
  const int64_t K = p.K;
  for (int64_t k = t >= K - 1 ? 0 : K - 1 - t; k < K; ++k)  // taps before t = 0 read the zero padding
    acc = fma(Vec::load(taps + k * padded + blk * W), load_n(xt - (K - 1 - k) * p.x_st, lanes), acc);
  return acc;
}

void forward(const ConvParams& p, int64_t begin, int64_t end) {
  std::vector<float> scratch((p.K + 1) * (p.group + W));
  for (int64_t task = begin; task < end; ++task) {
    float* taps = scratch.data();
    float* bias = taps + p.K * (p.group + W);
    Group g = make_group(p, task, taps, bias);
    const int padded = g.nb * W;
    for (int64_t t = 0; t < p.L; ++t) {
      const float* xt = p.x + g.b * p.x_sb + g.c0 + t * p.x_st;
      float* yt = p.y + g.b * p.y_sb + g.c0 + t * p.y_st;
      for (int blk = 0; blk < g.nb; ++blk) {
        const int lanes = lanes_of(g, blk);
        Vec v = conv_at(p, taps, bias, padded, blk, lanes, xt + blk * W, t);
        if (p.silu) v = v * sigmoid(v);
        store_n(v, yt + blk * W, lanes);
      }
    }
  }
}

void backward(const ConvParams& p, int64_t begin, int64_t end) {
  const int64_t K = p.K;
  const int64_t stride = p.group + W;
  std::vector<float> scratch((3 * K + 2) * stride);
  std::vector<int64_t> slot(K);
  const Vec one = Vec::bcast(1.0f);
  for (int64_t task = begin; task < end; ++task) {
    float* taps = scratch.data();
    float* ring = taps + K * stride;      // [t mod K][channel]: dp of the last K steps
    float* dw = ring + K * stride;        // [k][channel]
    float* bias = dw + K * stride;
    float* db = bias + stride;
    Group g = make_group(p, task, taps, bias);
    const int padded = g.nb * W;
    for (int64_t i = 0; i < K * padded; ++i) ring[i] = dw[i] = 0.0f;
    for (int i = 0; i < padded; ++i) db[i] = 0.0f;
    for (int64_t t = p.L - 1; t >= 0; --t) {
      for (int64_t k = 0; k < K; ++k) slot[k] = (t + K - 1 - k) % K;  // ring slot of dp[t + K - 1 - k]
      const int64_t k_hi = min64(K, p.L - t);  // dp[j] for j >= L is 0: taps k with t + K - 1 - k >= L drop
      const float* xt = p.x + g.b * p.x_sb + g.c0 + t * p.x_st;
      const float* dyt = p.dy + g.b * p.dy_sb + g.c0 + t * p.dy_st;
      float* dxt = p.dx + g.b * p.dx_sb + g.c0 + t * p.dx_st;
      float* ring_t = ring + (t % K) * padded;
      for (int blk = 0; blk < g.nb; ++blk) {
        const int lanes = lanes_of(g, blk);
        const int off = blk * W;
        Vec dp = load_n(dyt + off, lanes);
        if (p.silu) {  // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)
          Vec pre = conv_at(p, taps, bias, padded, blk, lanes, xt + off, t);
          Vec s = sigmoid(pre);
          dp = dp * s * fma(pre, one - s, one);
        }
        dp.store(ring_t + off);
        Vec dxv = Vec::zero();
        for (int64_t k = K - k_hi; k < K; ++k)
          dxv = fma(Vec::load(taps + k * padded + off), Vec::load(ring + slot[k] * padded + off), dxv);
        store_n(dxv, dxt + off, lanes);
        for (int64_t k = t >= K - 1 ? 0 : K - 1 - t; k < K; ++k) {
          float* acc = dw + k * padded + off;
          fma(dp, load_n(xt + off - (K - 1 - k) * p.x_st, lanes), Vec::load(acc)).store(acc);
        }
        (Vec::load(db + off) + dp).store(db + off);
      }
    }
    float* dwp = p.dw_part + (g.b * p.dim + g.c0) * K;
    for (int c = 0; c < g.nc; ++c)
      for (int64_t k = 0; k < K; ++k) dwp[c * K + k] = dw[k * padded + c];
    if (p.db_part) memcpy(p.db_part + g.b * p.dim + g.c0, db, sizeof(float) * g.nc);
  }
}

}  // namespace

namespace m2rec_conv {

#if defined(M2REC_ISA_AVX512)
#define M2REC_CONV_KERNELS_FN conv_kernels_avx512
#define M2REC_ISA_NAME "avx512"
#elif defined(M2REC_ISA_AVX2)
#define M2REC_CONV_KERNELS_FN conv_kernels_avx2
#define M2REC_ISA_NAME "avx2"
#else
#define M2REC_CONV_KERNELS_FN conv_kernels_generic
#define M2REC_ISA_NAME "generic"
#endif

const ConvKernelTable* M2REC_CONV_KERNELS_FN() {
  static const ConvKernelTable table = {M2REC_ISA_NAME, W, &forward, &backward};
  return &table;
}

}  // namespace m2rec_conv
