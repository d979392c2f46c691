// What every training command shares: the device, the workload, the memory meter with the budget
// applied, signal handling, and the observers (console, memory monitor). Commands build one
// RunContext from the RunSpec and hand it plans.
#pragma once
#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "autotune/machine.h"
#include "autotune/memory.h"
#include "autotune/memory_monitor.h"
#include "autotune/run_spec.h"
#include "autotune/trainer.h"
#include "autotune/workload.h"

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
  MemoryMeter& meter() { return *meter_; }
  std::optional<uint64_t> budget_bytes() const { return budget_bytes_; }
  uint64_t margin_bytes() const { return margin_bytes_; }
  // Bytes a plan may use by the budget figure: budget - margin.
  std::optional<uint64_t> usable_bytes() const;

  // Applies the budget as a hard limit: on CPU the counting allocator's cap (budget - margin -
  // baseline), on CUDA the caching allocator's memory fraction. No budget: no cap.
  void enforce_budget();

  TrainOptions train_options() const;
  void print_settings(const Plan& plan, const std::string& plan_source) const;
  // Trains with console output and the memory monitor; the monitor's figures go in summary_json.
  RunSummary train(const Plan& plan);
  nlohmann::json summary_json(const RunSummary& s) const;
  int exit_code(const RunSummary& s) const;
  const MemoryMonitor* monitor() const { return monitor_.get(); }

  static const std::atomic<int>& stop_signal();

 private:
  RunSpec spec_;
  torch::Device device_;
  std::unique_ptr<Workload> workload_;
  std::unique_ptr<MemoryMeter> meter_;
  std::optional<uint64_t> budget_bytes_;
  uint64_t margin_bytes_ = 0;
  ModeChoice mode_;
  ModePolicy policy_;
  std::unique_ptr<MemoryMonitor> monitor_;
};

void install_signal_handlers();

}  // namespace autotune
