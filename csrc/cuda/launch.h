// What the CUDA ops (fkd.cu, srd.cu, rkd.cu) share on the launcher side: the element types, the
// launch syntax, the one error convention, the 64-row tile geometry of the pairwise ops and the
// workspace layout helper. No torch headers: .cu files include it, and torch would cost minutes
// of nvcc time. The ATen side is binding.h.
//
// Host interface of every op (<op>_cuda.h), one shape for all three:
//   struct <Op>Args              inputs, scalars, outputs (null: not wanted), sm_count / splits,
//                                and one workspace pointer; plain pointers, no tensors
//   <op>_workspace_bytes(a, p)   bytes of that workspace for pass p (no initialisation needed)
//   <op>_splits(a)               how many ways the launchers split the batch (from sm_count)
//   <op>_forward / _backward / _forward_backward (const <Op>Args&, cudaStream_t)
//                                one per op of csrc/ops.cpp; everything is queued on the stream
//                                (no host synchronisation) and the result is launch_status().
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "fastkd/common.h"

// The element types, for dispatch() in .cu files (the bindings do not need them).
#if defined(__CUDACC__) || defined(FASTKD_EMULATE)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// Kernel launch. The CPU emulator (tools/cuda_emulator/mock/mock_core.h) defines its own before
// it includes a .cu file. A kernel whose template arguments hold commas goes through a macro
// name (see rkd.cu), since the preprocessor would split it.
#ifndef FASTKD_LAUNCH
#define FASTKD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

namespace fastkd {
namespace cuda {

// Element types the kernels are compiled for (the accumulation type is double for kDouble, float
// otherwise).
enum class DType : int { kHalf, kBFloat16, kFloat, kDouble };

// How float32 operands are multiplied (SPEC §6): kIeee every product in float32 on CUDA cores;
// kTf32 one TF32 tensor-core product (inputs rounded to 10 mantissa bits); kTf32x3 each operand
// split a = hi + lo (hi = tf32(a), lo = tf32(a - hi)) and hi.hi + hi.lo + lo.hi on tensor cores,
// float32 accumulation (close to kIeee). Other dtypes ignore it. Set from the `precision` op
// argument, never from torch's global TF32 flags.
enum class Precision : int { kIeee = 0, kTf32 = 1, kTf32x3 = 2 };

constexpr size_t size_of(DType t) {
  return t == DType::kDouble ? 8 : t == DType::kFloat ? 4 : 2;
}
constexpr size_t acc_size_of(DType t) { return t == DType::kDouble ? 8 : 4; }

#if defined(__CUDACC__) || defined(FASTKD_EMULATE)
// .cu files only (the element types need cuda_fp16.h / cuda_bf16.h): calls f(T()) with T the
// element type of `t` (__half, __nv_bfloat16, float, double) and returns its result.
template <typename F>
auto dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kHalf:
      return f(__half());
    case DType::kBFloat16:
      return f(__nv_bfloat16());
    case DType::kDouble:
      return f(double());
    case DType::kFloat:
      break;
  }
  return f(float());
}

// Element conversions of the kernels: to the accumulation type, and a store rounded to nearest
// (through float for the 16-bit types).
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename V>
__device__ __forceinline__ void store(__half* p, V v) {
  *p = __float2half_rn(float(v));
}
template <typename V>
__device__ __forceinline__ void store(__nv_bfloat16* p, V v) {
  *p = __float2bfloat16_rn(float(v));
}
template <typename V>
__device__ __forceinline__ void store(float* p, V v) {
  *p = float(v);
}
template <typename V>
__device__ __forceinline__ void store(double* p, V v) {
  *p = double(v);
}
#endif

// Which op of csrc/ops.cpp a launcher runs; the workspace depends on it.
enum class Pass { kForward, kBackward, kForwardBackward };

// Pairwise ops (FKD, RKD): B x B matrices in kTile x kTile tiles, the backward's J loop cut into
// at most kMaxSplits ranges, each with its own accumulator (summed in a fixed order).
constexpr int kTile = 64;
constexpr int kMaxSplits = 8;

constexpr int64_t num_row_blocks(int64_t batch) { return (batch + kTile - 1) / kTile; }

// Tiles (I, J >= I) of the upper triangle.
constexpr int64_t num_upper_tiles(int64_t batch) {
  return num_row_blocks(batch) * (num_row_blocks(batch) + 1) / 2;
}

// Upper-triangle tile number p, row by row: (0,0) (0,1) .. (0,nb-1) (1,1) ..
FASTKD_HD void upper_tile(int64_t p, int64_t nb, int64_t& I, int64_t& J) {
  // Rows before I hold first(I) = I nb - I (I - 1) / 2 tiles; the estimate is fixed up exactly.
  const double b = 2.0 * double(nb) + 1.0;
  int64_t i = int64_t((b - sqrt(b * b - 8.0 * double(p))) / 2.0);
  i = i < 0 ? 0 : (i > nb - 1 ? nb - 1 : i);
  while (i > 0 && i * nb - i * (i - 1) / 2 > p) --i;
  while (i + 1 < nb && (i + 1) * nb - (i + 1) * i / 2 <= p) ++i;
  I = i;
  J = i + (p - (i * nb - i * (i - 1) / 2));
}

// The one error convention of the launchers: the first error of their set-up calls (`setup`),
// else the launch error of their kernels. cudaGetLastError also clears a launch error, so the
// next op starts clean. Bindings turn a non-success into an exception (binding.h, Launch::check).
inline cudaError_t launch_status(cudaError_t setup = cudaSuccess) {
  const cudaError_t launch = cudaGetLastError();
  return setup != cudaSuccess ? setup : launch;
}

// Consecutive 256-byte aligned pieces of one workspace. With a null base it only counts, so
// <op>_workspace_bytes and the launcher share one layout function.
class Workspace {
 public:
  explicit Workspace(void* base) : base_(static_cast<unsigned char*>(base)) {}

  template <typename T>
  T* take(size_t count) {
    const size_t offset = bytes_;
    bytes_ = (bytes_ + count * sizeof(T) + 255) / 256 * 256;
    return base_ != nullptr ? reinterpret_cast<T*>(base_ + offset) : nullptr;
  }
  // Untyped piece of count elements of `bytes_each`.
  void* take_bytes(size_t count, size_t bytes_each) {
    return take<unsigned char>(count * bytes_each);
  }
  size_t bytes() const { return bytes_; }

 private:
  unsigned char* base_;
  size_t bytes_ = 0;
};

}  // namespace cuda
}  // namespace fastkd
