// The tuner: finds the fastest plan whose measured peak fits the budget. It talks to a Workload
// (never a concrete model) for the estimator's terms, and to a TrialRunner for every measurement.
//
//   Trial   : a fresh model, 1 warm-up step + N measured steps (the first optimizer step, with its
//             AdamW states, included) + one evaluation forward, under the budget's hard cap; OOM
//             is caught by type. Where it runs is the TrialRunner's business: in a fresh process
//             started as a training run of its plan starts (IsolatedTrials, the product's way), or
//             in the caller's process (InProcessTrials, for tests of the search).
//   Search  : model (estimator ranks, predict the largest fitting micro-batch from the line
//             peak = a + b*micro_batch, measure, correct the line with each measured peak, repeat),
//             power (Lightning's BatchSizeFinder), halve (Accelerate's find_executable_batch_size).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "autotune/memory.h"
#include "autotune/plan.h"
#include "autotune/workload.h"

namespace autotune {
class Communicator;
}

namespace autotune {

struct Trial {
  Plan plan;
  bool fits = false;
  bool oom = false;            // c10::OutOfMemoryError during the trial
  bool killed = false;         // killed by the kernel (its memory cgroup's limit, or the machine's)
  uint64_t peak_bytes = 0;     // the budget figure's peak (0 when it OOMed before measuring;
                               // killed: the memory it held when the kernel killed it)
  nlohmann::json phase_peaks;  // {forward: bytes, backward: ..., optimizer: ..., eval: ...}
  double tokens_per_s = 0;     // measured steps only (warm-up excluded)
  double wall_s = 0;           // the trial's steps, from its first to its last
  double process_s = 0;        // isolated: its process's whole life (start, warm-up, trial, exit)
  int64_t steps_run = 0;
  bool too_slow = false;  // stopped early: proven below ProbeOptions::stop_below_tokens_per_s
  bool error = false;     // failed for a reason other than memory (unsupported op, bad data)
  int timings = 1;        // tokens_per_s is the median of this many timings (finalists: 3)
  std::string reason;     // why rejected, or "fits"
};
void to_json(nlohmann::json& j, const Trial& t);
void from_json(const nlohmann::json& j, Trial& t);

// The line peak = a + b * micro_batch the model search fitted for one (precision, checkpointing)
// pair of one task shape. Kept in the profile, so a report of it draws what the search saw.
struct SearchLine {
  Precision precision = Precision::fp32;
  bool checkpointing = false;
  int64_t optimizer_shards = 1;
  int64_t seq_len = 0, d_model = 0;  // 0: the workload's
  double a_bytes = 0;                // the budget figure at micro-batch 0
  double b_bytes = 0;                // per sequence of the micro-batch
  bool measured = false;             // through measured peaks (else the estimator's line)
};
void to_json(nlohmann::json& j, const SearchLine& l);
void from_json(const nlohmann::json& j, SearchLine& l);

struct ProbeOptions {
  uint64_t usable_bytes = 0;  // budget - margin: a plan fits when its peak is at most this
  int64_t measured_steps = 2;
  // A fitting trial whose measured steps took less than this is timed again, for at least this
  // long, without the memory monitor: on a shared machine short steps vary enough to rank a
  // slower plan first (like google/benchmark's minimum time; the noise: docs/BENCHMARKS.md).
  double min_measure_s = 1.0;
  uint64_t seed = 1337;
  torch::Device device = torch::kCPU;
  // A trial still running when it has taken longer than its tokens need at this rate is stopped
  // (too_slow): it cannot win, so its remaining minutes are not spent (0: never). The search sets
  // it to half the best fitting plan's tokens/s: bf16 matmuls on a CPU without AVX512-BF16/AMX run
  // far slower than fp32 (docs/BENCHMARKS.md).
  double stop_below_tokens_per_s = 0;
  // Data parallel: the trial runs on every rank together, its gradients all-reduced, so the
  // verified peak holds the all-reduce's buffers too (null: this process alone).
  Communicator* comm = nullptr;
};
// A trial process's request carries these (device and comm stay with the process).
void to_json(nlohmann::json& j, const ProbeOptions& o);
void from_json(const nlohmann::json& j, ProbeOptions& o);

// Speed of a matmul in `precision` relative to fp32 on `device` (> 1: faster), the smallest time
// of a few runs of [256, 256] @ [256, 256] each. A device-wide fact, not a trial: far below 1 on a
// CPU without bf16 matmul units (AVX2 only), above 1 with AVX512-BF16/AMX (docs/BENCHMARKS.md).
double matmul_speed_vs_fp32(torch::Device device, Precision precision);

// Times `plan` alone, without the memory monitor: one warm-up step, then enough steps for
// opt.min_measure_s at the `tokens_per_s` measured before. Tokens/s of the lower-median step; 0
// when it ran out of memory.
double time_plan(Workload& workload, const Plan& plan, const ProbeOptions& opt, MemoryMeter& meter,
                 double tokens_per_s);

// Runs one trial. Never throws for OOM; a trial that ran no step is reported as an error
// (fits = false, reason says so).
Trial run_trial(Workload& workload, const Plan& plan, const ProbeOptions& opt, MemoryMeter& meter);

// Whether `plan` fits as things stand: a trial of 2 steps (step 1 creates the AdamW states in its
// optimizer phase, so only step 2 reaches parameters + gradients + states + activations). Only
// its memory is used, so it is not re-timed (and ranks, with opt.comm, run the same steps).
Trial verify_plan(Workload& workload, const Plan& plan, const ProbeOptions& opt,
                  MemoryMeter& meter);

// Its pins (Pins, plan.h) are the knobs the search keeps; those it does not search go into every
// plan as they are.
struct TunerRequest : Pins {
  int64_t global_batch = 32;
  uint64_t budget_bytes = 0;
  uint64_t usable_bytes = 0;     // budget - margin
  std::string search = "model";  // model | power | halve
  // Data parallel: the ranks the plan is for. ZeRO-1 (Plan::optimizer_shards = world_size) is
  // searched when a plan without it was refused for memory; `shard_optimizer` pins it.
  int64_t world_size = 1;
  bool allow_shrink_seq = false, allow_shrink_width = false;
  bool start_small = false;                   // ultra-low-mem: start from the smallest micro-batch
  int64_t max_micro_batch = 0;                // a preset's bound (0: none)
  std::vector<Precision> allowed_precisions;  // a preset's list (empty: fp32 and low_precision)
  // The device's fast low precision (low_precision_for): bf16, or fp16 with loss scaling on GPUs
  // before compute capability 8.0.
  Precision low_precision = Precision::bf16;
  // A low precision is probed only where it can be faster: its matmul runs at least this
  // fraction of fp32's speed on the device (TrialRunner::precision_speed), or no fp32 plan fits
  // (slow beats nothing), or fp32 is not a candidate (pinned or a preset). 0: always probe.
  double min_precision_speed = 0.8;
  ProbeOptions probe;
};

struct TunerResult {
  std::optional<Plan> plan;  // nullopt: infeasible
  std::vector<Trial> trials;
  double probe_seconds = 0;
  bool shrunk_task = false;        // seq_len or width changed (allowed by --allow-shrink)
  std::string shrink_note;         // what changed, said loudly
  std::string infeasible_message;  // the one line for an infeasible budget
  // Infeasible: the smallest plan of the task, its need measured with no cap in a trial (the
  // budget figure's peak), and the budget that would hold it after the margin (0: unmeasured).
  std::optional<Plan> smallest_plan;
  uint64_t smallest_need_bytes = 0, budget_needed_bytes = 0;
  // matmul_speed_vs_fp32 of each low precision the search considered, and which it skipped.
  std::map<Precision, double> precision_speed;
  std::vector<Precision> skipped_precisions;
  std::vector<SearchLine> lines;  // per pair the model search worked on (none for power/halve)
};

// Progress of a search, for the console: before each trial (its plan, its number from 1, and an
// upper bound of the trials the search can need for the task as asked) and after it.
struct TrialProgress {
  std::function<void(const Plan& plan, int index, int at_most)> started;
  std::function<void(const Trial& trial, int index, int at_most)> finished;
};

// Where trials run. The search asks for every measurement through this interface, so the same
// search drives trials in fresh processes (IsolatedTrials, include/autotune/isolated_trials.h),
// in this process (InProcessTrials), or (next) the user's own script.
class TrialRunner {
 public:
  virtual ~TrialRunner() = default;
  // One trial of `plan`. Never throws for memory: out of memory, a kernel kill and a budget below
  // the process's baseline are refused trials with their reason.
  virtual Trial run(const Plan& plan, const ProbeOptions& probe) = 0;
  // Each finalist timed `rounds` more times, in turns (A B C A B C: a slow spell of the machine
  // hits all of them); tokens/s per finalist per round, 0 where a timing failed. Memory is not
  // measured.
  virtual std::vector<std::vector<double>> retime(const std::vector<Trial>& finalists, int rounds,
                                                  const ProbeOptions& probe) = 0;
  // matmul_speed_vs_fp32 on the trials' device, measured once per precision.
  virtual double precision_speed(Precision precision) = 0;
  // The budget figure's peak of `plan` with no cap (one trial): what a budget must hold for it.
  // nullopt where it could not be measured (killed, an error).
  virtual std::optional<uint64_t> need_bytes(const Plan& plan, const ProbeOptions& probe) = 0;
  // The process baseline trials stand on (before the first one: the best guess), for the
  // estimator's first predictions.
  virtual uint64_t baseline_bytes() const = 0;
};

// Trials in the caller's process, on its workload and meter, under the cap the caller set. Every
// trial stands on what the ones before it left (oneDNN primitives, heap): right for tests of the
// search logic and for benchmarks of strategies on one process, not for the product's figures.
class InProcessTrials : public TrialRunner {
 public:
  InProcessTrials(Workload& workload, MemoryMeter& meter) : w_(workload), m_(meter) {}
  Trial run(const Plan& plan, const ProbeOptions& probe) override;
  std::vector<std::vector<double>> retime(const std::vector<Trial>& finalists, int rounds,
                                          const ProbeOptions& probe) override;
  double precision_speed(Precision precision) override;
  std::optional<uint64_t> need_bytes(const Plan& plan, const ProbeOptions& probe) override;
  uint64_t baseline_bytes() const override { return m_.baseline_bytes(); }

 private:
  Workload& w_;
  MemoryMeter& m_;
  std::map<Precision, double> speeds_;
};

TunerResult tune(Workload& workload, const TunerRequest& request, TrialRunner& trials,
                 const TrialProgress& progress = {});
// In this process (InProcessTrials).
TunerResult tune(Workload& workload, const TunerRequest& request, MemoryMeter& meter,
                 const TrialProgress& progress = {});

// The budget whose usable bytes (after the margin `usable_bytes` / `budget_bytes` keeps of the
// request's budget) hold `need_bytes`, rounded up to the next MiB.
uint64_t budget_to_hold(uint64_t need_bytes, uint64_t budget_bytes, uint64_t usable_bytes);

// Divisors of n in increasing order (micro-batches that keep the effective batch exact).
std::vector<int64_t> divisors(int64_t n);

}  // namespace autotune
