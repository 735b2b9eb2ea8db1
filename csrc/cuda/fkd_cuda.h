// Host interface of the FKD CUDA kernels (fkd.cu, compiled by nvcc without torch headers so it
// builds fast); the at::Tensor side is fkd_binding.cpp. The shape every op follows is described
// in launch.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch.h"

namespace fastkd {
namespace cuda {

constexpr int kMaxTeachers = 64;  // ensemble size carried in the kernel parameters

// Backward: kernel tiles whose difference is kept in shared memory before it multiplies the
// features (a wider K for the second product means fewer read-modify-writes of the accumulator).
constexpr int group_tiles(DType t) {
  return t == DType::kDouble ? 1 : t == DType::kFloat ? 2 : 4;
}

// Backward: how many ways the J loop of each row block is split. Each split owns a B x D
// accumulator, summed in a fixed order afterwards, so the result does not depend on timing; the
// count only depends on B, the dtype and the device's SM count. More splits fill a GPU whose
// SM count exceeds the number of row blocks (small B).
constexpr int backward_splits(int64_t batch, DType t, int sm_count) {
  const int64_t blocks = num_row_blocks(batch);
  const int64_t groups = (blocks + group_tiles(t) - 1) / group_tiles(t);
  int64_t want = (2 * int64_t(sm_count) + blocks - 1) / blocks;  // two waves of blocks
  if (want > groups) want = groups;
  if (want > kMaxSplits) want = kMaxSplits;
  return want < 1 ? 1 : int(want);
}

// Everything the launchers and the tile kernels read; passed by value as a kernel parameter
// (~2.2 KB). `dtype` is the operand type of every input: float64 if any input is float64,
// float16 / bfloat16 when all inputs have it, float32 otherwise (the binding converts). The
// accumulation type is double for kDouble, float otherwise.
struct FkdArgs {
  DType dtype = DType::kFloat;
  Precision precision = Precision::kIeee;  // float32 operands: CUDA cores, TF32 or split TF32
  int64_t batch = 0;                     // B
  const void* student = nullptr;         // B x Ds, contiguous, operand type
  int64_t student_width = 0;             // Ds
  int num_teachers = 0;                  // E, 1 <= E <= kMaxTeachers
  const void* teacher[kMaxTeachers]{};   // B x Dt_e each, contiguous, operand type
  int64_t teacher_width[kMaxTeachers]{}; // Dt_e
  int64_t teacher_col0[kMaxTeachers]{};  // first column of teacher e in the teacher accumulator
  int64_t teacher_total_width = 0;       // sum of Dt_e
  double kd_weight = 0, fr_weight = 0;
  // fkd_backward: the 0-dim upstream gradient (accumulation type, on the device); null means 1.
  const void* grad = nullptr;
  bool teachers_grad = false;            // also the teachers' gradients
  int sm_count = 1;                      // multiprocessors of the device: fkd_splits
  int splits = 0;                        // > 0: this many splits instead (the emulator)
  // Outputs.
  void* loss = nullptr;                  // 0-dim, accumulation type (forward, forward_backward)
  void* grad_student = nullptr;          // B x Ds, operand type (backward, forward_backward)
  void* grad_teacher[kMaxTeachers]{};    // B x Dt_e, operand type, when teachers_grad
  void* workspace = nullptr;             // fkd_workspace_bytes(*this, pass) bytes
  // Set by the launchers from `workspace` (accumulation type):
  void* student_inv_norm = nullptr;      // B: 1 / max(||fs_i||, eps)
  void* student_sum_sq = nullptr;        // B: ||fs_i||^2 (feature regulariser)
  void* teacher_inv_norm = nullptr;      // E x B
};

// Splits of the backward's J loop: args.splits (clamped to 1..kMaxSplits) if set, else
// backward_splits for args.sm_count.
int fkd_splits(const FkdArgs& args);

size_t fkd_workspace_bytes(const FkdArgs& args, Pass pass);

// loss = kd_weight * distil + fr_weight * featreg.
cudaError_t fkd_forward(const FkdArgs& args, cudaStream_t stream);

// Gradients of fkd_forward scaled by *args.grad: grad_student and, with teachers_grad,
// grad_teacher[e].
cudaError_t fkd_backward(const FkdArgs& args, cudaStream_t stream);

// Loss and gradients (for grad = 1) from one sweep over the kernel tiles: the backward sweep
// visits every tile anyway.
cudaError_t fkd_forward_backward(const FkdArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkd
