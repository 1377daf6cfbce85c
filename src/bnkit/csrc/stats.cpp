// Batch statistics per channel (see kernels.h). Every sum runs in float64 over 8
// independent lanes: a fixed summation order the compiler can keep in SIMD registers
// without reassociating anything (the result does not depend on the build's flags).
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

template <class T>
double sum_of(const T* __restrict__ x, I n) {
  double acc[LANES] = {0};
  I i = 0;
#ifdef BNKIT_VECTOR_EXT
  V8 a = splat8(0);
  for (; i + LANES <= n; i += LANES) a += load8(x + i);
  store8(a, acc);
#else
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += static_cast<double>(x[i + l]);
#endif
  double s = 0;
  for (; i < n; ++i) s += static_cast<double>(x[i]);
  for (int l = 0; l < LANES; ++l) s += acc[l];
  return s;
}

// (sum (x - m)^2, sum (x - m)): the second corrects a rounded mean.
template <class T>
void sqdev(const T* __restrict__ x, I n, double m, double& q, double& r) {
  double aq[LANES] = {0}, ar[LANES] = {0};
  I i = 0;
#ifdef BNKIT_VECTOR_EXT
  const V8 mv = splat8(m);
  V8 q8 = splat8(0), r8 = splat8(0);
  for (; i + LANES <= n; i += LANES) {
    const V8 d = load8(x + i) - mv;
    q8 += d * d;
    r8 += d;
  }
  store8(q8, aq);
  store8(r8, ar);
#else
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) {
      const double d = static_cast<double>(x[i + l]) - m;
      aq[l] += d * d;
      ar[l] += d;
    }
#endif
  double sq = 0, sr = 0;
  for (; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - m;
    sq += d * d;
    sr += d;
  }
  for (int l = 0; l < LANES; ++l) {
    sq += aq[l];
    sr += ar[l];
  }
  q += sq;
  r += sr;
}

// (mean, M2) of a chunk from its rounded mean m, q = sum (x - m)^2, r = sum (x - m):
// mean = m + r/n, M2 = q - r^2/n (corrected two-pass; exact for constant data).
inline void corrected(double m, double q, double r, double n, double& mean, double& m2) {
  if (n == 0) {
    mean = 0;
    m2 = 0;
    return;
  }
  mean = m + r / n;
  m2 = std::max(q - r * r / n, 0.0);
}

// Chan's P-way merge per channel, deviations from the final mean; part (c, j) of the
// (count, mean, M2) arrays at c*cs + j*js.
void merge(const double* pn, const double* pm, const double* pq, I C, I P, I cs, I js,
           double* mean, double* var) {
  for (I c = 0; c < C; ++c) {
    double n = 0, s = 0;
    const double m0 = pm[c * cs];
    for (I j = 0; j < P; ++j) {  // shifted by chunk 0's mean: equal means merge exactly
      n += pn[c * cs + j * js];
      s += pn[c * cs + j * js] * (pm[c * cs + j * js] - m0);
    }
    const double nn = std::max(n, 1.0);
    const double mu = m0 + s / nn;
    double m2 = 0;
    for (I j = 0; j < P; ++j) {
      const double d = pm[c * cs + j * js] - mu;
      m2 += pq[c * cs + j * js] + pn[c * cs + j * js] * d * d;
    }
    mean[c] = mu;
    var[c] = m2 / nn;
  }
}

// (n, mean, M2) += a part's (nb, mb, m2b): Chan's pairwise merge.
inline void chan_add(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double nn = n + nb, d = mb - mean;
  mean += d * (nb / nn);
  m2 += m2b + d * d * (n * nb / nn);
  n = nn;
}

// (n, mean, M2) of rows [o0, o1), values [s0, s1) of channel c. float: one pass per group of
// at most SHIFT_ROWS values (whole row slices, or pieces of a longer one), deviations from
// the group's first value, groups joined by Chan's merge: the bound of cl_shifted below
// holds per group. double: two passes over the chunk (the second from L2).
// merge() for chunks of rows of (M, C): chunk j's count pn[j] is every channel's, its
// (mean, M2) at j*C + c. The same arithmetic, in the same order per channel, with the
// chunks in the outer loops so that the channels run along memory.
void merge_rows(const double* pn, const double* pm, const double* pq, I C, I P, double* mean,
                double* var) {
  double n = 0;
  for (I j = 0; j < P; ++j) n += pn[j];
  const double nn = std::max(n, 1.0);
  std::vector<double> s(C, 0.0), m2(C, 0.0);
  for (I j = 0; j < P; ++j)  // shifted by chunk 0's mean: equal means merge exactly
    for (I c = 0; c < C; ++c) s[c] += pn[j] * (pm[j * C + c] - pm[c]);
  for (I c = 0; c < C; ++c) mean[c] = pm[c] + s[c] / nn;
  for (I j = 0; j < P; ++j)
    for (I c = 0; c < C; ++c) {
      const double d = pm[j * C + c] - mean[c];
      m2[c] += pq[j * C + c] + pn[j] * d * d;
    }
  for (I c = 0; c < C; ++c) var[c] = m2[c] / nn;
}

template <class T>
void cf_chunk(const T* x, const View& v, I c, I o0, I o1, I s0, I s1, double& n, double& mean,
              double& m2) {
  const I len = s1 - s0;
  auto at = [&](I o, I s) { return x + (o * v.C + c) * v.inner + s; };
  n = 0;
  mean = 0;
  m2 = 0;
  if (sizeof(T) == 8) {
    n = static_cast<double>((o1 - o0) * len);
    double s = 0;
    for (I o = o0; o < o1; ++o) s += sum_of(at(o, s0), len);
    const double m = s / std::max(n, 1.0);
    double q = 0, r = 0;
    for (I o = o0; o < o1; ++o) sqdev(at(o, s0), len, m, q, r);
    corrected(m, q, r, n, mean, m2);
    return;
  }
  const I rows = std::max<I>(1, SHIFT_ROWS / std::max<I>(len, 1));  // whole rows per group
  const I piece = std::min(len, SHIFT_ROWS);                         // or pieces of one row
  for (I g0 = o0; g0 < o1; g0 += rows) {
    const I g1 = std::min(o1, g0 + rows);
    for (I p0 = s0; p0 < s1; p0 += piece) {
      const I p1 = std::min(s1, p0 + piece);
      const double shift = static_cast<double>(*at(g0, p0));
      double q = 0, r = 0;
      for (I o = g0; o < g1; ++o) sqdev(at(o, p0), p1 - p0, shift, q, r);
      double gm, g2;
      const double k = static_cast<double>((g1 - g0) * (p1 - p0));
      corrected(shift, q, r, k, gm, g2);
      chan_add(n, mean, m2, k, gm, g2);
    }
  }
}

template <class T>
void cf_stats(const T* x, const View& v, I threads, double* mean, double* var) {
  const Split sp = cf_split(v, threads);
  const I P = ceil_div(v.outer, sp.rows) * sp.pieces;
  std::vector<double> pn(v.C * P), pm(v.C * P), pq(v.C * P);
  run_tasks(v.C * P, threads, [&](I t) {
    const I c = t / P, j = t % P;
    const I o0 = (j / sp.pieces) * sp.rows, o1 = std::min(v.outer, o0 + sp.rows);
    const I s0 = (j % sp.pieces) * sp.width, s1 = std::min(v.inner, s0 + sp.width);
    cf_chunk(x, v, c, o0, o1, s0, s1, pn[t], pm[t], pq[t]);
  });
  merge(pn.data(), pm.data(), pq.data(), v.C, P, P, 1, mean, var);
}

// The channels-last chunk loops below take the rows in tiles of TILE_ROWS (a few KiB,
// read in memory order, which the prefetchers follow) and, within a tile, blocks of 8
// channels held in registers (V8) down the tile's rows, then the remaining channels one at
// a time. Each channel still adds its rows in order, as a plain row-by-row loop would,
// while its running sums are loaded and stored once per tile instead of once per value.
constexpr I TILE_ROWS = 16;

// One pass over rows [m0, m1) of (M, C): float64 sums of d = x - x[m0] (the chunk's first
// row), mean = x[m0] + s/n, M2 = q - s^2/n. The shift is a value of the chunk, so
// (shift - mean)^2 <= M2 and the cancellation costs at most ~n^2 float64 ulps of M2: below
// 2e-9 relative for n <= SHIFT_ROWS, far under float32's resolution (float input only).
template <class T>
void cl_shifted(const T* __restrict__ x, I m0, I m1, I C, double* __restrict__ mean,
                double* __restrict__ m2) {
  std::vector<double> sv(C, 0.0);
  double* __restrict__ s = sv.data();
  double* __restrict__ q = m2;
  for (I c = 0; c < C; ++c) {
    mean[c] = static_cast<double>(x[m0 * C + c]);  // the shift, until the end
    q[c] = 0;
  }
  for (I t0 = m0 + 1; t0 < m1; t0 += TILE_ROWS) {
    const I t1 = std::min(m1, t0 + TILE_ROWS);
    I c = 0;
#ifdef BNKIT_VECTOR_EXT
    for (; c + LANES <= C; c += LANES) {
      const V8 x0 = load8(mean + c);
      V8 sa = load8(s + c), qa = load8(q + c);
      for (I m = t0; m < t1; ++m) {
        const V8 d = load8(x + m * C + c) - x0;
        sa += d;
        qa += d * d;
      }
      store8(sa, s + c);
      store8(qa, q + c);
    }
#endif
    for (; c < C; ++c) {
      double sc = s[c], qc = q[c];
      for (I m = t0; m < t1; ++m) {
        const double d = static_cast<double>(x[m * C + c]) - mean[c];
        sc += d;
        qc += d * d;
      }
      s[c] = sc;
      q[c] = qc;
    }
  }
  for (I c = 0; c < C; ++c) corrected(mean[c], q[c], s[c], m1 - m0, mean[c], m2[c]);
}

// Two passes over rows [m0, m1) of (M, C) (the second reads the chunk from L2), blocks of
// 8 channels down all the chunk's rows.
template <class T>
void cl_two_pass(const T* __restrict__ x, I m0, I m1, I C, double* __restrict__ mean,
                 double* __restrict__ m2) {
  const double n = static_cast<double>(m1 - m0);
  I c = 0;
#ifdef BNKIT_VECTOR_EXT
  for (; c + LANES <= C; c += LANES) {
    V8 s = splat8(0);
    for (I m = m0; m < m1; ++m) s += load8(x + m * C + c);
    double mu[LANES];
    store8(s, mu);
    for (int l = 0; l < LANES; ++l) mu[l] /= n;
    const V8 mv = load8(mu);
    V8 q = splat8(0), r = splat8(0);
    for (I m = m0; m < m1; ++m) {
      const V8 d = load8(x + m * C + c) - mv;
      q += d * d;
      r += d;
    }
    double qs[LANES], rs[LANES];
    store8(q, qs);
    store8(r, rs);
    for (int l = 0; l < LANES; ++l) corrected(mu[l], qs[l], rs[l], n, mean[c + l], m2[c + l]);
  }
#endif
  for (; c < C; ++c) {
    double mu = 0;
    for (I m = m0; m < m1; ++m) mu += static_cast<double>(x[m * C + c]);
    mu /= n;
    double q = 0, r = 0;
    for (I m = m0; m < m1; ++m) {
      const double d = static_cast<double>(x[m * C + c]) - mu;
      q += d * d;
      r += d;
    }
    corrected(mu, q, r, n, mean[c], m2[c]);
  }
}

template <class T>
void cl_stats(const T* x, const View& v, I threads, double* mean, double* var) {
  const I M = v.outer, C = v.C;
  const I rows = cl_rows(M, C, threads);
  const I P = ceil_div(M, rows);
  std::vector<double> pn(P), pm(P * C, 0.0), pq(P * C, 0.0);
  run_tasks(P, threads, [&](I j) {
    const I m0 = j * rows, m1 = std::min(M, m0 + rows);
    if (sizeof(T) == 4)
      cl_shifted(x, m0, m1, C, &pm[j * C], &pq[j * C]);
    else
      cl_two_pass(x, m0, m1, C, &pm[j * C], &pq[j * C]);
    pn[j] = static_cast<double>(m1 - m0);
  });
  merge_rows(pn.data(), pm.data(), pq.data(), C, P, mean, var);
}

}  // namespace

template <class T>
void batch_stats(const T* x, const View& v, I threads, double* mean, double* var) {
  if (v.inner == 1)
    cl_stats(x, v, threads, mean, var);
  else
    cf_stats(x, v, threads, mean, var);
}

template void batch_stats<float>(const float*, const View&, I, double*, double*);
template void batch_stats<double>(const double*, const View&, I, double*, double*);

}  // namespace bnkit
