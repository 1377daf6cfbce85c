// bnkit_cpu's in-place activated BN operators (bnkit.kernels.cpu's abn_* functions) over the
// kernels of inplace_abn_kernels.cpp, the statistics kernel and the running blend
// (kernels.h), with Meta kernels. Dense float32/float64 CPU tensors only (layout_of checks);
// the Python side validates every call before any of these runs.
//
//   abn_forward: statistics (the batch's, the running buffers in eval, or given ones),
//     y = f(BN(x)) written into `out` (x itself for the in-place call, else a new tensor of
//     x's layout), the running buffers blended when a momentum is given.
//   abn_backward_reduce: (sum dz, sum dz (x - mu)) from (y, dy).
//   abn_backward_elemt: dx from (y, dy) and the (all-reduced, for sync) sums.
#include <torch/library.h>

#include <string>
#include <vector>

#include "inplace_abn.h"
#include "kernels.h"
#include "ops.h"

namespace bnkit {
namespace {

AbnAct abn_act(c10::string_view name) {
  if (name == "leaky_relu") return AbnAct::leaky_relu;
  if (name == "elu") return AbnAct::elu;
  TORCH_CHECK(name == "identity", "bnkit_cpu.abn: activation must be 'leaky_relu', 'elu' or "
              "'identity', got '", std::string(name), "'");
  return AbnAct::identity;
}

// A (C,) vector as contiguous float64 (a copy unless it already is); undefined if absent.
Tensor f64(const OptT& t) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return t->scalar_type() == at::kDouble && t->is_contiguous() ? *t
                                                               : t->to(at::kDouble).contiguous();
}

const double* ptr(const Tensor& t) { return t.defined() ? t.const_data_ptr<double>() : nullptr; }

void check_like(const Tensor& t, const Tensor& x, const char* what) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() &&
                  t.scalar_type() == x.scalar_type(),
              "bnkit_cpu.abn: ", what, " must have the input's shape, strides and dtype");
}

Tensor inv_std_of(const Tensor& var, double eps) {
  Tensor invstd = at::empty_like(var);
  const double* v = var.const_data_ptr<double>();
  double* s = invstd.data_ptr<double>();
  for (I c = 0; c < var.numel(); ++c) s[c] = inv_std(v[c], eps);
  return invstd;
}

std::tuple<Tensor, Tensor, Tensor, I> abn_forward_op(
    const Tensor& x, const Tensor& out, const OptT& w, const OptT& b, const OptT& rm,
    const OptT& rv, const OptT& mean_in, const OptT& var_in, bool training, double eps, I axis,
    c10::string_view act, double p, std::optional<double> momentum) {
  const View v = layout_of(x, axis);
  check_like(out, x, "out");
  const bool given = mean_in.has_value() && mean_in->defined();
  TORCH_CHECK(!(given && momentum.has_value()),
              "bnkit_cpu.abn_forward: given statistics are not blended here");
  const I threads = threads_for(v.numel());
  auto o = x.options().dtype(at::kDouble);
  Tensor mean, var;
  if (given) {
    mean = mean_in->to(at::kDouble, false, true).contiguous();
    var = var_in->to(at::kDouble, false, true).contiguous();
  } else if (training) {
    mean = at::empty({v.C}, o);
    var = at::empty({v.C}, o);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_abn_stats", [&] {
      batch_stats(x.const_data_ptr<scalar_t>(), v, threads, mean.data_ptr<double>(),
                  var.data_ptr<double>());
    });
  } else {
    TORCH_CHECK(rm.has_value() && rv.has_value(), "bnkit_cpu.abn_forward: eval needs running stats");
    mean = rm->to(at::kDouble, false, true).contiguous();
    var = rv->to(at::kDouble, false, true).contiguous();
  }
  Tensor invstd = inv_std_of(var, eps);
  Tensor wd = f64(w), bd = f64(b);
  const AbnAct a = abn_act(act);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_abn_write", [&] {
    std::vector<scalar_t> mh(v.C), sc(v.C), sh(v.C);
    affine_coeffs(mean.const_data_ptr<double>(), invstd.const_data_ptr<double>(), ptr(wd),
                  ptr(bd), v.C, mh.data(), sc.data(), sh.data());
    abn_write(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), v, threads, mh.data(),
              sc.data(), sh.data(), a, p);
  });
  out.unsafeGetTensorImpl()->bump_version();
  I skipped = 0;
  if (training && momentum.has_value() && rm.has_value() && rm->defined()) {
    TORCH_CHECK(rm->scalar_type() == rv->scalar_type() && rm->is_contiguous() && rv->is_contiguous(),
                "bnkit_cpu.abn_forward: running buffers must be contiguous, of one dtype");
    const double n = static_cast<double>(v.outer * v.inner);
    AT_DISPATCH_FLOATING_TYPES(rm->scalar_type(), "bnkit_abn_blend", [&] {
      skipped = blend_running(rm->data_ptr<scalar_t>(), rv->data_ptr<scalar_t>(),
                              mean.const_data_ptr<double>(), var.const_data_ptr<double>(), v.C, n,
                              *momentum);
    });
    rm->unsafeGetTensorImpl()->bump_version();
    rv->unsafeGetTensorImpl()->bump_version();
  }
  return {mean, var, invstd, skipped};
}

std::tuple<Tensor, Tensor> abn_backward_reduce_op(const Tensor& dy, const Tensor& y,
                                                  const OptT& w, const OptT& b,
                                                  const Tensor& invstd, I axis,
                                                  c10::string_view act, double p) {
  const View v = layout_of(y, axis);
  check_like(dy, y, "dy");
  Tensor s = f64(invstd), wd = f64(w), bd = f64(b);
  Tensor sums = at::empty({2, v.C}, y.options().dtype(at::kDouble));
  const AbnAct a = abn_act(act);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bnkit_abn_sums", [&] {
    std::vector<scalar_t> r(v.C), h(v.C);
    abn_inverse_coeffs(ptr(s), ptr(wd), ptr(bd), v.C, r.data(), h.data());
    double* out = sums.data_ptr<double>();
    abn_sums(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), v,
             threads_for(v.numel()), r.data(), h.data(), a, p, out, out + v.C);
  });
  return {sums[0], sums[1]};
}

Tensor abn_backward_elemt_op(const Tensor& dy, const Tensor& y, const OptT& w, const OptT& b,
                             const Tensor& invstd, const Tensor& sum_dz,
                             const Tensor& sum_dz_xmu, double count, bool training, I axis,
                             c10::string_view act, double p) {
  const View v = layout_of(y, axis);
  check_like(dy, y, "dy");
  Tensor s = f64(invstd), wd = f64(w), bd = f64(b), sd = f64(sum_dz), sq = f64(sum_dz_xmu);
  Tensor dx = at::empty_like(y);
  const AbnAct a = abn_act(act);
  const std::vector<double> zero(v.C, 0.0);  // x - mu is recovered centred
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "bnkit_abn_dx", [&] {
    std::vector<scalar_t> r(v.C), h(v.C), mh(v.C), ac(v.C), k(v.C), c(v.C);
    abn_inverse_coeffs(ptr(s), ptr(wd), ptr(bd), v.C, r.data(), h.data());
    elemt_coeffs(zero.data(), ptr(s), ptr(wd), ptr(sd), ptr(sq), count, training, v.C, mh.data(),
                 ac.data(), k.data(), c.data());
    abn_dx(dy.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
           v, threads_for(v.numel()), r.data(), h.data(), ac.data(), k.data(), c.data(), a, p,
           training);
  });
  return dx;
}

// ---- Meta kernels: shapes and dtypes only ----

std::tuple<Tensor, Tensor, Tensor, I> abn_forward_meta(
    const Tensor& x, const Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
    const OptT&, const OptT&, bool, double, I axis, c10::string_view, double,
    std::optional<double>) {
  auto o = x.options().dtype(at::kDouble);
  const I C = x.size(axis);
  return {at::empty({C}, o), at::empty({C}, o), at::empty({C}, o), 0};
}

std::tuple<Tensor, Tensor> abn_backward_reduce_meta(const Tensor&, const Tensor& y, const OptT&,
                                                    const OptT&, const Tensor&, I axis,
                                                    c10::string_view, double) {
  auto o = y.options().dtype(at::kDouble);
  return {at::empty({y.size(axis)}, o), at::empty({y.size(axis)}, o)};
}

Tensor abn_backward_elemt_meta(const Tensor&, const Tensor& y, const OptT&, const OptT&,
                               const Tensor&, const Tensor&, const Tensor&, double, bool, I,
                               c10::string_view, double) {
  return at::empty_like(y);
}

}  // namespace
}  // namespace bnkit

TORCH_LIBRARY_FRAGMENT(bnkit_cpu, m) {
  m.def("abn_forward(Tensor x, Tensor(a!) out, Tensor? weight, Tensor? bias, "
        "Tensor(b!)? running_mean, Tensor(c!)? running_var, Tensor? mean, Tensor? var, "
        "bool training, float eps, int axis, str act, float act_param, float? momentum) "
        "-> (Tensor mean, Tensor var, Tensor invstd, int skipped)");
  m.def("abn_backward_reduce(Tensor dy, Tensor y, Tensor? weight, Tensor? bias, Tensor invstd, "
        "int axis, str act, float act_param) -> (Tensor sum_dz, Tensor sum_dz_xmu)");
  m.def("abn_backward_elemt(Tensor dy, Tensor y, Tensor? weight, Tensor? bias, Tensor invstd, "
        "Tensor sum_dz, Tensor sum_dz_xmu, float count, bool training, int axis, str act, "
        "float act_param) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnkit_cpu, CPU, m) {
  m.impl("abn_forward", &bnkit::abn_forward_op);
  m.impl("abn_backward_reduce", &bnkit::abn_backward_reduce_op);
  m.impl("abn_backward_elemt", &bnkit::abn_backward_elemt_op);
}

TORCH_LIBRARY_IMPL(bnkit_cpu, Meta, m) {
  m.impl("abn_forward", &bnkit::abn_forward_meta);
  m.impl("abn_backward_reduce", &bnkit::abn_backward_reduce_meta);
  m.impl("abn_backward_elemt", &bnkit::abn_backward_elemt_meta);
}
