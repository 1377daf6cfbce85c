// Eight float64 lanes for the reductions: two 4-wide vectors with GCC/Clang vector
// extensions, so the sums vectorize whatever the target (SSE2: pairs; AVX2: one register
// each) with a fixed order (lane l sums elements l, l + 8, l + 16, ...), or plain arrays
// elsewhere. Loading float widens to float64 exactly.
#pragma once

#include <cstring>

namespace bnkit {

#if defined(__GNUC__)
typedef double f64x4 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

inline f64x4 load4(const double* p) {
  f64x4 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f64x4 load4(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, f64x4);
}

inline f64x4 splat4(double s) { return f64x4{s, s, s, s}; }

// The eight lanes a0[0..3], a1[0..3] into out[0..7].
inline void store8(f64x4 a0, f64x4 a1, double* out) {
  std::memcpy(out, &a0, sizeof a0);
  std::memcpy(out + 4, &a1, sizeof a1);
}
#define BNKIT_VECTOR_EXT 1
#endif

}  // namespace bnkit
