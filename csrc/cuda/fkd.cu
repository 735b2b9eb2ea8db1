// FKD (SPEC §1) on CUDA: the tiled kernel-space algorithm, O(B*D) extra memory.
//
// Every block works on 64 x 64 tiles of the B x B kernels, computed on chip from row blocks of
// the raw features and never stored:
//   rho_S[I, J] = (r_i r_j) (F_I F_J^T)_ij
//   rho_T[I, J] = (1/E) sum_e (r^e_i r^e_j) (T^e_I T^e_J^T)_ij
// with r the inverse row norms (fkd::inv_row_norm). Scaling the Gram tile instead of the operands
// keeps float16/bfloat16 products exact (tensor cores accumulate them in float32), so the loss
// is as accurate as the float32 CPU kernel.
//
// Forward: one block per tile (I, J >= I); its weighted sum of squared differences lands in its
// own slot and one block adds the slots in a fixed order (deterministic).
// Backward: one block per (row block I, split of the J range) accumulates
//   acc_I += (rho_S - rho_T)[I, J] A_J   (and (rho_S - rho_T)[I, J] That^e_J for teachers)
// into its own B x D accumulator; the difference tiles of a group of J blocks wait in shared
// memory, and the normalised rows A_J are formed while loading. A row kernel then sums the splits
// in order and applies the normalisation chain rule (fkd::normalize_backward, featreg_backward).
// Forward-backward: the backward sweep also sums the squared differences of its tiles.
//
// Tiles: 256 threads; thread t owns the tile entries (t/16 + 16m, t%16 + 16n), m, n < 4.
// float16/bfloat16: WMMA 16x16x16 fragments (8 warps x 16x32 outputs), staged through shared
// memory to reach that ownership. float32 with Precision::kTf32 / kTf32x3 (SPEC §6): the same
// warp tiles on WMMA 16x16x8 TF32 fragments, one product or the split product
// hi.hi + hi.lo + lo.hi. float32 (kIeee) / float64: the same loop on CUDA cores, 4x4 entries per
// thread held in registers. Operands reach shared memory in 16-byte chunks, the next K step's
// chunk loaded into registers while the current step is multiplied.
//
// No torch headers here (they cost minutes of nvcc time); fkd_binding.cpp wraps this for ATen.
// FASTKD_LAUNCH (launch.h) and FASTKD_EMULATE let tools/cuda_emulator run this file unchanged on
// the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "fastkd/fkd_math.h"
#include "fastkd/launch_plan.h"
#include "fkd_cuda.h"

// WMMA with bfloat16 and TF32 needs sm_80; older targets (if ever built) fall back to CUDA cores.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTKD_TENSOR_CORES 0
#else
#define FASTKD_TENSOR_CORES 1
#endif

namespace fastkd {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLdStage = kTile + 4;  // float staging tile; WMMA needs a multiple of 4
constexpr int kDefaultSmem = 48 * 1024;

template <typename T>
struct Traits;
// kBK: K columns loaded per step. kPad: row padding of the shared tiles; WMMA needs leading
// dimensions that are multiples of 8 halves, the CUDA-core loop only needs to dodge bank
// conflicts.
// float16 and bfloat16 differ only in kType.
struct HalfTraits {
  using acc = float;
  static constexpr int kBK = 32, kPad = 8;
  static constexpr bool kTensorCores = true;
  static constexpr int kMinBlocks = 2;  // tile kernels: <= 128 registers, 2 blocks per SM
};
template <>
struct Traits<__half> : HalfTraits {
  static constexpr DType kType = DType::kHalf;
};
template <>
struct Traits<__nv_bfloat16> : HalfTraits {
  static constexpr DType kType = DType::kBFloat16;
};
template <>
struct Traits<float> {
  using acc = float;
  static constexpr DType kType = DType::kFloat;
  static constexpr int kBK = 16, kPad = 1;
  static constexpr bool kTensorCores = false;
  static constexpr int kMinBlocks = 2;
};
template <>
struct Traits<double> {
  using acc = double;
  static constexpr DType kType = DType::kDouble;
  static constexpr int kBK = 8, kPad = 1;
  static constexpr bool kTensorCores = false;
  static constexpr int kMinBlocks = 1;  // 4x4 doubles per thread need more than 128 registers
};

template <typename T>
__device__ __forceinline__ T from_acc(typename Traits<T>::acc x);
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

constexpr size_t round_up(size_t bytes) { return (bytes + 127) / 128 * 128; }

// float32 operands on TF32 tensor cores (Precision::kTf32, kTf32x3).
template <typename T, Precision P>
constexpr bool kTf32Path = std::is_same_v<T, float> && P != Precision::kIeee;

// Dynamic shared memory: A tile [64][LDA]; B tile, [64][LDA] (rows of a Gram tile's second
// operand) or [BK][LDB] (rows of the features multiplying P); float staging [64][kLdStage]
// (tensor cores only); warp sums; for the backward the difference tiles P [64][LDP].
// Offsets are multiples of 128 bytes (WMMA wants 32-byte aligned tile pointers).
template <typename T, Precision P = Precision::kIeee>
struct Layout {
  static constexpr bool kTensorCores = Traits<T>::kTensorCores || kTf32Path<T, P>;
  // TF32 WMMA wants leading dimensions that are multiples of 4 floats.
  static constexpr int kPad = kTf32Path<T, P> ? 4 : Traits<T>::kPad;
  static constexpr int BK = Traits<T>::kBK;
  static constexpr int JG = group_tiles(Traits<T>::kType);
  static constexpr int LDA = BK + kPad;
  static constexpr int LDB = kTile + kPad;
  static constexpr int LDP = JG * kTile + kPad;
  static constexpr int kBElems = kTile * LDA > BK * LDB ? kTile * LDA : BK * LDB;
  static constexpr size_t kA = 0;
  static constexpr size_t kB = round_up(kA + sizeof(T) * kTile * LDA);
  static constexpr size_t kStage = round_up(kB + sizeof(T) * kBElems);
  static constexpr size_t kRed =
      round_up(kStage + (kTensorCores ? sizeof(float) * kTile * kLdStage : 0));
  static constexpr size_t kForwardBytes = round_up(kRed + sizeof(double) * kWarps);
  static constexpr size_t kP = kForwardBytes;
  static constexpr size_t kBackwardBytes = round_up(kP + sizeof(T) * kTile * LDP);
  static_assert(!kTensorCores || BK % 16 == 0, "whole WMMA K steps");
  static_assert(kTile % BK == 0, "a K step never straddles two J tiles");
  static_assert(kTile * kTile == 16 * kThreads, "16 owned entries per thread");
  // Each K step moves 64 bytes of each of 64 rows, 16 bytes per thread (see RowChunk).
  static_assert(BK * sizeof(T) == 64 && kTile * BK * sizeof(T) == 16 * kThreads, "chunks");
};

#ifndef FASTKD_EMULATE
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(128) unsigned char fastkd_fkd_smem[];
  return fastkd_fkd_smem;
}
#endif

template <typename T, Precision P = Precision::kIeee>
struct Smem {
  using L = Layout<T, P>;
  T* a;
  T* b;
  float* stage;
  double* red;
  T* p;
  __device__ explicit Smem(unsigned char* base)
      : a(reinterpret_cast<T*>(base + L::kA)),
        b(reinterpret_cast<T*>(base + L::kB)),
        stage(reinterpret_cast<float*>(base + L::kStage)),
        red(reinterpret_cast<double*>(base + L::kRed)),
        p(reinterpret_cast<T*>(base + L::kP)) {}
};

// Entries of a 64 x 64 tile owned by this thread: row own_row(m), column own_col(n).
__device__ __forceinline__ int own_row(int m) { return int(threadIdx.x) / 16 + 16 * m; }
__device__ __forceinline__ int own_col(int n) { return int(threadIdx.x) % 16 + 16 * n; }

// C (64 x 64) += A (64 x k, row-major, lda) * B (k x 64), both in shared memory, on CUDA cores;
// the owned entries stay in registers. B is row-major (b[k * ldb + n]) or, with kBRows, stored
// as its 64 columns' rows (b[n * ldb + k], the second operand of a Gram tile).
template <typename T>
struct SimtTile {
  using acc_t = typename Traits<T>::acc;
  acc_t c[4][4];

  __device__ void zero() {
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int n = 0; n < 4; ++n) c[m][n] = acc_t(0);
  }

  template <bool kBRows>
  __device__ void mma(const T* a, int lda, const T* b, int ldb, int k) {
    for (int kk = 0; kk < k; ++kk) {
      acc_t av[4], bv[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) av[m] = to_acc(a[own_row(m) * lda + kk]);
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        bv[n] = to_acc(kBRows ? b[own_col(n) * ldb + kk] : b[kk * ldb + own_col(n)]);
      }
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int n = 0; n < 4; ++n) c[m][n] += av[m] * bv[n];
    }
  }

  __device__ void extract(acc_t (&v)[16], float* /*stage*/) {
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
      for (int n = 0; n < 4; ++n) v[4 * m + n] = c[m][n];
  }
};

#if FASTKD_TENSOR_CORES
// Warp tiles of the tensor-core tiles: warp w holds rows 16 (w / 2) .. +16, columns
// 32 (w % 2) .. +32 as two 16x16 float accumulators.
__device__ __forceinline__ int frag_row() { return int(threadIdx.x) / 32 / 2 * 16; }
__device__ __forceinline__ int frag_col() { return int(threadIdx.x) / 32 % 2 * 32; }

// The owned entries of the two accumulators c[0..1]: through the staging tile, because the
// fragment's element layout is opaque.
template <typename Acc>
__device__ void extract_staged(const Acc (&c)[2], float (&v)[16], float* stage) {
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    nvcuda::wmma::store_matrix_sync(stage + frag_row() * kLdStage + frag_col() + 16 * f, c[f],
                                    kLdStage, nvcuda::wmma::mem_row_major);
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int n = 0; n < 4; ++n) v[4 * m + n] = stage[own_row(m) * kLdStage + own_col(n)];
  __syncthreads();  // the staging tile is reused by the next extract()
}

// SimtTile's contract on 16-bit tensor cores (WMMA 16x16x16, float accumulators).
template <typename T>
struct TensorCoreTile {
  using acc_t = float;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> c[2];

  __device__ void zero() {
    nvcuda::wmma::fill_fragment(c[0], 0.0f);
    nvcuda::wmma::fill_fragment(c[1], 0.0f);
  }

  template <bool kBRows>
  __device__ void mma(const T* a, int lda, const T* b, int ldb, int k) {
    using namespace nvcuda;
    using BLayout = std::conditional_t<kBRows, wmma::col_major, wmma::row_major>;
    for (int kk = 0; kk < k; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, a + frag_row() * lda + kk, lda);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        const int n0 = frag_col() + 16 * f;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
        wmma::load_matrix_sync(fb, kBRows ? b + n0 * ldb + kk : b + kk * ldb + n0, ldb);
        wmma::mma_sync(c[f], fa, fb, c[f]);
      }
    }
  }

  __device__ void extract(float (&v)[16], float* stage) { extract_staged(c, v, stage); }
};

// SimtTile's contract for float32 operands on TF32 tensor cores (WMMA 16x16x8, float
// accumulators). The fragments are loaded from shared memory as float and converted element by
// element (the conversion does not depend on the opaque layout): kTf32 rounds each operand to
// TF32 (__float_to_tf32: nearest, ties away from zero); kTf32x3 splits it into hi = tf32(a) and
// lo = tf32(a - hi) (a - hi is exact) and adds lo.hi + hi.lo before hi.hi, the small terms
// first. The dropped lo.lo term is below 2^-22 of the product: close to float32 products.
template <Precision P>
struct Tf32Tile {
  using acc_t = float;
  static constexpr bool kSplit = P == Precision::kTf32x3;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 8, float> c[2];

  __device__ void zero() {
    nvcuda::wmma::fill_fragment(c[0], 0.0f);
    nvcuda::wmma::fill_fragment(c[1], 0.0f);
  }

  // hi = tf32(hi) in place and, for kTf32x3, lo = tf32(old hi - new hi).
  template <typename Frag>
  __device__ static void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int e = 0; e < hi.num_elements; ++e) {
      const float x = hi.x[e];
      hi.x[e] = nvcuda::wmma::__float_to_tf32(x);
      if constexpr (kSplit) lo.x[e] = nvcuda::wmma::__float_to_tf32(x - hi.x[e]);
    }
  }

  template <bool kBRows>
  __device__ void mma(const float* a, int lda, const float* b, int ldb, int k) {
    using namespace nvcuda;
    using BLayout = std::conditional_t<kBRows, wmma::col_major, wmma::row_major>;
    using tf32 = wmma::precision::tf32;
#pragma unroll 1
    for (int kk = 0; kk < k; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, tf32, wmma::row_major> a_hi, a_lo;
      wmma::load_matrix_sync(a_hi, a + frag_row() * lda + kk, lda);
      split(a_hi, a_lo);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        const int n0 = frag_col() + 16 * f;
        wmma::fragment<wmma::matrix_b, 16, 16, 8, tf32, BLayout> b_hi, b_lo;
        wmma::load_matrix_sync(b_hi, kBRows ? b + n0 * ldb + kk : b + kk * ldb + n0, ldb);
        split(b_hi, b_lo);
        if constexpr (kSplit) {
          wmma::mma_sync(c[f], a_lo, b_hi, c[f]);
          wmma::mma_sync(c[f], a_hi, b_lo, c[f]);
        }
        wmma::mma_sync(c[f], a_hi, b_hi, c[f]);
      }
    }
  }

  __device__ void extract(float (&v)[16], float* stage) { extract_staged(c, v, stage); }
};
#endif

// The tile type of element type T at precision P: CUDA cores, 16-bit or TF32 tensor cores.
template <typename T, Precision P = Precision::kIeee,
          bool kTensorCores = Layout<T, P>::kTensorCores && FASTKD_TENSOR_CORES>
struct TileFor {
  using type = SimtTile<T>;
};
#if FASTKD_TENSOR_CORES
template <typename T, Precision P>
struct TileFor<T, P, true> {
  using type = std::conditional_t<kTf32Path<T, P>, Tf32Tile<P>, TensorCoreTile<T>>;
};
#endif

template <typename T>
__device__ __forceinline__ T zero_of() {
  return from_acc<T>(typename Traits<T>::acc(0));
}

// 16 bytes of one row: the unit of every global -> shared copy (64 threads x 4 chunks = 64 rows
// of a K step, or 256 chunks of the rows multiplying P). A 16-byte load when the rows allow
// it (width a multiple of the chunk, 16-byte aligned base), element loads otherwise; entries
// outside the matrix read as 0.
template <typename T>
struct RowChunk {
  static constexpr int N = 16 / sizeof(T);
  alignas(16) T v[N];

  __device__ void load(const T* __restrict__ x, int64_t rows, int64_t width, bool vectors,
                       int64_t row, int64_t col) {
    if (vectors && row < rows && col < width) {  // col % N == 0 == width % N: all inside
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(x + row * width + col);
      return;
    }
    const T zero = zero_of<T>();
#pragma unroll
    for (int e = 0; e < N; ++e) {
      v[e] = row < rows && col + e < width ? x[row * width + col + e] : zero;
    }
  }

  // dst[0 .. N) = v (scaled by `scale` first in store_scaled); one 16-byte store when the
  // caller knows dst is 16-byte aligned.
  template <bool kAligned>
  __device__ void store(T* dst) const {
    if constexpr (kAligned) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) dst[e] = v[e];
    }
  }
  template <bool kAligned>
  __device__ void store_scaled(T* dst, typename Traits<T>::acc scale) {
#pragma unroll
    for (int e = 0; e < N; ++e) v[e] = from_acc<T>(to_acc(v[e]) * scale);
    store<kAligned>(dst);
  }
};

template <typename T>
__device__ __forceinline__ bool vector_rows(const T* x, int64_t width) {
  return width % RowChunk<T>::N == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
}

// Gram tile of the raw features: x[i0 + r] . x[j0 + c] for r, c < 64 (rows >= batch read as 0).
// The next K step is loaded into registers while the current one is multiplied.
template <typename T, Precision P, typename Tile>
__device__ void gram_tile(Tile& tile, const Smem<T, P>& sm, const T* __restrict__ x, int64_t width,
                          int64_t batch, int64_t i0, int64_t j0) {
  constexpr int BK = Layout<T, P>::BK, LDA = Layout<T, P>::LDA;
  constexpr bool kAligned = LDA * sizeof(T) % 16 == 0;
  const bool vectors = vector_rows(x, width);
  const int r = threadIdx.x / 4, kk = threadIdx.x % 4 * RowChunk<T>::N;
  RowChunk<T> ca, cb;
  ca.load(x, batch, width, vectors, i0 + r, kk);
  cb.load(x, batch, width, vectors, j0 + r, kk);
  tile.zero();
  for (int64_t k0 = 0; k0 < width; k0 += BK) {
    ca.template store<kAligned>(sm.a + r * LDA + kk);
    cb.template store<kAligned>(sm.b + r * LDA + kk);  // B stored by rows: b[n * LDA + k]
    __syncthreads();
    if (k0 + BK < width) {
      ca.load(x, batch, width, vectors, i0 + r, k0 + BK + kk);
      cb.load(x, batch, width, vectors, j0 + r, k0 + BK + kk);
    }
    tile.template mma<true>(sm.a, LDA, sm.b, LDA, BK);
    __syncthreads();
  }
}

// out[q] (+)= r[i] r[j] v[q] over the owned entries (i, j) of the tile at (i0, j0), with r taken
// as 0 outside the batch: there the Gram entries are dot products with zero rows, so 0.
template <bool kAccumulate, typename acc_t>
__device__ __forceinline__ void scale_owned(const acc_t (&v)[16], const acc_t* __restrict__ r,
                                            int64_t batch, int64_t i0, int64_t j0,
                                            acc_t (&out)[16]) {
  acc_t r_row[4], r_col[4];
#pragma unroll
  for (int m = 0; m < 4; ++m) {
    r_row[m] = i0 + own_row(m) < batch ? r[i0 + own_row(m)] : acc_t(0);
    r_col[m] = j0 + own_col(m) < batch ? r[j0 + own_col(m)] : acc_t(0);
  }
#pragma unroll
  for (int q = 0; q < 16; ++q) {
    const acc_t x = r_row[q / 4] * r_col[q % 4] * v[q];
    out[q] = kAccumulate ? out[q] + x : x;
  }
}

// Owned entries of rho_S and rho_T for the tile at rows i0, columns j0; 0 outside the batch.
template <typename T, Precision P, typename Tile>
__device__ void kernel_tiles(Tile& tile, const Smem<T, P>& sm, const FkdArgs& args, int64_t i0,
                             int64_t j0, typename Traits<T>::acc (&s)[16],
                             typename Traits<T>::acc (&t)[16]) {
  using acc_t = typename Traits<T>::acc;
  const int64_t batch = args.batch;
  acc_t v[16];
  gram_tile<T>(tile, sm, static_cast<const T*>(args.student), args.student_width, batch, i0, j0);
  tile.extract(v, sm.stage);
  scale_owned<false>(v, static_cast<const acc_t*>(args.student_inv_norm), batch, i0, j0, s);
#pragma unroll
  for (int q = 0; q < 16; ++q) t[q] = acc_t(0);
  for (int e = 0; e < args.num_teachers; ++e) {
    gram_tile<T>(tile, sm, static_cast<const T*>(args.teacher[e]), args.teacher_width[e], batch,
                 i0, j0);
    tile.extract(v, sm.stage);
    scale_owned<true>(v, static_cast<const acc_t*>(args.teacher_inv_norm) + e * batch, batch, i0,
                      j0, t);
  }
  if (args.num_teachers > 1) {
    const acc_t e = acc_t(args.num_teachers);
#pragma unroll
    for (int q = 0; q < 16; ++q) t[q] /= e;
  }
}

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
  // Butterfly: every lane ends with the same bits (IEEE addition is commutative).
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block in a fixed order; the result is valid in thread 0. `red` holds kWarps
// doubles; call __syncthreads() before reusing it.
__device__ double block_sum(double v, double* red) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += red[w];
  }
  return total;
}

// inv_norm[i] = 1 / max(||x_i||, eps), sum_sq[i] = ||x_i||^2 (if not null). One warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_norms_kernel(const T* __restrict__ x, int64_t rows, int64_t width,
                     typename Traits<T>::acc* __restrict__ inv_norm,
                     typename Traits<T>::acc* __restrict__ sum_sq) {
  using acc_t = typename Traits<T>::acc;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  acc_t ss = 0;
  for (int64_t k = lane; k < width; k += 32) {
    const acc_t v = to_acc(x[row * width + k]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) {
    inv_norm[row] = fkd::inv_row_norm<acc_t>(ss);
    if (sum_sq != nullptr) sum_sq[row] = ss;
  }
}

template <typename T, Precision P>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    fkd_forward_kernel(const __grid_constant__ FkdArgs args, int64_t nb,
                       double* __restrict__ partial) {
  using acc_t = typename Traits<T>::acc;
  const Smem<T, P> sm(dynamic_smem());
  int64_t I, J;
  upper_tile(blockIdx.x, nb, I, J);
  typename TileFor<T, P>::type tile;
  acc_t s[16], t[16];
  kernel_tiles<T>(tile, sm, args, I * kTile, J * kTile, s, t);
  acc_t sum = 0;
#pragma unroll
  for (int q = 0; q < 16; ++q) sum += fkd::squared_difference<acc_t>(s[q], t[q]);
  const double total = block_sum(double(sum), sm.red);
  if (threadIdx.x == 0) partial[blockIdx.x] = fkd::tile_weight<double>(I, J) * total;
}

// loss = kd_weight * sum(partial) / B^2 + fr_weight * sum(sum_sq) / (B Ds), in a fixed order.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    fkd_loss_kernel(const double* __restrict__ partial, int64_t num_partial,
                    const acc_t* __restrict__ sum_sq, int64_t batch, int64_t width,
                    double kd_weight, double fr_weight, acc_t* __restrict__ loss) {
  __shared__ double red[kWarps];
  double distil = 0;
  for (int64_t i = threadIdx.x; i < num_partial; i += kThreads) distil += partial[i];
  distil = block_sum(distil, red);
  double featreg = 0;
  if (fr_weight != 0.0) {
    __syncthreads();  // red is reused
    for (int64_t i = threadIdx.x; i < batch; i += kThreads) featreg += double(sum_sq[i]);
    featreg = block_sum(featreg, red);
  }
  if (threadIdx.x == 0) {
    const double b = double(batch);
    double value = kd_weight * (distil / (b * b));
    if (fr_weight != 0.0) value += fr_weight * (featreg / (b * double(width)));
    *loss = acc_t(value);
  }
}

// out[i, col0 + c] += sum_k P[i - i0, k] * y_hat[j0 + k, c] for the row block at i0, with
// y_hat[j] = y[j] * inv_norm[j] (the normalised rows, formed while storing to shared memory)
// and k < k_len. The next K step is loaded into registers while the current one is multiplied.
template <typename T, Precision P, typename Tile>
__device__ void accumulate_product(Tile& tile, const Smem<T, P>& sm, const T* __restrict__ y,
                                   int64_t width, const typename Traits<T>::acc* inv_norm,
                                   int64_t batch, int64_t i0, int64_t j0, int k_len,
                                   typename Traits<T>::acc* out, int64_t ld_out, int64_t col0) {
  using acc_t = typename Traits<T>::acc;
  constexpr int BK = Layout<T, P>::BK, LDB = Layout<T, P>::LDB, LDP = Layout<T, P>::LDP;
  constexpr int kPerRow = kTile / RowChunk<T>::N;  // chunks per row of a 64-column slice
  constexpr bool kAligned = LDB * sizeof(T) % 16 == 0;
  const bool vectors = vector_rows(y, width);
  const int kk = threadIdx.x / kPerRow, n = threadIdx.x % kPerRow * RowChunk<T>::N;
  for (int64_t c0 = 0; c0 < width; c0 += kTile) {
    RowChunk<T> cb;
    int64_t j = j0 + kk;
    cb.load(y, batch, width, vectors, j, c0 + n);
    tile.zero();
    for (int kb = 0; kb < k_len; kb += BK) {
      cb.template store_scaled<kAligned>(sm.b + kk * LDB + n, j < batch ? inv_norm[j] : acc_t(0));
      __syncthreads();
      if (kb + BK < k_len) {
        j = j0 + kb + BK + kk;
        cb.load(y, batch, width, vectors, j, c0 + n);
      }
      tile.template mma<false>(sm.p + kb, LDP, sm.b, LDB, BK);
      __syncthreads();
    }
    acc_t v[16];
    tile.extract(v, sm.stage);
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t i = i0 + own_row(m);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t c = c0 + own_col(q);
        if (i < batch && c < width) out[i * ld_out + col0 + c] += v[4 * m + q];
      }
    }
  }
}

// Block (I, split): acc_student[split][I rows] += sum_J (rho_S - rho_T)[I, J] A_J over the split's
// J groups (and the teacher-side products when teachers_grad). Each block owns its rows of its
// split's accumulator: plain read-modify-write, no atomics, a fixed order. With `partial`, the
// block also writes the sum of squared differences of its tiles (every tile of the square is
// visited once, so weight 1) to partial[split * nb + I]: the loss from the same sweep.
template <typename T, Precision P>
__global__ void __launch_bounds__(kThreads, Traits<T>::kMinBlocks)
    fkd_backward_kernel(const __grid_constant__ FkdArgs args, int64_t nb, int splits,
                        typename Traits<T>::acc* __restrict__ acc_student,
                        typename Traits<T>::acc* __restrict__ acc_teachers, bool teachers_grad,
                        double* __restrict__ partial) {
  using acc_t = typename Traits<T>::acc;
  constexpr int JG = Layout<T, P>::JG, LDP = Layout<T, P>::LDP;
  const Smem<T, P> sm(dynamic_smem());
  const int64_t batch = args.batch, i0 = int64_t(blockIdx.x) * kTile;
  const int64_t split = blockIdx.y;
  const int64_t groups = (nb + JG - 1) / JG;
  const int64_t g_begin = groups * split / splits, g_end = groups * (split + 1) / splits;
  acc_t* out_s = acc_student + split * batch * args.student_width;
  acc_t* out_t = teachers_grad ? acc_teachers + split * batch * args.teacher_total_width : nullptr;
  typename TileFor<T, P>::type tile;
  double value = 0;

  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t j0 = g * JG * kTile;
    const int tiles = nb - g * JG < JG ? int(nb - g * JG) : JG;
    for (int jt = 0; jt < tiles; ++jt) {
      acc_t s[16], t[16];
      kernel_tiles<T>(tile, sm, args, i0, j0 + jt * kTile, s, t);
      acc_t tile_sum = 0;
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        sm.p[own_row(q / 4) * LDP + jt * kTile + own_col(q % 4)] = from_acc<T>(s[q] - t[q]);
        tile_sum += fkd::squared_difference<acc_t>(s[q], t[q]);
      }
      value += double(tile_sum);
    }
    // accumulate_product's first __syncthreads() publishes P.
    const int k_len = tiles * kTile;
    accumulate_product<T>(tile, sm, static_cast<const T*>(args.student), args.student_width,
                          static_cast<const acc_t*>(args.student_inv_norm), batch, i0, j0, k_len,
                          out_s, args.student_width, 0);
    if (teachers_grad) {
      for (int e = 0; e < args.num_teachers; ++e) {
        accumulate_product<T>(tile, sm, static_cast<const T*>(args.teacher[e]),
                              args.teacher_width[e],
                              static_cast<const acc_t*>(args.teacher_inv_norm) + e * batch, batch,
                              i0, j0, k_len, out_t, args.teacher_total_width,
                              args.teacher_col0[e]);
      }
    }
  }
  if (partial != nullptr) {
    const double total = block_sum(value, sm.red);
    if (threadIdx.x == 0) partial[split * nb + int64_t(blockIdx.x)] = total;
  }
}

// Chain rule through normalize() for one input, one warp per row:
//   g_i = scale * sum_split acc[split, i],  a_i = x_i r_i,
//   out_i = (g_i - (g_i . a_i) a_i) r_i  [+ fr_weight * grad * 2 x_i / (B D) for the student]
// scale = grad * kd_weight * 4 / B^2 for the student, minus that over E for a teacher; a null
// grad means 1.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    normalize_backward_kernel(const typename Traits<T>::acc* __restrict__ acc, int splits,
                              int64_t split_stride, int64_t ld_acc, const T* __restrict__ x,
                              int64_t batch, int64_t width,
                              const typename Traits<T>::acc* __restrict__ inv_norm,
                              const typename Traits<T>::acc* __restrict__ grad, double kd_weight,
                              double fr_weight, int teacher_count, T* __restrict__ out) {
  using acc_t = typename Traits<T>::acc;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= batch) return;  // whole warps leave together
  const acc_t g = grad != nullptr ? grad[0] : acc_t(1);
  const acc_t kd_scale = g * acc_t(kd_weight) * fkd::kernel_grad_scale<acc_t>(batch);
  const acc_t scale = teacher_count > 0 ? -kd_scale / acc_t(teacher_count) : kd_scale;
  const acc_t fr_scale = teacher_count > 0 ? acc_t(0) : g * acc_t(fr_weight);
  const acc_t r = inv_norm[row];
  const acc_t* acc_row = acc + row * ld_acc;
  const T* x_row = x + row * width;
  auto summed = [&](int64_t k) {
    acc_t v = acc_row[k];
    for (int s = 1; s < splits; ++s) v += acc_row[s * split_stride + k];
    return v;
  };
  acc_t dot = 0;
  for (int64_t k = lane; k < width; k += 32) dot += summed(k) * (to_acc(x_row[k]) * r);
  const acc_t g_dot_a = warp_sum(dot) * scale;
  for (int64_t k = lane; k < width; k += 32) {
    const acc_t xk = to_acc(x_row[k]);
    acc_t v = fkd::normalize_backward<acc_t>(scale * summed(k), xk * r, g_dot_a, r);
    if (fr_scale != acc_t(0)) v += fkd::featreg_backward<acc_t>(xk, fr_scale, batch, width);
    out[row * width + k] = from_acc<T>(v);
  }
}

// Inverse norms of the student (and its squares, for the regulariser) and of each teacher.
template <typename T>
void launch_row_norms(const FkdArgs& a, cudaStream_t stream) {
  using acc_t = typename Traits<T>::acc;
  const unsigned grid = unsigned((a.batch + kWarps - 1) / kWarps);
  FASTKD_LAUNCH(row_norms_kernel<T>, grid, kThreads, 0, stream,
                static_cast<const T*>(a.student), a.batch, a.student_width,
                static_cast<acc_t*>(a.student_inv_norm), static_cast<acc_t*>(a.student_sum_sq));
  for (int e = 0; e < a.num_teachers; ++e) {
    FASTKD_LAUNCH(row_norms_kernel<T>, grid, kThreads, 0, stream,
                  static_cast<const T*>(a.teacher[e]), a.batch, a.teacher_width[e],
                  static_cast<acc_t*>(a.teacher_inv_norm) + e * a.batch,
                  static_cast<acc_t*>(nullptr));
  }
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= size_t(kDefaultSmem)) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// The workspace of one pass: the row norms (all passes), the forward's tile slots, the
// backward's split accumulators and the forward-backward's per-block slots (accumulation type
// unless double).
struct WorkspaceLayout {
  void *student_inv_norm, *student_sum_sq, *teacher_inv_norm;
  double* partial;      // forward: num_upper_tiles(B); forward-backward: splits * row blocks
  void* acc_student;    // splits x B x Ds
  void* acc_teachers;   // splits x B x sum(Dt_e), when teachers_grad
  size_t bytes;
};

WorkspaceLayout layout_of(const FkdArgs& a, Pass pass, void* base) {
  const size_t as = acc_size_of(a.dtype), B = size_t(a.batch);
  const size_t splits = pass == Pass::kForward ? 0 : size_t(fkd_splits(a));
  Workspace ws(base);
  WorkspaceLayout l{};
  l.student_inv_norm = ws.take_bytes(B, as);
  l.student_sum_sq = ws.take_bytes(B, as);
  l.teacher_inv_norm = ws.take_bytes(size_t(a.num_teachers) * B, as);
  if (pass == Pass::kForward) l.partial = ws.take<double>(size_t(num_upper_tiles(a.batch)));
  if (pass == Pass::kForwardBackward)
    l.partial = ws.take<double>(splits * size_t(num_row_blocks(a.batch)));
  if (pass != Pass::kForward) {
    l.acc_student = ws.take_bytes(splits * B * size_t(a.student_width), as);
    if (a.teachers_grad)
      l.acc_teachers = ws.take_bytes(splits * B * size_t(a.teacher_total_width), as);
  }
  l.bytes = ws.bytes();
  return l;
}

// The kernels' copy of the arguments, with the row-norm pointers into the workspace.
FkdArgs with_norms(const FkdArgs& args, const WorkspaceLayout& l) {
  FkdArgs a = args;
  a.student_inv_norm = l.student_inv_norm;
  a.student_sum_sq = l.student_sum_sq;
  a.teacher_inv_norm = l.teacher_inv_norm;
  return a;
}

template <typename T, Precision P>
cudaError_t forward(const FkdArgs& args, cudaStream_t stream) {
  using acc_t = typename Traits<T>::acc;
  constexpr size_t smem = Layout<T, P>::kForwardBytes;
#define FASTKD_FKD_FORWARD_KERNEL fkd_forward_kernel<T, P>
  if (cudaError_t err = allow_smem(FASTKD_FKD_FORWARD_KERNEL, smem); err != cudaSuccess) {
    return err;
  }
  const WorkspaceLayout l = layout_of(args, Pass::kForward, args.workspace);
  const FkdArgs a = with_norms(args, l);
  launch_row_norms<T>(a, stream);
  const int64_t tiles = num_upper_tiles(a.batch);
  FASTKD_LAUNCH(FASTKD_FKD_FORWARD_KERNEL, unsigned(tiles), kThreads, smem, stream, a,
                num_row_blocks(a.batch), l.partial);
  FASTKD_LAUNCH(fkd_loss_kernel<acc_t>, 1, kThreads, 0, stream, l.partial, tiles,
                static_cast<const acc_t*>(a.student_sum_sq), a.batch, a.student_width,
                a.kd_weight, a.fr_weight, static_cast<acc_t*>(a.loss));
  return cudaSuccess;
}

// Gradients (scaled by *grad, or 1 when grad is null); for kForwardBackward also the loss of the
// same sweep.
template <typename T, Precision P>
cudaError_t backward(const FkdArgs& args, Pass pass, cudaStream_t stream) {
  using acc_t = typename Traits<T>::acc;
  constexpr size_t smem = Layout<T, P>::kBackwardBytes;
#define FASTKD_FKD_BACKWARD_KERNEL fkd_backward_kernel<T, P>
  if (cudaError_t err = allow_smem(FASTKD_FKD_BACKWARD_KERNEL, smem); err != cudaSuccess) {
    return err;
  }
  const WorkspaceLayout l = layout_of(args, pass, args.workspace);
  const FkdArgs a = with_norms(args, l);
  const int splits = fkd_splits(a);
  const int64_t B = a.batch, Ds = a.student_width, Dt = a.teacher_total_width;
  if (cudaError_t err = cudaMemsetAsync(l.acc_student, 0, sizeof(acc_t) * splits * B * Ds, stream);
      err != cudaSuccess) {
    return err;
  }
  if (a.teachers_grad) {
    if (cudaError_t err =
            cudaMemsetAsync(l.acc_teachers, 0, sizeof(acc_t) * splits * B * Dt, stream);
        err != cudaSuccess) {
      return err;
    }
  }
  launch_row_norms<T>(a, stream);
  const int64_t nb = num_row_blocks(B);
  const bool with_loss = pass == Pass::kForwardBackward;
  FASTKD_LAUNCH(FASTKD_FKD_BACKWARD_KERNEL, dim3(unsigned(nb), unsigned(splits)), kThreads, smem,
                stream, a, nb, splits, static_cast<acc_t*>(l.acc_student),
                static_cast<acc_t*>(l.acc_teachers), a.teachers_grad,
                with_loss ? l.partial : nullptr);
  if (with_loss) {
    FASTKD_LAUNCH(fkd_loss_kernel<acc_t>, 1, kThreads, 0, stream, l.partial, nb * splits,
                  static_cast<const acc_t*>(a.student_sum_sq), B, Ds, a.kd_weight, a.fr_weight,
                  static_cast<acc_t*>(a.loss));
  }
  const unsigned rows_grid = unsigned((B + kWarps - 1) / kWarps);
  const acc_t* g = with_loss ? nullptr : static_cast<const acc_t*>(a.grad);
  FASTKD_LAUNCH(normalize_backward_kernel<T>, rows_grid, kThreads, 0, stream,
                static_cast<const acc_t*>(l.acc_student), splits, B * Ds, Ds,
                static_cast<const T*>(a.student), B, Ds,
                static_cast<const acc_t*>(a.student_inv_norm), g, a.kd_weight, a.fr_weight, 0,
                static_cast<T*>(a.grad_student));
  if (a.teachers_grad) {
    for (int e = 0; e < a.num_teachers; ++e) {
      FASTKD_LAUNCH(normalize_backward_kernel<T>, rows_grid, kThreads, 0, stream,
                    static_cast<const acc_t*>(l.acc_teachers) + a.teacher_col0[e], splits,
                    B * Dt, Dt, static_cast<const T*>(a.teacher[e]), B, a.teacher_width[e],
                    static_cast<const acc_t*>(a.teacher_inv_norm) + e * B, g, a.kd_weight,
                    a.fr_weight, a.num_teachers, static_cast<T*>(a.grad_teacher[e]));
    }
  }
  return cudaSuccess;
}

// f(T(), std::integral_constant<Precision, P>()) for the operand type of args.dtype; P is
// args.precision for float32 and kIeee for the other types (their products are exact in the
// accumulator already, or float64).
template <typename F>
cudaError_t dispatch_precision(const FkdArgs& args, F&& f) {
  return dispatch(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    using Ieee = std::integral_constant<Precision, Precision::kIeee>;
    if constexpr (std::is_same_v<T, float>) {
      if (args.precision == Precision::kTf32) {
        return f(zero, std::integral_constant<Precision, Precision::kTf32>());
      }
      if (args.precision == Precision::kTf32x3) {
        return f(zero, std::integral_constant<Precision, Precision::kTf32x3>());
      }
    }
    return f(zero, Ieee());
  });
}

}  // namespace

int fkd_splits(const FkdArgs& args) {
  if (args.splits > 0) return args.splits < kMaxSplits ? args.splits : kMaxSplits;
  // The J splits of fastkd/launch_plan.h; the kernel does not slice its columns yet (limit 1).
  return plan::fkd_backward_grid(args.batch, args.student_width, int(size_of(args.dtype)),
                                 args.sm_count, /*col_limit=*/1)
      .j_splits;
}

size_t fkd_workspace_bytes(const FkdArgs& args, Pass pass) {
  return layout_of(args, pass, nullptr).bytes;
}

cudaError_t fkd_forward(const FkdArgs& args, cudaStream_t stream) {
  return launch_status(dispatch_precision(args, [&](auto zero, auto precision) {
    return forward<decltype(zero), decltype(precision)::value>(args, stream);
  }));
}

cudaError_t fkd_backward(const FkdArgs& args, cudaStream_t stream) {
  return launch_status(dispatch_precision(args, [&](auto zero, auto precision) {
    return backward<decltype(zero), decltype(precision)::value>(args, Pass::kBackward, stream);
  }));
}

cudaError_t fkd_forward_backward(const FkdArgs& args, cudaStream_t stream) {
  return launch_status(dispatch_precision(args, [&](auto zero, auto precision) {
    return backward<decltype(zero), decltype(precision)::value>(args, Pass::kForwardBackward,
                                                                stream);
  }));
}

}  // namespace cuda
}  // namespace fastkd
