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
// Backward, per task and chunk of kChunk steps, per block of W channels: dp = dy * silu'(pre) for the
// chunk and the K - 1 steps after it (the pre-activation recomputed from x, cheaper than saving it)
// into a small buffer, then per tap k
//   dx[t] += w[k] dp[t + (K - 1) - k],   dw[k] += dp[t] x[t - (K - 1) + k]   (dw[k] in a register)
// and dbias += dp[t]; the weight and bias sums are kept per batch row (summed by the binding in a
// fixed order). Time runs forward and nothing is indexed modulo K (a reverse walk with a ring of the
// last K dp measured 4x slower).
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "conv_api.h"
#include "simd.h"

namespace {

using m2rec_conv::ConvParams;

constexpr int W = Vec::W;
constexpr int64_t kChunk = 64;  // steps per chunk (backward: the dp of one block over a chunk, in L1)

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }


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

// Loads and stores of one block of W channels: all W lanes real (kFull, plain vector moves), or the
// first ``lanes`` only (the last block of a dim that is not a multiple of W). Separate instances keep
// the partial path's stack copies out of the full blocks' loops, whose accumulators then stay in
// registers.
template <bool kFull>
struct Lanes {
  int lanes;
  Vec load(const float* p) const { return kFull ? Vec::load(p) : load_n(p, lanes); }
  void store(Vec v, float* p) const {
    if (kFull) v.store(p); else store_n(v, p, lanes);
  }
};

// One block's view of the operands: w[k] and the bias of its W channels, and the block's first
// channel in x, y/dy, dx (each advanced by t times its time stride).
struct BlockPtrs {
  const float* taps;  // [k * padded]
  int64_t padded;
  Vec bias;
  const float* x;
  const float* dy;
  float* y;           // y (forward) or dx (backward)
};

// bias + sum_k w[k] x[t - (K - 1) + k]; taps before t = 0 read the zero padding.
template <bool kFull>
inline Vec conv_at(const ConvParams& p, const BlockPtrs& q, Lanes<kFull> ln, int64_t t) {
  Vec acc = q.bias;
  const int64_t K = p.K;
  for (int64_t k = t >= K - 1 ? 0 : K - 1 - t; k < K; ++k)
    acc = fma(Vec::load(q.taps + k * q.padded), ln.load(q.x + (t - (K - 1) + k) * p.x_st), acc);
  return acc;
}

template <bool kFull>
void forward_block(const ConvParams& p, const BlockPtrs& q, Lanes<kFull> ln, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    Vec v = conv_at(p, q, ln, t);
    if (p.silu) v = v * sigmoid(v);
    ln.store(v, q.y + t * p.y_st);
  }
}

// One block over steps [t0, t1): dx there, dw[k] (dw[k * padded]) and db accumulated; dp: scratch for
// the dp of steps [t0, t1 + K - 1).
template <bool kFull>
void backward_block(const ConvParams& p, const BlockPtrs& q, Lanes<kFull> ln, int64_t t0, int64_t t1,
                    float* dp, float* dw, float* db) {
  const int64_t K = p.K;
  const int64_t t_end = min64(t1 + K - 1, p.L);  // dp[j] for j >= L is 0
  const Vec one = Vec::bcast(1.0f);
  for (int64_t t = t0; t < t_end; ++t) {  // dp = dy * silu'(pre), pre recomputed from x
    Vec d = ln.load(q.dy + t * p.dy_st);
    if (p.silu) {  // silu'(x) = s (1 + x (1 - s)), s = sigmoid(x)
      Vec pre = conv_at(p, q, ln, t);
      Vec s = sigmoid(pre);
      d = d * s * fma(pre, one - s, one);
    }
    d.store(dp + (t - t0) * W);
  }
  for (int64_t k = 0; k < K; ++k) {  // tap k: dx[t] += w[k] dp[t + K - 1 - k], dw[k] += dp[t] x[t - K + 1 + k]
    const Vec wk = Vec::load(q.taps + k * q.padded);
    const int64_t lag = K - 1 - k;
    Vec acc = Vec::load(dw + k * q.padded);
    for (int64_t t = t0; t < t1; ++t) {
      float* dxt = q.y + t * p.dx_st;
      const bool reaches = t + lag < t_end;
      if (k == 0) {
        ln.store(reaches ? wk * Vec::load(dp + (t + lag - t0) * W) : Vec::zero(), dxt);
      } else if (reaches) {
        ln.store(fma(wk, Vec::load(dp + (t + lag - t0) * W), ln.load(dxt)), dxt);
      }
      if (t >= lag) acc = fma(Vec::load(dp + (t - t0) * W), ln.load(q.x + (t - lag) * p.x_st), acc);
    }
    acc.store(dw + k * q.padded);
  }
  Vec dbv = Vec::load(db);
  for (int64_t t = t0; t < t1; ++t) dbv = dbv + Vec::load(dp + (t - t0) * W);
  dbv.store(db);
}

inline BlockPtrs block_ptrs(const ConvParams& p, const Group& g, const float* taps, const float* bias, int blk,
                            bool backward) {
  const int64_t off = g.c0 + blk * W;
  BlockPtrs q;
  q.padded = g.nb * W;
  q.taps = taps + blk * W;
  q.bias = Vec::load(bias + blk * W);
  q.x = p.x + g.b * p.x_sb + off;
  q.dy = backward ? p.dy + g.b * p.dy_sb + off : nullptr;
  q.y = backward ? p.dx + g.b * p.dx_sb + off : p.y + g.b * p.y_sb + off;
  return q;
}

// Time in chunks of kChunk steps, the blocks of a task's channels inside: a chunk's rows of x stay in
// L1/L2 while the blocks read their neighbouring channels.
void forward(const ConvParams& p, int64_t begin, int64_t end) {
  std::vector<float> scratch((p.K + 1) * (p.group + W));
  for (int64_t task = begin; task < end; ++task) {
    float* taps = scratch.data();
    float* bias = taps + p.K * (p.group + W);
    Group g = make_group(p, task, taps, bias);
    for (int64_t t0 = 0; t0 < p.L; t0 += kChunk) {
      const int64_t t1 = min64(t0 + kChunk, p.L);
      for (int blk = 0; blk < g.nb; ++blk) {
        const BlockPtrs q = block_ptrs(p, g, taps, bias, blk, false);
        const int lanes = lanes_of(g, blk);
        if (lanes == W) forward_block(p, q, Lanes<true>{W}, t0, t1);
        else forward_block(p, q, Lanes<false>{lanes}, t0, t1);
      }
    }
  }
}

void backward(const ConvParams& p, int64_t begin, int64_t end) {
  const int64_t K = p.K;
  const int64_t stride = p.group + W;
  std::vector<float> scratch((2 * K + 2) * stride + (kChunk + K - 1) * W);
  for (int64_t task = begin; task < end; ++task) {
    float* taps = scratch.data();
    float* dw = taps + K * stride;  // [k][channel]
    float* bias = dw + K * stride;
    float* db = bias + stride;
    float* dp = db + stride;        // [step - t0][lane]: one block's dp over a chunk and K - 1 steps
    Group g = make_group(p, task, taps, bias);
    const int padded = g.nb * W;
    for (int64_t i = 0; i < K * padded; ++i) dw[i] = 0.0f;
    for (int i = 0; i < padded; ++i) db[i] = 0.0f;
    for (int64_t t0 = 0; t0 < p.L; t0 += kChunk) {
      const int64_t t1 = min64(t0 + kChunk, p.L);
      for (int blk = 0; blk < g.nb; ++blk) {
        const BlockPtrs q = block_ptrs(p, g, taps, bias, blk, true);
        const int lanes = lanes_of(g, blk);
        if (lanes == W) backward_block(p, q, Lanes<true>{W}, t0, t1, dp, dw + blk * W, db + blk * W);
        else backward_block(p, q, Lanes<false>{lanes}, t0, t1, dp, dw + blk * W, db + blk * W);
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
