// FNV-1a 64: a short, stable digest of bytes (profile fingerprints, parameter digests). Not for
// security; equal inputs give equal digests across processes and machines.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

namespace autotune {

constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ULL;

// Continues the digest `h` over `n` bytes at `data`.
inline uint64_t fnv1a64(const void* data, size_t n, uint64_t h = kFnvOffset) {
  const auto* b = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= b[i];
    h *= 0x100000001b3ULL;
  }
  return h;
}

// 16 lower-case hex digits.
inline std::string hex16(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace autotune
