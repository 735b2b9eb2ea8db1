// Host-side file I/O shared by the emulator drivers (fkd_, srd_, rkd_emulator.cpp): raw
// buffers in and out of the Python checker, and NaN-filled allocations standing in for
// uninitialised device memory.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "mock_core.h"

namespace emulator_io {

inline std::vector<unsigned char> read_file(const std::string& path, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) mock::fail(path.c_str());
  std::vector<unsigned char> data(bytes);
  if (std::fread(data.data(), 1, bytes, f) != bytes) mock::fail("short read");
  std::fclose(f);
  return data;
}

inline void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) mock::fail(path.c_str());
  std::fwrite(data, 1, bytes, f);
  std::fclose(f);
}

// Exactly `bytes` long (AddressSanitizer sees any overrun), all 0xFF bytes (NaN in every dtype).
inline void* garbage(size_t bytes) {
  void* p = std::malloc(bytes ? bytes : 1);
  std::memset(p, 0xFF, bytes);
  return p;
}

}  // namespace emulator_io
