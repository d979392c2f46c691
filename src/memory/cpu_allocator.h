// The CPU allocator autotune installs (c10::SetCPUAllocator): it counts every CPU tensor byte,
// caches large blocks for reuse the way the CUDA caching allocator does, and enforces the host
// budget by throwing c10::OutOfMemoryError.
//
// Two paths, chosen by size:
//   heap   requests below kPoolMinBytes go to glibc (posix_memalign), counted at their size.
//   pool   the rest are carved out of segments mapped with mmap: blocks are split best-fit and
//          coalesced on free, like the CUDA caching allocator's. Requests below
//          kSmallPoolMaxBytes share kSmallSegmentBytes segments; larger ones get a segment of
//          their own size (rounded to a page), which later requests of at most its size reuse.
// Inside a CachingScope (the trainer holds one for the whole run) a freed block stays mapped, so
// the next step's tensor of the same size costs no page faults. Outside any scope, or when the
// cap needs room, segments that are entirely free are unmapped at once and resident memory
// follows tensor bytes again.
//
// Figures, all exact and deterministic:
//   allocated  bytes requested by live allocations (the tensor bytes)
//   reserved   bytes held for them: pool segments (in use or cached) + heap allocations
//   cached     reserved bytes of free pool blocks
// On CPU the budget figure is the process's RSS, which is the process baseline plus reserved
// (plus the small heap slack of glibc). The cap bounds reserved, so it bounds that figure.
#pragma once
#include <cstdint>
#include <optional>

namespace autotune::cpu_alloc {

constexpr int64_t kPoolMinBytes = 64 << 10;      // from here on requests are pooled
constexpr int64_t kSmallPoolMaxBytes = 1 << 20;  // pooled requests below share segments
constexpr int64_t kSmallSegmentBytes = 2 << 20;  // the shared segments' size
constexpr int64_t kBlockAlignBytes = 512;        // pool block sizes are multiples of this
constexpr int64_t kHeaderBytes = 64;             // in front of every allocation's data

struct Stats {
  int64_t allocated_bytes = 0;
  int64_t peak_allocated_bytes = 0;  // since the last reset_peak()
  int64_t reserved_bytes = 0;
  int64_t peak_reserved_bytes = 0;  // since the last reset_peak()
  int64_t cached_bytes = 0;
  int64_t segments = 0;            // pool segments mapped now
  int64_t num_allocations = 0;     // allocate() calls since install
  int64_t num_cache_hits = 0;      // pooled allocations served without mapping memory
  int64_t num_segment_maps = 0;    // segments mapped since install (each costs page faults)
  int64_t num_segment_unmaps = 0;  // segments handed back since install
  int64_t num_ooms = 0;            // refused allocations since install
};

void install();  // idempotent
bool installed();
Stats stats();
int64_t current_bytes();  // allocated
int64_t peak_bytes();     // peak allocated
int64_t reserved_bytes();
int64_t peak_reserved_bytes();
void reset_peak();  // both peaks := current
int64_t num_ooms();
int64_t num_allocations();

// With a cap, an allocation that would take reserved bytes above it first hands cached segments
// back; if it still would not fit, it throws c10::OutOfMemoryError. nullopt lifts the cap.
void set_cap(std::optional<int64_t> cap_bytes);
std::optional<int64_t> cap();
// With a limit, mapping a new segment also checks the process's resident memory (VmRSS, which
// counts what the cap cannot see: the heap's slack, thread arenas, libraries' own buffers): a
// segment that would take it above the limit is refused the same way, after the cache was
// handed back.
void set_rss_limit(std::optional<int64_t> limit_bytes);
std::optional<int64_t> rss_limit();

// Test hook (AUTOTUNE_INJECT_OOM_ALLOC, fault_injection.h): counting restarts now, and the
// `nth` non-empty allocation from here on (1-based, any thread) is refused as one over the cap
// is; 0 only counts. allocations_since_armed() says how many were made since.
void arm_allocation_failure(int64_t nth);
int64_t allocations_since_armed();

// Unmaps every pool segment that holds no live block; returns the bytes handed back.
int64_t release_cache();

// While at least one scope is alive, freed pool blocks stay mapped for reuse (thread-safe,
// nestable). When the last one closes, the cache is released.
class CachingScope {
 public:
  CachingScope();
  ~CachingScope();
  CachingScope(const CachingScope&) = delete;
  CachingScope& operator=(const CachingScope&) = delete;
};
bool caching();

}  // namespace autotune::cpu_alloc
