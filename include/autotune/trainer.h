// The trainer: AdamW, warmup + cosine learning rate, gradient clipping, gradient accumulation,
// mixed precision, evaluation, atomic checkpoints, exact resume, and OOM recovery that keeps the
// global step and the effective batch. Measurement and logging attach through TrainObserver.
#pragma once
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "autotune/plan.h"
#include "autotune/workload.h"

namespace autotune {

class Communicator;

enum class Phase { forward, backward, optimizer, eval };
const char* to_string(Phase p);

struct TrainOptions {
  int64_t steps = 100;        // optimizer steps in total (a resumed run continues to this)
  double lr = 1e-3;           // peak learning rate
  double min_lr = 1e-4;       // end of the cosine
  int64_t warmup_steps = -1;  // -1: min(100, steps / 10)
  double weight_decay = 0.1;
  double beta1 = 0.9, beta2 = 0.95;
  double grad_clip = 1.0;       // max global L2 norm; 0 disables
  int64_t eval_every = 0;       // 0: only at the end
  int64_t eval_sequences = 64;  // validation sequences per evaluation
  uint64_t seed = 1337;
  torch::Device device = torch::kCPU;

  std::string run_dir;           // checkpoints live in run_dir/checkpoints; empty: none
  int64_t checkpoint_every = 0;  // 0: only at the end (and on a stop)
  int keep_checkpoints = 3;
  bool resume = false;  // continue from the newest complete checkpoint in run_dir

  // OOM ladder: halve micro_batch (x2 grad_accum), then checkpointing on, then the device's low
  // precision (bf16, or fp16 where bf16 is not fast) if allowed.
  bool recover_oom = true;
  bool allow_precision_change = true;
  Precision low_precision = Precision::bf16;
  // Ultra-low-mem: release the allocator caches between phases.
  bool release_between_phases = false;
  // Wait for the device at the end of every step, so step_ms is the step's real time (probe
  // trials rank plans by it). Off for training: the host then queues the next step's work while
  // the accelerator runs this one. (A no-op on CPU.)
  bool synchronize_steps = false;
  // Set by a signal handler: the loop stops after the current step and checkpoints.
  const std::atomic<int>* stop_signal = nullptr;
  // Data parallel (null: one process). The plan is per rank: rank r trains samples
  // [r*B, (r+1)*B) of each step's global batch of world*B (B = micro_batch x grad_accum);
  // gradients are averaged once per optimizer step; rank 0 writes the checkpoints.
  Communicator* comm = nullptr;
};

struct StepStats {
  int64_t step = 0;  // 1-based index of the optimizer step just finished
  int64_t steps = 0;
  // Scalars on the device: reading one (loss_value()) waits for the step's work to finish, so
  // observers read them only where they print or record them.
  torch::Tensor loss;       // [] fp32, mean over the global batch
  torch::Tensor grad_norm;  // [] global L2 norm before clipping; undefined without clipping
  double lr = 0;
  double step_ms = 0;       // host time of the step (on an accelerator: until its work was queued,
                            // unless TrainOptions::synchronize_steps)
  double tokens_per_s = 0;  // this step
  bool skipped = false;     // fp16 overflow: no update
  Plan plan;

  double loss_value() const { return loss.item<double>(); }
  double grad_norm_value() const { return grad_norm.defined() ? grad_norm.item<double>() : 0.0; }
};

struct Recovery {
  int64_t step = 0;
  Phase phase = Phase::forward;
  Plan before, after;
  bool eval_only = false;  // eval OOM: only the eval batch changed
  std::string what;
};

struct RunSummary {
  Plan plan;               // the plan at the end (after any recovery)
  int64_t first_step = 0;  // 0, or the resumed step
  int64_t steps_done = 0;  // optimizer steps completed (== options.steps unless stopped)
  int64_t tokens = 0;      // trained this invocation
  double final_loss = std::numeric_limits<double>::quiet_NaN();
  double val_loss = std::numeric_limits<double>::quiet_NaN();
  double tokens_per_s = 0;  // tokens / training seconds (evaluation excluded)
  double wall_s = 0;
  std::vector<Recovery> recoveries;
  int stop_signal = 0;  // SIGINT/SIGTERM that stopped the run, else 0
  std::string last_checkpoint;
  std::string params_digest;    // FNV-1a of the final parameters' bytes: equal ranks, equal digests
  double allreduce_s = 0;       // data parallel: seconds in gradient all-reduces this run
  int64_t allreduce_calls = 0;  // and how many (one per optimizer step)
  double broadcast_s = 0;       // ZeRO-1: seconds sending the updated parameters to the ranks
  int64_t optimizer_state_bytes = 0;  // this rank's AdamW states at the end (its shard, ZeRO-1)
};

class TrainObserver {
 public:
  virtual ~TrainObserver() = default;
  virtual void on_start(const Plan& plan, const TrainOptions& opt, int64_t first_step) {}
  // Each attempt at optimizer step `completed` + 1 (again after an OOM recovery).
  virtual void on_step_begin(int64_t completed) {}
  virtual void on_phase_begin(Phase phase) {}
  virtual void on_phase_end(Phase phase, int64_t step) {}
  virtual void on_step(const StepStats& s) {}
  virtual void on_eval(int64_t step, double val_loss) {}
  virtual void on_recovery(const Recovery& r) {}
  virtual void on_checkpoint(int64_t step, const std::string& path) {}
  virtual void on_end(const RunSummary& s) {}
};

// Trains `workload` with `plan` from step 0 (or the checkpoint) to opt.steps.
RunSummary train(Workload& workload, Plan plan, const TrainOptions& opt,
                 const std::vector<TrainObserver*>& observers = {});

// The optimizer steps of the next plan down the OOM ladder; false when nothing is left.
bool next_plan_after_oom(const Plan& plan, bool can_checkpoint, bool allow_precision_change,
                         Plan* next, Precision low_precision = Precision::bf16);

// Learning rate at step (0-based) under warmup + cosine.
double learning_rate(const TrainOptions& opt, int64_t step);

}  // namespace autotune
