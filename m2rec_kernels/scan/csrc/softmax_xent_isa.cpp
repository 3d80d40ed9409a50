// The row-wise softmax cross-entropy of softmax_xent_api.h, compiled once per ISA like scan_isa.cpp (the
// build defines one of M2REC_ISA_AVX512 / _AVX2 / _GENERIC).
//
// Per row, three passes over its C floats (14.8 KB at C = 3706: the row stays in L1 between them, and
// the block the caller just wrote with a matrix product is in L2):
//   1. mx = max(x)                       (so that exp never overflows: logits of any size)
//   2. e = exp(x - mx), sum += e         (e stored over x when the gradient is wanted)
//   3. x = e / sum, x[t] -= 1            (gradient only)
// and loss = (mx - x[t]) + log(sum) in double. ATen's form of the same work (log_softmax, gather,
// exp_, scatter_add_) takes five passes and its exp_ ran at 0.84 ns per element on one Zen 4 core.
// The exps have arguments d = x - mx <= 0 only, so they need not simd.h's general exp (range
// reduction, both clamps): exp_nonpositive below is simd.h's exp2_product(d, log2 e), the scan's fast
// 2^(d a), with the results under e^-87 set to 0 (about half the vector instructions of exp).
//
// Accuracy of the sum: kAcc vectors of partial sums, so each of the kAcc * W lanes adds
// n <= ceil(C / (kAcc * W)) positive terms in order, and the lanes are then added by a fixed tree of
// depth log2(kAcc * W). For positive terms the relative error is at most (n + log2(kAcc * W)) u with
// u = 2^-24, plus each exp's own ~1 ulp: at C = 3706, 66 u = 3.9e-6 with AVX-512 (W = 16), 84 u = 5.0e-6
// with AVX2, 236 u = 1.4e-5 with the generic W = 4; the loss, log(sum), is off by at most that much in
// absolute terms (in practice about sqrt(n) u). The order is fixed per row, so results do not depend on
// the number of threads.
#include <math.h>

#include "simd.h"
#include "softmax_xent_api.h"

namespace {

using m2rec_xent::XentParams;

constexpr int W = Vec::W;
constexpr int kAcc = 4;  // independent vectors of maxima / partial sums (breaks the add latency chain)
static_assert(kAcc == 4, "row_max and the final sum of exp_sum are written out for 4 vectors");
constexpr float kNegInf = -__builtin_inff();
constexpr float kExpArgMin = -87.0f;  // e^d is taken as 0 below (2^-125.5: the smallest normal floats)

// e^d for d <= 0 (or NaN, kept): 2^(d log2 e) by exp2_product (AVX-512: a 16-entry table and a degree-3
// polynomial, max relative error 1.15e-7; AVX2 and generic: degree 6, 7.9e-8; log2 e rounded to float
// adds |d| 1.3e-8), and exactly 0 where d < -87, so no result is subnormal (e^-87 = 1.6e-38 > 2^-126)
// and the AVX-512 form, which is exact only for |d log2 e| < 2e5, is never read outside its range.
inline Vec exp_nonpositive(Vec d) {
  return where_greater(Vec::bcast(kExpArgMin), d, Vec::zero(), exp2_product(d, Vec::bcast(kLog2e)));
}

// The first ``lanes`` floats at p, ``fill`` in the other lanes (a row's tail: -inf for the max, whose
// exp is 0 for the sum).
inline Vec load_fill(const float* p, int lanes, float fill) {
  alignas(64) float tmp[W];
  for (int i = 0; i < W; ++i) tmp[i] = i < lanes ? p[i] : fill;
  return Vec::load(tmp);
}

// A NaN in the row may be skipped here, but then its exp makes the sum, and the loss, NaN.
float row_max(const float* x, int64_t C) {
  Vec m0 = Vec::bcast(kNegInf), m1 = m0, m2 = m0, m3 = m0;  // kAcc = 4
  int64_t c = 0;
  for (; c + 4 * W <= C; c += 4 * W) {
    m0 = max(m0, Vec::load(x + c));
    m1 = max(m1, Vec::load(x + c + W));
    m2 = max(m2, Vec::load(x + c + 2 * W));
    m3 = max(m3, Vec::load(x + c + 3 * W));
  }
  for (; c + W <= C; c += W) m0 = max(m0, Vec::load(x + c));
  if (c < C) m0 = max(m0, load_fill(x + c, static_cast<int>(C - c), kNegInf));
  return max_lane(max(max(m0, m1), max(m2, m3)));
}

// sum of exp(x - mx) over the row; kStore: the exps replace the row.
template <bool kStore>
float exp_sum(float* x, int64_t C, float mx) {
  const Vec m = Vec::bcast(mx);
  Vec s[kAcc];
  for (int j = 0; j < kAcc; ++j) s[j] = Vec::zero();
  int64_t c = 0;
  for (; c + kAcc * W <= C; c += kAcc * W)
    for (int j = 0; j < kAcc; ++j) {
      const Vec e = exp_nonpositive(Vec::load(x + c + j * W) - m);
      if (kStore) e.store(x + c + j * W);
      s[j] = s[j] + e;
    }
  for (; c + W <= C; c += W) {
    const Vec e = exp_nonpositive(Vec::load(x + c) - m);
    if (kStore) e.store(x + c);
    s[0] = s[0] + e;
  }
  if (c < C) {
    const int lanes = static_cast<int>(C - c);
    const Vec e = exp_nonpositive(load_fill(x + c, lanes, kNegInf) - m);
    if (kStore) store_n(e, x + c, lanes);
    s[0] = s[0] + e;
  }
  return sum_lanes((s[0] + s[1]) + (s[2] + s[3]));
}

void scale_row(float* x, int64_t C, float scale) {
  const Vec k = Vec::bcast(scale);
  int64_t c = 0;
  for (; c + W <= C; c += W) (Vec::load(x + c) * k).store(x + c);
  if (c < C) {
    const int lanes = static_cast<int>(C - c);
    store_n(load_n(x + c, lanes) * k, x + c, lanes);
  }
}

void run(const XentParams& p, int64_t begin, int64_t end) {
  const int64_t C = p.classes;
  for (int64_t r = begin; r < end; ++r) {
    float* x = p.logits + r * p.row_stride;
    const int64_t t = p.targets[r];
    const float x_t = x[t];
    const float mx = row_max(x, C);
    const float sum = p.grad ? exp_sum<true>(x, C, mx) : exp_sum<false>(x, C, mx);
    // sum >= exp(0) = 1 exactly (the polynomial's constant term is 1), so 1 / sum never overflows
    p.loss[r] = (static_cast<double>(mx) - static_cast<double>(x_t)) + log(static_cast<double>(sum));
    if (p.grad) {
      scale_row(x, C, 1.0f / sum);
      x[t] -= 1.0f;
    }
  }
}

}  // namespace

namespace m2rec_xent {

#if defined(M2REC_ISA_AVX512)
#define M2REC_XENT_KERNELS_FN xent_kernels_avx512
#define M2REC_ISA_NAME "avx512"
#elif defined(M2REC_ISA_AVX2)
#define M2REC_XENT_KERNELS_FN xent_kernels_avx2
#define M2REC_ISA_NAME "avx2"
#else
#define M2REC_XENT_KERNELS_FN xent_kernels_generic
#define M2REC_ISA_NAME "generic"
#endif

const XentKernelTable* M2REC_XENT_KERNELS_FN() {
  static const XentKernelTable table = {M2REC_ISA_NAME, W, &run};
  return &table;
}

}  // namespace m2rec_xent
