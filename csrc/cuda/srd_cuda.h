// Host interface of the SRD CUDA kernels (srd.cu): plain pointers and a stream, so that the .cu
// file compiles without torch headers. The at::Tensor side is srd_binding.cpp; the shape every
// op follows is described in launch.h.
//
// Pointers typed `void*` below are arrays of the accumulation dtype (float for half, bfloat16 and
// float features, double for double) unless they say "features". Layouts are row-major:
//   stats (4, D): mean, biased var, centre = mean - z[0, j], rstd   (srd::StatsRow)
//   sums  (4, D): sum_b |d|^p, sum_b h, sum_b h*s, sum_b h*t        (srd::SumsRow)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch.h"

namespace fastkd {
namespace cuda {

struct SrdArgs {
  DType dtype = DType::kFloat;      // the features dtype
  int64_t batch = 0, width = 0;     // B, D
  const void* student = nullptr;    // (B, D) features, contiguous
  const void* teacher = nullptr;    // (B, D) features, contiguous
  double p = 4.0, eps = 1e-4;
  bool training = true;             // batch statistics (else the caller's, from running buffers)
  // srd_forward writes them in training and reads them otherwise; srd_backward reads them.
  void* stats_s = nullptr;
  void* stats_t = nullptr;
  // srd_forward writes them; srd_backward reads sums and total.
  void* sums = nullptr;
  void* total = nullptr;            // S, 0-dim
  void* loss = nullptr;             // log(max(S, tiny)), 0-dim
  const void* grad = nullptr;       // srd_backward: 0-dim upstream gradient, on the device
  void* grad_student = nullptr;     // (B, D) features dtype
  void* grad_teacher = nullptr;     // (B, D) features dtype; null: not wanted
  int sm_count = 1;                 // multiprocessors of the device: srd_splits
  int splits = 0;                   // > 0: this many row splits instead (the emulator)
  void* workspace = nullptr;        // srd_workspace_bytes(*this, pass) bytes
};

// Row splits of the batch, each handled by its own blocks so that narrow features still fill the
// GPU: aiming at 8 blocks per SM, splits of at least 64 rows, at most 256 (or args.splits,
// clamped to 1..B). Depends on B, D, the dtype and sm_count only, not on the pointers.
int64_t srd_splits(const SrdArgs& args);

size_t srd_workspace_bytes(const SrdArgs& args, Pass pass);

// Batch statistics of both sides (training), column sums, S and the loss.
cudaError_t srd_forward(const SrdArgs& args, cudaStream_t stream);

// Gradients of the features (features dtype) from the forward's stats, sums and total.
cudaError_t srd_backward(const SrdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkd
