// The data path with bounded memory (issue 5): batches do not depend on the read mode, the cache
// or the loader thread; the cache cap holds and its counts are reported; the loader predicts,
// hands out, discards and re-throws correctly and stops cleanly; pread keeps resident memory flat
// over a long read of a file larger than any cap. Also prints the throughput of train_batch in
// each mode (figures, not assertions).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/errors.h"
#include "autotune/gpt_workload.h"
#include "autotune/memory.h"
#include "autotune/token_file.h"
#include "data/batch_loader.h"
#include "data/sample_cache.h"
#include "memory/cpu_allocator.h"
#include "test_support.h"

namespace fs = std::filesystem;
namespace tu = autotune::testing;
using autotune::Batch;
using autotune::BatchKey;
using autotune::BatchLoader;
using autotune::DataOptions;
using autotune::DataStats;
using autotune::GptWorkload;
using autotune::load_gpt_config;
using autotune::Plan;
using autotune::PrefetchStats;
using autotune::ReadMode;
using autotune::SampleCache;
using autotune::Split;
using autotune::TokenFile;
using autotune::TokenFileHeader;

namespace {

constexpr uint64_t kSeed = 11;

const char* mode_name(ReadMode m) {
  return m == ReadMode::mmap ? "mmap" : "pread";
}

std::string describe(const DataOptions& o) {
  return std::string(mode_name(o.read_mode)) + " cache=" + std::to_string(o.cache_bytes) +
         " prefetch=" + std::to_string(o.prefetch_batches);
}

// Resident set size of this process in bytes (VmRSS, /proc/self/status).
int64_t vm_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;  // kB
  ADD_FAILURE() << "no VmRSS in /proc/self/status";
  return 0;
}

double mib(int64_t bytes) {
  return static_cast<double>(bytes) / 1048576.0;
}

// A request as the trainer or the tuner makes it. seq_len 0 is the model's default.
struct Request {
  bool val = false;
  int64_t step = 0, first = 0, count = 0, seq_len = 0;
};

Batch ask(GptWorkload& w, const Request& r) {
  Plan plan;
  plan.seq_len = r.seq_len;
  return r.val ? w.val_batch(r.first, r.count, plan, torch::kCPU)
               : w.train_batch(r.step, r.first, r.count, plan, torch::kCPU);
}

// Several steps of micro-batches with every change of pattern the trainer and the tuner make:
// grad accumulation, evaluation in between, an OOM re-run of a step with a smaller micro-batch,
// a plan without accumulation, a new trial from step 0 with another seq_len, a request nothing
// predicts, and a repeated step.
std::vector<Request> request_pattern() {
  std::vector<Request> r;
  auto train = [&](int64_t step, int64_t first, int64_t count, int64_t T = 0) {
    r.push_back({false, step, first, count, T});
  };
  for (int64_t s = 0; s < 4; ++s)
    for (int64_t m = 0; m < 3; ++m) train(s, 4 * m, 4);  // global 12 = 3 x 4
  r.push_back({true, 0, 0, 4, 0});
  r.push_back({true, 0, 4, 4, 0});
  train(4, 0, 4);
  train(4, 4, 4);  // OOM in the next micro-batch: step 4 again with micro-batches of 2
  for (int64_t m = 0; m < 6; ++m) train(4, 2 * m, 2);
  for (int64_t s = 5; s < 7; ++s)
    for (int64_t m = 0; m < 6; ++m) train(s, 2 * m, 2);
  for (int64_t s = 7; s < 10; ++s) train(s, 0, 12);  // grad_accum 1
  r.push_back({true, 0, 0, 4, 0});                   // the same eval windows again
  for (int64_t s = 0; s < 3; ++s)
    for (int64_t m = 0; m < 2; ++m) train(s, 6 * m, 6, 32);  // a new trial, T = 32
  train(20, 3, 5);                                           // predicted by nothing
  for (int64_t s = 10; s < 13; ++s)
    for (int64_t m = 0; m < 4; ++m) train(s, 3 * m, 3);
  train(12, 0, 3);  // the same step again
  train(12, 3, 3);
  train(12, 6, 3);
  train(12, 9, 3);
  // The next step, exactly as predicted but with a shorter seq_len (a plan change between
  // steps): a batch built for the old length must not be handed out.
  for (int64_t m = 0; m < 4; ++m) train(13, 3 * m, 3, 32);
  return r;
}

std::unique_ptr<GptWorkload> tiny_workload(const DataOptions* options = nullptr) {
  auto w = std::make_unique<GptWorkload>(load_gpt_config("gpt-tiny"),
                                         TokenFile::open(tu::corpus_path()), kSeed);
  if (options) w->set_data_options(*options);
  return w;
}

void expect_same(const Batch& want, const Batch& got, const std::string& what) {
  ASSERT_TRUE(got.input().defined() && got.target().defined()) << what;
  EXPECT_EQ(got.input().sizes(), want.input().sizes()) << what;
  EXPECT_EQ(got.input().scalar_type(), torch::kInt64) << what;
  EXPECT_TRUE(torch::equal(got.input(), want.input())) << what << ": inputs differ";
  EXPECT_TRUE(torch::equal(got.target(), want.target())) << what << ": targets differ";
}

// Waits (up to 5 s) until the loader holds every batch it predicted, as if a training step had
// given it the time. False if it never does.
bool wait_prefetched(const GptWorkload& w) {
  const auto n = static_cast<uint64_t>(w.data_options().prefetch_batches);
  for (int i = 0; i < 5000; ++i) {
    if (w.data_stats().prefetch_ready >= n) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

std::string request_name(size_t i, const Request& r) {
  return "request " + std::to_string(i) +
         (r.val ? " val" : " train step " + std::to_string(r.step)) + " [" +
         std::to_string(r.first) + ", +" + std::to_string(r.count) +
         ") T=" + std::to_string(r.seq_len);
}

}  // namespace

// ---- (a) the same batches whatever the data path -----------------------------------------------

TEST(DataPath, BatchesIdenticalWithAndWithoutCachePrefetchAndPread) {
  const auto pattern = request_pattern();
  auto ref = tiny_workload();
  ASSERT_EQ(ref->data().mode(), ReadMode::mmap);
  std::vector<Batch> want;
  for (const auto& r : pattern) want.push_back(ask(*ref, r));
  int64_t train_requests = 0;
  for (const auto& r : pattern) train_requests += r.val ? 0 : 1;

  const DataOptions variants[] = {
      {ReadMode::pread, 0, 0}, {ReadMode::mmap, 1 << 20, 0},   {ReadMode::pread, 0, 1},
      {ReadMode::mmap, 0, 2},  {ReadMode::pread, 64 << 10, 3},  // a cap smaller than the windows
                                                                // read: evictions too
  };
  for (const DataOptions& o : variants) {
    // Back to back (the caller usually beats the thread: late batches, waits on a batch being
    // built) and with time between requests (the thread is in time: hits).
    for (bool in_time : {false, true}) {
      if (in_time && o.prefetch_batches == 0) continue;
      SCOPED_TRACE(describe(o) + (in_time ? " in time" : " back to back"));
      auto w = tiny_workload(&o);
      EXPECT_EQ(w->data().mode(), o.read_mode);
      for (size_t i = 0; i < pattern.size(); ++i) {
        expect_same(want[i], ask(*w, pattern[i]), request_name(i, pattern[i]));
        if (in_time) ASSERT_TRUE(wait_prefetched(*w)) << request_name(i, pattern[i]);
      }
      const DataStats s = w->data_stats();
      EXPECT_EQ(s.read_mode, o.read_mode);
      if (o.prefetch_batches > 0) {
        // The pattern was learned (else this test would prove nothing about the loader), and
        // its changes really missed.
        EXPECT_EQ(s.prefetch_hits + s.prefetch_misses, static_cast<uint64_t>(train_requests));
        EXPECT_GT(s.prefetch_hits + s.prefetch_late, static_cast<uint64_t>(train_requests) / 2);
        EXPECT_GT(s.prefetch_misses - s.prefetch_late, 0u);
        if (in_time) {
          EXPECT_EQ(s.prefetch_late, 0u);
          EXPECT_GT(s.prefetch_hits, static_cast<uint64_t>(train_requests) / 2);
        }
      } else {
        EXPECT_EQ(s.prefetch_hits + s.prefetch_misses, 0u);
      }
      if (o.cache_bytes > 0) {
        EXPECT_GT(s.cache_hits, 0u);  // the eval windows and the re-run steps
        EXPECT_LE(s.cache_bytes_in_use, o.cache_bytes);
      }
    }
  }
}

TEST(DataPath, ChangingOptionsMidRunKeepsBatchesIdentical) {
  // set_data_options between any two requests (with batches built ahead, a thread running):
  // the loader stops cleanly, the file is reopened, and nothing changes in the batches.
  const auto pattern = request_pattern();
  auto ref = tiny_workload();
  auto w = tiny_workload();
  const DataOptions cycle[] = {{ReadMode::pread, 0, 2},
                               {ReadMode::mmap, 32 << 10, 1},
                               {ReadMode::mmap, 32 << 10, 3},
                               {ReadMode::pread, 1 << 20, 0},
                               {ReadMode::mmap, 0, 0}};
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (i % 3 == 0) w->set_data_options(cycle[(i / 3) % 5]);
    expect_same(ask(*ref, pattern[i]), ask(*w, pattern[i]), request_name(i, pattern[i]));
    // Sometimes with batches built ahead when the options change.
    if (i % 2 == 0) ASSERT_TRUE(wait_prefetched(*w));
  }
  EXPECT_GT(w->data_stats().prefetch_hits, 0u);
}

TEST(DataPath, MicroBatchesConcatenateToTheGlobalBatchWithPrefetch) {
  const DataOptions o{ReadMode::pread, 0, 2};
  auto w = tiny_workload(&o);
  auto ref = tiny_workload();
  Plan plan;
  for (int64_t step = 0; step < 5; ++step) {
    std::vector<torch::Tensor> parts;
    for (int64_t m = 0; m < 4; ++m) {
      parts.push_back(w->train_batch(step, 2 * m, 2, plan, torch::kCPU).input());
      ASSERT_TRUE(wait_prefetched(*w));
    }
    EXPECT_TRUE(
        torch::equal(torch::cat(parts), ref->train_batch(step, 0, 8, plan, torch::kCPU).input()))
        << "step " << step;
  }
  // All but the first: two ahead cover the step boundary before the global batch is known.
  EXPECT_EQ(w->data_stats().prefetch_hits, 19u);
  EXPECT_EQ(w->data_stats().prefetch_misses, 1u);
}

TEST(DataPath, DefaultsAreThePlainPathAndBadOptionsAreRefused) {
  auto w = tiny_workload();
  const DataOptions& o = w->data_options();
  EXPECT_EQ(o.read_mode, ReadMode::mmap);
  EXPECT_EQ(o.cache_bytes, 0u);
  EXPECT_EQ(o.prefetch_batches, 0);
  Plan plan;
  w->train_batch(0, 0, 4, plan, torch::kCPU);
  const DataStats s = w->data_stats();
  EXPECT_EQ(s.cache_capacity_bytes, 0u);
  EXPECT_EQ(s.cache_hits + s.cache_misses, 0u);
  EXPECT_EQ(s.prefetch_batches, 0);
  EXPECT_EQ(s.prefetch_hits + s.prefetch_misses, 0u);

  EXPECT_THROW(w->set_data_options({ReadMode::pread, 0, -1}), autotune::UsageError);
  EXPECT_EQ(w->data().mode(), ReadMode::mmap);  // a refused change changes nothing

  // A token file that cannot be reopened (gone) leaves the workload on the old one.
  const std::string dir = tu::temp_dir("data-path-gone");
  fs::copy_file(tu::corpus_path(), dir + "/c.tok");
  GptWorkload g(load_gpt_config("gpt-tiny"), TokenFile::open(dir + "/c.tok"), kSeed);
  fs::remove(dir + "/c.tok");
  EXPECT_THROW(g.set_data_options({ReadMode::pread, 0, 1}), autotune::UsageError);
  EXPECT_EQ(g.data().mode(), ReadMode::mmap);
  EXPECT_EQ(g.data_options().prefetch_batches, 0);
  EXPECT_NO_THROW(g.train_batch(0, 0, 2, plan, torch::kCPU));
  fs::remove_all(dir);
}

// ---- (b) the cache cap and the counts ----------------------------------------------------------

TEST(DataPath, CacheCapRespectedAndCountsReported) {
  const int64_t T = load_gpt_config("gpt-tiny").seq_len;
  const uint64_t entry = SampleCache::entry_bytes(T + 1);
  const uint64_t cap = 6 * entry + entry / 2;  // room for 6 windows, not 7
  const DataOptions o{ReadMode::pread, cap, 0};
  auto w = tiny_workload(&o);
  Plan plan;

  w->val_batch(0, 4, plan, torch::kCPU);
  DataStats s = w->data_stats();
  EXPECT_EQ(s.cache_misses, 4u);
  EXPECT_EQ(s.cache_hits, 0u);
  EXPECT_EQ(s.cache_entries, 4u);
  EXPECT_EQ(s.cache_bytes_in_use, 4 * entry);
  EXPECT_EQ(s.cache_capacity_bytes, cap);

  w->val_batch(0, 4, plan, torch::kCPU);  // the next evaluation: served from memory
  s = w->data_stats();
  EXPECT_EQ(s.cache_hits, 4u);
  EXPECT_EQ(s.cache_misses, 4u);

  w->train_batch(0, 0, 4, plan, torch::kCPU);
  w->train_batch(0, 0, 4, plan, torch::kCPU);  // an OOM re-run of step 0: the same windows
  s = w->data_stats();
  EXPECT_EQ(s.cache_hits, 8u);
  EXPECT_EQ(s.cache_misses, 8u);
  EXPECT_EQ(s.cache_entries, 6u);
  EXPECT_EQ(s.cache_evictions, 2u);

  for (int64_t step = 1; step <= 50; ++step) {
    w->train_batch(step, 0, 4, plan, torch::kCPU);
    s = w->data_stats();
    ASSERT_LE(s.cache_bytes_in_use, cap) << "step " << step;
    ASSERT_LE(s.cache_entries, 6u);
  }
  s = w->data_stats();
  EXPECT_EQ(s.cache_hits, 8u);
  EXPECT_EQ(s.cache_misses, 8u + 200u);
  // Every miss stores its window; the cap keeps 6.
  EXPECT_EQ(s.cache_evictions, s.cache_misses - 6);
  EXPECT_EQ(s.cache_bytes_in_use, 6 * entry);
  EXPECT_DOUBLE_EQ(s.cache_hit_rate(), 8.0 / 216.0);
  std::printf(
      "[cache] cap %llu B (6 windows of %lld tokens): hits %llu misses %llu evictions %llu "
      "hit rate %.3f, %llu B in use\n",
      static_cast<unsigned long long>(cap), static_cast<long long>(T + 1),
      static_cast<unsigned long long>(s.cache_hits),
      static_cast<unsigned long long>(s.cache_misses),
      static_cast<unsigned long long>(s.cache_evictions), s.cache_hit_rate(),
      static_cast<unsigned long long>(s.cache_bytes_in_use));

  // Turning the cache off frees it; the counts so far stay in the report.
  w->set_data_options({ReadMode::pread, 0, 0});
  s = w->data_stats();
  EXPECT_EQ(s.cache_capacity_bytes, 0u);
  EXPECT_EQ(s.cache_bytes_in_use, 0u);
  EXPECT_EQ(s.cache_hits, 8u);
  EXPECT_EQ(s.cache_misses, 208u);
}

TEST(DataPath, CacheCountsEveryWindowOnceWithTheLoaderThreadReadingToo) {
  // The loader thread and the caller both read through the cache: every window is looked up
  // exactly once, whichever thread builds its batch.
  const DataOptions o{ReadMode::mmap, 1 << 20, 2};
  auto w = tiny_workload(&o);
  Plan plan;
  const auto pattern = request_pattern();
  uint64_t windows = 0;
  for (const auto& r : pattern) {
    ask(*w, r);
    windows += static_cast<uint64_t>(r.count);
  }
  // Batches built ahead and never asked for were looked up too.
  const DataStats s = w->data_stats();
  EXPECT_GE(s.cache_hits + s.cache_misses, windows);
  EXPECT_LE(s.cache_bytes_in_use, o.cache_bytes);
  EXPECT_GT(s.cache_hits, 0u);
}

// ---- the loader on its own
// -----------------------------------------------------------------------

namespace {

// A batch whose every value is a function of its key and position, like a real one.
torch::Tensor batch_for(const BatchKey& k) {
  auto t = torch::empty({k.count, k.seq_len + 1}, torch::kInt64);
  auto* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i)
    p[i] = (k.step * 1000003 + (k.first + i / (k.seq_len + 1)) * 1009 + i % (k.seq_len + 1)) % 257;
  return t;
}

std::vector<BatchKey> trainer_requests(int64_t steps, int64_t global, int64_t micro, int64_t T) {
  std::vector<BatchKey> r;
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t f = 0; f < global; f += micro) r.push_back({s, f, micro, T});
  return r;
}

}  // namespace

TEST(BatchLoader, PredictsTheNextMicroBatchAndTheNextStep) {
  using V = std::vector<BatchKey>;
  // Global batch known: the rest of the step, then the next step from sample 0.
  EXPECT_EQ(BatchLoader::predict({3, 0, 4, 64}, 12, 3),
            (V{{3, 4, 4, 64}, {3, 8, 4, 64}, {4, 0, 4, 64}}));
  EXPECT_EQ(BatchLoader::predict({3, 8, 4, 64}, 12, 2), (V{{4, 0, 4, 64}, {4, 4, 4, 64}}));
  EXPECT_EQ(BatchLoader::predict({3, 0, 8, 64}, 8, 2), (V{{4, 0, 8, 64}, {5, 0, 8, 64}}));
  // A micro-batch never runs past the global batch.
  EXPECT_EQ(BatchLoader::predict({3, 0, 4, 64}, 6, 2), (V{{3, 4, 2, 64}, {4, 0, 4, 64}}));
  // Unknown (or contradicted) global batch: continuation first, then the next step.
  EXPECT_EQ(BatchLoader::predict({3, 4, 4, 64}, 0, 3),
            (V{{3, 8, 4, 64}, {4, 0, 4, 64}, {4, 4, 4, 64}}));
  EXPECT_EQ(BatchLoader::predict({3, 8, 8, 64}, 12, 1), (V{{3, 16, 8, 64}}));
  EXPECT_TRUE(BatchLoader::predict({3, 0, 0, 64}, 12, 2).empty());
  // A rank's share [8, 16) of a global batch of 16: the next step starts at 8 again.
  EXPECT_EQ(BatchLoader::predict({3, 12, 4, 64}, 16, 2, 8), (V{{4, 8, 4, 64}, {4, 12, 4, 64}}));
  EXPECT_EQ(BatchLoader::predict({3, 8, 4, 64}, 0, 2, 8), (V{{3, 12, 4, 64}, {4, 8, 4, 64}}));
}

TEST(BatchLoader, HitsAndMissesFollowTheRequestPattern) {
  std::atomic<int64_t> produced{0};
  auto producer = [&](const BatchKey& k, const std::atomic<bool>&) {
    ++produced;
    return batch_for(k);
  };
  struct Case {
    int64_t max_batches, global, micro;
    uint64_t misses;  // the pattern is learned at the first step boundary
  };
  // accum 3, one ahead: (0,0) misses; (0,4),(0,8) hit; (1,0) misses (global unknown); then all hit.
  // accum 3, two ahead: the guess "next step" covers the boundary: only (0,0) misses.
  // accum 1, one ahead: (0,0) and (1,0) miss. accum 1, two ahead: only (0,0).
  const Case cases[] = {{1, 12, 4, 2}, {2, 12, 4, 1}, {1, 8, 8, 2}, {2, 8, 8, 1}, {4, 16, 2, 1}};
  for (const Case& c : cases) {
    for (bool in_time : {true, false}) {
      SCOPED_TRACE("ahead " + std::to_string(c.max_batches) + " global " +
                   std::to_string(c.global) + " micro " + std::to_string(c.micro) +
                   (in_time ? " in time" : " back to back"));
      BatchLoader loader(producer, c.max_batches);
      const auto reqs = trainer_requests(10, c.global, c.micro, 16);
      for (const auto& k : reqs) {
        ASSERT_TRUE(torch::equal(loader.get(k), batch_for(k)));
        if (in_time) loader.wait_idle();
        const PrefetchStats s = loader.stats();
        ASSERT_LE(s.ready + s.in_flight, static_cast<uint64_t>(c.max_batches));
      }
      const PrefetchStats s = loader.stats();
      EXPECT_EQ(s.misses - s.late, c.misses);  // requests no prediction matched
      EXPECT_EQ(s.hits + s.misses, reqs.size());
      if (in_time) {
        EXPECT_EQ(s.late, 0u);
        EXPECT_EQ(s.hits, reqs.size() - c.misses);
      }
      EXPECT_EQ(loader.global_batch(), c.global);
    }
  }
}

TEST(BatchLoader, PatternChangesDiscardStaleBatchesAndAreRelearned) {
  BatchLoader loader([](const BatchKey& k, const std::atomic<bool>&) { return batch_for(k); }, 2);
  auto get = [&](const BatchKey& k) {
    EXPECT_TRUE(torch::equal(loader.get(k), batch_for(k)));
    loader.wait_idle();  // the thread is in time: what was predicted is a hit
  };
  for (const auto& k : trainer_requests(3, 12, 4, 16)) get(k);
  EXPECT_EQ(loader.global_batch(), 12);
  // OOM at (3, 8): step 3 re-run with micro-batches of 2; (3, 8) and (4, 0) were built for
  // nothing.
  get({3, 0, 4, 16});
  get({3, 4, 4, 16});
  const PrefetchStats before = loader.stats();
  EXPECT_EQ(before.ready, 2u);
  for (int64_t f = 0; f < 12; f += 2) get({3, f, 2, 16});
  PrefetchStats s = loader.stats();
  EXPECT_EQ(s.discarded, before.discarded + 2);
  EXPECT_EQ(s.misses, before.misses + 1);  // only the first request of the new pattern
  for (int64_t f = 0; f < 12; f += 2) get({4, f, 2, 16});
  s = loader.stats();
  EXPECT_EQ(loader.global_batch(), 12);
  EXPECT_EQ(s.misses, before.misses + 1);
  EXPECT_EQ(s.late, 0u);
}

TEST(BatchLoader, ProducerExceptionIsRethrownOnTheRequestItBelongsTo) {
  std::atomic<bool> thrown_on_loader_thread{false};
  const auto caller = std::this_thread::get_id();
  // Steps 3 and 100 fail only when built on the loader thread (like an allocation refused under
  // a cap at that moment), so the error seen must be the thread's own, not a rebuild's.
  auto producer = [&](const BatchKey& k, const std::atomic<bool>&) -> torch::Tensor {
    if ((k.step == 3 || k.step == 100) && std::this_thread::get_id() != caller) {
      thrown_on_loader_thread = true;
      throw autotune::RuntimeError("cannot read step " + std::to_string(k.step));
    }
    if (k.first == 4) throw autotune::RuntimeError("cannot read on the caller's thread");
    return batch_for(k);
  };
  BatchLoader loader(producer, 2);
  for (int64_t s = 0; s < 3; ++s) {
    EXPECT_NO_THROW(loader.get({s, 0, 4, 8}));
    loader.wait_idle();  // step 3 is built (and fails) on the thread before it is asked for
  }
  EXPECT_TRUE(thrown_on_loader_thread.load());
  try {
    loader.get({3, 0, 4, 8});
    ADD_FAILURE() << "the error of step 3 was not re-thrown";
  } catch (const autotune::RuntimeError& e) {  // the producer's own type and message
    EXPECT_STREQ(e.what(), "cannot read step 3");
  }
  EXPECT_EQ(loader.stats().hits, 3u);  // steps 1, 2 and the failed 3 came from the thread
  // The loader goes on after the failure.
  EXPECT_TRUE(torch::equal(loader.get({4, 0, 4, 8}), batch_for({4, 0, 4, 8})));
  EXPECT_TRUE(torch::equal(loader.get({5, 0, 4, 8}), batch_for({5, 0, 4, 8})));

  // A failing batch that is predicted but never asked for is never thrown.
  thrown_on_loader_thread = false;
  loader.get({98, 0, 4, 8});
  loader.get({99, 0, 4, 8});  // predicts step 100 (fails on the thread) and 101
  loader.wait_idle();
  EXPECT_TRUE(thrown_on_loader_thread.load());
  EXPECT_NO_THROW(loader.get({0, 0, 4, 8}));
  EXPECT_NO_THROW(loader.get({1, 0, 4, 8}));
  // A failure on the caller's thread (a miss) propagates as usual.
  try {
    loader.get({7, 4, 4, 8});
    ADD_FAILURE() << "no error on the caller's thread";
  } catch (const autotune::RuntimeError& e) {
    EXPECT_STREQ(e.what(), "cannot read on the caller's thread");
  }
}

TEST(BatchLoader, StopsPromptlyWhileBuilding) {
  // Batches are slow (0.3 s) on the loader thread only, and the loader is destroyed while it is
  // building one: with a producer that honours `cancel` (as GptWorkload's does, per window)
  // and with one that does not.
  const auto caller = std::this_thread::get_id();
  for (bool honours_cancel : {true, false}) {
    SCOPED_TRACE(honours_cancel ? "honours cancel" : "ignores cancel");
    std::atomic<int> started{0};
    auto producer = [&](const BatchKey& k, const std::atomic<bool>& cancel) -> torch::Tensor {
      if (std::this_thread::get_id() == caller) return batch_for(k);
      ++started;
      for (int i = 0; i < 300; ++i) {
        if (honours_cancel && cancel.load()) return torch::Tensor();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      return batch_for(k);
    };
    std::chrono::steady_clock::time_point t0;
    {
      BatchLoader loader(producer, 3);
      loader.get({0, 0, 2, 4});
      while (started.load() < 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      t0 = std::chrono::steady_clock::now();
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // Cancelled: the next 1 ms check. Not: the rest of that one batch, and no other started.
    EXPECT_LT(s, honours_cancel ? 0.1 : 0.5);
    EXPECT_EQ(started.load(), 1);
  }
  // Never used: starts and stops. A bound of 0 is refused.
  {
    BatchLoader idle([](const BatchKey& k, const std::atomic<bool>&) { return batch_for(k); }, 1);
  }
  EXPECT_THROW(
      BatchLoader([](const BatchKey& k, const std::atomic<bool>&) { return batch_for(k); }, 0),
      std::invalid_argument);
}

TEST(BatchLoader, RandomRequestPatternsMatchSynchronousAndHoldAtMostTheBound) {
  // Buffers made with a deleter count how many batches exist at once.
  std::atomic<int64_t> live{0};
  auto producer = [&](const BatchKey& k, const std::atomic<bool>&) {
    torch::Tensor t = batch_for(k);
    auto* keep = new torch::Tensor(t);
    ++live;
    return torch::from_blob(
        t.data_ptr(), t.sizes(),
        [keep, &live](void*) {
          delete keep;
          --live;
        },
        torch::kInt64);
  };
  std::mt19937_64 rng(7);
  for (int64_t bound : {1, 2, 4}) {
    BatchLoader loader(producer, bound);
    int64_t step = 0, first = 0, micro = 4, global = 12, seq_len = 8, worst = 0;
    for (int i = 0; i < 3000; ++i) {
      // Mostly the trainer's order, sometimes a jump, a re-run or a new micro-batch.
      const uint64_t dice = rng() % 100;
      if (dice < 3) {
        step = static_cast<int64_t>(rng() % 50);
        first = 0;
      } else if (dice < 6) {
        micro = 1 + static_cast<int64_t>(rng() % 6);
        global = micro * (1 + static_cast<int64_t>(rng() % 4));
        first = 0;
      } else if (dice < 8) {
        first = 0;  // re-run this step
      } else if (dice < 10) {
        seq_len = seq_len == 8 ? 5 : 8;  // another plan, the pattern unchanged
      }
      const BatchKey k{step, first, micro, seq_len};
      {
        torch::Tensor got = loader.get(k);
        ASSERT_TRUE(torch::equal(got, batch_for(k))) << "request " << i;
      }
      if (rng() % 2 == 0) loader.wait_idle();
      worst = std::max<int64_t>(worst, live.load());
      first += micro;
      if (first >= global) {
        first = 0;
        ++step;
      }
    }
    const PrefetchStats s = loader.stats();
    EXPECT_EQ(s.hits + s.misses, 3000u);
    EXPECT_GT(s.predicted_rate(), 0.8);
    EXPECT_GT(s.hits, 0u);
    // What the loader holds, plus the one batch that may still be finishing after it was dropped.
    EXPECT_LE(worst, bound + 1) << "bound " << bound;
    std::printf(
        "[loader] bound %lld: predicted %.3f, hit rate %.3f, %llu discarded, at most %lld "
        "batches alive\n",
        static_cast<long long>(bound), s.predicted_rate(), s.hit_rate(),
        static_cast<unsigned long long>(s.discarded), static_cast<long long>(worst));
  }
  EXPECT_EQ(live.load(), 0);
}

TEST(DataPath, LoaderBuffersAreCountedByTheCpuAllocator) {
  autotune::cpu_alloc::install();
  const auto cfg = load_gpt_config("gpt-tiny");
  const int64_t T = cfg.seq_len, count = 8;
  const int64_t batch_bytes = count * (T + 1) * static_cast<int64_t>(sizeof(int64_t));
  auto w = tiny_workload();
  Plan plan;
  w->train_batch(0, 0, count, plan, torch::kCPU);  // first-use allocations, before the baseline
  const int64_t before = autotune::cpu_alloc::current_bytes();
  w->set_data_options({ReadMode::pread, 0, 2});
  w->train_batch(1, 0, count, plan, torch::kCPU);  // returned and freed at once
  int i = 0;
  for (; i < 400 && w->data_stats().prefetch_ready < 2; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(w->data_stats().prefetch_ready, 2u);
  const int64_t held = autotune::cpu_alloc::current_bytes() - before;
  std::printf("[loader] 2 batches ahead of %lld B each: the CPU allocator counts %lld B more\n",
              static_cast<long long>(batch_bytes), static_cast<long long>(held));
  EXPECT_GE(held, 2 * batch_bytes);
  EXPECT_LT(held, 2 * batch_bytes + 4096);
  w->set_data_options({ReadMode::pread, 0, 0});  // the loader and its batches go
  EXPECT_LE(autotune::cpu_alloc::current_bytes() - before, 0);
}

// ---- (c) resident memory over a long read, and (5) throughput ----------------------------------

namespace {

// A token file of 36 Mi random byte tokens (72 MiB): larger than any cap used here, and large
// enough that windows touched at random through a memory map show up in VmRSS.
class BigTokenFile : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(tu::temp_dir("data-path-big"));
    path_ = new std::string(*dir_ + "/big.tok");
    const uint64_t total = 36ull << 20;
    TokenFileHeader h{};
    std::memcpy(h.magic, autotune::kTokenMagic, sizeof h.magic);
    h.version = autotune::kTokenFormatVersion;
    h.vocab_size = 256;
    h.dtype_bytes = 2;
    h.val_tokens = total / 10;
    h.train_tokens = total - h.val_tokens;
    std::ofstream f(*path_, std::ios::binary);
    f.write(reinterpret_cast<const char*>(&h), sizeof h);
    std::vector<uint16_t> chunk(1 << 20);
    std::mt19937_64 rng(3);
    for (uint64_t done = 0; done < total; done += chunk.size()) {
      for (auto& t : chunk) t = static_cast<uint16_t>(rng() & 0xFF);
      f.write(reinterpret_cast<const char*>(chunk.data()), chunk.size() * 2);
    }
    f.close();
    ASSERT_TRUE(f.good());
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
    delete path_;
  }
  static const std::string& path() { return *path_; }
  static std::string* dir_;
  static std::string* path_;
};
std::string* BigTokenFile::dir_ = nullptr;
std::string* BigTokenFile::path_ = nullptr;

// Drops the file's pages from the OS page cache, so the next reads go to the disk.
void evict_page_cache(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

// gpt-10m's shapes: T = 256, micro-batch 8.
constexpr int64_t kCount = 8;

std::unique_ptr<GptWorkload> big_workload(const std::string& path, const DataOptions& o) {
  // Opened with a memory map like every caller does; set_data_options reopens it for pread.
  auto w = std::make_unique<GptWorkload>(load_gpt_config("gpt-10m"), TokenFile::open(path), kSeed);
  w->set_data_options(o);
  return w;
}

struct RssRun {
  int64_t growth = 0;    // VmRSS after - before, bytes
  int64_t checksum = 0;  // of every token read, to compare the read paths
  DataStats stats;
};

// 10,000 windows: 1,250 train batches of 8 x 257 tokens at steps 0..1249, through train_batch.
RssRun rss_over_long_read(const std::string& path, const DataOptions& o) {
  auto w = big_workload(path, o);
  Plan plan;
  RssRun run;
  // Warm-up: first-use allocations (the pread buffer of each thread, the loader's stack and
  // malloc arena) happen before the baseline, so only what the reads keep resident counts.
  for (int64_t s = 0; s < 8; ++s) w->train_batch(1000000 + s, 0, kCount, plan, torch::kCPU);
  w->train_batch(0, 0, kCount, plan, torch::kCPU);
  const int64_t before = vm_rss_bytes();
  for (int64_t step = 1; step < 10000 / kCount; ++step) {
    Batch b = w->train_batch(step, 0, kCount, plan, torch::kCPU);
    run.checksum += b.target().sum().item<int64_t>() * (step % 7 + 1);
  }
  run.growth = vm_rss_bytes() - before;
  run.stats = w->data_stats();
  return run;
}

}  // namespace

TEST_F(BigTokenFile, PreadKeepsResidentMemoryFlatOverTenThousandWindows) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  const uint64_t file_bytes = fs::file_size(path());
  ASSERT_GT(file_bytes, 64ull << 20);
  const uint64_t cache_cap = 2ull << 20;  // a cap far below the file

  const RssRun pread = rss_over_long_read(path(), {ReadMode::pread, 0, 0});
  const RssRun pread_prefetch = rss_over_long_read(path(), {ReadMode::pread, 0, 1});
  const RssRun pread_cache = rss_over_long_read(path(), {ReadMode::pread, cache_cap, 0});
  const RssRun mmap = rss_over_long_read(path(), {ReadMode::mmap, 0, 0});
  std::printf(
      "[rss] 10000 windows of 257 tokens (1250 train_batch calls of 8) from a %.0f MiB token "
      "file: VmRSS grew %.2f MiB with pread, %.2f MiB with pread + prefetch 1, %.2f MiB with "
      "pread + a %.0f MiB cache, %.2f MiB with mmap\n",
      mib(static_cast<int64_t>(file_bytes)), mib(pread.growth), mib(pread_prefetch.growth),
      mib(pread_cache.growth), mib(static_cast<int64_t>(cache_cap)), mib(mmap.growth));

  // The same tokens whatever the path.
  EXPECT_EQ(pread.checksum, mmap.checksum);
  EXPECT_EQ(pread_prefetch.checksum, mmap.checksum);
  EXPECT_EQ(pread_cache.checksum, mmap.checksum);
  EXPECT_EQ(pread.stats.read_mode, ReadMode::pread);
  EXPECT_GT(pread_prefetch.stats.prefetch_predicted_rate(), 0.99);
  EXPECT_LE(pread_cache.stats.cache_bytes_in_use, cache_cap);

  // Flat: within a few MiB (the cache may fill its cap).
  EXPECT_LT(pread.growth, 4ll << 20);
  EXPECT_LT(pread_prefetch.growth, 4ll << 20);
  EXPECT_LT(pread_cache.growth, static_cast<int64_t>(cache_cap) + (4ll << 20));
  // The instrument sees what a memory map touched at random costs; were it blind, the flat
  // figures above would mean nothing.
  EXPECT_GT(mmap.growth, pread.growth + (8ll << 20));
}

TEST_F(BigTokenFile, TrainBatchThroughputPerReadPath) {
  const int64_t T = load_gpt_config("gpt-10m").seq_len;
  const int kBatches = 3000;
  // Stands in for the model's work between two requests, during which the loader builds ahead.
  const auto kCompute = std::chrono::microseconds(200);
  struct Mode {
    const char* name;
    DataOptions o;
  };
  const Mode modes[] = {{"mmap", {ReadMode::mmap, 0, 0}},
                        {"pread", {ReadMode::pread, 0, 0}},
                        {"pread+prefetch1", {ReadMode::pread, 0, 1}},
                        {"pread+prefetch2", {ReadMode::pread, 0, 2}},
                        {"mmap+prefetch1", {ReadMode::mmap, 0, 1}}};
  Plan plan;
  std::printf("[throughput] gpt-10m shapes (T=%lld, micro-batch %lld), %d train_batch calls each\n",
              static_cast<long long>(T), static_cast<long long>(kCount), kBatches);
  std::printf("[throughput] %-16s %5s %10s %10s %26s %9s %9s\n", "mode", "pages", "batches/s",
              "Mtokens/s", "stall/batch w/ 200us work", "hit rate", "predicted");
  for (bool cold : {false, true}) {
    for (const Mode& m : modes) {
      auto w = big_workload(path(), m.o);
      w->train_batch(0, 0, kCount, plan, torch::kCPU);
      if (cold) evict_page_cache(path());
      // Back to back: the cost of train_batch alone as the caller sees it.
      auto t0 = std::chrono::steady_clock::now();
      for (int64_t s = 1; s <= kBatches; ++s) w->train_batch(s, 0, kCount, plan, torch::kCPU);
      const double alone =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      // With work in between: only the time spent waiting inside train_batch.
      if (cold) evict_page_cache(path());
      double stall = 0;
      for (int64_t s = kBatches + 1; s <= 2 * kBatches; ++s) {
        auto a = std::chrono::steady_clock::now();
        w->train_batch(s, 0, kCount, plan, torch::kCPU);
        auto b = std::chrono::steady_clock::now();
        stall += std::chrono::duration<double>(b - a).count();
        while (std::chrono::steady_clock::now() - b < kCompute) {
        }
      }
      const double bps = kBatches / alone;
      const DataStats ds = w->data_stats();
      std::printf("[throughput] %-16s %5s %10.0f %10.2f %23.1f us %9.3f %9.3f\n", m.name,
                  cold ? "cold" : "warm", bps, bps * kCount * T / 1e6, stall / kBatches * 1e6,
                  ds.prefetch_hit_rate(), ds.prefetch_predicted_rate());
      if (m.o.prefetch_batches > 0) EXPECT_GT(ds.prefetch_predicted_rate(), 0.99);
    }
  }
}

// The data path's counters reach the user: the memory line, the summary table and --json "data".
TEST(DataPath, CacheAndPrefetchAreReportedInTheMonitorAndTheSummary) {
  const std::vector<std::string> base = {"train",
                                         "--model",
                                         "gpt-tiny",
                                         "--data",
                                         autotune::testing::corpus_path(),
                                         "--global-batch",
                                         "4",
                                         "--steps",
                                         "6",
                                         "--eval-every",
                                         "2",
                                         "--eval-sequences",
                                         "8",
                                         "--log-every",
                                         "1",
                                         "--json"};
  auto normal = autotune::testing::run_autotune(base);
  ASSERT_EQ(normal.exit_code, 0) << normal.err;
  auto d = nlohmann::json::parse(normal.out).at("data");
  // pread in every mode: a mapped file's pages would count in the budget figure (RSS).
  EXPECT_EQ(d.at("read_mode").get<std::string>(), "pread");
  ASSERT_GT(d.at("cache_capacity_bytes").get<uint64_t>(), 0u);
  EXPECT_GT(d.at("cache_hits").get<uint64_t>(), 0u) << "validation windows repeat every eval";
  EXPECT_GT(d.at("cache_misses").get<uint64_t>(), 0u);
  EXPECT_LE(d.at("cache_bytes_in_use").get<uint64_t>(),
            d.at("cache_capacity_bytes").get<uint64_t>());
  EXPECT_NE(normal.err.find("| data pread, cache "), std::string::npos)
      << "memory line: " << normal.err;
  EXPECT_NE(normal.err.find(" | pread, cache "), std::string::npos)
      << "summary row: " << normal.err;

  std::vector<std::string> ultra = base;
  ultra.insert(ultra.end(), {"--mode", "ultra-low"});
  auto low = autotune::testing::run_autotune(ultra);
  ASSERT_EQ(low.exit_code, 0) << low.err;
  d = nlohmann::json::parse(low.out).at("data");
  EXPECT_EQ(d.at("read_mode").get<std::string>(), "pread");
  EXPECT_EQ(d.at("cache_capacity_bytes").get<uint64_t>(), 0u);
  EXPECT_EQ(d.at("prefetch_batches").get<int64_t>(), 1);
  EXPECT_GT(d.at("prefetch_hits").get<uint64_t>() + d.at("prefetch_misses").get<uint64_t>(), 0u);
  EXPECT_NE(low.err.find("| data pread, no cache, prefetch 1: "), std::string::npos) << low.err;
}
