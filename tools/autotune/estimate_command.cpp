// `autotune estimate`: the analytic memory breakdown of a plan. It trains nothing: one
// micro-batch-1 warm-up step, as a run makes before it measures its baseline, so the baseline it
// adds is the one the run's budget figure stands on.
#include <iostream>

#include <spdlog/spdlog.h>

#include "autotune/errors.h"
#include "autotune/estimator.h"
#include "autotune/memory.h"
#include "autotune/run_spec.h"
#include "autotune/size.h"
#include "commands.h"
#include "run/reporter.h"
#include "run/run_context.h"

namespace autotune {

namespace {
// The estimate as a table: each line of the tensor peak with its share, then the budget figure.
void print_estimate(const Estimate& e) {
  std::vector<std::pair<std::string, std::string>> rows;
  rows.push_back({"plan", e.plan.describe()});
  rows.push_back({"parameters", std::to_string(e.n_params)});
  for (const auto& l : e.lines)
    rows.push_back({l.name, fmt::format("{:>12}  {:5.1f}%", format_bytes(l.bytes),
                                        100.0 * static_cast<double>(l.bytes) /
                                            static_cast<double>(e.tensor_peak_bytes))});
  rows.push_back(
      {"tensor peak", format_bytes(e.tensor_peak_bytes) + " (at the " + e.peak_phase + " peak)"});
  rows.push_back({"allocator reserve",
                  format_bytes(e.reserve_bytes) + " (reserved above allocated at the peak)"});
  rows.push_back(
      {"outside tensors", format_bytes(e.untracked_bytes) + " (heap kept, low-precision scratch)"});
  rows.push_back({"process baseline", format_bytes(e.baseline_bytes) + " (after a warm-up step)"});
  if (e.activations_known) {
    rows.push_back({"peak (budget figure)", format_bytes(e.peak_bytes)});
  } else {
    rows.push_back({"activations",
                    "not known ahead for this model: measured by probing "
                    "(autotune --budget SIZE probes them)"});
    rows.push_back({"peak (budget figure)", format_bytes(e.peak_bytes) +
                                                " + activations (parameters, gradients and "
                                                "AdamW states above are exact)"});
  }
  print_table("estimate", rows);
}
}  // namespace

int estimate_command(const RunSpec& spec) {
  RunContext ctx(spec);
  Workload& workload = ctx.workload();
  Plan plan = plan_from_pins(spec, workload.default_seq_len(), 8);
  workload.validate(plan);
  ctx.warm_up({plan.precision});
  Estimate e = estimate_memory(workload, plan, ctx.meter().baseline_bytes());
  print_estimate(e);
  if (spec.json) {
    nlohmann::json plan_json = plan;
    plan_json["seq_len"] = plan.seq_len ? plan.seq_len : workload.default_seq_len();
    plan_json["d_model"] = plan.d_model ? plan.d_model : workload.default_width();
    std::cout << nlohmann::json{{"plan", plan_json}, {"memory", e.to_json()}}.dump(2) << std::endl;
  }
  return kExitOk;
}

}  // namespace autotune
