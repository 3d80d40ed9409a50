// Which ISA variants of the compiled kernels this CPU runs: shared by the ops files of the library
// (scan_ops.cpp, conv_ops.cpp), so every op picks its variant by the same rule.
#pragma once

#include <stdint.h>

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

}  // namespace m2rec_cpu
