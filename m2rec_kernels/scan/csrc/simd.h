// One small float vector type per instruction set; the scan kernels (scan_isa.cpp) are written once
// against it and compiled once per ISA, the way ATen compiles its CPU kernels once per CPU_CAPABILITY
// (aten/src/ATen/cpu/vec, at::vec). Raw intrinsics instead of at::vec: the kernel files include no
// torch header (a variant compiles in seconds), and the exp, softplus and lane sums are our own.
//
// Exactly one of M2REC_ISA_AVX512 / M2REC_ISA_AVX2 / M2REC_ISA_GENERIC is defined by the build, and
// everything here lives in an anonymous namespace: the three variants are linked into one library, and
// an inline function shared by name between them could resolve to the AVX-512 copy on a CPU without it.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(M2REC_ISA_AVX512) || defined(M2REC_ISA_AVX2)
#include <immintrin.h>
#endif

namespace {

// exp2(f) on f in [-1/2, 1/2] as 1 + f*(c1 + f*(c2 + ...)): coefficients fitted for the least maximum
// relative error (Lawson's iteration on 20k points, float64), then rounded to float. The constant
// term is exactly 1, so exp(0) == 1 exactly and a masked step (delta = 0) is the exact identity.
// Max relative error of the float evaluation on [-1/2, 1/2]: 7.9e-8 (degree 6).
constexpr float kExp2C1 = 0.6931471824645996f;
constexpr float kExp2C2 = 0.24022647738456726f;
constexpr float kExp2C3 = 0.055503323674201965f;
constexpr float kExp2C4 = 0.009618437848985195f;
constexpr float kExp2C5 = 0.0013398875016719103f;
constexpr float kExp2C6 = 0.00015353350318036973f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693145751953125f;   // ln 2 split in two (Cody-Waite) for k * ln 2
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kSoftplusThreshold = 20.0f;    // torch's default: softplus(x) = x above it
// exp2 results below 2^-125.5 are flushed to +0 (no subnormal results, which are slow on some CPUs);
// 2^t overflows to +inf from t = 128 on, as IEEE rounding says.
constexpr float kExp2Lo = -126.0f;
constexpr float kExp2Hi = 129.0f;

#if defined(M2REC_ISA_AVX512)

struct Vec {
  static constexpr int W = 16;
  __m512 v;
  Vec() = default;
  Vec(__m512 x) : v(x) {}
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec bcast(float x) { return _mm512_set1_ps(x); }
  static Vec zero() { return _mm512_setzero_ps(); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
inline Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_ps(a.v, b.v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }  // a*b + c
// min(hi, x) / max(lo, x) that return x when x is NaN (the instruction returns its second operand).
inline Vec min_keep_nan(Vec hi, Vec x) { return _mm512_min_ps(hi.v, x.v); }
inline Vec max_keep_nan(Vec lo, Vec x) { return _mm512_max_ps(lo.v, x.v); }
// where(x > t, a, b): a where x > t, else b (NaN x: b)
inline Vec where_greater(Vec x, Vec t, Vec a, Vec b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.v, t.v, _CMP_GT_OQ), b.v, a.v);
}

inline Vec round_nearest(Vec x) { return _mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p 2^k for integer-valued k (vscalefps: overflow to +inf); k <= -126 gives +0 (the flush), NaN stays.
inline Vec scale_pow2(Vec p, Vec k) {
  __mmask16 keep = _mm512_cmp_ps_mask(k.v, _mm512_set1_ps(kExp2Lo), _CMP_NLE_UQ);  // unordered: keep
  return _mm512_maskz_scalef_ps(keep, p.v, k.v);
}

// 2^(d a) for |d a| < kFastExpRange (a chunk's check, fast_exp_ok), the scan's hot exp: d a + M
// with M = 1.5 * 2^19 rounds the exponent to sixteenths n + j/16 (one FMA, no separate product);
// 2^(j/16) from a 16-entry table (vpermps on the low 4 bits of the sum), 2^r for the remainder
// |r| <= 1/32 (computed from the exact product by fmsub) by a degree-3 Taylor polynomial
// (truncation < 1e-8), and 2^n by vscalefps. Max relative error 1.15e-7 over t in [-125, 127]
// (exp2 in float64 as the reference). Outside the range the reduction loses bits: use exp2.
constexpr float kFastExpRange = 2.0e5f;
inline Vec exp2_product(Vec d, Vec a) {
  const __m512 M = _mm512_set1_ps(786432.0f);  // 1.5 * 2^19: t + M rounds t to a multiple of 1/16
  const __m512 tab = _mm512_set_ps(1.9152065613971474f, 1.8340080864093424f, 1.7562521603732995f, 1.6817928305074290f,
                                   1.6104903319492543f, 1.5422108254079407f, 1.4768261459394993f, 1.4142135623730951f,
                                   1.3542555469368927f, 1.2968395546510096f, 1.2418578120734840f, 1.1892071150027210f,
                                   1.1387886347566916f, 1.0905077326652577f, 1.0442737824274138f, 1.0f);
  __m512 s = _mm512_fmadd_ps(d.v, a.v, M);
  __m512 k = _mm512_sub_ps(s, M);               // t rounded to sixteenths: n + j/16
  __m512 r = _mm512_fmsub_ps(d.v, a.v, k);      // t - k in [-1/32, 1/32], one rounding
  __m512 T = _mm512_permutexvar_ps(_mm512_castps_si512(s), tab);  // 2^(j/16): j = low 4 bits of s
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.05550410866482158f), r, _mm512_set1_ps(0.2402265069591007f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.6931471805599453f));
  return _mm512_scalef_ps(_mm512_fmadd_ps(_mm512_mul_ps(q, r), T, T), k);  // T 2^r 2^floor(k)
}

// Whether exp2_product is accurate for d in [dlo, dhi] and a in [alo, ahi] (NaN: either way).
inline bool fast_exp_ok(float dlo, float dhi, float alo, float ahi) {
  float dm = dhi > -dlo ? dhi : -dlo, am = ahi > -alo ? ahi : -alo;
  return dm * am < kFastExpRange;  // false for inf
}

inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a.v, b.v); }
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a.v, b.v); }
inline float min_lane(Vec x) { return _mm512_reduce_min_ps(x.v); }
inline float max_lane(Vec x) { return _mm512_reduce_max_ps(x.v); }

// x = m * 2^e with m in [1, 2): (e as float, m)
inline void frexp1(Vec x, Vec& e, Vec& m) {
  e = _mm512_getexp_ps(x.v);
  m = _mm512_getmant_ps(x.v, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
}

// r[i] = sum of the lanes of v[i] for the W vectors v[0..W-1] stored one after the other, by a fixed
// tree of unpack/shuffle + add (3 instructions per pair of vectors, 45 for 16).
inline void lane_sums(const float* v, float* r) {
  __m512 x[16];
  for (int i = 0; i < 8; ++i) {  // per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3)
    __m512 a = _mm512_loadu_ps(v + 32 * i), b = _mm512_loadu_ps(v + 32 * i + 16);
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of 4 source vectors
    __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes summed in pairs
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  _mm512_storeu_ps(r, _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD)));
}

// dst[c * dst_stride + r] = src[r * src_stride + c] for a 16 x 16 block.
inline void transpose_block(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m512 a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    __m512 r0 = _mm512_loadu_ps(src + (2 * i) * src_stride), r1 = _mm512_loadu_ps(src + (2 * i + 1) * src_stride);
    a[2 * i] = _mm512_unpacklo_ps(r0, r1);
    a[2 * i + 1] = _mm512_unpackhi_ps(r0, r1);
  }
  for (int g = 0; g < 4; ++g) {  // b[4g + k], 128-bit lane q: column 4q + k of rows 4g .. 4g+3
    __m512d a0 = _mm512_castps_pd(a[4 * g]), a1 = _mm512_castps_pd(a[4 * g + 1]);
    __m512d a2 = _mm512_castps_pd(a[4 * g + 2]), a3 = _mm512_castps_pd(a[4 * g + 3]);
    b[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    b[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    b[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    b[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  for (int k = 0; k < 4; ++k) {
    __m512 c0 = _mm512_shuffle_f32x4(b[k], b[4 + k], 0x88), c1 = _mm512_shuffle_f32x4(b[k], b[4 + k], 0xDD);
    __m512 c2 = _mm512_shuffle_f32x4(b[8 + k], b[12 + k], 0x88), c3 = _mm512_shuffle_f32x4(b[8 + k], b[12 + k], 0xDD);
    _mm512_storeu_ps(dst + k * dst_stride, _mm512_shuffle_f32x4(c0, c2, 0x88));
    _mm512_storeu_ps(dst + (8 + k) * dst_stride, _mm512_shuffle_f32x4(c0, c2, 0xDD));
    _mm512_storeu_ps(dst + (4 + k) * dst_stride, _mm512_shuffle_f32x4(c1, c3, 0x88));
    _mm512_storeu_ps(dst + (12 + k) * dst_stride, _mm512_shuffle_f32x4(c1, c3, 0xDD));
  }
}

#elif defined(M2REC_ISA_AVX2)

struct Vec {
  static constexpr int W = 8;
  __m256 v;
  Vec() = default;
  Vec(__m256 x) : v(x) {}
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec bcast(float x) { return _mm256_set1_ps(x); }
  static Vec zero() { return _mm256_setzero_ps(); }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
};
inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.v, b.v); }
inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
inline Vec min_keep_nan(Vec hi, Vec x) { return _mm256_min_ps(hi.v, x.v); }
inline Vec max_keep_nan(Vec lo, Vec x) { return _mm256_max_ps(lo.v, x.v); }
inline Vec where_greater(Vec x, Vec t, Vec a, Vec b) {
  return _mm256_blendv_ps(b.v, a.v, _mm256_cmp_ps(x.v, t.v, _CMP_GT_OQ));
}

inline Vec round_nearest(Vec x) { return _mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// p 2^k for integer-valued k in [-126, 129] (callers clamp), from the bits of 2^(k-1) = (k + 126) << 23,
// whose biased exponent stays in [0, 255]: k = -126 gives the bits of +0 (the flush), k = 129 those of
// +inf (overflow), and (2p) 2^(k-1) rounds as IEEE says in between. NaN p stays NaN.
inline Vec scale_pow2(Vec p, Vec k) {
  __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k.v), _mm256_set1_epi32(126)), 23);
  return _mm256_mul_ps(_mm256_add_ps(p.v, p.v), _mm256_castsi256_ps(bits));
}
// 2^(d a) when d a <= 0 (fast_exp_ok): only the lower clamp is needed. 2^k is added to p's exponent
// bits: for k in [-126, 0] and p in [1/sqrt 2, sqrt 2] the biased exponent stays in [0, 127];
// 0 (k = -126, p < 1) encodes a subnormal, read as 0 under denormals-are-zero.
inline Vec exp2_product(Vec d, Vec a) {
  __m256 x = _mm256_max_ps(_mm256_set1_ps(kExp2Lo), _mm256_mul_ps(d.v, a.v));
  __m256 k = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(x, k);
  __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExp2C6), f, _mm256_set1_ps(kExp2C5));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C4));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C3));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C2));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2C1));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(k), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));  // NaN: p's NaN bits + 0
}
inline bool fast_exp_ok(float dlo, float, float, float ahi) { return dlo >= 0.0f && ahi <= 0.0f; }

inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a.v, b.v); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a.v, b.v); }
inline float min_lane(Vec x) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
inline float max_lane(Vec x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x.v), _mm256_extractf128_ps(x.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline void frexp1(Vec x, Vec& e, Vec& m) {
  __m256i bits = _mm256_castps_si256(x.v);
  e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127)));
  m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF)),
                                          _mm256_set1_epi32(0x3F800000)));
}

inline void lane_sums(const float* v, float* r) {  // as for AVX-512: 21 instructions for 8 vectors
  __m256 x[4];
  for (int i = 0; i < 4; ++i) {
    __m256 a = _mm256_loadu_ps(v + 16 * i), b = _mm256_loadu_ps(v + 16 * i + 8);
    x[i] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 2; ++i) {
    __m256d a = _mm256_castps_pd(x[2 * i]), b = _mm256_castps_pd(x[2 * i + 1]);
    x[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
  }
  _mm256_storeu_ps(r, _mm256_add_ps(_mm256_permute2f128_ps(x[0], x[1], 0x20), _mm256_permute2f128_ps(x[0], x[1], 0x31)));
}

inline void transpose_block(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {  // 8 x 8
  __m256 r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 2; ++g) {  // b[4g + k], 128-bit lane q: column 4q + k of rows 4g .. 4g+3
    b[4 * g] = _mm256_shuffle_ps(a[4 * g], a[4 * g + 2], 0x44);
    b[4 * g + 1] = _mm256_shuffle_ps(a[4 * g], a[4 * g + 2], 0xEE);
    b[4 * g + 2] = _mm256_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0x44);
    b[4 * g + 3] = _mm256_shuffle_ps(a[4 * g + 1], a[4 * g + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * dst_stride, _mm256_permute2f128_ps(b[k], b[4 + k], 0x20));
    _mm256_storeu_ps(dst + (4 + k) * dst_stride, _mm256_permute2f128_ps(b[k], b[4 + k], 0x31));
  }
}

#else  // M2REC_ISA_GENERIC: GCC/Clang vector extensions; SSE2 on any x86-64, NEON on arm64

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

struct Vec {
  static constexpr int W = 4;
  v4f v;
  Vec() = default;
  Vec(v4f x) : v(x) {}
  static Vec load(const float* p) { v4f x; memcpy(&x, p, sizeof(x)); return x; }
  static Vec bcast(float x) { return v4f{x, x, x, x}; }
  static Vec zero() { return v4f{0.f, 0.f, 0.f, 0.f}; }
  void store(float* p) const { memcpy(p, &v, sizeof(v)); }
};
inline Vec operator+(Vec a, Vec b) { return a.v + b.v; }
inline Vec operator-(Vec a, Vec b) { return a.v - b.v; }
inline Vec operator*(Vec a, Vec b) { return a.v * b.v; }
inline Vec operator/(Vec a, Vec b) { return a.v / b.v; }
inline Vec fma(Vec a, Vec b, Vec c) { return a.v * b.v + c.v; }  // no FMA in the baseline ISA
inline Vec min_keep_nan(Vec hi, Vec x) { return x.v > hi.v ? hi.v : x.v; }
inline Vec max_keep_nan(Vec lo, Vec x) { return x.v < lo.v ? lo.v : x.v; }
inline Vec where_greater(Vec x, Vec t, Vec a, Vec b) { return x.v > t.v ? a.v : b.v; }

inline Vec round_nearest(Vec x) {  // ties to even by the 1.5 * 2^23 trick; exact for |x| < 2^22
  const v4f magic = Vec::bcast(12582912.0f).v;
  return (x.v + magic) - magic;
}
inline Vec scale_pow2(Vec p, Vec k) {  // as for AVX2
  v4i bits = (__builtin_convertvector(k.v, v4i) + 126) << 23;
  v4f scale;
  memcpy(&scale, &bits, sizeof(scale));
  return (p.v + p.v) * scale;
}

inline void frexp1(Vec x, Vec& e, Vec& m) {
  v4i bits;
  memcpy(&bits, &x.v, sizeof(bits));
  e = __builtin_convertvector(((bits >> 23) & 0xFF) - 127, v4f);
  v4i mb = (bits & 0x007FFFFF) | 0x3F800000;
  memcpy(&m.v, &mb, sizeof(mb));
}

inline void lane_sums(const float* v, float* r) {
  for (int i = 0; i < 4; ++i) r[i] = (v[4 * i] + v[4 * i + 2]) + (v[4 * i + 1] + v[4 * i + 3]);
}

inline void transpose_block(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
}

inline Vec exp2_product(Vec d, Vec a) {  // when d a <= 0, as for AVX2 (magic-number rounding)
  v4f x = max_keep_nan(Vec::bcast(kExp2Lo), d * a).v;
  const v4f magic = Vec::bcast(12582912.0f).v;
  v4f k = (x + magic) - magic;
  v4f f = x - k;
  v4f p = Vec::bcast(kExp2C6).v * f + kExp2C5;
  p = p * f + kExp2C4;
  p = p * f + kExp2C3;
  p = p * f + kExp2C2;
  p = p * f + kExp2C1;
  p = p * f + 1.0f;
  v4i e = __builtin_convertvector(k, v4i) << 23, bits;
  memcpy(&bits, &p, sizeof(bits));
  bits += e;
  memcpy(&p, &bits, sizeof(p));
  return p;
}
inline bool fast_exp_ok(float dlo, float, float, float ahi) { return dlo >= 0.0f && ahi <= 0.0f; }

inline Vec min(Vec a, Vec b) { return a.v < b.v ? a.v : b.v; }
inline Vec max(Vec a, Vec b) { return a.v > b.v ? a.v : b.v; }
inline float min_lane(Vec x) {
  float m = x.v[0];
  for (int i = 1; i < 4; ++i) m = x.v[i] < m ? x.v[i] : m;
  return m;
}
inline float max_lane(Vec x) {
  float m = x.v[0];
  for (int i = 1; i < 4; ++i) m = x.v[i] > m ? x.v[i] : m;
  return m;
}

#endif

// ---- functions built on the primitives (same code for every ISA) ----

inline Vec exp2_poly(Vec f) {  // 2^f on [-1/2, 1/2] (max relative error 7.9e-8)
  Vec p = fma(Vec::bcast(kExp2C6), f, Vec::bcast(kExp2C5));
  p = fma(p, f, Vec::bcast(kExp2C4));
  p = fma(p, f, Vec::bcast(kExp2C3));
  p = fma(p, f, Vec::bcast(kExp2C2));
  p = fma(p, f, Vec::bcast(kExp2C1));
  return fma(p, f, Vec::bcast(1.0f));
}

// 2^t for any t: clamped to [-126, 129] (NaN kept), so 2^t overflows to +inf from t = 128 on and is
// flushed to +0 below 2^-125.5; -inf gives 0, +inf gives +inf.
inline Vec exp2(Vec t) {
  Vec x = max_keep_nan(Vec::bcast(kExp2Lo), min_keep_nan(Vec::bcast(kExp2Hi), t));
  Vec k = round_nearest(x);
  return scale_pow2(exp2_poly(x - k), k);
}

// e^x for any x (softplus, sigmoid): k = round(x log2 e), r = x - k ln 2 in two steps (Cody-Waite, exact
// for |k| < 256), e^r = 2^(r log2 e); the error stays near one ulp for any |x|, unlike 2^(x log2 e).
inline Vec exp(Vec x) {
  Vec xc = max_keep_nan(Vec::bcast(kExp2Lo * kLn2Hi), min_keep_nan(Vec::bcast(kExp2Hi * kLn2Hi), x));
  Vec k = round_nearest(xc * Vec::bcast(kLog2e));
  Vec r = fma(k, Vec::bcast(-kLn2Hi), xc);
  r = fma(k, Vec::bcast(-kLn2Lo), r);
  return scale_pow2(exp2_poly(r * Vec::bcast(kLog2e)), k);
}

// log(1 + e) for e >= 0 (finite, or +inf): w = 1 + e = m * 2^k with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1)/(m + 1), |s| < 0.172 (series to s^9: truncation < 3e-9), plus the
// rounding error of 1 + e, (e - (w - 1)) / w, which matters when e is small (log1p, not log).
inline Vec log1p_nonneg(Vec e) {
  const Vec one = Vec::bcast(1.0f);
  Vec w = one + e;
  Vec k, m;
  frexp1(w, k, m);
  Vec big = where_greater(m, Vec::bcast(1.41421356f), one, Vec::zero());  // m > sqrt 2: halve it
  m = m * (one - Vec::bcast(0.5f) * big);
  k = k + big;
  Vec s = (m - one) / (m + one);
  Vec s2 = s * s;
  Vec q = fma(Vec::bcast(1.0f / 9), s2, Vec::bcast(1.0f / 7));
  q = fma(q, s2, Vec::bcast(1.0f / 5));
  q = fma(q, s2, Vec::bcast(1.0f / 3));
  q = fma(q, s2, one);
  Vec logm = Vec::bcast(2.0f) * s * q;
  Vec corr = (e - (w - one)) / w;
  Vec r = fma(k, Vec::bcast(kLn2Hi), fma(k, Vec::bcast(kLn2Lo), logm + corr));
  return where_greater(w, Vec::bcast(3.0e38f), w, r);  // w = +inf: log is +inf
}

// softplus with torch's threshold: x above 20, else log(1 + exp(x)).
inline Vec softplus(Vec x) {
  Vec lo = min_keep_nan(Vec::bcast(kSoftplusThreshold), x);
  return where_greater(x, Vec::bcast(kSoftplusThreshold), x, log1p_nonneg(exp(lo)));
}

inline Vec sigmoid(Vec x) {
  const Vec one = Vec::bcast(1.0f);
  return one / (one + exp(Vec::zero() - x));
}

// The sum of a vector's lanes by pairwise halving, the same order whatever the caller.
inline float sum_lanes(Vec v) {
#if defined(M2REC_ISA_AVX512)
  return _mm512_reduce_add_ps(v.v);  // shuffles in registers (a store and scalar reloads stall)
#else
  alignas(64) float t[Vec::W];
  v.store(t);
  for (int half = Vec::W / 2; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) t[i] += t[i + half];
  return t[0];
#endif
}

// W lanes from p, of which the first ``lanes`` are real (the rest read as 0, never out of bounds), and
// the store that writes only those lanes: the tails of channel loops.
inline Vec load_n(const float* p, int lanes) {
  if (lanes == Vec::W) return Vec::load(p);
  alignas(64) float tmp[Vec::W] = {};
  memcpy(tmp, p, sizeof(float) * lanes);
  return Vec::load(tmp);
}
inline void store_n(Vec v, float* p, int lanes) {
  if (lanes == Vec::W) {
    v.store(p);
    return;
  }
  alignas(64) float tmp[Vec::W];
  v.store(tmp);
  memcpy(p, tmp, sizeof(float) * lanes);
}

}  // namespace
