// Runs the CUDA RKD launchers of ../rkd.cu on the CPU model in mock/ (see check_rkd.py).
//
//   rkd_emulator DIR OP_DOUBLE OUT_S OUT_T B DS DT TEACHER_GRAD SPLITS SM_COUNT
//
// OP_DOUBLE: 1 when the operand dtype is float64 (else float32). OUT_S / OUT_T: the gradients'
// dtypes, 0 float16, 1 bfloat16, 2 float32, 3 float64. Reads DIR/student.bin, DIR/teacher.bin
// (raw, operand dtype: the inputs as rkd_binding.cpp converts them) and DIR/grad.bin (one value,
// operand dtype). Runs what the three ops run: forward (loss.bin), backward with that upstream
// gradient (grad_student.bin, grad_teacher.bin with TEACHER_GRAD) and forward_backward (g = 1:
// loss_fb.bin, grad_student_fb.bin, grad_teacher_fb.bin). The plan is make_plan's for SM_COUNT
// multiprocessors, or SPLITS splits when that is > 0. Every buffer is malloc'ed at its exact size
// (AddressSanitizer sees any overrun) and starts as NaN bytes, like uninitialised device memory;
// each call gets a fresh workspace.
#include "mock/mock_core.h"
// clang-format off
#include "../rkd.cu"
// clang-format on

#include <string>

#include "mock/emulator_io.h"

using namespace fastkd::rkd_cuda;

using emulator_io::garbage;
using emulator_io::read_file;
using emulator_io::write_file;

namespace {
size_t size_of(DType d) {
  return d == DType::kDouble ? 8 : d == DType::kFloat ? 4 : 2;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 11) mock::fail("usage: rkd_emulator DIR OP_DOUBLE OUT_S OUT_T B DS DT TG SPLITS SMS");
  const std::string dir = argv[1];
  const bool is_double = std::atoi(argv[2]) != 0;
  const DType out_s = DType(std::atoi(argv[3])), out_t = DType(std::atoi(argv[4]));
  const int64_t B = std::atoll(argv[5]), Ds = std::atoll(argv[6]), Dt = std::atoll(argv[7]);
  const bool teacher_grad = std::atoi(argv[8]) != 0;
  const int64_t splits = std::atoll(argv[9]);
  mock::sm_count = std::atoi(argv[10]);
  const size_t es = is_double ? 8 : 4;

  auto input = [&](const std::string& name, size_t bytes) {
    auto data = read_file(dir + "/" + name + ".bin", bytes);
    void* p = garbage(bytes);
    std::memcpy(p, data.data(), bytes);
    return p;
  };
  const Plan plan = make_plan(B, Ds, Dt, 0, splits);
  const void* student = input("student", B * Ds * es);
  const void* teacher = input("teacher", B * Dt * es);
  const void* grad = input("grad", es);

  // mode 0: forward, 1: backward (upstream grad), 2: forward_backward (g = 1).
  const char* suffix[3] = {"", "", "_fb"};
  for (int mode = 0; mode < 3; ++mode) {
    const bool grads = mode > 0;
    Args a;
    a.is_double = is_double;
    a.student = student;
    a.teacher = teacher;
    a.loss = garbage(es);
    a.grad = mode == 1 ? grad : nullptr;
    a.out_s = out_s;
    a.out_t = out_t;
    if (grads) {
      a.grad_student = garbage(B * Ds * size_of(out_s));
      if (teacher_grad) a.grad_teacher = garbage(B * Dt * size_of(out_t));
    }
    a.workspace = garbage(workspace_bytes(plan, is_double, grads, grads && teacher_grad));
    if (run(a, plan, nullptr) != cudaSuccess) mock::fail("run");
    if (mode != 1) write_file(dir + "/loss" + suffix[mode] + ".bin", a.loss, es);
    if (grads) {
      write_file(dir + "/grad_student" + suffix[mode] + ".bin", a.grad_student,
                 B * Ds * size_of(out_s));
      if (teacher_grad)
        write_file(dir + "/grad_teacher" + suffix[mode] + ".bin", a.grad_teacher,
                   B * Dt * size_of(out_t));
    }
    std::free(a.loss);
    std::free(a.grad_student);
    std::free(a.grad_teacher);
    std::free(a.workspace);
  }
  std::printf("splits=%ld j_per_split=%ld launches=%ld\n", long(plan.n_splits),
              long(plan.j_per_split), mock::launches);
  return 0;
}
