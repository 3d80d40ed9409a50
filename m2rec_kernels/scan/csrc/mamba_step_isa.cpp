// The conv part of the fused Mamba streaming step (mamba_step_api.h), compiled once per ISA like the
// other kernels (the build defines one of M2REC_ISA_AVX512 / _AVX2 / _GENERIC).
//
// Per batch row: per channel, the window's K values are shifted left, the new input appended and the
// taps dot formed in the same pass (K is small: 2 to 4 in practice, a compile-time constant for those);
// then SiLU over the row's channels in vectors of W lanes.
#include <string.h>

#include "mamba_step_api.h"
#include "simd.h"

namespace {

using m2rec_mamba_step::ConvStepParams;

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
  static const ConvStepKernelTable table = {M2REC_ISA_NAME, W, &run};
  return &table;
}

}  // namespace m2rec_mamba_step
