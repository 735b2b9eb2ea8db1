// Per-element and per-row arithmetic of FKD (SPEC §1), shared by the CPU and CUDA backends so
// that the math the CUDA kernels run is the math the CPU tests check.
#pragma once

#include <cmath>

#include "fastkd/common.h"

namespace fastkd {
namespace fkd {

// 1 / max(||f_i||, eps) from the squared row norm.
template <typename acc_t>
FASTKD_HD acc_t inv_row_norm(acc_t sum_sq) {
  const acc_t norm = sqrt(sum_sq);
  return acc_t(1) / (norm > acc_t(kNormEps) ? norm : acc_t(kNormEps));
}

// Weight of tile (I, J) in the upper-triangle sum: off-diagonal tiles stand for themselves and
// their mirror image, since both kernels are symmetric.
template <typename acc_t>
FASTKD_HD acc_t tile_weight(long long row_block, long long col_block) {
  return row_block == col_block ? acc_t(1) : acc_t(2);
}

// One kernel-difference entry: (rho_S - rho_T)_ij^2.
template <typename acc_t>
FASTKD_HD acc_t squared_difference(acc_t student_ij, acc_t teacher_ij) {
  const acc_t d = student_ij - teacher_ij;
  return d * d;
}

// Scale of G = (4/B^2) (rho_S - rho_T) A for the student side.
template <typename acc_t>
FASTKD_HD acc_t kernel_grad_scale(long long batch) {
  return acc_t(4) / (acc_t(batch) * acc_t(batch));
}

// Chain rule through normalize() for one element of row i:
//   d f_ij = (G_ij - (G_i . A_i) A_ij) * inv_norm_i
// with the caller's g_dot_a = G_i . A_i.
template <typename acc_t>
FASTKD_HD acc_t normalize_backward(acc_t g_ij, acc_t a_ij, acc_t g_dot_a, acc_t inv_norm) {
  return (g_ij - g_dot_a * a_ij) * inv_norm;
}

// Feature-regulariser gradient d/d f_ij of fr_weight * mean(f^2) over B*D entries.
template <typename acc_t>
FASTKD_HD acc_t featreg_backward(acc_t f_ij, acc_t fr_weight, long long batch, long long width) {
  return fr_weight * acc_t(2) * f_ij / (acc_t(batch) * acc_t(width));
}

}  // namespace fkd
}  // namespace fastkd
