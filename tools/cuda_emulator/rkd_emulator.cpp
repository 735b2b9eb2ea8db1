// Runs the CUDA RKD launchers of csrc/cuda/rkd.cu on the CPU model in mock/ (see rkd.py).
//
//   rkd_emulator DIR OP_DTYPE GRAD_S_DTYPE GRAD_T_DTYPE B DS DT TEACHER_GRAD SPLITS SM_COUNT
//
// Dtypes: 0 float16, 1 bfloat16, 2 float32, 3 float64; OP_DTYPE is the operand dtype (2 or 3),
// the others the gradients' dtypes. Reads DIR/student.bin, DIR/teacher.bin (raw, operand dtype:
// the inputs as rkd_binding.cpp converts them) and DIR/grad.bin (one value, operand dtype). Runs
// what the three ops run: rkd_forward (loss.bin), rkd_backward with that upstream gradient
// (grad_student.bin, grad_teacher.bin with TEACHER_GRAD) and rkd_forward_backward (g = 1:
// loss_fb.bin, grad_student_fb.bin, grad_teacher_fb.bin). The ranges of sweep 3 are rkd_splits'
// for SM_COUNT multiprocessors, or SPLITS when that is > 0. Every buffer is malloc'ed at its
// exact size (AddressSanitizer sees any overrun) and starts as NaN bytes, like uninitialised
// device memory; each call gets a fresh workspace. Prints the split count and the launches.
#include "mock/mock_core.h"
// clang-format off
#include "rkd.cu"
// clang-format on

#include <string>

#include "mock/emulator_io.h"

using namespace fastkd::cuda;  // NOLINT: a test driver

using emulator_io::garbage;
using emulator_io::read_file;
using emulator_io::write_file;

int main(int argc, char** argv) {
  if (argc != 11) mock::fail("usage: rkd_emulator DIR OP GS GT B DS DT TG SPLITS SMS");
  const std::string dir = argv[1];
  RkdArgs a;
  a.dtype = DType(std::atoi(argv[2]));
  a.grad_student_dtype = DType(std::atoi(argv[3]));
  a.grad_teacher_dtype = DType(std::atoi(argv[4]));
  const int64_t B = std::atoll(argv[5]), Ds = std::atoll(argv[6]), Dt = std::atoll(argv[7]);
  a.batch = B;
  a.student_width = Ds;
  a.teacher_width = Dt;
  const bool teacher_grad = std::atoi(argv[8]) != 0;
  a.splits = std::atoi(argv[9]);
  a.sm_count = std::atoi(argv[10]);
  const size_t es = size_of(a.dtype);

  auto input = [&](const std::string& name, size_t bytes) {
    auto data = read_file(dir + "/" + name + ".bin", bytes);
    void* p = garbage(bytes);
    std::memcpy(p, data.data(), bytes);
    return p;
  };
  a.student = input("student", B * Ds * es);
  a.teacher = input("teacher", B * Dt * es);
  const void* grad = input("grad", es);

  for (const Pass pass : {Pass::kForward, Pass::kBackward, Pass::kForwardBackward}) {
    const bool grads = pass != Pass::kForward;
    const std::string suffix = pass == Pass::kForwardBackward ? "_fb" : "";
    RkdArgs c = a;
    // rkd_binding.cpp asks for no loss in the backward op.
    c.loss = pass == Pass::kBackward ? nullptr : garbage(es);
    c.grad = pass == Pass::kBackward ? grad : nullptr;
    if (grads) {
      c.grad_student = garbage(B * Ds * size_of(c.grad_student_dtype));
      if (teacher_grad) c.grad_teacher = garbage(B * Dt * size_of(c.grad_teacher_dtype));
    }
    c.workspace = garbage(rkd_workspace_bytes(c, pass));
    const cudaError_t err = pass == Pass::kForward    ? rkd_forward(c, nullptr)
                            : pass == Pass::kBackward ? rkd_backward(c, nullptr)
                                                      : rkd_forward_backward(c, nullptr);
    if (err != cudaSuccess) mock::fail("rkd launcher");
    if (c.loss != nullptr) write_file(dir + "/loss" + suffix + ".bin", c.loss, es);
    if (grads) {
      write_file(dir + "/grad_student" + suffix + ".bin", c.grad_student,
                 B * Ds * size_of(c.grad_student_dtype));
      if (teacher_grad)
        write_file(dir + "/grad_teacher" + suffix + ".bin", c.grad_teacher,
                   B * Dt * size_of(c.grad_teacher_dtype));
    }
    std::free(c.loss);
    std::free(c.grad_student);
    std::free(c.grad_teacher);
    std::free(c.workspace);
  }
  std::printf("splits=%ld launches=%ld\n", long(rkd_splits(a)), mock::launches);
  return 0;
}
