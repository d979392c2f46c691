// A byte-capped LRU cache of token windows that sits between a batch sampler and
// TokenFile::read: a window read once (an eval batch, a re-drawn offset) is served again from
// memory, and the cap bounds what the cache can ever hold (../shared/seeds/004_*).
#pragma once
#include <cstddef>
#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "autotune/token_file.h"

namespace autotune {

// One window: `length` tokens of `split` starting at token `offset` of that split.
struct SampleKey {
  Split split = Split::train;
  uint64_t offset = 0;
  int64_t length = 0;
  bool operator==(const SampleKey& o) const {
    return split == o.split && offset == o.offset && length == o.length;
  }
};

struct SampleCacheStats {
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t evictions = 0;       // entries dropped to make room (not counting clear())
  uint64_t bytes_in_use = 0;    // charged bytes of the stored entries, always <= capacity_bytes
  uint64_t capacity_bytes = 0;  // the cap; 0 means caching is disabled
  uint64_t entries = 0;
  // hits / (hits + misses); 0 before the first lookup.
  double hit_rate() const {
    const uint64_t n = hits + misses;
    return n == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(n);
  }
};

class SampleCache {
 public:
  // Bookkeeping charged per entry on top of the tokens (list node, hash node, vector header),
  // so the cap bounds the real heap use rather than only the payload.
  static constexpr uint64_t kEntryOverheadBytes = 128;
  // Bytes an entry of `length` tokens is charged: length * 8 (int64 tokens) + overhead.
  static uint64_t entry_bytes(int64_t length) {
    return static_cast<uint64_t>(length) * sizeof(int64_t) + kEntryOverheadBytes;
  }

  // capacity_bytes == 0 disables caching: every lookup misses and nothing is stored.
  explicit SampleCache(uint64_t capacity_bytes);
  SampleCache(const SampleCache&) = delete;
  SampleCache& operator=(const SampleCache&) = delete;

  // On a hit copies the window's key.length tokens into `out`, marks it most recently used and
  // returns true; on a miss returns false. Either way the lookup is counted.
  bool get(const SampleKey& key, int64_t* out);

  // Stores a copy of key.length tokens from `data` as the most recently used entry, evicting
  // least recently used entries until it fits. An entry larger than the whole cap is not stored
  // (and evicts nothing). Storing an existing key refreshes it. Not counted as a hit or miss.
  void put(const SampleKey& key, const int64_t* data);

  // The read-through path for samplers: same contract as TokenFile::read, served from the cache
  // when possible; on a miss reads from `file` (outside the lock) and stores the window.
  void read(const TokenFile& file, Split split, uint64_t offset, int64_t count, int64_t* out);

  SampleCacheStats stats() const;
  uint64_t capacity_bytes() const { return capacity_bytes_; }
  // Drops every entry (bytes_in_use becomes 0); counters are kept.
  void clear();

 private:
  struct KeyHash {
    size_t operator()(const SampleKey& k) const;
  };
  struct Entry {
    SampleKey key;
    std::vector<int64_t> tokens;
  };
  void evict_lru_locked();

  const uint64_t capacity_bytes_;
  mutable std::mutex mu_;
  std::list<Entry> lru_;  // front: most recently used
  std::unordered_map<SampleKey, std::list<Entry>::iterator, KeyHash> index_;
  uint64_t bytes_in_use_ = 0;
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

}  // namespace autotune
