// Runs the CUDA FKD launchers of csrc/cuda/fkd.cu on the CPU model in mock/ (see fkd.py).
//
//   fkd_emulator DIR DTYPE B Ds E Dt_1 .. Dt_E TEACHERS_GRAD KD FR SM_COUNT PRECISION
//
// DTYPE: 0 float16, 1 bfloat16, 2 float32, 3 float64 (the operand type). PRECISION: 0 ieee,
// 1 tf32, 2 tf32x3 (FkdArgs::precision; float32 operands only). Reads DIR/student.bin,
// DIR/teacher<e>.bin (raw, operand type) and DIR/grad.bin (one value, accumulation type). Runs
// fkd_forward, fkd_backward (scaled by grad) and fkd_forward_backward as fkd_binding.cpp calls
// them and writes DIR/loss.bin, DIR/grad_student.bin, DIR/grad_teacher<e>.bin, and the same with
// suffix _fb for the fused op. Every buffer (each call's workspace too) is malloc'ed at its exact
// size (AddressSanitizer sees any overrun) and starts as NaN bytes, like uninitialised device
// memory. EMU_MISALIGN=1 shifts the inputs one element off 16-byte alignment (no vector loads).
// Prints the split count and the number of launches.
#include "mock/mock_core.h"
// clang-format off
#include "fkd.cu"
// clang-format on

#include <string>

#include "mock/emulator_io.h"

using namespace fastkd::cuda;  // NOLINT: a test driver

using emulator_io::garbage;
using emulator_io::read_file;
using emulator_io::write_file;

int main(int argc, char** argv) {
  if (argc < 7) mock::fail("usage: fkd_emulator DIR DTYPE B Ds E Dt_1..Dt_E TG KD FR SMS PREC");
  int i = 1;
  const std::string dir = argv[i++];
  const DType dtype = DType(std::atoi(argv[i++]));
  const int64_t B = std::atoll(argv[i++]), Ds = std::atoll(argv[i++]);
  const int E = std::atoi(argv[i++]);
  if (argc != 6 + E + 5) mock::fail("wrong number of arguments");
  std::vector<int64_t> widths(E);
  for (auto& w : widths) w = std::atoll(argv[i++]);
  const bool teachers_grad = std::atoi(argv[i++]) != 0;
  const double kd = std::atof(argv[i++]), fr = std::atof(argv[i++]);
  const int sms = std::atoi(argv[i++]);
  const int precision = std::atoi(argv[i++]);
  if (precision < 0 || precision > 2) mock::fail("PRECISION must be 0, 1 or 2");
  const size_t es = size_of(dtype), as = acc_size_of(dtype);
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
  a.precision = Precision(precision);
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
  a.kd_weight = kd;
  a.fr_weight = fr;
  a.teachers_grad = teachers_grad;
  a.sm_count = sms;

  // Forward.
  FkdArgs f = a;
  f.loss = garbage(as);
  f.workspace = garbage(fkd_workspace_bytes(f, Pass::kForward));
  if (fkd_forward(f, nullptr) != cudaSuccess) mock::fail("fkd_forward");
  write_file(dir + "/loss.bin", f.loss, as);

  // Backward and forward-backward, each on fresh buffers.
  const void* grad = input("grad", as, false);
  for (const std::string suffix : {"", "_fb"}) {
    const Pass pass = suffix.empty() ? Pass::kBackward : Pass::kForwardBackward;
    FkdArgs b = a;
    b.grad = suffix.empty() ? grad : nullptr;
    b.loss = suffix.empty() ? nullptr : garbage(as);
    b.grad_student = garbage(B * Ds * es);
    for (int e = 0; e < E && teachers_grad; ++e) b.grad_teacher[e] = garbage(B * widths[e] * es);
    b.workspace = garbage(fkd_workspace_bytes(b, pass));
    const cudaError_t err = suffix.empty() ? fkd_backward(b, nullptr) : fkd_forward_backward(b, nullptr);
    if (err != cudaSuccess) mock::fail(suffix.empty() ? "fkd_backward" : "fkd_forward_backward");
    if (!suffix.empty()) write_file(dir + "/loss_fb.bin", b.loss, as);
    write_file(dir + "/grad_student" + suffix + ".bin", b.grad_student, B * Ds * es);
    for (int e = 0; e < E && teachers_grad; ++e)
      write_file(dir + "/grad_teacher" + std::to_string(e) + suffix + ".bin", b.grad_teacher[e],
                 B * widths[e] * es);
  }
  std::printf("splits=%d launches=%ld\n", fkd_splits(a), mock::launches);
  return 0;
}
