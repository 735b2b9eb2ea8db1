// Host interface of the RKD-distance CUDA kernels (rkd.cu): plain pointers and a stream, so that
// the .cu file compiles without torch headers. The at::Tensor side is rkd_binding.cpp; the shape
// every op follows is described in launch.h.
//
// The features arrive in the operand dtype: double when any input is float64, float otherwise
// (the binding converts half, bfloat16 and mixed inputs once, O(B*D)). The gradients are written
// in each input's own dtype (`grad_student_dtype`, `grad_teacher_dtype`). Layouts are row-major
// and contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "launch.h"

namespace fastkd {
namespace cuda {

struct RkdArgs {
  DType dtype = DType::kFloat;     // operand dtype: kDouble or kFloat
  Precision precision = Precision::kIeee;  // float32 operands (not used by rkd.cu yet)
  int64_t batch = 0;               // B >= 2
  int64_t student_width = 0;       // Ds
  int64_t teacher_width = 0;       // Dt
  const void* student = nullptr;   // (B, Ds), operand dtype
  const void* teacher = nullptr;   // (B, Dt), operand dtype
  void* loss = nullptr;            // 0-dim, operand dtype; may be null in rkd_backward
  const void* grad = nullptr;      // rkd_backward: 0-dim upstream gradient, operand dtype; null: 1
  void* grad_student = nullptr;    // (B, Ds) in grad_student_dtype
  void* grad_teacher = nullptr;    // (B, Dt) in grad_teacher_dtype; null: not wanted
  DType grad_student_dtype = DType::kFloat, grad_teacher_dtype = DType::kFloat;
  int sm_count = 1;                // multiprocessors of the device: rkd_splits
  int splits = 0;                  // > 0: this many ranges instead (the emulator)
  void* workspace = nullptr;       // rkd_workspace_bytes(*this, pass) bytes
};

// Sweep 3 cuts the column blocks J of each row block into ranges, each handled by its own block
// with its own accumulator, so that small batches still fill the GPU: about 2 blocks per SM, at
// most kMaxSplits and one row block per range (or args.splits, clamped the same way).
int64_t rkd_splits(const RkdArgs& args);

size_t rkd_workspace_bytes(const RkdArgs& args, Pass pass);

// Sweeps 1 and 2: the means, then the loss.
cudaError_t rkd_forward(const RkdArgs& args, cudaStream_t stream);

// Sweeps 1 and 2 (the c terms; the loss too when args.loss is set), then sweep 3: the gradients
// scaled by *args.grad.
cudaError_t rkd_backward(const RkdArgs& args, cudaStream_t stream);

// Loss and gradients (grad = 1) from the same sweeps.
cudaError_t rkd_forward_backward(const RkdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkd
