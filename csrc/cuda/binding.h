// The ATen side every CUDA binding (csrc/cuda/*_binding.cpp) shares: at::ScalarType -> DType,
// the CUDA input checks, and Launch, the per-call device guard, stream, SM count, workspace and
// error check. Host compiler only (the .cu files include launch.h, never this).
//
// Every binding follows one pattern:
//   check_<op>_inputs(...)                     host.h checks + check_cuda_features
//   const Launch launch(student);              guard, stream, sm_count
//   <Op>Args a; ... a.sm_count = launch.sm_count;
//   outputs allocated; const at::Tensor ws = launch.workspace(<op>_workspace_bytes(a, pass), x);
//   a.workspace = ws.data_ptr();
//   launch.check(<op>_<pass>(a, launch.stream));
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "fastkd/host.h"
#include "launch.h"

namespace fastkd {
namespace cuda {

inline DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// The `precision` op argument as the kernels' enum (a ValueError for anything else).
inline Precision precision_of(c10::string_view precision, const char* op) {
  return static_cast<Precision>(check_precision(precision, op));
}

// An input of a CUDA kernel: on a CUDA device, one of the four float dtypes.
inline void check_cuda_features(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, " (CUDA): ", name, " must be a CUDA tensor, got ", x.device());
  check_float_dtype(x, op, name);
}

// Pairwise ops launch one block per upper-triangle tile: the grid's x dimension bounds B.
inline void check_tile_grid(int64_t batch, const char* op) {
  TORCH_CHECK(num_upper_tiles(batch) <= std::numeric_limits<int32_t>::max(), op,
              " (CUDA): batch size ", batch, " is too large");
}

// One op call on the device of `x`: the device guard, the current stream, the SM count (for the
// launchers' splits), the workspace, and the one place a launcher's error becomes an exception.
class Launch {
 public:
  explicit Launch(const at::Tensor& x)
      : guard_(x.device()), stream(c10::cuda::getCurrentCUDAStream().stream()) {
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.get_device()));
  }

  // Uninitialised bytes on the device of `like`.
  at::Tensor workspace(size_t bytes, const at::Tensor& like) const {
    return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  }

  // A launcher's result (launch.h, launch_status): any error is raised here.
  void check(cudaError_t err) const { C10_CUDA_CHECK(err); }

 private:
  c10::cuda::CUDAGuard guard_;

 public:
  const cudaStream_t stream;
  int sm_count = 0;
};

}  // namespace cuda
}  // namespace fastkd
