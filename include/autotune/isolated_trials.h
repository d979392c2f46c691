// Isolated trials: each trial of a probe runs in a fresh process of this binary (`autotune trial`,
// started by fork + exec), which starts as a training run of the trial's plan starts: the same
// flags build the same workload, one warm-up step in the plan's precision, the budget's caps, then
// the trial. Its figures are those of the process that will train, never of the probing process
// with the warm-ups, speed tests and earlier trials it would carry (docs/DECISIONS.md).
//
// Where this process may make memory cgroups (cgroup v1, or v2 with the memory controller
// delegated), each trial runs in its own with the budget as its limit, so a kernel kill is
// contained in the trial; everywhere, a trial process asks the kernel's OOM killer to take it
// first (oom_score_adj 1000). A trial killed by the kernel is a refused trial ("Killed at N MiB").
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/tuner.h"

namespace autotune {

// Memory cgroups made per trial under this process's own memory cgroup.
class TrialCgroups {
 public:
  // The parent directory where this process may make child memory cgroups with a limit, or
  // nullopt with the reason in *why.
  static std::optional<TrialCgroups> open(std::string* why);
  // A new cgroup with `limit_bytes` (0: no limit); its directory.
  std::string make(uint64_t limit_bytes);
  // The file a process writes "0" to, to move itself into `dir`.
  std::string procs_file(const std::string& dir) const;
  // The cgroup's peak usage in bytes (v1 max_usage_in_bytes, v2 memory.peak; 0 if unreadable).
  uint64_t peak_bytes(const std::string& dir) const;
  // Processes the kernel's OOM killer killed in the cgroup.
  uint64_t oom_kills(const std::string& dir) const;
  void remove(const std::string& dir) const;
  const std::string& parent() const { return parent_; }

 private:
  std::string parent_;
  bool v2_ = false;
  int made_ = 0;
};

struct IsolatedTrialsOptions {
  // The command's flags after its name: the trial process is `autotune trial <flags>`.
  std::vector<std::string> flags;
  torch::Device device = torch::kCPU;  // the trials' device (a rank's own GPU)
  uint64_t budget_bytes = 0;           // each trial cgroup's limit (0: none)
  // This process's baseline before any trial: the estimator's first guess of a trial's.
  uint64_t baseline_bytes = 0;
  // Accelerator: the device memory this process holds (its context) while its trials run, which
  // a trial must not count as its own (MemoryMeter::exclude_device_bytes).
  uint64_t device_bytes_of_probe = 0;
  // A trial process still running after this long is killed, and the probe stops.
  std::chrono::seconds timeout{3600};
  // Set by the signal handler: the running trial is killed and the probe stops.
  const std::atomic<int>* stop_signal = nullptr;
};

class IsolatedTrials : public TrialRunner {
 public:
  explicit IsolatedTrials(IsolatedTrialsOptions options);
  Trial run(const Plan& plan, const ProbeOptions& probe) override;
  std::vector<std::vector<double>> retime(const std::vector<Trial>& finalists, int rounds,
                                          const ProbeOptions& probe) override;
  double precision_speed(Precision precision) override;
  std::optional<uint64_t> need_bytes(const Plan& plan, const ProbeOptions& probe) override;
  uint64_t baseline_bytes() const override { return baseline_bytes_; }

  // Trial processes started so far.
  int processes() const { return processes_; }
  // Where trials run: "memory cgroups under DIR" or why not.
  const std::string& containment() const { return containment_; }

 private:
  struct Outcome {
    std::optional<nlohmann::json> result;  // the trial process's answer
    bool killed = false;                   // SIGKILL (the kernel's OOM killer, or a limit)
    uint64_t killed_at_bytes = 0;          // its cgroup's peak, or the largest RSS seen
    int exit_code = 0;                     // exit status, or 128 + signal
    std::string last_line;                 // the last line it wrote to stderr
  };
  // Starts `autotune trial` with `request`, waits for it, and reads its answer. `limit`: put it
  // in a memory cgroup with the budget as its limit (where cgroups can be made).
  Outcome spawn(const nlohmann::json& request, bool limit);
  // The request of a "trial" or "need" process: one plan, the probe options, this device.
  nlohmann::json plan_request(const char* kind, const Plan& plan, const ProbeOptions& probe) const;
  nlohmann::json answer(const Outcome& o, const char* what) const;

  IsolatedTrialsOptions opt_;
  std::optional<TrialCgroups> cgroups_;
  std::string containment_;
  uint64_t baseline_bytes_ = 0;
  std::map<Precision, double> speeds_;
  int processes_ = 0;
};

// `autotune trial`: the child side. Reads the request from AUTOTUNE_TRIAL_REQUEST, writes its
// answer as one JSON line to the file descriptor AUTOTUNE_TRIAL_FD.
struct RunSpec;
int trial_command(const RunSpec& spec);

}  // namespace autotune
