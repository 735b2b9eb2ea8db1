// The element types the CUDA kernels are compiled for, shared by every op's host interface
// (fkd_cuda.h, srd_cuda.h, rkd_cuda.h). No torch headers: .cu files include it.
#pragma once

namespace fastkd {

enum class CudaDType : int { kHalf, kBFloat16, kFloat, kDouble };

}  // namespace fastkd
