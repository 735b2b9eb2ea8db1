// at::Tensor helpers of the SRD ops shared by the CPU kernels (csrc/cpu/srd.cpp) and the CUDA
// binding (csrc/cuda/srd_binding.cpp): the pair check, the backward's tables, and the statistics
// of eval mode. The checks and dtypes of every op are fastkd/host.h.
//
// Host-only: this header pulls in ATen. Never include it from a .cu file (they include only
// lean headers such as srd_math.h, to keep nvcc fast).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

#include "fastkd/host.h"

namespace fastkd {
namespace srd {

// Shape, dtype and device agreement of the two (B, D) inputs. Backends add their own checks
// (device type, supported dtypes) around this.
inline void check_pair(const at::Tensor& student, const at::Tensor& teacher) {
  constexpr const char* op = "fastkd::srd";
  check_student(student, op);
  check_partner(student, teacher, op, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes(), op,
              ": teacher must have the student's shape (B, D)");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), op,
              ": student and teacher must have the same dtype");
}

// The (4, D) statistics and sums handed to srd_backward.
inline void check_backward_tables(const at::Tensor& stats_s, const at::Tensor& stats_t,
                                  const at::Tensor& sums, int64_t D) {
  for (const at::Tensor* t : {&stats_s, &stats_t, &sums})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == 4 && t->size(1) == D,
                "fastkd::srd_backward: statistics and sums must have shape (4, D)");
}

// (4, D) statistics from running buffers (eval mode): mean, var, centre = mean - z[0], rstd.
inline at::Tensor stats_from_running(const at::Tensor& z, const std::optional<at::Tensor>& mean,
                                     const std::optional<at::Tensor>& var, double eps,
                                     at::ScalarType acc, const char* side) {
  TORCH_CHECK(mean.has_value() && var.has_value(), "fastkd::srd: eval mode needs the ", side,
              " running mean and running var");
  const int64_t D = z.size(1);
  TORCH_CHECK(mean->numel() == D && var->numel() == D, "fastkd::srd: ", side,
              " running statistics must have shape (D,)");
  const at::Tensor m = mean->to(z.device(), acc).reshape({D});
  const at::Tensor v = var->to(z.device(), acc).reshape({D});
  return at::stack({m, v, m - z.select(0, 0).to(acc), (v + eps).rsqrt()});
}

// srd_forward's scalar arguments: p >= 1, and a batch of at least 2 rows for batch statistics.
inline void check_forward_args(const at::Tensor& student, double p, bool training) {
  TORCH_CHECK(p >= 1, "fastkd::srd: p must be >= 1, got ", p);
  TORCH_CHECK(!training || student.size(0) >= 2,
              "fastkd::srd: training mode needs a batch of at least 2 rows");
}

// srd_forward's (4, D) statistics of both sides: uninitialised for the kernels to fill
// (training), or from the running buffers (eval).
inline std::pair<at::Tensor, at::Tensor> forward_stats(
    const at::Tensor& student, const at::Tensor& teacher, bool training,
    const std::optional<at::Tensor>& running_mean_s, const std::optional<at::Tensor>& running_var_s,
    const std::optional<at::Tensor>& running_mean_t, const std::optional<at::Tensor>& running_var_t,
    double eps, at::ScalarType acc) {
  if (training) {
    const auto opts = student.options().dtype(acc);
    return {at::empty({4, student.size(1)}, opts), at::empty({4, student.size(1)}, opts)};
  }
  return {stats_from_running(student, running_mean_s, running_var_s, eps, acc, "student"),
          stats_from_running(teacher, running_mean_t, running_var_t, eps, acc, "teacher")};
}

}  // namespace srd
}  // namespace fastkd
