// Which ISA variants of the compiled kernels this CPU runs: shared by the ops files of the library
// (scan_ops.cpp, conv_ops.cpp, state_update_ops.cpp, ...), so every op picks its variant by the same rule.
#pragma once

#include <stdint.h>

#include <c10/util/Exception.h>

namespace m2rec_cpu {

enum Isa : int64_t { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline bool cpu_has(int64_t isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("fma");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == kGeneric;
#else
  return isa == kGeneric;
#endif
}

// A variant's table getter where the library holds that variant, else a null getter of the same type
// (the variant was not compiled: its getter is declared but not defined).
#ifdef M2REC_HAVE_AVX512
#define M2REC_AVX512_OR_NULL(getter) (&getter)
#else
#define M2REC_AVX512_OR_NULL(getter) static_cast<decltype(&getter)>(nullptr)
#endif
#ifdef M2REC_HAVE_AVX2
#define M2REC_AVX2_OR_NULL(getter) (&getter)
#else
#define M2REC_AVX2_OR_NULL(getter) static_cast<decltype(&getter)>(nullptr)
#endif

// The kernel table of variant ``isa`` from its getters (pass the AVX ones through the macros above),
// or nullptr when that variant is not in this library or the CPU lacks its instructions.
template <typename Table>
const Table* variant_table(int64_t isa, const Table* (*avx512)(), const Table* (*avx2)(),
                           const Table* (*generic)()) {
  if (!cpu_has(isa)) return nullptr;
  const Table* (*get)() = isa == kAvx512 ? avx512 : isa == kAvx2 ? avx2 : isa == kGeneric ? generic : nullptr;
  return get != nullptr ? get() : nullptr;
}

// variant_table, or an error naming ``op`` when that variant is not in this library or the CPU lacks
// its instructions.
template <typename Table>
const Table* required_variant_table(const char* op, int64_t isa, const Table* (*avx512)(), const Table* (*avx2)(),
                                    const Table* (*generic)()) {
  const Table* t = variant_table(isa, avx512, avx2, generic);
  TORCH_CHECK(t != nullptr, op, ": ISA variant ", isa, " is not in this build or not supported by this CPU");
  return t;
}

}  // namespace m2rec_cpu
