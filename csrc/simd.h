// The vectorised inner loops of grkernels._C, compiled twice (x86-64: AVX2+FMA and baseline SSE2; other
// architectures: baseline only) and picked once at load time from the CPU's features (simd.cpp), so that one
// binary runs everywhere and uses AVX2 where present.
//
// Every loop works on fp32 buffers padded to a multiple of kLanes = 16 elements, with two 8-lane
// accumulators summed in a fixed order at the end: the results are deterministic and do not depend on the
// thread count or on which of the two builds runs (the same operations in the same order; FMA contraction
// is off in both).
#pragma once

#include <cstdint>

namespace grk {

constexpr int64_t kLanes = 16;

inline int64_t padded(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

struct SimdKernels {
  const char* name;  // "avx2" or "baseline"
  // max over z[0, n) (n a multiple of kLanes)
  float (*chunk_max)(const float* z, int64_t n);
  // s = sum exp(z - m), a = sum exp(z - m) (z - m) (0 where exp gives 0: -inf entries add nothing)
  void (*chunk_sums)(const float* z, int64_t n, float m, bool with_a, float* s, float* a);
  // in place: z <- -g_lp p - g_h p (log p + h) with log p = (z - m) - log_s, p = exp(log p) (the h term is 0
  // where p = 0)
  void (*chunk_grad)(float* z, int64_t n, float m, float log_s, float g_lp, float g_h, float h);
  // exp of one value with the same lane arithmetic as the loops
  float (*exp1)(float x);
};

const SimdKernels& simd();

// Whether this CPU runs the AVX2+FMA builds (the load-time choice of simd.cpp and gr_step.cpp); checked once.
bool cpu_has_avx2_fma();

}  // namespace grk
