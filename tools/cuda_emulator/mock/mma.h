#pragma once
// WMMA with the documented semantics; every lane holds the whole tile (the real layout is
// opaque, so code that only loads, converts element-wise, multiplies and stores cannot tell the
// difference). Shapes: 16x16x16 for half / bfloat16, 16x16x8 for precision::tf32.
//
// TF32 (sm_80+): a fragment of precision::tf32 holds floats. __float_to_tf32 is PTX
// cvt.rna.tf32.f32 (crt/mma.h): round to nearest, ties away from zero, to 10 mantissa bits; the
// SASS adds 0x1000 to the bits of a finite value and clears the low 13. The tensor core reads
// only the top 19 bits of each operand, so mma_sync truncates (an unconverted operand shows up
// as truncation error). Products of two 11-bit significands are exact in float; the sum runs in
// float, k in order.
#include <type_traits>

#include "mock_core.h"
#include "cuda_fp16.h"
#include "cuda_bf16.h"
namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {};
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
namespace precision { struct tf32 {}; }
enum layout_t { mem_row_major, mem_col_major };

// Rows x columns of a fragment: A is M x K, B is K x N, the accumulator M x N.
template <class Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { static constexpr int R = M, C = N; };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = shape<Use, M, N, K>::R, cols = shape<Use, M, N, K>::C;
  static constexpr int num_elements = rows * cols;
  float x[num_elements];
  float& at(int r, int c) { return x[r * cols + c]; }
  float at(int r, int c) const { return x[r * cols + c]; }
};

inline uint32_t bits_of(float v) { uint32_t b; std::memcpy(&b, &v, 4); return b; }
inline float float_of(uint32_t b) { float v; std::memcpy(&v, &b, 4); return v; }
inline float __float_to_tf32(float in) {
  if (!std::isfinite(in)) return in;
  return float_of((bits_of(in) + 0x1000u) & 0xffffe000u);
}
inline float tensor_core_operand(float v, bool tf32) {
  return tf32 ? float_of(bits_of(v) & 0xffffe000u) : v;
}

inline float as_float(__half h) { return __half2float(h); }
inline float as_float(__nv_bfloat16 h) { return __bfloat162float(h); }
inline float as_float(float v) { return v; }
inline void check_ptr(const void* p, unsigned ldm, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) mock::fail("wmma pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) mock::fail("wmma ldm not a multiple of 16 bytes");
}
template <class F> void fill_fragment(F& f, float v) { for (auto& e : f.x) e = v; }
// Half / bfloat16 operands from their type, TF32 operands from float.
template <class T> struct memory_type { using type = T; };
template <> struct memory_type<precision::tf32> { using type = float; };
template <class Use, int M, int N, int K, class T, class L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const typename memory_type<T>::type* p,
                      unsigned ldm) {
  static_assert(std::is_same_v<T, precision::tf32> ? K == 8 : K == 16, "WMMA shape");
  check_ptr(p, ldm, sizeof(*p));
  for (int r = 0; r < f.rows; ++r) for (int c = 0; c < f.cols; ++c)
    f.at(r, c) = as_float(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}
template <int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, T, LA>& a,
              const fragment<matrix_b, 16, 16, K, T, LB>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  constexpr bool tf32 = std::is_same_v<T, precision::tf32>;
  float out[16 * 16];
  for (int r = 0; r < 16; ++r) for (int n = 0; n < 16; ++n) {
    float s = c.at(r, n);
    for (int k = 0; k < K; ++k)  // exact products of 16-bit or TF32 operands
      s += tensor_core_operand(a.at(r, k), tf32) * tensor_core_operand(b.at(k, n), tf32);
    out[r * 16 + n] = s;
  }
  std::memcpy(d.x, out, sizeof(out));
}
template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;  // one lane writes: the values are identical
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.at(r, c);
}
}}  // namespace nvcuda::wmma
