#include "autotune/fault_injection.h"

#include <sstream>

#include "autotune/errors.h"

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

}  // namespace autotune
