// Test hooks that make failure paths reproducible on a CPU-only machine.
//
// AUTOTUNE_INJECT_OOM="STEP:PHASE[,STEP:PHASE...]" makes the trainer's phase PHASE (forward,
// backward, optimizer, eval) of optimizer step STEP (1-based) raise c10::OutOfMemoryError once,
// exactly as an allocator would. Documented in docs/ERRORS.md; used by the recovery tests.
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

}  // namespace autotune
