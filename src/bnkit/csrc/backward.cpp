// The backward passes (see kernels.h): the per-channel sums, relu's derivative and the
// elementwise dx. Sums run in float64 over 8 independent lanes (a fixed order).
#include <vector>

#include "kernels.h"

#ifdef BNKIT_AVX2  // setup.py: the build machine has AVX2 (module.cpp checks the CPU)
#pragma GCC target("avx2")
#endif
#include "simd.h"  // after the target: its vectors are AVX2 ones there

namespace bnkit {
namespace {

constexpr int LANES = 8;

template <class T>
void row_sums(const T* __restrict__ dy, const T* __restrict__ x, I n, double m, double& s,
              double& q) {
  double as[LANES] = {0}, aq[LANES] = {0};
  I i = 0;
#ifdef BNKIT_VECTOR_EXT
  const f64x4 mv = splat4(m);
  f64x4 s0 = splat4(0), s1 = splat4(0), q0 = splat4(0), q1 = splat4(0);
  for (; i + LANES <= n; i += LANES) {
    const f64x4 g0 = load4(dy + i), g1 = load4(dy + i + 4);
    s0 += g0;
    s1 += g1;
    q0 += g0 * (load4(x + i) - mv);
    q1 += g1 * (load4(x + i + 4) - mv);
  }
  store8(s0, s1, as);
  store8(q0, q1, aq);
#else
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) {
      const double g = static_cast<double>(dy[i + l]);
      as[l] += g;
      aq[l] += g * (static_cast<double>(x[i + l]) - m);
    }
#endif
  double ss = 0, sq = 0;
  for (; i < n; ++i) {
    const double g = static_cast<double>(dy[i]);
    ss += g;
    sq += g * (static_cast<double>(x[i]) - m);
  }
  for (int l = 0; l < LANES; ++l) {
    ss += as[l];
    sq += aq[l];
  }
  s += ss;
  q += sq;
}

template <class T>
void cf_sums(const T* dy, const T* x, const View& v, I threads, const double* mean,
             double* sum_dy, double* sum_dy_xmu) {
  const Split sp = cf_split(v, threads);
  const I P = ceil_div(v.outer, sp.rows) * sp.pieces;
  std::vector<double> ps(v.C * P), pq(v.C * P);
  run_tasks(v.C * P, threads, [&](I t) {
    const I c = t / P, j = t % P;
    const I o0 = (j / sp.pieces) * sp.rows, o1 = std::min(v.outer, o0 + sp.rows);
    const I s0 = (j % sp.pieces) * sp.width, s1 = std::min(v.inner, s0 + sp.width);
    double s = 0, q = 0;
    for (I o = o0; o < o1; ++o) {
      const I i0 = (o * v.C + c) * v.inner + s0;
      row_sums(dy + i0, x + i0, s1 - s0, mean[c], s, q);
    }
    ps[t] = s;
    pq[t] = q;
  });
  for (I c = 0; c < v.C; ++c) {
    double s = 0, q = 0;
    for (I j = 0; j < P; ++j) {
      s += ps[c * P + j];
      q += pq[c * P + j];
    }
    sum_dy[c] = s;
    sum_dy_xmu[c] = q;
  }
}

template <class T>
void cl_sums(const T* dy, const T* x, const View& v, I threads, const double* mean,
             double* sum_dy, double* sum_dy_xmu) {
  const I M = v.outer, C = v.C;
  const I rows = cl_rows(M, C, threads);
  const I P = ceil_div(M, rows);
  std::vector<double> ps(P * C, 0.0), pq(P * C, 0.0);
  run_tasks(P, threads, [&](I j) {
    double* __restrict__ s = &ps[j * C];
    double* __restrict__ q = &pq[j * C];
    for (I m = j * rows; m < std::min(M, (j + 1) * rows); ++m) {
      const T* dyr = dy + m * C;
      const T* xr = x + m * C;
      for (I c = 0; c < C; ++c) {
        const double g = static_cast<double>(dyr[c]);
        s[c] += g;
        q[c] += g * (static_cast<double>(xr[c]) - mean[c]);
      }
    }
  });
  for (I c = 0; c < C; ++c) {
    sum_dy[c] = 0;
    sum_dy_xmu[c] = 0;
  }
  for (I j = 0; j < P; ++j)
    for (I c = 0; c < C; ++c) {
      sum_dy[c] += ps[j * C + c];
      sum_dy_xmu[c] += pq[j * C + c];
    }
}

// Runs f(offset, n, c) over the elementwise tasks: runs of n values of channel c.
template <class T, class F>
void each_run(const View& v, I threads, const F& f) {
  if (v.inner == 1) {
    const I rows = std::max<I>(1, BLOCK / v.C);
    run_tasks(ceil_div(v.outer, rows), threads, [&](I t) {
      for (I m = t * rows; m < std::min(v.outer, (t + 1) * rows); ++m) f(m * v.C, v.C, I(-1));
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
      f(r * v.inner + s0, s1 - s0, c);
      c = c + 1 < v.C ? c + 1 : 0;
    }
  });
}

}  // namespace

template <class T>
void dy_sums(const T* dy, const T* x, const View& v, I threads, const double* mean,
             double* sum_dy, double* sum_dy_xmu) {
  if (v.inner == 1)
    cl_sums(dy, x, v, threads, mean, sum_dy, sum_dy_xmu);
  else
    cf_sums(dy, x, v, threads, mean, sum_dy, sum_dy_xmu);
}

template <class T>
void relu_grad(const T* dy, const T* x, T* dz, const View& v, I threads, const T* mh,
               const T* sc, const T* sh) {
  // c < 0: a channels-last row of all C channels
  each_run<T>(v, threads, [&](I i0, I n, I c) {
    for (I k = 0; k < n; ++k) {
      const I ch = c < 0 ? k : c;
      const T z = (x[i0 + k] - mh[ch]) * sc[ch] + sh[ch];
      dz[i0 + k] = dy[i0 + k] * (z > T(0) ? T(1) : T(0));
    }
  });
}

template <class T>
void elemt_coeffs(const double* mean, const double* invstd, const double* w, const double* sum_dy,
                  const double* sum_dy_xmu, double n, bool training, I C, T* mean_hi, T* a, T* k,
                  T* c) {
  for (I ch = 0; ch < C; ++ch) {
    const double ac = w ? invstd[ch] * w[ch] : invstd[ch];
    const T mh = static_cast<T>(mean[ch]);
    mean_hi[ch] = mh;
    a[ch] = static_cast<T>(ac);
    if (!training) {
      k[ch] = T(0);
      c[ch] = T(0);
      continue;
    }
    const double kc = -ac * invstd[ch] * invstd[ch] * sum_dy_xmu[ch] / n;
    const double cc = -ac * sum_dy[ch] / n - kc * (mean[ch] - static_cast<double>(mh));
    k[ch] = static_cast<T>(kc);
    c[ch] = static_cast<T>(cc);
  }
}

template <class T>
void backward_elemt(const T* dy, const T* x, T* dx, const View& v, I threads, const T* mh,
                    const T* a, const T* k, const T* c, bool training) {
  if (v.inner == 1) {
    each_run<T>(v, threads, [&](I i0, I n, I) {
      if (training)
        for (I ch = 0; ch < n; ++ch)
          dx[i0 + ch] = (c[ch] + (x[i0 + ch] - mh[ch]) * k[ch]) + dy[i0 + ch] * a[ch];
      else
        for (I ch = 0; ch < n; ++ch) dx[i0 + ch] = dy[i0 + ch] * a[ch];
    });
    return;
  }
  each_run<T>(v, threads, [&](I i0, I n, I ch) {
    const T m = mh[ch], ac = a[ch], kc = k[ch], cc = c[ch];
    const T* dyr = dy + i0;
    const T* xr = x + i0;
    T* dxr = dx + i0;
    if (training)
      for (I j = 0; j < n; ++j) dxr[j] = (cc + (xr[j] - m) * kc) + dyr[j] * ac;
    else
      for (I j = 0; j < n; ++j) dxr[j] = dyr[j] * ac;
  });
}

template <class T>
void fused_backward(const T* dy, const T* x, T* dx, const View& v, I threads, const double* mean,
                    const double* invstd, const double* w, double n, const T* gmh,
                    const T* gsc, const T* gsh, double* sum_dy, double* sum_dy_xmu) {
  run_tasks(v.C, threads, [&](I c) {
    const I step = v.C * v.inner;
    double s = 0, q = 0;
    if (gmh == nullptr) {
      for (I o = 0; o < v.outer; ++o) {
        const I i0 = (o * v.C + c) * v.inner;
        row_sums(dy + i0, x + i0, v.inner, mean[c], s, q);
      }
    } else {  // dz = dy relu'(z), formed in T as the relu backward forms it
      const T m = gmh[c], a = gsc[c], h = gsh[c];
      for (I o = 0; o < v.outer; ++o) {
        const I i0 = (o * v.C + c) * v.inner;
        for (I j = 0; j < v.inner; ++j) {
          const T g = dy[i0 + j] * ((x[i0 + j] - m) * a + h > T(0) ? T(1) : T(0));
          s += static_cast<double>(g);
          q += static_cast<double>(g) * (static_cast<double>(x[i0 + j]) - mean[c]);
        }
      }
    }
    sum_dy[c] = s;
    sum_dy_xmu[c] = q;
    T mh, a, k, cc;
    elemt_coeffs(mean + c, invstd + c, w ? w + c : nullptr, &s, &q, n, true, 1, &mh, &a, &k, &cc);
    for (I o = 0; o < v.outer; ++o) {
      const I i0 = o * step + c * v.inner;
      const T* __restrict__ dyr = dy + i0;
      const T* __restrict__ xr = x + i0;
      T* __restrict__ dxr = dx + i0;
      if (gmh == nullptr) {
        for (I j = 0; j < v.inner; ++j) dxr[j] = (cc + (xr[j] - mh) * k) + dyr[j] * a;
      } else {
        const T gm = gmh[c], ga = gsc[c], gh = gsh[c];
        for (I j = 0; j < v.inner; ++j) {
          const T g = dyr[j] * ((xr[j] - gm) * ga + gh > T(0) ? T(1) : T(0));
          dxr[j] = (cc + (xr[j] - mh) * k) + g * a;
        }
      }
    }
  });
}

#define BNKIT_INSTANTIATE(T)                                                                    \
  template void dy_sums<T>(const T*, const T*, const View&, I, const double*, double*, double*); \
  template void relu_grad<T>(const T*, const T*, T*, const View&, I, const T*, const T*,       \
                             const T*);                                                         \
  template void elemt_coeffs<T>(const double*, const double*, const double*, const double*,     \
                                const double*, double, bool, I, T*, T*, T*, T*);                \
  template void backward_elemt<T>(const T*, const T*, T*, const View&, I, const T*, const T*,  \
                                  const T*, const T*, bool);                                    \
  template void fused_backward<T>(const T*, const T*, T*, const View&, I, const double*,       \
                                  const double*, const double*, double, const T*, const T*,    \
                                  const T*, double*, double*);
BNKIT_INSTANTIATE(float)
BNKIT_INSTANTIATE(double)
#undef BNKIT_INSTANTIATE

}  // namespace bnkit
