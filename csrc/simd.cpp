// Two builds of simd.inc (AVX2+FMA, baseline) and the load-time choice between them (see simd.h).
#include "simd.h"

#include <cstring>
#include <limits>

namespace grk {

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define GRK_SIMD_NAME "avx2"
#include "simd.inc"
#undef GRK_SIMD_NAME
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#define GRK_SIMD_NAME "baseline"
#include "simd.inc"
#undef GRK_SIMD_NAME
}  // namespace baseline

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

const SimdKernels& simd() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx2_fma()) return avx2::kKernels;
#endif
  return baseline::kKernels;
}

}  // namespace grk
