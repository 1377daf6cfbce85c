// Eight float64 lanes for the reductions (V8): lane l sums elements l, l + 8, l + 16, ...,
// a fixed order whatever the target, so results do not depend on the build. AVX2 (the
// kernel files target it when setup.py defines BNKIT_AVX2): two 4-wide registers with
// intrinsics (GCC's vector extensions widen float to double in pairs there, which made the
// statistics compute-bound); elsewhere GCC/Clang vector extensions, or plain arrays
// without them. Loading float widens to float64 exactly.
#pragma once

#include <cstring>

#if defined(BNKIT_AVX2)
#include <immintrin.h>
#endif

namespace bnkit {

#if defined(BNKIT_AVX2)
struct V8 {
  __m256d lo, hi;  // lanes 0-3, 4-7
};

inline V8 load8(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
inline V8 load8(const float* p) {
  return {_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p + 4))};
}
inline V8 splat8(double s) { return {_mm256_set1_pd(s), _mm256_set1_pd(s)}; }
inline V8 operator+(V8 a, V8 b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
inline V8 operator-(V8 a, V8 b) { return {_mm256_sub_pd(a.lo, b.lo), _mm256_sub_pd(a.hi, b.hi)}; }
inline V8 operator*(V8 a, V8 b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
inline void store8(V8 a, double* out) {
  _mm256_storeu_pd(out, a.lo);
  _mm256_storeu_pd(out + 4, a.hi);
}
#define BNKIT_VECTOR_EXT 1
#elif defined(__GNUC__)
typedef double f64x4 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

struct V8 {
  f64x4 lo, hi;  // lanes 0-3, 4-7
};

inline V8 load8(const double* p) {
  V8 r;
  std::memcpy(&r.lo, p, sizeof r.lo);
  std::memcpy(&r.hi, p + 4, sizeof r.hi);
  return r;
}

inline V8 load8(const float* p) {
  f32x4 lo, hi;
  std::memcpy(&lo, p, sizeof lo);
  std::memcpy(&hi, p + 4, sizeof hi);
  return {__builtin_convertvector(lo, f64x4), __builtin_convertvector(hi, f64x4)};
}

inline V8 splat8(double s) { return {f64x4{s, s, s, s}, f64x4{s, s, s, s}}; }
inline V8 operator+(V8 a, V8 b) { return {a.lo + b.lo, a.hi + b.hi}; }
inline V8 operator-(V8 a, V8 b) { return {a.lo - b.lo, a.hi - b.hi}; }
inline V8 operator*(V8 a, V8 b) { return {a.lo * b.lo, a.hi * b.hi}; }
inline void store8(V8 a, double* out) {
  std::memcpy(out, &a.lo, sizeof a.lo);
  std::memcpy(out + 4, &a.hi, sizeof a.hi);
}
#define BNKIT_VECTOR_EXT 1
#endif

#ifdef BNKIT_VECTOR_EXT
inline V8& operator+=(V8& a, V8 b) { return a = a + b; }
#endif

}  // namespace bnkit
