// The elementwise forward: y = act((x - mean_hi) * scale + shift), act identity or relu,
// with the coefficients of bnkit.functional.normalize.affine_coeffs (see kernels.h).
#include "kernels.h"

#ifdef BNKIT_AVX2  // setup.py: the build machine has AVX2 (module.cpp checks the CPU)
#pragma GCC target("avx2")
#endif

namespace bnkit {
namespace {

// max(y, 0) as numpy's maximum: NaN stays NaN, -0 stays -0.
template <class T>
inline T relu_of(T y) {
  return y < T(0) ? T(0) : y;
}

template <class T, bool RELU>
inline void apply_row(const T* x, T* y, I n, T m, T a, T h) {
  for (I k = 0; k < n; ++k) {
    const T z = (x[k] - m) * a + h;
    y[k] = RELU ? relu_of(z) : z;
  }
}

template <class T, bool RELU>
inline void apply_cl_rows(const T* x, T* y, I m0, I m1, I C, const T* mh, const T* sc,
                          const T* sh) {
  for (I m = m0; m < m1; ++m) {
    const T* xr = x + m * C;
    T* yr = y + m * C;
    for (I c = 0; c < C; ++c) {
      const T z = (xr[c] - mh[c]) * sc[c] + sh[c];
      yr[c] = RELU ? relu_of(z) : z;
    }
  }
}

template <class T, bool RELU>
void run(const T* x, T* y, const View& v, I threads, const T* mh, const T* sc, const T* sh) {
  if (v.inner == 1) {
    const I rows = std::max<I>(1, BLOCK / v.C);
    run_tasks(ceil_div(v.outer, rows), threads, [&](I t) {
      apply_cl_rows<T, RELU>(x, y, t * rows, std::min(v.outer, (t + 1) * rows), v.C, mh, sc,
                             sh);
    });
    return;
  }
  const I nrows = v.outer * v.C;
  const RowSplit rs = row_split(nrows, v.inner);
  run_tasks(rs.tasks, threads, [&](I t) {
    const I r0 = (t / rs.pieces) * rs.per, r1 = std::min(nrows, r0 + rs.per);
    const I s0 = (t % rs.pieces) * rs.width, s1 = std::min(v.inner, s0 + rs.width);
    I c = r0 % v.C;
    for (I r = r0; r < r1; ++r) {
      apply_row<T, RELU>(x + r * v.inner + s0, y + r * v.inner + s0, s1 - s0, mh[c], sc[c],
                         sh[c]);
      c = c + 1 < v.C ? c + 1 : 0;
    }
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
