// ATen wrapper of the RKD-distance CUDA kernels (rkd.cu): input checks, operand dtype, the
// workspace, the current stream, error checks, and the CUDA registrations of
// fastkd::rkd_forward, rkd_backward and rkd_forward_backward. Same op convention as
// csrc/cpu/rkd.cpp.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "dtype_binding.h"
#include "rkd_cuda.h"

namespace fastkd {
namespace {

using rkd_cuda::DType;

bool is_supported(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.dim() == 2 && student.size(0) >= 2 && student.size(1) >= 1,
              "fastkd::rkd: student must be 2-D with at least 2 rows");
  TORCH_CHECK(teacher.dim() == 2 && teacher.size(0) == student.size(0) && teacher.size(1) >= 1,
              "fastkd::rkd: teacher must be 2-D with the student's batch size");
  TORCH_CHECK(teacher.device() == student.device(), "fastkd::rkd: teacher and student devices differ");
  TORCH_CHECK(student.is_cuda(), "fastkd::rkd (CUDA): student and teacher must be CUDA tensors");
  for (const auto* x : {&student, &teacher})
    TORCH_CHECK(is_supported(x->scalar_type()),
                "fastkd::rkd: inputs must be float16, bfloat16, float32 or float64, got ",
                x->scalar_type());
  // The sweep 1/2 grid has one block per upper-triangle tile.
  TORCH_CHECK(rkd_cuda::num_upper_tiles(student.size(0)) <= std::numeric_limits<int32_t>::max(),
              "fastkd::rkd (CUDA): batch size ", student.size(0), " is too large");
}

// Accumulation (and operand) dtype: float64 if any input is float64, else float32.
at::ScalarType acc_type_of(const at::Tensor& student, const at::Tensor& teacher) {
  return student.scalar_type() == at::kDouble || teacher.scalar_type() == at::kDouble ? at::kDouble
                                                                                      : at::kFloat;
}

struct Result {
  at::Tensor loss, grad_student, grad_teacher;
};

// Runs the sweeps; `grad` is the 0-dim upstream gradient (undefined: 1), `gradients` adds sweep 3.
Result rkd_cuda_impl(const at::Tensor& student_in, const at::Tensor& teacher_in,
                     const at::Tensor* grad, bool gradients, bool teacher_grad) {
  check_inputs(student_in, teacher_in);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = acc_type_of(student_in, teacher_in);
  const auto acc_opts = student_in.options().dtype(acc);
  // Operand copies only where needed (other dtype or non-contiguous): O(B*D).
  const at::Tensor student = student_in.to(acc).contiguous();
  const at::Tensor teacher = teacher_in.to(acc).contiguous();
  const int64_t B = student.size(0), Ds = student.size(1), Dt = teacher.size(1);
  const rkd_cuda::Plan plan = rkd_cuda::make_plan(B, Ds, Dt, student.get_device());

  Result out;
  out.loss = at::empty({}, acc_opts);
  at::Tensor grad_acc;
  if (grad != nullptr) {
    TORCH_CHECK(grad->numel() == 1, "fastkd::rkd: grad must hold one value, got ", grad->numel());
    grad_acc = grad->to(student.device(), acc).contiguous();  // stays on the device: no sync
  }
  rkd_cuda::Args args;
  args.is_double = acc == at::kDouble;
  args.student = student.const_data_ptr();
  args.teacher = teacher.const_data_ptr();
  args.loss = out.loss.data_ptr();
  args.grad = grad_acc.defined() ? grad_acc.const_data_ptr() : nullptr;
  if (gradients) {
    // Contiguous, in each input's own dtype.
    out.grad_student = at::empty({B, Ds}, student_in.options());
    args.grad_student = out.grad_student.data_ptr();
    args.out_s = cuda_dtype(student_in.scalar_type(), "fastkd::rkd");
    if (teacher_grad) {
      out.grad_teacher = at::empty({B, Dt}, teacher_in.options());
      args.grad_teacher = out.grad_teacher.data_ptr();
      args.out_t = cuda_dtype(teacher_in.scalar_type(), "fastkd::rkd");
    } else {
      out.grad_teacher = at::empty({0}, teacher_in.options());
    }
  }
  const size_t bytes =
      rkd_cuda::workspace_bytes(plan, args.is_double, gradients, gradients && teacher_grad);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(bytes)}, student_in.options().dtype(at::kByte));
  args.workspace = workspace.data_ptr();
  C10_CUDA_CHECK(rkd_cuda::run(args, plan, stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor rkd_forward_cuda(const at::Tensor& student, const at::Tensor& teacher) {
  return rkd_cuda_impl(student, teacher, nullptr, false, false).loss;
}

std::tuple<at::Tensor, at::Tensor> rkd_backward_cuda(const at::Tensor& grad,
                                                     const at::Tensor& student,
                                                     const at::Tensor& teacher, bool teacher_grad) {
  Result r = rkd_cuda_impl(student, teacher, &grad, true, teacher_grad);
  return {r.grad_student, r.grad_teacher};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_forward_backward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, bool teacher_grad) {
  Result r = rkd_cuda_impl(student, teacher, nullptr, true, teacher_grad);
  return {r.loss, r.grad_student, r.grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("rkd_forward", &rkd_forward_cuda);
  m.impl("rkd_backward", &rkd_backward_cuda);
  m.impl("rkd_forward_backward", &rkd_forward_backward_cuda);
}

}  // namespace fastkd
