// at::Tensor helpers shared by every op's CPU kernels (csrc/cpu/*.cpp) and CUDA bindings
// (csrc/cuda/*_binding.cpp): the accumulation dtype and the input checks, so that a backend
// cannot accept what another refuses or word the refusal differently.
//
// Host-only: this header pulls in ATen. Never include it from a .cu file (they include only lean
// headers such as fkd_math.h and csrc/cuda/launch.h, to keep nvcc fast).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <string>

namespace fastkd {

// Accumulation dtype of an op: float64 when any input is float64, float32 otherwise (float16 and
// bfloat16 inputs accumulate in float32).
inline at::ScalarType acc_type_of(const at::Tensor& x, at::TensorList others = {}) {
  bool any_double = x.scalar_type() == at::kDouble;
  for (const auto& t : others) any_double = any_double || t.scalar_type() == at::kDouble;
  return any_double ? at::kDouble : at::kFloat;
}

// The student features: (B, D), B >= min_rows, D >= 1.
inline void check_student(const at::Tensor& student, const char* op, int64_t min_rows = 1) {
  TORCH_CHECK(student.dim() == 2 && student.size(0) >= min_rows && student.size(1) >= 1, op,
              ": student must be a 2-D tensor with at least ", min_rows,
              min_rows == 1 ? " row" : " rows", " and one column, got shape ", student.sizes());
}

// Another input of the op (a teacher): (B, D') with the student's batch size and device.
inline void check_partner(const at::Tensor& student, const at::Tensor& x, const char* op,
                          const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == student.size(0) && x.size(1) >= 1, op, ": ", name,
              " must be 2-D with the student's batch size ", student.size(0), ", got shape ",
              x.sizes());
  TORCH_CHECK(x.device() == student.device(), op, ": ", name, " is on ", x.device(),
              " but student is on ", student.device(), " (devices differ)");
}

// Floating features of the four dtypes every backend accepts.
inline void check_float_dtype(const at::Tensor& x, const char* op, const char* name) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble, op,
              ": ", name, " must be float16, bfloat16, float32 or float64, got ", t);
}

// The `precision` argument of FKD and RKD (SPEC §6): "ieee", "tf32x3" or "tf32". Returns 0, 2
// or 1 (the values of cuda::Precision); anything else is a ValueError naming the argument.
inline int check_precision(c10::string_view precision, const char* op) {
  if (precision == "ieee") return 0;
  if (precision == "tf32") return 1;
  if (precision == "tf32x3") return 2;
  TORCH_CHECK_VALUE(false, op, ": precision must be \"ieee\", \"tf32x3\" or \"tf32\", got \"",
                    std::string(precision.data(), precision.size()), "\"");
}

}  // namespace fastkd
