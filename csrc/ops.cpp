// The fastkd operator library: every schema is declared here, once. Backends register their
// kernels under the CPU / CUDA dispatch keys from csrc/cpu and csrc/cuda; fake (meta) kernels and
// autograd are registered from Python (fastkd/_ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastkd, m) {
  // FKD (SPEC §1). Returns the 0-dim loss in the accumulation dtype (float64 if any input is
  // float64, else float32).
  m.def("fkd_forward(Tensor student, Tensor[] teachers, float kd_weight, float fr_weight) -> Tensor");
  // Gradient of fkd_forward scaled by `grad`; grad_teachers is empty unless teachers_grad.
  m.def(
      "fkd_backward(Tensor grad, Tensor student, Tensor[] teachers, float kd_weight, "
      "float fr_weight, bool teachers_grad) -> (Tensor grad_student, Tensor[] grad_teachers)");
  // Loss and its gradients (for grad = 1) in one pass; optional per backend.
  m.def(
      "fkd_forward_backward(Tensor student, Tensor[] teachers, float kd_weight, float fr_weight, "
      "bool teachers_grad) -> (Tensor loss, Tensor grad_student, Tensor[] grad_teachers)");
}

// `import fastkd._C` loads this shared object, which runs the registrations above; the Python
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
