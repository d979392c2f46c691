#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

#include <ATen/DeviceAccelerator.h>

#include <spdlog/spdlog.h>

#include "autotune/size.h"
#include "autotune/trainer.h"
#include "autotune/tuner.h"
#include "memory/cpu_allocator.h"
#include "train/memory_monitor.h"

namespace autotune {

void to_json(nlohmann::json& j, const Trial& t) {
  j = {{"plan", t.plan},
       {"fits", t.fits},
       {"oom", t.oom},
       {"killed", t.killed},
       {"peak_bytes", t.peak_bytes},
       {"phase_peaks", t.phase_peaks},
       {"tokens_per_s", t.tokens_per_s},
       {"wall_s", t.wall_s},
       {"process_s", t.process_s},
       {"steps_run", t.steps_run},
       {"too_slow", t.too_slow},
       {"error", t.error},
       {"timings", t.timings},
       {"reason", t.reason}};
}

void from_json(const nlohmann::json& j, Trial& t) {
  t.plan = j.at("plan").get<Plan>();
  t.fits = j.at("fits").get<bool>();
  t.oom = j.value("oom", false);
  t.killed = j.value("killed", false);
  t.peak_bytes = j.at("peak_bytes").get<uint64_t>();
  t.phase_peaks = j.value("phase_peaks", nlohmann::json::object());
  t.tokens_per_s = j.at("tokens_per_s").get<double>();
  t.wall_s = j.value("wall_s", 0.0);
  t.process_s = j.value("process_s", 0.0);
  t.steps_run = j.value("steps_run", int64_t{0});
  t.too_slow = j.value("too_slow", false);
  t.error = j.value("error", false);
  t.timings = j.value("timings", 1);
  t.reason = j.value("reason", std::string());
}

void to_json(nlohmann::json& j, const SearchLine& l) {
  j = {{"precision", to_string(l.precision)},
       {"checkpointing", l.checkpointing},
       {"seq_len", l.seq_len},
       {"d_model", l.d_model},
       {"a_bytes", l.a_bytes},
       {"b_bytes", l.b_bytes},
       {"measured", l.measured}};
  if (l.optimizer_shards != 1) j["optimizer_shards"] = l.optimizer_shards;
}

void from_json(const nlohmann::json& j, SearchLine& l) {
  l.precision = parse_precision(j.at("precision").get<std::string>());
  l.checkpointing = j.at("checkpointing").get<bool>();
  l.seq_len = j.value("seq_len", int64_t{0});
  l.d_model = j.value("d_model", int64_t{0});
  l.a_bytes = j.at("a_bytes").get<double>();
  l.b_bytes = j.at("b_bytes").get<double>();
  l.measured = j.value("measured", false);
  l.optimizer_shards = j.value("optimizer_shards", int64_t{1});
}

void to_json(nlohmann::json& j, const ProbeOptions& o) {
  j = {{"usable_bytes", o.usable_bytes},
       {"measured_steps", o.measured_steps},
       {"min_measure_s", o.min_measure_s},
       {"seed", o.seed},
       {"stop_below_tokens_per_s", o.stop_below_tokens_per_s}};
}

void from_json(const nlohmann::json& j, ProbeOptions& o) {
  o.usable_bytes = j.at("usable_bytes").get<uint64_t>();
  o.measured_steps = j.at("measured_steps").get<int64_t>();
  o.min_measure_s = j.at("min_measure_s").get<double>();
  o.seed = j.at("seed").get<uint64_t>();
  o.stop_below_tokens_per_s = j.at("stop_below_tokens_per_s").get<double>();
}

namespace {
// Thrown from an observer to stop a trial that cannot reach the required throughput.
struct TrialTooSlow {};

// Times the measured steps (the warm-up step is step 1 and is excluded) and, after every phase,
// stops the trial once its wall time exceeds what all its tokens would take at the stop rate.
struct StepTimer : TrainObserver {
  double measured_s = 0;
  std::vector<double> step_s;  // each measured step
  int64_t steps = 0;
  int64_t tokens_per_step = 0;
  double deadline_s = 0;  // 0: none
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
  void on_step(const StepStats& s) override {
    steps = s.step;
    if (s.step == 1) return;
    measured_s += s.step_ms / 1e3;
    step_s.push_back(s.step_ms / 1e3);
  }
  // From the median step: a step slowed by another process on this 2-core VM moves the mean.
  double tokens_per_s() const {
    if (step_s.empty()) return 0;
    std::vector<double> v = step_s;
    const auto mid = (v.size() - 1) / 2;  // the lower median: noise only ever adds time
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid), v.end());
    const double median_s = v[mid];
    return median_s > 0 ? static_cast<double>(tokens_per_step) / median_s : 0;
  }
  void on_phase_end(Phase, int64_t) override {
    if (deadline_s > 0 &&
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >
            deadline_s)
      throw TrialTooSlow{};
  }
};
}  // namespace

double matmul_speed_vs_fp32(torch::Device device, Precision precision) {
  if (precision == Precision::fp32) return 1.0;
  const c10::ScalarType low =
      precision == Precision::bf16 ? c10::ScalarType::BFloat16 : c10::ScalarType::Half;
  torch::NoGradGuard no_grad;
  auto fastest_s = [&](c10::ScalarType dtype) {
    // 2 x 256^3 = 33 MFLOP per matmul: small enough to take milliseconds even where the low
    // precision has no fast kernel (timings in docs/BENCHMARKS.md).
    const auto options = torch::TensorOptions().device(device).dtype(dtype);
    const torch::Tensor a = torch::randn({256, 256}, options),
                        b = torch::randn({256, 256}, options);
    double best = 1e30;
    for (int i = 0; i < 6; ++i) {  // the first run pays kernel selection and packing
      const auto t0 = std::chrono::steady_clock::now();
      torch::Tensor c = a.mm(b);
      if (!device.is_cpu()) at::accelerator::synchronizeDevice(device.index());
      if (i > 0)
        best = std::min(
            best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
  };
  try {
    return fastest_s(c10::ScalarType::Float) / fastest_s(low);
  } catch (const c10::OutOfMemoryError&) {
    return 1.0;  // a budget too small for 1 MiB of matrices: unknown, so the precision is probed
  } catch (const c10::Error& e) {
    // No matmul kernel for this dtype on this device: said, and its plans are not probed.
    spdlog::warn("a {} matmul fails on {} ({}); its plans are probed only if nothing else fits",
                 to_string(precision), device.str(), e.what_without_backtrace());
    return 0.0;
  }
}

namespace {
// What a trial trains: two micro-batches show the accumulation peak (gradients alive during the
// second forward); more would only repeat it. One warm-up step first, never timed.
Plan probe_plan_of(const Plan& plan) {
  Plan p = plan;
  p.grad_accum = std::min<int64_t>(plan.grad_accum, 2);
  return p;
}
TrainOptions probe_train_options(const ProbeOptions& opt, int64_t measured_steps) {
  TrainOptions to;
  to.steps = 1 + measured_steps;
  to.warmup_steps = 1;
  to.seed = opt.seed;
  to.device = opt.device;
  to.recover_oom = false;
  to.synchronize_steps = true;  // plans are ranked by their steps' real time
  to.comm = opt.comm;
  return to;
}
}  // namespace

double time_plan(Workload& workload, const Plan& plan, const ProbeOptions& opt, MemoryMeter& meter,
                 double tokens_per_s) {
  const Plan probe_plan = probe_plan_of(plan);
  StepTimer timer;
  timer.tokens_per_step = probe_plan.global_batch() * workload.tokens_per_sequence(plan);
  const double step_s = static_cast<double>(timer.tokens_per_step) / std::max(tokens_per_s, 1e-9);
  TrainOptions to = probe_train_options(
      opt,
      std::clamp<int64_t>(static_cast<int64_t>(std::ceil(opt.min_measure_s / step_s)), 1, 200));
  to.eval_sequences = 0;
  double measured = 0;
  try {
    train(workload, probe_plan, to, {&timer});
    measured = timer.tokens_per_s();
  } catch (const c10::OutOfMemoryError&) {
  }
  meter.release_cache();
  return measured;
}

Trial run_trial(Workload& workload, const Plan& plan, const ProbeOptions& opt, MemoryMeter& meter) {
  Trial t;
  t.plan = plan;
  const Plan probe_plan = probe_plan_of(plan);
  TrainOptions to = probe_train_options(opt, opt.measured_steps);
  const int64_t eval_batch = plan.eval_batch_or_micro_batch();
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
  } catch (const std::logic_error&) {
    throw;  // a bug of ours, not a property of the plan: the probe stops with its message
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
  t.tokens_per_s = timer.tokens_per_s();

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
    const double again = time_plan(workload, plan, opt, meter, t.tokens_per_s);
    if (again > 0) t.tokens_per_s = again;  // else memory was measured above; keep the first
    t.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return t;
}

Trial verify_plan(Workload& workload, const Plan& plan, const ProbeOptions& opt,
                  MemoryMeter& meter) {
  ProbeOptions verify = opt;
  verify.measured_steps = 1;
  verify.min_measure_s = 0;
  return run_trial(workload, plan, verify, meter);
}

Trial InProcessTrials::run(const Plan& plan, const ProbeOptions& probe) {
  return run_trial(w_, plan, probe, m_);
}

std::vector<std::vector<double>> InProcessTrials::retime(const std::vector<Trial>& finalists,
                                                         int rounds, const ProbeOptions& probe) {
  std::vector<std::vector<double>> timings(finalists.size());
  for (int round = 0; round < rounds; ++round)
    for (size_t i = 0; i < finalists.size(); ++i)
      timings[i].push_back(time_plan(w_, finalists[i].plan, probe, m_, finalists[i].tokens_per_s));
  return timings;
}

double InProcessTrials::precision_speed(Precision precision) {
  auto it = speeds_.find(precision);
  if (it == speeds_.end())
    it = speeds_.emplace(precision, matmul_speed_vs_fp32(m_.device(), precision)).first;
  return it->second;
}

std::optional<uint64_t> InProcessTrials::need_bytes(const Plan& plan, const ProbeOptions& probe) {
  const std::optional<int64_t> cap = cpu_alloc::cap(), rss_limit = cpu_alloc::rss_limit();
  cpu_alloc::set_cap(std::nullopt);
  cpu_alloc::set_rss_limit(std::nullopt);
  ProbeOptions free = probe;
  free.usable_bytes = UINT64_MAX;
  free.min_measure_s = 0;
  free.stop_below_tokens_per_s = 0;
  const Trial t = run_trial(w_, plan, free, m_);
  cpu_alloc::set_cap(cap);
  cpu_alloc::set_rss_limit(rss_limit);
  if (!t.fits) return std::nullopt;
  return t.peak_bytes;
}

}  // namespace autotune
