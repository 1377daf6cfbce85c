// The CPU kernels of bnkit._C on raw buffers (declarations; one file per concept:
// stats.cpp, normalize.cpp, backward.cpp, running.cpp). T is float or double; every
// per-channel vector is (C,) float64 unless its type says otherwise. Statistics and sums
// accumulate in float64; elementwise work runs in T, IEEE, with no contraction (the build
// passes -ffp-contract=off), so `(x - m) * a + h` rounds as the reference backend's.
#pragma once

#include <cmath>

#include "layout.h"

namespace bnkit {

// Per-channel mean and biased variance, per cache-sized chunk merged with Chan's formula:
// float, one pass of deviations from the first value of each group of at most SHIFT_ROWS
// values of a channel (channels-last: the chunk's first row); double, two passes.
template <class T>
void batch_stats(const T* x, const View& v, I threads, double* mean, double* var);

// Per-channel coefficients of y = (x - mean_hi) * scale + shift (affine_coeffs order);
// w, b may be null. invstd (C,) given.
template <class T>
void affine_coeffs(const double* mean, const double* invstd, const double* w, const double* b,
                   I C, T* mean_hi, T* scale, T* shift);

// y = act((x - mean_hi[c]) * scale[c] + shift[c]), act identity or relu (NaN stays NaN).
template <class T>
void normalize(const T* x, T* y, const View& v, I threads, const T* mean_hi, const T* scale,
               const T* shift, bool relu);

// sum dy and sum dy (x - mean) per channel. With gate coefficients (relu: the forward's
// mean_hi, scale, shift; gmh null: no gate), dy stands for dz = dy * relu'(z), z recomputed.
template <class T>
void dy_sums(const T* dy, const T* x, const View& v, I threads, const double* mean, const T* gmh,
             const T* gsc, const T* gsh, double* sum_dy, double* sum_dy_xmu);

// dz = dy * relu'(z), relu'(z) = 1 or 0 as T (z > 0), z recomputed from the coefficients.
template <class T>
void relu_grad(const T* dy, const T* x, T* dz, const View& v, I threads, const T* mean_hi,
               const T* scale, const T* shift);

// Per-channel (mean_hi, a, k, c) of dx = (c + (x - mean_hi) k) + dy a (elemt_coeffs
// order); eval: k = c = 0, a = invstd * w.
template <class T>
void elemt_coeffs(const double* mean, const double* invstd, const double* w, const double* sum_dy,
                  const double* sum_dy_xmu, double n, bool training, I C, T* mean_hi, T* a, T* k,
                  T* c);

// dx = (c + (x - mean_hi) k) + dy a (training) or dy a (eval); with gate coefficients (as
// in dy_sums) dy stands for dz = dy * relu'(z), recomputed.
template <class T>
void backward_elemt(const T* dy, const T* x, T* dx, const View& v, I threads, const T* mean_hi,
                    const T* a, const T* k, const T* c, bool training, const T* gmh,
                    const T* gsc, const T* gsh);

// Training backward of a channels-first view, one task per channel: the sums (dy and x
// read from memory), then dx while the channel is still in cache (3 passes over memory
// instead of 5). With the gate coefficients (relu; null: identity) dy stands for
// dz = dy * relu'(z), recomputed in both passes. w may be null.
template <class T>
void fused_backward(const T* dy, const T* x, T* dx, const View& v, I threads, const double* mean,
                    const double* invstd, const double* w, double n, const T* gmh,
                    const T* gsc, const T* gsh, double* sum_dy, double* sum_dy_xmu);

// Running statistics blended towards mean and the unbiased var (count n) by momentum, in
// float64, rounded once into R. Channels whose batch statistics are not finite keep their
// running statistics; returns how many did.
template <class R>
I blend_running(R* rm, R* rv, const double* mean, const double* var, I C, double n,
                double momentum);

// 1 / sqrt(var + eps); 0 where var + eps == 0 (a zero-variance channel with eps = 0: its
// centred values are exactly 0, so the output is the bias). NaN stays NaN.
inline double inv_std(double var, double eps) {
  const double s = var + eps;
  return s == 0.0 ? 0.0 : 1.0 / std::sqrt(s);
}

}  // namespace bnkit
