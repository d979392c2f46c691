// MemoryMonitor: per-phase peaks of every step (forward, backward, optimizer, eval), a line every
// N steps, one warning when the budget figure or the system crosses 90%, a JSONL timeline for
// plots, and the end-of-run summary (peak, when, which phase). Attaches to the trainer as an
// observer, so the training loop carries no measurement code.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/memory.h"
#include "autotune/trainer.h"
#include "util/jsonl_log.h"

namespace autotune {

struct PhasePeak {
  int64_t step = 0;  // 0-based optimizer step the phase belonged to
  Phase phase = Phase::forward;
  uint64_t budget_bytes = 0;         // the budget figure's peak during the phase
  uint64_t tensor_bytes = 0;         // CPU tensor peak (counting allocator)
  uint64_t tensor_growth_bytes = 0;  // of which allocated during the phase (peak - at its start)
  uint64_t device_bytes = 0;         // accelerator peak allocated
  uint64_t rss_bytes = 0;            // process peak RSS
  uint64_t reserved_bytes = 0;       // CPU counting allocator's peak reserved (tensors + cache)
};

struct MemoryMonitorOptions {
  std::optional<uint64_t> budget_bytes;
  int64_t every_steps = 10;   // a memory line every N steps (0: never)
  std::string timeline_path;  // JSONL; empty: none
  double warn_fraction = 0.9;
  bool keep_history = false;  // keep every PhasePeak (tests, probes)
  bool log_summary = true;    // the end-of-run peak line (off for probe trials)
  // Workload::data_report(), appended to the memory line (cache hits, bytes in use, prefetch).
  std::function<nlohmann::json()> data_report;
};

class MemoryMonitor : public TrainObserver {
 public:
  MemoryMonitor(MemoryMeter& meter, MemoryMonitorOptions options);

  // A resumed run: the timeline's records past the resumed step are dropped (they repeat).
  void on_start(const Plan& plan, const TrainOptions& opt, int64_t first_step) override;
  void on_phase_begin(Phase phase) override;
  void on_phase_end(Phase phase, int64_t step) override;
  void on_step(const StepStats& s) override;
  void on_recovery(const Recovery& r) override;  // an "oom_recovery" event in the timeline
  void on_end(const RunSummary& s) override;

  // Largest budget figure seen, and where.
  uint64_t peak_budget_bytes() const { return peak_.budget_bytes; }
  const PhasePeak& peak() const { return peak_; }
  // Per phase: the largest of each meter over the run.
  const std::map<Phase, PhasePeak>& phase_peaks() const { return by_phase_; }
  const std::vector<PhasePeak>& history() const { return history_; }
  bool warned() const { return warned_; }
  // The --json "memory" object: peak_bytes (the budget figure), per phase and per meter, and the
  // allocators' refusals and retries during the run.
  nlohmann::json to_json() const;
  // Since the monitor started: allocations refused (the CPU cap, the device allocator) and the
  // device allocator's retries (it freed its cache and tried again: the early sign of thrashing).
  struct AllocatorEvents {
    uint64_t host_ooms = 0, device_ooms = 0, device_alloc_retries = 0;
  };
  AllocatorEvents allocator_events() const;

 private:
  uint64_t heap_trims_ = 0, heap_trimmed_bytes_ = 0;  // trim_heap_above's work in this run
  void check_thresholds(const MemorySample& s, uint64_t budget_figure);
  MemoryMeter& meter_;
  MemoryMonitorOptions opt_;
  std::map<Phase, PhasePeak> by_phase_;
  std::vector<PhasePeak> history_;
  PhasePeak peak_;
  bool warned_ = false;
  JsonlLog timeline_;
  uint64_t tensor_at_begin_ = 0;
  AllocatorEvents start_;  // the process-wide counters when the monitor started
};

}  // namespace autotune
