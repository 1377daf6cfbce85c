// In-place activated BN's kernels on raw buffers (inplace_abn_kernels.cpp), the arithmetic
// of bnkit.functional.inplace_abn: the forward writes y = f((x - mean_hi) * scale + shift)
// (affine_coeffs' coefficients, kernels.h), possibly into x itself; the backward reads only
// y and dy and recovers, per element, in T:
//   z  = f^-1(y)           leaky_relu: y > 0 ? y : y * (1/p);  elu: y > 0 ? y : log1p(max(y/p, -1 + eps))
//   dz = dy f'(z)          leaky_relu: y > 0 ? dy : dy * p;    elu: y > 0 ? dy : dy * (y + p)
//   x - mu = z * r + h     r = 1 / (invstd w) (0 where that is 0), h = -b r
// then the sums (float64) and dx = (c + (x - mu) k) + dz a with elemt_coeffs' (a, k, c) for a
// zero mean (x - mu is already centred). T is float or double.
#pragma once

#include "layout.h"

namespace bnkit {

enum class AbnAct { identity, leaky_relu, elu };

// y = f((x - mean_hi) * scale + shift); y may be x (each value is read before it is written).
template <class T>
void abn_write(const T* x, T* y, const View& v, I threads, const T* mean_hi, const T* scale,
               const T* shift, AbnAct act, double p);

// Per-channel (r, h) of x - mu = z r + h: r = 1 / (invstd w), 0 where invstd w == 0 (w may
// be null: 1), h = -b r (b null: 0), computed in float64 and rounded once.
template <class T>
void abn_inverse_coeffs(const double* invstd, const double* w, const double* b, I C, T* r, T* h);

// sum dz and sum dz (x - mu) per channel, both recovered from (y, dy), accumulated in float64.
template <class T>
void abn_sums(const T* dy, const T* y, const View& v, I threads, const T* r, const T* h,
              AbnAct act, double p, double* sum_dz, double* sum_dz_xmu);

// dx = (c + (x - mu) k) + dz a (training) or dz a (eval), recovered from (y, dy).
template <class T>
void abn_dx(const T* dy, const T* y, T* dx, const View& v, I threads, const T* r, const T* h,
            const T* a, const T* k, const T* c, AbnAct act, double p, bool training);

}  // namespace bnkit
