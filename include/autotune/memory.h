// Memory truth on every device: the CPU counting allocator (with an optional cap that throws
// c10::OutOfMemoryError exactly like the CUDA caching allocator), the process/system readers, and
// MemoryMeter, which answers "what is the budget figure right now and at its peak".
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include <torch/torch.h>

namespace autotune {

// The CPU counting allocator (cpu_alloc::, src/memory/cpu_allocator.h) is installed by
// MemoryMeter and kept for the life of the process.

// ---- process and system readers (Linux /proc and cgroup files) ---------------------------------
struct ProcessMemory {
  uint64_t rss_bytes = 0;       // VmRSS
  uint64_t peak_rss_bytes = 0;  // VmHWM
};
// Parse a /proc/<pid>/status file; missing or odd fields read as 0, never throw.
ProcessMemory read_process_memory(const std::string& status_path = "/proc/self/status");

// Reset VmHWM to the current RSS by writing "5" to /proc/self/clear_refs. False where the kernel
// or the sandbox does not allow it (then peaks are since process start).
bool reset_peak_rss(const std::string& clear_refs_path = "/proc/self/clear_refs");

struct SystemMemory {
  uint64_t total_bytes = 0;                    // MemTotal
  uint64_t available_bytes = 0;                // MemAvailable
  std::optional<uint64_t> cgroup_limit_bytes;  // memory.max (v2) or limit_in_bytes (v1), if set
  std::optional<uint64_t> cgroup_usage_bytes;  // memory.current / usage_in_bytes
  // The machine as the process sees it: min(MemTotal, cgroup limit).
  uint64_t effective_total_bytes() const;
  // min(MemAvailable, cgroup limit - usage).
  uint64_t effective_available_bytes() const;
};
SystemMemory read_system_memory(const std::string& meminfo_path = "/proc/meminfo",
                                const std::string& cgroup_root = "/sys/fs/cgroup");
// Same, with the process's cgroup membership read from `proc_cgroup_path` (format of
// /proc/self/cgroup): the limit is the smallest one on the path from the process's own cgroup up
// to `cgroup_root`, under cgroup v2 (`cgroup_root` or `cgroup_root`/unified) and v1
// (`cgroup_root`/memory). The two-argument form uses /proc/self/cgroup for the real root only.
SystemMemory read_system_memory(const std::string& meminfo_path, const std::string& cgroup_root,
                                const std::string& proc_cgroup_path);

// ---- device-generic meter ----------------------------------------------------------------------
struct MemorySample {
  // Device (accelerator caching allocator; zero on CPU)
  uint64_t device_allocated_bytes = 0;
  uint64_t device_peak_allocated_bytes = 0;
  uint64_t device_reserved_bytes = 0;
  uint64_t device_peak_reserved_bytes = 0;
  uint64_t device_num_ooms = 0;
  uint64_t device_num_alloc_retries = 0;
  uint64_t device_total_bytes = 0;
  uint64_t device_free_bytes = 0;
  // Host
  uint64_t tensor_bytes = 0;         // CPU counting allocator: allocated, current
  uint64_t peak_tensor_bytes = 0;    // since the last reset
  uint64_t reserved_bytes = 0;       // CPU counting allocator: reserved (tensors + its cache)
  uint64_t peak_reserved_bytes = 0;  // since the last reset
  uint64_t rss_bytes = 0;
  uint64_t peak_rss_bytes = 0;  // since the last reset (if the reset works)
  // What the budget is compared against (see budget_figure()).
  uint64_t budget_bytes_now = 0;
  uint64_t budget_bytes_peak = 0;
};

class MemoryMeter {
 public:
  // Installs the CPU counting allocator if needed and measures the process baseline (RSS not
  // reserved by the allocator: libtorch, code, data buffers) once. Whether VmHWM can be reset is
  // probed once per process; AUTOTUNE_NO_PEAK_RSS_RESET=1 forces the fallback (baseline + tensor
  // peak).
  explicit MemoryMeter(torch::Device device);

  torch::Device device() const { return device_; }
  bool is_accelerator() const { return device_.type() != c10::DeviceType::CPU; }
  bool peak_rss_resettable() const { return peak_rss_resettable_; }
  uint64_t baseline_bytes() const { return baseline_bytes_; }
  // Accelerator: the device memory held outside the caching allocator (the CUDA context, loaded
  // kernels, cuBLAS/cuDNN handles), measured with the baseline; 0 on CPU. The budget figure and
  // the memory fraction use this one number.
  uint64_t context_bytes() const { return context_bytes_; }
  // Accelerator: device bytes held by other processes that this one must not count as its
  // context, subtracted from every later measurement. A trial process is told its probe's own
  // (the probe holds a context while its trials run; the run that trains after it does not see
  // the trials'). 0 on CPU.
  void exclude_device_bytes(uint64_t bytes) {
    excluded_device_bytes_ = bytes;
    remeasure_baseline();
  }
  // Re-measure the baseline (and an accelerator's context) now: call after a warm-up step, when
  // no training tensors are alive, so libraries' one-time growth is in them.
  void remeasure_baseline();

  // Start of a phase: device peak stats, CPU tensor peak and VmHWM all restart from now.
  void reset_peaks();
  MemorySample sample() const;

  // The budget figure (DESIGN.md, "What the budget means"):
  //   accelerator: peak reserved by the caching allocator + the context (total - free - reserved
  //                at construction);
  //   CPU: peak RSS of the process, and never below baseline + peak reserved bytes (the
  //        allocator's exact count of what it held); where VmHWM cannot be reset, baseline +
  //        peak reserved bytes (never below the RSS seen now). An accelerator device that is not
  //        present (CPU-only build, no GPU) has no device stats and gets the CPU figure.
  uint64_t budget_figure_peak(const MemorySample& s) const;
  uint64_t budget_figure_now(const MemorySample& s) const;

  // Releases cached blocks of the accelerator and of the CPU allocator, and trims the C heap.
  void release_cache() const;
  // CPU: when RSS holds more than `slack_bytes` beyond the baseline and the allocator's reserved
  // bytes (free heap the C library kept: fragmentation of the loader thread's arena, freed
  // small blocks), hands it back with malloc_trim. Returns the bytes RSS fell by (0: no trim).
  uint64_t trim_heap_above(uint64_t slack_bytes) const;

 private:
  torch::Device device_;
  // The device is the accelerator this LibTorch was built for and one is present: only then are
  // the caching allocator's stats read (a CPU-only build or a GPU-less machine never throws).
  bool accelerator_stats_ = false;
  bool peak_rss_resettable_ = false;
  uint64_t baseline_bytes_ = 0;
  uint64_t context_bytes_ = 0;  // accelerator: memory held outside the caching allocator
  uint64_t excluded_device_bytes_ = 0;
};

// Total and free memory of the device: accelerator via at::accelerator::getMemoryInfo, CPU via
// the effective system memory. Used by ultra-low-mem detection and "80%" budgets.
struct DeviceMemoryInfo {
  std::string name;  // "cpu", "cuda:0 <name>"
  uint64_t total_bytes = 0;
  uint64_t free_bytes = 0;
};
DeviceMemoryInfo device_memory_info(torch::Device device);

// Accelerator-only budget enforcement: the CUDA caching allocator's per-process memory fraction,
// set to (budget - context) / total, so reserved + context stays within the budget. The context
// is the meter's measurement (MemoryMeter::context_bytes). budget 0 lifts the cap. No-op
// returning false on CPU and on LibTorch builds without CUDA.
bool enforce_device_budget(torch::Device device, uint64_t budget_bytes, uint64_t context_bytes);

}  // namespace autotune
