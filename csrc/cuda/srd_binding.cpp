// at::Tensor side of the SRD CUDA kernels (csrc/cuda/srd.cu): checks, allocations, the current
// stream, and the CUDA registrations of fastkd::srd_forward / srd_backward.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "fastkd/srd_host.h"
#include "fastkd/srd_math.h"
#include "dtype_binding.h"
#include "srd_cuda.h"

namespace fastkd {
namespace {

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(), "fastkd::srd: CUDA tensors expected");
  srd::check_pair(student, teacher);
}

srd_cuda::DType dtype_of(const at::Tensor& x) {
  return cuda_dtype(x.scalar_type(), "fastkd::srd");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> srd_forward_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double p, double eps,
    bool training, const std::optional<at::Tensor>& running_mean_s,
    const std::optional<at::Tensor>& running_var_s, const std::optional<at::Tensor>& running_mean_t,
    const std::optional<at::Tensor>& running_var_t) {
  check_inputs(student_in, teacher_in);
  TORCH_CHECK(p >= 1, "fastkd::srd: p must be >= 1, got ", p);
  const int64_t B = student_in.size(0), D = student_in.size(1);
  TORCH_CHECK(!training || B >= 2, "fastkd::srd: training mode needs a batch of at least 2 rows");
  const c10::cuda::CUDAGuard guard(student_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = srd::acc_type_of(student);
  const auto opts = student.options().dtype(acc);
  const srd_cuda::Plan plan = srd_cuda::make_plan(B, D, student.get_device());
  at::Tensor workspace = at::empty({srd_cuda::workspace_elements(plan)}, opts);
  at::Tensor stats_s, stats_t;
  if (training) {
    stats_s = at::empty({4, D}, opts);
    stats_t = at::empty({4, D}, opts);
    C10_CUDA_CHECK(srd_cuda::forward_stats(dtype_of(student), student.const_data_ptr(),
                                           teacher.const_data_ptr(), plan, eps,
                                           workspace.data_ptr(), stats_s.data_ptr(),
                                           stats_t.data_ptr(), stream));
  } else {
    stats_s = srd::stats_from_running(student, running_mean_s, running_var_s, eps, acc, "student");
    stats_t = srd::stats_from_running(teacher, running_mean_t, running_var_t, eps, acc, "teacher");
  }
  at::Tensor sums = at::empty({4, D}, opts);
  at::Tensor total = at::empty({}, opts);
  at::Tensor loss = at::empty({}, opts);
  C10_CUDA_CHECK(srd_cuda::forward_sums(dtype_of(student), student.const_data_ptr(),
                                        teacher.const_data_ptr(), plan, p,
                                        stats_s.const_data_ptr(), stats_t.const_data_ptr(),
                                        workspace.data_ptr(), sums.data_ptr(), total.data_ptr(),
                                        loss.data_ptr(), stream));
  return {loss, total, stats_s, stats_t, sums};
}

std::tuple<at::Tensor, at::Tensor> srd_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student_in, const at::Tensor& teacher_in, double p,
    bool training, const at::Tensor& total, const at::Tensor& stats_s,
    const at::Tensor& stats_t, const at::Tensor& sums, bool teacher_grad) {
  check_inputs(student_in, teacher_in);
  const int64_t B = student_in.size(0), D = student_in.size(1);
  srd::check_backward_tables(stats_s, stats_t, sums, D);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = srd::acc_type_of(student);
  const auto prep = [&](const at::Tensor& t) { return t.to(student.device(), acc).contiguous(); };
  const at::Tensor grad_acc = prep(grad), total_acc = prep(total);
  const at::Tensor ss = prep(stats_s), st = prep(stats_t), sm = prep(sums);
  at::Tensor grad_student = at::empty_like(student);
  at::Tensor grad_teacher =
      teacher_grad ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  const srd_cuda::Plan plan = srd_cuda::make_plan(B, D, student.get_device());
  C10_CUDA_CHECK(srd_cuda::backward(
      dtype_of(student), grad_acc.const_data_ptr(), total_acc.const_data_ptr(),
      student.const_data_ptr(), teacher.const_data_ptr(), plan, p, training, ss.const_data_ptr(),
      st.const_data_ptr(), sm.const_data_ptr(), grad_student.data_ptr(),
      teacher_grad ? grad_teacher.data_ptr() : nullptr, stream));
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("srd_forward", &srd_forward_cuda);
  m.impl("srd_backward", &srd_backward_cuda);
}

}  // namespace fastkd
