// The byte-capped LRU sample cache: the cap, the eviction order, exact hit/miss counting, the
// disabled cache, and concurrent readers.
#include "data/sample_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "autotune/token_file.h"
#include "test_support.h"

namespace fs = std::filesystem;
using autotune::ReadMode;
using autotune::SampleCache;
using autotune::SampleCacheStats;
using autotune::SampleKey;
using autotune::Split;
using autotune::TokenFile;

namespace {

// The content a window of `key` would have: a function of the key and the position only, so a
// stale or mixed-up entry shows up as a mismatch.
std::vector<int64_t> window_for(const SampleKey& key) {
  std::vector<int64_t> w(key.length);
  for (int64_t i = 0; i < key.length; ++i)
    w[i] = static_cast<int64_t>((key.offset + i) * 31 + (key.split == Split::val ? 7 : 0)) % 256;
  return w;
}

void put(SampleCache& cache, const SampleKey& key) {
  cache.put(key, window_for(key).data());
}

bool hit(SampleCache& cache, const SampleKey& key) {
  std::vector<int64_t> out(key.length, -1);
  if (!cache.get(key, out.data())) return false;
  EXPECT_EQ(out, window_for(key)) << "offset " << key.offset << " length " << key.length;
  return true;
}

// A small real token file made by prepare-data.
std::string small_token_file(const std::string& dir) {
  std::string text;
  for (int i = 0; i < 200; ++i) text += "line " + std::to_string(i) + " of a small corpus\n";
  autotune::testing::write_file(dir + "/t.txt", text);
  autotune::prepare_token_file({dir + "/t.txt"}, dir + "/t.tok");
  return dir + "/t.tok";
}

}  // namespace

TEST(SampleCache, CapIsNeverExceededUnderRandomGets) {
  const uint64_t cap = 20 * SampleCache::entry_bytes(32);
  SampleCache cache(cap);
  std::mt19937_64 rng(42);
  uint64_t lookups = 0;
  for (int i = 0; i < 20000; ++i) {
    // 512 distinct windows of 1..16 tokens: several times what the cap holds.
    SampleKey key{rng() % 2 ? Split::train : Split::val, rng() % 16,
                  1 + static_cast<int64_t>(rng() % 16)};
    ++lookups;
    if (!hit(cache, key)) put(cache, key);
    const SampleCacheStats s = cache.stats();
    ASSERT_LE(s.bytes_in_use, cap) << "after operation " << i;
    ASSERT_EQ(s.capacity_bytes, cap);
  }
  const SampleCacheStats s = cache.stats();
  EXPECT_EQ(s.hits + s.misses, lookups);
  EXPECT_GT(s.hits, 0u);
  EXPECT_GT(s.evictions, 0u) << "the loop never filled the cache: the cap was not exercised";
  EXPECT_GT(s.bytes_in_use, cap / 2) << "a full cache should stay close to its cap";
  std::printf(
      "[cache] cap %llu B: %llu hits, %llu misses (hit rate %.3f), %llu evictions, "
      "%llu entries, %llu B in use\n",
      static_cast<unsigned long long>(cap), static_cast<unsigned long long>(s.hits),
      static_cast<unsigned long long>(s.misses), s.hit_rate(),
      static_cast<unsigned long long>(s.evictions), static_cast<unsigned long long>(s.entries),
      static_cast<unsigned long long>(s.bytes_in_use));
}

TEST(SampleCache, EvictsTheLeastRecentlyUsedFirst) {
  const SampleKey a{Split::train, 0, 4}, b{Split::train, 10, 4}, c{Split::train, 20, 4},
      d{Split::train, 30, 4}, e{Split::val, 0, 4};
  SampleCache cache(3 * SampleCache::entry_bytes(4));  // room for exactly three windows
  put(cache, a);
  put(cache, b);
  put(cache, c);
  EXPECT_EQ(cache.stats().entries, 3u);
  ASSERT_TRUE(hit(cache, a));  // a is now the most recent; b is the least
  put(cache, d);
  EXPECT_EQ(cache.stats().evictions, 1u);
  EXPECT_FALSE(hit(cache, b));
  // Touch a, c, d in that order: a becomes the least recently used.
  EXPECT_TRUE(hit(cache, a));
  EXPECT_TRUE(hit(cache, c));
  EXPECT_TRUE(hit(cache, d));
  put(cache, e);  // evicts a, the least recently touched
  EXPECT_FALSE(hit(cache, a));
  EXPECT_TRUE(hit(cache, c));
  EXPECT_TRUE(hit(cache, d));
  EXPECT_TRUE(hit(cache, e));
  EXPECT_EQ(cache.stats().evictions, 2u);
  EXPECT_EQ(cache.stats().bytes_in_use, 3 * SampleCache::entry_bytes(4));

  // Re-storing a present key refreshes it instead of charging it twice.
  put(cache, c);  // recency: d, e, c
  EXPECT_EQ(cache.stats().bytes_in_use, 3 * SampleCache::entry_bytes(4));
  put(cache, a);  // evicts d
  EXPECT_FALSE(hit(cache, d));
  EXPECT_TRUE(hit(cache, c));
}

TEST(SampleCache, ScriptedHitsAndMissesThroughATokenFile) {
  const std::string dir = autotune::testing::temp_dir("cache-script");
  auto tf = TokenFile::open(small_token_file(dir), ReadMode::pread);
  SampleCache cache(1 << 20);
  std::vector<int64_t> got(64), want(64);
  struct Step {
    Split split;
    uint64_t offset;
    int64_t length;
    bool expect_hit;
  };
  const Step script[] = {
      {Split::train, 100, 64, false},  // first time
      {Split::train, 100, 64, true},  {Split::train, 200, 64, false}, {Split::train, 100, 64, true},
      {Split::val, 100, 64, false},    // same offset, other split: another window
      {Split::train, 100, 32, false},  // same offset, other length: another window
      {Split::train, 200, 64, true},  {Split::val, 100, 64, true},
  };
  uint64_t hits = 0, misses = 0;
  for (const Step& step : script) {
    const SampleCacheStats before = cache.stats();
    cache.read(*tf, step.split, step.offset, step.length, got.data());
    tf->read(step.split, step.offset, step.length, want.data());
    EXPECT_TRUE(std::equal(got.begin(), got.begin() + step.length, want.begin()));
    const SampleCacheStats after = cache.stats();
    EXPECT_EQ(after.hits - before.hits, step.expect_hit ? 1u : 0u) << "offset " << step.offset;
    (step.expect_hit ? hits : misses)++;
  }
  const SampleCacheStats s = cache.stats();
  EXPECT_EQ(s.hits, hits);
  EXPECT_EQ(s.misses, misses);
  EXPECT_EQ(s.hits, 4u);
  EXPECT_EQ(s.misses, 4u);
  EXPECT_DOUBLE_EQ(s.hit_rate(), 0.5);
  EXPECT_EQ(s.entries, 4u);
  EXPECT_EQ(s.evictions, 0u);
  EXPECT_EQ(s.bytes_in_use, 3 * SampleCache::entry_bytes(64) + SampleCache::entry_bytes(32));

  // An out-of-range window is refused by the file and never stored.
  EXPECT_THROW(cache.read(*tf, Split::val, tf->tokens(Split::val), 1, got.data()),
               std::out_of_range);
  EXPECT_EQ(cache.stats().entries, 4u);

  cache.clear();
  EXPECT_EQ(cache.stats().bytes_in_use, 0u);
  EXPECT_EQ(cache.stats().entries, 0u);
  EXPECT_FALSE(hit(cache, SampleKey{Split::train, 100, 64}));
  fs::remove_all(dir);
}

TEST(SampleCache, CapacityZeroNeverStores) {
  SampleCache cache(0);
  const SampleKey key{Split::train, 5, 16};
  put(cache, key);
  EXPECT_FALSE(hit(cache, key));
  put(cache, key);
  EXPECT_FALSE(hit(cache, key));

  const std::string dir = autotune::testing::temp_dir("cache-zero");
  auto tf = TokenFile::open(small_token_file(dir));
  std::vector<int64_t> got(16), want(16);
  for (int i = 0; i < 3; ++i) {
    cache.read(*tf, Split::train, 40, 16, got.data());
    tf->read(Split::train, 40, 16, want.data());
    EXPECT_EQ(got, want);
  }
  const SampleCacheStats s = cache.stats();
  EXPECT_EQ(s.hits, 0u);
  EXPECT_EQ(s.misses, 5u);
  EXPECT_EQ(s.entries, 0u);
  EXPECT_EQ(s.bytes_in_use, 0u);
  EXPECT_EQ(s.evictions, 0u);
  fs::remove_all(dir);
}

TEST(SampleCache, AWindowLargerThanTheCapIsNotStoredAndEvictsNothing) {
  SampleCache cache(2 * SampleCache::entry_bytes(8));
  const SampleKey small{Split::train, 0, 8}, big{Split::train, 100, 1000};
  put(cache, small);
  put(cache, big);
  EXPECT_FALSE(hit(cache, big));
  EXPECT_TRUE(hit(cache, small));
  EXPECT_EQ(cache.stats().evictions, 0u);
  EXPECT_EQ(cache.stats().bytes_in_use, SampleCache::entry_bytes(8));
}

TEST(SampleCache, ConcurrentReadersKeepCountsCapAndContent) {
  const std::string dir = autotune::testing::temp_dir("cache-threads");
  auto tf = TokenFile::open(small_token_file(dir), ReadMode::pread);
  const uint64_t cap = 50 * SampleCache::entry_bytes(32);
  SampleCache cache(cap);
  constexpr int kThreads = 4, kReads = 5000;
  std::atomic<int> wrong{0};
  std::atomic<bool> over_cap{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<int64_t> got(32), want(32);
      for (int i = 0; i < kReads; ++i) {
        const uint64_t off = rng() % 120;
        cache.read(*tf, Split::train, off, 32, got.data());
        tf->read(Split::train, off, 32, want.data());
        if (got != want) ++wrong;
        if (cache.stats().bytes_in_use > cap) over_cap = true;
      }
    });
  }
  for (auto& th : threads) th.join();
  const SampleCacheStats s = cache.stats();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_FALSE(over_cap.load());
  EXPECT_EQ(s.hits + s.misses, static_cast<uint64_t>(kThreads * kReads));
  EXPECT_GT(s.hits, 0u);
  EXPECT_GT(s.evictions, 0u);
  EXPECT_LE(s.bytes_in_use, cap);
  EXPECT_EQ(s.bytes_in_use, s.entries * SampleCache::entry_bytes(32));
  fs::remove_all(dir);
}
