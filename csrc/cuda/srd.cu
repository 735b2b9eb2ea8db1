// SRD (SPEC §3) CUDA kernels: LogSum of batch-normalised features, fused.
//
// Blocks are kCols columns x kLanes row lanes: a warp reads kCols consecutive columns of one row
// (coalesced), each lane strides over the rows of its split. The batch is cut into srd_splits()
// row splits so that narrow features still fill the GPU; every cross-thread and cross-split
// reduction runs in a fixed order, so results are run-to-run identical.
//   forward_stats: stats_partial_kernel (shifted Welford per lane, Chan's merge over the lanes)
//                  -> stats_finalize_kernel (merge over the splits, write the statistics)
//   forward_sums:  sums_partial_kernel (|d|^p, h, h*s, h*t per split) -> sums_finalize_kernel
//                  (one block: column sums, S in double, the loss)
//   backward:      backward_kernel, one elementwise pass recomputing h.
// The per-element math is csrc/include/fastkd/srd_math.h, shared with the CPU kernels.
// FASTKD_LAUNCH (launch.h) lets tools/cuda_emulator run this file unchanged on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "fastkd/srd_math.h"
#include "srd_cuda.h"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kCols = 32;               // columns per block (one warp wide)
constexpr int kLanes = 8;               // row lanes per block
constexpr int64_t kMinRowsPerSplit = 64;
constexpr int kFinalThreads = 256;      // threads of the one-block final reduction

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// How the batch is cut: n_splits slices of rows_per_split rows (the last may be shorter).
struct Plan {
  int64_t batch;
  int64_t width;
  int64_t rows_per_split;
  int64_t n_splits;
};

Plan plan_of(const SrdArgs& a) {
  int64_t splits = a.splits;
  if (splits <= 0) {
    const int64_t col_blocks = (a.width + kCols - 1) / kCols;
    const int64_t wanted = (4 * int64_t(a.sm_count) + col_blocks - 1) / col_blocks;  // ~4 per SM
    const int64_t max_splits = std::max<int64_t>(1, a.batch / kMinRowsPerSplit);
    splits = std::clamp<int64_t>(wanted, 1, max_splits);
  }
  splits = std::clamp<int64_t>(splits, 1, a.batch);
  const int64_t rows = (a.batch + splits - 1) / splits;
  return {a.batch, a.width, rows, (a.batch + rows - 1) / rows};
}


// Per-lane shifted Welford over the split's rows, then Chan's merge of the kLanes lanes in lane
// order. part: (2 sides, 2 [mean, m2], n_splits, D).
template <typename scalar_t>
__global__ void __launch_bounds__(kCols * kLanes)
    stats_partial_kernel(const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zt,
                         int64_t B, int64_t D, int64_t rows_per_split, int64_t n_splits,
                         typename AccOf<scalar_t>::type* __restrict__ part) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t sh_n[kLanes][kCols], sh_mean[kLanes][kCols], sh_m2[kLanes][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kCols + tx;
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = min64(B, r0 + rows_per_split);
  for (int side = 0; side < 2; ++side) {
    const scalar_t* z = side == 0 ? zs : zt;
    acc_t n = 0, mean = 0, m2 = 0;
    if (col < D) {
      const acc_t shift = to_acc(z[col]);
      for (int64_t r = r0 + ty; r < r1; r += kLanes) {
        n += acc_t(1);
        srd::welford_add<acc_t>(mean, m2, to_acc(z[r * D + col]) - shift, acc_t(1) / n);
      }
    }
    sh_n[ty][tx] = n;
    sh_mean[ty][tx] = mean;
    sh_m2[ty][tx] = m2;
    __syncthreads();
    if (ty == 0 && col < D) {
      for (int lane = 1; lane < kLanes; ++lane)
        srd::welford_merge<acc_t>(n, mean, m2, sh_n[lane][tx], sh_mean[lane][tx], sh_m2[lane][tx]);
      const int64_t plane = n_splits * D;
      part[(2 * side) * plane + split * D + col] = mean;
      part[(2 * side + 1) * plane + split * D + col] = m2;
    }
    __syncthreads();
  }
}

// One thread per column: merges the splits in order and writes both sides' statistics.
template <typename scalar_t>
__global__ void stats_finalize_kernel(const scalar_t* __restrict__ zs,
                                      const scalar_t* __restrict__ zt, int64_t B, int64_t D,
                                      int64_t rows_per_split, int64_t n_splits,
                                      typename AccOf<scalar_t>::type eps,
                                      const typename AccOf<scalar_t>::type* __restrict__ part,
                                      typename AccOf<scalar_t>::type* __restrict__ stats_s,
                                      typename AccOf<scalar_t>::type* __restrict__ stats_t) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= D) return;
  const int64_t plane = n_splits * D;
  for (int side = 0; side < 2; ++side) {
    const scalar_t* z = side == 0 ? zs : zt;
    acc_t* stats = side == 0 ? stats_s : stats_t;
    acc_t n = 0, mean = 0, m2 = 0;
    for (int64_t i = 0; i < n_splits; ++i) {
      const acc_t count = acc_t(min64(rows_per_split, B - i * rows_per_split));
      srd::welford_merge<acc_t>(n, mean, m2, count, part[(2 * side) * plane + i * D + col],
                                part[(2 * side + 1) * plane + i * D + col]);
    }
    const acc_t var = m2 / acc_t(B);
    stats[srd::kMean * D + col] = to_acc(z[col]) + mean;
    stats[srd::kVar * D + col] = var;
    stats[srd::kCentre * D + col] = mean;
    stats[srd::kRstd * D + col] = srd::rstd<acc_t>(var, eps);
  }
}

template <typename acc_t>
struct SideCoef {
  acc_t shift, centre, rstd;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ SideCoef<acc_t> load_side(const scalar_t* z, const acc_t* stats,
                                                     int64_t D, int64_t col) {
  return {to_acc(z[col]), stats[srd::kCentre * D + col], stats[srd::kRstd * D + col]};
}

// Per-split column sums of |d|^p, h, h*s, h*t. part: (n_splits, 4, D).
template <typename scalar_t>
__global__ void __launch_bounds__(kCols * kLanes)
    sums_partial_kernel(const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zt,
                        int64_t B, int64_t D, int64_t rows_per_split,
                        typename AccOf<scalar_t>::type p, int ip,
                        const typename AccOf<scalar_t>::type* __restrict__ stats_s,
                        const typename AccOf<scalar_t>::type* __restrict__ stats_t,
                        typename AccOf<scalar_t>::type* __restrict__ part) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t sh[4][kLanes][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kCols + tx;
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = min64(B, r0 + rows_per_split);
  acc_t acc[4] = {0, 0, 0, 0};
  if (col < D) {
    const SideCoef<acc_t> cs = load_side(zs, stats_s, D, col);
    const SideCoef<acc_t> ct = load_side(zt, stats_t, D, col);
    for (int64_t r = r0 + ty; r < r1; r += kLanes) {
      const acc_t s = srd::normalize<acc_t>(to_acc(zs[r * D + col]), cs.shift, cs.centre, cs.rstd);
      const acc_t t = srd::normalize<acc_t>(to_acc(zt[r * D + col]), ct.shift, ct.centre, ct.rstd);
      acc_t value, h;
      srd::power_terms<acc_t>(s - t, p, ip, value, h);
      acc[srd::kPow] += value;
      acc[srd::kH] += h;
      acc[srd::kHS] += h * s;
      acc[srd::kHT] += h * t;
    }
  }
  for (int k = 0; k < 4; ++k) sh[k][ty][tx] = acc[k];
  __syncthreads();
  if (ty == 0 && col < D) {
    for (int k = 0; k < 4; ++k) {
      acc_t total = sh[k][0][tx];
      for (int lane = 1; lane < kLanes; ++lane) total += sh[k][lane][tx];
      part[(split * 4 + k) * D + col] = total;
    }
  }
}

// One block: sums over the splits per column, S = sum of the |d|^p column sums in double (tree
// of fixed shape), loss = log(max(S, tiny)).
template <typename acc_t>
__global__ void __launch_bounds__(kFinalThreads)
    sums_finalize_kernel(const acc_t* __restrict__ part, int64_t D, int64_t n_splits,
                         acc_t* __restrict__ sums, acc_t* __restrict__ total_out,
                         acc_t* __restrict__ loss_out) {
  __shared__ double red[kFinalThreads];
  double local = 0;
  for (int64_t col = threadIdx.x; col < D; col += kFinalThreads) {
    for (int k = 0; k < 4; ++k) {
      acc_t s = 0;
      for (int64_t i = 0; i < n_splits; ++i) s += part[(i * 4 + k) * D + col];
      sums[k * D + col] = s;
      if (k == srd::kPow) local += double(s);
    }
  }
  red[threadIdx.x] = local;
  __syncthreads();
  for (int stride = kFinalThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const acc_t total = acc_t(red[0]);
    *total_out = total;
    // NaN fails the comparison and propagates into the loss.
    *loss_out = log(total < acc_t(srd::kTiny) ? acc_t(srd::kTiny) : total);
  }
}

template <typename scalar_t, bool kTraining, bool kTeacherGrad>
__global__ void __launch_bounds__(kCols * kLanes)
    backward_kernel(const typename AccOf<scalar_t>::type* __restrict__ grad,
                    const typename AccOf<scalar_t>::type* __restrict__ total,
                    const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zt, int64_t B,
                    int64_t D, int64_t rows_per_split, typename AccOf<scalar_t>::type p, int ip,
                    const typename AccOf<scalar_t>::type* __restrict__ stats_s,
                    const typename AccOf<scalar_t>::type* __restrict__ stats_t,
                    const typename AccOf<scalar_t>::type* __restrict__ sums,
                    scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_t) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t col = int64_t(blockIdx.x) * kCols + threadIdx.x;
  if (col >= D) return;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = min64(B, r0 + rows_per_split);
  const acc_t c = srd::loss_grad_scale<acc_t>(*grad, *total);
  const SideCoef<acc_t> cs = load_side(zs, stats_s, D, col);
  const SideCoef<acc_t> ct = load_side(zt, stats_t, D, col);
  const acc_t inv_b = acc_t(1) / acc_t(B);
  const acc_t mean_h = sums[srd::kH * D + col] * inv_b;
  const acc_t mean_hs = sums[srd::kHS * D + col] * inv_b;
  const acc_t mean_ht = sums[srd::kHT * D + col] * inv_b;
  for (int64_t r = r0 + threadIdx.y; r < r1; r += kLanes) {
    const int64_t off = r * D + col;
    const acc_t s = srd::normalize<acc_t>(to_acc(zs[off]), cs.shift, cs.centre, cs.rstd);
    const acc_t t = srd::normalize<acc_t>(to_acc(zt[off]), ct.shift, ct.centre, ct.rstd);
    acc_t value, h;
    srd::power_terms<acc_t>(s - t, p, ip, value, h);
    if (kTraining) {
      store(grad_s + off, srd::bn_backward_train<acc_t>(c, h, s, mean_h, mean_hs, cs.rstd));
      if (kTeacherGrad)
        store(grad_t + off, srd::bn_backward_train<acc_t>(-c, h, t, mean_h, mean_ht, ct.rstd));
    } else {
      store(grad_s + off, srd::bn_backward_eval<acc_t>(c, h, cs.rstd));
      if (kTeacherGrad) store(grad_t + off, srd::bn_backward_eval<acc_t>(-c, h, ct.rstd));
    }
  }
}

dim3 tile_grid(const Plan& plan) {
  return dim3(static_cast<unsigned>((plan.width + kCols - 1) / kCols),
              static_cast<unsigned>(plan.n_splits));
}

template <typename scalar_t>
void launch_stats(const void* student, const void* teacher, const Plan& plan, double eps,
                  void* workspace, void* stats_s, void* stats_t, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* zs = static_cast<const scalar_t*>(student);
  const auto* zt = static_cast<const scalar_t*>(teacher);
  auto* part = static_cast<acc_t*>(workspace);
  FASTKD_LAUNCH(stats_partial_kernel<scalar_t>, tile_grid(plan), dim3(kCols, kLanes), 0, stream,
                zs, zt, plan.batch, plan.width, plan.rows_per_split, plan.n_splits, part);
  const unsigned blocks = static_cast<unsigned>((plan.width + kFinalThreads - 1) / kFinalThreads);
  FASTKD_LAUNCH(stats_finalize_kernel<scalar_t>, blocks, kFinalThreads, 0, stream,
      zs, zt, plan.batch, plan.width, plan.rows_per_split, plan.n_splits, acc_t(eps), part,
      static_cast<acc_t*>(stats_s), static_cast<acc_t*>(stats_t));
}

template <typename scalar_t>
void launch_sums(const void* student, const void* teacher, const Plan& plan, double p,
                 const void* stats_s, const void* stats_t, void* workspace, void* sums,
                 void* total, void* loss, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  auto* part = static_cast<acc_t*>(workspace);
  FASTKD_LAUNCH(sums_partial_kernel<scalar_t>, tile_grid(plan), dim3(kCols, kLanes), 0, stream,
      static_cast<const scalar_t*>(student), static_cast<const scalar_t*>(teacher), plan.batch,
      plan.width, plan.rows_per_split, acc_t(p), srd::integer_power(p),
      static_cast<const acc_t*>(stats_s), static_cast<const acc_t*>(stats_t), part);
  FASTKD_LAUNCH(sums_finalize_kernel<acc_t>, 1, kFinalThreads, 0, stream,
      part, plan.width, plan.n_splits, static_cast<acc_t*>(sums), static_cast<acc_t*>(total),
      static_cast<acc_t*>(loss));
}

template <typename scalar_t, bool kTraining, bool kTeacherGrad>
void launch_backward_impl(const void* grad, const void* total, const void* student,
                          const void* teacher, const Plan& plan, double p, const void* stats_s,
                          const void* stats_t, const void* sums, void* grad_student,
                          void* grad_teacher, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
// The kernel's template arguments hold commas: pass them to FASTKD_LAUNCH as one macro name.
#define FASTKD_SRD_BACKWARD_KERNEL backward_kernel<scalar_t, kTraining, kTeacherGrad>
  FASTKD_LAUNCH(FASTKD_SRD_BACKWARD_KERNEL, tile_grid(plan), dim3(kCols, kLanes), 0, stream,
          static_cast<const acc_t*>(grad), static_cast<const acc_t*>(total),
          static_cast<const scalar_t*>(student), static_cast<const scalar_t*>(teacher),
          plan.batch, plan.width, plan.rows_per_split, acc_t(p), srd::integer_power(p),
          static_cast<const acc_t*>(stats_s), static_cast<const acc_t*>(stats_t),
          static_cast<const acc_t*>(sums), static_cast<scalar_t*>(grad_student),
          static_cast<scalar_t*>(grad_teacher));
#undef FASTKD_SRD_BACKWARD_KERNEL
}

template <typename scalar_t>
void launch_backward(const void* grad, const void* total, const void* student, const void* teacher,
                     const Plan& plan, double p, bool training, const void* stats_s,
                     const void* stats_t, const void* sums, void* grad_student,
                     void* grad_teacher, cudaStream_t stream) {
  const bool teacher_grad = grad_teacher != nullptr;
#define FASTKD_SRD_BACKWARD(TRAIN, TGRAD)                                                        \
  launch_backward_impl<scalar_t, TRAIN, TGRAD>(grad, total, student, teacher, plan, p, stats_s, \
                                               stats_t, sums, grad_student, grad_teacher, stream)
  if (training) {
    if (teacher_grad) FASTKD_SRD_BACKWARD(true, true);
    else FASTKD_SRD_BACKWARD(true, false);
  } else {
    if (teacher_grad) FASTKD_SRD_BACKWARD(false, true);
    else FASTKD_SRD_BACKWARD(false, false);
  }
#undef FASTKD_SRD_BACKWARD
}

}  // namespace

int64_t srd_splits(const SrdArgs& args) { return plan_of(args).n_splits; }

size_t srd_workspace_bytes(const SrdArgs& args, Pass pass) {
  // The forward's partial sums: 4 values per split and column (stats: 2 sides x mean, m2;
  // sums: |d|^p, h, h*s, h*t). The backward is one elementwise pass and needs none.
  Workspace ws(nullptr);
  if (pass != Pass::kBackward)
    ws.take_bytes(4 * size_t(plan_of(args).n_splits) * size_t(args.width), acc_size_of(args.dtype));
  return ws.bytes();
}

cudaError_t srd_forward(const SrdArgs& a, cudaStream_t stream) {
  const Plan plan = plan_of(a);
  dispatch(a.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    if (a.training)
      launch_stats<scalar_t>(a.student, a.teacher, plan, a.eps, a.workspace, a.stats_s, a.stats_t,
                             stream);
    launch_sums<scalar_t>(a.student, a.teacher, plan, a.p, a.stats_s, a.stats_t, a.workspace,
                          a.sums, a.total, a.loss, stream);
  });
  return launch_status();
}

cudaError_t srd_backward(const SrdArgs& a, cudaStream_t stream) {
  const Plan plan = plan_of(a);
  dispatch(a.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    launch_backward<scalar_t>(a.grad, a.total, a.student, a.teacher, plan, a.p, a.training,
                              a.stats_s, a.stats_t, a.sums, a.grad_student, a.grad_teacher,
                              stream);
  });
  return launch_status();
}

}  // namespace cuda
}  // namespace fastkd
