// Tiles and work split of the CPU kernels' upper-triangle sweeps (FKD, RKD): each task owns whole
// row blocks, so per-row results need no synchronisation.
#pragma once

#include <cstdint>
#include <vector>

namespace fastkd {

// Tiles of the sweeps: kSweepTile rows per block, and kSweepPanel columns per panel (GEMMs big
// enough for BLAS to run at speed, scratch two kSweepTile x kSweepPanel panels per task).
constexpr int64_t kSweepTile = 256;
constexpr int64_t kSweepPanel = 2048;

// The row blocks a task owns, in "snake" order (k, 2T-1-k, 2T+k, ...): block I costs
// ~(blocks - I) tiles, so alternating ends balances the triangle across the T tasks.
inline std::vector<int64_t> row_blocks_of_task(int64_t task, int64_t tasks, int64_t blocks) {
  std::vector<int64_t> owned;
  for (int64_t round = 0; round * tasks < blocks; ++round) {
    const int64_t I = round % 2 == 0 ? round * tasks + task : (round + 1) * tasks - 1 - task;
    if (I < blocks) owned.push_back(I);
  }
  return owned;
}

}  // namespace fastkd
