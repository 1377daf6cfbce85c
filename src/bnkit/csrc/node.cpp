// bnkit_cpu::bn: an eager BN layer call as one C++ autograd node over the one-call forward
// and backward (ops.h), with no Python autograd frames.
//
// Python validates every call first (bnkit.functional.checks) and routes here only eager
// calls with the identity or relu activation, no mask, on a dense float32/float64 CPU
// input; `takes` below declines (returns undefined tensors, touching nothing) what the
// kernels cannot run in place (parameters or buffers of another dtype or device, inference
// or non-contiguous buffers, buffers that require grad), and the Python path runs those.
// The forward leaves a channel's running statistics unchanged when its batch statistics
// are not finite; the op then returns the statistics (mean | var) so Python can warn.
// Double backward (create_graph=True) calls the Python op bnkit::bn_backward_graph: the
// differentiable reference formulas (bnkit.functional.autograd).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>

#include "ops.h"

namespace bnkit {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool has(const OptT& t) { return t.has_value() && t->defined(); }

// One entry per forward argument (12): gradients for x, weight, bias; none for the rest.
variable_list grads_of(Tensor dx, Tensor dw, Tensor db) {
  variable_list out(12);
  out[0] = std::move(dx);
  out[1] = std::move(dw);
  out[2] = std::move(db);
  return out;
}

thread_local Tensor g_nonfinite;  // the last forward's mean | var when it skipped channels

struct BN : public torch::autograd::Function<BN> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const OptT& w, const OptT& b,
                        const OptT& rm, const OptT& rv, bool training,
                        double eps, double momentum, bool update, bool relu, int64_t axis) {
    Forward f = bnkit::forward(x, w, b, rm, rv, training, eps, axis, relu,
                               update ? std::optional<double>(momentum) : std::nullopt);
    Tensor mv;  // mean | var (2C,) float64: saved for the backward, or returned to warn
    if (ctx != nullptr || f.skipped > 0) {
      mv = at::empty({static_cast<int64_t>(f.stats.size())}, x.options().dtype(at::kDouble));
      std::copy(f.stats.begin(), f.stats.end(), mv.data_ptr<double>());
    }
    if (f.skipped > 0) g_nonfinite = mv;
    if (ctx == nullptr) return f.y;  // no graph to record (see bn)
    ctx->save_for_backward({x, w.value_or(Tensor()), b.value_or(Tensor()), mv});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["axis"] = axis;
    return f.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &b = saved[2], &mv = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool training = ctx->saved_data["training"].toBool();
    const bool relu = ctx->saved_data["relu"].toBool();
    const int64_t axis = ctx->saved_data["axis"].toInt();
    const int64_t C = x.size(axis);
    const Tensor& dy = grads[0];
    if (at::GradMode::is_enabled()) {  // create_graph: the differentiable formulas
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("bnkit::bn_backward_graph", "")
                           .typed<std::vector<Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                      const Tensor&, const Tensor&, bool, double,
                                                      int64_t, bool)>();
      auto g = op.call(dy, x, w, b, mv, training, eps, axis, relu);
      return grads_of(g[0], w.defined() ? g[1] : Tensor(), b.defined() ? g[2] : Tensor());
    }
    const double* stats = mv.const_data_ptr<double>();
    auto [dx, dw, db] = bnkit::backward(dy, x, w, b, stats, stats + C,
                                        static_cast<double>(x.numel() / C), training, eps, axis,
                                        relu);
    return grads_of(dx, w.defined() ? dw : Tensor(), b.defined() ? db : Tensor());
  }
};

// A (C,) vector the kernels read (or blend) in place: absent, or CPU, `dt`, dense.
bool vector_ok(const OptT& t, at::ScalarType dt, int64_t C) {
  return !has(t) || (t->device().is_cpu() && t->scalar_type() == dt && t->dim() == 1 &&
                     t->size(0) == C && t->is_contiguous());
}

bool takes(const Tensor& x, const OptT& w, const OptT& b, const OptT& rm, const OptT& rv,
           bool training, bool update, int64_t axis) {
  if (!x.device().is_cpu() || x.numel() == 0 || axis < 0 || axis >= x.dim()) return false;
  const auto dt = x.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble) return false;
  const bool dense =
      x.is_contiguous() ||
      (axis == 1 && ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                     (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))));
  if (!dense) return false;
  const int64_t C = x.size(axis);
  if (!vector_ok(w, dt, C) || !vector_ok(b, dt, C) || !vector_ok(rm, dt, C) ||
      !vector_ok(rv, dt, C) || has(rm) != has(rv))
    return false;
  if (!training && !has(rm)) return false;
  if (update != (training && has(rm))) return false;
  if (update && (rm->is_inference() || rv->is_inference())) return false;
  return !(has(rm) && (rm->requires_grad() || rv->requires_grad()));
}

// -> (y, stats): stats is mean | var (2C,) when some channels' batch statistics were not
// finite (their running statistics were left as they were), else undefined;
// (undefined, undefined) when the node declines the call.
std::tuple<Tensor, Tensor> bn(const Tensor& x, const OptT& w, const OptT& b, const OptT& rm,
                              const OptT& rv, bool training, double eps,
                              double momentum, bool update, bool relu, int64_t axis) {
  if (!takes(x, w, b, rm, rv, training, update, axis)) return {Tensor(), Tensor()};
  // Autograd records a node only in grad mode with an input that requires grad; otherwise
  // (inference, no_grad, eval) the forward runs alone, without the Function's bookkeeping.
  const bool graph = at::GradMode::is_enabled() &&
                     (x.requires_grad() || (has(w) && w->requires_grad()) ||
                      (has(b) && b->requires_grad()));
  Tensor y = graph ? BN::apply(x, w, b, rm, rv, training, eps, momentum, update, relu, axis)
                   : BN::forward(nullptr, x, w, b, rm, rv, training, eps, momentum, update,
                                 relu, axis);
  return {y, std::exchange(g_nonfinite, Tensor())};
}

}  // namespace
}  // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit_cpu, m) {
  m.def("bn(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float eps, float momentum, bool update, bool relu, "
        "int axis) -> (Tensor, Tensor)",
        &bnkit::bn);
}
