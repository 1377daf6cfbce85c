// In-place activated BN's kernels (see inplace_abn.h): the forward's elementwise write and
// the backward's two passes over (y, dy), which recover dz and x - mu per element instead
// of reading a saved input. Splits and tasks are layout.h's (cf_split / cl_rows for the
// sums, row_split for the elementwise passes), as in the other kernel files.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "inplace_abn.h"

#ifdef BNKIT_AVX2  // setup.py: the build machine has AVX2 (module.cpp checks the CPU)
#pragma GCC target("avx2")
#endif
#include "simd.h"  // after the target: its vectors are AVX2 ones there

namespace bnkit {
namespace {

constexpr int LANES = 8;

// The activation's constants in T, rounded as the reference's torch ops round them.
template <class T>
struct Consts {
  T p, inv_p, lo;  // slope or alpha; 1/p (leaky_relu's inverse); elu's clamp -1 + eps
  explicit Consts(double param)
      : p(static_cast<T>(param)),
        inv_p(static_cast<T>(1.0 / param)),
        lo(static_cast<T>(-1.0 + std::numeric_limits<T>::epsilon())) {}
};

template <class T, AbnAct A>
inline T act_of(T z, const Consts<T>& k) {
  if (A == AbnAct::leaky_relu) return z > T(0) ? z : z * k.p;
  if (A == AbnAct::elu) return z <= T(0) ? std::expm1(z) * k.p : z;
  return z;
}

// (dz, x - mu) of one value from y and dy (torch's leaky_relu / elu backward from the result).
template <class T, AbnAct A>
inline void recover(T y, T g, const Consts<T>& k, T r, T h, T& dz, T& xmu) {
  T z = y;
  dz = g;
  if (A == AbnAct::leaky_relu) {
    z = y > T(0) ? y : y * k.inv_p;
    dz = y > T(0) ? g : g * k.p;
  } else if (A == AbnAct::elu) {
    z = y > T(0) ? y : std::log1p(std::max(y / k.p, k.lo));
    dz = y <= T(0) ? g * (y + k.p) : g;
  }
  xmu = z * r + h;
}

// Runs f(offset, n, c) over the elementwise tasks: runs of n values of channel c, or (c < 0)
// one channels-last row of all C channels.
template <class F>
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

template <class T, AbnAct A>
void write(const T* x, T* y, const View& v, I threads, const T* mh, const T* sc, const T* sh,
           const Consts<T>& k) {
  each_run(v, threads, [&](I i0, I n, I c) {
    if (c < 0) {
      for (I j = 0; j < n; ++j) y[i0 + j] = act_of<T, A>((x[i0 + j] - mh[j]) * sc[j] + sh[j], k);
      return;
    }
    const T m = mh[c], a = sc[c], h = sh[c];
    for (I j = 0; j < n; ++j) y[i0 + j] = act_of<T, A>((x[i0 + j] - m) * a + h, k);
  });
}

// s += sum dz, q += sum dz (x - mu) over one run of a channel, eight float64 lanes.
template <class T, AbnAct A>
void run_sums(const T* __restrict__ dy, const T* __restrict__ y, I n, const Consts<T>& k, T r,
              T h, double& s, double& q) {
  double as[LANES] = {0}, aq[LANES] = {0};
  I i = 0;
  T gz[LANES], xm[LANES];
#ifdef BNKIT_VECTOR_EXT
  f64x4 s0 = splat4(0), s1 = splat4(0), q0 = splat4(0), q1 = splat4(0);
  for (; i + LANES <= n; i += LANES) {
    for (int l = 0; l < LANES; ++l) recover<T, A>(y[i + l], dy[i + l], k, r, h, gz[l], xm[l]);
    const f64x4 g0 = load4(gz), g1 = load4(gz + 4);
    s0 += g0;
    s1 += g1;
    q0 += g0 * load4(xm);
    q1 += g1 * load4(xm + 4);
  }
  store8(s0, s1, as);
  store8(q0, q1, aq);
#else
  for (; i + LANES <= n; i += LANES) {
    for (int l = 0; l < LANES; ++l) recover<T, A>(y[i + l], dy[i + l], k, r, h, gz[l], xm[l]);
    for (int l = 0; l < LANES; ++l) {
      as[l] += static_cast<double>(gz[l]);
      aq[l] += static_cast<double>(gz[l]) * static_cast<double>(xm[l]);
    }
  }
#endif
  double ss = 0, sq = 0;
  for (; i < n; ++i) {
    T g, xmu;
    recover<T, A>(y[i], dy[i], k, r, h, g, xmu);
    ss += static_cast<double>(g);
    sq += static_cast<double>(g) * static_cast<double>(xmu);
  }
  for (int l = 0; l < LANES; ++l) {
    ss += as[l];
    sq += aq[l];
  }
  s += ss;
  q += sq;
}

template <class T, AbnAct A>
void cf_sums(const T* dy, const T* y, const View& v, I threads, const T* r, const T* h,
             const Consts<T>& k, double* sum_dz, double* sum_dz_xmu) {
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
      run_sums<T, A>(dy + i0, y + i0, s1 - s0, k, r[c], h[c], s, q);
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
    sum_dz[c] = s;
    sum_dz_xmu[c] = q;
  }
}

template <class T, AbnAct A>
void cl_sums(const T* dy, const T* y, const View& v, I threads, const T* r, const T* h,
             const Consts<T>& k, double* sum_dz, double* sum_dz_xmu) {
  const I M = v.outer, C = v.C;
  const I rows = cl_rows(M, C, threads);
  const I P = ceil_div(M, rows);
  std::vector<double> ps(P * C, 0.0), pq(P * C, 0.0);
  run_tasks(P, threads, [&](I j) {
    double* __restrict__ s = &ps[j * C];
    double* __restrict__ q = &pq[j * C];
    for (I m = j * rows; m < std::min(M, (j + 1) * rows); ++m) {
      const T* dyr = dy + m * C;
      const T* yr = y + m * C;
      for (I c = 0; c < C; ++c) {
        T g, xmu;
        recover<T, A>(yr[c], dyr[c], k, r[c], h[c], g, xmu);
        s[c] += static_cast<double>(g);
        q[c] += static_cast<double>(g) * static_cast<double>(xmu);
      }
    }
  });
  for (I c = 0; c < C; ++c) {
    sum_dz[c] = 0;
    sum_dz_xmu[c] = 0;
  }
  for (I j = 0; j < P; ++j)
    for (I c = 0; c < C; ++c) {
      sum_dz[c] += ps[j * C + c];
      sum_dz_xmu[c] += pq[j * C + c];
    }
}

template <class T, AbnAct A, bool TRAIN>
inline T dx_of(T y, T g, const Consts<T>& k, T r, T h, T a, T kk, T cc) {
  T dz, xmu;
  recover<T, A>(y, g, k, r, h, dz, xmu);
  return TRAIN ? (cc + xmu * kk) + dz * a : dz * a;
}

template <class T, AbnAct A, bool TRAIN>
void dx_pass(const T* dy, const T* y, T* dx, const View& v, I threads, const T* r, const T* h,
             const T* a, const T* kk, const T* cc, const Consts<T>& k) {
  each_run(v, threads, [&](I i0, I n, I ch) {
    if (ch < 0) {
      for (I c = 0; c < n; ++c)
        dx[i0 + c] = dx_of<T, A, TRAIN>(y[i0 + c], dy[i0 + c], k, r[c], h[c], a[c], kk[c], cc[c]);
      return;
    }
    const T rc = r[ch], hc = h[ch], ac = a[ch], kc = kk[ch], c0 = cc[ch];
    for (I j = 0; j < n; ++j)
      dx[i0 + j] = dx_of<T, A, TRAIN>(y[i0 + j], dy[i0 + j], k, rc, hc, ac, kc, c0);
  });
}

// Calls f.template operator()<A>() for the runtime activation.
template <class F>
void with_act(AbnAct act, const F& f) {
  switch (act) {
    case AbnAct::leaky_relu:
      f.template operator()<AbnAct::leaky_relu>();
      break;
    case AbnAct::elu:
      f.template operator()<AbnAct::elu>();
      break;
    default:
      f.template operator()<AbnAct::identity>();
  }
}

}  // namespace

template <class T>
void abn_write(const T* x, T* y, const View& v, I threads, const T* mean_hi, const T* scale,
               const T* shift, AbnAct act, double p) {
  const Consts<T> k(p);
  with_act(act, [&]<AbnAct A>() { write<T, A>(x, y, v, threads, mean_hi, scale, shift, k); });
}

template <class T>
void abn_inverse_coeffs(const double* invstd, const double* w, const double* b, I C, T* r, T* h) {
  for (I c = 0; c < C; ++c) {
    const double s = w ? invstd[c] * w[c] : invstd[c];
    const double rc = s == 0.0 ? 0.0 : 1.0 / s;
    r[c] = static_cast<T>(rc);
    h[c] = b ? static_cast<T>(-b[c] * rc) : T(0);
  }
}

template <class T>
void abn_sums(const T* dy, const T* y, const View& v, I threads, const T* r, const T* h,
              AbnAct act, double p, double* sum_dz, double* sum_dz_xmu) {
  const Consts<T> k(p);
  with_act(act, [&]<AbnAct A>() {
    if (v.inner == 1)
      cl_sums<T, A>(dy, y, v, threads, r, h, k, sum_dz, sum_dz_xmu);
    else
      cf_sums<T, A>(dy, y, v, threads, r, h, k, sum_dz, sum_dz_xmu);
  });
}

template <class T>
void abn_dx(const T* dy, const T* y, T* dx, const View& v, I threads, const T* r, const T* h,
            const T* a, const T* k, const T* c, AbnAct act, double p, bool training) {
  const Consts<T> consts(p);
  with_act(act, [&]<AbnAct A>() {
    if (training)
      dx_pass<T, A, true>(dy, y, dx, v, threads, r, h, a, k, c, consts);
    else
      dx_pass<T, A, false>(dy, y, dx, v, threads, r, h, a, k, c, consts);
  });
}

#define BNKIT_INSTANTIATE(T)                                                                   \
  template void abn_write<T>(const T*, T*, const View&, I, const T*, const T*, const T*,      \
                             AbnAct, double);                                                  \
  template void abn_inverse_coeffs<T>(const double*, const double*, const double*, I, T*, T*); \
  template void abn_sums<T>(const T*, const T*, const View&, I, const T*, const T*, AbnAct,   \
                            double, double*, double*);                                         \
  template void abn_dx<T>(const T*, const T*, T*, const View&, I, const T*, const T*,         \
                          const T*, const T*, const T*, AbnAct, double, bool);
BNKIT_INSTANTIATE(float)
BNKIT_INSTANTIATE(double)
#undef BNKIT_INSTANTIATE

}  // namespace bnkit
