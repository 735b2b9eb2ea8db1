// RKD distance loss (SPEC §2, RepDistiller convention) on the CPU: tiled, O(B*D) extra memory.
//
// The reference forms four B x B matrices per side; here the distance tiles are computed into
// two fixed-size panels (student and teacher dot products, by BLAS) and consumed there. Only
// the strict upper triangle is visited: both distance matrices are symmetric and d_ii = 0.
// Three sweeps, because each needs a scalar of the previous one:
//   1. the mean distances mu_S, mu_T (every loss entry is normalised by them);
//   2. the loss, and c_X = sum_kl h_kl d_kl / (mu_X N) with h = smooth_l1'(d_S/mu_S - d_T/mu_T),
//      N = B (B - 1): the part of the gradient that flows through mu_X;
//   3. the gradient: with w_ij = dL/dd_ij * dd_ij/dq_ij (q the squared distance),
//      grad f_i = 4 (sum_j w_ij f_i - sum_j w_ij f_j), accumulated tile by tile as W F.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fastkd/host.h"
#include "fastkd/rkd_math.h"
#include "sweep.h"

namespace fastkd {
namespace {

enum class Sweep { kMeans, kLoss, kGrad };

// One side of the loss in the accumulation dtype.
struct Side {
  at::Tensor f;         // B x D, contiguous
  at::Tensor sq;        // B: squared row norms
  double inv_mean = 0;  // 1 / mean off-diagonal distance
  double c = 0;         // sum_kl h_kl d_kl / (mu N), from sweep 2
};

template <typename acc_t>
Side make_side(const at::Tensor& x, at::ScalarType acc) {
  Side s;
  // detach: the sweep's GEMMs run on worker threads, where grad mode is on again (thread-local),
  // and out= GEMMs refuse inputs that require grad.
  s.f = x.detach().to(acc).contiguous();
  s.sq = s.f.square().sum(1);
  return s;
}

// Per-row results of sweeps 1 and 2 (each row is owned by one task: no races, fixed order).
struct RowSums {
  std::vector<double> a, b, c;  // kMeans: sum d_S, sum d_T; kLoss: loss, h d_S, h d_T
  explicit RowSums(int64_t B) : a(B, 0.0), b(B, 0.0), c(B, 0.0) {}
};

// Gradient accumulators of sweep 3 for one side: acc = W F and r = W 1 (both triangles).
struct GradAcc {
  at::Tensor wf;  // B x D
  at::Tensor r;   // B
};

template <typename acc_t>
void sweep(Sweep kind, const Side& s, const Side& t, RowSums* rows, GradAcc* grad_s,
           GradAcc* grad_t) {
  const int64_t B = s.f.size(0);
  const auto opts = s.f.options();
  const int64_t ld = std::min(kSweepPanel, B);
  const int64_t blocks = (B + kSweepTile - 1) / kSweepTile;
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const acc_t* sq_s = s.sq.data_ptr<acc_t>();
  const acc_t* sq_t = t.sq.data_ptr<acc_t>();
  const acc_t inv_mu_s = static_cast<acc_t>(s.inv_mean), inv_mu_t = static_cast<acc_t>(t.inv_mean);
  const acc_t c_s = static_cast<acc_t>(s.c), c_t = static_cast<acc_t>(t.c);
  const acc_t bb = acc_t(B) * acc_t(B);
  // Task 0 accumulates into the outputs, the others into their own buffers (added in order).
  std::vector<GradAcc> task_s(tasks), task_t(tasks);
  for (int64_t k = 0; k < tasks; ++k) {
    for (auto [task_acc, out] : {std::pair{&task_s[k], grad_s}, std::pair{&task_t[k], grad_t}}) {
      if (!out) continue;
      task_acc->wf = k == 0 ? out->wf.zero_() : at::zeros_like(out->wf);
      task_acc->r = k == 0 ? out->r.zero_() : at::zeros_like(out->r);
    }
  }

  at::parallel_for(0, tasks, 1, [&](int64_t first_task, int64_t end_task) {
    at::Tensor s_panel = at::empty({kSweepTile, ld}, opts);
    at::Tensor t_panel = at::empty({kSweepTile, ld}, opts);
    acc_t* sp = s_panel.data_ptr<acc_t>();
    acc_t* tp = t_panel.data_ptr<acc_t>();
    for (int64_t task = first_task; task < end_task; ++task) {
      for (const int64_t I : row_blocks_of_task(task, tasks, blocks)) {
        const int64_t i0 = I * kSweepTile, ni = std::min(kSweepTile, B - i0);
        for (int64_t c0 = i0; c0 < B; c0 += ld) {
          const int64_t nc = std::min(ld, B - c0);
          at::Tensor sd = s_panel.narrow(0, 0, ni).narrow(1, 0, nc);
          at::Tensor td = t_panel.narrow(0, 0, ni).narrow(1, 0, nc);
          at::mm_out(sd, s.f.narrow(0, i0, ni), s.f.narrow(0, c0, nc).t());
          at::mm_out(td, t.f.narrow(0, i0, ni), t.f.narrow(0, c0, nc).t());
          for (int64_t r = 0; r < ni; ++r) {
            const int64_t i = i0 + r;
            acc_t* srow = sp + r * ld;
            acc_t* trow = tp + r * ld;
            // strictly upper entries only: j = c0 + c > i
            const int64_t first = std::max<int64_t>(i + 1 - c0, 0);
            acc_t sum_a = 0, sum_b = 0, sum_c = 0;
            for (int64_t c = first; c < nc; ++c) {
              const int64_t j = c0 + c;
              const acc_t qs = rkd::squared_distance<acc_t>(sq_s[i], sq_s[j], srow[c]);
              const acc_t qt = rkd::squared_distance<acc_t>(sq_t[i], sq_t[j], trow[c]);
              const acc_t ds = rkd::distance<acc_t>(qs), dt = rkd::distance<acc_t>(qt);
              if (kind == Sweep::kMeans) {
                sum_a += ds;
                sum_b += dt;
                continue;
              }
              const acc_t x = ds * inv_mu_s - dt * inv_mu_t;
              const acc_t h = rkd::smooth_l1_grad<acc_t>(x);
              if (kind == Sweep::kLoss) {
                sum_a += rkd::smooth_l1<acc_t>(x);
                sum_b += h * ds;
                sum_c += h * dt;
                continue;
              }
              // dL/dd_S = (h - c_S) mu_S^-1 / B^2, dL/dd_T = -(h - c_T) mu_T^-1 / B^2
              srow[c] = (h - c_s) * inv_mu_s / bb * rkd::distance_grad<acc_t>(qs, ds);
              trow[c] = -(h - c_t) * inv_mu_t / bb * rkd::distance_grad<acc_t>(qt, dt);
            }
            if (kind != Sweep::kGrad) {
              rows->a[i] += sum_a;
              rows->b[i] += sum_b;
              rows->c[i] += sum_c;
            } else {
              for (int64_t c = 0; c < first; ++c) srow[c] = trow[c] = acc_t(0);
            }
          }
          if (kind != Sweep::kGrad) continue;
          for (auto [acc, w, side] : {std::tuple{grad_s ? &task_s[task] : nullptr, &sd, &s},
                                      std::tuple{grad_t ? &task_t[task] : nullptr, &td, &t}}) {
            if (!acc) continue;
            // W_IJ serves both rows of the pair: (W F)_I += W_IJ F_J, (W F)_J += W_IJ^T F_I.
            acc->wf.narrow(0, i0, ni).addmm_(*w, side->f.narrow(0, c0, nc));
            acc->wf.narrow(0, c0, nc).addmm_(w->t(), side->f.narrow(0, i0, ni));
            acc->r.narrow(0, i0, ni).add_(w->sum(1));
            acc->r.narrow(0, c0, nc).add_(w->sum(0));
          }
        }
      }
    }
  });
  for (int64_t k = 1; k < tasks; ++k) {
    for (auto [task_acc, out] : {std::pair{&task_s[k], grad_s}, std::pair{&task_t[k], grad_t}}) {
      if (!out) continue;
      out->wf.add_(task_acc->wf);
      out->r.add_(task_acc->r);
    }
  }
}

double ordered_sum(const std::vector<double>& v) {
  double total = 0;
  for (double x : v) total += x;
  return total;
}

// `precision` is checked, then ignored: the CPU always forms full fp32 products, never less
// accurate than asked (SPEC §6).
void check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                  c10::string_view precision) {
  constexpr const char* op = "fastkd::rkd";
  check_precision(precision, op);
  check_student(student, op, 2);
  check_partner(student, teacher, op, "teacher");
}

// Sweeps 1 and 2: fills inv_mean and c of both sides, returns the loss.
template <typename acc_t>
double loss_sweeps(Side& s, Side& t) {
  const int64_t B = s.f.size(0);
  const double pairs = double(B) * double(B - 1);  // ordered off-diagonal pairs
  RowSums means(B);
  sweep<acc_t>(Sweep::kMeans, s, t, &means, nullptr, nullptr);
  s.inv_mean = pairs / (2.0 * ordered_sum(means.a));
  t.inv_mean = pairs / (2.0 * ordered_sum(means.b));
  RowSums loss(B);
  sweep<acc_t>(Sweep::kLoss, s, t, &loss, nullptr, nullptr);
  s.c = 2.0 * ordered_sum(loss.b) * s.inv_mean / pairs;
  t.c = 2.0 * ordered_sum(loss.c) * t.inv_mean / pairs;
  return 2.0 * ordered_sum(loss.a) / (double(B) * double(B));
}

// grad f_i = 4 g (r_i f_i - (W F)_i), cast to the input's dtype.
at::Tensor gradient_of(const Side& side, const GradAcc& acc, double g, at::ScalarType dtype) {
  return (side.f * acc.r.unsqueeze(1) - acc.wf).mul_(4.0 * g).to(dtype);
}

template <typename acc_t>
std::tuple<double, at::Tensor, at::Tensor> rkd_impl(const at::Tensor& student,
                                                    const at::Tensor& teacher, double grad_scale,
                                                    bool teacher_grad, at::ScalarType acc) {
  Side s = make_side<acc_t>(student, acc), t = make_side<acc_t>(teacher, acc);
  const double value = loss_sweeps<acc_t>(s, t);
  const auto opts = s.f.options();
  const int64_t B = s.f.size(0);
  GradAcc gs{at::empty_like(s.f), at::empty({B}, opts)};
  GradAcc gt;
  if (teacher_grad) gt = GradAcc{at::empty_like(t.f), at::empty({B}, opts)};
  sweep<acc_t>(Sweep::kGrad, s, t, nullptr, &gs, teacher_grad ? &gt : nullptr);
  at::Tensor grad_student = gradient_of(s, gs, grad_scale, student.scalar_type());
  at::Tensor grad_teacher = teacher_grad ? gradient_of(t, gt, grad_scale, teacher.scalar_type())
                                         : teacher.new_empty({0});
  return {value, grad_student, grad_teacher};
}

at::Tensor rkd_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                           c10::string_view precision) {
  check_inputs(student, teacher, precision);
  const at::ScalarType acc = acc_type_of(student, teacher);
  double value;
  if (acc == at::kDouble) {
    Side s = make_side<double>(student, acc), t = make_side<double>(teacher, acc);
    value = loss_sweeps<double>(s, t);
  } else {
    Side s = make_side<float>(student, acc), t = make_side<float>(teacher, acc);
    value = loss_sweeps<float>(s, t);
  }
  return at::scalar_tensor(value, student.options().dtype(acc));
}

std::tuple<at::Tensor, at::Tensor> rkd_backward_cpu(const at::Tensor& grad,
                                                    const at::Tensor& student,
                                                    const at::Tensor& teacher, bool teacher_grad,
                                                    c10::string_view precision) {
  check_inputs(student, teacher, precision);
  const at::ScalarType acc = acc_type_of(student, teacher);
  const double g = grad.item<double>();
  auto [value, gs, gt] = acc == at::kDouble
                             ? rkd_impl<double>(student, teacher, g, teacher_grad, acc)
                             : rkd_impl<float>(student, teacher, g, teacher_grad, acc);
  (void)value;
  return {gs, gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rkd_forward_backward_cpu(const at::Tensor& student,
                                                                        const at::Tensor& teacher,
                                                                        bool teacher_grad,
                                                                        c10::string_view precision) {
  check_inputs(student, teacher, precision);
  const at::ScalarType acc = acc_type_of(student, teacher);
  auto [value, gs, gt] = acc == at::kDouble
                             ? rkd_impl<double>(student, teacher, 1.0, teacher_grad, acc)
                             : rkd_impl<float>(student, teacher, 1.0, teacher_grad, acc);
  return {at::scalar_tensor(value, student.options().dtype(acc)), gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("rkd_forward", &rkd_forward_cpu);
  m.impl("rkd_backward", &rkd_backward_cpu);
  m.impl("rkd_forward_backward", &rkd_forward_backward_cpu);
}

}  // namespace fastkd
