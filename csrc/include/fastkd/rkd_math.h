// Per-element arithmetic of the RKD distance loss (SPEC §2), host/device, so that a GPU kernel
// can share the math the CPU tests check. Conventions are RepDistiller's: pdist with the
// squared distance clamped at 1e-12, d_ii = 0, smooth L1 with beta = 1.
#pragma once

#include <cmath>

#include "fastkd/common.h"

namespace fastkd {
namespace rkd {

constexpr double kSquaredDistanceEps = 1e-12;

// |f_i|^2 + |f_j|^2 - 2 f_i.f_j, before the clamp.
template <typename acc_t>
FASTKD_HD acc_t squared_distance(acc_t sq_i, acc_t sq_j, acc_t dot) {
  return sq_i + sq_j - acc_t(2) * dot;
}

// sqrt(clamp_min(q, eps)); a NaN q stays NaN (as torch.clamp_min).
template <typename acc_t>
FASTKD_HD acc_t distance(acc_t q) {
  return sqrt(q < acc_t(kSquaredDistanceEps) ? acc_t(kSquaredDistanceEps) : q);
}

// d distance / d q: 1 / (2 d) where the clamp passes the gradient (q >= eps, torch's rule for
// clamp_min), else 0.
template <typename acc_t>
FASTKD_HD acc_t distance_grad(acc_t q, acc_t d) {
  return q >= acc_t(kSquaredDistanceEps) ? acc_t(0.5) / d : acc_t(0);
}

// smooth_l1(x) with beta = 1.
template <typename acc_t>
FASTKD_HD acc_t smooth_l1(acc_t x) {
  const acc_t a = x < acc_t(0) ? -x : x;
  return a < acc_t(1) ? acc_t(0.5) * x * x : a - acc_t(0.5);
}

// d smooth_l1 / dx with beta = 1: x clamped to [-1, 1] (NaN stays NaN).
template <typename acc_t>
FASTKD_HD acc_t smooth_l1_grad(acc_t x) {
  return x <= acc_t(-1) ? acc_t(-1) : (x >= acc_t(1) ? acc_t(1) : x);
}

}  // namespace rkd
}  // namespace fastkd
