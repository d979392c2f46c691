#include "train/fault_injection.h"

#include <sstream>

#include <spdlog/spdlog.h>

#include "autotune/errors.h"
#include "memory/cpu_allocator.h"

namespace autotune {

OomInjector::OomInjector(const std::string& spec) {
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    const auto colon = item.find(':');
    Shot shot{0, Phase::forward};
    bool ok = colon != std::string::npos;
    if (ok) {
      try {
        shot.step = std::stoll(item.substr(0, colon));
      } catch (const std::exception&) {
        ok = false;
      }
      const std::string phase = item.substr(colon + 1);
      if (phase == "forward")
        shot.phase = Phase::forward;
      else if (phase == "backward")
        shot.phase = Phase::backward;
      else if (phase == "optimizer")
        shot.phase = Phase::optimizer;
      else if (phase == "eval")
        shot.phase = Phase::eval;
      else
        ok = false;
    }
    if (!ok || shot.step < 1)
      throw UsageError("AUTOTUNE_INJECT_OOM item '" + item +
                       "' is not STEP:PHASE (PHASE one of forward, backward, optimizer, eval)");
    shots_.push_back(shot);
  }
}

void OomInjector::on_phase_begin(Phase phase) {
  for (auto& shot : shots_)
    if (!shot.done && shot.phase == phase &&
        (phase == Phase::eval ? step_ >= shot.step : step_ + 1 == shot.step)) {
      shot.done = true;
      ++fired_;
      TORCH_CHECK_WITH(OutOfMemoryError, false,
                       "injected out of memory (AUTOTUNE_INJECT_OOM) at step ", shot.step, " ",
                       to_string(phase));
    }
}

AllocationOomInjector::AllocationOomInjector(const std::string& spec) {
  const auto colon = spec.find(':');
  bool ok = colon != std::string::npos;
  try {
    size_t used = 0;
    if (ok) target_step_ = std::stoll(spec.substr(0, colon), &used);
    ok = ok && used == colon;
    if (ok) nth_ = std::stoll(spec.substr(colon + 1), &used);
    ok = ok && used == spec.size() - colon - 1;
  } catch (const std::exception&) {
    ok = false;
  }
  if (!ok || target_step_ < 1 || nth_ < 0)
    throw UsageError("AUTOTUNE_INJECT_OOM_ALLOC '" + spec +
                     "' is not STEP:N (STEP >= 1, N >= 0; 0 counts the step's allocations)");
  if (!cpu_alloc::installed())
    throw UsageError(
        "AUTOTUNE_INJECT_OOM_ALLOC needs autotune's CPU allocator, not installed here");
}

// The window: from the start of the step (before its first batch is fetched) to the start of
// the next one, so it holds the step's evaluation and checkpoint; a re-run after a recovery
// stays in it.
void AllocationOomInjector::on_step_begin(int64_t completed) {
  if (!armed_ && completed + 1 == target_step_) {
    cpu_alloc::arm_allocation_failure(nth_);
    armed_ = true;
  } else if (completed == target_step_) {
    close_window();
  }
}

void AllocationOomInjector::close_window() {
  if (!armed_ || closed_) return;
  closed_ = true;
  const int64_t made = cpu_alloc::allocations_since_armed();
  cpu_alloc::arm_allocation_failure(0);
  spdlog::warn("AUTOTUNE_INJECT_OOM_ALLOC: step {} made {} CPU allocations{}", target_step_, made,
               nth_ == 0      ? " (counted only)"
               : nth_ <= made ? ", allocation " + std::to_string(nth_) + " was refused"
                              : ", fewer than " + std::to_string(nth_) + ": nothing refused");
}

}  // namespace autotune
