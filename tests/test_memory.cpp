// Memory truth on CPU: the counting allocator counts exactly and its cap throws
// c10::OutOfMemoryError through every path (plain calls, autograd backward, parallel_for); the
// /proc and cgroup readers survive odd files; MemoryMeter's budget figure follows a touched tensor.
#include <gtest/gtest.h>

#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "autotune/memory.h"
#include "memory/cpu_allocator.h"
#include "test_support.h"

namespace autotune {
namespace {

constexpr int64_t kMiB = int64_t{1} << 20;
const std::string kFixtures = std::string(AUTOTUNE_SOURCE_DIR) + "/tests/fixtures/proc/";

// Lifts the cap however a test ends, so one failing assertion cannot starve the next test.
struct CapGuard {
  explicit CapGuard(std::optional<int64_t> cap_bytes) { cpu_alloc::set_cap(cap_bytes); }
  ~CapGuard() { cpu_alloc::set_cap(std::nullopt); }
};

// ---- counting allocator
// ---------------------------------------------------------------------------

TEST(CpuAlloc, InstalledAsTheCpuAllocator) {
  cpu_alloc::install();
  cpu_alloc::install();  // idempotent
  ASSERT_TRUE(cpu_alloc::installed());
  c10::Allocator* a = c10::GetCPUAllocator();
  ASSERT_NE(a, c10::GetDefaultCPUAllocator());
  ASSERT_NE(a->raw_deleter(), nullptr);  // data == context: raw_allocate works
  const int64_t before_bytes = cpu_alloc::current_bytes();
  void* p = a->raw_allocate(1000);
  EXPECT_EQ(cpu_alloc::current_bytes() - before_bytes, 1000);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(p) % 64, 0u) << "data must stay 64-byte aligned";
  a->raw_deallocate(p);
  EXPECT_EQ(cpu_alloc::current_bytes(), before_bytes);
}

TEST(CpuAlloc, CountsTensorBytesExactly) {
  cpu_alloc::install();
  const int64_t before_bytes = cpu_alloc::current_bytes();
  {
    auto a = torch::empty({1000}, torch::kFloat);  // 4000 bytes
    EXPECT_EQ(cpu_alloc::current_bytes() - before_bytes, 4000);
    auto b = torch::empty({250}, torch::kDouble);  // 2000 bytes
    EXPECT_EQ(cpu_alloc::current_bytes() - before_bytes, 6000);
    auto c = torch::empty({0}, torch::kFloat);  // no storage bytes
    EXPECT_EQ(cpu_alloc::current_bytes() - before_bytes, 6000);
    EXPECT_EQ(c.numel(), 0);
    auto d = a.clone();  // a second 4000-byte storage
    EXPECT_EQ(cpu_alloc::current_bytes() - before_bytes, 10000);
    auto view = a.view({10, 100});  // shares a's storage
    EXPECT_EQ(cpu_alloc::current_bytes() - before_bytes, 10000);
  }
  EXPECT_EQ(cpu_alloc::current_bytes(), before_bytes);
}

TEST(CpuAlloc, PeakAndPeakReset) {
  cpu_alloc::install();
  cpu_alloc::reset_peak();
  const int64_t base_bytes = cpu_alloc::current_bytes();
  EXPECT_EQ(cpu_alloc::peak_bytes(), base_bytes);
  { auto big = torch::empty({1000}, torch::kFloat); }  // 4000 bytes, freed
  auto small = torch::empty({500}, torch::kFloat);     // 2000 bytes, kept
  EXPECT_EQ(cpu_alloc::peak_bytes() - base_bytes, 4000);
  EXPECT_EQ(cpu_alloc::current_bytes() - base_bytes, 2000);
  cpu_alloc::reset_peak();
  EXPECT_EQ(cpu_alloc::peak_bytes() - base_bytes, 2000);
  { auto t = torch::empty({750}, torch::kFloat); }  // 3000 bytes on top of 2000
  EXPECT_EQ(cpu_alloc::peak_bytes() - base_bytes, 5000);
}

TEST(CpuAlloc, CountsExactlyUnderConcurrentAllocation) {
  cpu_alloc::install();
  const int64_t before_bytes = cpu_alloc::current_bytes();
  cpu_alloc::reset_peak();
  constexpr int kThreads = 4, kRounds = 2000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([t] {
      for (int i = 0; i < kRounds; ++i) {
        auto x = torch::empty({(i % 7 + 1) * 100 + t}, torch::kFloat);
        x.fill_(1.0f);
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(cpu_alloc::current_bytes(), before_bytes);
  // Four threads each hold at most one tensor of at most (700 + 3) floats.
  EXPECT_LE(cpu_alloc::peak_bytes() - before_bytes, kThreads * 703 * 4);
  EXPECT_GE(cpu_alloc::peak_bytes() - before_bytes, 700 * 4);
}

// ---- the cap
// ----------------------------------------------------------------------------------------

TEST(CpuAllocCap, RefusesWithOutOfMemoryErrorAndRecovers) {
  cpu_alloc::install();
  const int64_t base_bytes = cpu_alloc::current_bytes();
  const int64_t ooms_before = cpu_alloc::num_ooms();
  CapGuard cap(base_bytes + 10000);
  ASSERT_EQ(cpu_alloc::cap(), base_bytes + 10000);

  auto held = torch::empty({2000}, torch::kFloat);  // 8000 of the 10000 bytes
  EXPECT_THROW(torch::empty({1000}, torch::kFloat), c10::OutOfMemoryError);  // 4000 more
  EXPECT_EQ(cpu_alloc::num_ooms() - ooms_before, 1);
  EXPECT_EQ(cpu_alloc::current_bytes() - base_bytes, 8000) << "a refusal must not leak bytes";
  try {
    auto t = torch::ones({1000}, torch::kFloat);
    ADD_FAILURE() << "no OutOfMemoryError";
  } catch (const c10::OutOfMemoryError& e) {
    EXPECT_NE(std::string(e.what()).find("refused"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cpu_alloc::num_ooms() - ooms_before, 2);

  held = torch::Tensor();  // free the 8000 bytes: the same allocation fits now
  auto again = torch::empty({1000}, torch::kFloat);
  EXPECT_EQ(cpu_alloc::current_bytes() - base_bytes, 4000);

  cpu_alloc::set_cap(std::nullopt);
  EXPECT_FALSE(cpu_alloc::cap().has_value());
  auto big = torch::empty({1 << 20}, torch::kFloat);  // 4 MiB, far over the old cap
  EXPECT_EQ(cpu_alloc::num_ooms() - ooms_before, 2);
}

TEST(CpuAllocCap, ExactlyAtTheCapIsAllowed) {
  cpu_alloc::install();
  CapGuard cap(cpu_alloc::current_bytes() + 4000);
  auto t = torch::empty({1000}, torch::kFloat);
  EXPECT_THROW(torch::empty({1}, torch::kFloat), c10::OutOfMemoryError);
}

// y = sum(relu(relu(x W1) W2) ... ) for 64x256 activations and 256x256 weights (256 KiB each):
// the forward runs uncapped, then the cap leaves no room for the backward's gradients.
TEST(CpuAllocCap, OutOfMemoryErrorArrivesThroughAutogradBackward) {
  cpu_alloc::install();
  torch::manual_seed(0);
  auto x = torch::randn({64, 256});
  std::vector<torch::Tensor> weights;
  for (int i = 0; i < 4; ++i) weights.push_back(torch::randn({256, 256}).div_(16).requires_grad_());
  auto forward = [&] {
    auto h = x;
    for (auto& w : weights) h = torch::relu(h.mm(w));
    return h.sum();
  };

  auto loss = forward();
  const int64_t ooms_before = cpu_alloc::num_ooms();
  {
    CapGuard cap(cpu_alloc::current_bytes() + 64 * 1024);
    EXPECT_THROW(loss.backward(), c10::OutOfMemoryError);
  }
  EXPECT_GE(cpu_alloc::num_ooms() - ooms_before, 1);

  // The process goes on: a fresh forward/backward without the cap works.
  for (auto& w : weights) w.mutable_grad() = torch::Tensor();
  forward().backward();
  for (auto& w : weights) {
    ASSERT_TRUE(w.grad().defined());
    EXPECT_TRUE(torch::isfinite(w.grad()).all().item<bool>());
  }
}

TEST(CpuAllocCap, OutOfMemoryErrorArrivesThroughParallelFor) {
  cpu_alloc::install();
  CapGuard cap(cpu_alloc::current_bytes() + kMiB);
  bool caught = false;
  try {
    // Each chunk holds 512 KiB: together the threads pass the 1 MiB cap.
    at::parallel_for(0, 16, 1, [](int64_t begin, int64_t end) {
      std::vector<torch::Tensor> held;
      for (int64_t i = begin; i < end; ++i) held.push_back(torch::empty({128 * 1024}));
    });
  } catch (const c10::OutOfMemoryError&) {
    caught = true;
  }
  EXPECT_TRUE(caught) << "parallel_for must rethrow the worker's c10::OutOfMemoryError";
}

// ---- the cache: exact allocated / reserved / peak figures
// ----------------------------------------------------------------------

constexpr int64_t kPage = 4096;
int64_t round_to(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}
// The block a pooled request of n bytes takes, and the segment a large one maps
// (src/memory/cpu_allocator.h).
int64_t block_of(int64_t n) {
  return round_to(n + cpu_alloc::kHeaderBytes, cpu_alloc::kBlockAlignBytes);
}
int64_t large_segment_of(int64_t n) {
  return round_to(block_of(n), kPage);
}
// Starts a test from an empty cache inside a caching scope, as the trainer runs.
struct CachedTest {
  cpu_alloc::CachingScope scope;
  cpu_alloc::Stats base;
  CachedTest() {
    cpu_alloc::install();
    cpu_alloc::release_cache();
    cpu_alloc::reset_peak();
    base = cpu_alloc::stats();
  }
  cpu_alloc::Stats now() const { return cpu_alloc::stats(); }
};

TEST(CpuAllocCache, KnownTensorsGiveKnownAllocatedReservedAndPeakBytes) {
  CachedTest t;
  const int64_t large = 4 * kMiB, mid = 100 * 1024, small = 1000;  // pool large / small, heap
  {
    auto a = torch::empty({large}, torch::kUInt8);
    auto b = torch::empty({mid}, torch::kUInt8);
    auto c = torch::empty({small}, torch::kUInt8);
    const auto s = t.now();
    EXPECT_EQ(s.allocated_bytes - t.base.allocated_bytes, large + mid + small);
    // A large request maps a segment of its own block; a mid one a shared 2 MiB segment; a small
    // one is counted at its size.
    EXPECT_EQ(s.reserved_bytes - t.base.reserved_bytes,
              large_segment_of(large) + cpu_alloc::kSmallSegmentBytes + small);
    EXPECT_EQ(s.num_segment_maps - t.base.num_segment_maps, 2);
    // The rest of the shared segment is cached for the next mid-size request.
    EXPECT_EQ(s.cached_bytes - t.base.cached_bytes, cpu_alloc::kSmallSegmentBytes - block_of(mid));
    EXPECT_EQ(s.peak_allocated_bytes - t.base.allocated_bytes, large + mid + small);
    EXPECT_EQ(s.peak_reserved_bytes - t.base.reserved_bytes,
              s.reserved_bytes - t.base.reserved_bytes);
  }
  const auto s = t.now();
  EXPECT_EQ(s.allocated_bytes, t.base.allocated_bytes);
  EXPECT_EQ(s.peak_allocated_bytes - t.base.allocated_bytes, large + mid + small);
  // Freed inside the scope: the pool keeps its segments, the heap gives the small one back.
  EXPECT_EQ(s.reserved_bytes - t.base.reserved_bytes,
            large_segment_of(large) + cpu_alloc::kSmallSegmentBytes);
  EXPECT_EQ(s.cached_bytes - t.base.cached_bytes,
            large_segment_of(large) + cpu_alloc::kSmallSegmentBytes);
}

TEST(CpuAllocCache, AFreedBlockIsReusedWithoutANewReservation) {
  CachedTest t;
  { auto a = torch::empty({8 * kMiB}, torch::kUInt8); }
  const auto after_first = t.now();
  EXPECT_EQ(after_first.num_segment_maps - t.base.num_segment_maps, 1);
  {
    auto same = torch::empty({8 * kMiB}, torch::kUInt8);
    auto smaller = torch::empty({2 * kMiB}, torch::kUInt8);  // does not fit beside `same`
    auto s = t.now();
    EXPECT_EQ(s.num_segment_maps - after_first.num_segment_maps, 1) << "only `smaller` maps";
    EXPECT_EQ(s.num_cache_hits - after_first.num_cache_hits, 1);
  }
  // Both freed: a request smaller than the cached 8 MiB block is carved out of it.
  const auto before_split = t.now();
  {
    auto part = torch::empty({3 * kMiB}, torch::kUInt8);
    const auto s = t.now();
    EXPECT_EQ(s.num_segment_maps, before_split.num_segment_maps);
    EXPECT_EQ(s.reserved_bytes, before_split.reserved_bytes);
    EXPECT_EQ(s.allocated_bytes - t.base.allocated_bytes, 3 * kMiB);
  }
  EXPECT_EQ(t.now().reserved_bytes, before_split.reserved_bytes) << "freed blocks coalesce";
  EXPECT_EQ(t.now().cached_bytes, before_split.cached_bytes);
}

TEST(CpuAllocCache, TheCapHandsTheCacheBackBeforeItRefuses) {
  CachedTest t;
  { auto a = torch::empty({8 * kMiB}, torch::kUInt8); }  // 8 MiB cached
  const int64_t reserved = t.now().reserved_bytes;
  const int64_t ooms = cpu_alloc::num_ooms();
  // 12 MiB needs a new segment: over the cap with the cache, under it once the cache is gone.
  CapGuard cap(reserved - large_segment_of(8 * kMiB) + large_segment_of(12 * kMiB) + kMiB);
  auto b = torch::empty({12 * kMiB}, torch::kUInt8);
  EXPECT_EQ(cpu_alloc::num_ooms(), ooms) << "an allocation that fits once the cache is released";
  EXPECT_EQ(t.now().cached_bytes, t.base.cached_bytes) << "the 8 MiB segment was handed back";
  EXPECT_THROW(torch::empty({12 * kMiB}, torch::kUInt8), c10::OutOfMemoryError);
  EXPECT_EQ(cpu_alloc::num_ooms(), ooms + 1);
  EXPECT_LE(t.now().reserved_bytes, *cpu_alloc::cap()) << "reserved never passes the cap";
}

TEST(CpuAllocCache, ReleasingBringsReservedDownToAllocated) {
  CachedTest t;
  std::vector<torch::Tensor> kept;
  {
    std::vector<torch::Tensor> dropped;
    for (int64_t mib : {2, 3, 5, 7}) {
      kept.push_back(torch::empty({mib * kMiB + 100}, torch::kUInt8));
      dropped.push_back(torch::empty({mib * kMiB + 200}, torch::kUInt8));
    }
  }
  EXPECT_GT(t.now().cached_bytes - t.base.cached_bytes, 16 * kMiB);
  const int64_t released = cpu_alloc::release_cache();
  EXPECT_GT(released, 16 * kMiB);
  const auto s = t.now();
  EXPECT_EQ(s.cached_bytes, t.base.cached_bytes);
  // What stays reserved is the live tensors plus their blocks' rounding to pages, nothing else.
  int64_t rounding = 0, bytes = 0;
  for (const auto& k : kept) {
    bytes += k.nbytes();
    rounding +=
        large_segment_of(static_cast<int64_t>(k.nbytes())) - static_cast<int64_t>(k.nbytes());
  }
  EXPECT_EQ(s.allocated_bytes - t.base.allocated_bytes, bytes);
  EXPECT_EQ(s.reserved_bytes - t.base.reserved_bytes, bytes + rounding);
  EXPECT_LT(rounding, 4 * kPage);
}

TEST(CpuAllocCache, OutsideACachingScopeFreedSegmentsGoBackAtOnce) {
  cpu_alloc::install();
  ASSERT_FALSE(cpu_alloc::caching());
  const auto base = cpu_alloc::stats();
  { auto a = torch::empty({8 * kMiB}, torch::kUInt8); }
  const auto s = cpu_alloc::stats();
  EXPECT_EQ(s.reserved_bytes, base.reserved_bytes);
  EXPECT_EQ(s.num_segment_unmaps - base.num_segment_unmaps, 1);
  {
    cpu_alloc::CachingScope scope;
    { auto a = torch::empty({8 * kMiB}, torch::kUInt8); }
    EXPECT_EQ(cpu_alloc::stats().reserved_bytes - base.reserved_bytes, large_segment_of(8 * kMiB));
  }
  EXPECT_EQ(cpu_alloc::stats().reserved_bytes, base.reserved_bytes)
      << "closing the last scope releases the cache";
}

TEST(CpuAllocCache, TheRssLimitRefusesWhatTheCapCannotSee) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  CachedTest t;
  const int64_t rss = static_cast<int64_t>(read_process_memory().rss_bytes);
  // Resident memory the allocator does not own (a plain mmap, like a library's buffer).
  constexpr size_t kForeign = 32 << 20;
  void* foreign =
      mmap(nullptr, kForeign, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(foreign, MAP_FAILED);
  std::memset(foreign, 1, kForeign);
  cpu_alloc::set_rss_limit(rss + 48 * kMiB);
  const int64_t ooms = cpu_alloc::num_ooms();
  try {
    auto fits = torch::zeros({4 * kMiB}, torch::kUInt8);  // 32 + 4 MiB: under the limit
    EXPECT_THROW(torch::empty({16 * kMiB}, torch::kUInt8), c10::OutOfMemoryError);  // 52 MiB
  } catch (...) {
    ADD_FAILURE() << "the allocation under the limit was refused";
  }
  cpu_alloc::set_rss_limit(std::nullopt);
  munmap(foreign, kForeign);
  EXPECT_EQ(cpu_alloc::num_ooms(), ooms + 1);
  auto now_fits = torch::empty({8 * kMiB}, torch::kUInt8);
}

TEST(CpuAllocCache, CountsStayExactUnderConcurrentPooledAllocation) {
  CachedTest t;
  constexpr int kThreads = 4;
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([i] {
      for (int round = 0; round < 200; ++round) {
        auto a = torch::empty({(64 + (round * 37 + i * 11) % 900) * 1024}, torch::kUInt8);
        auto b = torch::empty({(1 + (round + i) % 5) * kMiB}, torch::kUInt8);
      }
    });
  for (auto& th : threads) th.join();
  const auto s = t.now();
  EXPECT_EQ(s.allocated_bytes, t.base.allocated_bytes);
  EXPECT_EQ(s.reserved_bytes - t.base.reserved_bytes, s.cached_bytes - t.base.cached_bytes)
      << "everything freed is cached, nothing is lost";
  cpu_alloc::release_cache();
  EXPECT_EQ(cpu_alloc::stats().reserved_bytes, t.base.reserved_bytes);
}

// ---- readers: the real files
// ----------------------------------------------------------------------

TEST(Readers, RealProcSelfStatus) {
  const ProcessMemory pm = read_process_memory();
  EXPECT_GT(pm.rss_bytes, 1u * kMiB);  // a process linked to LibTorch holds more than 1 MiB
  EXPECT_GE(pm.peak_rss_bytes, pm.rss_bytes);
  EXPECT_EQ(pm.rss_bytes % 1024, 0u) << "kB must be scaled to bytes";
}

TEST(Readers, RealMeminfoAndCgroup) {
  const SystemMemory sm = read_system_memory();
  EXPECT_GT(sm.total_bytes, 64u * kMiB);
  EXPECT_GT(sm.available_bytes, 0u);
  EXPECT_LE(sm.available_bytes, sm.total_bytes);
  EXPECT_LE(sm.effective_total_bytes(), sm.total_bytes);
  EXPECT_LE(sm.effective_available_bytes(), sm.available_bytes);
  EXPECT_GT(sm.effective_total_bytes(), 0u);
  if (sm.cgroup_limit_bytes) EXPECT_GT(*sm.cgroup_limit_bytes, 0u);
  const DeviceMemoryInfo info = device_memory_info(torch::kCPU);
  EXPECT_EQ(info.name, "cpu");
  EXPECT_EQ(info.total_bytes, sm.effective_total_bytes());
  EXPECT_GT(info.free_bytes, 0u);
  EXPECT_LE(info.free_bytes, info.total_bytes);
}

TEST(Readers, ResetPeakRssOnAMissingFileSaysFalse) {
  EXPECT_FALSE(reset_peak_rss("/nonexistent-dir/clear_refs"));
}

// ---- readers: odd fixture files
// ----------------------------------------------------------------------

TEST(ReadersFixtures, ProcessStatus) {
  auto pm = read_process_memory(kFixtures + "status_normal");
  EXPECT_EQ(pm.rss_bytes, 102400u * 1024);
  EXPECT_EQ(pm.peak_rss_bytes, 204800u * 1024);

  pm = read_process_memory(kFixtures + "status_empty");
  EXPECT_EQ(pm.rss_bytes, 0u);
  EXPECT_EQ(pm.peak_rss_bytes, 0u);

  pm = read_process_memory(kFixtures + "status_no_hwm");
  EXPECT_EQ(pm.rss_bytes, 2048u * 1024);
  EXPECT_EQ(pm.peak_rss_bytes, 0u);

  pm = read_process_memory(kFixtures + "status_garbage");  // "lots", "-12", binary, no colon
  EXPECT_EQ(pm.rss_bytes, 0u);
  EXPECT_EQ(pm.peak_rss_bytes, 0u);

  pm = read_process_memory(kFixtures + "status_huge");  // overflows u64, or does once scaled
  EXPECT_EQ(pm.rss_bytes, 0u);
  EXPECT_EQ(pm.peak_rss_bytes, 0u);

  pm = read_process_memory(kFixtures + "status_odd_units");  // no unit, "MB", CRLF
  EXPECT_EQ(pm.rss_bytes, 4096u);
  EXPECT_EQ(pm.peak_rss_bytes, 8u * kMiB);

  pm = read_process_memory(kFixtures + "status_no_final_newline");
  EXPECT_EQ(pm.rss_bytes, 1024u);
  EXPECT_EQ(pm.peak_rss_bytes, 3072u);

  pm = read_process_memory(kFixtures + "does_not_exist");
  EXPECT_EQ(pm.rss_bytes, 0u);
  pm = read_process_memory(kFixtures);  // a directory
  EXPECT_EQ(pm.rss_bytes, 0u);
}

TEST(ReadersFixtures, Meminfo) {
  const std::string none = kFixtures + "no_cgroup_here";
  auto sm = read_system_memory(kFixtures + "meminfo_normal", none);
  EXPECT_EQ(sm.total_bytes, 16384000ull * 1024);
  EXPECT_EQ(sm.available_bytes, 8192000ull * 1024);
  EXPECT_FALSE(sm.cgroup_limit_bytes.has_value());
  EXPECT_FALSE(sm.cgroup_usage_bytes.has_value());
  EXPECT_EQ(sm.effective_total_bytes(), sm.total_bytes);
  EXPECT_EQ(sm.effective_available_bytes(), sm.available_bytes);

  sm = read_system_memory(kFixtures + "meminfo_no_available", none);  // free + buffers + cached
  EXPECT_EQ(sm.total_bytes, 8000000ull * 1024);
  EXPECT_EQ(sm.available_bytes, 1500000ull * 1024);

  for (const char* odd : {"meminfo_empty", "meminfo_garbage", "does_not_exist"}) {
    sm = read_system_memory(kFixtures + odd, none);
    EXPECT_EQ(sm.total_bytes, 0u) << odd;
    EXPECT_EQ(sm.available_bytes, 0u) << odd;
    EXPECT_EQ(sm.effective_total_bytes(), 0u) << odd;
  }

  sm = read_system_memory(kFixtures + "meminfo_available_above_total", none);
  EXPECT_EQ(sm.available_bytes, sm.total_bytes);
}

TEST(ReadersFixtures, CgroupLimits) {
  const std::string meminfo = kFixtures + "meminfo_normal";  // 15.6 GiB total, 7.8 GiB available
  const uint64_t total_bytes = 16384000ull * 1024, available_bytes = 8192000ull * 1024;

  auto sm = read_system_memory(meminfo, kFixtures + "cg_v2_max");  // "max": no limit
  EXPECT_FALSE(sm.cgroup_limit_bytes.has_value());
  EXPECT_EQ(sm.cgroup_usage_bytes, 123456u);
  EXPECT_EQ(sm.effective_total_bytes(), total_bytes);

  sm = read_system_memory(meminfo, kFixtures + "cg_v2_limit");  // 1 GiB, half used
  EXPECT_EQ(sm.cgroup_limit_bytes, 1073741824u);
  EXPECT_EQ(sm.cgroup_usage_bytes, 536870912u);
  EXPECT_EQ(sm.effective_total_bytes(), 1073741824u);
  EXPECT_EQ(sm.effective_available_bytes(), 536870912u);

  sm = read_system_memory(meminfo, kFixtures + "cg_v1_unlimited");  // LONG_MAX page-rounded
  EXPECT_FALSE(sm.cgroup_limit_bytes.has_value());
  EXPECT_EQ(sm.cgroup_usage_bytes, 1000u);
  EXPECT_EQ(sm.effective_available_bytes(), available_bytes);

  sm = read_system_memory(meminfo, kFixtures + "cg_v1_limit");  // 2 GiB, usage above it
  EXPECT_EQ(sm.cgroup_limit_bytes, 2147483648u);
  EXPECT_EQ(sm.effective_total_bytes(), 2147483648u);
  EXPECT_EQ(sm.effective_available_bytes(), 0u);

  for (const char* odd : {"cg_garbage", "cg_huge", "no_cgroup_here"}) {
    sm = read_system_memory(meminfo, kFixtures + odd);
    EXPECT_FALSE(sm.cgroup_limit_bytes.has_value()) << odd;
    EXPECT_FALSE(sm.cgroup_usage_bytes.has_value()) << odd;
    EXPECT_EQ(sm.effective_total_bytes(), total_bytes) << odd;
    EXPECT_EQ(sm.effective_available_bytes(), available_bytes) << odd;
  }

  // Without meminfo the cgroup is the whole machine.
  sm = read_system_memory(kFixtures + "meminfo_empty", kFixtures + "cg_v2_limit");
  EXPECT_EQ(sm.effective_total_bytes(), 1073741824u);
  EXPECT_EQ(sm.effective_available_bytes(), 536870912u);
}

TEST(ReadersFixtures, CgroupHierarchyWalk) {
  const std::string meminfo = kFixtures + "meminfo_normal";
  // The process is in a/b (no limit); its parent a has 4 GiB: that binds, with a's usage.
  auto sm = read_system_memory(meminfo, kFixtures + "cg_nested", kFixtures + "proc_cgroup_nested");
  EXPECT_EQ(sm.cgroup_limit_bytes, 4294967296u);
  EXPECT_EQ(sm.cgroup_usage_bytes, 1000000u);

  // Hybrid: memory is a v1 controller (listed with cpuacct) at /x with 768 MiB.
  sm = read_system_memory(meminfo, kFixtures + "cg_hybrid", kFixtures + "proc_cgroup_hybrid");
  EXPECT_EQ(sm.cgroup_limit_bytes, 768u * kMiB);
  EXPECT_EQ(sm.cgroup_usage_bytes, 1024u);
  EXPECT_EQ(sm.effective_total_bytes(), 768u * kMiB);

  // Only the mount root is read when the membership is odd or escapes the mount.
  for (const char* proc : {"proc_cgroup_escape", "proc_cgroup_garbage", "does_not_exist"}) {
    sm = read_system_memory(meminfo, kFixtures + "cg_v2_limit", kFixtures + proc);
    EXPECT_EQ(sm.cgroup_limit_bytes, 1073741824u) << proc;
  }
}

// ---- MemoryMeter on CPU
// ---------------------------------------------------------------------------

// A 200 MiB tensor, filled so that every page is resident.
constexpr int64_t kTouchedBytes = 200 * kMiB;
constexpr int64_t kToleranceBytes = 20 * kMiB;

void expect_figure_follows_touched_tensor(MemoryMeter& meter) {
  meter.reset_peaks();
  const MemorySample s0 = meter.sample();
  const uint64_t figure0_bytes = meter.budget_figure_peak(s0);
  EXPECT_EQ(s0.budget_bytes_peak, figure0_bytes);
  uint64_t rss_with_bytes = 0;
  {
    auto t = torch::empty({kTouchedBytes / 4}, torch::kFloat);
    t.fill_(1.0f);
    const MemorySample s1 = meter.sample();
    rss_with_bytes = s1.rss_bytes;
    EXPECT_EQ(static_cast<int64_t>(s1.tensor_bytes - s0.tensor_bytes), kTouchedBytes);
    const auto grown_bytes = static_cast<int64_t>(meter.budget_figure_peak(s1) - figure0_bytes);
    EXPECT_NEAR(grown_bytes, kTouchedBytes, kToleranceBytes);
    EXPECT_GE(meter.budget_figure_now(s1), s1.rss_bytes);
  }
  // Freed: RSS follows right away (the block is unmapped); the peak only after a reset.
  const MemorySample s2 = meter.sample();
  EXPECT_LT(s2.rss_bytes + kTouchedBytes - kToleranceBytes, rss_with_bytes);
  EXPECT_NEAR(static_cast<int64_t>(meter.budget_figure_peak(s2) - figure0_bytes), kTouchedBytes,
              kToleranceBytes);
  meter.reset_peaks();
  const MemorySample s3 = meter.sample();
  EXPECT_LT(meter.budget_figure_peak(s3), figure0_bytes + kToleranceBytes);
}

TEST(MemoryMeterCpu, BudgetFigureFollowsATouchedTensorThroughVmHWM) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  MemoryMeter meter(torch::kCPU);
  EXPECT_FALSE(meter.is_accelerator());
  EXPECT_TRUE(cpu_alloc::installed());
  if (!meter.peak_rss_resettable())
    GTEST_SKIP() << "writing 5 to /proc/self/clear_refs does not reset VmHWM here";
  expect_figure_follows_touched_tensor(meter);
}

TEST(MemoryMeterCpu, BudgetFigureFallbackWithoutVmHWMReset) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  ASSERT_EQ(setenv("AUTOTUNE_NO_PEAK_RSS_RESET", "1", 1), 0);
  MemoryMeter meter(torch::kCPU);
  unsetenv("AUTOTUNE_NO_PEAK_RSS_RESET");
  EXPECT_FALSE(meter.peak_rss_resettable());
  expect_figure_follows_touched_tensor(meter);
}

TEST(MemoryMeterCpu, BaselineIsRssLessTensorBytes) {
  MemoryMeter meter(torch::kCPU);
  auto held = torch::ones({16 * kMiB / 4});  // 16 MiB of tensors must not count as baseline
  meter.remeasure_baseline();
  const MemorySample s = meter.sample();
  EXPECT_GT(meter.baseline_bytes(), 0u);
  EXPECT_LE(meter.baseline_bytes() + s.tensor_bytes, s.rss_bytes + kMiB);
  EXPECT_GE(s.tensor_bytes, 16u * kMiB);
  EXPECT_EQ(s.device_total_bytes, 0u);
  EXPECT_EQ(s.device_peak_reserved_bytes, 0u);
}

// glibc alone would keep freed mid-size blocks (under its dynamic mmap threshold, up to 32 MiB)
// in the heap; install() pins the threshold so RSS drops with the tensors.
TEST(MemoryMeterCpu, RssFollowsFreedMidSizeTensors) {
  AUTOTUNE_SKIP_UNDER_ASAN();
  MemoryMeter meter(torch::kCPU);
  { auto raise_threshold = torch::ones({16 * kMiB / 4}); }  // would lift a dynamic threshold
  std::vector<torch::Tensor> held;
  for (int i = 0; i < 64; ++i) held.push_back(torch::ones({kMiB / 4}));  // 64 x 1 MiB, touched
  const uint64_t rss_held_bytes = meter.sample().rss_bytes;
  held.clear();
  const uint64_t rss_freed_bytes = meter.sample().rss_bytes;
  EXPECT_GT(rss_held_bytes, rss_freed_bytes + 48 * kMiB)
      << "freed 1 MiB tensors stayed resident: the mmap threshold is not pinned";
}

TEST(MemoryMeterCpu, CapErrorReachesTheCallerAndCounts) {
  MemoryMeter meter(torch::kCPU);
  const int64_t ooms_before = cpu_alloc::num_ooms();
  CapGuard cap(cpu_alloc::current_bytes() + kMiB);
  EXPECT_THROW(torch::zeros({kMiB}), c10::OutOfMemoryError);  // 4 MiB
  EXPECT_EQ(cpu_alloc::num_ooms() - ooms_before, 1);
  meter.release_cache();  // a no-op on CPU besides trimming the heap; must not throw
}

// ---- accelerator guard on a machine or build without it
// ---------------------------------------------

TEST(MemoryMeterAccelerator, NeverThrowsWithoutTheDevice) {
  const torch::Device cuda(torch::kCUDA);
  if (torch::cuda::is_available()) GTEST_SKIP() << "a GPU is present; this checks its absence";
  MemoryMeter meter(cuda);
  EXPECT_TRUE(meter.is_accelerator());
  const MemorySample s = meter.sample();
  EXPECT_EQ(s.device_total_bytes, 0u);
  EXPECT_EQ(s.device_reserved_bytes, 0u);
  EXPECT_GT(s.rss_bytes, 0u);  // the host side is still measured
  meter.reset_peaks();
  meter.release_cache();
  const DeviceMemoryInfo info = device_memory_info(cuda);
  EXPECT_EQ(info.total_bytes, 0u);
  EXPECT_NE(info.name.find("cuda"), std::string::npos);
  EXPECT_FALSE(enforce_device_budget(cuda, 1ull << 30, 0));
  EXPECT_FALSE(enforce_device_budget(torch::kCPU, 1ull << 30, 0));
}

}  // namespace
}  // namespace autotune
