// Estimator: analytic bytes of one training step for a Workload and Plan, without running.
// The workload gives its structural terms (activations, logits, batch); the estimator adds
// parameters, gradients, AdamW states, the process baseline and allocator slack, and scales
// activation terms by factors calibrated once against measurement (docs/ESTIMATOR.md).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "autotune/plan.h"
#include "autotune/workload.h"

namespace autotune {

struct EstimateLine {
  std::string name;
  uint64_t bytes = 0;
};

struct Estimate {
  Plan plan;
  int64_t n_params = 0;
  std::vector<EstimateLine> lines;  // params, grads, optimizer, activations..., slack
  uint64_t tensor_peak_bytes = 0;   // sum of lines: the counting allocator's peak
  std::string peak_phase;           // forward | backward | optimizer | eval: where that peak is
  uint64_t reserve_bytes = 0;       // the caching allocator's reserved above allocated at the peak
  uint64_t untracked_bytes = 0;     // what a step grows outside tensors (heap kept, scratch)
  uint64_t baseline_bytes = 0;      // process memory outside tensors after the warm-up step
  // The budget figure: tensor peak + reserve + untracked + baseline.
  uint64_t peak_bytes = 0;
  // False for an opaque model: its activations are not counted above (the figures are a floor)
  // and come from the probes.
  bool activations_known = true;
  nlohmann::json to_json() const;
};

// `baseline_bytes` is the process's measured non-tensor memory (MemoryMeter::baseline_bytes).
Estimate estimate_memory(const Workload& workload, const Plan& plan, uint64_t baseline_bytes);

}  // namespace autotune
