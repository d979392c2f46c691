#include "autotune/estimator.h"

#include <iostream>

#include <spdlog/spdlog.h>

#include "autotune/commands.h"
#include "autotune/errors.h"
#include "autotune/memory.h"
#include "autotune/reporter.h"
#include "autotune/run_spec.h"
#include "autotune/size.h"

namespace autotune {

namespace {
// Calibration (docs/ESTIMATOR.md): measured peak tensor bytes / analytic terms over the
// calibration grid. 1.0 until calibrated.
constexpr double kActivationScale = 1.0;
// The counting allocator aligns every block to 64 bytes and keeps a 64-byte header; the fraction
// of memory lost to that and to short-lived temporaries at the peak.
constexpr double kSlackFraction = 0.03;
}  // namespace

nlohmann::json Estimate::to_json() const {
  nlohmann::json terms = nlohmann::json::object();
  for (const auto& l : lines) terms[l.name] = l.bytes;
  return {{"peak_bytes", peak_bytes},
          {"tensor_peak_bytes", tensor_peak_bytes},
          {"baseline_bytes", baseline_bytes},
          {"n_params", n_params},
          {"terms", terms}};
}

Estimate estimate_memory(const Workload& workload, const Plan& plan, uint64_t baseline_bytes) {
  Estimate e;
  e.plan = plan;
  EstimateTerms t = workload.estimate_terms(plan);
  e.n_params = t.n_params;
  const double P = static_cast<double>(t.n_params);
  // fp32 master weights, fp32 gradients, AdamW exp_avg + exp_avg_sq: 4 + 4 + 8 bytes/param.
  std::vector<std::pair<std::string, double>> lines = {
      {"params", 4 * P}, {"grads", 4 * P}, {"optimizer", 8 * P}};
  for (const auto& term : t.terms) lines.push_back({term.name, term.bytes * kActivationScale});
  double sum = 0;
  for (const auto& l : lines) sum += l.second;
  lines.push_back({"slack", sum * kSlackFraction});
  sum += sum * kSlackFraction;
  for (const auto& l : lines) e.lines.push_back({l.first, static_cast<uint64_t>(l.second)});
  e.tensor_peak_bytes = static_cast<uint64_t>(sum);
  e.baseline_bytes = baseline_bytes;
  e.peak_bytes = e.tensor_peak_bytes + baseline_bytes;
  return e;
}

void print_estimate(const Estimate& e) {
  std::vector<std::pair<std::string, std::string>> rows;
  rows.push_back({"plan", e.plan.describe()});
  rows.push_back({"parameters", std::to_string(e.n_params)});
  for (const auto& l : e.lines)
    rows.push_back({l.name, fmt::format("{:>12}  {:5.1f}%", format_bytes(l.bytes),
                                        100.0 * static_cast<double>(l.bytes) /
                                            static_cast<double>(e.tensor_peak_bytes))});
  rows.push_back({"tensor peak", format_bytes(e.tensor_peak_bytes)});
  rows.push_back({"process baseline", format_bytes(e.baseline_bytes)});
  rows.push_back({"peak (budget figure)", format_bytes(e.peak_bytes)});
  print_table("estimate", rows);
}

int estimate_command(const RunSpec& spec) {
  torch::Device device = resolve_device(spec.device);
  auto workload = make_workload(spec);
  Plan plan = plan_from_pins(spec, workload->default_seq_len(), 8);
  workload->validate(plan);
  MemoryMeter meter(device);
  Estimate e = estimate_memory(*workload, plan, meter.baseline_bytes());
  print_estimate(e);
  if (spec.json) {
    nlohmann::json plan_json = plan;
    plan_json["seq_len"] = plan.seq_len ? plan.seq_len : workload->default_seq_len();
    plan_json["d_model"] = plan.d_model ? plan.d_model : workload->default_width();
    std::cout << nlohmann::json{{"plan", plan_json}, {"memory", e.to_json()}}.dump(2) << std::endl;
  }
  return kExitOk;
}

}  // namespace autotune
