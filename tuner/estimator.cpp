#include "autotune/estimator.h"

#include <algorithm>

#include <spdlog/spdlog.h>

#include "autotune/memory.h"
#include "autotune/size.h"

namespace autotune {

namespace {
// The counting allocator aligns every block to 64 bytes and keeps a 64-byte header; the fraction
// of memory lost to that and to short-lived temporaries at the peak.
constexpr double kSlackFraction = 0.01;
// What a step grows outside the counting allocator, on CPU: the free heap glibc keeps mapped
// below its trim threshold, and under autocast oneDNN's reorder and scratch buffers for
// low-precision matmuls (measured above the warm-up step's baseline over the bf16 GPT plans of
// docs/ESTIMATOR.md).
constexpr double kHeapKeptBytes = 1.3 * 1048576;
constexpr double kLowPrecisionScratchBytes = 8.0 * 1048576;
}  // namespace

nlohmann::json Estimate::to_json() const {
  nlohmann::json terms = nlohmann::json::object();
  for (const auto& l : lines) terms[l.name] = l.bytes;
  return {{"peak_bytes", peak_bytes},
          {"activations_known", activations_known},
          {"peak_phase", peak_phase},
          {"tensor_peak_bytes", tensor_peak_bytes},
          {"baseline_bytes", baseline_bytes},
          {"reserve_bytes", reserve_bytes},
          {"untracked_bytes", untracked_bytes},
          {"n_params", n_params},
          {"terms", terms}};
}

Estimate estimate_memory(const Workload& workload, const Plan& plan, uint64_t baseline_bytes) {
  Estimate e;
  e.plan = plan;
  EstimateTerms t = workload.estimate_terms(plan);
  e.n_params = t.n_params;
  e.activations_known = t.activations_known;
  const double P = static_cast<double>(t.n_params);
  // fp32 master weights and AdamW's exp_avg + exp_avg_sq (from the first optimizer step on);
  // fp32 gradients only from the backward to the optimizer step.
  // ZeRO-1 keeps 1/shards of the states on each rank (whole tensors: the heaviest rank holds a
  // little more) and adds the flat copy of one broadcast bucket (<= 25 MiB) in the optimizer step.
  const double shards = static_cast<double>(plan.optimizer_shards);
  const double params = 4 * P, grads = 4 * P, optimizer = 8 * P / shards;
  const double broadcast_bucket =
      plan.optimizer_shards > 1 ? std::min(4 * P / shards, 25.0 * 1048576) : 0.0;
  double activations = 0;
  for (const auto& term : t.terms) activations += term.bytes;
  // The candidate peaks of a step; the estimate is the largest.
  //   end of forward   : params + optimizer + everything saved for backward
  //   start of backward: the same + the loss's gradient (or the last block's first gradients)
  //   end of backward  : params + optimizer + all gradients + the first block's tail
  //   optimizer step   : params + optimizer + gradients (+ a broadcast bucket with ZeRO-1)
  //   evaluation       : params + optimizer + the last step's gradients + a no-grad forward
  // With grad_accum >= 2 every forward after the first runs beside the gradients the earlier
  // micro-batches accumulated.
  const bool accumulating = plan.grad_accum >= 2;
  const double grads_in_forward = accumulating ? grads : 0;
  const double forward_end =
      params + optimizer + grads_in_forward + activations + t.weight_copy_bytes;
  const double backward_start = forward_end + t.backward_start_bytes;
  // The autocast weight copies die with the forward's autocast scope (the saved ones are
  // released as backward consumes them), so they are not part of the backward's end.
  const double grads_at_tail = t.gradients_after_backward_tail && !accumulating ? 0 : grads;
  const double backward_end = params + optimizer + grads_at_tail + t.backward_tail_bytes;
  const double optimizer_step = params + optimizer + grads + broadcast_bucket;
  const double eval = params + optimizer + grads + t.eval_bytes;
  double peak = std::max({forward_end, backward_start, backward_end, optimizer_step, eval});

  std::vector<std::pair<std::string, double>> lines = {{"params", params},
                                                       {"optimizer", optimizer}};
  if (peak == forward_end || peak == backward_start) {
    e.peak_phase = peak == forward_end ? "forward" : "backward";
    if (grads_in_forward > 0) lines.push_back({"grads (accumulating)", grads_in_forward});
    for (const auto& term : t.terms) lines.push_back({term.name, term.bytes});
    if (t.weight_copy_bytes > 0) lines.push_back({"autocast weight copies", t.weight_copy_bytes});
    if (e.peak_phase == "backward") lines.push_back({"backward start", t.backward_start_bytes});
  } else if (peak == backward_end) {
    e.peak_phase = "backward";
    if (grads_at_tail > 0) lines.push_back({"grads", grads});
    lines.push_back({"backward tail", t.backward_tail_bytes});
  } else if (peak == optimizer_step) {
    e.peak_phase = "optimizer";
    lines.push_back({"grads", grads});
    if (broadcast_bucket > 0) lines.push_back({"broadcast bucket", broadcast_bucket});
  } else {
    e.peak_phase = "eval";
    lines.push_back({"grads (last step's)", grads});
    lines.push_back({"eval forward", t.eval_bytes});
  }
  lines.push_back({"slack", peak * kSlackFraction});
  peak += peak * kSlackFraction;
  for (const auto& l : lines) e.lines.push_back({l.first, static_cast<uint64_t>(l.second)});
  e.tensor_peak_bytes = static_cast<uint64_t>(peak);
  e.baseline_bytes = baseline_bytes;
  e.reserve_bytes = static_cast<uint64_t>(peak * t.reserve_fraction);
  e.untracked_bytes = static_cast<uint64_t>(
      kHeapKeptBytes + (plan.precision != Precision::fp32 ? kLowPrecisionScratchBytes : 0.0));
  e.peak_bytes = e.tensor_peak_bytes + e.reserve_bytes + e.untracked_bytes + baseline_bytes;
  return e;
}

}  // namespace autotune
