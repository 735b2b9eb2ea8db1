#pragma once
// WMMA with the documented semantics; every lane holds the whole 16x16 tile (the real layout is
// opaque, so code that only loads, multiplies and stores cannot tell the difference).
#include "mock_core.h"
#include "cuda_fp16.h"
#include "cuda_bf16.h"
namespace nvcuda { namespace wmma {
struct row_major {}; struct col_major {};
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment { float x[16][16]; };
inline float as_float(__half h) { return __half2float(h); }
inline float as_float(__nv_bfloat16 h) { return __bfloat162float(h); }
inline void check_ptr(const void* p, unsigned ldm, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) mock::fail("wmma pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) mock::fail("wmma ldm not a multiple of 16 bytes");
}
template <class F> void fill_fragment(F& f, float v) { for (auto& r : f.x) for (auto& e : r) e = v; }
template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm, sizeof(T));
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    f.x[r][c] = as_float(std::is_same_v<L, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int r = 0; r < 16; ++r) for (int n = 0; n < 16; ++n) {
    float s = c.x[r][n];
    for (int k = 0; k < 16; ++k) s += a.x[r][k] * b.x[k][n];  // exact products of 16-bit inputs
    out[r][n] = s;
  }
  std::memcpy(d.x, out, sizeof(out));
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;  // one lane writes: the values are identical
  for (int r = 0; r < 16; ++r) for (int c = 0; c < 16; ++c)
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
}
}}  // namespace nvcuda::wmma
