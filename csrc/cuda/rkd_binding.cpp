// ATen wrapper of the RKD-distance CUDA kernels (rkd.cu): input checks, operand dtype, outputs,
// and the CUDA registrations of fastkd::rkd_forward, rkd_backward and rkd_forward_backward. Same
// op convention as csrc/cpu/rkd.cpp; the binding pattern is binding.h's.
#include <torch/library.h>

#include <tuple>

#include "binding.h"
#include "rkd_cuda.h"

namespace fastkd {
namespace {

constexpr const char* kOp = "fastkd::rkd";

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  check_student(student, kOp, 2);
  check_partner(student, teacher, kOp, "teacher");
  cuda::check_cuda_features(student, kOp, "student");
  check_float_dtype(teacher, kOp, "teacher");
  cuda::check_tile_grid(student.size(0), kOp);
}

struct Result {
  at::Tensor loss, grad_student, grad_teacher;
};

// One op call. `grad`: the 0-dim upstream gradient (null: 1); pass kForward runs sweeps 1 and 2
// only.
Result rkd_cuda_impl(const at::Tensor& student_in, const at::Tensor& teacher_in,
                     const at::Tensor* grad, cuda::Pass pass, bool teacher_grad,
                     c10::string_view precision) {
  check_inputs(student_in, teacher_in);
  const cuda::Precision prec = cuda::precision_of(precision, kOp);
  const cuda::Launch launch(student_in);
  const at::ScalarType acc = acc_type_of(student_in, teacher_in);
  // Operand copies only where needed (other dtype or non-contiguous): O(B*D).
  const at::Tensor student = student_in.to(acc).contiguous();
  const at::Tensor teacher = teacher_in.to(acc).contiguous();
  cuda::RkdArgs a;
  a.dtype = cuda::dtype_of(acc, kOp);
  a.batch = student.size(0);
  a.student_width = student.size(1);
  a.teacher_width = teacher.size(1);
  a.student = student.const_data_ptr();
  a.teacher = teacher.const_data_ptr();
  a.precision = prec;
  a.sm_count = launch.sm_count;

  Result out;
  if (pass != cuda::Pass::kBackward) {
    out.loss = at::empty({}, student.options());
    a.loss = out.loss.data_ptr();
  }
  at::Tensor grad_acc;
  if (grad != nullptr) {
    TORCH_CHECK(grad->numel() == 1, kOp, ": grad must hold one value, got ", grad->numel());
    grad_acc = grad->to(student.device(), acc).contiguous();  // stays on the device: no sync
    a.grad = grad_acc.const_data_ptr();
  }
  if (pass != cuda::Pass::kForward) {
    // Contiguous, in each input's own dtype.
    out.grad_student = at::empty(student_in.sizes(), student_in.options());
    a.grad_student = out.grad_student.data_ptr();
    a.grad_student_dtype = cuda::dtype_of(student_in.scalar_type(), kOp);
    if (teacher_grad) {
      out.grad_teacher = at::empty(teacher_in.sizes(), teacher_in.options());
      a.grad_teacher = out.grad_teacher.data_ptr();
      a.grad_teacher_dtype = cuda::dtype_of(teacher_in.scalar_type(), kOp);
    } else {
      out.grad_teacher = at::empty({0}, teacher_in.options());
    }
  }
  const at::Tensor ws = launch.workspace(cuda::rkd_workspace_bytes(a, pass), student);
  a.workspace = ws.data_ptr();
  launch.check(pass == cuda::Pass::kForward    ? cuda::rkd_forward(a, launch.stream)
               : pass == cuda::Pass::kBackward ? cuda::rkd_backward(a, launch.stream)
                                               : cuda::rkd_forward_backward(a, launch.stream));
  return out;
}

at::Tensor rkd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                            c10::string_view precision) {
  return rkd_cuda_impl(student, teacher, nullptr, cuda::Pass::kForward, false, precision).loss;
}

std::tuple<at::Tensor, at::Tensor> rkd_backward_cuda(const at::Tensor& grad,
                                                     const at::Tensor& student,
                                                     const at::Tensor& teacher, bool teacher_grad,
                                                     c10::string_view precision) {
  Result r =
      rkd_cuda_impl(student, teacher, &grad, cuda::Pass::kBackward, teacher_grad, precision);
  return {r.grad_student, r.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_forward_backward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, bool teacher_grad,
    c10::string_view precision) {
  Result r = rkd_cuda_impl(student, teacher, nullptr, cuda::Pass::kForwardBackward, teacher_grad,
                           precision);
  return {r.loss, r.grad_student, r.grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("rkd_forward", &rkd_forward_cuda);
  m.impl("rkd_backward", &rkd_backward_cuda);
  m.impl("rkd_forward_backward", &rkd_forward_backward_cuda);
}

}  // namespace fastkd
