// Launch planner of the FKD backward sweep (csrc/cuda/fkd.cu): a pure function of the batch,
// the output width, the element size and the device's SM count, so that it is unit-tested on
// the CPU (tests/cpp/test_launch_plan.cpp) and the workspace size and the launch always agree.
// Host code only: no CUDA or torch headers.
//
// The backward runs one block per (row block I, split of the J range, column slice):
//   row_blocks = ceil(B / 64)                      (64-row kernel tiles)
//   j_splits   <= ceil(row_blocks / group tiles)   (the kernel forms P for 1, 2 or 4 J tiles at a
//                 time: float64, float32, 16-bit), and <= kMaxJSplits; each split owns a B x D
//                 accumulator, summed in a fixed order, so no atomics and no extra FLOPs
//   col_slices <= ceil(width / 64)                 (64 output columns per slice; every slice
//                 recomputes its P tiles, so slices cost Gram FLOPs and come after J splits)
// The plan aims at kBlocksPerSm blocks per SM: J splits first, then column slices, each the
// smallest count that reaches the target, and never more than the work holds. When even every
// split and slice falls short of the target (small B and narrow outputs: the whole backward is
// then fewer than 2 x SMs 64 x 64 tiles), it takes all of them.
#pragma once

#include <cstdint>

namespace fastkd {
namespace plan {

constexpr int kRowTile = 64;     // rows of a kernel tile (launch.h kTile)
constexpr int kColChunk = 64;    // output columns per slice
constexpr int kMaxJSplits = 8;   // launch.h kMaxSplits: accumulator memory grows with the splits
constexpr int kBlocksPerSm = 2;  // the tile kernels keep 2 blocks of 256 threads resident per SM

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// J tiles whose difference P the backward keeps in shared memory at once, by element size
// (fkd_cuda.h group_tiles): 1 for float64, 2 for float32, 4 for float16 / bfloat16.
constexpr int group_tiles(int dtype_size) {
  return dtype_size >= 8 ? 1 : (dtype_size == 4 ? 2 : 4);
}

struct BackwardGrid {
  int64_t row_blocks = 1;
  int j_splits = 1;
  int col_slices = 1;
  constexpr int64_t blocks() const { return row_blocks * j_splits * col_slices; }
};

// Most J splits and column slices the work of (batch, width, dtype_size) holds.
constexpr int64_t max_j_splits(int64_t batch, int dtype_size) {
  const int64_t groups = ceil_div(ceil_div(batch, kRowTile), group_tiles(dtype_size));
  return groups < kMaxJSplits ? groups : kMaxJSplits;
}
constexpr int64_t max_col_slices(int64_t width) { return ceil_div(width, kColChunk); }

// The grid of the FKD backward for B = batch rows, `width` output columns (the widest output the
// blocks write: the student's, or a teacher's with teachers' gradients), elements of dtype_size
// bytes, on sm_count SMs. col_limit caps the column slices (1 for a kernel that does not slice
// its columns). batch, width >= 1.
constexpr BackwardGrid fkd_backward_grid(int64_t batch, int64_t width, int dtype_size,
                                         int sm_count, int64_t col_limit = INT32_MAX) {
  BackwardGrid g;
  g.row_blocks = ceil_div(batch, kRowTile);
  const int64_t target = int64_t(kBlocksPerSm) * (sm_count > 1 ? sm_count : 1);
  const int64_t j = clamp64(ceil_div(target, g.row_blocks), 1, max_j_splits(batch, dtype_size));
  g.j_splits = int(j);
  const int64_t c_max = clamp64(max_col_slices(width), 1, col_limit < 1 ? 1 : col_limit);
  g.col_slices = int(clamp64(ceil_div(target, g.row_blocks * j), 1, c_max));
  return g;
}

}  // namespace plan
}  // namespace fastkd
