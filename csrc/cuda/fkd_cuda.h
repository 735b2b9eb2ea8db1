// Interface between the FKD CUDA kernels (fkd.cu, compiled by nvcc without torch headers so it
// builds fast) and their ATen wrapper (fkd_binding.cpp): plain pointers, sizes and a stream.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "dtype.h"

namespace fastkd {
namespace cuda {

// Operand type of the GEMM tiles. The accumulation type is double for kDouble, float otherwise.
using DType = ::fastkd::CudaDType;

constexpr int kTile = 64;          // rows (and columns) of a kernel tile
constexpr int kMaxTeachers = 64;   // ensemble size carried in the kernel parameters
constexpr int kMaxSplits = 8;      // backward: partial accumulators per row block, at most

// Backward: kernel tiles whose difference is kept in shared memory before it multiplies the
// features (a wider K for the second product means fewer read-modify-writes of the accumulator).
constexpr int group_tiles(DType t) {
  return t == DType::kDouble ? 1 : t == DType::kFloat ? 2 : 4;
}

constexpr int64_t num_row_blocks(int64_t batch) { return (batch + kTile - 1) / kTile; }

// Forward grid: the tiles (I, J) with J >= I.
constexpr int64_t num_upper_tiles(int64_t batch) {
  return num_row_blocks(batch) * (num_row_blocks(batch) + 1) / 2;
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

// Everything the tile kernels read. Passed by value as a kernel parameter (~1.6 KB).
struct FkdArgs {
  DType dtype;
  int64_t batch;                         // B
  const void* student;                   // B x Ds, contiguous, operand type
  int64_t student_width;                 // Ds
  int num_teachers;                      // E, 1 <= E <= kMaxTeachers
  const void* teacher[kMaxTeachers];     // B x Dt_e each, contiguous, operand type
  int64_t teacher_width[kMaxTeachers];   // Dt_e
  int64_t teacher_col0[kMaxTeachers];    // first column of teacher e in the teacher accumulator
  int64_t teacher_total_width;           // sum of Dt_e
  // Workspace written by the kernels (accumulation type):
  void* student_inv_norm;                // B: 1 / max(||fs_i||, eps)
  void* student_sum_sq;                  // B: ||fs_i||^2 (feature regulariser)
  void* teacher_inv_norm;                // E x B
};

// loss (0-dim, accumulation type) = kd_weight * distil + fr_weight * featreg. tile_partials:
// num_upper_tiles(B) doubles of scratch. Returns the first CUDA error of the set-up calls; kernel
// launch errors are left for cudaGetLastError.
cudaError_t fkd_forward(const FkdArgs& args, double kd_weight, double fr_weight,
                        double* tile_partials, void* loss, cudaStream_t stream);

// Gradients of fkd_forward scaled by *grad (one value of the accumulation type, on the device).
// acc_student: splits x B x Ds, acc_teachers: splits x B x sum(Dt_e) (accumulation type,
// scratch; acc_teachers unused unless teachers_grad). grad_student: B x Ds, grad_teachers[e]:
// B x Dt_e, both in the operand type; grad_teachers is a host array of E device pointers, read
// only when teachers_grad.
cudaError_t fkd_backward(const FkdArgs& args, double kd_weight, double fr_weight,
                         const void* grad, int splits, void* acc_student, void* acc_teachers,
                         bool teachers_grad, void* grad_student, void* const* grad_teachers,
                         cudaStream_t stream);

// Loss and gradients (for grad = 1) from one sweep over the kernel tiles: the backward sweep
// visits every tile anyway. block_partials: splits * num_row_blocks(B) doubles of scratch; the
// other arguments as above.
cudaError_t fkd_forward_backward(const FkdArgs& args, double kd_weight, double fr_weight,
                                 int splits, double* block_partials, void* loss,
                                 void* acc_student, void* acc_teachers, bool teachers_grad,
                                 void* grad_student, void* const* grad_teachers,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace fastkd
