// CPU model of the parts of the CUDA execution model that csrc/cuda/{fkd,srd,rkd}.cu use, so that each file
// compiles unchanged with g++ and runs here (no GPU needed): blocks run one at a time, one
// std::thread per CUDA thread, std::barrier for __syncthreads and the warp shuffles. Dynamic
// shared memory starts as NaN bytes (a read before a write shows up in the results), and
// launches above 48 KB of it must have been opted in with cudaFuncSetAttribute, as on a GPU.
#pragma once
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace mock {
inline std::map<const void*, int> smem_limit;
inline unsigned char* block_smem = nullptr;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::barrier<>*> warp_barriers;
inline double warp_slots[64][32];
inline long launches = 0;
inline int sm_count = 132;  // what cudaDeviceGetAttribute(MultiProcessorCount) reports

inline void fail(const char* what) {
  std::fprintf(stderr, "EMULATION ERROR: %s\n", what);
  std::abort();
}

template <typename F>
void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, F body) {
  ++launches;
  if (smem > 48 * 1024) {
    auto it = smem_limit.find(kernel);
    if (it == smem_limit.end() || size_t(it->second) < smem) fail("dynamic smem > 48 KB without attribute");
  }
  if (smem > 227 * 1024) fail("dynamic smem over the sm_90 limit");
  // Threads are numbered x fastest, then y; warps are 32 consecutive numbers, as on a GPU.
  if (block.z != 1 || (block.x * block.y) % 32 != 0 || block.x * block.y > 1024) fail("block shape");
  gridDim = grid;
  blockDim = block;
  const unsigned n = block.x * block.y;
  std::barrier<> bar(n);
  block_barrier = &bar;
  std::vector<std::barrier<>*> wb;
  for (unsigned w = 0; w < n / 32; ++w) wb.push_back(new std::barrier<>(32));
  warp_barriers = wb;
  std::vector<unsigned char> storage(smem + 256);
  unsigned char* base = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + 127) / 128 * 128);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        // Fresh shared memory is garbage: NaN bytes make any read before write visible.
        std::memset(storage.data(), 0xFF, storage.size());
        block_smem = base;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, t / block.x);
            blockIdx = dim3(x, y, z);
            body();
          });
        for (auto& th : threads) th.join();
      }
  for (auto* b : wb) delete b;
  block_barrier = nullptr;
}

template <typename V>
V shfl_xor(V v, int mask) {
  const unsigned id = threadIdx.y * blockDim.x + threadIdx.x, warp = id / 32, lane = id % 32;
  warp_slots[warp][lane] = double(v);
  warp_barriers[warp]->arrive_and_wait();
  const V r = V(warp_slots[warp][lane ^ unsigned(mask)]);
  warp_barriers[warp]->arrive_and_wait();
  return r;
}
}  // namespace mock

inline void __syncthreads() { mock::block_barrier->arrive_and_wait(); }
template <typename V>
V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  if (mask != 0xffffffffu) mock::fail("partial shuffle mask");
  return mock::shfl_xor(v, lane_mask);
}

inline unsigned char* dynamic_smem() { return mock::block_smem; }

template <typename K>
cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    mock::smem_limit[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = mock::sm_count;
  return cudaSuccess;
}

// The .cu files take their launch syntax (launch.h defines FASTKD_LAUNCH only when it is not yet
// defined) and fkd.cu its dynamic shared memory from here.
#define FASTKD_EMULATE 1
#define FASTKD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  mock::launch(reinterpret_cast<const void*>(&kernel), dim3(grid), dim3(block), (smem), \
               [&] { kernel(__VA_ARGS__); })
