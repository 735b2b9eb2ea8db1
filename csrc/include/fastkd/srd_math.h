// Per-element and per-column arithmetic of SRD (SPEC §3), shared by the CPU and CUDA backends so
// that the math the CUDA kernels run is the math the CPU tests check.
//
// Column statistics are taken on shifted values y = z - z[0, j] (the column's first entry):
// the shift is exact for data clustered around a large offset, so the mean of y (the "centre")
// keeps full fp32 precision where the mean of z would be rounded to the offset's ulp.
// Then s = (y - centre) * rstd with rstd = 1 / sqrt(var + eps).
#pragma once

#include <cmath>

#include "fastkd/common.h"

namespace fastkd {
namespace srd {

// float32's smallest normal number: the loss is log(max(S, tiny)), so identical inputs stay finite.
constexpr double kTiny = 1.17549435082228750797e-38;

// Largest exponent evaluated by repeated multiplication instead of pow().
constexpr int kMaxIntegerPower = 8;

// Rows of the (4, D) statistics tensor of each side.
enum StatsRow { kMean = 0, kVar = 1, kCentre = 2, kRstd = 3 };
// Rows of the (4, D) column-sum tensor: sum_b |d|^p, sum_b h, sum_b h*s, sum_b h*t.
enum SumsRow { kPow = 0, kH = 1, kHS = 2, kHT = 3 };

// p as a small integer (1..kMaxIntegerPower), or 0 when p must go through pow().
inline int integer_power(double p) {
  const double r = std::floor(p);
  return (r == p && p >= 1 && p <= kMaxIntegerPower) ? static_cast<int>(r) : 0;
}

template <typename acc_t>
FASTKD_HD acc_t pow_(acc_t base, acc_t exponent) {
#if defined(__CUDA_ARCH__)
  return pow(base, exponent);
#else
  return std::pow(base, exponent);
#endif
}

// |d|^p and its derivative h = p |d|^(p-1) sign(d). `ip` is integer_power(p); kIP >= 0 fixes it
// at compile time (the CPU loops then vectorise), kIP = -1 reads `ip`. NaN and Inf in d
// propagate (sign(NaN) = 0 but |d|^(p-1) is NaN, so h is NaN too).
template <typename acc_t, int kIP = -1>
FASTKD_HD void power_terms(acc_t d, acc_t p, int ip, acc_t& value, acc_t& h) {
  const int n = kIP >= 0 ? kIP : ip;
  const acc_t a = d < acc_t(0) ? -d : d;
  acc_t a_pm1;  // |d|^(p-1)
  if (n > 0) {
    a_pm1 = acc_t(1);
    for (int k = 1; k < n; ++k) a_pm1 *= a;
  } else {
    a_pm1 = pow_<acc_t>(a, p - acc_t(1));  // p > 1 here, so 0^(p-1) = 0
  }
  value = a_pm1 * a;
  const acc_t sign = acc_t((d > acc_t(0)) - (d < acc_t(0)));
  h = p * a_pm1 * sign;
}

// One Welford step: adds y to a running (mean, m2) that then holds n values, inv_n = 1/n.
template <typename acc_t>
FASTKD_HD void welford_add(acc_t& mean, acc_t& m2, acc_t y, acc_t inv_n) {
  const acc_t delta = y - mean;
  mean += delta * inv_n;
  m2 += delta * (y - mean);
}

// Chan et al.'s merge of two partial statistics (count, mean, sum of squared deviations) into
// the first. Either count may be zero.
template <typename acc_t>
FASTKD_HD void welford_merge(acc_t& n_a, acc_t& mean_a, acc_t& m2_a, acc_t n_b, acc_t mean_b,
                             acc_t m2_b) {
  if (n_b == acc_t(0)) return;
  const acc_t n = n_a + n_b;
  const acc_t delta = mean_b - mean_a;
  const acc_t frac_b = n_b / n;
  mean_a += delta * frac_b;
  m2_a += m2_b + delta * delta * n_a * frac_b;
  n_a = n;
}

template <typename acc_t>
FASTKD_HD acc_t rstd(acc_t var, acc_t eps) {
#if defined(__CUDA_ARCH__)
  return acc_t(1) / sqrt(var + eps);
#else
  return acc_t(1) / std::sqrt(var + eps);
#endif
}

// Batch-normalised value of z given the column's shift z[0, j], centre mean(y) and rstd.
template <typename acc_t>
FASTKD_HD acc_t normalize(acc_t z, acc_t shift, acc_t centre, acc_t rstd) {
  return ((z - shift) - centre) * rstd;
}

// dL/dS of L = log(max(S, tiny)) times the incoming gradient: 0 where the clamp is active. A NaN
// S fails the comparison and propagates.
template <typename acc_t>
FASTKD_HD acc_t loss_grad_scale(acc_t grad, acc_t total) {
  return total < acc_t(kTiny) ? acc_t(0) : grad / total;
}

// Train-mode batch-norm backward of one element, with g = c * h:
//   dz = (g - mean_b g - x_hat * mean_b(g x_hat)) * rstd,
// where mean_h = mean_b h and mean_hx = mean_b(h x_hat) over the column. The teacher side uses
// c -> -c (its normalised value enters d = s - t with a minus sign).
template <typename acc_t>
FASTKD_HD acc_t bn_backward_train(acc_t c, acc_t h, acc_t x_hat, acc_t mean_h, acc_t mean_hx,
                                  acc_t rstd) {
  return c * (h - mean_h - x_hat * mean_hx) * rstd;
}

// Eval mode: the statistics are constants, dz = c * h * rstd.
template <typename acc_t>
FASTKD_HD acc_t bn_backward_eval(acc_t c, acc_t h, acc_t rstd) {
  return c * h * rstd;
}

}  // namespace srd
}  // namespace fastkd
