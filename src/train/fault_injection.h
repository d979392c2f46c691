// Test hooks that make failure paths reproducible on a CPU-only machine.
//
// AUTOTUNE_INJECT_OOM="STEP:PHASE[,STEP:PHASE...]" makes the trainer's phase PHASE (forward,
// backward, optimizer, eval) of optimizer step STEP (1-based) raise c10::OutOfMemoryError once,
// exactly as an allocator would. Documented in docs/ERRORS.md; used by the recovery tests.
//
// AUTOTUNE_INJECT_OOM_ALLOC="STEP:N" makes the Nth CPU allocation (1-based, any thread) counted
// from the start of optimizer step STEP, through that step's evaluation and checkpoint, fail as
// one over the host budget does, inside the allocator: any point of a step, not only a phase's
// start. N = 0 only counts the window's allocations and says the count (a sweep's range).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "autotune/trainer.h"

namespace autotune {

class OomInjector : public TrainObserver {
 public:
  // Throws UsageError for a malformed spec.
  explicit OomInjector(const std::string& spec);
  void on_start(const Plan&, const TrainOptions&, int64_t first_step) override {
    step_ = first_step;
  }
  void on_phase_begin(Phase phase) override;
  void on_step(const StepStats& s) override { step_ = s.step; }
  void on_eval(int64_t step, double) override {}
  int64_t fired() const { return fired_; }

 private:
  struct Shot {
    int64_t step;  // 1-based
    Phase phase;
    bool done = false;
  };
  std::vector<Shot> shots_;
  int64_t step_ = 0;  // optimizer steps completed
  int64_t fired_ = 0;
};

class AllocationOomInjector : public TrainObserver {
 public:
  // Throws UsageError for a malformed spec.
  explicit AllocationOomInjector(const std::string& spec);
  void on_step_begin(int64_t completed) override;
  void on_end(const RunSummary&) override { close_window(); }

 private:
  void close_window();
  int64_t target_step_ = 0;  // 1-based
  int64_t nth_ = 0;
  bool armed_ = false, closed_ = false;
};

}  // namespace autotune
