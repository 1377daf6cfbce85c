// bnkit._C's operators (namespace bnkit_cpu, apart from the Python custom ops bnkit::*):
// the backend primitives and the one-call forward and backward, on dense float32/float64
// CPU tensors (callers route anything else to the reference backend), with Meta kernels
// so they can be traced.
#include "ops.h"

#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace bnkit {
namespace {

constexpr size_t HUGE_PAGE = 2u << 20;
constexpr size_t HUGE_MIN = 8u << 20;

// torch.empty_like (x's memory format); large outputs ask Linux for 2 MiB pages: first-touch
// page faults otherwise cost more than the kernel (a hint, harmless if refused).
Tensor empty_out(const Tensor& x) {
  Tensor out = at::empty_like(x);
#ifdef __linux__
  const size_t nbytes = out.nbytes();
  if (nbytes >= HUGE_MIN) {
    const auto p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t start = (p + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    const uintptr_t end = (p + nbytes) & ~(HUGE_PAGE - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// A (C,) vector's values as float64 (absent: empty, which ptr() turns into null): float32
// and float64 read in place, anything else converted once. No tensor is made for the
// common dtypes: at this size a tensor op costs more than the loop.
std::vector<double> values(const OptT& t) {
  if (!t.has_value() || !t->defined()) return {};
  std::vector<double> out(t->numel());
  if (t->is_contiguous() && t->scalar_type() == at::kDouble) {
    std::copy_n(t->const_data_ptr<double>(), out.size(), out.data());
  } else if (t->is_contiguous() && t->scalar_type() == at::kFloat) {
    std::copy_n(t->const_data_ptr<float>(), out.size(), out.data());
  } else {
    const Tensor d = t->to(at::kDouble).contiguous();
    std::copy_n(d.const_data_ptr<double>(), out.size(), out.data());
  }
  return out;
}

const double* ptr(const std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }

// A (n,) float64 tensor holding p[0..n).
Tensor f64_tensor(const double* p, I n, const Tensor& like) {
  Tensor t = at::empty({n}, like.options().dtype(at::kDouble));
  std::copy_n(p, n, t.data_ptr<double>());
  return t;
}

std::vector<double> inv_stds(const double* var, I C, double eps) {
  std::vector<double> out(C);
  for (I c = 0; c < C; ++c) out[c] = inv_std(var[c], eps);
  return out;
}

// dy laid out as x (e.g. the expanded gradient of y.sum() is copied once).
Tensor like_x(const Tensor& dy, const Tensor& x) {
  return dy.strides() == x.strides() && dy.scalar_type() == x.scalar_type()
             ? dy
             : empty_out(x).copy_(dy);
}

template <class T>
constexpr const T* no_gate = nullptr;  // relu's gate coefficients, absent

template <class T>
struct Coeffs {
  std::vector<T> a, b, c, d;
  explicit Coeffs(I C) : a(C), b(C), c(C), d(C) {}
};

// A channel's dy + x up to this stays in L2, beside the dx written from it, between the
// fused backward's two passes; larger channels (64x64x56x56: 1.6 MB) measured 10-15 %
// faster with the two streaming passes of the other path.
constexpr I FUSE_BYTES = 1 << 20;

// The per-channel fused backward pays on a channels-first view whose channels balance
// over the threads and whose per-channel dy + x stay cached between its two passes.
bool fusable(const View& v, I threads, size_t itemsize) {
  return v.inner > 1 && 2 * v.outer * v.inner * static_cast<I>(itemsize) <= FUSE_BYTES &&
         (threads == 1 || v.C % threads == 0 || v.C >= 8 * threads);
}

void check_input(const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "bnkit_cpu: dense float32/float64 CPU input expected, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.numel() > 0, "bnkit_cpu: empty input");
}

std::tuple<Tensor, Tensor> batch_stats_op(const Tensor& x, I axis) {
  const View v = layout_of(x, axis);
  Tensor mean = at::empty({v.C}, x.options().dtype(at::kDouble));
  Tensor var = at::empty({v.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_batch_stats", [&] {
    batch_stats(x.const_data_ptr<scalar_t>(), v, threads_for(v.numel()), mean.data_ptr<double>(),
                var.data_ptr<double>());
  });
  return {mean, var};
}

Tensor normalize_op(const Tensor& x, const Tensor& mean, const Tensor& invstd, const OptT& w,
                    const OptT& b, I axis, bool relu) {
  const View v = layout_of(x, axis);
  const auto m = values(mean), s = values(invstd), wd = values(w), bd = values(b);
  Tensor y = empty_out(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_normalize", [&] {
    Coeffs<scalar_t> k(v.C);
    affine_coeffs(ptr(m), ptr(s), ptr(wd), ptr(bd), v.C, k.a.data(), k.b.data(), k.c.data());
    normalize(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), v, threads_for(v.numel()),
              k.a.data(), k.b.data(), k.c.data(), relu);
  });
  return y;
}

std::tuple<Tensor, Tensor> backward_reduce_op(const Tensor& dy_, const Tensor& x,
                                              const Tensor& mean, I axis) {
  const View v = layout_of(x, axis);
  const Tensor dy = like_x(dy_, x);
  const auto m = values(mean);
  Tensor sums = at::empty({2, v.C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_backward_reduce", [&] {
    double* s = sums.data_ptr<double>();
    dy_sums(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), v,
            threads_for(v.numel()), ptr(m), no_gate<scalar_t>, no_gate<scalar_t>,
            no_gate<scalar_t>, s, s + v.C);
  });
  return {sums[0], sums[1]};
}

Tensor backward_elemt_op(const Tensor& dy_, const Tensor& x, const Tensor& mean,
                         const Tensor& invstd, const OptT& w, const Tensor& sum_dy,
                         const Tensor& sum_dy_xmu, double count, I axis, bool training) {
  const View v = layout_of(x, axis);
  const Tensor dy = like_x(dy_, x);
  const auto m = values(mean), s = values(invstd), wd = values(w), sd = values(sum_dy),
             sq = values(sum_dy_xmu);
  Tensor dx = empty_out(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_backward_elemt", [&] {
    Coeffs<scalar_t> k(v.C);
    elemt_coeffs(ptr(m), ptr(s), ptr(wd), ptr(sd), ptr(sq), count, training, v.C, k.a.data(),
                 k.b.data(), k.c.data(), k.d.data());
    backward_elemt(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                   dx.data_ptr<scalar_t>(), v, threads_for(v.numel()), k.a.data(), k.b.data(),
                   k.c.data(), k.d.data(), training, no_gate<scalar_t>,
                   no_gate<scalar_t>, no_gate<scalar_t>);
  });
  return dx;
}

Tensor relu_backward_op(const Tensor& dy_, const Tensor& x, const Tensor& mean,
                        const Tensor& invstd, const OptT& w, const OptT& b, I axis) {
  const View v = layout_of(x, axis);
  const Tensor dy = like_x(dy_, x);
  const auto m = values(mean), s = values(invstd), wd = values(w), bd = values(b);
  Tensor dz = empty_out(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_relu_backward", [&] {
    Coeffs<scalar_t> k(v.C);
    affine_coeffs(ptr(m), ptr(s), ptr(wd), ptr(bd), v.C, k.a.data(), k.b.data(), k.c.data());
    relu_grad(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
              v, threads_for(v.numel()), k.a.data(), k.b.data(), k.c.data());
  });
  return dz;
}

std::tuple<Tensor, Tensor, Tensor, I> forward_op(const Tensor& x, const OptT& w, const OptT& b,
                                                 const OptT& rm, const OptT& rv, bool training,
                                                 double eps, I axis, bool relu,
                                                 std::optional<double> momentum) {
  Forward f = forward(x, w, b, rm, rv, training, eps, axis, relu, momentum);
  const I C = static_cast<I>(f.stats.size()) / 2;
  return {f.y, f64_tensor(f.stats.data(), C, x), f64_tensor(f.stats.data() + C, C, x), f.skipped};
}

std::tuple<Tensor, Tensor, Tensor> backward_op(const Tensor& dy, const Tensor& x, const OptT& w,
                                               const OptT& b, const Tensor& mean,
                                               const Tensor& var, double count, bool training,
                                               double eps, I axis, bool relu) {
  const auto m = values(mean), s = values(var);
  return backward(dy, x, w, b, m.data(), s.data(), count, training, eps, axis, relu);
}

// ---- Meta kernels: shapes and dtypes only ----

std::tuple<Tensor, Tensor> batch_stats_meta(const Tensor& x, I axis) {
  const I C = x.size(axis);
  auto o = x.options().dtype(at::kDouble);
  return {at::empty({C}, o), at::empty({C}, o)};
}

Tensor normalize_meta(const Tensor& x, const Tensor&, const Tensor&, const OptT&, const OptT&, I,
                      bool) {
  return at::empty_like(x);
}

std::tuple<Tensor, Tensor, Tensor, I> forward_meta(const Tensor& x, const OptT&, const OptT&,
                                                   const OptT&, const OptT&, bool, double, I axis,
                                                   bool, std::optional<double>) {
  auto [mean, var] = batch_stats_meta(x, axis);
  return {at::empty_like(x), mean, var, 0};
}

std::tuple<Tensor, Tensor, Tensor> backward_meta(const Tensor&, const Tensor& x, const OptT& w,
                                                 const OptT&, const Tensor&, const Tensor&, double,
                                                 bool, double, I axis, bool) {
  const auto pdt = w.has_value() && w->defined() ? w->scalar_type() : x.scalar_type();
  auto o = x.options().dtype(pdt);
  return {at::empty_like(x), at::empty({x.size(axis)}, o), at::empty({x.size(axis)}, o)};
}

}  // namespace

View layout_of(const Tensor& x, I axis) {
  check_input(x);
  const I nd = x.dim();
  TORCH_CHECK(nd >= 1 && axis >= 0 && axis < nd, "bnkit_cpu: channel axis ", axis, " out of range");
  const I C = x.size(axis);
  if (x.is_contiguous()) {
    I outer = 1, inner = 1;
    for (I d = 0; d < axis; ++d) outer *= x.size(d);
    for (I d = axis + 1; d < nd; ++d) inner *= x.size(d);
    return {outer, C, inner};
  }
  const bool cl = axis == 1 && ((nd == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                                (nd == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)));
  TORCH_CHECK(cl, "bnkit_cpu: input not dense along axis ", axis,
              " (contiguous, or channels-last with axis 1); route it to the reference backend");
  return {x.numel() / C, C, 1};
}

Forward forward(const Tensor& x, const OptT& w, const OptT& b, const OptT& rm, const OptT& rv,
                bool training, double eps, I axis, bool relu, std::optional<double> momentum) {
  const View v = layout_of(x, axis);
  const I threads = threads_for(v.numel());
  Forward f{empty_out(x), std::vector<double>(2 * v.C), 0};
  double* mean = f.stats.data();
  double* var = mean + v.C;
  const auto wd = values(w), bd = values(b);
  if (!training) {
    TORCH_CHECK(rm.has_value() && rv.has_value(), "bnkit_cpu.forward: eval needs running stats");
    std::copy_n(values(rm).data(), v.C, mean);
    std::copy_n(values(rv).data(), v.C, var);
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (training) batch_stats(xp, v, threads, mean, var);
    const auto invstd = inv_stds(var, v.C, eps);
    Coeffs<scalar_t> k(v.C);
    affine_coeffs(mean, invstd.data(), ptr(wd), ptr(bd), v.C, k.a.data(), k.b.data(), k.c.data());
    normalize(xp, f.y.data_ptr<scalar_t>(), v, threads, k.a.data(), k.b.data(), k.c.data(), relu);
  });
  if (training && momentum.has_value() && rm.has_value() && rm->defined()) {
    TORCH_CHECK(rm->scalar_type() == rv->scalar_type() && rm->is_contiguous() && rv->is_contiguous(),
                "bnkit_cpu.forward: running buffers must be contiguous, of one dtype");
    const double n = static_cast<double>(v.outer * v.inner);
    AT_DISPATCH_FLOATING_TYPES(rm->scalar_type(), "bnkit_blend", [&] {
      f.skipped = blend_running(rm->data_ptr<scalar_t>(), rv->data_ptr<scalar_t>(), mean, var,
                                v.C, n, *momentum);
    });
    rm->unsafeGetTensorImpl()->bump_version();
    rv->unsafeGetTensorImpl()->bump_version();
  }
  return f;
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy_, const Tensor& x, const OptT& w,
                                            const OptT& b, const double* mean, const double* var,
                                            double count, bool training, double eps, I axis,
                                            bool relu) {
  const View v = layout_of(x, axis);
  const I threads = threads_for(v.numel());
  Tensor dy = like_x(dy_, x);
  const auto wd = values(w), bd = values(b);
  Tensor dx = empty_out(x);
  const auto pdt = w.has_value() && w->defined() ? w->scalar_type() : x.scalar_type();
  std::vector<double> sums(2 * v.C);
  double* s = sums.data();
  const auto invstd = inv_stds(var, v.C, eps);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnkit_backward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    Coeffs<scalar_t> f(relu ? v.C : 0);  // relu: the forward's coefficients, z recomputed
    if (relu)
      affine_coeffs(mean, invstd.data(), ptr(wd), ptr(bd), v.C, f.a.data(), f.b.data(),
                    f.c.data());
    const scalar_t* gm = relu ? f.a.data() : nullptr;
    const scalar_t* ga = relu ? f.b.data() : nullptr;
    const scalar_t* gh = relu ? f.c.data() : nullptr;
    if (training && fusable(v, threads, sizeof(scalar_t))) {
      fused_backward(g, xp, dx.data_ptr<scalar_t>(), v, threads, mean, invstd.data(), ptr(wd),
                     count, gm, ga, gh, s, s + v.C);
      return;
    }
    dy_sums(g, xp, v, threads, mean, gm, ga, gh, s, s + v.C);
    Coeffs<scalar_t> k(v.C);
    elemt_coeffs(mean, invstd.data(), ptr(wd), s, s + v.C, count, training, v.C, k.a.data(),
                 k.b.data(), k.c.data(), k.d.data());
    backward_elemt(g, xp, dx.data_ptr<scalar_t>(), v, threads, k.a.data(), k.b.data(), k.c.data(),
                   k.d.data(), training, gm, ga, gh);
  });
  Tensor dw = at::empty({v.C}, x.options().dtype(pdt)), db = at::empty({v.C}, x.options().dtype(pdt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pdt, "bnkit_grad_affine", [&] {
    scalar_t* wp = dw.data_ptr<scalar_t>();
    scalar_t* bp = db.data_ptr<scalar_t>();
    for (I c = 0; c < v.C; ++c) {
      wp[c] = static_cast<scalar_t>(s[v.C + c] * invstd[c]);
      bp[c] = static_cast<scalar_t>(s[c]);
    }
  });
  return {dx, dw, db};
}

}  // namespace bnkit

TORCH_LIBRARY(bnkit_cpu, m) {
  m.def("batch_stats(Tensor x, int axis) -> (Tensor mean, Tensor var)");
  m.def("normalize(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, int axis, "
        "bool relu) -> Tensor");
  m.def("backward_reduce(Tensor dy, Tensor x, Tensor mean, int axis) -> (Tensor, Tensor)");
  m.def("backward_elemt(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor sum_dy, Tensor sum_dy_xmu, float count, int axis, bool training) -> Tensor");
  m.def("relu_backward(Tensor dy, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias, int axis) -> Tensor");
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
        "Tensor(b!)? running_var, bool training, float eps, int axis, bool relu, "
        "float? momentum) -> (Tensor y, Tensor mean, Tensor var, int skipped)");
  m.def("backward(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, "
        "float count, bool training, float eps, int axis, bool relu) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnkit_cpu, CPU, m) {
  m.impl("batch_stats", &bnkit::batch_stats_op);
  m.impl("normalize", &bnkit::normalize_op);
  m.impl("backward_reduce", &bnkit::backward_reduce_op);
  m.impl("backward_elemt", &bnkit::backward_elemt_op);
  m.impl("relu_backward", &bnkit::relu_backward_op);
  m.impl("forward", &bnkit::forward_op);
  m.impl("backward", &bnkit::backward_op);
}

TORCH_LIBRARY_IMPL(bnkit_cpu, Meta, m) {
  m.impl("batch_stats", &bnkit::batch_stats_meta);
  m.impl("normalize", &bnkit::normalize_meta);
  m.impl("forward", &bnkit::forward_meta);
  m.impl("backward", &bnkit::backward_meta);
}
