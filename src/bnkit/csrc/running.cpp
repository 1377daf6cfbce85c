// The running-statistics blend of the one-call forward (see kernels.h): the arithmetic of
// bnkit.functional.running.update_running, so every path agrees bit for bit.
#include <cmath>

#include "kernels.h"

namespace bnkit {

template <class R>
I blend_running(R* rm, R* rv, const double* mean, const double* var, I C, double n,
                double momentum) {
  const double keep = 1.0 - momentum;
  const double factor = momentum * (n / (n - 1.0));
  I skipped = 0;
  for (I c = 0; c < C; ++c) {
    if (!(std::isfinite(mean[c]) && std::isfinite(var[c]))) {
      ++skipped;
      continue;
    }
    rm[c] = static_cast<R>(static_cast<double>(rm[c]) * keep + mean[c] * momentum);
    rv[c] = static_cast<R>(static_cast<double>(rv[c]) * keep + var[c] * factor);
  }
  return skipped;
}

template I blend_running<float>(float*, float*, const double*, const double*, I, double, double);
template I blend_running<double>(double*, double*, const double*, const double*, I, double,
                                 double);

}  // namespace bnkit
