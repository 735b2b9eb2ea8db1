// SRD (SPEC §3) CUDA kernels: LogSum of batch-normalised features, fused.
//
// Blocks are 128 threads: tc column threads x (128 / tc) row lanes. Each thread owns V
// consecutive columns (V = 16 bytes of the features dtype: 8 halves, 4 floats, 2 doubles) and
// reads them with one 16-byte load per row when D % V == 0 and the pointers are 16-byte aligned
// (scalar loads of the same columns otherwise); a warp row covers tc * V consecutive columns,
// each lane strides over the rows of its split, kUnroll rows in flight. tc is the smallest power
// of two in 8..32 that covers D / V, so narrow features keep their threads busy. The batch is cut
// into srd_splits() row splits so that the grid fills the GPU; every cross-thread and
// cross-split reduction runs in a fixed order, so results are run-to-run identical.
//   forward_stats: stats_partial_kernel (shifted Welford per lane, Chan's merge over the lanes)
//                  -> stats_finalize_kernel (merge over the splits, write the statistics)
//   forward_sums:  sums_partial_kernel (|d|^p, h, h*s, h*t per split) -> sums_finalize_kernel
//                  (one block: column sums, S in double, the loss)
//   backward:      backward_kernel, one elementwise pass recomputing h.
// Occupancy: __launch_bounds__(128, 4) caps the element kernels at 128 registers (a 64-register
// cap, 8 blocks, spilled hundreds of bytes in the 16-bit kernels: 8 columns of pow() per thread);
// static shared memory is at most ~14 KB per block (16-bit backward: 9 x 256 coefficients), so
// registers decide: 65536 / (128 x regs) blocks per SM, 8 for the kernels that fit in 64 registers
// (ptxas -v; docs/cuda.md lists them), at least 4 for all. The split count aims the grid at 8
// blocks per SM.
// The per-element math is csrc/include/fastkd/srd_math.h, shared with the CPU kernels.
// FASTKD_LAUNCH (launch.h) lets tools/cuda_emulator run this file unchanged on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fastkd/srd_math.h"
#include "srd_cuda.h"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kThreads = 128;           // threads per element-kernel block
constexpr int kGridBlocksPerSm = 8;     // blocks per SM the split count aims the grid at
constexpr int kMinBlocksPerSm = 4;      // launch bounds: <= 128 registers, no spills (see top)
constexpr int kMaxColThreads = 32;      // column threads per block (one warp row)
constexpr int kMinColThreads = 8;
constexpr int kUnroll = 4;              // rows loaded before they are used (stats, sums)
constexpr int kUnrollBackward = 1;      // sums, backward: both sides' loads of a row in flight;
                                        // more rows spill 16-bit (8 columns of pow() each)
constexpr int64_t kMinRowsPerSplit = 64;
constexpr int64_t kMaxSplitsAuto = 256; // bounds the finalize kernels' serial merge
constexpr int kFinalThreads = 256;      // threads of the one-block final reduction

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Elements of one 16-byte load.
template <typename T>
constexpr int kVec = int(16 / sizeof(T));
constexpr int vec_of(DType t) { return int(16 / size_of(t)); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// V elements of one row: what a 16-byte load fills (4 registers whatever the dtype).
template <typename T>
struct alignas(16) Pack {
  T v[kVec<T>];
};

// Loads columns c0 .. c0 + V of one row. kVector: one 16-byte load (the caller guarantees
// alignment and c0 + V <= D); otherwise element loads, where columns >= D repeat column 0 (valid
// memory; their results are never written).
template <bool kVector, typename T>
__device__ __forceinline__ void load_pack(const T* __restrict__ row, int64_t c0, int64_t D,
                                          Pack<T>& out) {
  if (kVector) {
    *reinterpret_cast<uint4*>(&out) = *reinterpret_cast<const uint4*>(row + c0);
  } else {
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) out.v[v] = row[c0 + v < D ? c0 + v : 0];
  }
}

// Stores V values (rounded to T) to columns c0 .. c0 + V of one row; same conditions.
template <bool kVector, typename T, typename acc_t>
__device__ __forceinline__ void store_pack(T* __restrict__ row, int64_t c0, int64_t D,
                                           const acc_t (&val)[kVec<T>]) {
  if (kVector) {
    Pack<T> out;
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v) store(&out.v[v], val[v]);
    *reinterpret_cast<uint4*>(row + c0) = *reinterpret_cast<const uint4*>(&out);
  } else {
#pragma unroll
    for (int v = 0; v < kVec<T>; ++v)
      if (c0 + v < D) store(row + c0 + v, val[v]);
  }
}

// How the batch and the columns are cut: n_splits slices of rows_per_split rows (the last may be
// shorter), column blocks of col_threads * V columns, and whether 16-byte accesses are allowed.
struct Plan {
  int64_t batch;
  int64_t width;
  int col_threads;  // tc: blockDim.x; blockDim.y = kThreads / tc row lanes
  int64_t col_blocks;
  int64_t rows_per_split;
  int64_t n_splits;
  bool vector;
};

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The split count depends on B, D, the dtype and sm_count only (not on pointers), so that
// srd_workspace_bytes and the launchers agree whatever buffers they are given.
Plan plan_of(const SrdArgs& a) {
  const int V = vec_of(a.dtype);
  const int64_t packs = (a.width + V - 1) / V;
  int tc = kMinColThreads;
  while (tc < kMaxColThreads && tc < packs) tc *= 2;
  const int64_t col_blocks = (packs + tc - 1) / tc;
  int64_t splits = a.splits;
  if (splits <= 0) {
    // kGridBlocksPerSm blocks per SM: a full wave of the fp32 kernels (<= 64 registers).
    const int64_t wanted =
        (int64_t(kGridBlocksPerSm) * a.sm_count + col_blocks - 1) / col_blocks;
    const int64_t max_splits =
        std::clamp<int64_t>(a.batch / kMinRowsPerSplit, 1, kMaxSplitsAuto);
    splits = std::clamp<int64_t>(wanted, 1, max_splits);
  }
  splits = std::clamp<int64_t>(splits, 1, a.batch);
  const int64_t rows = (a.batch + splits - 1) / splits;
  const bool vector = a.width % V == 0 && aligned16(a.student) && aligned16(a.teacher) &&
                      aligned16(a.grad_student) && aligned16(a.grad_teacher);
  return {a.batch, a.width, tc, col_blocks, rows, (a.batch + rows - 1) / rows, vector};
}

// This thread's first column and lane geometry.
struct Geometry {
  int tx, ty, lanes;
  int64_t c0;  // first of the thread's V columns
};

template <typename T>
__device__ __forceinline__ Geometry geometry() {
  const int tx = threadIdx.x, ty = threadIdx.y;
  return {tx, ty, int(blockDim.y), (int64_t(blockIdx.x) * blockDim.x + tx) * kVec<T>};
}

// Rows of the split handled by lane `lane` of `lanes`: r0 + lane, r0 + lane + lanes, ... < r1.
__device__ __forceinline__ int64_t lane_rows(int64_t r0, int64_t r1, int lane, int lanes) {
  return r0 + lane < r1 ? (r1 - r0 - lane + lanes - 1) / lanes : 0;
}

// Shared-memory slot of (lane, column v of the thread's V, column thread tx); consecutive tx are
// consecutive words, so a warp's accesses are free of bank conflicts.
__device__ __forceinline__ int slot(int lane, int v, int V) {
  return (lane * V + v) * int(blockDim.x) + int(threadIdx.x);
}

// Per-lane shifted Welford over the split's rows, then Chan's merge of the lanes in lane order.
// part: (2 sides, 2 [mean, m2], n_splits, D).
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    stats_partial_kernel(const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zt,
                         int64_t B, int64_t D, int64_t rows_per_split, int64_t n_splits,
                         typename AccOf<scalar_t>::type* __restrict__ part) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int V = kVec<scalar_t>;
  __shared__ acc_t sh_mean[kThreads * V], sh_m2[kThreads * V];
  const Geometry g = geometry<scalar_t>();
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = min64(B, r0 + rows_per_split);
  const int64_t step = g.lanes;
  for (int side = 0; side < 2; ++side) {
    const scalar_t* z = side == 0 ? zs : zt;
    acc_t mean[V], m2[V];
#pragma unroll
    for (int v = 0; v < V; ++v) mean[v] = m2[v] = acc_t(0);
    if (g.c0 < D) {
      Pack<scalar_t> first;
      load_pack<kVector>(z, g.c0, D, first);
      acc_t shift[V];
#pragma unroll
      for (int v = 0; v < V; ++v) shift[v] = to_acc(first.v[v]);
      acc_t n = 0;
      int64_t r = r0 + g.ty;
      // kUnroll rows in flight, then the remainder one by one (same order as a plain loop).
      for (; r + (kUnroll - 1) * step < r1; r += kUnroll * step) {
        Pack<scalar_t> x[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) load_pack<kVector>(z + (r + u * step) * D, g.c0, D, x[u]);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          n += acc_t(1);
          const acc_t inv_n = acc_t(1) / n;
#pragma unroll
          for (int v = 0; v < V; ++v)
            srd::welford_add<acc_t>(mean[v], m2[v], to_acc(x[u].v[v]) - shift[v], inv_n);
        }
      }
      for (; r < r1; r += step) {
        Pack<scalar_t> x;
        load_pack<kVector>(z + r * D, g.c0, D, x);
        n += acc_t(1);
        const acc_t inv_n = acc_t(1) / n;
#pragma unroll
        for (int v = 0; v < V; ++v)
          srd::welford_add<acc_t>(mean[v], m2[v], to_acc(x.v[v]) - shift[v], inv_n);
      }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) {
      sh_mean[slot(g.ty, v, V)] = mean[v];
      sh_m2[slot(g.ty, v, V)] = m2[v];
    }
    __syncthreads();
    if (g.ty == 0 && g.c0 < D) {
      const acc_t n0 = acc_t(lane_rows(r0, r1, 0, g.lanes));
      const int64_t plane = n_splits * D;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (g.c0 + v >= D) continue;
        acc_t n = n0;
        for (int lane = 1; lane < g.lanes; ++lane)
          srd::welford_merge<acc_t>(n, mean[v], m2[v], acc_t(lane_rows(r0, r1, lane, g.lanes)),
                                    sh_mean[slot(lane, v, V)], sh_m2[slot(lane, v, V)]);
        part[(2 * side) * plane + split * D + g.c0 + v] = mean[v];
        part[(2 * side + 1) * plane + split * D + g.c0 + v] = m2[v];
      }
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

// Coefficients of the block's columns in shared memory, at slot(k, v, V) for column
// c0 + v of column thread tx (kept out of registers: 16-bit threads own 8 columns each).
// Rows 0-2: shift z[0, j], centre, rstd of the student; 3-5: the teacher's; with kMeans, 6-8:
// mean_b h, mean_b h*s, mean_b h*t (sums / B). Ends with __syncthreads().
template <typename scalar_t, bool kMeans, typename acc_t>
__device__ __forceinline__ void load_coefs(acc_t* coef, const scalar_t* zs, const scalar_t* zt,
                                           const acc_t* stats_s, const acc_t* stats_t,
                                           const acc_t* sums, int64_t B, int64_t D) {
  constexpr int V = kVec<scalar_t>;
  const int tc = blockDim.x;
  const int tid = threadIdx.y * tc + threadIdx.x;
  const int64_t base = int64_t(blockIdx.x) * tc * V;
  for (int i = tid; i < tc * V; i += kThreads) {
    const int64_t col = base + i;
    const int at = (i % V) * tc + i / V;  // slot(0, v, V) of thread i / V
    const int row = V * tc;               // slot(k, ...) = k * row + at
    const bool ok = col < D;
    coef[0 * row + at] = ok ? to_acc(zs[col]) : acc_t(0);
    coef[1 * row + at] = ok ? stats_s[srd::kCentre * D + col] : acc_t(0);
    coef[2 * row + at] = ok ? stats_s[srd::kRstd * D + col] : acc_t(0);
    coef[3 * row + at] = ok ? to_acc(zt[col]) : acc_t(0);
    coef[4 * row + at] = ok ? stats_t[srd::kCentre * D + col] : acc_t(0);
    coef[5 * row + at] = ok ? stats_t[srd::kRstd * D + col] : acc_t(0);
    if (kMeans) {
      const acc_t inv_b = acc_t(1) / acc_t(B);
      coef[6 * row + at] = ok ? sums[srd::kH * D + col] * inv_b : acc_t(0);
      coef[7 * row + at] = ok ? sums[srd::kHS * D + col] * inv_b : acc_t(0);
      coef[8 * row + at] = ok ? sums[srd::kHT * D + col] * inv_b : acc_t(0);
    }
  }
  __syncthreads();
}

// Per-split column sums of |d|^p, h, h*s, h*t. part: (n_splits, 4, D).
template <typename scalar_t, bool kVector>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    sums_partial_kernel(const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zt,
                        int64_t B, int64_t D, int64_t rows_per_split,
                        typename AccOf<scalar_t>::type p, int ip,
                        const typename AccOf<scalar_t>::type* __restrict__ stats_s,
                        const typename AccOf<scalar_t>::type* __restrict__ stats_t,
                        typename AccOf<scalar_t>::type* __restrict__ part) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int V = kVec<scalar_t>;
  constexpr int U = kUnrollBackward;  // two sides of loads per row
  __shared__ acc_t coef[6 * kMaxColThreads * V];
  __shared__ acc_t sh[kThreads * V];
  load_coefs<scalar_t, false>(coef, zs, zt, stats_s, stats_t, static_cast<const acc_t*>(nullptr),
                              B, D);
  const Geometry g = geometry<scalar_t>();
  const int row = V * int(blockDim.x);
  const int64_t split = blockIdx.y;
  const int64_t r0 = split * rows_per_split;
  const int64_t r1 = min64(B, r0 + rows_per_split);
  const int64_t step = g.lanes;
  acc_t acc[4][V];
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[k][v] = acc_t(0);
  // Adds rows x[0..n) (both sides) column by column: each column's coefficients are read once.
  auto add_rows = [&](const Pack<scalar_t>* xs, const Pack<scalar_t>* xt, int n) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int at = slot(0, v, V);
      const acc_t s_shift = coef[at], s_centre = coef[row + at], s_rstd = coef[2 * row + at];
      const acc_t t_shift = coef[3 * row + at], t_centre = coef[4 * row + at];
      const acc_t t_rstd = coef[5 * row + at];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u >= n) break;
        const acc_t s = srd::normalize<acc_t>(to_acc(xs[u].v[v]), s_shift, s_centre, s_rstd);
        const acc_t t = srd::normalize<acc_t>(to_acc(xt[u].v[v]), t_shift, t_centre, t_rstd);
        acc_t value, h;
        srd::power_terms<acc_t>(s - t, p, ip, value, h);
        acc[srd::kPow][v] += value;
        acc[srd::kH][v] += h;
        acc[srd::kHS][v] += h * s;
        acc[srd::kHT][v] += h * t;
      }
    }
  };
  if (g.c0 < D) {
    int64_t r = r0 + g.ty;
    for (; r + (U - 1) * step < r1; r += U * step) {
      Pack<scalar_t> xs[U], xt[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        load_pack<kVector>(zs + (r + u * step) * D, g.c0, D, xs[u]);
        load_pack<kVector>(zt + (r + u * step) * D, g.c0, D, xt[u]);
      }
      add_rows(xs, xt, U);
    }
    for (; r < r1; r += step) {
      Pack<scalar_t> xs[U], xt[U];
      load_pack<kVector>(zs + r * D, g.c0, D, xs[0]);
      load_pack<kVector>(zt + r * D, g.c0, D, xt[0]);
      add_rows(xs, xt, 1);
    }
  }
  // Lane sums in lane order, one quantity at a time through one buffer.
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int v = 0; v < V; ++v) sh[slot(g.ty, v, V)] = acc[k][v];
    __syncthreads();
    if (g.ty == 0 && g.c0 < D) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (g.c0 + v >= D) continue;
        acc_t total = sh[slot(0, v, V)];
        for (int lane = 1; lane < g.lanes; ++lane) total += sh[slot(lane, v, V)];
        part[(split * 4 + k) * D + g.c0 + v] = total;
      }
    }
    __syncthreads();
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

template <typename scalar_t, bool kTraining, bool kTeacherGrad, bool kVector>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    backward_kernel(const typename AccOf<scalar_t>::type* __restrict__ grad,
                    const typename AccOf<scalar_t>::type* __restrict__ total,
                    const scalar_t* __restrict__ zs, const scalar_t* __restrict__ zt, int64_t B,
                    int64_t D, int64_t rows_per_split, typename AccOf<scalar_t>::type p, int ip,
                    const typename AccOf<scalar_t>::type* __restrict__ stats_s,
                    const typename AccOf<scalar_t>::type* __restrict__ stats_t,
                    const typename AccOf<scalar_t>::type* __restrict__ sums,
                    scalar_t* __restrict__ grad_s, scalar_t* __restrict__ grad_t) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int V = kVec<scalar_t>;
  constexpr int U = kUnrollBackward;
  __shared__ acc_t coef[9 * kMaxColThreads * V];
  load_coefs<scalar_t, true>(coef, zs, zt, stats_s, stats_t, sums, B, D);
  const Geometry g = geometry<scalar_t>();
  if (g.c0 >= D) return;
  const int row = V * int(blockDim.x);
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r1 = min64(B, r0 + rows_per_split);
  const int64_t step = g.lanes;
  const acc_t c = srd::loss_grad_scale<acc_t>(*grad, *total);
  // Gradients of one row's V columns of both sides, then 16-byte stores.
  auto row_grads = [&](const Pack<scalar_t>& xs, const Pack<scalar_t>& xt, int64_t r) {
    acc_t gs[V], gt[V];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int at = slot(0, v, V);
      const acc_t s_rstd = coef[2 * row + at], t_rstd = coef[5 * row + at];
      const acc_t s = srd::normalize<acc_t>(to_acc(xs.v[v]), coef[at], coef[row + at], s_rstd);
      const acc_t t =
          srd::normalize<acc_t>(to_acc(xt.v[v]), coef[3 * row + at], coef[4 * row + at], t_rstd);
      acc_t value, h;
      srd::power_terms<acc_t>(s - t, p, ip, value, h);
      if (kTraining) {
        const acc_t mean_h = coef[6 * row + at];
        gs[v] = srd::bn_backward_train<acc_t>(c, h, s, mean_h, coef[7 * row + at], s_rstd);
        gt[v] = srd::bn_backward_train<acc_t>(-c, h, t, mean_h, coef[8 * row + at], t_rstd);
      } else {
        gs[v] = srd::bn_backward_eval<acc_t>(c, h, s_rstd);
        gt[v] = srd::bn_backward_eval<acc_t>(-c, h, t_rstd);
      }
    }
    store_pack<kVector>(grad_s + r * D, g.c0, D, gs);
    if (kTeacherGrad) store_pack<kVector>(grad_t + r * D, g.c0, D, gt);
  };
  int64_t r = r0 + g.ty;
  for (; r + (U - 1) * step < r1; r += U * step) {
    Pack<scalar_t> xs[U], xt[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      load_pack<kVector>(zs + (r + u * step) * D, g.c0, D, xs[u]);
      load_pack<kVector>(zt + (r + u * step) * D, g.c0, D, xt[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) row_grads(xs[u], xt[u], r + u * step);
  }
  for (; r < r1; r += step) {
    Pack<scalar_t> xs, xt;
    load_pack<kVector>(zs + r * D, g.c0, D, xs);
    load_pack<kVector>(zt + r * D, g.c0, D, xt);
    row_grads(xs, xt, r);
  }
}

dim3 tile_grid(const Plan& plan) {
  return dim3(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.n_splits));
}
dim3 tile_block(const Plan& plan) {
  return dim3(static_cast<unsigned>(plan.col_threads),
              static_cast<unsigned>(kThreads / plan.col_threads));
}

template <typename scalar_t, bool kVector>
void launch_stats(const void* student, const void* teacher, const Plan& plan, double eps,
                  void* workspace, void* stats_s, void* stats_t, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* zs = static_cast<const scalar_t*>(student);
  const auto* zt = static_cast<const scalar_t*>(teacher);
  auto* part = static_cast<acc_t*>(workspace);
#define FASTKD_SRD_STATS_KERNEL stats_partial_kernel<scalar_t, kVector>
  FASTKD_LAUNCH(FASTKD_SRD_STATS_KERNEL, tile_grid(plan), tile_block(plan), 0, stream, zs, zt,
                plan.batch, plan.width, plan.rows_per_split, plan.n_splits, part);
#undef FASTKD_SRD_STATS_KERNEL
  const unsigned blocks = static_cast<unsigned>((plan.width + kFinalThreads - 1) / kFinalThreads);
  FASTKD_LAUNCH(stats_finalize_kernel<scalar_t>, blocks, kFinalThreads, 0, stream,
      zs, zt, plan.batch, plan.width, plan.rows_per_split, plan.n_splits, acc_t(eps), part,
      static_cast<acc_t*>(stats_s), static_cast<acc_t*>(stats_t));
}

template <typename scalar_t, bool kVector>
void launch_sums(const void* student, const void* teacher, const Plan& plan, double p,
                 const void* stats_s, const void* stats_t, void* workspace, void* sums,
                 void* total, void* loss, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  auto* part = static_cast<acc_t*>(workspace);
#define FASTKD_SRD_SUMS_KERNEL sums_partial_kernel<scalar_t, kVector>
  FASTKD_LAUNCH(FASTKD_SRD_SUMS_KERNEL, tile_grid(plan), tile_block(plan), 0, stream,
      static_cast<const scalar_t*>(student), static_cast<const scalar_t*>(teacher), plan.batch,
      plan.width, plan.rows_per_split, acc_t(p), srd::integer_power(p),
      static_cast<const acc_t*>(stats_s), static_cast<const acc_t*>(stats_t), part);
#undef FASTKD_SRD_SUMS_KERNEL
  FASTKD_LAUNCH(sums_finalize_kernel<acc_t>, 1, kFinalThreads, 0, stream,
      part, plan.width, plan.n_splits, static_cast<acc_t*>(sums), static_cast<acc_t*>(total),
      static_cast<acc_t*>(loss));
}

template <typename scalar_t, bool kTraining, bool kTeacherGrad, bool kVector>
void launch_backward_impl(const void* grad, const void* total, const void* student,
                          const void* teacher, const Plan& plan, double p, const void* stats_s,
                          const void* stats_t, const void* sums, void* grad_student,
                          void* grad_teacher, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
// The kernel's template arguments hold commas: pass them to FASTKD_LAUNCH as one macro name.
#define FASTKD_SRD_BACKWARD_KERNEL backward_kernel<scalar_t, kTraining, kTeacherGrad, kVector>
  FASTKD_LAUNCH(FASTKD_SRD_BACKWARD_KERNEL, tile_grid(plan), tile_block(plan), 0, stream,
          static_cast<const acc_t*>(grad), static_cast<const acc_t*>(total),
          static_cast<const scalar_t*>(student), static_cast<const scalar_t*>(teacher),
          plan.batch, plan.width, plan.rows_per_split, acc_t(p), srd::integer_power(p),
          static_cast<const acc_t*>(stats_s), static_cast<const acc_t*>(stats_t),
          static_cast<const acc_t*>(sums), static_cast<scalar_t*>(grad_student),
          static_cast<scalar_t*>(grad_teacher));
#undef FASTKD_SRD_BACKWARD_KERNEL
}

template <typename scalar_t, bool kVector>
void launch_backward(const void* grad, const void* total, const void* student, const void* teacher,
                     const Plan& plan, double p, bool training, const void* stats_s,
                     const void* stats_t, const void* sums, void* grad_student,
                     void* grad_teacher, cudaStream_t stream) {
  const bool teacher_grad = grad_teacher != nullptr;
#define FASTKD_SRD_BACKWARD(TRAIN, TGRAD)                                                      \
  launch_backward_impl<scalar_t, TRAIN, TGRAD, kVector>(grad, total, student, teacher, plan, p, \
                                                        stats_s, stats_t, sums, grad_student,   \
                                                        grad_teacher, stream)
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
    auto run = [&](auto vector) {
      constexpr bool kVector = decltype(vector)::value;
      if (a.training)
        launch_stats<scalar_t, kVector>(a.student, a.teacher, plan, a.eps, a.workspace,
                                        a.stats_s, a.stats_t, stream);
      launch_sums<scalar_t, kVector>(a.student, a.teacher, plan, a.p, a.stats_s, a.stats_t,
                                     a.workspace, a.sums, a.total, a.loss, stream);
    };
    if (plan.vector) run(std::true_type());
    else run(std::false_type());
  });
  return launch_status();
}

cudaError_t srd_backward(const SrdArgs& a, cudaStream_t stream) {
  const Plan plan = plan_of(a);
  dispatch(a.dtype, [&](auto zero) {
    using scalar_t = decltype(zero);
    auto run = [&](auto vector) {
      launch_backward<scalar_t, decltype(vector)::value>(
          a.grad, a.total, a.student, a.teacher, plan, a.p, a.training, a.stats_s, a.stats_t,
          a.sums, a.grad_student, a.grad_teacher, stream);
    };
    if (plan.vector) run(std::true_type());
    else run(std::false_type());
  });
  return launch_status();
}

}  // namespace cuda
}  // namespace fastkd
