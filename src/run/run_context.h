// What every training command shares: the device, the workload, the memory meter with the budget
// applied, signal handling, and the observers (console, memory monitor). Commands build one
// RunContext from the RunSpec and hand it plans.
#pragma once
#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "autotune/distributed.h"
#include "autotune/machine.h"
#include "autotune/memory.h"
#include "autotune/run_spec.h"
#include "autotune/trainer.h"
#include "autotune/workload.h"
#include "train/memory_monitor.h"

namespace autotune {

class RunContext {
 public:
  explicit RunContext(const RunSpec& spec);
  ~RunContext();

  // The spec after a --preset was applied.
  const RunSpec& spec() const { return spec_; }
  const ModeChoice& mode() const { return mode_; }
  const ModePolicy& policy() const { return policy_; }
  torch::Device device() const { return device_; }
  Workload& workload() { return *workload_; }
  const Workload& workload() const { return *workload_; }
  MemoryMeter& meter() { return *meter_; }
  std::optional<uint64_t> budget_bytes() const { return budget_bytes_; }
  uint64_t margin_bytes() const { return margin_bytes_; }
  // Accelerator runs: the host RAM budget (--host-budget, or derived from available RAM),
  // enforced by the CPU allocator as on CPU; nullopt on CPU, where --budget is the host's.
  std::optional<uint64_t> host_budget_bytes() const { return host_budget_bytes_; }
  // The low precision that is fast on this device (bf16, or fp16 on older GPUs).
  Precision low_precision() const { return low_precision_; }
  // Bytes a plan may use by the budget figure: budget - margin.
  std::optional<uint64_t> usable_bytes() const;

  // One uncapped micro-batch-1 step in each of `precisions` (a run: its plan's one), then the
  // baseline (and an accelerator's context) measured again: LibTorch's one-time growth (kernel
  // registries, thread pools, the oneDNN primitives and scratch that low-precision matmuls keep
  // for the life of the process, the CUDA context's lazily loaded kernels, cuBLAS handles) is
  // paid here, outside every figure, so the caps derived from the baseline are exact. A trial
  // process does the same for its plan, so its figures are the run's.
  void warm_up(const std::vector<Precision>& precisions);
  // Applies the budgets as hard limits: on CPU the counting allocator's cap and the RSS limit
  // (the budget); on an accelerator the caching allocator's memory fraction (budget - context) and
  // the host budget through the CPU allocator. No budget: no cap. The host cap is budget -
  // baseline for a run, whose plan fits budget - margin in its trial: the margin is the run's
  // room for fragmentation and the longest batch (DESIGN.md). A trial (`for_trial`) is capped at
  // budget - margin - baseline, so a plan above the usable bytes fails fast.
  void enforce_budget(bool for_trial = false);

  TrainOptions train_options() const;
  void print_settings(const Plan& plan, const std::string& plan_source) const;
  // Trains with console output and the memory monitor; the monitor's figures go in summary_json.
  RunSummary train(const Plan& plan);
  nlohmann::json summary_json(const RunSummary& s) const;
  // With ranks: every rank's figures (budget, peaks, plan, params digest, all-reduce time),
  // gathered to rank 0 for its --json summary; every rank calls it. `verified_peak`: the peak of
  // the plan's verification trial, 0 when none ran.
  nlohmann::json rank_figures(const RunSummary& s, uint64_t verified_peak);
  int exit_code(const RunSummary& s) const;
  const MemoryMonitor* monitor() const { return monitor_.get(); }
  // Data parallel: this rank's communicator (null in a world of one).
  Communicator* comm() const { return comm_.get(); }
  int world_size() const { return comm_ ? comm_->size() : 1; }
  int rank() const { return comm_ ? comm_->rank() : 0; }

  static const std::atomic<int>& stop_signal();

 private:
  RunSpec spec_;
  torch::Device device_;
  std::unique_ptr<Workload> workload_;
  std::unique_ptr<MemoryMeter> meter_;
  std::optional<uint64_t> budget_bytes_;
  uint64_t margin_bytes_ = 0;
  std::optional<uint64_t> host_budget_bytes_;
  bool device_budget_enforced_ = true;  // false: an accelerator without a per-process limit
  Precision low_precision_ = Precision::bf16;
  ModeChoice mode_, host_mode_;
  ModePolicy policy_;
  std::unique_ptr<MemoryMonitor> monitor_;
  std::unique_ptr<Communicator> comm_;
};

void install_signal_handlers();

}  // namespace autotune
