// ATen wrapper of the FKD CUDA kernels (fkd.cu): input checks, operand dtype, workspaces, the
// current stream, error checks, and the CUDA registrations of fastkd::fkd_forward, fkd_backward
// and fkd_forward_backward. Same op convention as csrc/cpu/fkd.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "dtype_binding.h"
#include "fkd_cuda.h"

namespace fastkd {
namespace {

using cuda::DType;

bool is_supported(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_inputs(const at::Tensor& student, at::TensorList teachers) {
  TORCH_CHECK(student.dim() == 2 && student.size(0) >= 1 && student.size(1) >= 1,
              "fastkd::fkd: student must be a non-empty 2-D tensor");
  TORCH_CHECK(student.is_cuda(), "fastkd::fkd (CUDA): student must be a CUDA tensor");
  TORCH_CHECK(is_supported(student.scalar_type()),
              "fastkd::fkd: student must be float16, bfloat16, float32 or float64, got ",
              student.scalar_type());
  TORCH_CHECK(!teachers.empty(), "fastkd::fkd: at least one teacher is required");
  TORCH_CHECK_VALUE(teachers.size() <= size_t(cuda::kMaxTeachers),
                    "fastkd::fkd (CUDA): teachers: at most ", cuda::kMaxTeachers,
                    " teachers are supported, got ", teachers.size());
  for (const auto& t : teachers) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == student.size(0) && t.size(1) >= 1,
                "fastkd::fkd: each teacher must be 2-D with the student's batch size");
    TORCH_CHECK(t.device() == student.device(), "fastkd::fkd: teachers and student devices differ");
    TORCH_CHECK(is_supported(t.scalar_type()),
                "fastkd::fkd: teachers must be float16, bfloat16, float32 or float64, got ",
                t.scalar_type());
  }
  // The forward grid has one block per upper-triangle tile.
  TORCH_CHECK(cuda::num_upper_tiles(student.size(0)) <= std::numeric_limits<int32_t>::max(),
              "fastkd::fkd (CUDA): batch size ", student.size(0), " is too large");
}

// One operand type for every GEMM: float64 if any input is float64 (accumulation in float64,
// as on the CPU), float16 / bfloat16 when every input has it (tensor cores), float32 otherwise.
at::ScalarType operand_type(const at::Tensor& student, at::TensorList teachers) {
  bool any_double = student.scalar_type() == at::kDouble;
  bool all_same = true;
  for (const auto& t : teachers) {
    any_double = any_double || t.scalar_type() == at::kDouble;
    all_same = all_same && t.scalar_type() == student.scalar_type();
  }
  if (any_double) return at::kDouble;
  if (all_same && (student.scalar_type() == at::kHalf || student.scalar_type() == at::kBFloat16))
    return student.scalar_type();
  return at::kFloat;
}

// Inputs in the operand type (contiguous; copies only when needed), the workspace of the row
// norms, and the kernel arguments pointing at both.
struct Prepared {
  at::ScalarType op, acc;
  at::Tensor student;
  std::vector<at::Tensor> teachers;
  at::Tensor student_inv_norm, student_sum_sq, teacher_inv_norm;
  cuda::FkdArgs args{};
};

Prepared prepare(const at::Tensor& student, at::TensorList teachers) {
  Prepared p;
  p.op = operand_type(student, teachers);
  p.acc = p.op == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = student.size(0);
  const auto acc_opts = student.options().dtype(p.acc);
  p.student = student.to(p.op).contiguous();
  p.student_inv_norm = at::empty({B}, acc_opts);
  p.student_sum_sq = at::empty({B}, acc_opts);
  p.teacher_inv_norm = at::empty({int64_t(teachers.size()), B}, acc_opts);

  cuda::FkdArgs& a = p.args;
  a.dtype = cuda_dtype(p.op, "fastkd::fkd");
  a.batch = B;
  a.student = p.student.const_data_ptr();
  a.student_width = p.student.size(1);
  a.num_teachers = int(teachers.size());
  int64_t col0 = 0;
  for (size_t e = 0; e < teachers.size(); ++e) {
    p.teachers.push_back(teachers[e].to(p.op).contiguous());
    a.teacher[e] = p.teachers.back().const_data_ptr();
    a.teacher_width[e] = p.teachers.back().size(1);
    a.teacher_col0[e] = col0;
    col0 += a.teacher_width[e];
  }
  a.teacher_total_width = col0;
  a.student_inv_norm = p.student_inv_norm.data_ptr();
  a.student_sum_sq = p.student_sum_sq.data_ptr();
  a.teacher_inv_norm = p.teacher_inv_norm.data_ptr();
  return p;
}

at::Tensor fkd_forward_cuda(const at::Tensor& student, at::TensorList teachers, double kd_weight,
                            double fr_weight) {
  check_inputs(student, teachers);
  const c10::cuda::CUDAGuard guard(student.device());
  Prepared p = prepare(student, teachers);
  at::Tensor partial =
      at::empty({cuda::num_upper_tiles(student.size(0))}, student.options().dtype(at::kDouble));
  at::Tensor loss = at::empty({}, student.options().dtype(p.acc));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cuda::fkd_forward(p.args, kd_weight, fr_weight, partial.data_ptr<double>(),
                                   loss.data_ptr(), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return loss;
}

// Gradients, scaled by `grad` (fkd_backward) or for grad = 1 together with the loss
// (fkd_forward_backward, when `loss` is not null).
std::tuple<at::Tensor, std::vector<at::Tensor>> gradients(const at::Tensor* grad,
                                                          const at::Tensor& student,
                                                          at::TensorList teachers,
                                                          double kd_weight, double fr_weight,
                                                          bool teachers_grad, at::Tensor* loss) {
  check_inputs(student, teachers);
  TORCH_CHECK(grad == nullptr || grad->numel() == 1,
              "fastkd::fkd_backward: grad must hold one value");
  const c10::cuda::CUDAGuard guard(student.device());
  Prepared p = prepare(student, teachers);
  const int64_t B = student.size(0), Ds = student.size(1);
  const auto acc_opts = student.options().dtype(p.acc);
  const auto op_opts = student.options().dtype(p.op);
  const at::Tensor grad_acc = grad ? grad->to(student.device(), p.acc).contiguous() : at::Tensor();

  int sm_count = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, student.get_device()));
  const int splits = cuda::backward_splits(B, p.args.dtype, sm_count);
  at::Tensor acc_student = at::empty({splits, B, Ds}, acc_opts);
  at::Tensor acc_teachers =
      at::empty({teachers_grad ? splits : 0, B, p.args.teacher_total_width}, acc_opts);
  at::Tensor grad_student = at::empty({B, Ds}, op_opts);
  std::vector<at::Tensor> grad_teachers;
  std::vector<void*> grad_teacher_ptrs;
  if (teachers_grad) {
    for (const auto& t : p.teachers) {
      grad_teachers.push_back(at::empty({B, t.size(1)}, op_opts));
      grad_teacher_ptrs.push_back(grad_teachers.back().data_ptr());
    }
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (loss != nullptr) {
    at::Tensor partial =
        at::empty({splits * cuda::num_row_blocks(B)}, student.options().dtype(at::kDouble));
    *loss = at::empty({}, acc_opts);
    C10_CUDA_CHECK(cuda::fkd_forward_backward(
        p.args, kd_weight, fr_weight, splits, partial.data_ptr<double>(), loss->data_ptr(),
        acc_student.data_ptr(), acc_teachers.data_ptr(), teachers_grad, grad_student.data_ptr(),
        grad_teacher_ptrs.data(), stream));
  } else {
    C10_CUDA_CHECK(cuda::fkd_backward(p.args, kd_weight, fr_weight, grad_acc.const_data_ptr(),
                                      splits, acc_student.data_ptr(), acc_teachers.data_ptr(),
                                      teachers_grad, grad_student.data_ptr(),
                                      grad_teacher_ptrs.data(), stream));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (size_t e = 0; e < grad_teachers.size(); ++e) {
    grad_teachers[e] = grad_teachers[e].to(teachers[e].scalar_type());
  }
  return {grad_student.to(student.scalar_type()), grad_teachers};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fkd_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student, at::TensorList teachers, double kd_weight,
    double fr_weight, bool teachers_grad) {
  return gradients(&grad, student, teachers, kd_weight, fr_weight, teachers_grad, nullptr);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> fkd_forward_backward_cuda(
    const at::Tensor& student, at::TensorList teachers, double kd_weight, double fr_weight,
    bool teachers_grad) {
  at::Tensor loss;
  auto [grad_student, grad_teachers] =
      gradients(nullptr, student, teachers, kd_weight, fr_weight, teachers_grad, &loss);
  return {loss, grad_student, grad_teachers};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("fkd_forward", &fkd_forward_cuda);
  m.impl("fkd_backward", &fkd_backward_cuda);
  m.impl("fkd_forward_backward", &fkd_forward_backward_cuda);
}

}  // namespace fastkd
