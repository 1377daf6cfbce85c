// The (outer, C, inner) view of a dense input and the work splits of the kernels (their
// task runner is tasks.h). Shared by every kernel file; header-only and free of ATen's
// tensor headers so the kernel files compile fast.
//
// A dense input is seen as (outer, C, inner) around its channel axis: element (o, c, s) at
// (o*C + c)*inner + s. inner == 1 ("channels-last", e.g. (N, C), NHWC) is the (M, C) view
// with M = outer. Python's bnkit.kernels.cpu_layout.resolve says which inputs qualify; the
// ops re-check it (layout_of in ops.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace bnkit {

using I = int64_t;

constexpr I CHUNK = 65536;         // values per reduction chunk (256 KiB of float32: L2)
constexpr I BLOCK = 65536;         // values per elementwise task
constexpr I SHIFT_ROWS = 4096;     // values of a channel per one-pass shift: bounds its error
constexpr I PARALLEL_MIN = 32768;  // below this a call runs on one thread (no wake-ups)

struct View {
  I outer, C, inner;
  I numel() const { return outer * C * inner; }
};

inline I ceil_div(I a, I b) { return (a + b - 1) / b; }

// Threads a call of `numel` values uses: one below PARALLEL_MIN, else torch's count.
inline I threads_for(I numel) {
  if (numel < PARALLEL_MIN || at::in_parallel_region()) return 1;
  return std::max<I>(1, at::get_num_threads());
}

// Channels-first reduction chunks: `rows` whole rows of `inner` values, or, for rows
// longer than the target, one of `pieces` slices of `width` values. Enough chunks to
// feed every thread even for a single channel (Chan's merge joins them).
struct Split {
  I rows, pieces, width;
};

inline Split cf_split(const View& v, I threads) {
  const I per_channel = v.outer * v.inner;
  const I target = std::min(CHUNK, std::max<I>(1024, ceil_div(v.C * per_channel, 4 * threads)));
  if (v.inner >= target) {
    const I pieces = ceil_div(v.inner, target);
    return {1, pieces, ceil_div(v.inner, pieces)};
  }
  return {std::max<I>(1, target / v.inner), 1, v.inner};
}

// Channels-last reduction chunks: rows per chunk, about CHUNK values, >= 4 chunks per
// thread, at most SHIFT_ROWS.
inline I cl_rows(I m, I c, I threads) {
  return std::max<I>(1, std::min({CHUNK / std::max<I>(c, 1), SHIFT_ROWS, ceil_div(m, 4 * threads)}));
}

// Rows per elementwise task: about BLOCK values each, with a task count that is a multiple
// of `threads` (the threads split the tasks evenly: 5 tasks on 2 threads would leave one
// thread 60 % of the work).
inline I rows_per_task(I nrows, I row_len, I threads) {
  I tasks = std::max<I>(1, ceil_div(nrows * row_len, BLOCK));
  if (threads > 1) tasks = ceil_div(tasks, threads) * threads;
  return std::max<I>(1, ceil_div(nrows, tasks));
}

// Elementwise tasks over the (outer*C, inner) rows: tasks of `per` whole rows, or of
// 1/`pieces` of a row (`width` values) when a row is longer than BLOCK.
struct RowSplit {
  I per, pieces, width, tasks;
};

inline RowSplit row_split(I nrows, I inner, I threads) {
  const I per = inner >= BLOCK ? 1 : rows_per_task(nrows, inner, threads);
  const I pieces = inner >= BLOCK ? ceil_div(inner, BLOCK) : 1;
  const I width = ceil_div(inner, pieces);
  return {per, pieces, width, ceil_div(nrows, per) * pieces};
}

}  // namespace bnkit
