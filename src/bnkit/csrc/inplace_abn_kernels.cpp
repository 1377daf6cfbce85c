// In-place activated BN's kernels (see inplace_abn.h): the forward's elementwise write and
// the backward's two passes over (y, dy), which recover dz and x - mu per element instead
// of reading a saved input. Splits and tasks are layout.h's (cf_split / cl_rows for the
// sums, row_split for the elementwise passes), as in the other kernel files.
//
// leaky_relu and identity run on explicit 32-byte vectors (GCC/Clang vector extensions):
// their selects compare floating-point values, which the auto-vectorizer does not
// if-convert under the default -ftrapping-math. Vector and scalar code perform the same
// operations in the same order, so results do not depend on where a value falls. elu calls
// expm1 / log1p and stays scalar.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "inplace_abn.h"

#ifdef BNKIT_AVX2  // setup.py: the build machine has AVX2 (module.cpp checks the CPU)
#pragma GCC target("avx2")
#endif
#include "simd.h"   // after the target: its vectors are AVX2 ones there
#include "tasks.h"  // after the target: its loops inline the kernels' lambdas

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

#ifdef BNKIT_VECTOR_EXT
template <class T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
};
template <class T>
using V = typename Vec<T>::type;
template <class T>
constexpr I W = 32 / sizeof(T);  // values per vector (LANES is a multiple)

template <class T>
inline V<T> vload(const T* p) {
  V<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void vstore(T* p, V<T> v) {
  std::memcpy(p, &v, sizeof v);
}
#endif

template <AbnAct A>
constexpr bool VECTOR = A != AbnAct::elu;  // elu: libm calls, scalar

// f(z) on a value or a vector L of T's.
template <class L, class T, AbnAct A>
inline L act_of(L z, Consts<T> k) {
  if constexpr (A == AbnAct::leaky_relu) {
    const L neg = z * k.p;
    return z > T(0) ? z : neg;
  } else if constexpr (A == AbnAct::elu) {
    return z <= T(0) ? std::expm1(z) * k.p : z;
  } else {
    return z;
  }
}

// (dz, x - mu) from y and dy (torch's leaky_relu / elu backward from the result); R is L or
// T (per-channel coefficients as a vector or a scalar).
template <class L, class R, class T, AbnAct A>
inline void recover(L y, L g, Consts<T> k, R r, R h, L& dz, L& xmu) {
  if constexpr (A == AbnAct::leaky_relu) {
    const L zn = y * k.inv_p, gn = g * k.p;
    const auto pos = y > T(0);
    dz = pos ? g : gn;
    xmu = (pos ? y : zn) * r + h;
  } else if constexpr (A == AbnAct::elu) {
    const L gn = g * (y + k.p);
    const L z = y > T(0) ? y : std::log1p(std::max(y / k.p, k.lo));
    dz = y <= T(0) ? gn : g;
    xmu = z * r + h;
  } else {
    dz = g;
    xmu = y * r + h;
  }
}

// y = f((x - m) * a + h) over a run of one channel; y may be x (each block is loaded
// before it is stored).
template <class T, AbnAct A>
void write_run(const T* x, T* y, I n, T m, T a, T h, Consts<T> k) {
  I j = 0;
#ifdef BNKIT_VECTOR_EXT
  if constexpr (VECTOR<A>)
    for (; j + W<T> <= n; j += W<T>)
      vstore(y + j, act_of<V<T>, T, A>((vload(x + j) - m) * a + h, k));
#endif
  for (; j < n; ++j) y[j] = act_of<T, T, A>((x[j] - m) * a + h, k);
}

// The same over a channels-last row of C channels.
template <class T, AbnAct A>
void write_row(const T* x, T* y, I C, const T* mh, const T* sc, const T* sh, Consts<T> k) {
  I c = 0;
#ifdef BNKIT_VECTOR_EXT
  if constexpr (VECTOR<A>)
    for (; c + W<T> <= C; c += W<T>)
      vstore(y + c, act_of<V<T>, T, A>(
                        (vload(x + c) - vload(mh + c)) * vload(sc + c) + vload(sh + c), k));
#endif
  for (; c < C; ++c) y[c] = act_of<T, T, A>((x[c] - mh[c]) * sc[c] + sh[c], k);
}

template <class T, AbnAct A>
void write(const T* x, T* y, const View& v, I threads, const T* mh, const T* sc, const T* sh,
           Consts<T> k) {
  each_run(v, threads, [&](I i0, I n, I c) {
    if (c < 0)
      write_row<T, A>(x + i0, y + i0, n, mh, sc, sh, k);
    else
      write_run<T, A>(x + i0, y + i0, n, mh[c], sc[c], sh[c], k);
  });
}

// s += sum dz, q += sum dz (x - mu) over one run of a channel, eight float64 lanes.
template <class T, AbnAct A>
void run_sums(const T* dy, const T* y, I n, Consts<T> k, T r, T h, double& s, double& q) {
  double as[LANES] = {0}, aq[LANES] = {0};
  I i = 0;
  T gz[LANES], xm[LANES];
#ifdef BNKIT_VECTOR_EXT
  V8 s8 = splat8(0), q8 = splat8(0);
  for (; i + LANES <= n; i += LANES) {
    if constexpr (VECTOR<A>) {
      for (int u = 0; u < LANES; u += W<T>) {
        V<T> d, x;
        recover<V<T>, T, T, A>(vload(y + i + u), vload(dy + i + u), k, r, h, d, x);
        vstore(gz + u, d);
        vstore(xm + u, x);
      }
    } else {
      for (int l = 0; l < LANES; ++l) recover<T, T, T, A>(y[i + l], dy[i + l], k, r, h, gz[l], xm[l]);
    }
    const V8 g8 = load8(gz);
    s8 += g8;
    q8 += g8 * load8(xm);
  }
  store8(s8, as);
  store8(q8, aq);
#else
  for (; i + LANES <= n; i += LANES) {
    for (int l = 0; l < LANES; ++l) recover<T, T, T, A>(y[i + l], dy[i + l], k, r, h, gz[l], xm[l]);
    for (int l = 0; l < LANES; ++l) {
      as[l] += static_cast<double>(gz[l]);
      aq[l] += static_cast<double>(gz[l]) * static_cast<double>(xm[l]);
    }
  }
#endif
  double ss = 0, sq = 0;
  for (; i < n; ++i) {
    T g, xmu;
    recover<T, T, T, A>(y[i], dy[i], k, r, h, g, xmu);
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
             Consts<T> k, double* sum_dz, double* sum_dz_xmu) {
  cf_channel_sums(
      v, threads,
      [&](I c, I o0, I o1, I s0, I s1, double& s, double& q) {
        for (I o = o0; o < o1; ++o) {
          const I i0 = (o * v.C + c) * v.inner + s0;
          run_sums<T, A>(dy + i0, y + i0, s1 - s0, k, r[c], h[c], s, q);
        }
      },
      sum_dz, sum_dz_xmu);
}

// s[c] += dz, q[c] += dz (x - mu) over one channels-last row of C channels.
template <class T, AbnAct A>
void row_sums(const T* dy, const T* y, I C, const T* r, const T* h, Consts<T> k, double* s,
              double* q) {
  I c = 0;
#ifdef BNKIT_VECTOR_EXT
  if constexpr (VECTOR<A>) {
    T gz[LANES], xm[LANES];
    for (; c + LANES <= C; c += LANES) {
      for (int u = 0; u < LANES; u += W<T>) {
        V<T> d, x;
        recover<V<T>, V<T>, T, A>(vload(y + c + u), vload(dy + c + u), k, vload(r + c + u),
                                  vload(h + c + u), d, x);
        vstore(gz + u, d);
        vstore(xm + u, x);
      }
      const V8 g8 = load8(gz);
      store8(load8(s + c) + g8, s + c);
      store8(load8(q + c) + g8 * load8(xm), q + c);
    }
  }
#endif
  for (; c < C; ++c) {
    T g, xmu;
    recover<T, T, T, A>(y[c], dy[c], k, r[c], h[c], g, xmu);
    s[c] += static_cast<double>(g);
    q[c] += static_cast<double>(g) * static_cast<double>(xmu);
  }
}

template <class T, AbnAct A>
void cl_sums(const T* dy, const T* y, const View& v, I threads, const T* r, const T* h,
             Consts<T> k, double* sum_dz, double* sum_dz_xmu) {
  const I M = v.outer, C = v.C;
  const I rows = cl_rows(M, C, threads);
  const I P = ceil_div(M, rows);
  std::vector<double> ps(P * C, 0.0), pq(P * C, 0.0);
  run_tasks(P, threads, [&](I j) {
    for (I m = j * rows; m < std::min(M, (j + 1) * rows); ++m)
      row_sums<T, A>(dy + m * C, y + m * C, C, r, h, k, &ps[j * C], &pq[j * C]);
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

// dx of one value (or vector): (c + (x - mu) k) + dz a in training, dz a in eval.
template <class L, class R, class T, AbnAct A, bool TRAIN>
inline L dx_of(L y, L g, Consts<T> k, R r, R h, R a, R kk, R cc) {
  L dz, xmu;
  recover<L, R, T, A>(y, g, k, r, h, dz, xmu);
  if constexpr (TRAIN)
    return (cc + xmu * kk) + dz * a;
  else
    return dz * a;
}

template <class T, AbnAct A, bool TRAIN>
void dx_run(const T* dy, const T* y, T* dx, I n, Consts<T> k, T r, T h, T a, T kk, T cc) {
  I j = 0;
#ifdef BNKIT_VECTOR_EXT
  if constexpr (VECTOR<A>)
    for (; j + W<T> <= n; j += W<T>)
      vstore(dx + j, dx_of<V<T>, T, T, A, TRAIN>(vload(y + j), vload(dy + j), k, r, h, a, kk,
                                                   cc));
#endif
  for (; j < n; ++j) dx[j] = dx_of<T, T, T, A, TRAIN>(y[j], dy[j], k, r, h, a, kk, cc);
}

template <class T, AbnAct A, bool TRAIN>
void dx_row(const T* dy, const T* y, T* dx, I C, Consts<T> k, const T* r, const T* h,
            const T* a, const T* kk, const T* cc) {
  I c = 0;
#ifdef BNKIT_VECTOR_EXT
  if constexpr (VECTOR<A>)
    for (; c + W<T> <= C; c += W<T>)
      vstore(dx + c, dx_of<V<T>, V<T>, T, A, TRAIN>(vload(y + c), vload(dy + c), k,
                                                      vload(r + c), vload(h + c), vload(a + c),
                                                      vload(kk + c), vload(cc + c)));
#endif
  for (; c < C; ++c)
    dx[c] = dx_of<T, T, T, A, TRAIN>(y[c], dy[c], k, r[c], h[c], a[c], kk[c], cc[c]);
}

template <class T, AbnAct A, bool TRAIN>
void dx_pass(const T* dy, const T* y, T* dx, const View& v, I threads, const T* r, const T* h,
             const T* a, const T* kk, const T* cc, Consts<T> k) {
  each_run(v, threads, [&](I i0, I n, I ch) {
    if (ch < 0)
      dx_row<T, A, TRAIN>(dy + i0, y + i0, dx + i0, n, k, r, h, a, kk, cc);
    else
      dx_run<T, A, TRAIN>(dy + i0, y + i0, dx + i0, n, k, r[ch], h[ch], a[ch], kk[ch], cc[ch]);
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
