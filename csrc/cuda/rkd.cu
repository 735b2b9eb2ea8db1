// RKD distance loss (SPEC §2) CUDA kernels: the three sweeps of csrc/cpu/rkd.cpp on the GPU,
// O(B*D) extra memory (no B x B matrix is ever stored), deterministic (no float atomics; every
// cross-thread and cross-block reduction runs in a fixed order).
//
// T is the operand and accumulation dtype: double when any input is float64, float otherwise (the
// binding converts half, bfloat16 and mixed inputs once). Distance tiles are kTile x kTile, 256
// threads per block, thread (tx, ty) owning the 16 entries (ty + 16m, tx + 16n); dot products are
// streamed through shared memory kStep<T> features at a time (64 bytes per row), on CUDA cores.
//   sq_kernel:       squared row norms of both sides (one warp per row).
//   pair_kernel:     one block per upper-triangle tile (I, J >= I); sweep 1 sums d_S, d_T over
//                    its strictly upper entries, sweep 2 sums smooth_l1(x), h d_S, h d_T, each
//                    block into its own slot (double).
//   finalize_kernel: one block adds the slots in a fixed order (double) and writes the device
//                    scalars 1/mu_S, 1/mu_T (sweep 1), c_S, c_T and the loss (sweep 2).
//   grad_kernel:     one block per (row block I, range of column blocks J); for each J it
//                    recomputes both dot tiles, forms w^S (then w^T) in shared memory, adds its
//                    row sums and W F_J into the range's accumulator rows, which it alone owns.
//   write_grad_kernel: grad f_i = 4 g (r_i f_i - (W F)_i), summing the ranges in order, written in
//                    the input's dtype; g is read on the device (no host sync).
// The per-element math is csrc/include/fastkd/rkd_math.h, shared with the CPU kernel.
// FASTKD_LAUNCH (launch.h) lets tools/cuda_emulator run this file unchanged on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "fastkd/rkd_math.h"
#include "rkd_cuda.h"

namespace fastkd {
namespace cuda {
namespace {

constexpr int kSide = 16;                // threads per block side (16 x 16)
constexpr int kThreads = kSide * kSide;  // 256
constexpr int kPad = int(kTile) + 1;     // padded row of a shared w tile
constexpr int kRowsPerSqBlock = 8;       // warps (rows) per sq_kernel block

// Features per shared-memory step: 64 bytes per row.
template <typename T>
struct Step {
  static constexpr int value = 16;
};
template <>
struct Step<double> {
  static constexpr int value = 8;
};

// Scalars of sweeps 1 and 2, in device memory (double).
enum Scalar { kInvMuS = 0, kInvMuT = 1, kCS = 2, kCT = 3, kNumScalars = 8 };

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ int thread_id() {
  return int(threadIdx.y) * int(blockDim.x) + int(threadIdx.x);
}

// acc[m][n] = f_i . f_j for i = i0 + ty + 16m, j = j0 + tx + 16n (0 beyond B). sa, sb: shared
// buffers of kTile x (Step + 1). Every thread of the block must call it.
template <typename T>
__device__ __forceinline__ void dot_tile(const T* __restrict__ f, int64_t B, int64_t D, int64_t i0,
                                         int64_t j0, T* sa, T* sb, T acc[4][4]) {
  constexpr int KC = Step<T>::value;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = thread_id();
  for (int m = 0; m < 4; ++m)
    for (int n = 0; n < 4; ++n) acc[m][n] = T(0);
  for (int64_t k0 = 0; k0 < D; k0 += KC) {
    for (int e = tid; e < int(kTile) * KC; e += kThreads) {
      const int r = e / KC, c = e % KC;
      const int64_t k = k0 + c, i = i0 + r, j = j0 + r;
      sa[r * (KC + 1) + c] = (i < B && k < D) ? f[i * D + k] : T(0);
      sb[r * (KC + 1) + c] = (j < B && k < D) ? f[j * D + k] : T(0);
    }
    __syncthreads();
    for (int c = 0; c < KC; ++c) {
      T a[4], b[4];
      for (int m = 0; m < 4; ++m) a[m] = sa[(ty + kSide * m) * (KC + 1) + c];
      for (int n = 0; n < 4; ++n) b[n] = sb[(tx + kSide * n) * (KC + 1) + c];
      for (int m = 0; m < 4; ++m)
        for (int n = 0; n < 4; ++n) acc[m][n] += a[m] * b[n];
    }
    __syncthreads();
  }
}

// out[k] = sum over the block's threads of v[k], in a fixed tree (double). Thread 0 holds it.
template <int N>
__device__ __forceinline__ void block_sums(double (*red)[kThreads], const double* v, double* out) {
  const int tid = thread_id();
  for (int k = 0; k < N; ++k) red[k][tid] = v[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride)
      for (int k = 0; k < N; ++k) red[k][tid] += red[k][tid + stride];
    __syncthreads();
  }
  if (tid == 0)
    for (int k = 0; k < N; ++k) out[k] = red[k][0];
}

// Squared row norms of both sides: blockIdx.y is the side, one warp per row.
template <typename T>
__global__ void __launch_bounds__(32 * kRowsPerSqBlock)
    sq_kernel(const T* __restrict__ fs, const T* __restrict__ ft, int64_t B, int64_t Ds,
              int64_t Dt, T* __restrict__ sq_s, T* __restrict__ sq_t) {
  const bool teacher = blockIdx.y == 1;
  const T* f = teacher ? ft : fs;
  const int64_t D = teacher ? Dt : Ds;
  T* sq = teacher ? sq_t : sq_s;
  const int lane = threadIdx.x;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerSqBlock + threadIdx.y;
  T v = T(0);
  if (row < B)
    for (int64_t k = lane; k < D; k += 32) {
      const T x = f[row * D + k];
      v += x * x;
    }
  for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(0xffffffffu, v, mask);
  if (row < B && lane == 0) sq[row] = v;
}

// Sweeps 1 (kLoss = false) and 2 (kLoss = true) on the upper-triangle tile blockIdx.x.
// part: 3 doubles per tile. Sweep 1: sum d_S, sum d_T; sweep 2: sum smooth_l1(x), h d_S, h d_T.
template <typename T, bool kLoss>
__global__ void __launch_bounds__(kThreads)
    pair_kernel(const T* __restrict__ fs, const T* __restrict__ ft, int64_t B, int64_t Ds,
                int64_t Dt, const T* __restrict__ sq_s, const T* __restrict__ sq_t,
                const double* __restrict__ scal, double* __restrict__ part) {
  constexpr int KC = Step<T>::value;
  __shared__ T sa[kTile * (KC + 1)], sb[kTile * (KC + 1)];
  __shared__ double red[3][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  int64_t I, J;
  upper_tile(blockIdx.x, num_row_blocks(B), I, J);
  const int64_t i0 = I * kTile, j0 = J * kTile;
  T dot_s[4][4], dot_t[4][4];
  dot_tile(fs, B, Ds, i0, j0, sa, sb, dot_s);
  dot_tile(ft, B, Dt, i0, j0, sa, sb, dot_t);
  T inv_mu_s = T(0), inv_mu_t = T(0);
  if (kLoss) {
    inv_mu_s = T(scal[kInvMuS]);
    inv_mu_t = T(scal[kInvMuT]);
  }
  T sum_a = 0, sum_b = 0, sum_c = 0;
  for (int m = 0; m < 4; ++m)
    for (int n = 0; n < 4; ++n) {
      const int64_t i = i0 + ty + kSide * m, j = j0 + tx + kSide * n;
      if (!(i < j && j < B)) continue;  // strictly upper entries only
      const T qs = rkd::squared_distance<T>(sq_s[i], sq_s[j], dot_s[m][n]);
      const T qt = rkd::squared_distance<T>(sq_t[i], sq_t[j], dot_t[m][n]);
      const T ds = rkd::distance<T>(qs), dt = rkd::distance<T>(qt);
      if (!kLoss) {
        sum_a += ds;
        sum_b += dt;
        continue;
      }
      const T x = ds * inv_mu_s - dt * inv_mu_t;
      const T h = rkd::smooth_l1_grad<T>(x);
      sum_a += rkd::smooth_l1<T>(x);
      sum_b += h * ds;
      sum_c += h * dt;
    }
  const double v[3] = {double(sum_a), double(sum_b), double(sum_c)};
  block_sums<3>(red, v, part + 3 * int64_t(blockIdx.x));
}

// One block: adds the n_tiles slots in a fixed order and writes the scalars (and the loss).
template <typename T, bool kLoss>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ part, int64_t n_tiles, int64_t B,
                    double* __restrict__ scal, T* __restrict__ loss) {
  __shared__ double red[3][kThreads];
  double v[3] = {0, 0, 0};
  for (int64_t t = thread_id(); t < n_tiles; t += kThreads)
    for (int k = 0; k < 3; ++k) v[k] += part[3 * t + k];
  double total[3] = {0, 0, 0};
  block_sums<3>(red, v, total);
  if (thread_id() != 0) return;
  const double pairs = double(B) * double(B - 1);  // ordered off-diagonal pairs
  if (!kLoss) {
    scal[kInvMuS] = pairs / (2.0 * total[0]);
    scal[kInvMuT] = pairs / (2.0 * total[1]);
  } else {
    scal[kCS] = 2.0 * total[1] * scal[kInvMuS] / pairs;
    scal[kCT] = 2.0 * total[2] * scal[kInvMuT] / pairs;
    if (loss != nullptr) *loss = T(2.0 * total[0] / (double(B) * double(B)));
  }
}

// w (the thread's 16 entries of one side's W_IJ) into shared memory, then r += W_IJ 1 (threads
// tid < kTile own row i0 + tid) and acc[I rows] (+)= W_IJ F_J, kTile output columns at a time.
template <typename T>
__device__ __forceinline__ void apply_w(const T wreg[4][4], T* w, T* sf,
                                        const T* __restrict__ f, int64_t B, int64_t D, int64_t i0,
                                        int64_t j0, bool first, T& r, T* __restrict__ acc) {
  constexpr int KC = Step<T>::value;
  const int tx = threadIdx.x, ty = threadIdx.y, tid = thread_id();
  __syncthreads();  // earlier readers of w and sf are done
  for (int m = 0; m < 4; ++m)
    for (int n = 0; n < 4; ++n) w[(ty + kSide * m) * kPad + tx + kSide * n] = wreg[m][n];
  __syncthreads();
  if (tid < kTile) {
    T s = T(0);
    for (int j = 0; j < kTile; ++j) s += w[tid * kPad + j];
    r += s;
  }
  for (int64_t c0 = 0; c0 < D; c0 += kTile) {
    T out[4][4];
    for (int m = 0; m < 4; ++m)
      for (int n = 0; n < 4; ++n) out[m][n] = T(0);
    for (int jj0 = 0; jj0 < kTile; jj0 += KC) {
      for (int e = tid; e < KC * int(kTile); e += kThreads) {
        const int jr = e / int(kTile), cc = e % int(kTile);
        const int64_t j = j0 + jj0 + jr, col = c0 + cc;
        sf[jr * kTile + cc] = (j < B && col < D) ? f[j * D + col] : T(0);
      }
      __syncthreads();
      for (int jr = 0; jr < KC; ++jr) {
        T a[4], b[4];
        for (int m = 0; m < 4; ++m) a[m] = w[(ty + kSide * m) * kPad + jj0 + jr];
        for (int n = 0; n < 4; ++n) b[n] = sf[jr * kTile + tx + kSide * n];
        for (int m = 0; m < 4; ++m)
          for (int n = 0; n < 4; ++n) out[m][n] += a[m] * b[n];
      }
      __syncthreads();
    }
    for (int m = 0; m < 4; ++m)
      for (int n = 0; n < 4; ++n) {
        const int64_t i = i0 + ty + kSide * m, col = c0 + tx + kSide * n;
        if (i >= B || col >= D) continue;
        T* p = acc + i * D + col;
        *p = first ? out[m][n] : *p + out[m][n];
      }
  }
}

// Sweep 3 for row block blockIdx.x over the column blocks of range blockIdx.y. r_part: (n_splits,
// 2, B) row sums of W^S, W^T; acc_s: (n_splits, B, Ds) W^S F_S; acc_t: (n_splits, B, Dt).
template <typename T, bool kTeacherGrad>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const T* __restrict__ fs, const T* __restrict__ ft, int64_t B, int64_t Ds,
                int64_t Dt, int64_t j_per_split, const T* __restrict__ sq_s,
                const T* __restrict__ sq_t, const double* __restrict__ scal,
                T* __restrict__ r_part, T* __restrict__ acc_s, T* __restrict__ acc_t) {
  constexpr int KC = Step<T>::value;
  static_assert(KC * kTile <= kTile * (KC + 1), "sf fits in sa");
  __shared__ T sa[kTile * (KC + 1)], sb[kTile * (KC + 1)];
  __shared__ T w[kTile * kPad];
  const int tx = threadIdx.x, ty = threadIdx.y, tid = thread_id();
  const int64_t nb = (B + kTile - 1) / kTile;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, split = blockIdx.y;
  const int64_t j_begin = split * j_per_split, j_end = min64(nb, j_begin + j_per_split);
  const T inv_mu_s = T(scal[kInvMuS]), inv_mu_t = T(scal[kInvMuT]);
  const T c_s = T(scal[kCS]), c_t = T(scal[kCT]);
  const T bb = T(B) * T(B);
  T* out_s = acc_s + split * B * Ds;
  T* out_t = kTeacherGrad ? acc_t + split * B * Dt : nullptr;
  T r_s = T(0), r_t = T(0);
  for (int64_t J = j_begin; J < j_end; ++J) {
    const int64_t j0 = J * kTile;
    T ws[4][4], wt[4][4];
    {
      T dot_s[4][4], dot_t[4][4];
      dot_tile(fs, B, Ds, i0, j0, sa, sb, dot_s);
      dot_tile(ft, B, Dt, i0, j0, sa, sb, dot_t);
      for (int m = 0; m < 4; ++m)
        for (int n = 0; n < 4; ++n) {
          const int64_t i = i0 + ty + kSide * m, j = j0 + tx + kSide * n;
          ws[m][n] = wt[m][n] = T(0);
          if (i >= B || j >= B || i == j) continue;
          const T qs = rkd::squared_distance<T>(sq_s[i], sq_s[j], dot_s[m][n]);
          const T qt = rkd::squared_distance<T>(sq_t[i], sq_t[j], dot_t[m][n]);
          const T ds = rkd::distance<T>(qs), dt = rkd::distance<T>(qt);
          const T x = ds * inv_mu_s - dt * inv_mu_t;
          const T h = rkd::smooth_l1_grad<T>(x);
          // dL/dd_S = (h - c_S) mu_S^-1 / B^2, dL/dd_T = -(h - c_T) mu_T^-1 / B^2
          ws[m][n] = (h - c_s) * inv_mu_s / bb * rkd::distance_grad<T>(qs, ds);
          wt[m][n] = -(h - c_t) * inv_mu_t / bb * rkd::distance_grad<T>(qt, dt);
        }
    }
    const bool first = J == j_begin;
    apply_w<T>(ws, w, sa, fs, B, Ds, i0, j0, first, r_s, out_s);
    if (kTeacherGrad) apply_w<T>(wt, w, sa, ft, B, Dt, i0, j0, first, r_t, out_t);
  }
  if (tid < kTile && i0 + tid < B) {
    r_part[(split * 2) * B + i0 + tid] = r_s;
    if (kTeacherGrad) r_part[(split * 2 + 1) * B + i0 + tid] = r_t;
  }
}

// grad f = 4 g (r f - W F) for one side, the n_splits ranges added in order. r_part: this side's
// row sums, split stride 2 B. grad: 0-dim upstream gradient, or null for 1.
template <typename T, typename out_t>
__global__ void __launch_bounds__(kThreads)
    write_grad_kernel(const T* __restrict__ f, int64_t B, int64_t D,
                      const T* __restrict__ r_part, const T* __restrict__ acc, int64_t n_splits,
                      const T* __restrict__ grad, out_t* __restrict__ out) {
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= B * D) return;
  const int64_t i = idx / D;
  T r = T(0), wf = T(0);
  for (int64_t s = 0; s < n_splits; ++s) {
    r += r_part[s * 2 * B + i];
    wf += acc[s * B * D + idx];
  }
  const T g = grad != nullptr ? *grad : T(1);
  store(out + idx, (f[idx] * r - wf) * (T(4) * g));
}

// Sweep 3's split of the column blocks: n_splits ranges of j_per_split blocks (the last may be
// shorter).
struct Plan {
  int64_t j_per_split;
  int64_t n_splits;
};

Plan plan_of(const RkdArgs& a) {
  const int64_t nb = num_row_blocks(a.batch);
  int64_t splits = a.splits;
  if (splits <= 0)  // ~2 blocks per SM
    splits = std::clamp<int64_t>((2 * int64_t(a.sm_count) + nb - 1) / nb, 1, kMaxSplits);
  splits = std::clamp<int64_t>(splits, 1, std::min<int64_t>(nb, kMaxSplits));
  const int64_t per_split = (nb + splits - 1) / splits;
  return {per_split, (nb + per_split - 1) / per_split};
}

// The workspace: the device scalars, the tile slots of sweeps 1 and 2, the squared row norms
// and, for the gradients, sweep 3's row sums and accumulators (operand dtype T).
struct WorkspaceLayout {
  double* scal;
  double* part;
  void *sq_s, *sq_t, *r, *acc_s, *acc_t;
  size_t bytes;
};

WorkspaceLayout layout_of(const RkdArgs& a, Pass pass, void* base) {
  const size_t es = size_of(a.dtype);
  const size_t B = size_t(a.batch), splits = size_t(plan_of(a).n_splits);
  Workspace ws(base);
  WorkspaceLayout l{};
  l.scal = ws.take<double>(kNumScalars);
  l.part = ws.take<double>(3 * size_t(num_upper_tiles(a.batch)));
  l.sq_s = ws.take_bytes(B, es);
  l.sq_t = ws.take_bytes(B, es);
  if (pass != Pass::kForward) {
    l.r = ws.take_bytes(splits * 2 * B, es);
    l.acc_s = ws.take_bytes(splits * B * size_t(a.student_width), es);
    if (a.grad_teacher != nullptr)
      l.acc_t = ws.take_bytes(splits * B * size_t(a.teacher_width), es);
  }
  l.bytes = ws.bytes();
  return l;
}

template <typename T, typename out_t>
void launch_write_grad(const T* f, int64_t B, int64_t D, const T* r_part, const T* acc,
                       int64_t n_splits, const T* grad, void* out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((B * D + kThreads - 1) / kThreads);
#define FASTKD_RKD_WRITE_KERNEL write_grad_kernel<T, out_t>
  FASTKD_LAUNCH(FASTKD_RKD_WRITE_KERNEL, blocks, kThreads, 0, stream, f, B, D, r_part, acc,
                n_splits, grad, static_cast<out_t*>(out));
#undef FASTKD_RKD_WRITE_KERNEL
}

template <typename T>
void write_grad(DType out_dtype, const T* f, int64_t B, int64_t D, const T* r_part, const T* acc,
                int64_t n_splits, const T* grad, void* out, cudaStream_t stream) {
  dispatch(out_dtype, [&](auto zero) {
    using out_t = decltype(zero);
    launch_write_grad<T, out_t>(f, B, D, r_part, acc, n_splits, grad, out, stream);
  });
}

// Sweeps 1 and 2, then, unless pass is kForward, sweep 3. `grad`: the upstream gradient (kBackward)
// or null (1).
template <typename T>
void launch_all(const RkdArgs& a, Pass pass, cudaStream_t stream) {
  const int64_t B = a.batch, Ds = a.student_width, Dt = a.teacher_width;
  const bool gradients = pass != Pass::kForward;
  const bool teacher_grad = gradients && a.grad_teacher != nullptr;
  const WorkspaceLayout l = layout_of(a, pass, a.workspace);
  const Plan plan = plan_of(a);
  auto* scal = l.scal;
  auto* part = l.part;
  auto* sq_s = static_cast<T*>(l.sq_s);
  auto* sq_t = static_cast<T*>(l.sq_t);
  const auto* fs = static_cast<const T*>(a.student);
  const auto* ft = static_cast<const T*>(a.teacher);
  const int64_t n_tiles = num_upper_tiles(B), nb = num_row_blocks(B);

  const dim3 sq_grid(static_cast<unsigned>((B + kRowsPerSqBlock - 1) / kRowsPerSqBlock), 2);
  FASTKD_LAUNCH(sq_kernel<T>, sq_grid, dim3(32, kRowsPerSqBlock), 0, stream, fs, ft, B, Ds, Dt,
                sq_s, sq_t);
  const dim3 tile_block(kSide, kSide);
  const unsigned tiles = static_cast<unsigned>(n_tiles);
  // Sweep 1: the means.
#define FASTKD_RKD_PAIR_KERNEL pair_kernel<T, false>
#define FASTKD_RKD_FINAL_KERNEL finalize_kernel<T, false>
  FASTKD_LAUNCH(FASTKD_RKD_PAIR_KERNEL, tiles, tile_block, 0, stream, fs, ft, B, Ds, Dt, sq_s,
                sq_t, scal, part);
  FASTKD_LAUNCH(FASTKD_RKD_FINAL_KERNEL, 1, kThreads, 0, stream, part, n_tiles, B, scal,
                static_cast<T*>(nullptr));
#undef FASTKD_RKD_PAIR_KERNEL
#undef FASTKD_RKD_FINAL_KERNEL
  // Sweep 2: the loss and c_S, c_T.
#define FASTKD_RKD_PAIR_KERNEL pair_kernel<T, true>
#define FASTKD_RKD_FINAL_KERNEL finalize_kernel<T, true>
  FASTKD_LAUNCH(FASTKD_RKD_PAIR_KERNEL, tiles, tile_block, 0, stream, fs, ft, B, Ds, Dt, sq_s,
                sq_t, scal, part);
  FASTKD_LAUNCH(FASTKD_RKD_FINAL_KERNEL, 1, kThreads, 0, stream, part, n_tiles, B, scal,
                static_cast<T*>(a.loss));
#undef FASTKD_RKD_PAIR_KERNEL
#undef FASTKD_RKD_FINAL_KERNEL
  if (!gradients) return;

  // Sweep 3: the gradients.
  auto* r_part = static_cast<T*>(l.r);
  auto* acc_s = static_cast<T*>(l.acc_s);
  auto* acc_t = teacher_grad ? static_cast<T*>(l.acc_t) : nullptr;
  const dim3 grad_grid(static_cast<unsigned>(nb), static_cast<unsigned>(plan.n_splits));
#define FASTKD_RKD_GRAD_ARGS \
  fs, ft, B, Ds, Dt, plan.j_per_split, sq_s, sq_t, scal, r_part, acc_s, acc_t
  if (teacher_grad) {
#define FASTKD_RKD_GRAD_KERNEL grad_kernel<T, true>
    FASTKD_LAUNCH(FASTKD_RKD_GRAD_KERNEL, grad_grid, tile_block, 0, stream, FASTKD_RKD_GRAD_ARGS);
#undef FASTKD_RKD_GRAD_KERNEL
  } else {
#define FASTKD_RKD_GRAD_KERNEL grad_kernel<T, false>
    FASTKD_LAUNCH(FASTKD_RKD_GRAD_KERNEL, grad_grid, tile_block, 0, stream, FASTKD_RKD_GRAD_ARGS);
#undef FASTKD_RKD_GRAD_KERNEL
  }
#undef FASTKD_RKD_GRAD_ARGS
  const auto* grad = pass == Pass::kBackward ? static_cast<const T*>(a.grad) : nullptr;
  write_grad<T>(a.grad_student_dtype, fs, B, Ds, r_part, acc_s, plan.n_splits, grad,
                a.grad_student, stream);
  if (teacher_grad)
    write_grad<T>(a.grad_teacher_dtype, ft, B, Dt, r_part + B, acc_t, plan.n_splits, grad,
                  a.grad_teacher, stream);
}

cudaError_t run(const RkdArgs& a, Pass pass, cudaStream_t stream) {
  if (a.dtype == DType::kDouble)
    launch_all<double>(a, pass, stream);
  else
    launch_all<float>(a, pass, stream);
  return launch_status();
}

}  // namespace

int64_t rkd_splits(const RkdArgs& args) { return plan_of(args).n_splits; }

size_t rkd_workspace_bytes(const RkdArgs& args, Pass pass) {
  return layout_of(args, pass, nullptr).bytes;
}

cudaError_t rkd_forward(const RkdArgs& args, cudaStream_t stream) {
  return run(args, Pass::kForward, stream);
}

cudaError_t rkd_backward(const RkdArgs& args, cudaStream_t stream) {
  return run(args, Pass::kBackward, stream);
}

cudaError_t rkd_forward_backward(const RkdArgs& args, cudaStream_t stream) {
  return run(args, Pass::kForwardBackward, stream);
}

}  // namespace cuda
}  // namespace fastkd
