// Unit test of csrc/include/fastkd/launch_plan.h (no GPU): checks the planner's properties over
// B x widths x element sizes x SM counts, prints one line per shape for tests/test_launch_plan.py
//   sms dtype_size B width row_blocks j_splits col_slices
// and exits non-zero with a message on the first violated property.
#include <cstdio>
#include <cstdlib>

#include "fastkd/launch_plan.h"

using fastkd::plan::BackwardGrid;
using fastkd::plan::fkd_backward_grid;

namespace {

int failures = 0;

void expect(bool ok, const char* what, int sms, int size, long b, long w) {
  if (ok) return;
  ++failures;
  std::fprintf(stderr, "FAIL %s: sms=%d dtype_size=%d B=%ld width=%ld\n", what, sms, size, b, w);
}

}  // namespace

// Compile-time use (the launcher and the workspace size call it the same way).
static_assert(fkd_backward_grid(16384, 512, 2, 132).blocks() == 256 * 2 * 1);
static_assert(fkd_backward_grid(256, 512, 2, 132).j_splits == 1);

int main() {
  const long batches[] = {1, 63, 64, 65, 256, 512, 1024, 4096, 16384};
  const long widths[] = {1, 64, 100, 128, 512, 2048, 4096};
  const int sizes[] = {2, 4, 8};
  const int sm_counts[] = {132, 108};
  for (int sms : sm_counts)
    for (int size : sizes)
      for (long b : batches)
        for (long w : widths) {
          const BackwardGrid g = fkd_backward_grid(b, w, size, sms);
          const long target = 2L * sms;
          const long nb = (b + 63) / 64;
          const long groups = (nb + fastkd::plan::group_tiles(size) - 1) /
                              fastkd::plan::group_tiles(size);
          const long max_j = groups < 8 ? groups : 8;
          const long max_c = (w + 63) / 64;
          expect(g.row_blocks == nb, "row blocks", sms, size, b, w);
          expect(g.j_splits >= 1 && g.j_splits <= max_j, "j splits within the work", sms, size, b,
                 w);
          expect(g.col_slices >= 1 && g.col_slices <= max_c, "column slices within the work", sms,
                 size, b, w);
          if (nb * max_j * max_c >= target) {
            expect(g.blocks() >= target, ">= 2 blocks per SM", sms, size, b, w);
          } else {
            expect(g.blocks() == nb * max_j * max_c, "all the work when it is short", sms, size,
                   b, w);
          }
          // Minimal: one split or slice fewer would miss the target.
          if (g.col_slices > 1)
            expect(nb * g.j_splits * (g.col_slices - 1) < target, "minimal column slices", sms,
                   size, b, w);
          if (g.col_slices == 1 && g.j_splits > 1)
            expect(nb * (g.j_splits - 1) < target, "minimal j splits", sms, size, b, w);
          // Column slices only once the J splits are exhausted.
          if (g.col_slices > 1) expect(g.j_splits == max_j, "j splits first", sms, size, b, w);
          // The limit the current kernel passes (no column slicing).
          const BackwardGrid one = fkd_backward_grid(b, w, size, sms, 1);
          expect(one.col_slices == 1 && one.j_splits == g.j_splits, "col_limit 1", sms, size, b,
                 w);
          std::printf("%d %d %ld %ld %ld %d %d\n", sms, size, b, w, long(g.row_blocks),
                      g.j_splits, g.col_slices);
        }
  return failures == 0 ? 0 : 1;
}
