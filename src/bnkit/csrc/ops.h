// The tensor-level operations of bnkit._C over the kernels (ops.cpp), shared by the op
// registrations (ops.cpp) and the eager autograd node (node.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "layout.h"

namespace bnkit {

using at::Tensor;
using OptT = std::optional<Tensor>;

// x's (outer, C, inner) view along `axis` (dense float32/float64 CPU only: checked).
View layout_of(const Tensor& x, I axis);

struct Forward {
  Tensor y;
  std::vector<double> stats;  // mean (C) then var (C), float64: batch or running statistics
  I skipped;                  // channels whose running statistics the blend left unchanged
};

// The whole forward: statistics (training) or the running buffers (eval), the affine
// coefficients with invstd = 1/sqrt(var + eps), y = act(...) with act relu or identity,
// and with a momentum (training) the running buffers blended in place. No tensor is made
// but y: the per-channel vectors are read and computed as plain float64 arrays.
Forward forward(const Tensor& x, const OptT& w, const OptT& b, const OptT& rm, const OptT& rv,
                bool training, double eps, I axis, bool relu, std::optional<double> momentum);

// The whole backward of the identity or relu activation: -> (dx, dweight, dbias) with
// dweight/dbias in the parameters' dtype (x's without a weight). mean, var: the forward's
// statistics, (C,) float64 each.
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x, const OptT& w,
                                            const OptT& b, const double* mean, const double* var,
                                            double count, bool training, double eps, I axis,
                                            bool relu);

}  // namespace bnkit
