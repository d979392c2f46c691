#include "autotune/machine.h"

#include <algorithm>
#include <cstdlib>

#include "autotune/memory.h"
#include "autotune/size.h"

namespace autotune {

namespace {
constexpr uint64_t kGiB = uint64_t{1} << 30;
constexpr uint64_t kReserveBytes = 2 * kGiB;        // for the OS and the rest of the machine
constexpr uint64_t kSmallMachineBytes = 16 * kGiB;  // seed 003: a 16 GB machine is "small"
constexpr uint64_t kSmallDeviceBytes = 8 * kGiB;    // a GPU smaller than this is "small"
}  // namespace

MachineFacts read_machine_facts() {
  MachineFacts f;
  const SystemMemory sys = read_system_memory();
  f.total_bytes = sys.effective_total_bytes();
  f.available_bytes = sys.effective_available_bytes();
  f.source = sys.cgroup_limit_bytes ? "/proc/meminfo and the cgroup limit" : "/proc/meminfo";
  const char* total = std::getenv("AUTOTUNE_FAKE_MEM_TOTAL");
  const char* avail = std::getenv("AUTOTUNE_FAKE_MEM_AVAILABLE");
  if (total && *total) f.total_bytes = parse_size(total);
  if (avail && *avail) f.available_bytes = parse_size(avail);
  if ((total && *total) || (avail && *avail))
    f.source = "AUTOTUNE_FAKE_MEM_TOTAL/AVAILABLE (testing aid)";
  return f;
}

ModeChoice choose_mode(Mode requested, std::optional<uint64_t> budget_bytes,
                       const MachineFacts& facts) {
  if (requested != Mode::auto_) return {requested, "--mode " + to_string(requested) + " given"};
  const uint64_t budget = budget_bytes.value_or(0);
  const std::string figures = format_bytes(facts.available_bytes) + " available of " +
                              format_bytes(facts.total_bytes) + " (" + facts.source + ")";
  if (facts.total_bytes < kSmallMachineBytes)
    return {Mode::ultra_low, "ultra-low-mem: a small machine, " + figures + " is under 16 GiB"};
  if (facts.available_bytes < budget + kReserveBytes)
    return {Mode::ultra_low, "ultra-low-mem: " + figures + " is less than the budget " +
                                 format_bytes(budget) + " plus a 2 GiB reserve"};
  if (facts.available_bytes < 2 * budget + kReserveBytes)
    return {Mode::low, "low-mem: " + figures + " is less than twice the budget plus 2 GiB"};
  return {Mode::normal, "normal: " + figures};
}

ModePolicy policy_for(Mode mode, std::optional<uint64_t> budget_bytes) {
  ModePolicy p;
  const uint64_t budget = budget_bytes.value_or(4 * kGiB);
  // Every mode reads windows with pread: a memory-mapped data file's touched pages count in the
  // process's RSS, which is the budget figure, and grow without bound with a large data set; a
  // window's pread costs about a microsecond.
  p.pread_data = true;
  switch (mode) {
    case Mode::ultra_low:
      p.start_small = true;
      p.eval_batch_cap = 2;
      p.cache_bytes = 0;
      p.prefetch_batches = 1;
      p.release_between_phases = true;
      p.monitor_every_steps = 10;
      break;
    case Mode::low:
      p.eval_batch_cap = 4;
      p.cache_bytes = std::min<uint64_t>(budget / 256, 4ull << 20);
      p.prefetch_batches = 1;
      p.monitor_every_steps = 20;
      break;
    default:
      // Training windows are random (a cache rarely hits them); the validation windows repeat
      // every evaluation, and a few MiB hold them. The cache is RSS inside the budget, so small.
      p.cache_bytes = std::min<uint64_t>(budget / 64, 16ull << 20);
      break;
  }
  return p;
}

ModeChoice choose_device_mode(Mode requested, std::optional<uint64_t> budget_bytes,
                              uint64_t device_total_bytes, uint64_t device_free_bytes) {
  if (requested != Mode::auto_) return {requested, "--mode " + to_string(requested) + " given"};
  const uint64_t budget = budget_bytes.value_or(0);
  const std::string figures = format_bytes(device_free_bytes) + " free of " +
                              format_bytes(device_total_bytes) + " on the device";
  if (device_total_bytes < kSmallDeviceBytes)
    return {Mode::ultra_low, "ultra-low-mem: a small device, " + figures + " is under 8 GiB"};
  if (device_free_bytes < budget)
    return {Mode::low, "low-mem: " + figures + " is less than the budget " + format_bytes(budget) +
                           " (other processes share the device)"};
  return {Mode::normal, "normal: " + figures};
}

ModePolicy policy_for(Mode device_mode, std::optional<uint64_t> device_budget_bytes, Mode host_mode,
                      uint64_t host_budget_bytes) {
  ModePolicy p = policy_for(device_mode, device_budget_bytes);
  const ModePolicy host = policy_for(host_mode, host_budget_bytes);
  p.pread_data = host.pread_data;
  p.cache_bytes = host.cache_bytes;
  p.prefetch_batches = host.prefetch_batches;
  return p;
}

uint64_t default_host_budget(const MachineFacts& host) {
  const uint64_t avail =
      host.available_bytes > kReserveBytes ? host.available_bytes - kReserveBytes : 0;
  return std::max<uint64_t>(avail, 512ull << 20);
}

}  // namespace autotune
