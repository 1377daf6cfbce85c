// The backward passes (see kernels.h): the per-channel sums, relu's derivative and the
// elementwise dx. Sums run in float64 over 8 independent lanes (a fixed order).
#include <algorithm>
#include <vector>

#include "kernels.h"

#ifdef BNKIT_AVX2  // setup.py: the build machine has AVX2 (module.cpp checks the CPU)
#pragma GCC target("avx2")
#endif
#include "simd.h"   // after the target: its vectors are AVX2 ones there
#include "tasks.h"  // likewise: its loops inline the kernels' lambdas

namespace bnkit {
namespace {

constexpr int LANES = 8;
constexpr I BLOCK_BYTES = 512 << 10;  // dy + x of a fused backward task: stays in L2

// relu's gate: the forward's affine coefficients per channel (m null: no gate, dy as is).
template <class T>
struct Gate {
  const T *m, *a, *h;
};

// dz = dy relu'(z), z = (x - gm) * ga + gh recomputed in T (relu'(z) = 1 or 0 as T).
template <class T>
inline T gated(T g, T x, T gm, T ga, T gh) {
  return g * ((x - gm) * ga + gh > T(0) ? T(1) : T(0));
}

// s += sum g, q += sum g (x - m) over n values of one channel, g = dy or its gated form.
template <class T, bool GATE>
void row_sums(const T* __restrict__ dy, const T* __restrict__ x, I n, double m, T gm, T ga, T gh,
              double& s, double& q) {
  double as[LANES] = {0}, aq[LANES] = {0};
  I i = 0;
#ifdef BNKIT_VECTOR_EXT
  const V8 mv = splat8(m);
  V8 s8 = splat8(0), q8 = splat8(0);
  for (; i + LANES <= n; i += LANES) {
    T gb[LANES];
    const T* g = dy + i;
    if (GATE) {
      for (int l = 0; l < LANES; ++l) gb[l] = gated(dy[i + l], x[i + l], gm, ga, gh);
      g = gb;
    }
    const V8 g8 = load8(g);
    s8 += g8;
    q8 += g8 * (load8(x + i) - mv);
  }
  store8(s8, as);
  store8(q8, aq);
#else
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) {
      const T gt = GATE ? gated(dy[i + l], x[i + l], gm, ga, gh) : dy[i + l];
      const double g = static_cast<double>(gt);
      as[l] += g;
      aq[l] += g * (static_cast<double>(x[i + l]) - m);
    }
#endif
  double ss = 0, sq = 0;
  for (; i < n; ++i) {
    const T gt = GATE ? gated(dy[i], x[i], gm, ga, gh) : dy[i];
    const double g = static_cast<double>(gt);
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

// The sums of channel c over rows [o0, o1) and values [s0, s1) of each row.
template <class T>
void channel_sums(const T* dy, const T* x, const View& v, I c, I o0, I o1, I s0, I s1,
                  const double* mean, const Gate<T>& gate, double& s, double& q) {
  for (I o = o0; o < o1; ++o) {
    const I i0 = (o * v.C + c) * v.inner + s0;
    if (gate.m)
      row_sums<T, true>(dy + i0, x + i0, s1 - s0, mean[c], gate.m[c], gate.a[c], gate.h[c], s, q);
    else
      row_sums<T, false>(dy + i0, x + i0, s1 - s0, mean[c], T(0), T(0), T(0), s, q);
  }
}

template <class T>
void cf_sums(const T* dy, const T* x, const View& v, I threads, const double* mean,
             const Gate<T>& gate, double* sum_dy, double* sum_dy_xmu) {
  cf_channel_sums(
      v, threads,
      [&](I c, I o0, I o1, I s0, I s1, double& s, double& q) {
        channel_sums(dy, x, v, c, o0, o1, s0, s1, mean, gate, s, q);
      },
      sum_dy, sum_dy_xmu);
}

// The sums of rows [m0, m1) of (M, C) into s, q (zeroed here): rows in tiles of TILE_ROWS
// read in memory order and, within a tile, blocks of 8 channels held in registers (V8),
// then the remaining channels one at a time. Each channel adds its rows in order, as a
// plain row-by-row loop would, loading and storing its sums once per tile.
constexpr I TILE_ROWS = 16;

template <class T, bool GATE>
void cl_chunk_sums(const T* __restrict__ dy, const T* __restrict__ x, I m0, I m1, I C,
                   const double* __restrict__ mean, const Gate<T>& gate, double* __restrict__ s,
                   double* __restrict__ q) {
  std::fill(s, s + C, 0.0);
  std::fill(q, q + C, 0.0);
  for (I t0 = m0; t0 < m1; t0 += TILE_ROWS) {
    const I t1 = std::min(m1, t0 + TILE_ROWS);
    I c = 0;
#ifdef BNKIT_VECTOR_EXT
    for (; c + LANES <= C; c += LANES) {
      const V8 mv = load8(mean + c);
      V8 s8 = load8(s + c), q8 = load8(q + c);
      for (I m = t0; m < t1; ++m) {
        const T* g = dy + m * C + c;
        T gb[LANES];
        if (GATE) {
          for (int l = 0; l < LANES; ++l)
            gb[l] = gated(g[l], x[m * C + c + l], gate.m[c + l], gate.a[c + l], gate.h[c + l]);
          g = gb;
        }
        const V8 g8 = load8(g);
        s8 += g8;
        q8 += g8 * (load8(x + m * C + c) - mv);
      }
      store8(s8, s + c);
      store8(q8, q + c);
    }
#endif
    for (; c < C; ++c) {
      double sc = s[c], qc = q[c];
      for (I m = t0; m < t1; ++m) {
        const T gt = GATE ? gated(dy[m * C + c], x[m * C + c], gate.m[c], gate.a[c], gate.h[c])
                          : dy[m * C + c];
        const double g = static_cast<double>(gt);
        sc += g;
        qc += g * (static_cast<double>(x[m * C + c]) - mean[c]);
      }
      s[c] = sc;
      q[c] = qc;
    }
  }
}

template <class T>
void cl_sums(const T* dy, const T* x, const View& v, I threads, const double* mean,
             const Gate<T>& gate, double* sum_dy, double* sum_dy_xmu) {
  const I M = v.outer, C = v.C;
  const I rows = cl_rows(M, C, threads);
  const I P = ceil_div(M, rows);
  std::vector<double> ps(P * C), pq(P * C);
  run_tasks(P, threads, [&](I j) {
    const I m0 = j * rows, m1 = std::min(M, m0 + rows);
    if (gate.m)
      cl_chunk_sums<T, true>(dy, x, m0, m1, C, mean, gate, &ps[j * C], &pq[j * C]);
    else
      cl_chunk_sums<T, false>(dy, x, m0, m1, C, mean, gate, &ps[j * C], &pq[j * C]);
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

// dx over n values of one channel: (cc + (x - m) k) + g a (training) or g a (eval), g = dy
// or its gated form.
template <class T, bool GATE>
inline void elemt_run(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, I n,
                      T m, T a, T k, T cc, bool training, T gm, T ga, T gh) {
  if (training)
    for (I j = 0; j < n; ++j) {
      const T g = GATE ? gated(dy[j], x[j], gm, ga, gh) : dy[j];
      dx[j] = (cc + (x[j] - m) * k) + g * a;
    }
  else
    for (I j = 0; j < n; ++j) {
      const T g = GATE ? gated(dy[j], x[j], gm, ga, gh) : dy[j];
      dx[j] = g * a;
    }
}

// The same over a channels-last row (value j belongs to channel j).
template <class T, bool GATE>
inline void elemt_cl_row(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                         I C, const T* __restrict__ m, const T* __restrict__ a,
                         const T* __restrict__ k, const T* __restrict__ cc, bool training,
                         const Gate<T>& gate) {
  if (training)
    for (I j = 0; j < C; ++j) {
      const T g = GATE ? gated(dy[j], x[j], gate.m[j], gate.a[j], gate.h[j]) : dy[j];
      dx[j] = (cc[j] + (x[j] - m[j]) * k[j]) + g * a[j];
    }
  else
    for (I j = 0; j < C; ++j) {
      const T g = GATE ? gated(dy[j], x[j], gate.m[j], gate.a[j], gate.h[j]) : dy[j];
      dx[j] = g * a[j];
    }
}

template <class T, bool GATE>
void elemt(const T* dy, const T* x, T* dx, const View& v, I threads, const T* mh, const T* a,
           const T* k, const T* c, bool training, const Gate<T>& gate) {
  each_run(v, threads, [&](I i0, I n, I ch) {
    if (ch < 0) {
      elemt_cl_row<T, GATE>(dy + i0, x + i0, dx + i0, n, mh, a, k, c, training, gate);
    } else {
      const T gm = GATE ? gate.m[ch] : T(0), ga = GATE ? gate.a[ch] : T(0),
              gh = GATE ? gate.h[ch] : T(0);
      elemt_run<T, GATE>(dy + i0, x + i0, dx + i0, n, mh[ch], a[ch], k[ch], c[ch], training, gm,
                         ga, gh);
    }
  });
}

}  // namespace

template <class T>
void dy_sums(const T* dy, const T* x, const View& v, I threads, const double* mean, const T* gmh,
             const T* gsc, const T* gsh, double* sum_dy, double* sum_dy_xmu) {
  const Gate<T> gate{gmh, gsc, gsh};
  if (v.inner == 1)
    cl_sums(dy, x, v, threads, mean, gate, sum_dy, sum_dy_xmu);
  else
    cf_sums(dy, x, v, threads, mean, gate, sum_dy, sum_dy_xmu);
}

template <class T>
void relu_grad(const T* dy, const T* x, T* dz, const View& v, I threads, const T* mh,
               const T* sc, const T* sh) {
  each_run(v, threads, [&](I i0, I n, I c) {  // c < 0: a channels-last row
    for (I k = 0; k < n; ++k) {
      const I ch = c < 0 ? k : c;
      dz[i0 + k] = gated(dy[i0 + k], x[i0 + k], mh[ch], sc[ch], sh[ch]);
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
                    const T* a, const T* k, const T* c, bool training, const T* gmh,
                    const T* gsc, const T* gsh) {
  const Gate<T> gate{gmh, gsc, gsh};
  if (gmh)
    elemt<T, true>(dy, x, dx, v, threads, mh, a, k, c, training, gate);
  else
    elemt<T, false>(dy, x, dx, v, threads, mh, a, k, c, training, gate);
}

template <class T>
void fused_backward(const T* dy, const T* x, T* dx, const View& v, I threads, const double* mean,
                    const double* invstd, const double* w, double n, const T* gmh,
                    const T* gsc, const T* gsh, double* sum_dy, double* sum_dy_xmu) {
  // Tasks of kb consecutive channels: row o of the block is one contiguous run of
  // kb * inner values, so short rows (small images) stream in memory order instead of
  // jumping a whole (C, inner) plane per row; the block's dy and x (about BLOCK_BYTES) stay
  // in cache for the second pass. Each channel's sums add its rows in order, as before.
  const I per_channel = 2 * v.outer * v.inner * static_cast<I>(sizeof(T));
  const I balanced = std::max<I>(1, v.C / (4 * threads));  // >= 4 tasks per thread
  const I kb = std::max<I>(1, std::min(balanced, BLOCK_BYTES / per_channel));
  run_tasks(ceil_div(v.C, kb), threads, [&](I t) {
    const I c0 = t * kb, c1 = std::min(v.C, c0 + kb), k = c1 - c0;
    std::vector<double> s(k, 0.0), q(k, 0.0);
    std::vector<T> mh(k), a(k), kc(k), cc(k);
    for (I o = 0; o < v.outer; ++o)
      for (I c = c0; c < c1; ++c) {
        const I i0 = (o * v.C + c) * v.inner;
        if (gmh)
          row_sums<T, true>(dy + i0, x + i0, v.inner, mean[c], gmh[c], gsc[c], gsh[c], s[c - c0],
                            q[c - c0]);
        else
          row_sums<T, false>(dy + i0, x + i0, v.inner, mean[c], T(0), T(0), T(0), s[c - c0],
                             q[c - c0]);
      }
    for (I c = c0; c < c1; ++c) {
      const I j = c - c0;
      sum_dy[c] = s[j];
      sum_dy_xmu[c] = q[j];
      elemt_coeffs(mean + c, invstd + c, w ? w + c : nullptr, &s[j], &q[j], n, true, 1, &mh[j],
                   &a[j], &kc[j], &cc[j]);
    }
    for (I o = 0; o < v.outer; ++o)
      for (I c = c0; c < c1; ++c) {
        const I i0 = (o * v.C + c) * v.inner, j = c - c0;
        if (gmh)
          elemt_run<T, true>(dy + i0, x + i0, dx + i0, v.inner, mh[j], a[j], kc[j], cc[j], true,
                             gmh[c], gsc[c], gsh[c]);
        else
          elemt_run<T, false>(dy + i0, x + i0, dx + i0, v.inner, mh[j], a[j], kc[j], cc[j], true,
                              T(0), T(0), T(0));
      }
  });
}

#define BNKIT_INSTANTIATE(T)                                                                    \
  template void dy_sums<T>(const T*, const T*, const View&, I, const double*, const T*, const T*, \
                           const T*, double*, double*);                                         \
  template void relu_grad<T>(const T*, const T*, T*, const View&, I, const T*, const T*,       \
                             const T*);                                                         \
  template void elemt_coeffs<T>(const double*, const double*, const double*, const double*,     \
                                const double*, double, bool, I, T*, T*, T*, T*);                \
  template void backward_elemt<T>(const T*, const T*, T*, const View&, I, const T*, const T*,  \
                                  const T*, const T*, bool, const T*, const T*, const T*);      \
  template void fused_backward<T>(const T*, const T*, T*, const View&, I, const double*,       \
                                  const double*, const double*, double, const T*, const T*,    \
                                  const T*, double*, double*);
BNKIT_INSTANTIATE(float)
BNKIT_INSTANTIATE(double)
#undef BNKIT_INSTANTIATE

}  // namespace bnkit
