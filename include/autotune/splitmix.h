// splitmix64: a cheap, well-mixed 64-bit hash (Steele, Lea and Flood's SplitMix finaliser). Public
// because workload.h places samples with it; the data layer fingerprints files with it too.
#pragma once
#include <cstdint>

namespace autotune {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace autotune
