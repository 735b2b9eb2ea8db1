// FKD (SPEC §1) on the CPU: tiled kernel-space algorithm, O(B*D) extra memory.
//
// The B x B kernels are never formed: tile (I, J) of rho_S and rho_T is computed into a
// per-thread tile buffer by a BLAS GEMM on row blocks, consumed, and dropped. The forward pass
// visits only J >= I (both kernels are symmetric); each tile's partial sum lands in its own slot
// and the slots are added in a fixed order, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fastkd/fkd_math.h"

namespace fastkd {
namespace {

constexpr int64_t kTile = 256;  // rows per block: two 256x256 fp32 tiles fit in L2

at::ScalarType acc_type_of(const at::Tensor& student, at::TensorList teachers) {
  bool any_double = student.scalar_type() == at::kDouble;
  for (const auto& t : teachers) any_double = any_double || t.scalar_type() == at::kDouble;
  return any_double ? at::kDouble : at::kFloat;
}

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

void check_inputs(const at::Tensor& student, at::TensorList teachers) {
  TORCH_CHECK(student.dim() == 2 && student.size(0) >= 1 && student.size(1) >= 1,
              "fastkd::fkd: student must be a non-empty 2-D tensor");
  TORCH_CHECK(!teachers.empty(), "fastkd::fkd: at least one teacher is required");
  for (const auto& t : teachers) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == student.size(0) && t.size(1) >= 1,
                "fastkd::fkd: each teacher must be 2-D with the student's batch size");
    TORCH_CHECK(t.device() == student.device(), "fastkd::fkd: teachers and student devices differ");
  }
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

template <typename acc_t>
at::Tensor fkd_forward_impl(const at::Tensor& student, at::TensorList teachers, double kd_weight,
                            double fr_weight, at::ScalarType acc) {
  const int64_t B = student.size(0);
  const Normalized n = normalize_inputs<acc_t>(student, teachers, acc);
  const int64_t nb = (B + kTile - 1) / kTile;
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J) tiles.emplace_back(I, J);
  std::vector<double> partial(tiles.size(), 0.0);

  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    at::Tensor s_tile = at::empty({kTile, kTile}, n.student.options());
    at::Tensor t_tile = at::empty({kTile, kTile}, n.student.options());
    for (int64_t k = begin; k < end; ++k) {
      const auto [I, J] = tiles[k];
      const int64_t i0 = I * kTile, ni = std::min(kTile, B - i0);
      const int64_t j0 = J * kTile, nj = std::min(kTile, B - j0);
      at::Tensor s = s_tile.narrow(0, 0, ni).narrow(1, 0, nj);
      at::Tensor t = t_tile.narrow(0, 0, ni).narrow(1, 0, nj);
      at::mm_out(s, n.student.narrow(0, i0, ni), n.student.narrow(0, j0, nj).t());
      at::mm_out(t, n.teachers.narrow(0, i0, ni), n.teachers.narrow(0, j0, nj).t());
      const acc_t* sp = s_tile.data_ptr<acc_t>();
      const acc_t* tp = t_tile.data_ptr<acc_t>();
      double sum = 0;
      for (int64_t r = 0; r < ni; ++r) {
        acc_t row_sum = 0;
        for (int64_t c = 0; c < nj; ++c)
          row_sum += fkd::squared_difference<acc_t>(sp[r * kTile + c], tp[r * kTile + c]);
        sum += row_sum;
      }
      partial[k] = fkd::tile_weight<double>(I, J) * sum;
    }
  });
  double distil = 0;
  for (double v : partial) distil += v;
  distil /= double(B) * double(B);
  double loss = kd_weight * distil;
  if (fr_weight != 0.0) {
    loss += fr_weight * mean_square<acc_t>(student.to(acc).contiguous());
  }
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

template <typename acc_t>
std::tuple<at::Tensor, std::vector<at::Tensor>> fkd_backward_impl(
    const at::Tensor& grad, const at::Tensor& student, at::TensorList teachers, double kd_weight,
    double fr_weight, bool teachers_grad, at::ScalarType acc) {
  const int64_t B = student.size(0), Ds = student.size(1);
  const Normalized n = normalize_inputs<acc_t>(student, teachers, acc);
  const int64_t Dt = n.teachers.size(1);
  const int64_t nb = (B + kTile - 1) / kTile;
  // acc_s = (rho_S - rho_T) A, acc_t = (rho_S - rho_T) T, built one row block at a time.
  at::Tensor acc_s = at::empty({B, Ds}, n.student.options());
  at::Tensor acc_teach = teachers_grad ? at::empty({B, Dt}, n.student.options()) : at::Tensor();

  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    at::Tensor s_tile = at::empty({kTile, kTile}, n.student.options());
    at::Tensor t_tile = at::empty({kTile, kTile}, n.student.options());
    for (int64_t I = begin; I < end; ++I) {
      const int64_t i0 = I * kTile, ni = std::min(kTile, B - i0);
      at::Tensor out_s = acc_s.narrow(0, i0, ni);
      out_s.zero_();
      at::Tensor out_t = teachers_grad ? acc_teach.narrow(0, i0, ni) : at::Tensor();
      if (teachers_grad) out_t.zero_();
      for (int64_t J = 0; J < nb; ++J) {
        const int64_t j0 = J * kTile, nj = std::min(kTile, B - j0);
        at::Tensor s = s_tile.narrow(0, 0, ni).narrow(1, 0, nj);
        at::Tensor t = t_tile.narrow(0, 0, ni).narrow(1, 0, nj);
        const at::Tensor a_j = n.student.narrow(0, j0, nj);
        const at::Tensor t_j = n.teachers.narrow(0, j0, nj);
        at::mm_out(s, n.student.narrow(0, i0, ni), a_j.t());
        at::mm_out(t, n.teachers.narrow(0, i0, ni), t_j.t());
        s.sub_(t);  // the difference tile rho_S - rho_T
        out_s.addmm_(s, a_j);
        if (teachers_grad) out_t.addmm_(s, t_j);
      }
    }
  });

  const acc_t g = static_cast<acc_t>(grad.item<double>());
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

at::Tensor fkd_forward_cpu(const at::Tensor& student, at::TensorList teachers, double kd_weight,
                           double fr_weight) {
  check_inputs(student, teachers);
  const at::ScalarType acc = acc_type_of(student, teachers);
  if (acc == at::kDouble) return fkd_forward_impl<double>(student, teachers, kd_weight, fr_weight, acc);
  return fkd_forward_impl<float>(student, teachers, kd_weight, fr_weight, acc);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fkd_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student, at::TensorList teachers, double kd_weight,
    double fr_weight, bool teachers_grad) {
  check_inputs(student, teachers);
  const at::ScalarType acc = acc_type_of(student, teachers);
  if (acc == at::kDouble)
    return fkd_backward_impl<double>(grad, student, teachers, kd_weight, fr_weight, teachers_grad, acc);
  return fkd_backward_impl<float>(grad, student, teachers, kd_weight, fr_weight, teachers_grad, acc);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("fkd_forward", &fkd_forward_cpu);
  m.impl("fkd_backward", &fkd_backward_cpu);
}

}  // namespace fastkd
