// SRD (SPEC §3) on the CPU: LogSum of batch-normalised features, fused, O(D) extra memory.
//
// Work is split over blocks of kColBlock columns (at::parallel_for); a column's statistics only
// need its own column, so one task runs both forward passes on its block while it is in cache:
// pass 1 the shifted Welford statistics, pass 2 the per-column sums of |d|^p, h, h*s, h*t.
// Rows are summed in chunks of kRowChunk (two-level sums), and S adds the column sums in a fixed
// order in double, so results do not depend on the thread count. The backward pass is one
// elementwise sweep that recomputes h. Input dtypes: float16/bfloat16/float32 (float32
// arithmetic) and float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "fastkd/srd_host.h"
#include "fastkd/srd_math.h"

namespace fastkd {
namespace {

constexpr int64_t kColBlock = 64;   // columns per task: 64 accumulators of each kind
constexpr int64_t kRowChunk = 256;  // rows per first-level partial sum

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  srd::check_pair(student, teacher);
  TORCH_CHECK(at::isFloatingType(student.scalar_type()),
              "fastkd::srd: features must be a floating dtype");
}

// Calls fn.template operator()<kIP>() with the exponent fixed at compile time for the common
// p = 1..4 (kIP = p), else kIP = -1 (read at run time).
template <typename Fn>
void with_power(int ip, Fn&& fn) {
  switch (ip) {
    case 1: fn.template operator()<1>(); break;
    case 2: fn.template operator()<2>(); break;
    case 3: fn.template operator()<3>(); break;
    case 4: fn.template operator()<4>(); break;
    default: fn.template operator()<-1>(); break;
  }
}

// Per-column coefficients of one side, loaded once per task.
template <typename acc_t>
struct Side {
  acc_t shift[kColBlock], centre[kColBlock], rstd[kColBlock];

  template <typename scalar_t>
  void load(const scalar_t* z, const acc_t* stats, int64_t D, int64_t j0, int64_t w) {
    for (int64_t c = 0; c < w; ++c) {
      shift[c] = static_cast<acc_t>(z[j0 + c]);
      centre[c] = stats[srd::kCentre * D + j0 + c];
      rstd[c] = stats[srd::kRstd * D + j0 + c];
    }
  }

  // Batch-normalised value of an element of column j0 + c.
  acc_t normalize(acc_t z, int64_t c) const {
    return srd::normalize<acc_t>(z, shift[c], centre[c], rstd[c]);
  }
};

namespace base {
#include "srd_kernels.inc"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTKD_SRD_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "srd_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// Runs fn with the namespace of the kernels this CPU supports.
template <typename Fn>
void with_isa(Fn&& fn) {
#ifdef FASTKD_SRD_AVX2
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) return fn(avx2::Kernels{});
#endif
  fn(base::Kernels{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> srd_forward_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double p, double eps,
    bool training, const std::optional<at::Tensor>& running_mean_s,
    const std::optional<at::Tensor>& running_var_s, const std::optional<at::Tensor>& running_mean_t,
    const std::optional<at::Tensor>& running_var_t) {
  check_inputs(student_in, teacher_in);
  TORCH_CHECK(p >= 1, "fastkd::srd: p must be >= 1, got ", p);
  const int64_t B = student_in.size(0), D = student_in.size(1);
  TORCH_CHECK(!training || B >= 2, "fastkd::srd: training mode needs a batch of at least 2 rows");
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = srd::acc_type_of(student);
  const auto opts = student.options().dtype(acc);
  at::Tensor stats_s, stats_t;
  if (training) {
    stats_s = at::empty({4, D}, opts);
    stats_t = at::empty({4, D}, opts);
  } else {
    stats_s = srd::stats_from_running(student, running_mean_s, running_var_s, eps, acc, "student");
    stats_t = srd::stats_from_running(teacher, running_mean_t, running_var_t, eps, acc, "teacher");
  }
  at::Tensor sums = at::empty({4, D}, opts);
  const int ip = srd::integer_power(p);
  const int64_t n_blocks = (D + kColBlock - 1) / kColBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "srd_forward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zs = student.const_data_ptr<scalar_t>();
    const scalar_t* zt = teacher.const_data_ptr<scalar_t>();
    acc_t* ss = stats_s.data_ptr<acc_t>();
    acc_t* st = stats_t.data_ptr<acc_t>();
    acc_t* sm = sums.data_ptr<acc_t>();
    with_isa([&](auto isa) {
      using K = decltype(isa);
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t j0 = blk * kColBlock, w = std::min(kColBlock, D - j0);
          if (training) {
            K::template column_stats<scalar_t, acc_t>(zs, B, D, j0, w, static_cast<acc_t>(eps), ss);
            K::template column_stats<scalar_t, acc_t>(zt, B, D, j0, w, static_cast<acc_t>(eps), st);
          }
          with_power(ip, [&]<int kIP>() {
            K::template column_sums<scalar_t, acc_t, kIP>(zs, zt, B, D, j0, w, ss, st,
                                                          static_cast<acc_t>(p), ip, sm);
          });
        }
      });
    });
  });

  // S in a fixed column order, in double: independent of the thread count.
  const at::Tensor pow_sums = sums.select(0, srd::kPow).to(at::kDouble);
  const double* ps = pow_sums.const_data_ptr<double>();
  double total = 0;
  for (int64_t j = 0; j < D; ++j) total += ps[j];
  const at::Tensor total_t = at::scalar_tensor(total, opts);
  const at::Tensor loss = total_t.clamp_min(srd::kTiny).log();
  return {loss, total_t, stats_s, stats_t, sums};
}

std::tuple<at::Tensor, at::Tensor> srd_backward_cpu(
    const at::Tensor& grad, const at::Tensor& student_in, const at::Tensor& teacher_in, double p,
    bool training, const at::Tensor& total, const at::Tensor& stats_s_in,
    const at::Tensor& stats_t_in, const at::Tensor& sums_in, bool teacher_grad) {
  check_inputs(student_in, teacher_in);
  const int64_t B = student_in.size(0), D = student_in.size(1);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = srd::acc_type_of(student);
  srd::check_backward_tables(stats_s_in, stats_t_in, sums_in, D);
  const at::Tensor stats_s = stats_s_in.to(acc).contiguous();
  const at::Tensor stats_t = stats_t_in.to(acc).contiguous();
  const at::Tensor sums = sums_in.to(acc).contiguous();
  at::Tensor grad_student = at::empty_like(student);
  at::Tensor grad_teacher =
      teacher_grad ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  const int ip = srd::integer_power(p);
  const int64_t n_blocks = (D + kColBlock - 1) / kColBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "srd_backward",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t c = srd::loss_grad_scale<acc_t>(static_cast<acc_t>(grad.item<double>()),
                                                static_cast<acc_t>(total.item<double>()));
    const acc_t pa = static_cast<acc_t>(p), inv_b = acc_t(1) / static_cast<acc_t>(B);
    const scalar_t* zs = student.const_data_ptr<scalar_t>();
    const scalar_t* zt = teacher.const_data_ptr<scalar_t>();
    const acc_t* ss = stats_s.const_data_ptr<acc_t>();
    const acc_t* st = stats_t.const_data_ptr<acc_t>();
    const acc_t* sm = sums.const_data_ptr<acc_t>();
    scalar_t* gs = grad_student.data_ptr<scalar_t>();
    scalar_t* gt = teacher_grad ? grad_teacher.data_ptr<scalar_t>() : nullptr;
    with_isa([&](auto isa) {
      using K = decltype(isa);
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        Side<acc_t> s_side, t_side;
        acc_t mean_h[kColBlock], mean_hs[kColBlock], mean_ht[kColBlock];
        for (int64_t blk = begin; blk < end; ++blk) {
          const int64_t j0 = blk * kColBlock, w = std::min(kColBlock, D - j0);
          s_side.load(zs, ss, D, j0, w);
          t_side.load(zt, st, D, j0, w);
          for (int64_t k = 0; k < w; ++k) {
            mean_h[k] = sm[srd::kH * D + j0 + k] * inv_b;
            mean_hs[k] = sm[srd::kHS * D + j0 + k] * inv_b;
            mean_ht[k] = sm[srd::kHT * D + j0 + k] * inv_b;
          }
          with_power(ip, [&]<int kIP>() {
            auto* block = training ? &K::template backward_block<scalar_t, acc_t, kIP, true>
                                   : &K::template backward_block<scalar_t, acc_t, kIP, false>;
            block(zs, zt, B, D, j0, w, s_side, t_side, mean_h, mean_hs, mean_ht, c, pa, ip, gs,
                  gt);
          });
        }
      });
    });
  });
  return {grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("srd_forward", &srd_forward_cpu);
  m.impl("srd_backward", &srd_backward_cpu);
}

}  // namespace fastkd
