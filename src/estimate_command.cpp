// `autotune estimate`: the analytic memory breakdown of a plan. It trains nothing: one
// micro-batch-1 warm-up step, as a run makes before it measures its baseline, so the baseline it
// adds is the one the run's budget figure stands on.
#include <iostream>

#include "autotune/commands.h"
#include "autotune/errors.h"
#include "autotune/estimator.h"
#include "autotune/memory.h"
#include "autotune/run_context.h"
#include "autotune/run_spec.h"

namespace autotune {

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
