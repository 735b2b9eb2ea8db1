// Macros shared by host (C++) and device (CUDA) code. Keep this header free of torch includes:
// it is included by .cu files whose compile time we keep low.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

namespace fastkd {

// torch.nn.functional.normalize's eps: a zero row normalises to zeros, never NaN.
constexpr double kNormEps = 1e-12;

}  // namespace fastkd
