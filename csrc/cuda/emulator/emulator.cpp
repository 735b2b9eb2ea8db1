// Runs the CUDA FKD launchers of ../fkd.cu on the CPU model in mock/ (see check.py).
//
//   emulator DIR DTYPE B Ds E Dt_1 .. Dt_E TEACHERS_GRAD KD FR SM_COUNT
//
// DTYPE: 0 float16, 1 bfloat16, 2 float32, 3 float64 (the operand type). Reads DIR/student.bin,
// DIR/teacher<e>.bin (raw, operand type) and DIR/grad.bin (one value, accumulation type). Runs
// fkd_forward, fkd_backward (scaled by grad) and fkd_forward_backward and writes DIR/loss.bin,
// DIR/grad_student.bin, DIR/grad_teacher<e>.bin, and the same with suffix _fb for the fused op.
// Every buffer is malloc'ed at its exact size (AddressSanitizer sees any overrun) and starts as
// NaN bytes, like uninitialised device memory. EMU_MISALIGN=1 shifts the inputs one element off
// 16-byte alignment (no vector loads).
#include "mock/mock_core.h"
// clang-format off
#include "../fkd.cu"
// clang-format on

#include <string>

#include "mock/emulator_io.h"

using namespace fastkd::cuda;

using emulator_io::garbage;
using emulator_io::read_file;
using emulator_io::write_file;

int main(int argc, char** argv) {
  if (argc < 7) mock::fail("usage: emulator DIR DTYPE B Ds E Dt_1..Dt_E TG KD FR SMS");
  int i = 1;
  const std::string dir = argv[i++];
  const DType dtype = DType(std::atoi(argv[i++]));
  const int64_t B = std::atoll(argv[i++]), Ds = std::atoll(argv[i++]);
  const int E = std::atoi(argv[i++]);
  if (argc != 6 + E + 4) mock::fail("wrong number of arguments");
  std::vector<int64_t> widths(E);
  for (auto& w : widths) w = std::atoll(argv[i++]);
  const bool teachers_grad = std::atoi(argv[i++]) != 0;
  const double kd = std::atof(argv[i++]), fr = std::atof(argv[i++]);
  const int sms = std::atoi(argv[i++]);
  const size_t es = dtype == DType::kDouble ? 8 : dtype == DType::kFloat ? 4 : 2;
  const size_t as = dtype == DType::kDouble ? 8 : 4;
  const bool misalign = std::getenv("EMU_MISALIGN") != nullptr;

  auto input = [&](const std::string& name, size_t bytes, bool may_misalign = true) {
    auto data = read_file(dir + "/" + name + ".bin", bytes);
    unsigned char* p = static_cast<unsigned char*>(garbage(bytes + 16));
    if (misalign && may_misalign) p += es;
    std::memcpy(p, data.data(), bytes);
    return static_cast<const void*>(p);
  };
  FkdArgs a{};
  a.dtype = dtype;
  a.batch = B;
  a.student = input("student", B * Ds * es);
  a.student_width = Ds;
  a.num_teachers = E;
  int64_t col0 = 0;
  for (int e = 0; e < E; ++e) {
    a.teacher[e] = input("teacher" + std::to_string(e), B * widths[e] * es);
    a.teacher_width[e] = widths[e];
    a.teacher_col0[e] = col0;
    col0 += widths[e];
  }
  a.teacher_total_width = col0;
  auto fresh_norms = [&] {
    a.student_inv_norm = garbage(B * as);
    a.student_sum_sq = garbage(B * as);
    a.teacher_inv_norm = garbage(E * B * as);
  };

  // Forward.
  fresh_norms();
  void* loss = garbage(as);
  auto* tiles = static_cast<double*>(garbage(num_upper_tiles(B) * sizeof(double)));
  if (fkd_forward(a, kd, fr, tiles, loss, nullptr) != cudaSuccess) mock::fail("fkd_forward");
  write_file(dir + "/loss.bin", loss, as);

  // Backward and forward-backward, each on fresh buffers.
  const void* grad = input("grad", as, false);
  const int splits = backward_splits(B, dtype, sms);
  for (const std::string suffix : {"", "_fb"}) {
    fresh_norms();
    void* acc_s = garbage(splits * B * Ds * as);
    void* acc_t = teachers_grad ? garbage(splits * B * col0 * as) : nullptr;
    void* grad_s = garbage(B * Ds * es);
    std::vector<void*> grad_t;
    for (int e = 0; e < E && teachers_grad; ++e) grad_t.push_back(garbage(B * widths[e] * es));
    if (suffix.empty()) {
      if (fkd_backward(a, kd, fr, grad, splits, acc_s, acc_t, teachers_grad, grad_s,
                       grad_t.data(), nullptr) != cudaSuccess)
        mock::fail("fkd_backward");
    } else {
      auto* blocks = static_cast<double*>(garbage(splits * num_row_blocks(B) * sizeof(double)));
      void* loss_fb = garbage(as);
      if (fkd_forward_backward(a, kd, fr, splits, blocks, loss_fb, acc_s, acc_t, teachers_grad,
                               grad_s, grad_t.data(), nullptr) != cudaSuccess)
        mock::fail("fkd_forward_backward");
      write_file(dir + "/loss_fb.bin", loss_fb, as);
    }
    write_file(dir + "/grad_student" + suffix + ".bin", grad_s, B * Ds * es);
    for (int e = 0; e < int(grad_t.size()); ++e)
      write_file(dir + "/grad_teacher" + std::to_string(e) + suffix + ".bin", grad_t[e],
                 B * widths[e] * es);
  }
  std::printf("splits=%d launches=%ld\n", splits, mock::launches);
  return 0;
}
