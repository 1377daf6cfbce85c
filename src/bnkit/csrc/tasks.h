// The task runner of the kernels: run_tasks, each_run and cf_channel_sums. Each kernel file includes this
// after its target pragma (like simd.h), so these loops compile for the kernels' target
// (AVX2) and inline the kernels' lambdas: a call per run of a short row (a 4x4 image)
// would cost as much as its arithmetic.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "layout.h"

namespace bnkit {

// Runs f(i) for i in [0, n): across torch's threads when `threads` > 1, else inline.
template <class F>
inline void run_tasks(I n, I threads, const F& f) {
  if (threads > 1 && n > 1) {
    at::parallel_for(0, n, 1, [&](I b, I e) {
      for (I i = b; i < e; ++i) f(i);
    });
  } else {
    for (I i = 0; i < n; ++i) f(i);
  }
}

// The elementwise work of a view, in tasks of about BLOCK values across `threads`: calls
// f(offset, n, c) for each run of n values of channel c at x + offset. Channels-first: a
// row of `inner` values (or a slice of one longer than BLOCK); channels-last (inner == 1):
// a whole row of C values, one per channel, with c = -1.
template <class F>
inline void each_run(const View& v, I threads, const F& f) {
  if (v.inner == 1) {
    const I rows = rows_per_task(v.outer, v.C, threads);
    run_tasks(ceil_div(v.outer, rows), threads, [&](I t) {
      const I m1 = std::min(v.outer, (t + 1) * rows);
      for (I m = t * rows; m < m1; ++m) f(m * v.C, v.C, I(-1));
    });
    return;
  }
  const I nrows = v.outer * v.C;
  const RowSplit rs = row_split(nrows, v.inner, threads);
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

// Two per-channel sums (s, q) of a channels-first view, split into tasks (cf_split):
// f(c, o0, o1, s0, s1, s, q) adds channel c's values of rows [o0, o1) and columns [s0, s1)
// to s and q; each channel's task shares are then added in task order (a fixed order,
// whatever the thread count's timing).
template <class F>
inline void cf_channel_sums(const View& v, I threads, const F& f, double* out_s,
                            double* out_q) {
  const Split sp = cf_split(v, threads);
  const I P = ceil_div(v.outer, sp.rows) * sp.pieces;
  std::vector<double> ps(v.C * P), pq(v.C * P);
  run_tasks(v.C * P, threads, [&](I t) {
    const I c = t / P, j = t % P;
    const I o0 = (j / sp.pieces) * sp.rows, o1 = std::min(v.outer, o0 + sp.rows);
    const I s0 = (j % sp.pieces) * sp.width, s1 = std::min(v.inner, s0 + sp.width);
    double s = 0, q = 0;
    f(c, o0, o1, s0, s1, s, q);
    ps[t] = s;
    pq[t] = q;
  });
  for (I c = 0; c < v.C; ++c) {
    double s = 0, q = 0;
    for (I j = 0; j < P; ++j) {
      s += ps[c * P + j];
      q += pq[c * P + j];
    }
    out_s[c] = s;
    out_q[c] = q;
  }
}

}  // namespace bnkit
