// at::ScalarType -> CudaDType for the ATen wrappers (*_binding.cpp; host compiler only).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "dtype.h"

namespace fastkd {

inline CudaDType cuda_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kHalf:
      return CudaDType::kHalf;
    case at::kBFloat16:
      return CudaDType::kBFloat16;
    case at::kFloat:
      return CudaDType::kFloat;
    case at::kDouble:
      return CudaDType::kDouble;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

}  // namespace fastkd
