// SRD (SPEC §3) on the CPU: LogSum of batch-normalised features, fused, O(D) extra memory
// (plus O(kMaxGroups D) partials).
//
// Work is split over tiles of whole row chunks x kPanel columns (at::parallel_for), so every pass
// streams contiguous row segments; column blocks over row-major data touched one page per row
// and defeated the prefetchers. Pass 1 gives per-tile shifted Welford statistics (kRowChunk-row
// chunks merged with Chan's formula), pass 2 per-tile sums of |d|^p, h, h*s, h*t; the row groups
// are merged in group order and S adds the column sums in a fixed order in double, so results do
// not depend on the thread count. The backward pass is one elementwise sweep over the same tiles
// that recomputes h. Input dtypes: float16/bfloat16/float32 (float32 arithmetic) and float64.
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

constexpr int64_t kPanel = 512;     // columns per tile: 2 KB contiguous fp32 row segments
constexpr int64_t kRowChunk = 256;  // rows per first-level partial sum
constexpr int64_t kMaxGroups = 32;  // row groups of the forward tiles: partials are O(32 D)

void check_inputs(const at::Tensor& student, const at::Tensor& teacher) {
  srd::check_pair(student, teacher);
  check_float_dtype(student, "fastkd::srd", "student");
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
  acc_t shift[kPanel], centre[kPanel], rstd[kPanel];

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

// Tiles: row groups (whole kRowChunk chunks, at most kMaxGroups groups) x column
// panels of kPanel. Depends on (B, D) only, so the summation order does too.
struct Tile {
  int64_t g, b0, b1, j0, w;
};
struct Tiling {
  int64_t group_rows, n_groups, n_panels;
  static Tiling make(int64_t B, int64_t D) {
    const int64_t n_chunks = (B + kRowChunk - 1) / kRowChunk;
    const int64_t rows = kRowChunk * ((n_chunks + kMaxGroups - 1) / kMaxGroups);
    return {rows, (B + rows - 1) / rows, (D + kPanel - 1) / kPanel};
  }
  int64_t count() const { return n_groups * n_panels; }
  Tile at(int64_t i, int64_t B, int64_t D) const {
    const int64_t g = i / n_panels, j0 = (i % n_panels) * kPanel;
    return {g, g * group_rows, std::min(B, (g + 1) * group_rows), j0, std::min(kPanel, D - j0)};
  }
};

// Merges the groups' (mean, m2) of y = z - z[0, j] in group order (Chan) and writes the four rows
// of `stats`. part: (2, n_groups, D), mean then m2.
template <typename scalar_t, typename acc_t>
void merge_stats(const scalar_t* z, const acc_t* part, const Tiling& tiles, int64_t B, int64_t D,
                 acc_t eps, acc_t* stats) {
  const acc_t* pm = part;
  const acc_t* pm2 = part + tiles.n_groups * D;
  const acc_t inv_b = acc_t(1) / static_cast<acc_t>(B);
  at::parallel_for(0, D, 1024, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      acc_t n = acc_t(0), mean = acc_t(0), m2 = acc_t(0);
      for (int64_t g = 0; g < tiles.n_groups; ++g) {
        const int64_t rows = std::min(B, (g + 1) * tiles.group_rows) - g * tiles.group_rows;
        srd::welford_merge<acc_t>(n, mean, m2, static_cast<acc_t>(rows), pm[g * D + j],
                                  pm2[g * D + j]);
      }
      const acc_t var = m2 * inv_b;
      stats[srd::kMean * D + j] = static_cast<acc_t>(z[j]) + mean;
      stats[srd::kVar * D + j] = var;
      stats[srd::kCentre * D + j] = mean;
      stats[srd::kRstd * D + j] = srd::rstd<acc_t>(var, eps);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> srd_forward_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, double p, double eps,
    bool training, const std::optional<at::Tensor>& running_mean_s,
    const std::optional<at::Tensor>& running_var_s, const std::optional<at::Tensor>& running_mean_t,
    const std::optional<at::Tensor>& running_var_t) {
  check_inputs(student_in, teacher_in);
  srd::check_forward_args(student_in, p, training);
  const int64_t B = student_in.size(0), D = student_in.size(1);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const at::ScalarType acc = acc_type_of(student);
  const auto opts = student.options().dtype(acc);
  at::Tensor stats_s, stats_t;
  std::tie(stats_s, stats_t) = srd::forward_stats(student, teacher, training, running_mean_s,
                                                  running_var_s, running_mean_t, running_var_t,
                                                  eps, acc);
  at::Tensor sums = at::empty({4, D}, opts);
  const int ip = srd::integer_power(p);
  const Tiling tiles = Tiling::make(B, D);

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
      if (training) {
        at::Tensor part = at::empty({2, 2, tiles.n_groups, D}, opts);  // side, mean/m2, group
        acc_t* pp = part.data_ptr<acc_t>();
        const int64_t plane = tiles.n_groups * D;
        at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const Tile tl = tiles.at(i, B, D);
            acc_t* out = pp + tl.g * D + tl.j0;
            K::template tile_stats<scalar_t, acc_t>(zs, D, tl.b0, tl.b1, tl.j0, tl.w, out,
                                                     out + plane);
            K::template tile_stats<scalar_t, acc_t>(zt, D, tl.b0, tl.b1, tl.j0, tl.w,
                                                     out + 2 * plane, out + 3 * plane);
          }
        });
        merge_stats<scalar_t, acc_t>(zs, pp, tiles, B, D, static_cast<acc_t>(eps), ss);
        merge_stats<scalar_t, acc_t>(zt, pp + 2 * plane, tiles, B, D, static_cast<acc_t>(eps), st);
      }
      at::Tensor part = at::empty({tiles.n_groups, 4, D}, opts);
      acc_t* pp = part.data_ptr<acc_t>();
      at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const Tile tl = tiles.at(i, B, D);
          with_power(ip, [&]<int kIP>() {
            K::template tile_sums<scalar_t, acc_t, kIP>(zs, zt, D, tl.b0, tl.b1, tl.j0, tl.w, ss,
                                                        st, static_cast<acc_t>(p), ip,
                                                        pp + tl.g * 4 * D + tl.j0);
          });
        }
      });
      // Group partials added in group order: fixed, independent of the thread count.
      at::parallel_for(0, D, 1024, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j)
          for (int r = 0; r < 4; ++r) {
            acc_t total = acc_t(0);
            for (int64_t g = 0; g < tiles.n_groups; ++g) total += pp[(g * 4 + r) * D + j];
            sm[r * D + j] = total;
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
  const at::ScalarType acc = acc_type_of(student);
  srd::check_backward_tables(stats_s_in, stats_t_in, sums_in, D);
  const at::Tensor stats_s = stats_s_in.to(acc).contiguous();
  const at::Tensor stats_t = stats_t_in.to(acc).contiguous();
  const at::Tensor sums = sums_in.to(acc).contiguous();
  at::Tensor grad_student = at::empty_like(student);
  at::Tensor grad_teacher =
      teacher_grad ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  const int ip = srd::integer_power(p);
  const Tiling tiles = Tiling::make(B, D);

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
      at::parallel_for(0, tiles.count(), 1, [&](int64_t begin, int64_t end) {
        Side<acc_t> s_side, t_side;
        acc_t mean_h[kPanel], mean_hs[kPanel], mean_ht[kPanel];
        for (int64_t i = begin; i < end; ++i) {
          const Tile tl = tiles.at(i, B, D);
          s_side.load(zs, ss, D, tl.j0, tl.w);
          t_side.load(zt, st, D, tl.j0, tl.w);
          for (int64_t k = 0; k < tl.w; ++k) {
            mean_h[k] = sm[srd::kH * D + tl.j0 + k] * inv_b;
            mean_hs[k] = sm[srd::kHS * D + tl.j0 + k] * inv_b;
            mean_ht[k] = sm[srd::kHT * D + tl.j0 + k] * inv_b;
          }
          with_power(ip, [&]<int kIP>() {
            auto* block = training ? &K::template backward_block<scalar_t, acc_t, kIP, true>
                                   : &K::template backward_block<scalar_t, acc_t, kIP, false>;
            block(zs, zt, tl.b0, tl.b1, D, tl.j0, tl.w, s_side, t_side, mean_h, mean_hs, mean_ht,
                  c, pa, ip, gs, gt);
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
