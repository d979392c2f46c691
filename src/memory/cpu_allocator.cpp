#include "memory/cpu_allocator.h"

#include <fcntl.h>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>

namespace autotune::cpu_alloc {
namespace {

// Above the default allocator (0) and any mobile/caching registration; nothing in LibTorch
// registers a CPU allocator at a higher priority.
constexpr uint8_t kAllocatorPriority = 200;
constexpr int64_t kNoLimit = -1;
constexpr int64_t kPageBytes = 4096;
// glibc's own thresholds, pinned: left dynamic, its mmap threshold climbs to 32 MiB after the
// first large free and keeps later large non-tensor buffers (checkpoint and JSON buffers) in the
// heap, resident and uncounted. Pinned, blocks from 128 KiB up go back to the kernel on free, and
// up to 8 MiB of free heap top stays mapped so small-tensor churn does not fault pages in and out.
constexpr int kGlibcMmapThresholdBytes = 128 << 10;
constexpr int kGlibcTrimThresholdBytes = 8 << 20;

constexpr int64_t round_up(int64_t n, int64_t to) {
  return (n + to - 1) / to * to;
}
// The smallest block of each pool: a split leaves a remainder only when one of these fits in it.
constexpr int64_t kMinSmallBlockBytes = round_up(kPoolMinBytes + kHeaderBytes, kBlockAlignBytes);
constexpr int64_t kMinLargeBlockBytes = kSmallPoolMaxBytes;

// ---- pool structures (guarded by g_mu) ----
struct Segment {
  char* base = nullptr;
  int64_t bytes = 0;
  bool small = false;  // shared by requests below kSmallPoolMaxBytes; its blocks stay in that pool
};
struct Block {
  char* ptr = nullptr;
  int64_t bytes = 0;
  Segment* segment = nullptr;
  Block* prev = nullptr;  // neighbours in the segment, by address
  Block* next = nullptr;
  bool free = true;
};
struct BySize {
  bool operator()(const Block* a, const Block* b) const {
    return a->bytes != b->bytes ? a->bytes < b->bytes : a->ptr < b->ptr;
  }
};
using FreeSet = std::set<Block*, BySize>;

// In front of every allocation's data (kHeaderBytes keep the data 64-byte aligned, as
// alloc_cpu's own): which path it took, what was asked, and the pool block.
struct Header {
  uint64_t path;
  int64_t nbytes;
  Block* block;
};
static_assert(sizeof(Header) <= kHeaderBytes, "header must fit in front of the data");
constexpr uint64_t kHeapPath = 0x48454150;  // "HEAP"
constexpr uint64_t kPoolPath = 0x504f4f4c;  // "POOL"

std::mutex g_mu;
FreeSet g_free_small, g_free_large;
int64_t g_segments = 0;

// Published for lock-free reads; written under g_mu.
std::atomic<int64_t> g_allocated{0}, g_peak_allocated{0};
std::atomic<int64_t> g_reserved{0}, g_peak_reserved{0};
std::atomic<int64_t> g_cached{0};
std::atomic<int64_t> g_num_allocations{0}, g_num_cache_hits{0}, g_num_maps{0}, g_num_unmaps{0};
std::atomic<int64_t> g_num_ooms{0};
std::atomic<int64_t> g_since_armed{0}, g_fail_at{0};  // arm_allocation_failure
std::atomic<int64_t> g_cap{kNoLimit}, g_rss_limit{kNoLimit};
std::atomic<int> g_scopes{0};
std::atomic<bool> g_installed{false};

void add_allocated_locked(int64_t delta) {
  const int64_t now = g_allocated.load(std::memory_order_relaxed) + delta;
  g_allocated.store(now, std::memory_order_relaxed);
  if (now > g_peak_allocated.load(std::memory_order_relaxed))
    g_peak_allocated.store(now, std::memory_order_relaxed);
}
void add_reserved_locked(int64_t delta) {
  const int64_t now = g_reserved.load(std::memory_order_relaxed) + delta;
  g_reserved.store(now, std::memory_order_relaxed);
  if (now > g_peak_reserved.load(std::memory_order_relaxed))
    g_peak_reserved.store(now, std::memory_order_relaxed);
}
void add_cached_locked(int64_t delta) {
  g_cached.store(g_cached.load(std::memory_order_relaxed) + delta, std::memory_order_relaxed);
}

// VmRSS from /proc/self/statm (resident pages, second field), without allocating.
int64_t read_rss_bytes() {
  const int fd = ::open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[128];
  const ssize_t n = ::read(fd, buf, sizeof buf - 1);
  ::close(fd);
  if (n <= 0) return 0;
  buf[n] = '\0';
  char* p = buf;
  std::strtoll(p, &p, 10);  // size
  const long long resident_pages = std::strtoll(p, nullptr, 10);
  return static_cast<int64_t>(resident_pages) * ::sysconf(_SC_PAGESIZE);
}

FreeSet& pool_for(int64_t block_bytes) {
  return block_bytes < kSmallPoolMaxBytes ? g_free_small : g_free_large;
}
// A block's pool is its segment's, whatever its size after coalescing.
FreeSet& free_set_of(const Block* b) {
  return b->segment->small ? g_free_small : g_free_large;
}

void unmap_segment_locked(Block* whole) {
  Segment* seg = whole->segment;
  ::munmap(seg->base, static_cast<size_t>(seg->bytes));
  add_reserved_locked(-seg->bytes);
  --g_segments;
  g_num_unmaps.fetch_add(1, std::memory_order_relaxed);
  delete seg;
  delete whole;
}

// Unmaps free whole segments, largest first, until `enough()` (or none is left); bytes released.
template <typename Enough>
int64_t release_locked(Enough&& enough) {
  int64_t released = 0;
  for (FreeSet* set : {&g_free_large, &g_free_small}) {
    for (auto it = set->end(); it != set->begin() && !enough();) {
      --it;
      Block* b = *it;
      if (b->prev != nullptr || b->next != nullptr) continue;  // shares its segment
      it = set->erase(it);
      add_cached_locked(-b->bytes);
      released += b->bytes;
      unmap_segment_locked(b);
    }
  }
  return released;
}

[[noreturn]] void refuse(size_t n, const char* why) {
  g_num_ooms.fetch_add(1, std::memory_order_relaxed);
  c10::profiledCPUMemoryReporter().OutOfMemory(n);
  TORCH_CHECK_WITH(OutOfMemoryError, false, "CPU allocation of ", n, " bytes refused: ", why, " (",
                   g_allocated.load(std::memory_order_relaxed), " bytes of CPU tensors in use, ",
                   g_reserved.load(std::memory_order_relaxed), " reserved, cap ",
                   g_cap.load(std::memory_order_relaxed), " bytes: the host memory budget)");
}

// Makes room for `bytes` more reserved bytes under the cap (and, for a new mapping, under the RSS
// limit), handing cached segments back first; refuses the request `n` when there is none.
void make_room_locked(size_t n, int64_t bytes, bool new_mapping) {
  const int64_t cap = g_cap.load(std::memory_order_relaxed);
  if (cap != kNoLimit) {
    auto fits = [&] { return g_reserved.load(std::memory_order_relaxed) + bytes <= cap; };
    if (!fits()) release_locked(fits);
    if (!fits()) refuse(n, "over the cap");
  }
  const int64_t limit = g_rss_limit.load(std::memory_order_relaxed);
  if (new_mapping && limit != kNoLimit && read_rss_bytes() + bytes > limit) {
    release_locked([] { return false; });
    if (read_rss_bytes() + bytes > limit)
      refuse(n, "the process's resident memory would pass its limit");
  }
}

Block* map_segment_locked(size_t n, int64_t bytes, bool small) {
  void* p = ::mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p ==
      MAP_FAILED) {  // a real host limit (overcommit, max_map_count): the same recoverable path
    release_locked([] { return false; });
    p = ::mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) refuse(n, "mmap failed");
  }
  auto* seg = new Segment{static_cast<char*>(p), bytes, small};
  add_reserved_locked(bytes);
  ++g_segments;
  g_num_maps.fetch_add(1, std::memory_order_relaxed);
  return new Block{seg->base, bytes, seg, nullptr, nullptr, true};
}

// A live block of `bytes` (a multiple of kBlockAlignBytes): the best-fitting cached block, split
// when the rest can serve another request of its pool, or a new segment.
Block* take_block_locked(size_t n, int64_t bytes) {
  FreeSet& set = pool_for(bytes);
  Block probe{nullptr, bytes};
  auto it = set.lower_bound(&probe);
  Block* b = nullptr;
  if (it != set.end()) {
    b = *it;
    set.erase(it);
    add_cached_locked(-b->bytes);
    g_num_cache_hits.fetch_add(1, std::memory_order_relaxed);
  } else {
    const int64_t seg_bytes =
        bytes < kSmallPoolMaxBytes ? kSmallSegmentBytes : round_up(bytes, kPageBytes);
    make_room_locked(n, seg_bytes, /*new_mapping=*/true);
    b = map_segment_locked(n, seg_bytes, bytes < kSmallPoolMaxBytes);
  }
  const int64_t rest = b->bytes - bytes;
  if (rest >= (bytes < kSmallPoolMaxBytes ? kMinSmallBlockBytes : kMinLargeBlockBytes)) {
    auto* r = new Block{b->ptr + bytes, rest, b->segment, b, b->next, true};
    if (b->next != nullptr) b->next->prev = r;
    b->next = r;
    b->bytes = bytes;
    free_set_of(r).insert(r);
    add_cached_locked(rest);
  }
  b->free = false;
  return b;
}

void give_back_block_locked(Block* b) {
  b->free = true;
  // Coalesce with free neighbours: out of the free set first (it is ordered by size), then merge.
  auto unlink_free = [](Block* f) {
    free_set_of(f).erase(f);
    add_cached_locked(-f->bytes);
  };
  auto merge = [](Block* into, Block* gone) {  // `gone` directly follows `into`
    into->bytes += gone->bytes;
    into->next = gone->next;
    if (gone->next != nullptr) gone->next->prev = into;
    delete gone;
  };
  if (b->next != nullptr && b->next->free) {
    unlink_free(b->next);
    merge(b, b->next);
  }
  if (b->prev != nullptr && b->prev->free) {
    Block* prev = b->prev;
    unlink_free(prev);
    merge(prev, b);
    b = prev;
  }
  if (b->prev == nullptr && b->next == nullptr && g_scopes.load(std::memory_order_relaxed) == 0) {
    unmap_segment_locked(b);  // outside a caching scope, resident memory follows tensor bytes
    return;
  }
  free_set_of(b).insert(b);
  add_cached_locked(b->bytes);
}

void delete_counted(void* data) {
  if (data == nullptr) return;
  char* base = static_cast<char*>(data) - kHeaderBytes;
  Header h;
  std::memcpy(&h, base, sizeof h);
  c10::profiledCPUMemoryReporter().Delete(data);
  std::lock_guard<std::mutex> lock(g_mu);
  add_allocated_locked(-h.nbytes);
  if (h.path == kPoolPath) {
    give_back_block_locked(h.block);
  } else {
    add_reserved_locked(-h.nbytes);
    c10::free_cpu(base);
  }
}

struct CachingCountingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    g_num_allocations.fetch_add(1, std::memory_order_relaxed);
    if (n == 0) return {nullptr, nullptr, &delete_counted, cpu};
    constexpr size_t kMaxBytes = static_cast<size_t>(std::numeric_limits<int64_t>::max() / 4);
    if (n > kMaxBytes) refuse(n, "larger than any host");
    if (g_since_armed.fetch_add(1, std::memory_order_relaxed) + 1 ==
        g_fail_at.load(std::memory_order_relaxed))
      refuse(n, "injected (AUTOTUNE_INJECT_OOM_ALLOC)");
    const auto nbytes = static_cast<int64_t>(n);
    char* base = nullptr;
    Header h{kHeapPath, nbytes, nullptr};
    if (nbytes < kPoolMinBytes) {
      {
        std::lock_guard<std::mutex> lock(g_mu);
        make_room_locked(n, nbytes, /*new_mapping=*/false);
        add_reserved_locked(nbytes);
        add_allocated_locked(nbytes);
      }
      try {
        base = static_cast<char*>(c10::alloc_cpu(n + kHeaderBytes));
      } catch (const c10::Error& e) {
        // A real host OOM (posix_memalign failed) takes the same recoverable path as the cap.
        std::lock_guard<std::mutex> lock(g_mu);
        add_reserved_locked(-nbytes);
        add_allocated_locked(-nbytes);
        refuse(n, e.what_without_backtrace());
      }
    } else {
      std::lock_guard<std::mutex> lock(g_mu);
      h = {kPoolPath, nbytes,
           take_block_locked(n, round_up(nbytes + kHeaderBytes, kBlockAlignBytes))};
      add_allocated_locked(nbytes);
      base = h.block->ptr;
    }
    std::memcpy(base, &h, sizeof h);
    void* data = base + kHeaderBytes;
    c10::profiledCPUMemoryReporter().New(data, n);
    // data == context keeps the DataPtr "simple" (copy-on-write, raw_allocate for oneDNN).
    return {data, data, &delete_counted, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &delete_counted; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

// The user may have tuned glibc through its own environment variables: theirs wins.
void pin_glibc_thresholds() {
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") == nullptr)
    mallopt(M_MMAP_THRESHOLD, kGlibcMmapThresholdBytes);
  if (std::getenv("MALLOC_TRIM_THRESHOLD_") == nullptr)
    mallopt(M_TRIM_THRESHOLD, kGlibcTrimThresholdBytes);
  // One arena: the prefetch thread allocates batches and cache entries that the training thread
  // frees, and with an arena of its own the process's RSS crept up for thousands of steps; with
  // one it stays flat at the same speed (scripts/bench-soak, docs/BENCHMARKS.md).
  if (std::getenv("MALLOC_ARENA_MAX") == nullptr) mallopt(M_ARENA_MAX, 1);
}

}  // namespace

void install() {
  static std::once_flag once;
  std::call_once(once, [] {
    pin_glibc_thresholds();
    // Never freed: storages allocated by it may outlive every static destructor.
    static auto* allocator = new CachingCountingAllocator();
    c10::SetCPUAllocator(allocator, kAllocatorPriority);
    g_installed.store(true);
  });
}

bool installed() {
  return g_installed.load();
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_mu);
  Stats s;
  s.allocated_bytes = g_allocated.load();
  s.peak_allocated_bytes = g_peak_allocated.load();
  s.reserved_bytes = g_reserved.load();
  s.peak_reserved_bytes = g_peak_reserved.load();
  s.cached_bytes = g_cached.load();
  s.segments = g_segments;
  s.num_allocations = g_num_allocations.load();
  s.num_cache_hits = g_num_cache_hits.load();
  s.num_segment_maps = g_num_maps.load();
  s.num_segment_unmaps = g_num_unmaps.load();
  s.num_ooms = g_num_ooms.load();
  return s;
}

int64_t current_bytes() {
  return g_allocated.load(std::memory_order_relaxed);
}
int64_t peak_bytes() {
  return std::max(g_peak_allocated.load(std::memory_order_relaxed), current_bytes());
}
int64_t reserved_bytes() {
  return g_reserved.load(std::memory_order_relaxed);
}
int64_t peak_reserved_bytes() {
  return std::max(g_peak_reserved.load(std::memory_order_relaxed), reserved_bytes());
}
void reset_peak() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_peak_allocated.store(g_allocated.load());
  g_peak_reserved.store(g_reserved.load());
}
int64_t num_ooms() {
  return g_num_ooms.load(std::memory_order_relaxed);
}
int64_t num_allocations() {
  return g_num_allocations.load(std::memory_order_relaxed);
}

void set_cap(std::optional<int64_t> cap_bytes) {
  g_cap.store(cap_bytes ? std::max<int64_t>(*cap_bytes, 0) : kNoLimit);
}
std::optional<int64_t> cap() {
  const int64_t c = g_cap.load();
  if (c == kNoLimit) return std::nullopt;
  return c;
}
void set_rss_limit(std::optional<int64_t> limit_bytes) {
  g_rss_limit.store(limit_bytes ? std::max<int64_t>(*limit_bytes, 0) : kNoLimit);
}
std::optional<int64_t> rss_limit() {
  const int64_t l = g_rss_limit.load();
  if (l == kNoLimit) return std::nullopt;
  return l;
}

int64_t release_cache() {
  std::lock_guard<std::mutex> lock(g_mu);
  return release_locked([] { return false; });
}

CachingScope::CachingScope() {
  g_scopes.fetch_add(1);
}
CachingScope::~CachingScope() {
  if (g_scopes.fetch_sub(1) == 1) release_cache();
}
bool caching() {
  return g_scopes.load() > 0;
}

void arm_allocation_failure(int64_t nth) {
  g_fail_at.store(0, std::memory_order_relaxed);
  g_since_armed.store(0, std::memory_order_relaxed);
  g_fail_at.store(nth, std::memory_order_relaxed);
}

int64_t allocations_since_armed() {
  return g_since_armed.load(std::memory_order_relaxed);
}

}  // namespace autotune::cpu_alloc
