// at::Tensor helpers of the SRD ops shared by the CPU kernels (csrc/cpu/srd.cpp) and the CUDA
// binding (csrc/cuda/srd_binding.cpp): input checks, the accumulation dtype, and the statistics
// of eval mode.
//
// Host-only: this header pulls in ATen. Never include it from a .cu file (they include only
// lean headers such as srd_math.h, to keep nvcc fast).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastkd {
namespace srd {

// Shape, dtype and device agreement of the two (B, D) inputs. Backends add their own checks
// (device type, supported dtypes) around this.
inline void check_pair(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.dim() == 2 && student.size(0) >= 1 && student.size(1) >= 1,
              "fastkd::srd: student must be a non-empty 2-D tensor");
  TORCH_CHECK(teacher.sizes() == student.sizes(),
              "fastkd::srd: teacher must have the student's shape (B, D)");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(),
              "fastkd::srd: student and teacher must have the same dtype");
  TORCH_CHECK(teacher.device() == student.device(),
              "fastkd::srd: student and teacher are on different devices");
}

// The (4, D) statistics and sums handed to srd_backward.
inline void check_backward_tables(const at::Tensor& stats_s, const at::Tensor& stats_t,
                                  const at::Tensor& sums, int64_t D) {
  for (const at::Tensor* t : {&stats_s, &stats_t, &sums})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == 4 && t->size(1) == D,
                "fastkd::srd_backward: statistics and sums must have shape (4, D)");
}

// Accumulation dtype: float64 for float64 features, float32 otherwise.
inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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

}  // namespace srd
}  // namespace fastkd
