// FKD (SPEC §1) on the CPU: tiled kernel-space algorithm, O(B*D) extra memory.
//
// The B x B kernels are never formed: a row block's tiles of rho_S and rho_T are computed
// into two fixed-size scratch panels by BLAS GEMMs, consumed, and dropped. Only the upper
// triangle is visited (both kernels are symmetric), for the value and for the gradient alike.
// Three ops share one sweep: the forward (value), the backward (gradients) and the
// forward-backward (both, one pass: what a training step needs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fastkd/fkd_math.h"
#include "fastkd/host.h"
#include "sweep.h"

namespace fastkd {
namespace {

// Row-normalised copy of `x` in the accumulation dtype, scaled by `scale`, written into
// out[:, col0:col0+D]; the inverse row norms go to inv_norm (B).
template <typename acc_t>
void normalize_rows_into(const at::Tensor& x, acc_t scale, at::Tensor& out, int64_t col0,
                         at::Tensor& inv_norm) {
  const at::Tensor xa = x.to(out.scalar_type()).contiguous();
  const int64_t B = xa.size(0), D = xa.size(1), ld = out.size(1);
  const acc_t* src = xa.data_ptr<acc_t>();
  acc_t* dst = out.data_ptr<acc_t>() + col0;
  acc_t* inv = inv_norm.data_ptr<acc_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = src + i * D;
      acc_t ss = 0;
      for (int64_t k = 0; k < D; ++k) ss += row[k] * row[k];
      const acc_t r = fkd::inv_row_norm<acc_t>(ss);
      inv[i] = r;
      for (int64_t k = 0; k < D; ++k) dst[i * ld + k] = row[k] * r * scale;
    }
  });
}

struct Normalized {
  at::Tensor student;                  // A: B x Ds
  at::Tensor teachers;                 // [T_1 .. T_E] / sqrt(E): B x sum(Dt)
  at::Tensor student_inv_norm;         // B
  std::vector<at::Tensor> teacher_inv_norm;  // E x (B)
  std::vector<int64_t> teacher_col0;   // first column of teacher e in `teachers`
};

template <typename acc_t>
Normalized normalize_inputs(const at::Tensor& student, at::TensorList teachers,
                            at::ScalarType acc) {
  const int64_t B = student.size(0);
  const auto opts = student.options().dtype(acc);
  Normalized n;
  n.student = at::empty({B, student.size(1)}, opts);
  n.student_inv_norm = at::empty({B}, opts);
  normalize_rows_into<acc_t>(student, acc_t(1), n.student, 0, n.student_inv_norm);
  int64_t width = 0;
  for (const auto& t : teachers) width += t.size(1);
  n.teachers = at::empty({B, width}, opts);
  const acc_t scale = acc_t(1) / std::sqrt(acc_t(teachers.size()));
  int64_t col0 = 0;
  for (const auto& t : teachers) {
    n.teacher_inv_norm.push_back(at::empty({B}, opts));
    n.teacher_col0.push_back(col0);
    normalize_rows_into<acc_t>(t, scale, n.teachers, col0, n.teacher_inv_norm.back());
    col0 += t.size(1);
  }
  return n;
}

void check_inputs(const at::Tensor& student, at::TensorList teachers,
                  c10::string_view precision) {
  constexpr const char* op = "fastkd::fkd";
  check_precision(precision, op);
  check_student(student, op);
  TORCH_CHECK(!teachers.empty(), op, ": at least one teacher is required");
  for (const auto& t : teachers) check_partner(student, t, op, "each teacher");
}

// Mean of x^2 over all entries, summed per row in a fixed order.
template <typename acc_t>
double mean_square(const at::Tensor& x_acc) {
  const int64_t B = x_acc.size(0), D = x_acc.size(1);
  const acc_t* x = x_acc.data_ptr<acc_t>();
  std::vector<double> rows(B);
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double s = 0;
      for (int64_t k = 0; k < D; ++k) s += double(x[i * D + k]) * double(x[i * D + k]);
      rows[i] = s;
    }
  });
  double total = 0;
  for (double r : rows) total += r;
  return total / (double(B) * double(D));
}

// One sweep over the upper triangle of the kernels. For row block I the tiles J >= I are
// formed a column panel at a time by two GEMMs (student and teacher), so the scratch memory is
// two kSweepTile x kSweepPanel panels per task whatever B is. In the panel the difference
// rho_S - rho_T is formed once and used for everything asked:
//   value:  sum of squares, weight 1 in the diagonal block and 2 elsewhere (symmetry);
//   grads:  acc_I += D_IJ X_J and, for J != I, acc_J += D_IJ^T X_I, where X is the normalised
//           student (acc_s) or teacher matrix (acc_t): each off-diagonal tile serves both rows.
// Threads: one parallel region for the whole sweep, each task owning whole row blocks and
// running single-threaded GEMMs into its own accumulators (O(T B D) memory), added in task order
// at the end. A region per panel (or BLAS threading inside each GEMM) meant a barrier every few
// milliseconds, which collapses when another process holds a core. Results are bit-identical
// from run to run for a given thread count.
template <typename acc_t>
double kernel_difference_sweep(const Normalized& n, bool want_value, at::Tensor* acc_student,
                               at::Tensor* acc_teacher) {
  const int64_t B = n.student.size(0);
  const auto opts = n.student.options();
  const int64_t ld = std::min(kSweepPanel, B);
  const int64_t blocks = (B + kSweepTile - 1) / kSweepTile;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  std::vector<double> row_sums(want_value ? B : 0, 0.0);
  // Task 0 accumulates straight into the outputs; the others into their own buffers.
  std::vector<at::Tensor> task_acc_s(tasks), task_acc_t(tasks);
  for (int64_t k = 0; k < tasks; ++k) {
    if (acc_student)
      task_acc_s[k] = k == 0 ? acc_student->zero_() : at::zeros_like(*acc_student);
    if (acc_teacher)
      task_acc_t[k] = k == 0 ? acc_teacher->zero_() : at::zeros_like(*acc_teacher);
  }
  const bool keep_difference = acc_student || acc_teacher;

  at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t end_task) {
    at::Tensor s_panel = at::empty({kSweepTile, ld}, opts);
    at::Tensor t_panel = at::empty({kSweepTile, ld}, opts);
    acc_t* sp = s_panel.data_ptr<acc_t>();
    const acc_t* tp = t_panel.data_ptr<acc_t>();
    for (int64_t task = first_task; task < end_task; ++task) {
      for (const int64_t I : row_blocks_of_task(task, tasks, blocks)) {
        const int64_t i0 = I * kSweepTile, ni = std::min(kSweepTile, B - i0);
        const at::Tensor a_i = n.student.narrow(0, i0, ni);
        const at::Tensor t_i = n.teachers.narrow(0, i0, ni);
        for (int64_t c0 = i0; c0 < B; c0 += ld) {
          const int64_t nc = std::min(ld, B - c0);
          const int64_t diag_end = std::max<int64_t>(i0 + ni - c0, 0);  // columns in block I
          at::Tensor s = s_panel.narrow(0, 0, ni).narrow(1, 0, nc);
          at::Tensor t = t_panel.narrow(0, 0, ni).narrow(1, 0, nc);
          at::mm_out(s, a_i, n.student.narrow(0, c0, nc).t());
          at::mm_out(t, t_i, n.teachers.narrow(0, c0, nc).t());
          for (int64_t r = 0; r < ni; ++r) {
            acc_t* srow = sp + r * ld;
            const acc_t* trow = tp + r * ld;
            if (want_value) {
              acc_t diag = 0, off = 0;
              for (int64_t c = 0; c < diag_end; ++c)
                diag += fkd::squared_difference<acc_t>(srow[c], trow[c]);
              for (int64_t c = diag_end; c < nc; ++c)
                off += fkd::squared_difference<acc_t>(srow[c], trow[c]);
              row_sums[i0 + r] += fkd::tile_weight<double>(0, 0) * diag +
                                  fkd::tile_weight<double>(0, 1) * off;
            }
            if (keep_difference)
              for (int64_t c = 0; c < nc; ++c) srow[c] -= trow[c];
          }
          if (!keep_difference) continue;
          for (auto [acc, x] : {std::pair{&task_acc_s[task], &n.student},
                                std::pair{&task_acc_t[task], &n.teachers}}) {
            if (!acc->defined()) continue;
            acc->narrow(0, i0, ni).addmm_(s, x->narrow(0, c0, nc));
            if (nc > diag_end) {
              acc->narrow(0, c0 + diag_end, nc - diag_end)
                  .addmm_(s.narrow(1, diag_end, nc - diag_end).t(), x->narrow(0, i0, ni));
            }
          }
        }
      }
    }
  });
  for (int64_t k = 1; k < tasks; ++k) {
    if (acc_student) acc_student->add_(task_acc_s[k]);
    if (acc_teacher) acc_teacher->add_(task_acc_t[k]);
  }
  double total = 0;
  for (double v : row_sums) total += v;
  return total;
}

template <typename acc_t>
double feature_regulariser(const at::Tensor& student, double fr_weight, at::ScalarType acc) {
  return fr_weight == 0.0 ? 0.0 : fr_weight * mean_square<acc_t>(student.to(acc).contiguous());
}

template <typename acc_t>
at::Tensor fkd_forward_impl(const at::Tensor& student, at::TensorList teachers, double kd_weight,
                            double fr_weight, at::ScalarType acc) {
  const int64_t B = student.size(0);
  const Normalized n = normalize_inputs<acc_t>(student, teachers, acc);
  const double distil = kernel_difference_sweep<acc_t>(n, true, nullptr, nullptr);
  const double loss = kd_weight * distil / (double(B) * double(B)) +
                      feature_regulariser<acc_t>(student, fr_weight, acc);
  return at::scalar_tensor(loss, student.options().dtype(acc));
}

// grad = chain rule through normalize() of kd_scale * acc_rows, plus the feature-regulariser
// term when fr_scale != 0. All operands are contiguous B x D in the accumulation dtype.
template <typename acc_t>
void normalize_backward_rows(const at::Tensor& acc_rows, const at::Tensor& normalized,
                             const at::Tensor& inv_norm, acc_t kd_scale, const at::Tensor& raw,
                             acc_t fr_scale, at::Tensor& grad_acc) {
  const int64_t B = grad_acc.size(0), D = grad_acc.size(1);
  const acc_t* g = acc_rows.data_ptr<acc_t>();
  const acc_t* a = normalized.data_ptr<acc_t>();
  const acc_t* inv = inv_norm.data_ptr<acc_t>();
  const acc_t* x = fr_scale != acc_t(0) ? raw.data_ptr<acc_t>() : nullptr;
  acc_t* out = grad_acc.data_ptr<acc_t>();
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* gi = g + i * D;
      const acc_t* ai = a + i * D;
      acc_t g_dot_a = 0;
      for (int64_t k = 0; k < D; ++k) g_dot_a += gi[k] * ai[k];
      g_dot_a *= kd_scale;
      for (int64_t k = 0; k < D; ++k) {
        acc_t v = fkd::normalize_backward<acc_t>(kd_scale * gi[k], ai[k], g_dot_a, inv[i]);
        if (x) v += fkd::featreg_backward<acc_t>(x[i * D + k], fr_scale, B, D);
        out[i * D + k] = v;
      }
    }
  });
}

// Gradients of the loss scaled by `grad_scale`; with value != nullptr the loss too, from the
// same sweep (the forward-backward op: one pass instead of two in a training step).
template <typename acc_t>
std::tuple<at::Tensor, std::vector<at::Tensor>> fkd_grad_impl(
    double grad_scale, const at::Tensor& student, at::TensorList teachers, double kd_weight,
    double fr_weight, bool teachers_grad, at::ScalarType acc, double* value) {
  const int64_t B = student.size(0), Ds = student.size(1);
  const Normalized n = normalize_inputs<acc_t>(student, teachers, acc);
  const int64_t Dt = n.teachers.size(1);
  const bool want_value = value != nullptr;
  // acc_s = (rho_S - rho_T) A and acc_teach = (rho_S - rho_T) T.
  at::Tensor acc_s = at::empty({B, Ds}, n.student.options());
  at::Tensor acc_teach = teachers_grad ? at::empty({B, Dt}, n.student.options()) : at::Tensor();
  const double distil = kernel_difference_sweep<acc_t>(n, want_value, &acc_s,
                                                       teachers_grad ? &acc_teach : nullptr);
  if (value) {
    *value = kd_weight * distil / (double(B) * double(B)) +
             feature_regulariser<acc_t>(student, fr_weight, acc);
  }

  const acc_t g = static_cast<acc_t>(grad_scale);
  const acc_t kd_scale = g * static_cast<acc_t>(kd_weight) * fkd::kernel_grad_scale<acc_t>(B);
  at::Tensor student_acc = student.to(acc).contiguous();
  at::Tensor grad_student = at::empty({B, Ds}, n.student.options());
  normalize_backward_rows<acc_t>(acc_s, n.student, n.student_inv_norm, kd_scale, student_acc,
                                 g * static_cast<acc_t>(fr_weight), grad_student);

  std::vector<at::Tensor> grad_teachers;
  if (teachers_grad) {
    // d/d(That_e) = -(1/E) (4/B^2) D That_e, and acc_teach = D That_e / sqrt(E).
    const acc_t E = static_cast<acc_t>(teachers.size());
    const acc_t t_scale = -kd_scale / std::sqrt(E);
    for (size_t e = 0; e < teachers.size(); ++e) {
      const int64_t De = teachers[e].size(1);
      at::Tensor ge = at::empty({B, De}, n.student.options());
      // normalized teacher columns carry a 1/sqrt(E) factor: undo it for the chain rule.
      at::Tensor te_hat = n.teachers.narrow(1, n.teacher_col0[e], De) * std::sqrt(E);
      at::Tensor acc_e = acc_teach.narrow(1, n.teacher_col0[e], De).contiguous();
      normalize_backward_rows<acc_t>(acc_e, te_hat.contiguous(), n.teacher_inv_norm[e],
                                     t_scale, at::Tensor(), acc_t(0), ge);
      grad_teachers.push_back(ge.to(teachers[e].scalar_type()));
    }
  }
  return {grad_student.to(student.scalar_type()), grad_teachers};
}

// `precision` is checked, then ignored: the CPU always forms full fp32 products, never less
// accurate than asked (SPEC §6).
at::Tensor fkd_forward_cpu(const at::Tensor& student, at::TensorList teachers, double kd_weight,
                           double fr_weight, c10::string_view precision) {
  check_inputs(student, teachers, precision);
  const at::ScalarType acc = acc_type_of(student, teachers);
  if (acc == at::kDouble) return fkd_forward_impl<double>(student, teachers, kd_weight, fr_weight, acc);
  return fkd_forward_impl<float>(student, teachers, kd_weight, fr_weight, acc);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fkd_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, at::TensorList teachers, double kd_weight,
    double fr_weight, bool teachers_grad, c10::string_view precision) {
  check_inputs(student, teachers, precision);
  const at::ScalarType acc = acc_type_of(student, teachers);
  const double g = grad.item<double>();
  if (acc == at::kDouble)
    return fkd_grad_impl<double>(g, student, teachers, kd_weight, fr_weight, teachers_grad, acc,
                                 nullptr);
  return fkd_grad_impl<float>(g, student, teachers, kd_weight, fr_weight, teachers_grad, acc,
                              nullptr);
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> fkd_forward_backward_cpu(
    const at::Tensor& student, at::TensorList teachers, double kd_weight, double fr_weight,
    bool teachers_grad, c10::string_view precision) {
  check_inputs(student, teachers, precision);
  const at::ScalarType acc = acc_type_of(student, teachers);
  double value = 0;
  auto [grad_student, grad_teachers] =
      acc == at::kDouble
          ? fkd_grad_impl<double>(1.0, student, teachers, kd_weight, fr_weight, teachers_grad,
                                  acc, &value)
          : fkd_grad_impl<float>(1.0, student, teachers, kd_weight, fr_weight, teachers_grad, acc,
                                 &value);
  return {at::scalar_tensor(value, student.options().dtype(acc)), grad_student, grad_teachers};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("fkd_forward", &fkd_forward_cpu);
  m.impl("fkd_backward", &fkd_backward_cpu);
  m.impl("fkd_forward_backward", &fkd_forward_backward_cpu);
}

}  // namespace fastkd
