// The fastkd operator library: every schema is declared here, once. Backends register their
// kernels under the CPU / CUDA dispatch keys from csrc/cpu and csrc/cuda; fake (meta) kernels and
// autograd are registered from Python (fastkd/_ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastkd, m) {
  // FKD (SPEC §1). Returns the 0-dim loss in the accumulation dtype (float64 if any input is
  // float64, else float32). `precision` (FKD and RKD, SPEC §6): the products of float32 inputs,
  // "ieee" | "tf32x3" | "tf32"; the CUDA kernels honour it, the CPU kernels accept it and always
  // compute full fp32; 16-bit and float64 inputs ignore it.
  m.def("fkd_forward(Tensor student, Tensor[] teachers, float kd_weight, float fr_weight, "
        "str precision=\"ieee\") -> Tensor");
  // Gradient of fkd_forward scaled by `grad`; grad_teachers is empty unless teachers_grad.
  m.def(
      "fkd_backward(Tensor grad, Tensor student, Tensor[] teachers, float kd_weight, "
      "float fr_weight, bool teachers_grad, str precision=\"ieee\") -> (Tensor grad_student, "
      "Tensor[] grad_teachers)");
  // Loss and its gradients (for grad = 1) in one pass; optional per backend.
  m.def(
      "fkd_forward_backward(Tensor student, Tensor[] teachers, float kd_weight, float fr_weight, "
      "bool teachers_grad, str precision=\"ieee\") -> (Tensor loss, Tensor grad_student, "
      "Tensor[] grad_teachers)");

  // SRD (SPEC §3). student and teacher: (B, D), same dtype. Returns the 0-dim loss and S in the
  // accumulation dtype, each side's (4, D) statistics [mean, biased var, mean - z[0], rstd]
  // (batch statistics in training, the running buffers otherwise; the buffers are read, never
  // written) and the (4, D) column sums [|d|^p, h, h*s, h*t] the backward pass needs.
  m.def(
      "srd_forward(Tensor student, Tensor teacher, float p, float eps, bool training, "
      "Tensor? running_mean_s, Tensor? running_var_s, Tensor? running_mean_t, "
      "Tensor? running_var_t) -> (Tensor loss, Tensor total, Tensor stats_s, Tensor stats_t, "
      "Tensor sums)");
  // Gradient of srd_forward's loss scaled by `grad`; grad_teacher is empty unless teacher_grad.
  m.def(
      "srd_backward(Tensor grad, Tensor student, Tensor teacher, float p, bool training, "
      "Tensor total, Tensor stats_s, Tensor stats_t, Tensor sums, bool teacher_grad) -> "
      "(Tensor grad_student, Tensor grad_teacher)");

  // RKD distance (SPEC §2). student (B, Ds), teacher (B, Dt), B >= 2. Returns the 0-dim loss in
  // the accumulation dtype.
  m.def("rkd_forward(Tensor student, Tensor teacher, str precision=\"ieee\") -> Tensor");
  // Gradient of rkd_forward scaled by `grad`; grad_teacher is empty unless teacher_grad.
  m.def(
      "rkd_backward(Tensor grad, Tensor student, Tensor teacher, bool teacher_grad, "
      "str precision=\"ieee\") -> "
      "(Tensor grad_student, Tensor grad_teacher)");
  // Loss and its gradients (for grad = 1) from one set of sweeps.
  m.def(
      "rkd_forward_backward(Tensor student, Tensor teacher, bool teacher_grad, "
      "str precision=\"ieee\") -> "
      "(Tensor loss, Tensor grad_student, Tensor grad_teacher)");
}

// `import fastkd._C` loads this shared object, which runs the registrations above; the Python
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
