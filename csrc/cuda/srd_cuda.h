// Host interface of the SRD CUDA kernels (csrc/cuda/srd.cu): plain pointers and a stream, so that
// the .cu file compiles without torch headers. The at::Tensor side is csrc/cuda/srd_binding.cpp.
//
// Pointers typed `void*` below are arrays of the accumulation dtype (float for half, bfloat16 and
// float inputs, double for double) unless they say "features". Layouts are row-major:
//   stats (4, D): mean, biased var, centre = mean - z[0, j], rstd   (srd::StatsRow)
//   sums  (4, D): sum_b |d|^p, sum_b h, sum_b h*s, sum_b h*t        (srd::SumsRow)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace fastkd {
namespace srd_cuda {

using DType = ::fastkd::CudaDType;

// How the batch is cut: n_splits slices of rows_per_split rows (the last may be shorter), each
// handled by its own blocks so that small widths still fill the GPU.
struct Plan {
  int64_t batch;
  int64_t width;
  int64_t rows_per_split;
  int64_t n_splits;
};

Plan make_plan(int64_t batch, int64_t width, int device);

// Elements of the accumulation dtype the caller allocates as `workspace` for each pass.
inline int64_t workspace_elements(const Plan& plan) { return 4 * plan.n_splits * plan.width; }

// Pass 1 (training): batch statistics of both sides into stats_s and stats_t.
cudaError_t forward_stats(DType dtype, const void* student, const void* teacher, const Plan& plan,
                          double eps, void* workspace, void* stats_s, void* stats_t,
                          cudaStream_t stream);

// Pass 2: column sums, S (`total`, 0-dim) and loss = log(max(S, tiny)) (0-dim).
cudaError_t forward_sums(DType dtype, const void* student, const void* teacher, const Plan& plan,
                         double p, const void* stats_s, const void* stats_t, void* workspace,
                         void* sums, void* total, void* loss, cudaStream_t stream);

// Gradients of the features (features dtype); grad_teacher may be null (not wanted). `grad` and
// `total` are 0-dim device tensors.
cudaError_t backward(DType dtype, const void* grad, const void* total, const void* student,
                     const void* teacher, const Plan& plan, double p, bool training,
                     const void* stats_s, const void* stats_t, const void* sums,
                     void* grad_student, void* grad_teacher, cudaStream_t stream);

}  // namespace srd_cuda
}  // namespace fastkd
