#include "data/sample_cache.h"

#include <algorithm>
#include <stdexcept>

namespace autotune {

size_t SampleCache::KeyHash::operator()(const SampleKey& k) const {
  // splitmix64 finaliser over the packed key: offsets of random windows are spread over the
  // whole file, so a plain xor would collide on aligned offsets.
  uint64_t h = k.offset * 0x9E3779B97F4A7C15ULL;
  h ^= static_cast<uint64_t>(k.length) + 0x632BE59BD9B4E019ULL + (h << 6) + (h >> 2);
  h ^= static_cast<uint64_t>(k.split == Split::val);
  h ^= h >> 30;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBULL;
  h ^= h >> 31;
  return static_cast<size_t>(h);
}

SampleCache::SampleCache(uint64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}

bool SampleCache::get(const SampleKey& key, int64_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(key);
  if (it == index_.end()) {
    ++misses_;
    return false;
  }
  ++hits_;
  lru_.splice(lru_.begin(), lru_, it->second);
  const auto& tokens = it->second->tokens;
  std::copy(tokens.begin(), tokens.end(), out);
  return true;
}

void SampleCache::evict_lru_locked() {
  const Entry& victim = lru_.back();
  bytes_in_use_ -= entry_bytes(victim.key.length);
  index_.erase(victim.key);
  lru_.pop_back();
  ++evictions_;
}

void SampleCache::put(const SampleKey& key, const int64_t* data) {
  if (key.length < 0) throw std::invalid_argument("SampleCache::put: negative window length");
  const uint64_t need = entry_bytes(key.length);
  if (need > capacity_bytes_) return;  // also covers capacity 0
  // Copy before taking the lock: the copy is the slow part and needs no shared state.
  std::vector<int64_t> tokens(data, data + key.length);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = index_.find(key);
  if (it != index_.end()) {
    // Two readers missed the same window at once; the tokens are identical, just refresh.
    lru_.splice(lru_.begin(), lru_, it->second);
    return;
  }
  while (bytes_in_use_ + need > capacity_bytes_) evict_lru_locked();
  lru_.push_front(Entry{key, std::move(tokens)});
  index_.emplace(key, lru_.begin());
  bytes_in_use_ += need;
}

void SampleCache::read(const TokenFile& file, Split split, uint64_t offset, int64_t count,
                       int64_t* out) {
  const SampleKey key{split, offset, count};
  if (get(key, out)) return;
  file.read(split, offset, count, out);
  put(key, out);
}

SampleCacheStats SampleCache::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  SampleCacheStats s;
  s.hits = hits_;
  s.misses = misses_;
  s.evictions = evictions_;
  s.bytes_in_use = bytes_in_use_;
  s.capacity_bytes = capacity_bytes_;
  s.entries = lru_.size();
  return s;
}

void SampleCache::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  index_.clear();
  lru_.clear();
  bytes_in_use_ = 0;
}

}  // namespace autotune
