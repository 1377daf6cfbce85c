// bnkit_native::bn — a BN layer call as one C++ autograd node over the numba kernels.
//
// Why: a Python autograd.Function costs ~90 us more per (60, 100) layer call than torch's
// C++ node (Python forward and backward frames, ctx, GIL round trips; docs/performance.md),
// far more than the kernels themselves on such small inputs. Here the forward and the backward
// are C++ and call the numba one-call ops (`cpu_cfunc`) through C function pointers, which
// Python hands over once (`set_kernels`). Python picks the calls (identity or relu, no
// mask, eager) and computes the layout plan (dense float32 or float64 below the huge-page
// size); `accepts` below checks everything else and declines, without raising, any call
// the Python path must handle: a bad call (Python's checks then explain the error) or one
// the kernels cannot run in place (mixed dtypes, inference-mode buffers, buffers that
// require grad). The forward kernel leaves a channel's running statistics unchanged when
// its batch statistics are not finite and returns how many it left; the op then returns
// the statistics too, so Python can warn (bnkit.functional.running).
//
// plan = [outer, C, inner, par, rows, pieces, width, fuse, dtype (0 float32, 1 float64),
//         axis]: the (outer, C, inner) view of x, the parallel chunks, the backward's
// per-channel fusion, and the channel axis (for the double-backward fallback).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

namespace {

using I = int64_t;
using Fwd = I (*)(I, I, I, I, I, I, I, I, I, I, I, I, I, double, I, I, I, I, I, I, I,
                     double);
using Bwd = void (*)(I, I, I, I, I, I, I, I, I, I, I, I, I, I, double, I, I, I, I, I,
                     double, I, I, I, I, I);
I g_fwd[2] = {0, 0};
I g_bwd[2] = {0, 0};
// The forward's statistics (mean | var) when the last call on this thread left some
// channels' running statistics unchanged because their batch statistics were not finite;
// `bn` hands them to Python (which warns) and clears this.
thread_local at::Tensor g_nonfinite;

void set_kernels(at::IntArrayRef fwd, at::IntArrayRef bwd) {
  TORCH_CHECK(fwd.size() == 2 && bwd.size() == 2, "bnkit_native: 2 + 2 kernel addresses");
  for (int i = 0; i < 2; ++i) {
    g_fwd[i] = fwd[i];
    g_bwd[i] = bwd[i];
  }
}

I addr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? reinterpret_cast<I>(t->data_ptr()) : 0;
}

I addr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<I>(t.data_ptr()) : 0;
}

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One entry per forward argument (12): gradients for x, weight, bias; none for the rest.
variable_list grads_of(at::Tensor dx, at::Tensor dw, at::Tensor db) {
  variable_list out(12);
  out[0] = std::move(dx);
  out[1] = std::move(dw);
  out[2] = std::move(db);
  return out;
}

struct BN : public torch::autograd::Function<BN> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& w,
                            const c10::optional<at::Tensor>& b,
                            const c10::optional<at::Tensor>& rm,
                            const c10::optional<at::Tensor>& rv,
                            const c10::optional<at::Tensor>& counter, bool training, double eps,
                            double momentum, bool update, bool relu, at::IntArrayRef plan) {
    const I C = plan[1];
    at::Tensor y = at::empty_like(x);
    at::Tensor mv = at::empty({2 * C}, x.options().dtype(at::kDouble));  // mean | var
    const I m = addr(mv);
    const I skipped = reinterpret_cast<Fwd>(g_fwd[plan[8]])(
        addr(x), addr(y), plan[0], C, plan[2], plan[3], plan[4], plan[5], plan[6], addr(w),
        addr(b), has(w), has(b), eps, training, relu, m, m + 8 * C, addr(rm), addr(rv),
        update, momentum);
    if (skipped > 0) g_nonfinite = mv;
    if (update) {  // the buffers changed in place: tell autograd's version check
      rm->unsafeGetTensorImpl()->bump_version();
      rv->unsafeGetTensorImpl()->bump_version();
    }
    if (has(counter)) {  // the layer's num_batches_tracked (int64 scalar): one more step
      counter->data_ptr<int64_t>()[0] += 1;
      counter->unsafeGetTensorImpl()->bump_version();
    }
    ctx->save_for_backward({x, w.value_or(at::Tensor()), b.value_or(at::Tensor()), mv});
    ctx->saved_data["plan"] = plan.vec();
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &mv = saved[3];
    const auto plan = ctx->saved_data["plan"].toIntVector();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool training = ctx->saved_data["training"].toBool();
    const bool relu = ctx->saved_data["relu"].toBool();
    const I outer = plan[0], C = plan[1], inner = plan[2];
    at::Tensor dy = grads[0];
    if (at::GradMode::is_enabled()) {  // create_graph: the differentiable formulas
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("bnkit::bn_backward_graph", "")
                           .typed<std::vector<at::Tensor>(
                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, const at::Tensor&, bool, double, int64_t,
                               bool)>();
      auto g = op.call(dy, x, w, b, mv, training, eps, plan[9], relu);
      return grads_of(g[0], w.defined() ? g[1] : at::Tensor(),
                      b.defined() ? g[2] : at::Tensor());
    }
    if (dy.strides() != x.strides()) dy = at::empty_like(x).copy_(dy);  // e.g. expanded
    const bool fuse = plan[7] != 0 && training;
    at::Tensor dx = at::empty_like(x);
    at::Tensor dz = relu && !fuse ? at::empty_like(x) : at::Tensor();
    at::Tensor sums = at::empty({2 * C}, mv.options());
    const auto pdt = w.defined() ? w.scalar_type() : x.scalar_type();
    at::Tensor dwb = at::empty({2, C}, x.options().dtype(pdt));
    const I m = addr(mv), s = addr(sums), d = addr(dwb);
    const I wsz = static_cast<I>(dwb.element_size()) * C;
    reinterpret_cast<Bwd>(g_bwd[plan[8]])(
        addr(dy), addr(x), addr(dx), addr(dz), outer, C, inner, plan[3], fuse, plan[4],
        plan[5], plan[6], m, m + 8 * C, eps, addr(w), relu ? addr(b) : 0, w.defined(),
        relu && b.defined(), relu, static_cast<double>(outer * inner), training, s, s + 8 * C,
        d, d + wsz);
    return grads_of(dx, w.defined() ? dwb[0] : at::Tensor(),
                    b.defined() ? dwb[1] : at::Tensor());
  }
};

// A (C,) vector the kernels can read in place: absent, or CPU, x's dtype, dense.
bool vector_ok(const c10::optional<at::Tensor>& t, at::ScalarType dt, I C) {
  return !has(t) || (t->device().is_cpu() && t->scalar_type() == dt && t->dim() == 1 &&
                     t->size(0) == C && t->is_contiguous());
}

// Whether this op takes the call. It never raises on a bad call: it declines (the op
// returns an undefined tensor, None in Python) and Python's checks, which explain every
// error, run on the full path. So anything the core would reject or route elsewhere is
// declined here, before any state is touched.
bool accepts(const at::Tensor& x, const c10::optional<at::Tensor>& w,
             const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& rm,
             const c10::optional<at::Tensor>& rv, const c10::optional<at::Tensor>& counter,
             bool training, double eps, double momentum, bool update, at::IntArrayRef plan) {
  if (plan.size() != 10 || g_fwd[0] == 0) return false;
  const I outer = plan[0], C = plan[1], inner = plan[2];
  const auto dt = plan[8] == 0 ? at::kFloat : at::kDouble;
  if (!x.device().is_cpu() || x.scalar_type() != dt || x.numel() == 0 ||
      x.numel() != outer * C * inner || x.size(plan[9]) != C)
    return false;
  if (!vector_ok(w, dt, C) || !vector_ok(b, dt, C) || !vector_ok(rm, dt, C) ||
      !vector_ok(rv, dt, C) || has(rm) != has(rv))
    return false;
  if (training ? outer * inner < 2 : !has(rm)) return false;  // n - 1 > 0; eval reads rm
  if (update != (training && has(rm))) return false;
  if (update && (rm->is_inference() || rv->is_inference())) return false;
  if (has(rm) && (rm->requires_grad() || rv->requires_grad())) return false;
  if (has(counter) && !(counter->device().is_cpu() && counter->scalar_type() == at::kLong &&
                        counter->numel() == 1 && !counter->is_inference()))
    return false;
  return eps >= 0 && momentum >= 0 && momentum <= 1;  // false for NaN too
}

// -> (y, stats): stats is the forward's mean | var (2C,) when some channels' batch
// statistics were not finite (their running statistics were left as they were), else
// undefined; (undefined, undefined) when the op declines the call.
std::tuple<at::Tensor, at::Tensor> bn(const at::Tensor& x, const c10::optional<at::Tensor>& w,
              const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& rm,
              const c10::optional<at::Tensor>& rv, const c10::optional<at::Tensor>& counter,
              bool training, double eps, double momentum, bool update, bool relu,
              at::IntArrayRef plan) {
  if (!accepts(x, w, b, rm, rv, counter, training, eps, momentum, update, plan))
    return {at::Tensor(), at::Tensor()};
  at::Tensor y = BN::apply(x, w, b, rm, rv, counter, training, eps, momentum, update, relu, plan);
  return {y, std::exchange(g_nonfinite, at::Tensor())};
}

}  // namespace

TORCH_LIBRARY(bnkit_native, m) {
  m.def("set_kernels(int[] fwd, int[] bwd) -> ()", &set_kernels);
  m.def("bn(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
        "Tensor? running_var, Tensor? counter, bool training, float eps, float momentum, "
        "bool update, bool relu, int[] plan) -> (Tensor, Tensor)",
        &bn);
}
