// Reading the machine and choosing the memory mode. On a small machine (little RAM or device
// memory for the budget asked) autotune picks ultra-low-mem by itself and says why.
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "autotune/run_spec.h"

namespace autotune {

struct MachineFacts {
  uint64_t total_bytes = 0;      // MemTotal, or the cgroup limit if smaller
  uint64_t available_bytes = 0;  // MemAvailable, or cgroup headroom if smaller
  std::string source;            // "/proc/meminfo", "cgroup", or "AUTOTUNE_FAKE_MEM_* (testing)"
};

// The real figures, unless AUTOTUNE_FAKE_MEM_TOTAL / AUTOTUNE_FAKE_MEM_AVAILABLE (sizes like
// "8G") substitute them: a documented testing aid that makes the mode choice reproducible.
MachineFacts read_machine_facts();

struct ModeChoice {
  Mode mode = Mode::normal;  // never auto_
  std::string reason;        // one line
};

// Thresholds (docs/DECISIONS.md): ultra-low when RAM total < 16 GiB or available RAM < budget +
// 2 GiB reserve; low when available RAM < 2 x budget + 2 GiB; else normal. A forced --mode wins.
ModeChoice choose_mode(Mode requested, std::optional<uint64_t> budget_bytes,
                       const MachineFacts& facts);

// What each mode changes.
struct ModePolicy {
  bool start_small = false;    // tuner starts from the smallest micro-batch
  int64_t eval_batch_cap = 0;  // 0: no cap
  bool pread_data = true;      // windows through positioned reads (false: a memory map)
  uint64_t cache_bytes = 0;    // sample cache cap
  int64_t prefetch_batches = 2;
  bool release_between_phases = false;
  int64_t monitor_every_steps = 50;
  // Train batches built in page-locked host memory, so their copies to an accelerator run
  // asynchronously (non_blocking); set from the device, not the mode.
  bool pin_memory = false;
};
ModePolicy policy_for(Mode mode, std::optional<uint64_t> budget_bytes);

// An accelerator's memory against its budget, not the host's RAM: ultra-low on a small device
// (under 8 GiB), low where less is free than the budget asks (other processes share the device),
// else normal. A forced --mode wins.
ModeChoice choose_device_mode(Mode requested, std::optional<uint64_t> budget_bytes,
                              uint64_t device_total_bytes, uint64_t device_free_bytes);
// An accelerator run's policy: the device-side settings (start small, eval batch cap, releasing
// caches between phases) from the device's mode; the host-side ones (read mode, sample cache,
// prefetch) from the host's mode and the host budget.
ModePolicy policy_for(Mode device_mode, std::optional<uint64_t> device_budget_bytes, Mode host_mode,
                      uint64_t host_budget_bytes);
// The host budget of an accelerator run without --host-budget: the available RAM less the 2 GiB
// reserve, at least 512 MiB.
uint64_t default_host_budget(const MachineFacts& host);

}  // namespace autotune
