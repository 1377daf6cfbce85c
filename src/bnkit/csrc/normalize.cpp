// The elementwise forward: y = act((x - mean_hi) * scale + shift), act identity or relu,
// with the coefficients of bnkit.functional.normalize.affine_coeffs (see kernels.h).
#include "kernels.h"

#ifdef BNKIT_AVX2  // setup.py: the build machine has AVX2 (module.cpp checks the CPU)
#pragma GCC target("avx2")
#endif
#include "tasks.h"  // after the target: its loops inline the kernels' lambdas

namespace bnkit {
namespace {

// max(y, 0) as numpy's maximum: NaN stays NaN, -0 stays -0.
template <class T>
inline T relu_of(T y) {
  return y < T(0) ? T(0) : y;
}

// n values of one channel: y = act((x - m) * a + h).
template <class T, bool RELU>
inline void apply_run(const T* __restrict__ x, T* __restrict__ y, I n, T m, T a, T h) {
  for (I k = 0; k < n; ++k) {
    const T z = (x[k] - m) * a + h;
    y[k] = RELU ? relu_of(z) : z;
  }
}

// A channels-last row: value k belongs to channel k.
template <class T, bool RELU>
inline void apply_cl_row(const T* __restrict__ x, T* __restrict__ y, I C, const T* __restrict__ mh,
                         const T* __restrict__ sc, const T* __restrict__ sh) {
  for (I c = 0; c < C; ++c) {
    const T z = (x[c] - mh[c]) * sc[c] + sh[c];
    y[c] = RELU ? relu_of(z) : z;
  }
}

template <class T, bool RELU>
void run(const T* x, T* y, const View& v, I threads, const T* mh, const T* sc, const T* sh) {
  each_run(v, threads, [&](I i0, I n, I c) {
    if (c < 0)
      apply_cl_row<T, RELU>(x + i0, y + i0, n, mh, sc, sh);
    else
      apply_run<T, RELU>(x + i0, y + i0, n, mh[c], sc[c], sh[c]);
  });
}

}  // namespace

template <class T>
void affine_coeffs(const double* mean, const double* invstd, const double* w, const double* b,
                   I C, T* mean_hi, T* scale, T* shift) {
  for (I c = 0; c < C; ++c) {
    const double s = w ? invstd[c] * w[c] : invstd[c];
    const T mh = static_cast<T>(mean[c]);
    double h = -(mean[c] - static_cast<double>(mh)) * s;
    if (b) h = h + b[c];
    mean_hi[c] = mh;
    scale[c] = static_cast<T>(s);
    shift[c] = static_cast<T>(h);
  }
}

template <class T>
void normalize(const T* x, T* y, const View& v, I threads, const T* mean_hi, const T* scale,
               const T* shift, bool relu) {
  if (relu)
    run<T, true>(x, y, v, threads, mean_hi, scale, shift);
  else
    run<T, false>(x, y, v, threads, mean_hi, scale, shift);
}

#define BNKIT_INSTANTIATE(T)                                                                 \
  template void affine_coeffs<T>(const double*, const double*, const double*, const double*, \
                                 I, T*, T*, T*);                                             \
  template void normalize<T>(const T*, T*, const View&, I, const T*, const T*, const T*, bool);
BNKIT_INSTANTIATE(float)
BNKIT_INSTANTIATE(double)
#undef BNKIT_INSTANTIATE

}  // namespace bnkit
