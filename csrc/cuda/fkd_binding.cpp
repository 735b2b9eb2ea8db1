// ATen wrapper of the FKD CUDA kernels (fkd.cu): input checks, operand dtype, outputs, and the
// CUDA registrations of fastkd::fkd_forward, fkd_backward and fkd_forward_backward. Same op
// convention as csrc/cpu/fkd.cpp; the binding pattern is binding.h's.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "binding.h"
#include "fkd_cuda.h"

namespace fastkd {
namespace {

constexpr const char* kOp = "fastkd::fkd";

void check_inputs(const at::Tensor& student, at::TensorList teachers) {
  check_student(student, kOp);
  cuda::check_cuda_features(student, kOp, "student");
  TORCH_CHECK(!teachers.empty(), kOp, ": at least one teacher is required");
  TORCH_CHECK_VALUE(teachers.size() <= size_t(cuda::kMaxTeachers), kOp,
                    " (CUDA): teachers: at most ", cuda::kMaxTeachers,
                    " teachers are supported, got ", teachers.size());
  for (const auto& t : teachers) {
    check_partner(student, t, kOp, "each teacher");
    check_float_dtype(t, kOp, "teachers");
  }
  cuda::check_tile_grid(student.size(0), kOp);
}

// One operand type for every GEMM: float64 if any input is float64 (accumulation in float64,
// as on the CPU), float16 / bfloat16 when every input has it (tensor cores), float32 otherwise.
at::ScalarType operand_type(const at::Tensor& student, at::TensorList teachers) {
  if (acc_type_of(student, teachers) == at::kDouble) return at::kDouble;
  bool all_same = true;
  for (const auto& t : teachers) all_same = all_same && t.scalar_type() == student.scalar_type();
  if (all_same && (student.scalar_type() == at::kHalf || student.scalar_type() == at::kBFloat16))
    return student.scalar_type();
  return at::kFloat;
}

// Inputs in the operand type (contiguous; copies only when needed) and the arguments pointing at
// them.
struct Call {
  at::ScalarType op, acc;
  at::Tensor student;
  std::vector<at::Tensor> teachers;
  cuda::FkdArgs args;
};

Call prepare(const at::Tensor& student, at::TensorList teachers, double kd_weight,
             double fr_weight, bool teachers_grad, cuda::Precision precision, int sm_count) {
  Call c;
  c.op = operand_type(student, teachers);
  c.acc = c.op == at::kDouble ? at::kDouble : at::kFloat;
  c.student = student.to(c.op).contiguous();
  cuda::FkdArgs& a = c.args;
  a.dtype = cuda::dtype_of(c.op, kOp);
  a.batch = student.size(0);
  a.student = c.student.const_data_ptr();
  a.student_width = c.student.size(1);
  a.num_teachers = int(teachers.size());
  int64_t col0 = 0;
  for (size_t e = 0; e < teachers.size(); ++e) {
    c.teachers.push_back(teachers[e].to(c.op).contiguous());
    a.teacher[e] = c.teachers.back().const_data_ptr();
    a.teacher_width[e] = c.teachers.back().size(1);
    a.teacher_col0[e] = col0;
    col0 += a.teacher_width[e];
  }
  a.teacher_total_width = col0;
  a.kd_weight = kd_weight;
  a.fr_weight = fr_weight;
  a.teachers_grad = teachers_grad;
  a.precision = precision;
  a.sm_count = sm_count;
  return c;
}

at::Tensor fkd_forward_cuda(const at::Tensor& student, at::TensorList teachers, double kd_weight,
                            double fr_weight, c10::string_view precision) {
  check_inputs(student, teachers);
  const cuda::Precision prec = cuda::precision_of(precision, kOp);
  const cuda::Launch launch(student);
  Call c = prepare(student, teachers, kd_weight, fr_weight, false, prec, launch.sm_count);
  at::Tensor loss = at::empty({}, student.options().dtype(c.acc));
  c.args.loss = loss.data_ptr();
  const at::Tensor ws = launch.workspace(
      cuda::fkd_workspace_bytes(c.args, cuda::Pass::kForward), student);
  c.args.workspace = ws.data_ptr();
  launch.check(cuda::fkd_forward(c.args, launch.stream));
  return loss;
}

// Gradients, scaled by `grad` (fkd_backward) or for grad = 1 together with the loss
// (fkd_forward_backward, when `loss` is not null).
std::tuple<at::Tensor, std::vector<at::Tensor>> gradients(const at::Tensor* grad,
                                                          const at::Tensor& student,
                                                          at::TensorList teachers,
                                                          double kd_weight, double fr_weight,
                                                          bool teachers_grad,
                                                          c10::string_view precision,
                                                          at::Tensor* loss) {
  check_inputs(student, teachers);
  const cuda::Precision prec = cuda::precision_of(precision, kOp);
  TORCH_CHECK(grad == nullptr || grad->numel() == 1, kOp, "_backward: grad must hold one value");
  const cuda::Launch launch(student);
  Call c = prepare(student, teachers, kd_weight, fr_weight, teachers_grad, prec, launch.sm_count);
  const cuda::Pass pass = loss ? cuda::Pass::kForwardBackward : cuda::Pass::kBackward;
  const auto op_opts = student.options().dtype(c.op);
  // Stays on the device: the kernels read it (no host sync).
  const at::Tensor grad_acc = grad ? grad->to(student.device(), c.acc).contiguous() : at::Tensor();
  c.args.grad = grad ? grad_acc.const_data_ptr() : nullptr;
  if (loss) {
    *loss = at::empty({}, student.options().dtype(c.acc));
    c.args.loss = loss->data_ptr();
  }
  at::Tensor grad_student = at::empty_like(c.student, op_opts);
  c.args.grad_student = grad_student.data_ptr();
  std::vector<at::Tensor> grad_teachers;
  if (teachers_grad) {
    for (size_t e = 0; e < c.teachers.size(); ++e) {
      grad_teachers.push_back(at::empty_like(c.teachers[e], op_opts));
      c.args.grad_teacher[e] = grad_teachers.back().data_ptr();
    }
  }
  const at::Tensor ws = launch.workspace(cuda::fkd_workspace_bytes(c.args, pass), student);
  c.args.workspace = ws.data_ptr();
  launch.check(loss ? cuda::fkd_forward_backward(c.args, launch.stream)
                    : cuda::fkd_backward(c.args, launch.stream));
  for (size_t e = 0; e < grad_teachers.size(); ++e)
    grad_teachers[e] = grad_teachers[e].to(teachers[e].scalar_type());
  return {grad_student.to(student.scalar_type()), grad_teachers};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fkd_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student, at::TensorList teachers, double kd_weight,
    double fr_weight, bool teachers_grad, c10::string_view precision) {
  return gradients(&grad, student, teachers, kd_weight, fr_weight, teachers_grad, precision,
                   nullptr);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> fkd_forward_backward_cuda(
    const at::Tensor& student, at::TensorList teachers, double kd_weight, double fr_weight,
    bool teachers_grad, c10::string_view precision) {
  at::Tensor loss;
  auto [grad_student, grad_teachers] = gradients(nullptr, student, teachers, kd_weight,
                                                 fr_weight, teachers_grad, precision, &loss);
  return {loss, grad_student, grad_teachers};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("fkd_forward", &fkd_forward_cuda);
  m.impl("fkd_backward", &fkd_backward_cuda);
  m.impl("fkd_forward_backward", &fkd_forward_backward_cuda);
}

}  // namespace fastkd
