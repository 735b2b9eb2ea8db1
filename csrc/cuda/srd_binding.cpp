// ATen wrapper of the SRD CUDA kernels (srd.cu): input checks, outputs, and the CUDA
// registrations of fastkd::srd_forward / srd_backward. Same op convention as csrc/cpu/srd.cpp;
// the binding pattern is binding.h's.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "binding.h"
#include "fastkd/srd_host.h"
#include "srd_cuda.h"

namespace fastkd {
namespace {

constexpr const char* kOp = "fastkd::srd";

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  srd::check_pair(student, teacher);
  cuda::check_cuda_features(student, kOp, "student");
}

// The arguments both ops share; the features contiguous (copies only when needed).
cuda::SrdArgs args_of(const at::Tensor& student, const at::Tensor& teacher, double p,
                      bool training, const cuda::Launch& launch) {
  cuda::SrdArgs a;
  a.dtype = cuda::dtype_of(student.scalar_type(), kOp);
  a.batch = student.size(0);
  a.width = student.size(1);
  a.student = student.const_data_ptr();
  a.teacher = teacher.const_data_ptr();
  a.p = p;
  a.training = training;
  a.sm_count = launch.sm_count;
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> srd_forward_cuda(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double p, double eps,
    bool training, const std::optional<at::Tensor>& running_mean_s,
    const std::optional<at::Tensor>& running_var_s, const std::optional<at::Tensor>& running_mean_t,
    const std::optional<at::Tensor>& running_var_t) {
  check_inputs(student_in, teacher_in);
  srd::check_forward_args(student_in, p, training);
  const cuda::Launch launch(student_in);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = acc_type_of(student);
  const auto opts = student.options().dtype(acc);
  cuda::SrdArgs a = args_of(student, teacher, p, training, launch);
  a.eps = eps;
  at::Tensor stats_s, stats_t;
  std::tie(stats_s, stats_t) = srd::forward_stats(student, teacher, training, running_mean_s,
                                                  running_var_s, running_mean_t, running_var_t,
                                                  eps, acc);
  at::Tensor sums = at::empty({4, student.size(1)}, opts);
  at::Tensor total = at::empty({}, opts);
  at::Tensor loss = at::empty({}, opts);
  a.stats_s = stats_s.data_ptr();
  a.stats_t = stats_t.data_ptr();
  a.sums = sums.data_ptr();
  a.total = total.data_ptr();
  a.loss = loss.data_ptr();
  const at::Tensor ws =
      launch.workspace(cuda::srd_workspace_bytes(a, cuda::Pass::kForward), student);
  a.workspace = ws.data_ptr();
  launch.check(cuda::srd_forward(a, launch.stream));
  return {loss, total, stats_s, stats_t, sums};
}

std::tuple<at::Tensor, at::Tensor> srd_backward_cuda(
    const at::Tensor& grad, const at::Tensor& student_in, const at::Tensor& teacher_in, double p,
    bool training, const at::Tensor& total, const at::Tensor& stats_s,
    const at::Tensor& stats_t, const at::Tensor& sums, bool teacher_grad) {
  check_inputs(student_in, teacher_in);
  srd::check_backward_tables(stats_s, stats_t, sums, student_in.size(1));
  const cuda::Launch launch(student_in);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = acc_type_of(student);
  // On the device in the accumulation dtype: the kernel reads them (no host sync).
  const auto prep = [&](const at::Tensor& t) { return t.to(student.device(), acc).contiguous(); };
  const at::Tensor grad_acc = prep(grad), total_acc = prep(total);
  const at::Tensor ss = prep(stats_s), st = prep(stats_t), sm = prep(sums);
  at::Tensor grad_student = at::empty_like(student);
  at::Tensor grad_teacher =
      teacher_grad ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  cuda::SrdArgs a = args_of(student, teacher, p, training, launch);
  a.grad = grad_acc.const_data_ptr();
  a.total = total_acc.data_ptr();  // read only
  a.stats_s = ss.data_ptr();
  a.stats_t = st.data_ptr();
  a.sums = sm.data_ptr();
  a.grad_student = grad_student.data_ptr();
  a.grad_teacher = teacher_grad ? grad_teacher.data_ptr() : nullptr;
  launch.check(cuda::srd_backward(a, launch.stream));
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CUDA, m) {
  m.impl("srd_forward", &srd_forward_cuda);
  m.impl("srd_backward", &srd_backward_cuda);
}

}  // namespace fastkd
