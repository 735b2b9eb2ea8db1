// Host interface of the RKD-distance CUDA kernels (csrc/cuda/rkd.cu): plain pointers and a
// stream, so that the .cu file compiles without torch headers. The at::Tensor side is
// csrc/cuda/rkd_binding.cpp.
//
// The features arrive in the operand dtype: double when any input is float64, float otherwise
// (the binding converts half, bfloat16 and mixed inputs once, O(B*D)). The gradients are written
// in each input's own dtype (`out_s`, `out_t`). Layouts are row-major and contiguous.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace fastkd {
namespace rkd_cuda {

using DType = ::fastkd::CudaDType;

constexpr int64_t kTile = 64;  // rows (and columns) of a distance tile

inline int64_t num_row_blocks(int64_t batch) { return (batch + kTile - 1) / kTile; }
inline int64_t num_upper_tiles(int64_t batch) {
  const int64_t nb = num_row_blocks(batch);
  return nb * (nb + 1) / 2;
}

// Sweep 3 cuts the column blocks J of each row block into n_splits ranges of j_per_split blocks
// (the last may be shorter), each range handled by its own block with its own accumulator, so
// that small batches still fill the GPU.
struct Plan {
  int64_t batch;
  int64_t width_s;
  int64_t width_t;
  int64_t j_per_split;
  int64_t n_splits;
};

// make_plan's split for `sm_count` multiprocessors of device `device` (or `splits` splits when
// splits > 0, as the emulator asks).
Plan make_plan(int64_t batch, int64_t width_s, int64_t width_t, int device, int64_t splits = 0);

// Bytes of the workspace the caller allocates (no initialisation needed) for one call of run().
size_t workspace_bytes(const Plan& plan, bool is_double, bool gradients, bool teacher_grad);

struct Args {
  bool is_double = false;     // operand dtype: double, else float
  const void* student = nullptr;  // (B, Ds), operand dtype
  const void* teacher = nullptr;  // (B, Dt), operand dtype
  void* loss = nullptr;       // 0-dim, operand dtype; may be null (not wanted)
  const void* grad = nullptr; // 0-dim upstream gradient, operand dtype; null means 1
  void* grad_student = nullptr;  // (B, Ds) in out_s; null: forward only
  void* grad_teacher = nullptr;  // (B, Dt) in out_t; null: no teacher gradient
  DType out_s = DType::kFloat, out_t = DType::kFloat;
  void* workspace = nullptr;  // workspace_bytes(plan, is_double, grad_student, grad_teacher)
};

// Sweeps 1 and 2 (the means, the loss and the c terms), then, when grad_student is set, sweep 3
// (the gradients). Everything is queued on `stream`; no host synchronisation.
cudaError_t run(const Args& args, const Plan& plan, cudaStream_t stream);

}  // namespace rkd_cuda
}  // namespace fastkd
