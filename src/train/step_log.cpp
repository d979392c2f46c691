#include "train/step_log.h"

#include <sys/resource.h>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "memory/cpu_allocator.h"

namespace autotune {

StepLog::StepLog(const std::string& path, int64_t every_steps)
    : out_(path), every_steps_(every_steps) {}

StepLog::Counters StepLog::now() {
  struct rusage ru {};
  getrusage(RUSAGE_SELF, &ru);
  const cpu_alloc::Stats a = cpu_alloc::stats();
  return {static_cast<int64_t>(ru.ru_minflt + ru.ru_majflt), a.num_allocations, a.num_segment_maps};
}

void StepLog::on_start(const Plan&, const TrainOptions&, int64_t first_step) {
  if (first_step > 0) out_.drop_after_step(first_step);
  last_ = now();
}

void StepLog::on_step(const StepStats& s) {
  // Counted every step, so a record holds its own step's costs (plus an evaluation or a
  // checkpoint that ran just before it).
  const Counters c = now();
  const Counters d{c.page_faults - last_.page_faults, c.allocations - last_.allocations,
                   c.segment_maps - last_.segment_maps};
  last_ = c;
  if (!out_.is_open() || every_steps_ <= 0) return;
  if (s.step % every_steps_ != 0 && s.step != 1 && s.step != s.steps) return;
  out_.append({{"step", s.step},
               {"loss", s.loss_value()},
               {"lr", s.lr},
               {"grad_norm", s.grad_norm_value()},
               {"step_ms", s.step_ms},
               {"tokens_per_s", s.tokens_per_s},
               {"skipped", s.skipped},
               {"micro_batch", s.plan.micro_batch},
               {"grad_accum", s.plan.grad_accum},
               {"page_faults", d.page_faults},
               {"cpu_allocations", d.allocations},
               {"cpu_segment_maps", d.segment_maps}});
}

}  // namespace autotune
