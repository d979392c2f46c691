#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>

#include <spdlog/spdlog.h>

#include "autotune/memory_monitor.h"
#include "autotune/trainer.h"
#include "autotune/tuner.h"

namespace autotune {

void to_json(nlohmann::json& j, const Trial& t) {
  j = {{"plan", t.plan},
       {"fits", t.fits},
       {"oom", t.oom},
       {"peak_bytes", t.peak_bytes},
       {"phase_peaks", t.phase_peaks},
       {"tokens_per_s", t.tokens_per_s},
       {"wall_s", t.wall_s},
       {"steps_run", t.steps_run},
       {"too_slow", t.too_slow},
       {"error", t.error},
       {"reason", t.reason}};
}

void from_json(const nlohmann::json& j, Trial& t) {
  t.plan = j.at("plan").get<Plan>();
  t.fits = j.at("fits").get<bool>();
  t.oom = j.value("oom", false);
  t.peak_bytes = j.at("peak_bytes").get<uint64_t>();
  t.phase_peaks = j.value("phase_peaks", nlohmann::json::object());
  t.tokens_per_s = j.at("tokens_per_s").get<double>();
  t.wall_s = j.value("wall_s", 0.0);
  t.steps_run = j.value("steps_run", int64_t{0});
  t.too_slow = j.value("too_slow", false);
  t.error = j.value("error", false);
  t.reason = j.value("reason", std::string());
}

namespace {
// Thrown from an observer to stop a trial that cannot reach the required throughput.
struct TrialTooSlow {};

// Times the measured steps (the warm-up step is step 1 and is excluded) and, after every phase,
// stops the trial once its wall time exceeds what all its tokens would take at the stop rate.
struct StepTimer : TrainObserver {
  double measured_s = 0;
  int64_t measured_tokens = 0;
  int64_t steps = 0;
  int64_t tokens_per_step = 0;
  double deadline_s = 0;  // 0: none
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  void on_step(const StepStats& s) override {
    steps = s.step;
    if (s.step == 1) return;
    measured_s += s.step_ms / 1e3;
    measured_tokens += tokens_per_step;
  }
  void on_phase_end(Phase, int64_t) override {
    if (deadline_s > 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >
            deadline_s)
      throw TrialTooSlow{};
  }
};
}  // namespace

Trial run_trial(Workload& workload, const Plan& plan, const ProbeOptions& opt, MemoryMeter& meter) {
  Trial t;
  t.plan = plan;
  // Two micro-batches show the accumulation peak (gradients alive during the second forward);
  // more would only repeat it.
  Plan probe_plan = plan;
  probe_plan.grad_accum = std::min<int64_t>(plan.grad_accum, 2);

  TrainOptions to;
  to.steps = 1 + opt.measured_steps;
  to.warmup_steps = 1;
  to.seed = opt.seed;
  to.device = opt.device;
  to.recover_oom = false;
  const int64_t eval_batch = plan.eval_batch ? plan.eval_batch : plan.micro_batch;
  to.eval_sequences = eval_batch;  // one evaluation forward

  MemoryMonitorOptions mo;
  mo.every_steps = 0;
  mo.log_summary = false;
  MemoryMonitor monitor(meter, mo);
  StepTimer timer;
  timer.tokens_per_step = probe_plan.global_batch() * workload.tokens_per_sequence(plan);

  meter.release_cache();
  meter.reset_peaks();
  const auto t0 = std::chrono::steady_clock::now();
  timer.start = t0;
  if (opt.stop_below_tokens_per_s > 0)
    timer.deadline_s =
        static_cast<double>(to.steps * timer.tokens_per_step) / opt.stop_below_tokens_per_s;
  std::string error;
  try {
    train(workload, probe_plan, to, {&monitor, &timer});
  } catch (const TrialTooSlow&) {
    t.too_slow = true;
  } catch (const c10::OutOfMemoryError&) {
    // Recognised by type only. Unwinding has freed the trial's model, optimizer and tensors.
    t.oom = true;
  } catch (const std::exception& e) {
    // The tuner survives any trial; a failure other than OOM is recorded, never taken as a fit.
    error = e.what();
  }
  meter.release_cache();
  t.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  t.steps_run = timer.steps;
  t.peak_bytes = monitor.peak_budget_bytes();
  t.phase_peaks = nlohmann::json::object();
  for (const auto& [phase, p] : monitor.phase_peaks())
    t.phase_peaks[to_string(phase)] = p.budget_bytes;
  if (timer.measured_s > 0)
    t.tokens_per_s = static_cast<double>(timer.measured_tokens) / timer.measured_s;

  if (t.too_slow) {
    char buf[160];
    std::snprintf(buf, sizeof buf,
                  "stopped after %.1f s: below %.0f tokens/s, half the best fitting plan's",
                  t.wall_s, opt.stop_below_tokens_per_s);
    t.reason = buf;
  } else if (t.oom) {
    t.reason = "out of memory after " + std::to_string(t.steps_run) + " step(s)";
  } else if (t.steps_run != to.steps) {
    t.error = true;
    t.reason = "error: the trial ran " + std::to_string(t.steps_run) + " of " +
               std::to_string(to.steps) + " steps" + (error.empty() ? "" : " (" + error + ")");
  } else if (t.peak_bytes > opt.usable_bytes) {
    t.reason = "peak above budget - margin";
  } else {
    t.fits = true;
    t.reason = "fits";
  }
  if (t.fits && opt.min_measure_s > 0 && timer.measured_s > 0 &&
      timer.measured_s < opt.min_measure_s) {
    const double step_s = timer.measured_s / static_cast<double>(opt.measured_steps);
    TrainOptions more = to;
    more.steps = 1 + std::clamp<int64_t>(
                         static_cast<int64_t>(std::ceil(opt.min_measure_s / step_s)), 1, 200);
    more.eval_sequences = 0;
    StepTimer again;
    again.tokens_per_step = timer.tokens_per_step;
    try {
      train(workload, probe_plan, more, {&again});
      if (again.measured_s > 0)
        t.tokens_per_s = static_cast<double>(again.measured_tokens) / again.measured_s;
    } catch (const c10::OutOfMemoryError&) {
      // Memory was measured above; keep the first timing.
    }
    meter.release_cache();
    t.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return t;
}

}  // namespace autotune
