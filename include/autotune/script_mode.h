// Script mode: `autotune [run|probe] --budget SIZE --global-batch N -- COMMAND [ARGS...]` tunes
// the user's own training command. Each trial is the command itself, run with a trial plan for a
// few optimizer steps in a memory cgroup of its own (the budget as its limit) and measured from
// outside: the peak of its whole process tree (DataLoader workers included). The command reads
// its plan with the Python client (python/autotune: autotune.plan(), autotune.step()); the
// environment variables and the report lines between them are the contract below.
//
// The search is the built-in workloads' search (tune(), tuner.h) through the same TrialRunner
// interface; the command is described to it by a ScriptWorkload, which trains nothing itself.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/isolated_trials.h"
#include "autotune/tuner.h"
#include "autotune/workload.h"

namespace autotune {

class Nvml;  // src/memory/nvml.h

// The contract with python/autotune (the names users' scripts rely on, through the client).
inline constexpr const char* kScriptPlanEnv = "AUTOTUNE_PLAN";           // the plan, JSON
inline constexpr const char* kScriptRoleEnv = "AUTOTUNE_ROLE";           // describe | trial | run
inline constexpr const char* kScriptStepsEnv = "AUTOTUNE_TRIAL_STEPS";   // a trial's steps
inline constexpr const char* kScriptReportFdEnv = "AUTOTUNE_REPORT_FD";  // JSON lines to autotune
// On an accelerator: the device (cuda:N), the budget, and the device memory in use outside the
// command when it started (other processes, autotune's own context), which is not its own.
inline constexpr const char* kScriptDeviceEnv = "AUTOTUNE_DEVICE";
inline constexpr const char* kScriptDeviceBudgetEnv = "AUTOTUNE_DEVICE_BUDGET_BYTES";
inline constexpr const char* kScriptDeviceOutsideEnv = "AUTOTUNE_DEVICE_OUTSIDE_BYTES";

// What the command's autotune.plan() call declared, asked once before the first trial.
struct ScriptInfo {
  bool applies_precision = false;      // plan(precision=...) given: its precision is searched
  bool applies_checkpointing = false;  // plan(checkpointing=...) given
  nlohmann::json knobs = nlohmann::json::object();  // the other declared knobs, at its values
  nlohmann::json defaults;  // the script's own global_batch, micro_batch, precision, ...
  double start_s = 0;       // from starting the command to its plan() call
};

struct ScriptOptions {
  std::vector<std::string> command;  // argv of the user's command
  uint64_t budget_bytes = 0;         // each run's memory cgroup limit: the host budget (0: none)
  // On an accelerator, the budget of its memory: the client keeps the caching allocator under
  // it and reports peak reserved + context, which the driver's figure (NVML) cross-checks.
  uint64_t device_budget_bytes = 0;
  // A command that reports no step for this long is stopped: it never calls autotune.step().
  std::chrono::seconds step_timeout{600};
  const std::atomic<int>* stop_signal = nullptr;  // the user's Ctrl-C: the child is stopped
  // The full run's standard output goes to this process's standard error (--json keeps stdout
  // for its one document).
  bool output_to_stderr = false;
  torch::Device device = torch::kCPU;
};

// One run of the command: a trial, or the full run.
struct ScriptRun {
  int exit_code = 0;               // 128 + signal where a signal ended it
  bool killed = false;             // killed by the kernel (its cgroup's limit, or the machine's)
  bool oom = false;                // it said it ran out of memory (Python MemoryError, torch's OOM)
  uint64_t peak_bytes = 0;         // the budget figure: host_peak_bytes, or on an accelerator the
                                   // larger of device_peak_bytes and driver_peak_bytes
  uint64_t host_peak_bytes = 0;    // its process tree's peak: the cgroup's, else polled PSS
  uint64_t device_peak_bytes = 0;  // the client's: peak reserved + context, over its steps
  uint64_t driver_peak_bytes = 0;  // NVML's, polled, for its process group (0: not read)
  nlohmann::json plan_event;       // what plan() reported (null: it never called autotune.plan())
  std::vector<nlohmann::json> steps;  // its step reports, in order
  std::string last_line;              // the last line of its output (trials and describe)
  double process_s = 0;               // start to exit

  bool planned() const { return !plan_event.is_null(); }
  // Samples per second over the steps after the first, which carries the start-up (workers
  // forking, first allocations); the seconds those steps took in *wall_s. 0 with fewer than 2.
  double samples_per_s(double* wall_s = nullptr) const;
};

// A command as one line, for messages and hints: an argument with blanks or quotes in quotes.
std::string command_line(const std::vector<std::string>& command);

class ScriptTrials : public TrialRunner {
 public:
  explicit ScriptTrials(ScriptOptions options);
  ~ScriptTrials() override;

  // Runs the command once to its autotune.plan() call. Throws RuntimeError with one line when it
  // fails before that or never calls it.
  ScriptInfo describe();

  Trial run(const Plan& plan, const ProbeOptions& probe) override;
  std::vector<std::vector<double>> retime(const std::vector<Trial>& finalists, int rounds,
                                          const ProbeOptions& probe) override;
  // matmul_speed_vs_fp32 in this process: in script mode it trains nothing itself, so the test
  // leaves nothing in a process that is measured.
  double precision_speed(Precision precision) override;
  std::optional<uint64_t> need_bytes(const Plan& plan, const ProbeOptions& probe) override;
  uint64_t baseline_bytes() const override { return baseline_bytes_; }

  // The full run: the command to its end with `plan`, its output passed through to this
  // process's. Throws RuntimeError with one line for a command that ignores the plan.
  ScriptRun train(const Plan& plan);

  int processes() const { return processes_; }
  const std::string& containment() const { return containment_; }
  // How the accelerator's figure is cross-checked (NVML), for the "trials:" line; empty on CPU.
  const std::string& device_check() const { return device_check_; }
  // The command as one line, for messages.
  std::string command_line() const { return autotune::command_line(opt_.command); }

 private:
  enum class Role { describe, trial, run };
  ScriptRun spawn(Role role, const Plan* plan, int64_t steps, bool limit);
  // The accelerator's entries of the command's environment (none on the CPU). Without `limit`
  // the budget passed is 0: the client measures but does not cap the allocator, as a run
  // without `limit` has no cgroup limit (the need of "nothing fits", retimings).
  std::vector<std::string> device_environment(bool limit);
  // A run's figures once it ended: the host tree's (its cgroup's, removed here, else the polled
  // one), the device's, and the budget figure.
  void settle_figures(ScriptRun& r, const std::string& cgroup, uint64_t polled_peak_bytes);
  // One trial of exactly `plan` (run() may lower its workers after it).
  Trial trial_of(const Plan& plan, const ProbeOptions& probe);
  // The plan's trial (`steps` optimizer steps), checked for a command that ignores the plan.
  ScriptRun checked_trial(const Plan& plan, int64_t steps, bool limit);
  void check_follows(const ScriptRun& r, const Plan& plan) const;

  ScriptOptions opt_;
  ScriptInfo info_;           // from describe()
  int64_t workers_cap_ = -1;  // the fewest DataLoader workers a fitting plan needed (-1: none)
  std::optional<TrialCgroups> cgroups_;
  std::string containment_;
  std::unique_ptr<Nvml> nvml_;  // on an accelerator where the driver's library loads
  std::string device_check_;
  bool driver_above_said_ = false;
  std::map<Precision, double> speeds_;          // precision_speed's answers
  uint64_t device_outside_bytes_ = UINT64_MAX;  // device memory in use before a command started
  uint64_t baseline_bytes_ = 0;
  int processes_ = 0;
};

// The command as the tuner sees it: a workload with no model of its own (every figure is
// measured), whose knobs are what its plan() call declared.
class ScriptWorkload : public Workload {
 public:
  ScriptWorkload(std::vector<std::string> command, ScriptInfo info);
  std::string kind() const override { return "script"; }
  std::string model_name() const override { return name_; }
  nlohmann::json config() const override;
  WorkloadKnobs knobs() const override;
  int64_t default_seq_len() const override { return 0; }
  int64_t default_width() const override { return 0; }
  void validate(const Plan& plan) const override;
  int64_t tokens_per_sequence(const Plan&) const override { return 1; }
  std::string throughput_unit() const override { return "samples"; }
  std::string describe_data() const override { return "the command's own"; }
  std::shared_ptr<TrainableModel> build(const Plan&, torch::Device, uint64_t) override;
  Batch train_batch(int64_t, int64_t, int64_t, const Plan&, torch::Device) override;
  Batch val_batch(int64_t, int64_t, const Plan&, torch::Device) override;
  EstimateTerms estimate_terms(const Plan& plan) const override;
  const ScriptInfo& info() const { return info_; }
  // Set once the command has been asked (ScriptTrials::describe), before the search.
  void set_info(ScriptInfo info) { info_ = std::move(info); }

 private:
  std::vector<std::string> command_;
  ScriptInfo info_;
  std::string name_;
  std::string script_digest_;  // of the script file the command runs, where one is named
};

}  // namespace autotune
