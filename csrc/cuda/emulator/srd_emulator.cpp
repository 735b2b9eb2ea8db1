// Runs the CUDA SRD launchers of ../srd.cu on the CPU model in mock/ (see check_srd.py).
//
//   srd_emulator DIR DTYPE B D P EPS TRAINING TEACHER_GRAD ROWS_PER_SPLIT SM_COUNT
//
// DTYPE: 0 float16, 1 bfloat16, 2 float32, 3 float64 (the features type). Reads DIR/student.bin,
// DIR/teacher.bin (raw, features type), DIR/grad.bin (one value, accumulation type) and, in eval
// mode, DIR/stats_s.bin and DIR/stats_t.bin ((4, D), accumulation type, as srd_binding.cpp builds
// them from the running statistics). Runs forward_stats (training), forward_sums and backward as
// srd_binding.cpp does and writes DIR/loss.bin, total.bin, stats_s.bin / stats_t.bin (training),
// sums.bin, grad_student.bin and grad_teacher.bin (TEACHER_GRAD). The plan is make_plan's for
// SM_COUNT multiprocessors, or ROWS_PER_SPLIT rows per split when that is > 0. Every buffer is
// malloc'ed at its exact size (AddressSanitizer sees any overrun) and starts as NaN bytes, like
// uninitialised device memory.
#include "mock/mock_core.h"
// clang-format off
#include "../srd.cu"
// clang-format on

#include <string>

#include "mock/emulator_io.h"

using namespace fastkd::srd_cuda;

using emulator_io::garbage;
using emulator_io::read_file;
using emulator_io::write_file;

int main(int argc, char** argv) {
  if (argc != 11) mock::fail("usage: srd_emulator DIR DTYPE B D P EPS TRAINING TG ROWS SMS");
  const std::string dir = argv[1];
  const DType dtype = DType(std::atoi(argv[2]));
  const int64_t B = std::atoll(argv[3]), D = std::atoll(argv[4]);
  const double p = std::atof(argv[5]), eps = std::atof(argv[6]);
  const bool training = std::atoi(argv[7]) != 0, teacher_grad = std::atoi(argv[8]) != 0;
  const int64_t rows = std::atoll(argv[9]);
  mock::sm_count = std::atoi(argv[10]);
  const size_t es = dtype == DType::kDouble ? 8 : dtype == DType::kFloat ? 4 : 2;
  const size_t as = dtype == DType::kDouble ? 8 : 4;

  auto input = [&](const std::string& name, size_t bytes) {
    auto data = read_file(dir + "/" + name + ".bin", bytes);
    void* p = garbage(bytes);
    std::memcpy(p, data.data(), bytes);
    return p;
  };
  Plan plan = make_plan(B, D, 0);
  if (rows > 0) plan = {B, D, rows, (B + rows - 1) / rows};
  const void* student = input("student", B * D * es);
  const void* teacher = input("teacher", B * D * es);

  // Forward: statistics (training) or the caller's, then the column sums and the loss.
  void* workspace = garbage(workspace_elements(plan) * as);
  void* stats_s = training ? garbage(4 * D * as) : input("stats_s", 4 * D * as);
  void* stats_t = training ? garbage(4 * D * as) : input("stats_t", 4 * D * as);
  if (training) {
    if (forward_stats(dtype, student, teacher, plan, eps, workspace, stats_s, stats_t, nullptr) !=
        cudaSuccess)
      mock::fail("forward_stats");
    write_file(dir + "/stats_s.bin", stats_s, 4 * D * as);
    write_file(dir + "/stats_t.bin", stats_t, 4 * D * as);
  }
  void* sums = garbage(4 * D * as);
  void* total = garbage(as);
  void* loss = garbage(as);
  if (forward_sums(dtype, student, teacher, plan, p, stats_s, stats_t, workspace, sums, total,
                   loss, nullptr) != cudaSuccess)
    mock::fail("forward_sums");
  write_file(dir + "/loss.bin", loss, as);
  write_file(dir + "/total.bin", total, as);
  write_file(dir + "/sums.bin", sums, 4 * D * as);

  // Backward, from the forward's saved tensors.
  const void* grad = input("grad", as);
  void* grad_s = garbage(B * D * es);
  void* grad_t = teacher_grad ? garbage(B * D * es) : nullptr;
  if (backward(dtype, grad, total, student, teacher, plan, p, training, stats_s, stats_t, sums,
               grad_s, grad_t, nullptr) != cudaSuccess)
    mock::fail("backward");
  write_file(dir + "/grad_student.bin", grad_s, B * D * es);
  if (teacher_grad) write_file(dir + "/grad_teacher.bin", grad_t, B * D * es);
  std::printf("splits=%ld rows_per_split=%ld launches=%ld\n", long(plan.n_splits),
              long(plan.rows_per_split), mock::launches);
  return 0;
}
