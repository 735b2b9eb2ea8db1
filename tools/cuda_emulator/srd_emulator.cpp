// Runs the CUDA SRD launchers of csrc/cuda/srd.cu on the CPU model in mock/ (see srd.py).
//
//   srd_emulator DIR DTYPE B D P EPS TRAINING TEACHER_GRAD SPLITS SM_COUNT
//
// DTYPE: 0 float16, 1 bfloat16, 2 float32, 3 float64 (the features type). Reads DIR/student.bin,
// DIR/teacher.bin (raw, features type), DIR/grad.bin (one value, accumulation type) and, in eval
// mode, DIR/stats_s.bin and DIR/stats_t.bin ((4, D), accumulation type, as srd_binding.cpp builds
// them from the running statistics). Runs srd_forward and srd_backward as srd_binding.cpp does
// and writes DIR/loss.bin, total.bin, stats_s.bin / stats_t.bin (training), sums.bin,
// grad_student.bin and grad_teacher.bin (TEACHER_GRAD). The row splits are srd_splits' for
// SM_COUNT multiprocessors, or SPLITS when that is > 0. Every buffer is malloc'ed at its exact
// size (AddressSanitizer sees any overrun) and starts as NaN bytes, like uninitialised device
// memory. EMU_MISALIGN=1 shifts the features and the gradients one element off 16-byte alignment
// (the kernels must fall back to element loads). Prints the split count, the number of launches
// and whether the backward took the 16-byte path (vector=0/1).
#include "mock/mock_core.h"
// clang-format off
#include "srd.cu"
// clang-format on

#include <string>

#include "mock/emulator_io.h"

using namespace fastkd::cuda;  // NOLINT: a test driver

using emulator_io::garbage;
using emulator_io::read_file;
using emulator_io::write_file;

int main(int argc, char** argv) {
  if (argc != 11) mock::fail("usage: srd_emulator DIR DTYPE B D P EPS TRAINING TG SPLITS SMS");
  const std::string dir = argv[1];
  SrdArgs a;
  a.dtype = DType(std::atoi(argv[2]));
  const int64_t B = std::atoll(argv[3]), D = std::atoll(argv[4]);
  a.batch = B;
  a.width = D;
  a.p = std::atof(argv[5]);
  a.eps = std::atof(argv[6]);
  a.training = std::atoi(argv[7]) != 0;
  const bool teacher_grad = std::atoi(argv[8]) != 0;
  a.splits = std::atoi(argv[9]);
  a.sm_count = std::atoi(argv[10]);
  const size_t es = size_of(a.dtype), as = acc_size_of(a.dtype);

  const bool misalign = std::getenv("EMU_MISALIGN") != nullptr;
  // Features-dtype buffers: exact size, one element off alignment under EMU_MISALIGN.
  auto features = [&](size_t bytes) {
    unsigned char* p = static_cast<unsigned char*>(garbage(bytes + (misalign ? es : 0)));
    return static_cast<void*>(misalign ? p + es : p);
  };
  auto input = [&](const std::string& name, size_t bytes, bool feature = false) {
    auto data = read_file(dir + "/" + name + ".bin", bytes);
    void* p = feature ? features(bytes) : garbage(bytes);
    std::memcpy(p, data.data(), bytes);
    return p;
  };
  a.student = input("student", B * D * es, true);
  a.teacher = input("teacher", B * D * es, true);

  // Forward: statistics (training) or the caller's, then the column sums and the loss.
  a.stats_s = a.training ? garbage(4 * D * as) : input("stats_s", 4 * D * as);
  a.stats_t = a.training ? garbage(4 * D * as) : input("stats_t", 4 * D * as);
  a.sums = garbage(4 * D * as);
  a.total = garbage(as);
  a.loss = garbage(as);
  a.workspace = garbage(srd_workspace_bytes(a, Pass::kForward));
  if (srd_forward(a, nullptr) != cudaSuccess) mock::fail("srd_forward");
  if (a.training) {
    write_file(dir + "/stats_s.bin", a.stats_s, 4 * D * as);
    write_file(dir + "/stats_t.bin", a.stats_t, 4 * D * as);
  }
  write_file(dir + "/loss.bin", a.loss, as);
  write_file(dir + "/total.bin", a.total, as);
  write_file(dir + "/sums.bin", a.sums, 4 * D * as);

  // Backward, from the forward's outputs.
  SrdArgs b = a;
  b.grad = input("grad", as);
  b.grad_student = features(B * D * es);
  b.grad_teacher = teacher_grad ? features(B * D * es) : nullptr;
  b.workspace = garbage(srd_workspace_bytes(b, Pass::kBackward));
  if (srd_backward(b, nullptr) != cudaSuccess) mock::fail("srd_backward");
  write_file(dir + "/grad_student.bin", b.grad_student, B * D * es);
  if (teacher_grad) write_file(dir + "/grad_teacher.bin", b.grad_teacher, B * D * es);
  std::printf("splits=%ld launches=%ld vector=%d\n", long(srd_splits(a)), mock::launches,
              int(plan_of(b).vector));
  return 0;
}
