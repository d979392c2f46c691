// The tuner: finds the fastest plan whose measured peak fits the budget. It talks to a Workload
// (never a concrete model) and measures real training steps through the trainer.
//
//   Prober  : one trial = a fresh model, 1 warm-up step + N measured steps (the first optimizer
//             step, with its AdamW states, included) + one evaluation forward, under the budget's
//             hard cap; OOM is caught by type and everything is released before the next trial.
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
  uint64_t peak_bytes = 0;     // the budget figure's peak (0 when it OOMed before measuring)
  nlohmann::json phase_peaks;  // {forward: bytes, backward: ..., optimizer: ..., eval: ...}
  double tokens_per_s = 0;     // measured steps only (warm-up excluded)
  double wall_s = 0;
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
  // long, without the memory monitor: steps of 0.1 s vary by +-20% on a shared 2-core VM, enough
  // to rank a slower plan first (like google/benchmark's minimum time).
  double min_measure_s = 1.0;
  uint64_t seed = 1337;
  torch::Device device = torch::kCPU;
  // A trial still running when it has taken longer than its tokens need at this rate is stopped
  // (too_slow): it cannot win, so its remaining minutes are not spent (0: never). The search sets
  // it to half the best fitting plan's tokens/s; bf16 matmuls without AVX-512/AMX run ~70x slower.
  double stop_below_tokens_per_s = 0;
  // Data parallel: the trial runs on every rank together, its gradients all-reduced, so the
  // verified peak holds the all-reduce's buffers too (null: this process alone).
  Communicator* comm = nullptr;
};

// Speed of a matmul in `precision` relative to fp32 on `device` (> 1: faster), the smallest time
// of a few runs of [256, 256] @ [256, 256] each. A device-wide fact, not a trial: bf16 runs at
// ~0.014x fp32 on an AVX2-only CPU and at 2-16x on AMX CPUs and tensor-core GPUs.
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

struct TunerRequest {
  int64_t global_batch = 32;
  uint64_t budget_bytes = 0;
  uint64_t usable_bytes = 0;     // budget - margin
  std::string search = "model";  // model | power | halve
  // Pins (nullopt: free)
  std::optional<int64_t> micro_batch, seq_len, d_model;
  std::optional<Precision> precision;
  std::optional<bool> checkpointing;
  // Data parallel: the ranks the plan is for. ZeRO-1 (Plan::optimizer_shards = world_size) is
  // searched when a plan without it was refused for memory; `shard_optimizer` pins it.
  int64_t world_size = 1;
  std::optional<bool> shard_optimizer;
  bool allow_shrink_seq = false, allow_shrink_width = false;
  bool start_small = false;                   // ultra-low-mem: start from the smallest micro-batch
  int64_t max_micro_batch = 0;                // a preset's bound (0: none)
  std::vector<Precision> allowed_precisions;  // a preset's list (empty: fp32 and low_precision)
  // The device's fast low precision (low_precision_for): bf16, or fp16 with loss scaling on GPUs
  // before compute capability 8.0.
  Precision low_precision = Precision::bf16;
  int64_t eval_batch = 0;
  // A low precision is probed only where it can be faster: its matmul runs at least this
  // fraction of fp32's speed on the device (matmul_speed_vs_fp32), or no fp32 plan fits (slow
  // beats nothing), or fp32 is not a candidate (pinned or a preset). 0: always probe.
  double min_precision_speed = 0.8;
  // matmul_speed_vs_fp32 values the caller has already measured on this device (RunContext);
  // the search times only the precisions missing here.
  std::map<Precision, double> precision_speed;
  ProbeOptions probe;
};

struct TunerResult {
  std::optional<Plan> plan;  // nullopt: infeasible
  std::vector<Trial> trials;
  double probe_seconds = 0;
  bool shrunk_task = false;        // seq_len or width changed (allowed by --allow-shrink)
  std::string shrink_note;         // what changed, said loudly
  std::string infeasible_message;  // the one line for an infeasible budget
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

TunerResult tune(Workload& workload, const TunerRequest& request, MemoryMeter& meter,
                 const TrialProgress& progress = {});

// The chosen plan run again over 2 steps in the state the training starts from. Low-precision
// kernels keep state that is not tensors (oneDNN primitives, JIT kernels and their scratch, per
// matmul shape) for the life of the process, so a plan probed before the bf16 trials stood on
// less memory than the run will. The caller measures the baseline again and applies the caps it
// gives (reapply_caps), then this verifies the chosen plan, else (with `fall_back`) the next
// fastest trial that fitted; trial reasons are updated. nullopt when none fits this process any
// more (the trials are then left as they were: a fresh process is the remedy).
struct Verified {
  Plan plan;
  uint64_t peak_bytes = 0;
  uint64_t baseline_before_bytes = 0, baseline_after_bytes = 0;
};
std::optional<Verified> verify_after_search(Workload& workload, const TunerResult& result,
                                            const ProbeOptions& probe, MemoryMeter& meter,
                                            const std::function<void()>& reapply_caps,
                                            std::vector<Trial>* trials, bool fall_back = true);

// Divisors of n in increasing order (micro-batches that keep the effective batch exact).
std::vector<int64_t> divisors(int64_t n);

}  // namespace autotune
